""":class:`EmbedderPool`: one worker process per device, each with a warm copy of the model.

The pool implements the :class:`~tembed.encoder.Encoder` protocol. Its engine (:meth:`EmbedderPool._execute`)
reads the input a block at a time, sends length-sorted chunks to the least busy workers (at most
``max_pending_chunks`` unanswered), and yields each block's outputs in input order, while watching every worker:
a worker's exception is re-raised in the caller, a worker's death raises :class:`WorkerDiedError` at once.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import multiprocessing
import os
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from tembed.encoder import iter_blocks
from tembed.outputs import EncodeOutputs
from tembed.pool.devices import cpu_threads_per_worker, resolve_devices
from tembed.pool.errors import PoolClosedError, unpack_exception, worker_died
from tembed.pool.scheduler import DEFAULT_CHUNK_SIZE, PoolStats, Schedule
from tembed.pool.startup import build_config, check_model_resolves, check_pool_options
from tembed.pool.transport import (
    ChunkDone,
    ChunkFailed,
    Hello,
    Ready,
    Resources,
    StartError,
    Task,
    WorkerHandle,
    shutdown,
    unlink_semaphore_names,
    wait_messages,
)
from tembed.pool.worker import create_worker
from tembed.progress import progress_bar, show_progress
from tembed.settings import EmbedderConfig, EncodeOptions, Settings, clamp_max_length
from tembed.text import check_texts
from tembed.types import DeviceLike


class EmbedderPool:
    """Worker processes, one per device, each encoding with its own :class:`~tembed.local_encoder.LocalEncoder`.

    Args:
        config: an :class:`~tembed.settings.EmbedderConfig`, or a model name or folder (resolved once, here).
        devices: one worker per entry (``["cuda:0", "cuda:1"]``, ``["cpu", "cpu"]``, ``"cpu,cpu"``), or one
            device; forms as in :func:`~tembed.pool.resolve_devices`.
        threads_per_worker: torch threads in each CPU worker; None: the available cores divided by the number
            of CPU workers (at least 1). GPU workers keep torch's default unless this is given.
        chunk_size: the most texts per worker task (default 256); small inputs are cut smaller so that every
            worker gets a share.
        max_pending_chunks: the most chunks sent and not yet answered, over all workers; None: 2 per worker (one
            running, one queued). Bounds memory whatever the input size.
        start_method: ``"spawn"`` (default) or ``"forkserver"``; ``"fork"`` is refused (it deadlocks torch's
            thread pools and CUDA).
        start_timeout: seconds to wait for the workers to load the model; None: no limit (a worker that dies
            while loading is reported at once either way).
        grace_seconds: how long :meth:`close` lets busy workers finish before terminating them.
        **embedder_kwargs: :class:`~tembed.settings.EmbedderConfig` options (``pooling``, ``precision``,
            ``batch_size``...); with a config, they replace its values. An unknown one raises TypeError here.
            ``show_progress_bar`` applies to the pool's own bar; workers never draw one.

    Attributes:
        settings: the first worker's :class:`~tembed.settings.Settings`, with ``device`` the comma-joined devices
            (``"cpu,cpu"``) and the pool's ``show_progress_bar``.
        config, devices, threads_per_worker, chunk_size, max_pending_chunks: as resolved from the arguments.

    Faults:
        * A worker that raises: the caller gets the same exception (type and message; a
          :class:`~tembed.pool.RemoteWorkerError` naming the type when it cannot be pickled), with the worker's
          traceback as its ``__cause__``. The pool stays usable; late results of the failed call are dropped.
        * A worker that dies: the caller gets :class:`~tembed.pool.WorkerDiedError` (device, pid, exit code or
          signal) as soon as the parent sees the process end, never a hang. **The pool is then broken**: the
          other workers are stopped at once and every later call raises :class:`~tembed.pool.PoolClosedError`
          (its cause is the original error); create a new pool. A death between calls is reported by the next.
        * Start-up: an error while a worker loads the model is raised from the constructor, and no process is
          left running.

    Lifetime: :meth:`close` (or leaving a ``with`` block) stops the workers; it is idempotent. A pool never
    closed is shut down quietly when collected or at interpreter exit (``weakref.finalize``); workers exit by
    themselves within about a second if the parent process disappears. Calls from several threads are
    serialized; calling the pool while one of its :meth:`encode_stream` iterators is unfinished in the same
    thread raises ``RuntimeError``. ``stats`` (:class:`~tembed.pool.PoolStats`) counts the chunks.
    """

    def __init__(
        self,
        config: EmbedderConfig | str | os.PathLike[str],
        devices: DeviceLike | Sequence[DeviceLike],
        *,
        threads_per_worker: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_pending_chunks: int | None = None,
        start_method: str = "spawn",
        start_timeout: float | None = None,
        grace_seconds: float = 5.0,
        **embedder_kwargs: Any,
    ) -> None:
        check_pool_options(start_method, chunk_size, threads_per_worker, max_pending_chunks)
        self.config: EmbedderConfig = build_config(config, embedder_kwargs)
        self.devices: list[torch.device] = resolve_devices(devices)
        check_model_resolves(self.config.model, self.config.cache_dir)
        self.model = self.config.model
        self.chunk_size = chunk_size
        self.max_pending_chunks = max_pending_chunks or 2 * len(self.devices)
        self._per_worker_cap = max(1, math.ceil(self.max_pending_chunks / len(self.devices)))
        self.threads_per_worker = cpu_threads_per_worker(self.devices, threads_per_worker)
        self.stats = PoolStats()
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._calls = itertools.count(1)
        self._chunk_ids = itertools.count()
        self._closed = False
        self._broken: BaseException | None = None
        ctx = multiprocessing.get_context(start_method)
        self._resources = Resources(stop_event=ctx.Event(), grace_seconds=grace_seconds)
        self._finalizer = weakref.finalize(self, shutdown, self._resources)
        self._workers: list[WorkerHandle] = self._resources.workers
        try:
            self._start_workers(ctx, threads_per_worker, start_timeout)
        except BaseException:
            self._resources.graceful = False
            self._closed = True
            self._finalizer()
            raise
        first = self._workers[0].settings
        assert first is not None  # every worker is ready
        devices = ",".join(str(device) for device in self.devices)
        self.settings: Settings = first.replace(device=devices, show_progress_bar=self.config.show_progress_bar)

    def _start_workers(self, ctx: Any, threads_per_worker: int | None, start_timeout: float | None) -> None:
        worker_config = self.config.replace(show_progress_bar=False)
        stop_event = self._resources.stop_event
        for index, device in enumerate(self.devices):
            threads = self.threads_per_worker if device.type == "cpu" else threads_per_worker
            worker = create_worker(
                ctx, index, str(device), worker_config, threads, stop_event, self._per_worker_cap + 1
            )
            self._workers.append(worker)
            worker.start()
        self._wait_ready(start_timeout)
        # Every worker has opened the queues' and the event's named semaphores: unlink the names now, so that
        # nothing is left to clean up (and no "leaked semaphore" warning) if this process is SIGKILLed.
        unlink_semaphore_names([stop_event, *(worker.tasks for worker in self._workers)])

    # ----------------------------------------------------------------------------------------------- info
    @property
    def pids(self) -> list[int | None]:
        """The worker process ids, in device order."""
        return [worker.pid for worker in self._workers]

    @property
    def num_workers(self) -> int:
        return len(self._workers)

    @property
    def embedding_dim(self) -> int:
        """The length of dense vectors (``settings.dim``)."""
        return self.settings.dim

    @property
    def healthy(self) -> bool:
        """True while every worker runs and the pool is open (checked without a call, e.g. by a health route)."""
        return not self._closed and self._broken is None and not any(w.exited() for w in self._workers)

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"EmbedderPool(model={self.model!r}, devices={[str(d) for d in self.devices]}, {state})"

    # ----------------------------------------------------------------------------------------------- encoding
    def encode(self, texts: Sequence[str], options: EncodeOptions | None = None) -> EncodeOutputs:
        """The outputs of ``texts`` (a list of str; a single str is refused) in their order, with ``token_counts``.

        ``options``: the call's :class:`~tembed.settings.EncodeOptions`; default: plain dense vectors. An empty
        list still goes to one worker, so that the outputs have their shapes (``(0, dim)`` dense).

        Raises:
            TypeError / ValueError: a text is not a str or not valid Unicode (its index is named), or ``options``
                is not an EncodeOptions; any exception a worker raised.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a list of str; for one text pass [text]")
        items, _ = check_texts(texts, what="texts")
        options = self._clamped(_check_options(options))
        show = show_progress(self.config.show_progress_bar, len(items))
        blocks = list(self._execute(iter([items]), options, progress=show, total=len(items)))
        return blocks[0][2]

    def encode_stream(
        self, texts: Iterable[str], options: EncodeOptions | None = None, *, block_size: int | None = None
    ) -> Iterator[tuple[np.ndarray, EncodeOutputs]]:
        """Encode an iterable that need not fit in memory, block by block, in input order.

        Reads ``block_size`` texts at a time (default ``chunk_size * 2 * workers``), cuts each block into
        length-sorted chunks for the workers, and yields ``(positions, outputs)`` per block: ``positions`` the
        int64 input positions (consecutive). At most two blocks are held and at most ``max_pending_chunks``
        chunks are in flight; the next block is read only when the workers need more work.

        Raises:
            TypeError: ``texts`` is a single string, or an item is not a string (its position is named).
        """
        options = _check_options(options)
        blocks = iter_blocks(texts, block_size or self.chunk_size * 2 * len(self._workers))
        for start, size, outputs in self._execute(blocks, options):
            yield np.arange(start, start + size, dtype=np.int64), outputs

    # ----------------------------------------------------------------------------------------------- engine
    def _clamped(self, options: EncodeOptions) -> EncodeOptions:
        return _clamp_in_caller(options, self.settings.max_seq_length)

    def _execute(
        self, blocks: Iterator[list[str]], options: EncodeOptions, *, progress: bool = False, total: int | None = None
    ) -> Iterator[tuple[int, int, EncodeOutputs]]:
        """``(start, size, outputs)`` of each block of ``blocks``, in order, encoded by the workers."""
        self._acquire()
        try:
            self._check_usable()
            call_id = next(self._calls)
            schedule = Schedule(blocks, self.chunk_size, len(self._workers))
            bar = progress_bar(total, progress)
            try:
                while True:
                    if schedule.read_block():
                        continue
                    self._dispatch(call_id, schedule, options)
                    done = schedule.pop_complete()
                    if done is not None:
                        yield done
                        self._check_usable()
                        continue  # read the next block before waiting: the ones held may all be done
                    if schedule.finished:
                        return
                    for chunk_id, outputs in self._receive(call_id):
                        bar.update(schedule.received(chunk_id, outputs))
            finally:
                bar.close()
        finally:
            self._release()

    def _acquire(self) -> None:
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError(
                "this EmbedderPool is in use by an unfinished encode_stream() iterator in this thread; "
                "exhaust it or call its close() before calling the pool again"
            )
        self._lock.acquire()
        self._owner = me

    def _release(self) -> None:
        self._owner = None
        self._lock.release()

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise PoolClosedError(
                f"this EmbedderPool is unusable since a worker died ({self._broken}); create a new EmbedderPool"
            ) from self._broken
        if self._closed:
            raise PoolClosedError("this EmbedderPool is closed")
        for worker in self._workers:
            if worker.exited():
                self._die(worker)

    def _dispatch(self, call_id: int, schedule: Schedule, options: EncodeOptions) -> None:
        """Send chunks while some worker has room (an unpicklable option raises here, before anything is sent)."""
        while schedule.has_chunk():
            worker = self._free_worker()
            if worker is None:
                return
            chunk_id = next(self._chunk_ids)
            worker.send(Task(call_id, chunk_id, schedule.next_chunk().texts, options))
            schedule.sent(chunk_id)
            self.stats.chunks_sent += 1
            outstanding = sum(w.outstanding for w in self._workers)
            self.stats.max_outstanding = max(self.stats.max_outstanding, outstanding)

    def _free_worker(self) -> WorkerHandle | None:
        if sum(w.outstanding for w in self._workers) >= self.max_pending_chunks:
            return None
        candidates = [w for w in self._workers if w.outstanding < self._per_worker_cap]
        return min(candidates, key=lambda w: w.outstanding) if candidates else None

    def _receive(self, call_id: int) -> list[tuple[int, EncodeOutputs]]:
        """Wait until some answer frees a slot; return this call's outputs. Raises on a worker error or death."""
        while True:
            inbox = wait_messages(self._workers)
            if inbox.dead:
                self._die(inbox.dead[0])
            delivered: list[tuple[int, EncodeOutputs]] = []
            failures: list[BaseException] = []
            answers = [(m, w) for m, w in inbox.messages if isinstance(m, (ChunkDone, ChunkFailed))]
            for message, worker in answers:
                worker.outstanding -= 1
                if message.call_id != call_id:
                    continue  # a late answer of an abandoned call
                if isinstance(message, ChunkFailed):
                    failures.append(unpack_exception(message.error, worker.describe()))
                else:
                    self.stats.chunks_received += 1
                    delivered.append((message.chunk_id, message.outputs))
            if failures:
                raise failures[0]
            if answers:
                return delivered

    def _die(self, worker: WorkerHandle) -> None:
        """Break the pool because ``worker`` died: stop the others at once and raise WorkerDiedError."""
        worker.process.join(timeout=1.0)
        code = worker.process.exitcode
        ready = worker.settings is not None
        error = worker_died(worker.describe(), worker.device, worker.pid, code, hello=worker.said_hello, ready=ready)
        self._broken = error
        self._closed = True
        self._resources.graceful = False
        self._finalizer()
        raise error

    def _wait_ready(self, timeout: float | None) -> None:
        """Wait for every worker's :class:`Ready`; a start-up error or a death raises."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(worker.settings is None for worker in self._workers):
            if deadline is not None and time.monotonic() > deadline:
                slow = [w.describe() for w in self._workers if w.settings is None]
                raise TimeoutError(f"tembed workers did not load the model within {timeout} s: {', '.join(slow)}")
            inbox = wait_messages(self._workers)
            for message, worker in inbox.messages:
                if isinstance(message, Hello):
                    worker.said_hello = True
                elif isinstance(message, Ready):
                    worker.settings = message.settings
                elif isinstance(message, StartError):
                    raise unpack_exception(message.error, worker.describe(), while_="loading the model")
            if inbox.dead:
                self._die(inbox.dead[0])

    # ----------------------------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Stop the workers and release their memory. Idempotent; the pool cannot encode afterwards."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> EmbedderPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _clamp_in_caller(options: EncodeOptions, limit: int | None) -> EncodeOptions:
    """A ``max_length`` beyond the model's limit, clamped here so that the caller gets the warning (the workers
    would warn on their own stderr)."""
    if options.max_length is None or limit is None or options.max_length <= limit:
        return options
    return dataclasses.replace(options, max_length=clamp_max_length(options.max_length, limit))


def _check_options(options: object) -> EncodeOptions:
    if options is None:
        return EncodeOptions()
    if not isinstance(options, EncodeOptions):
        raise TypeError(f"options must be an EncodeOptions, got {type(options).__name__}")
    return options
