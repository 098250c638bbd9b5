"""A pool of worker processes, one per device, each holding its own copy of the model.

:class:`EmbedderPool` starts one process per device entry (``["cuda:0", "cuda:1"]``, or ``["cpu", "cpu"]`` for
several CPU workers that share the cores). Each worker builds its own
:class:`~tembed.local_encoder.LocalEncoder` from an :class:`~tembed.settings.EmbedderConfig`, so nothing bigger
than the texts and the outputs ever crosses a process boundary, and stays warm until :meth:`EmbedderPool.close`.
See ``docs/parallel.md``.

Modules: :mod:`~tembed.pool.pool` (the public class and its engine), :mod:`~tembed.pool.scheduler` (chunks and
merging), :mod:`~tembed.pool.transport` (messages, waiting, shutdown), :mod:`~tembed.pool.worker` (the child
process), :mod:`~tembed.pool.errors`, :mod:`~tembed.pool.startup` (checks in the caller),
:mod:`~tembed.pool.devices`.

Spawned workers re-import the caller's ``__main__`` module, so a script that creates a pool must do it under
``if __name__ == "__main__":``; a pool created while that re-import runs raises a :class:`RuntimeError` that
says so.
"""

from tembed.pool.devices import available_cores, resolve_devices
from tembed.pool.errors import PoolClosedError, RemoteWorkerError, WorkerDiedError
from tembed.pool.pool import EmbedderPool, PoolStats

__all__ = [
    "EmbedderPool",
    "PoolClosedError",
    "PoolStats",
    "RemoteWorkerError",
    "WorkerDiedError",
    "available_cores",
    "resolve_devices",
]
