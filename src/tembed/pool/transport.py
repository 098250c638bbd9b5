"""How the parent and its workers talk: typed messages, waiting on pipes and process sentinels, and shutdown.

Each worker has a bounded task queue (parent -> worker) carrying pickled :class:`Task` / :class:`Stop` messages,
and a one-way pipe (worker -> parent) carrying pickled :class:`Hello`, :class:`Ready`, :class:`StartError`,
:class:`ChunkDone` and :class:`ChunkFailed`. The worker holds the only writing end of its pipe, so its death is
an EOF there; the parent also waits on each process sentinel, so a death is seen as soon as the process ends.
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import pickle
import time
from dataclasses import dataclass, field
from typing import Any

from tembed.outputs import EncodeOutputs
from tembed.pool.errors import PackedError
from tembed.settings import EncodeOptions, Settings

POLL_SECONDS = 1.0
"""How long a wait lasts before the waiter looks around (stop requests, a vanished parent)."""
SEND_TIMEOUT_SECONDS = 10.0


# ------------------------------------------------------------------------------------------ parent -> worker
@dataclass(frozen=True)
class Task:
    """Encode ``texts`` with ``options``: one chunk of call ``call_id``."""

    call_id: int
    chunk_id: int
    texts: list[str]
    options: EncodeOptions


@dataclass(frozen=True)
class Stop:
    """Finish: the worker closes its encoder and exits."""


# ------------------------------------------------------------------------------------------ worker -> parent
@dataclass(frozen=True)
class Hello:
    """The worker process runs (sent before it loads anything)."""

    pid: int


@dataclass(frozen=True)
class Ready:
    """The model is loaded; ``settings`` are the worker's effective settings."""

    settings: Settings


@dataclass(frozen=True)
class StartError:
    """Loading the model failed; the worker exits after sending this."""

    error: PackedError


@dataclass(frozen=True)
class ChunkDone:
    """The outputs of a :class:`Task`, in the order of its texts."""

    call_id: int
    chunk_id: int
    outputs: EncodeOutputs


@dataclass(frozen=True)
class ChunkFailed:
    """A :class:`Task` raised."""

    call_id: int
    chunk_id: int
    error: PackedError


WorkerMessage = Hello | Ready | StartError | ChunkDone | ChunkFailed
"""Any message a worker sends."""


def dumps(message: Any) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


# ------------------------------------------------------------------------------------------ the parent's side
class WorkerHandle:
    """The parent's view of one worker process.

    Attributes:
        tasks: a bounded multiprocessing queue of pickled messages (parent -> worker).
        results: the receiving end of a pipe (worker -> parent); EOF once the worker is gone.
        outstanding: chunks sent and not yet answered (by this call or an abandoned one).
        settings: the worker's settings once it is ready, else None.
        pid: the process id, kept after the process object is closed.
    """

    def __init__(self, index: int, device: str, process: Any, tasks: Any, results: Any, writer: Any = None) -> None:
        self.index = index
        self.device = device
        self.process = process
        self.tasks = tasks
        self.results = results
        self.outstanding = 0
        self.said_hello = False
        self.settings: Settings | None = None
        self.pid: int | None = None
        self._writer = writer  # the pipe's writing end, until the process has it

    def start(self) -> None:
        """Start the process; then the worker holds the only writing end of its pipe: its death is an EOF here."""
        try:
            self.process.start()
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        self.pid = self.process.pid

    def describe(self) -> str:
        return f"worker {self.index} ({self.device}, pid {self.pid})"

    def send(self, task: Task) -> None:
        """Queue ``task``. It is pickled here, not in the queue's feeder thread, so that an unpicklable argument
        raises in the caller instead of being dropped while the parent waits for its result."""
        self.tasks.put(dumps(task), timeout=SEND_TIMEOUT_SECONDS)
        self.outstanding += 1

    def started(self) -> bool:
        try:
            return self.process.pid is not None
        except ValueError:  # the process object is already closed
            return False

    def exited(self) -> bool:
        return bool(self.process.exitcode is not None)


@dataclass
class Inbox:
    """What one wait brought: at most one message per worker, and the workers found dead."""

    messages: list[tuple[WorkerMessage, WorkerHandle]] = field(default_factory=list)
    dead: list[WorkerHandle] = field(default_factory=list)


def wait_messages(workers: list[WorkerHandle], timeout: float = POLL_SECONDS) -> Inbox:
    """Wait up to ``timeout`` on every worker's pipe and process sentinel together.

    A worker's last messages are read before its death is reported (a start-up error is sent just before the
    worker exits): a worker is dead when its pipe is at EOF, or when it has exited and sent nothing more.
    """
    objects: list[Any] = []
    for worker in workers:
        objects += [worker.results, worker.process.sentinel]
    ready = set(multiprocessing.connection.wait(objects, timeout=timeout))
    inbox = Inbox()
    for worker in workers:
        got = eof = False
        if worker.results in ready or worker.process.sentinel in ready:
            try:
                if worker.results.poll():  # data, or EOF once the worker is gone
                    inbox.messages.append((pickle.loads(worker.results.recv_bytes()), worker))
                    got = True
            except (EOFError, OSError):
                eof = True
        if eof or (not got and worker.exited()):
            inbox.dead.append(worker)
    return inbox


# ------------------------------------------------------------------------------------------------ shutdown
@dataclass
class Resources:
    """What :func:`shutdown` needs; held by the pool's finalizer instead of the pool, so the pool can be collected.

    Attributes:
        graceful: ask the workers to stop and wait ``grace_seconds`` before terminating them; False after a
            death or a failed start (terminate at once).
    """

    workers: list[WorkerHandle] = field(default_factory=list)
    stop_event: Any = None
    graceful: bool = True
    grace_seconds: float = 5.0


def shutdown(resources: Resources) -> None:
    """Stop every worker and close every channel; never raises, never waits long, prints nothing."""
    workers = resources.workers
    with contextlib.suppress(Exception):
        if resources.stop_event is not None:
            resources.stop_event.set()
    if resources.graceful:
        _ask_to_stop(workers, resources.grace_seconds)
    for worker in workers:
        with contextlib.suppress(Exception):
            if worker.started() and not worker.exited():
                worker.process.terminate()
    for worker in workers:
        with contextlib.suppress(Exception):
            if worker.started():
                worker.process.join(timeout=2.0)
                if not worker.exited():
                    worker.process.kill()
                    worker.process.join(timeout=2.0)
    for worker in workers:
        _close_channels(worker)


def _ask_to_stop(workers: list[WorkerHandle], grace_seconds: float) -> None:
    """Send :class:`Stop` to every live worker and wait up to ``grace_seconds`` for them to exit."""
    for worker in workers:
        with contextlib.suppress(Exception):
            if worker.process.is_alive():
                worker.tasks.put_nowait(dumps(Stop()))
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline:
        alive = [w for w in workers if w.started() and not w.exited()]
        if not alive:
            return
        # Drain results so that a worker blocked on sending one can see the stop request.
        objects = [w.results for w in alive if not w.results.closed] + [w.process.sentinel for w in alive]
        with contextlib.suppress(Exception):
            for obj in multiprocessing.connection.wait(objects, timeout=0.2):
                if isinstance(obj, multiprocessing.connection.Connection):
                    obj.recv_bytes()


def _close_channels(worker: WorkerHandle) -> None:
    with contextlib.suppress(Exception):
        if worker._writer is not None:  # never started
            worker._writer.close()
    with contextlib.suppress(Exception):
        worker.tasks.cancel_join_thread()  # never block exit on a feeder thread writing to a dead reader
        worker.tasks.close()
    with contextlib.suppress(Exception):
        worker.results.close()
    with contextlib.suppress(Exception):
        if worker.started() and worker.exited():
            worker.process.close()


def unlink_semaphore_names(objects: list[Any]) -> None:
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

    names = {getattr(lock._semlock, "name", None) for lock in _semlocks(objects)} - {None}
    if not names:
        return
    registry: dict[Any, Any] = getattr(mp_util, "_finalizer_registry", {})
    cleanup = getattr(synchronize.SemLock, "_cleanup", None)
    sem_unlink = getattr(synchronize, "sem_unlink", None)
    for finalizer in list(registry.values()):
        args = getattr(finalizer, "_args", None)
        if cleanup is None or sem_unlink is None or getattr(finalizer, "_callback", None) is not cleanup:
            continue
        if not args or args[0] not in names:
            continue
        finalizer.cancel()
        with contextlib.suppress(OSError):
            sem_unlink(args[0])
        with contextlib.suppress(Exception):
            resource_tracker.unregister(args[0], "semaphore")


def _semlocks(objects: list[Any]) -> list[Any]:
    """The ``SemLock`` objects in ``objects`` and in their multiprocessing attributes (a queue's locks...)."""
    import multiprocessing.synchronize as synchronize

    found: list[Any] = []
    stack, seen = list(objects), set()
    while stack:
        obj = stack.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, synchronize.SemLock):
            found.append(obj)
        elif type(obj).__module__.startswith("multiprocessing.") and hasattr(obj, "__dict__"):
            stack.extend(v for v in vars(obj).values() if type(v).__module__.startswith("multiprocessing."))
    return found
