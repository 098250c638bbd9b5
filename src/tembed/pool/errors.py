"""The pool's exceptions, and how a worker's exception crosses the process boundary.

A worker packs an exception it raised into a :class:`PackedError` (the pickled exception when it survives a
pickle round trip, and always its type name, message and traceback text); the parent unpacks it into the same
exception, or a :class:`RemoteWorkerError` naming the type, with the worker's traceback as its ``__cause__`` and
a note naming the worker.
"""

from __future__ import annotations

import pickle
import signal
import traceback
from dataclasses import dataclass
from typing import Any

GUARD_HINT = (
    "Worker processes are started with 'spawn', which re-imports your main script; a script that creates an "
    'EmbedderPool (or an Embedder with a list of devices) must do it under `if __name__ == "__main__":`.'
)


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

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_worker_died, (str(self), self.device, self.pid, self.exitcode))


def _rebuild_worker_died(message: str, device: str, pid: int | None, exitcode: int | None) -> WorkerDiedError:
    return WorkerDiedError(message, device=device, pid=pid, exitcode=exitcode)


class PoolClosedError(RuntimeError):
    """The pool was closed, or is unusable because a worker died; create a new pool."""


class RemoteWorkerError(RuntimeError):
    """A worker raised an exception that could not be sent back as itself; the message names its type."""


class RemoteTraceback(Exception):
    """Carries the worker's traceback text as the ``__cause__`` of a re-raised exception."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class PackedError:
    """An exception as a worker sends it.

    Attributes:
        blob: the pickled exception, or None when it does not survive a pickle round trip.
        name: its type, qualified by its module unless a builtin (``"ValueError"``, ``"mod.OddError"``).
        message: ``str(exception)``.
        traceback: the formatted traceback, as the worker saw it.
    """

    blob: bytes | None
    name: str
    message: str
    traceback: str


def pack_exception(error: BaseException) -> PackedError:
    """``error`` ready to be sent to the parent (never raises)."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    blob: bytes | None
    try:
        blob = pickle.dumps(error, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(blob)  # some exceptions pickle but do not unpickle
    except Exception:
        blob = None
    kind = type(error)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return PackedError(blob, name, str(error), text)


def unpack_exception(packed: PackedError, where: str, while_: str = "") -> BaseException:
    """The exception to raise in the caller for ``packed``.

    Args:
        packed: what the worker sent.
        where: the worker, as a note names it (``"worker 0 (cpu, pid 123)"``).
        while_: what the worker was doing, for the note (``"loading the model"``); empty: encoding.
    """
    error: BaseException | None = None
    if packed.blob is not None:
        try:
            error = pickle.loads(packed.blob)
        except Exception:
            error = None
    if not isinstance(error, BaseException):
        error = RemoteWorkerError(f"{packed.name}: {packed.message}")
    error.__cause__ = RemoteTraceback(f'\n"""\n{packed.traceback}"""')
    if hasattr(error, "add_note"):  # Python 3.11+
        error.add_note(f"raised in tembed {where}" + (f" while {while_}" if while_ else ""))
    return error


def describe_exit(code: int | None) -> str:
    """How a process ended, for a message: ``"was killed by SIGKILL (...)"``, ``"exited with code 1"``."""
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


def worker_died(
    where: str, device: str, pid: int | None, code: int | None, *, hello: bool, ready: bool
) -> WorkerDiedError:
    """The error for a worker that ended unasked, by how far it got: not started (``hello`` False: most often a
    script without a ``__main__`` guard), loading the model (``ready`` False), or running."""
    what = f"tembed {where} {describe_exit(code)}"
    if not ready and not hello:
        message = f"{what} before it could start. {GUARD_HINT} (The worker's own error, above, says more.)"
    elif not ready:
        message = f"{what} while loading the model"
    else:
        message = f"{what}; the pool is stopped: create a new EmbedderPool"
    return WorkerDiedError(message, device=device, pid=pid, exitcode=code)
