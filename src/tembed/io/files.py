"""Durable file writes: the one place that spells "write a temporary file, fsync it, rename it into place".

A file written with :func:`atomic_write` is either absent (or the previous version) or complete at ``path``, even
if the process is killed or the machine loses power mid-write:

1. the bytes go to ``path + ".tmp"`` (in the same folder, so that the rename below stays on one file system);
2. the temporary file is flushed and ``fsync``-ed, so its contents are on disk before it gets its final name;
3. ``os.replace`` renames it over ``path`` (atomic on POSIX and Windows);
4. the folder is ``fsync``-ed (:func:`fsync_directory`), so that the rename itself survives a crash.

When writing fails, the exception propagates and the temporary file is left where it is (a run's partial folder
deletes what its manifest does not name when it resumes). For a file that is written now but renamed later,
together with others, use :func:`synced_file` for steps 1-2, then ``os.replace`` and :func:`fsync_directory`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import BinaryIO

__all__ = ["TEMPORARY_SUFFIX", "atomic_write", "fsync_directory", "synced_file", "write_durably"]

TEMPORARY_SUFFIX = ".tmp"
"""Appended to a path for the temporary file :func:`atomic_write` writes first."""


def fsync_directory(path: str) -> None:
    """Make the renames and new files inside the folder ``path`` durable. Returns None; a no-op where a folder
    cannot be opened or fsync-ed (Windows, some network file systems)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def synced_file(path: str) -> Iterator[BinaryIO]:
    """Open ``path`` for writing bytes (truncating it) and yield the handle; when the block ends without an
    exception, flush and ``fsync`` it before closing, so its contents are on disk once the ``with`` is left.

    On an exception the file is closed as it is (not synced) and the exception propagates.
    """
    with open(path, "wb") as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write(path: str, write: Callable[[BinaryIO], object]) -> None:
    """Create or replace ``path`` atomically and durably with what ``write(handle)`` writes to a binary handle.

    The steps are listed in the module docstring: ``path + ".tmp"``, fsync, ``os.replace``, fsync of the folder.
    Returns None; the return value of ``write`` is ignored. Errors (OSError from a full disk, anything ``write``
    raises) propagate, with ``path`` untouched and the temporary file left behind.
    """
    temporary = path + TEMPORARY_SUFFIX
    with synced_file(temporary) as handle:
        write(handle)
    os.replace(temporary, path)
    fsync_directory(os.path.dirname(os.path.abspath(path)))


def write_durably(path: str, data: bytes) -> None:
    """Write the bytes ``data`` to ``path`` with :func:`atomic_write`. Returns None."""
    atomic_write(path, lambda handle: handle.write(data))
