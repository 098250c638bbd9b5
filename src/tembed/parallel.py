"""A pool of worker processes, one per device, each holding its own copy of the model.

:class:`EmbedderPool` starts one process per device entry (``["cuda:0", "cuda:1"]``, or ``["cpu", "cpu"]`` for
several CPU workers that share the cores). Each worker builds its own :class:`tembed.Embedder` from the model
name and keyword arguments, so nothing bigger than the texts and the outputs ever crosses a process boundary,
and stays warm until :meth:`EmbedderPool.close`.

Work goes out in length-sorted chunks, at most ``max_pending_chunks`` at a time, and the outputs come back in
the caller's order. The parent watches every worker while it waits: a worker exception is re-raised in the
caller with its type and message, and a worker that dies (SIGKILL, segfault, the out-of-memory killer) raises
:class:`WorkerDiedError` at once instead of hanging. See ``docs/parallel.md``.

Spawned workers re-import the caller's ``__main__`` module, so a script that creates a pool must do it under
``if __name__ == "__main__":``; a pool created while that re-import runs raises a :class:`RuntimeError` that
says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import queue
import signal
import threading
import time
import traceback
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tembed.devices import DeviceLike, resolve_device

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 256
"""Texts per worker task. Small enough to balance load and bound memory, large enough that IPC is noise."""
MIN_CHUNK_SIZE = 16
CHUNKS_PER_WORKER_SMALL_INPUT = 4
"""A small input is cut into about this many chunks per worker, so all workers share it evenly."""
PROGRESS_BAR_MIN_TEXTS = 1024
_POLL_SECONDS = 1.0
_ENCODE_METHODS = ("encode", "encode_queries", "encode_corpus")

_GUARD_HINT = (
    "Worker processes are started with 'spawn', which re-imports your main script; a script that creates an "
    'EmbedderPool (or an Embedder with a list of devices) must do it under `if __name__ == "__main__":`.'
)


# ------------------------------------------------------------------------------------------------ errors
class WorkerDiedError(RuntimeError):
    """A worker process ended without being asked to (killed by a signal, crashed, out of memory).

    Attributes:
        device: the worker's device, e.g. ``"cuda:1"``.
        pid: the worker's process id.
        exitcode: the process exit code; negative for a signal (``-9`` is SIGKILL).
    """

    def __init__(self, message: str, *, device: str = "", pid: int | None = None, exitcode: int | None = None):
        super().__init__(message)
        self.device = device
        self.pid = pid
        self.exitcode = exitcode

    def __reduce__(self) -> tuple:
        return (_rebuild_worker_died, (str(self), self.device, self.pid, self.exitcode))


def _rebuild_worker_died(message: str, device: str, pid: int | None, exitcode: int | None) -> WorkerDiedError:
    return WorkerDiedError(message, device=device, pid=pid, exitcode=exitcode)


class PoolClosedError(RuntimeError):
    """The pool was closed, or is unusable because a worker died; create a new pool."""


class RemoteWorkerError(RuntimeError):
    """A worker raised an exception that could not be sent back as itself; the message names its type."""


class _RemoteTraceback(Exception):
    """Carries the worker's traceback text as the ``__cause__`` of a re-raised exception."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


# ------------------------------------------------------------------------------------------------ devices
def resolve_devices(device: DeviceLike | Sequence[DeviceLike]) -> list[torch.device]:
    """The devices of a ``device`` argument, as a list.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, an int, ``"auto"`` / None (one device: the first
            GPU, else MPS, else the CPU), or a list / tuple of those (one worker each; repeat ``"cpu"`` for
            several CPU workers).

    Raises:
        ValueError: an entry names no device or an unavailable one, or the list is empty.
    """
    if isinstance(device, (list, tuple)):
        if not device:
            raise ValueError("device list is empty: give at least one device")
        return [resolve_device(entry) for entry in device]
    return [resolve_device(device)]


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


# ------------------------------------------------------------------------------------------------ the pool
class _Worker:
    """The parent's view of one worker process."""

    def __init__(self, index: int, device: str, process: Any, tasks: Any, results: Any) -> None:
        self.index = index
        self.device = device
        self.process = process
        self.tasks = tasks  # bounded multiprocessing Queue of pickled tasks (parent -> worker)
        self.results = results  # receiving end of a Pipe (worker -> parent); EOF when the worker dies
        self.outstanding = 0  # chunks sent and not yet answered (this or an abandoned call)
        self.said_hello = False
        self.info: dict[str, Any] | None = None
        self.pid: int | None = None  # kept after the process object is closed

    def describe(self) -> str:
        return f"worker {self.index} ({self.device}, pid {self.pid})"


class _Resources:
    """What :func:`_shutdown` needs; held by the finalizer instead of the pool, so the pool can be collected."""

    def __init__(self) -> None:
        self.workers: list[_Worker] = []
        self.stop_event: Any = None
        self.graceful = True
        self.grace_seconds = 5.0


class _Block:
    """A run of consecutive input items, length-sorted into chunks; merged back into input order."""

    def __init__(self, start: int, size: int) -> None:
        self.start = start
        self.size = size
        self.remaining = 0
        self.parts: list[tuple[np.ndarray, Any]] = []

    @property
    def complete(self) -> bool:
        return self.remaining == 0


class EmbedderPool:
    """Worker processes, one per device, each with a warm :class:`tembed.Embedder`.

    Args:
        model: a model name or folder, as for :class:`tembed.Embedder` (only this string is sent to workers).
        devices: a list of devices, one worker each (``["cuda:0", "cuda:1"]``, ``["cpu", "cpu"]``), or one
            device; forms as in :func:`resolve_devices`.
        threads_per_worker: torch threads in each CPU worker; None: the available cores divided by the number
            of CPU workers (at least 1). GPU workers keep torch's default unless this is given.
        chunk_size: the most texts per worker task (default 256). Small inputs are cut smaller so that every
            worker gets a share.
        max_pending_chunks: the most chunks sent and not yet answered, over all workers; None: 2 per worker
            (one running, one queued). Bounds memory whatever the input size.
        start_method: ``"spawn"`` (default) or ``"forkserver"``; ``"fork"`` is refused (it deadlocks torch's
            thread pools and CUDA).
        start_timeout: seconds to wait for the workers to load the model; None: no limit (a worker that dies
            while loading is reported at once either way).
        **embedder_kwargs: passed to each worker's ``Embedder`` (``pooling``, ``precision``, ``batch_size``,
            ...). ``show_progress_bar`` applies to the pool's own bar; workers never draw one.

    Faults:
        * A worker that raises: the caller gets the same exception (type and message; a
          :class:`RemoteWorkerError` naming the type when it cannot be pickled), with the worker's traceback as
          its ``__cause__``. The pool stays usable: results of the failed call that arrive later are dropped.
        * A worker that dies: the caller gets :class:`WorkerDiedError` (device, pid, exit code or signal) as soon
          as the parent sees the process end, never a hang. **Policy: the pool is then broken** -- the other
          workers are stopped at once and every later call raises :class:`PoolClosedError` (its cause is the
          original :class:`WorkerDiedError`); create a new pool. A death is usually deterministic (an input too
          big for memory, a driver fault), so a silent restart would only repeat it, and a GPU that lost a
          process is best re-initialized explicitly. A death between calls is reported by the next call.
        * Start-up: an error while a worker loads the model (bad model, bad argument) is raised from the
          constructor, and no process is left running.

    Lifetime:
        :meth:`close` (or leaving a ``with`` block) stops the workers: idle ones exit at once, busy ones are
        terminated after ``grace_seconds``. It is idempotent. A pool that is never closed is shut down when it is
        garbage collected or at interpreter exit (``weakref.finalize``), quietly. Workers also exit by themselves
        within about a second if the parent process disappears.

    Not thread-safe for concurrent calls from several threads: calls are serialized by a lock. Calling the pool
    again while one of its :meth:`stream` iterators is unfinished in the same thread raises ``RuntimeError``.

    Example:
        >>> if __name__ == "__main__":
        ...     with EmbedderPool("sentence-transformers/all-MiniLM-L6-v2", ["cpu", "cpu"]) as pool:
        ...         vectors = pool.encode(texts)   # (n, 384) float32, in the order of texts
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
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
        _refuse_inside_bootstrap()
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(
                f"start_method must be 'spawn' or 'forkserver', got {start_method!r} "
                "('fork' deadlocks torch thread pools and CUDA in the children)"
            )
        _check_positive("chunk_size", chunk_size)
        if threads_per_worker is not None:
            _check_positive("threads_per_worker", threads_per_worker)
        if max_pending_chunks is not None:
            _check_positive("max_pending_chunks", max_pending_chunks)
        if "device" in embedder_kwargs:
            raise TypeError("give the devices as EmbedderPool(model, devices), not device=")
        _check_embedder_kwargs(model, embedder_kwargs)
        resolved = resolve_devices(devices)
        _check_model_resolves(model)

        self.model = os.fspath(model)
        self.devices: list[torch.device] = resolved
        self.chunk_size = chunk_size
        self.max_pending_chunks = max_pending_chunks or 2 * len(resolved)
        self._per_worker_cap = max(1, math.ceil(self.max_pending_chunks / len(resolved)))
        self.show_progress_bar: bool | None = embedder_kwargs.pop("show_progress_bar", None)
        worker_kwargs = {**embedder_kwargs, "show_progress_bar": False}

        n_cpu = sum(1 for d in resolved if d.type == "cpu")
        cpu_threads = threads_per_worker or max(1, available_cores() // max(1, n_cpu))
        self.threads_per_worker = cpu_threads

        self._lock = threading.Lock()
        self._owner: int | None = None
        self._calls = itertools.count(1)
        self._current_call = 0
        self._chunks_received = 0
        self._max_outstanding_seen = 0
        self._closed = False
        self._broken: BaseException | None = None

        ctx = multiprocessing.get_context(start_method)
        self._resources = _Resources()
        self._resources.grace_seconds = grace_seconds
        self._resources.stop_event = ctx.Event()
        self._finalizer = weakref.finalize(self, _shutdown, self._resources)
        self._workers = self._resources.workers
        try:
            for index, device in enumerate(resolved):
                threads = cpu_threads if device.type == "cpu" else threads_per_worker
                tasks = ctx.Queue(maxsize=self._per_worker_cap + 1)
                receive, send = ctx.Pipe(duplex=False)
                process = ctx.Process(
                    target=_worker_main,
                    name=f"tembed-worker-{index}-{device}",
                    args=(self.model, str(device), threads, worker_kwargs, tasks, send, self._resources.stop_event),
                    daemon=True,
                )
                worker = _Worker(index, str(device), process, tasks, receive)
                self._workers.append(worker)
                process.start()
                worker.pid = process.pid
                send.close()  # the worker holds the only writing end: its death is an EOF here
            self._wait_ready(start_timeout)
            # Every worker has opened the queues' and the event's named semaphores: unlink the names now, so that
            # nothing is left to clean up (and no "leaked semaphore" warning) if this process is SIGKILLed.
            _unlink_semaphore_names([self._resources.stop_event, *(worker.tasks for worker in self._workers)])
        except BaseException:
            self._resources.graceful = False
            self._closed = True
            self._finalizer()
            raise

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
        """The workers' output dimension (as :attr:`tembed.Embedder.embedding_dim`)."""
        info = self._workers[0].info or {}
        return int(info["embedding_dim"])

    @property
    def worker_settings(self) -> dict[str, Any]:
        """The first worker's :meth:`tembed.Embedder.settings` (pooling, instructions, lengths, dim, ...)."""
        return dict(self._workers[0].info or {})

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"EmbedderPool(model={self.model!r}, devices={[str(d) for d in self.devices]}, {state})"

    # ----------------------------------------------------------------------------------------------- encoding
    def encode(self, texts: str | Sequence[str], **kwargs: Any) -> Any:
        """:meth:`tembed.Embedder.encode` across the workers: same arguments, same return shapes."""
        return self._encode_like("encode", texts, "texts", kwargs)

    def encode_queries(self, queries: str | Sequence[str], **kwargs: Any) -> Any:
        """:meth:`tembed.Embedder.encode_queries` across the workers."""
        return self._encode_like("encode_queries", queries, "queries", kwargs)

    def encode_corpus(self, corpus: str | Sequence[str], **kwargs: Any) -> Any:
        """:meth:`tembed.Embedder.encode_corpus` across the workers."""
        return self._encode_like("encode_corpus", corpus, "corpus", kwargs)

    def _encode_like(self, method: str, texts: Any, what: str, kwargs: dict[str, Any]) -> Any:
        from tembed.text import check_texts

        items, single = check_texts(texts, what=what)
        result = self.map(method, items, **kwargs)
        return result[0] if single else result

    def map(self, method: str, items: Iterable[Any], **call_kwargs: Any) -> Any:
        """Call ``embedder.<method>(chunk, **call_kwargs)`` on chunks of ``items`` in the workers; merge in order.

        ``method`` is any public method of the workers' embedder that takes a list of items and returns one
        output per item (``"encode"``, ``"encode_corpus"``, M3 outputs, ``"compute_score"`` on pairs). Chunk
        outputs are merged by type: numpy arrays and torch tensors along the first axis, lists item by item,
        dicts and tuples field by field (a dict value is None if any chunk's is None), dataclasses field by
        field, and any other type through a classmethod ``concatenate(parts)`` plus ``take(indices)`` (or
        indexing with an integer array) on the result.

        Returns:
            the merged output, in the order of ``items``. An empty input is sent to one worker as is.
        """
        items = items if isinstance(items, list) else list(items)
        show = len(items) >= PROGRESS_BAR_MIN_TEXTS if self.show_progress_bar is None else self.show_progress_bar
        outputs = list(
            self._execute(iter([items]), method, call_kwargs, self.chunk_size, progress=show, total=len(items))
        )
        return outputs[0][2]

    def stream(
        self,
        items: Iterable[Any],
        method: str = "encode",
        *,
        block_size: int | None = None,
        **call_kwargs: Any,
    ) -> Iterator[tuple[np.ndarray, Any]]:
        """Encode an iterable that need not fit in memory, block by block, in input order.

        Reads ``block_size`` items at a time (default ``chunk_size * 2 * workers``), length-sorts each block
        into chunks for the workers, and yields ``(ids, outputs)`` per block: ``ids`` the input positions
        (consecutive, int64), ``outputs`` as :meth:`map` returns for that block. At most two blocks are held and
        at most ``max_pending_chunks`` chunks are in flight, so memory is bounded whatever the input size. The
        next block is read only when the workers need more work.

        Raises:
            TypeError: ``items`` is a single string, or (for the encode methods) an item is not a string; the
                error names the item's position.
        """
        if isinstance(items, (str, bytes)):
            raise TypeError("stream() takes an iterable of texts; for one text use encode()")
        size = block_size or self.chunk_size * 2 * len(self._workers)
        _check_positive("block_size", size)
        check = method in _ENCODE_METHODS
        blocks = _read_blocks(iter(items), size, check_str=check)
        for start, size, output in self._execute(blocks, method, call_kwargs, self.chunk_size):
            yield np.arange(start, start + size, dtype=np.int64), output

    # ----------------------------------------------------------------------------------------------- engine
    def _execute(
        self,
        blocks: Iterator[list[Any]],
        method: str,
        call_kwargs: dict[str, Any],
        chunk_size: int,
        *,
        progress: bool = False,
        total: int | None = None,
    ) -> Iterator[tuple[int, int, Any]]:
        if not isinstance(method, str) or not method or method.startswith("_"):
            raise ValueError(f"method must be the name of a public Embedder method, got {method!r}")
        self._acquire()
        try:
            self._check_usable()
            call_id = next(self._calls)
            self._current_call = call_id
            pending_blocks: deque[_Block] = deque()
            to_send: deque[tuple[_Block, np.ndarray, list[Any]]] = deque()
            in_flight: dict[int, tuple[_Block, np.ndarray]] = {}
            chunk_ids = itertools.count()
            position = 0
            source_done = False
            bar = tqdm(total=total, desc="Encoding", unit="text", disable=not progress, leave=False)
            try:
                while True:
                    # Read a block only when the workers would otherwise run dry; hold at most two.
                    if not to_send and not source_done and len(pending_blocks) < 2:
                        try:
                            block_items = next(blocks)
                        except StopIteration:
                            source_done = True
                        else:
                            block = _Block(position, len(block_items))
                            position += len(block_items)
                            for positions in _plan_chunks(block_items, chunk_size, len(self._workers)):
                                to_send.append((block, positions, [block_items[i] for i in positions]))
                                block.remaining += 1
                            pending_blocks.append(block)
                            del block_items
                            continue
                    while to_send:
                        worker = self._free_worker()
                        if worker is None:
                            break
                        block, positions, chunk = to_send.popleft()
                        chunk_id = next(chunk_ids)
                        self._send(worker, (call_id, chunk_id, method, chunk, call_kwargs))
                        in_flight[chunk_id] = (block, positions)
                    while pending_blocks and pending_blocks[0].complete:
                        done = pending_blocks.popleft()
                        output = _merge([value for _, value in done.parts], [p for p, _ in done.parts], done.size)
                        done.parts = []
                        yield done.start, done.size, output
                        self._check_usable()
                    if source_done and not pending_blocks:
                        return
                    for chunk_id, value in self._receive(call_id):
                        block, positions = in_flight.pop(chunk_id)
                        block.parts.append((positions, value))
                        block.remaining -= 1
                        bar.update(len(positions))
            finally:
                bar.close()
        finally:
            self._release()

    def _acquire(self) -> None:
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError(
                "this EmbedderPool is in use by an unfinished stream() iterator in this thread; "
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
            if worker.process.exitcode is not None:
                self._die(worker)

    def _free_worker(self) -> _Worker | None:
        if sum(w.outstanding for w in self._workers) >= self.max_pending_chunks:
            return None
        candidates = [w for w in self._workers if w.outstanding < self._per_worker_cap]
        return min(candidates, key=lambda w: w.outstanding) if candidates else None

    def _send(self, worker: _Worker, task: tuple) -> None:
        # Pickled here, not in the queue's feeder thread, so an unpicklable argument raises in the caller
        # instead of being dropped with the parent waiting for its result.
        payload = pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL)
        worker.tasks.put(payload, timeout=_POLL_SECONDS * 10)
        worker.outstanding += 1
        self._max_outstanding_seen = max(self._max_outstanding_seen, sum(w.outstanding for w in self._workers))

    def _receive(self, call_id: int) -> list[tuple[int, Any]]:
        """Wait until some message frees a slot; return this call's results. Raises on a worker error or death."""
        while True:
            messages = self._wait_messages()
            delivered: list[tuple[int, Any]] = []
            freed = False
            for message, worker in messages:
                kind = message[0]
                if kind not in ("ok", "error"):
                    continue
                _, msg_call, chunk_id, payload = message
                worker.outstanding -= 1
                freed = True
                if msg_call != call_id:
                    continue  # a result of an abandoned call
                if kind == "error":
                    raise _unpack_exception(payload, worker)
                self._chunks_received += 1
                delivered.append((chunk_id, payload))
            if freed:
                return delivered

    def _wait_messages(self, timeout: float = _POLL_SECONDS) -> list[tuple[tuple, _Worker]]:
        """At most one message per worker, waiting up to ``timeout``; a dead worker raises WorkerDiedError.

        The parent waits on each worker's result pipe and on its process sentinel together, so a death is seen
        as soon as the process ends. A worker's last messages are read before its death is reported (a start-up
        error is sent just before the worker exits).
        """
        objects: list[Any] = []
        for worker in self._workers:
            objects += [worker.results, worker.process.sentinel]
        ready = set(multiprocessing.connection.wait(objects, timeout=timeout))
        messages = []
        for worker in self._workers:
            got = False
            eof = False
            if worker.results in ready or worker.process.sentinel in ready:
                try:
                    if worker.results.poll():  # data, or EOF once the worker is gone
                        messages.append((pickle.loads(worker.results.recv_bytes()), worker))
                        got = True
                except (EOFError, OSError):
                    eof = True
            if eof or (not got and worker.process.exitcode is not None):
                self._die(worker)
        return messages

    def _die(self, worker: _Worker) -> None:
        worker.process.join(timeout=1.0)
        code = worker.process.exitcode
        what = f"tembed {worker.describe()} {_describe_exit(code)}"
        if worker.info is None and not worker.said_hello:
            message = f"{what} before it could start. {_GUARD_HINT} (The worker's own error, above, says more.)"
        elif worker.info is None:
            message = f"{what} while loading the model"
        else:
            message = f"{what}; the pool is stopped: create a new EmbedderPool"
        error = WorkerDiedError(message, device=worker.device, pid=worker.pid, exitcode=code)
        self._broken = error
        self._closed = True
        self._resources.graceful = False
        self._finalizer()
        raise error

    def _wait_ready(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(worker.info is None for worker in self._workers):
            if deadline is not None and time.monotonic() > deadline:
                slow = [w.describe() for w in self._workers if w.info is None]
                raise TimeoutError(f"tembed workers did not load the model within {timeout} s: {', '.join(slow)}")
            messages = self._wait_messages()
            for message, worker in messages:
                if message[0] == "hello":
                    worker.said_hello = True
                elif message[0] == "ready":
                    worker.info = message[1]
                elif message[0] == "start-error":
                    raise _unpack_exception(message[1], worker, while_="loading the model")

    # ----------------------------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Stop the workers and release their memory. Idempotent; the pool cannot encode afterwards."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> EmbedderPool:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------ shutdown
def _shutdown(resources: _Resources) -> None:
    """Stop every worker and close every channel; never raises, never waits long, prints nothing."""
    workers = resources.workers
    with contextlib.suppress(Exception):
        if resources.stop_event is not None:
            resources.stop_event.set()
    if resources.graceful:
        for worker in workers:
            with contextlib.suppress(Exception):
                if worker.process.is_alive():
                    worker.tasks.put_nowait(None)
        deadline = time.monotonic() + resources.grace_seconds
        while time.monotonic() < deadline:
            alive = [w for w in workers if _started(w) and w.process.exitcode is None]
            if not alive:
                break
            # Drain results so that a worker blocked on sending one can see the stop request.
            objects = [w.results for w in alive if not w.results.closed] + [w.process.sentinel for w in alive]
            with contextlib.suppress(Exception):
                for obj in multiprocessing.connection.wait(objects, timeout=0.2):
                    if isinstance(obj, multiprocessing.connection.Connection):
                        obj.recv_bytes()
    for worker in workers:
        with contextlib.suppress(Exception):
            if _started(worker) and worker.process.exitcode is None:
                worker.process.terminate()
    for worker in workers:
        with contextlib.suppress(Exception):
            if _started(worker):
                worker.process.join(timeout=2.0)
                if worker.process.exitcode is None:
                    worker.process.kill()
                    worker.process.join(timeout=2.0)
    for worker in workers:
        with contextlib.suppress(Exception):
            worker.tasks.cancel_join_thread()  # never block exit on a feeder thread writing to a dead reader
            worker.tasks.close()
        with contextlib.suppress(Exception):
            worker.results.close()
        with contextlib.suppress(Exception):
            if _started(worker) and worker.process.exitcode is not None:
                worker.process.close()


def _unlink_semaphore_names(objects: list[Any]) -> None:
    """Remove the names of the POSIX semaphores inside multiprocessing objects whose processes all hold them open.

    With ``spawn`` / ``forkserver``, each multiprocessing lock, semaphore, queue and event is a *named* semaphore
    that the parent registers with multiprocessing's resource tracker and unlinks when the object is collected.
    A parent killed by SIGKILL never unlinks them; the tracker then does, printing "resource_tracker: There appear
    to be N leaked semaphore objects to clean up at shutdown". Once every worker has opened them (they are passed
    only at process start), the names are not needed: unlinking them here leaves the semaphores working in every
    process, and nothing for the tracker to report. A semaphore whose cleanup cannot be found is left as it was.
    """
    import multiprocessing.synchronize as synchronize
    import multiprocessing.util as mp_util
    from multiprocessing import resource_tracker

    semlocks: list[Any] = []
    stack, seen = list(objects), set()
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, synchronize.SemLock):
            semlocks.append(obj)
        elif type(obj).__module__.startswith("multiprocessing.") and hasattr(obj, "__dict__"):
            stack.extend(v for v in vars(obj).values() if type(v).__module__.startswith("multiprocessing."))
    names = {getattr(lock._semlock, "name", None) for lock in semlocks} - {None}
    if not names:
        return
    for finalizer in list(mp_util._finalizer_registry.values()):
        args = getattr(finalizer, "_args", None)
        if getattr(finalizer, "_callback", None) is not synchronize.SemLock._cleanup:
            continue
        if not args or args[0] not in names:
            continue
        finalizer.cancel()
        with contextlib.suppress(OSError):
            synchronize.sem_unlink(args[0])
        with contextlib.suppress(Exception):
            resource_tracker.unregister(args[0], "semaphore")


def _started(worker: _Worker) -> bool:
    try:
        return worker.process.pid is not None
    except ValueError:  # process object already closed
        return False


# ------------------------------------------------------------------------------------------------ worker side
def _worker_main(
    model: str,
    device: str,
    threads: int | None,
    embedder_kwargs: dict[str, Any],
    tasks: Any,
    results: Any,
    stop_event: Any,
) -> None:
    """The worker process: load the model, then answer tasks until told to stop or the parent disappears."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; no tracebacks from here
    parent = os.getppid()

    def send(message: tuple) -> None:
        results.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    try:
        send(("hello", os.getpid()))
        # tqdm otherwise creates a multiprocessing lock here, registered with the resource tracker the whole
        # pool shares; a worker killed by a signal would then leave a "leaked semaphore" warning at exit.
        import tqdm.std

        tqdm.std.tqdm.set_lock(threading.RLock())
        if threads is not None:
            torch.set_num_threads(threads)
            with contextlib.suppress(RuntimeError):
                torch.set_num_interop_threads(1)
            if threads == 1:
                os.environ["TOKENIZERS_PARALLELISM"] = "false"
            else:
                os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
        from tembed.embedder import Embedder

        embedder = Embedder(model, device=device, **embedder_kwargs)
    except Exception as error:
        with contextlib.suppress(Exception):
            send(("start-error", _pack_exception(error)))
        return
    try:
        send(("ready", {"pid": os.getpid(), "device": device, **embedder.settings()}))
        while not stop_event.is_set():
            try:
                payload = tasks.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if os.getppid() != parent:
                    return  # the parent is gone
                continue
            if payload is None or stop_event.is_set():
                return
            call_id, chunk_id, method, items, kwargs = pickle.loads(payload)
            try:
                if method.startswith("_"):
                    raise AttributeError(f"{type(embedder).__name__} has no public method {method!r}")
                output = getattr(embedder, method)(items, **kwargs)
                message = pickle.dumps(("ok", call_id, chunk_id, output), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as error:
                message = pickle.dumps(("error", call_id, chunk_id, _pack_exception(error)))
            results.send_bytes(message)
    except (BrokenPipeError, EOFError, ConnectionResetError):
        return  # the parent closed its end or died
    finally:
        with contextlib.suppress(Exception):
            embedder.close()


def _pack_exception(error: BaseException) -> tuple[bytes | None, str, str, str]:
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    try:
        blob: bytes | None = pickle.dumps(error, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(blob)  # some exceptions pickle but do not unpickle
    except Exception:
        blob = None
    kind = type(error)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return blob, name, str(error), text


def _unpack_exception(packed: tuple, worker: _Worker, while_: str = "") -> BaseException:
    blob, name, message, text = packed
    error: BaseException | None = None
    if blob is not None:
        try:
            error = pickle.loads(blob)
        except Exception:
            error = None
    if not isinstance(error, BaseException):
        error = RemoteWorkerError(f"{name}: {message}")
    error.__cause__ = _RemoteTraceback(f'\n"""\n{text}"""')
    if hasattr(error, "add_note"):
        error.add_note(f"raised in tembed {worker.describe()}" + (f" while {while_}" if while_ else ""))
    return error


# ------------------------------------------------------------------------------------------------ helpers
def _refuse_inside_bootstrap() -> None:
    process = multiprocessing.current_process()
    if getattr(process, "_inheriting", False):
        raise RuntimeError(
            "an EmbedderPool is being created while a worker process re-imports the main script. " + _GUARD_HINT
        )
    if process.daemon:
        raise RuntimeError(
            f"an EmbedderPool cannot be created in daemonic process {process.name!r} (daemonic processes may not "
            "have children); create it in the main process"
        )


def _check_embedder_kwargs(model: Any, kwargs: dict[str, Any]) -> None:
    """Unknown keyword arguments raise here, in the caller, not in every worker."""
    import inspect

    from tembed.embedder import Embedder

    try:
        inspect.signature(Embedder).bind(model, **kwargs)
    except TypeError as error:
        raise TypeError(f"EmbedderPool: {error} (keyword arguments are passed to each worker's Embedder)") from None


def _check_model_resolves(model: Any) -> None:
    """Resolve (and, when online, download) the model once in the parent, so N workers do not race for it."""
    from tembed.models.resolve import resolve_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the workers warn about the model themselves
        resolve_model(model)


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the out-of-memory killer sends SIGKILL)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


def _length_key(item: Any) -> int:
    if isinstance(item, str):
        return len(item)
    if isinstance(item, (tuple, list)):
        return sum(len(part) for part in item if isinstance(part, str))
    return 0


def _plan_chunks(items: list[Any], chunk_size: int, workers: int) -> list[np.ndarray]:
    """Positions of each chunk: items sorted by length (longest first), cut into runs of similar length."""
    n = len(items)
    if n == 0:
        return [np.zeros(0, dtype=np.int64)]  # an empty call still goes to a worker, for the output's shape
    size = min(chunk_size, max(MIN_CHUNK_SIZE, math.ceil(n / (CHUNKS_PER_WORKER_SMALL_INPUT * workers))))
    lengths = np.fromiter((_length_key(item) for item in items), dtype=np.int64, count=n)
    order = np.argsort(-lengths, kind="stable")
    return [order[i : i + size] for i in range(0, n, size)]


def _read_blocks(items: Iterator[Any], size: int, *, check_str: bool) -> Iterator[list[Any]]:
    offset = 0
    while True:
        block = list(itertools.islice(items, size))
        if not block:
            return
        if check_str:
            for index, item in enumerate(block):
                if not isinstance(item, str):
                    raise TypeError(f"texts[{offset + index}] must be a str, got {type(item).__name__}: {item!r:.80}")
        offset += len(block)
        yield block


def _merge(values: list[Any], positions: list[np.ndarray], n: int) -> Any:
    """Merge chunk outputs into one output of ``n`` items in input order (see :meth:`EmbedderPool.map`)."""
    if len(values) == 1 and len(positions[0]) == n and np.array_equal(positions[0], np.arange(n)):
        return values[0]
    if any(value is None for value in values):
        return None
    first = values[0]
    if isinstance(first, np.ndarray):
        out = np.empty((n, *first.shape[1:]), dtype=first.dtype)
        for pos, value in zip(positions, values, strict=True):
            out[pos] = value
        return out
    if isinstance(first, torch.Tensor):
        out_t = torch.empty((n, *first.shape[1:]), dtype=first.dtype)
        for pos, value in zip(positions, values, strict=True):
            out_t[torch.from_numpy(pos)] = value.cpu()
        return out_t
    if isinstance(first, list):
        out_l: list[Any] = [None] * n
        for pos, value in zip(positions, values, strict=True):
            for p, item in zip(pos.tolist(), value, strict=True):
                out_l[p] = item
        return out_l
    if isinstance(first, dict):
        return {key: _merge([value[key] for value in values], positions, n) for key in first}
    if isinstance(first, tuple):
        merged = [_merge([value[i] for value in values], positions, n) for i in range(len(first))]
        return type(first)(*merged) if hasattr(first, "_fields") else tuple(merged)
    concatenate: Callable[[list[Any]], Any] | None = getattr(type(first), "concatenate", None)
    if concatenate is not None:
        joined = concatenate(values)
        inverse = np.argsort(np.concatenate(positions), kind="stable")
        return joined.take(inverse) if hasattr(joined, "take") else joined[inverse]
    if dataclasses.is_dataclass(first):
        fields = {
            field.name: _merge([getattr(value, field.name) for value in values], positions, n)
            for field in dataclasses.fields(first)
        }
        return type(first)(**fields)
    raise TypeError(
        f"cannot merge chunk outputs of type {type(first).__name__}: give it a classmethod concatenate(parts) "
        "and a take(indices) method"
    )
