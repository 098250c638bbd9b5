"""How a corpus job stops: one line (or two) for the user, an exit code, and what is kept for ``--resume``."""

from __future__ import annotations

import contextlib
import errno
import os

from tembed.io.checkpoint import Manifest, PartialRun, ResumeError
from tembed.io.writers import rejects_path

EXIT_FAILED = 1
"""Bad input, or an output that cannot be written."""
EXIT_REFUSED = 2
"""A usage error, or a run refused before it starts."""
EXIT_INTERRUPTED = 130

WRITE_ERRNOS = frozenset(
    code
    for code in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, getattr(errno, "EDQUOT", None))
    if code is not None
)
"""A write failing with one of these is the output's fault (full, read-only, forbidden), not a bug: one line, no
traceback, and what is kept."""


class JobError(Exception):
    """Ends a job with a message for the user (``error: ...`` on stderr) and an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


class JobInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped the job; the message says what is kept (printed as is, exit code 130)."""


def one_line(error: BaseException) -> str:
    """``Type: first line of the message``."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def error_text(error: BaseException) -> str:
    """``Type: message`` on one line, at most about 500 characters."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= 500 else text[:497] + "..."


def names(filename: object, path: str) -> bool:
    """Whether an error's filename is ``path`` (an unreadable input is not a write failure)."""
    if not isinstance(filename, (str, bytes, os.PathLike)) or path == "-":
        return False
    return os.path.abspath(os.fsdecode(filename)) == os.path.abspath(path)


def cannot_write(output: str, error: OSError, path: str | None = None) -> str:
    reason = error.strerror or one_line(error)
    where = path or (os.fsdecode(error.filename) if isinstance(error.filename, (str, bytes)) else None)
    return f"cannot write {output}" + (f" ({where})" if where and where != output else "") + f": {reason}"


def write_failed(output: str, error: OSError, partial: PartialRun, *, stdin: bool) -> str:
    """The one line for a run stopped by a failed write: the path, the reason, and the records kept."""
    message = cannot_write(output, error)
    try:
        saved = partial.load() if partial.exists() else None  # what the last durable manifest records
    except ResumeError:
        saved = None
    if saved is not None and saved.rows and not stdin:
        with contextlib.suppress(OSError):
            partial.drop_unrecorded(saved)  # the half-written part or merge: room for the rest
        return (
            f"{message}; {saved.rows:,} records are kept in {partial.directory}, rerun with --resume when there is room"
        )
    partial.remove()
    if saved is not None and saved.rows:  # stdin: nothing to resume from
        return f"{message}; a run reading stdin cannot be resumed, so nothing is kept: rerun when there is room"
    return f"{message}; nothing is kept: rerun when there is room"


def kept_anything(manifest: Manifest) -> bool:
    return bool(manifest.parts or manifest.reject_files)


def reads_stdin(manifest: Manifest) -> bool:
    return manifest.input.get("path") == "-"


def remove_if_empty(partial: PartialRun, manifest: Manifest) -> None:
    if not kept_anything(manifest):
        partial.remove()


def bad_record(head: str, partial: PartialRun, manifest: Manifest, output: str) -> JobError:
    """The error stopping a run at a bad record (or a chunk that fails to encode), with the advice that applies;
    the partial folder is removed when it holds nothing."""
    message = f"{head}\n{output} was not written; "
    if kept_anything(manifest) and reads_stdin(manifest):  # stdin: no --resume
        message += (
            "a run reading stdin cannot be resumed: rerun with --restart --skip-invalid to skip bad records, "
            "or fix the input and rerun with --restart"
        )
    elif kept_anything(manifest):
        message += (
            f"the {manifest.rows:,} records before are kept in {partial.directory}: rerun with "
            f"--resume --skip-invalid to skip bad records and continue, or fix the input and rerun with --restart"
        )
    else:
        partial.remove()
        message += f"rerun with --skip-invalid to skip bad records (they are listed in {rejects_path(output)})"
    return JobError(message)


def interrupted(partial: PartialRun, manifest: Manifest) -> JobInterrupted:
    """What an interrupted run says; the partial folder is removed when it holds nothing."""
    if kept_anything(manifest) and reads_stdin(manifest):
        message = (
            f"interrupted: a run reading stdin cannot be resumed; rerun with --restart to start over "
            f"(it discards the {manifest.rows:,} records in {partial.directory}), or remove that folder"
        )
    elif kept_anything(manifest):
        message = (
            f"interrupted: {manifest.rows:,} records are kept in {partial.directory}; rerun with --resume to continue"
        )
    else:
        partial.remove()
        message = "interrupted before the first chunk was written; nothing kept"
    return JobInterrupted(message)
