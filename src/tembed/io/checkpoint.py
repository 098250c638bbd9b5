"""The state of an unfinished ``tembed encode`` run: ``OUTPUT.partial/`` with numbered parts and a manifest.

Layout::

    OUTPUT.partial/
        manifest.json          # input fingerprint, options, reader cursor, the parts done (replaced atomically)
        part-000000.parquet    # one encoded chunk each (a single row group), fsynced before the manifest names it
        rejects-000000.jsonl   # the records of that chunk that were skipped (``--skip-invalid``), if any

A part or rejects file the manifest does not name (a run killed between writing it and updating the manifest) is
deleted on resume, so a resumed run continues from exactly the last recorded chunk: no duplicate, no gap.
Nothing is written at OUTPUT itself until the merge, which writes a temporary file inside the partial folder and
moves it into place with ``os.replace``.

The manifest also records what the vectors depend on, so that ``--resume`` never mixes two models' vectors in one
file: the options (model, kind, fields, formats, outputs, max length, precision; checked before the model loads)
and, under ``model``, the backend actually used, the device type and a fingerprint of the model's files (checked
right after it loads, before anything is encoded).

While a run works on OUTPUT it holds :class:`OutputLock` (``OUTPUT.lock``), so that a second run on the same
output is refused instead of deleting or interleaving the first one's parts.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from tembed.io.files import write_durably
from tembed.io.readers import Cursor, start_cursor

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; the lock file only records the pid
    fcntl = None  # type: ignore[assignment]

# flock's errors on file systems that have no advisory locks.
_NO_LOCKING = frozenset(
    code for code in (errno.ENOLCK, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", None), errno.ENOSYS) if code
)
MANIFEST_VERSION = 2  # 2: the ``model`` record (backend, device type, model files)
_MODEL_FILE_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".onnx",
    ".onnx_data",
    ".xml",
    ".json",
    ".model",
    ".txt",
    ".py",
)
_FINGERPRINT_BYTES = 1 << 20


class ResumeError(Exception):
    """A partial run cannot be resumed (different input or options), or is in the way of a fresh run."""


@dataclass
class Manifest:
    """What a partial run has done so far (saved as ``manifest.json``, every field a JSON value).

    Attributes:
        input: the input's :func:`~tembed.io.formats.fingerprint` (``{"path": "-"}`` for stdin).
        options: the run's options that the vectors depend on (model, kind, fields, formats, outputs, ...).
        cursor: the reader's :data:`~tembed.io.readers.Cursor` after the last chunk recorded.
        parts: the part files written, in order (names inside the partial folder).
        reject_files: the rejects files written, in order (names inside the partial folder).
        rows / rejected / tokens: records written, records rejected, tokens encoded, so far.
        seconds: encoding time so far, across resumed runs.
        input_done: whether the whole input has been read (only the merge is left).
        model: what the loaded model resolved to: ``{"backend", "device", "files"}`` (``files``: see
            :func:`model_fingerprint`); empty until the model has loaded.
        version: :data:`MANIFEST_VERSION` of the writer.
    """

    input: dict[str, Any]
    options: dict[str, Any]
    cursor: Cursor = field(default_factory=start_cursor)
    parts: list[str] = field(default_factory=list)
    reject_files: list[str] = field(default_factory=list)
    rows: int = 0
    rejected: int = 0
    tokens: int = 0
    seconds: float = 0.0
    input_done: bool = False
    model: dict[str, str] = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    def to_json(self) -> bytes:
        """Returns the manifest as indented UTF-8 JSON, keys sorted: the bytes of ``manifest.json``."""
        return json.dumps(self.__dict__, indent=1, sort_keys=True).encode()


class PartialRun:
    """The ``OUTPUT.partial`` folder of one output path.

    Attributes:
        output: the output path.
        directory: ``OUTPUT.partial``.
        manifest_path: ``OUTPUT.partial/manifest.json``.
    """

    def __init__(self, output: str) -> None:
        self.output = output
        self.directory = output + ".partial"
        self.manifest_path = os.path.join(self.directory, "manifest.json")

    def exists(self) -> bool:
        """Returns whether the partial folder exists (with or without a manifest)."""
        return os.path.isdir(self.directory)

    def load(self) -> Manifest | None:
        """Returns the manifest on disk, or None when there is none yet (a run killed before saving its first one).

        Raises :class:`ResumeError` when it is unreadable or was written by another manifest version.
        """
        try:
            with open(self.manifest_path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise ResumeError(f"{self.manifest_path} is unreadable ({error}); remove {self.directory}") from None
        if data.get("version") != MANIFEST_VERSION:
            raise ResumeError(
                f"{self.manifest_path} was written by another tembed version and cannot be continued; "
                f"rerun with --restart to start over"
            )
        return Manifest(**data)

    def start(self, manifest: Manifest) -> None:
        """Begin a fresh run: an empty folder holding only the manifest. Returns None."""
        if self.exists():
            shutil.rmtree(self.directory)
        os.makedirs(self.directory)
        self.save(manifest)

    def resume(self, input_fingerprint: dict[str, Any], options: dict[str, Any]) -> Manifest | None:
        """The manifest of the run to continue, after checking it matches; None when there is nothing to resume."""
        if not self.exists():
            return None
        manifest = self.load()
        if manifest is None:  # killed before its first manifest: nothing was done
            return None
        if manifest.input != input_fingerprint:
            changed = [key for key in input_fingerprint if manifest.input.get(key) != input_fingerprint[key]]
            raise ResumeError(
                f"cannot resume: the input changed since the interrupted run ({', '.join(changed)} differ: "
                f"{manifest.input.get('path')}); rerun with --restart to start over"
            )
        if manifest.options != options:
            changed = [
                f"{key} {manifest.options.get(key)!r} -> {options.get(key)!r}"
                for key in sorted(set(options) | set(manifest.options))
                if manifest.options.get(key) != options.get(key)
            ]
            raise ResumeError(
                f"cannot resume: options differ from the interrupted run ({'; '.join(changed)}); "
                f"rerun with the same options, or with --restart to start over"
            )
        self.drop_unrecorded(manifest)
        return manifest

    def check_model(self, manifest: Manifest, model: dict[str, str], model_path: str) -> None:
        """Refuse to continue with another backend, device type or model files than the interrupted run's: returns
        None when ``model`` equals ``manifest.model``, raises :class:`ResumeError` otherwise.

        ``model`` is what the loaded model resolved to (see :func:`model_fingerprint`); a difference is named.
        """
        if manifest.model == model:
            return
        changed = []
        for key in sorted(set(model) | set(manifest.model)):
            before, after = manifest.model.get(key), model.get(key)
            if key == "files" and before != after:
                changed.append(f"the model's files changed ({model_path})")
            elif before != after:
                changed.append(f"{key} {before!r} -> {after!r}")
        raise ResumeError(
            f"cannot resume: the model differs from the interrupted run ({'; '.join(changed)}); "
            f"rerun with the same model, backend and device, or with --restart to start over"
        )

    def drop_unrecorded(self, manifest: Manifest) -> None:
        """Delete what the manifest does not name: a part written after its last update, temporary files.
        Returns None."""
        known = set(manifest.parts) | set(manifest.reject_files) | {"manifest.json"}
        for name in os.listdir(self.directory):
            if name not in known:  # written after the last manifest update: redone from the cursor
                path = os.path.join(self.directory, name)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)

    def path(self, name: str) -> str:
        """Returns the path of the file ``name`` inside the partial folder."""
        return os.path.join(self.directory, name)

    def save(self, manifest: Manifest) -> None:
        """Replace ``manifest.json`` atomically and durably (see :func:`~tembed.io.files.atomic_write`)."""
        write_durably(self.manifest_path, manifest.to_json())

    def remove(self) -> None:
        """Delete the partial folder and everything in it, if it exists."""
        shutil.rmtree(self.directory, ignore_errors=True)


def model_fingerprint(model_path: str) -> str:
    """Returns a key (24 hex characters) for a model folder's files: the names, sizes, mtimes and first MiB of
    every weight, config and tokenizer file, subfolders included (``1_Pooling/config.json`` changes the vectors too).

    (:func:`tembed.backends.export.fingerprint` is a cache key for exports: it hashes the top folder's file
    contents and mixes in the torch and transformers versions, so it is not reused here.)
    """
    digest = hashlib.sha256()
    for root, folders, names in os.walk(model_path):
        # Hidden folders and unfinished outputs (OUTPUT.partial, when the output is written inside the model's
        # folder) are not the model.
        folders[:] = sorted(name for name in folders if not name.startswith(".") and not name.endswith(".partial"))
        for name in sorted(names):
            if name.startswith(".") or not name.endswith(_MODEL_FILE_SUFFIXES):
                continue
            path = os.path.join(root, name)
            try:
                stat = os.stat(path)
                with open(path, "rb") as handle:
                    head = handle.read(_FINGERPRINT_BYTES)
            except OSError:  # a dangling link or an unreadable file: its name still counts
                stat, head = None, b""
            relative = os.path.relpath(path, model_path).replace(os.sep, "/")
            digest.update(f"{relative}:{stat and stat.st_size}:{stat and stat.st_mtime_ns}\n".encode())
            digest.update(hashlib.sha256(head).digest())
    return digest.hexdigest()[:24]


class OutputLocked(Exception):
    """Another run holds the lock of this output."""

    def __init__(self, output: str, lock_path: str, pid: int | None) -> None:
        holder = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(
            f"{output} is being written by another tembed encode ({holder}, holding {lock_path}); "
            f"wait for it to finish or stop it, then rerun"
        )
        self.pid = pid


class OutputLock:
    """An exclusive lock on one output for a whole run: ``OUTPUT.lock``, held with ``flock`` and holding the pid.

    The kernel drops the lock when its process ends, however it ends (SIGKILL included), so a lock file left by a
    dead run does not block the next one: only a live holder does.
    """

    def __init__(self, output: str) -> None:
        self.output = output
        self.path = output + ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (returns None), or raise :class:`OutputLocked` (naming the holder's pid) at once: never
        waits.

        OSError: the lock file cannot be created (a read-only or full file system, no permission).
        """
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise OutputLocked(self.output, self.path, pid) from None
            except OSError as error:
                if error.errno not in _NO_LOCKING:
                    os.close(fd)
                    raise
                # A file system without advisory locks (NFS without lockd): run unlocked, as before locks existed.
                warnings.warn(
                    f"{self.path}: this file system does not support locks ({error.strerror}); another tembed "
                    f"encode writing {self.output} at the same time would not be stopped",
                    RuntimeWarning,
                    stacklevel=2,
                )
            except BaseException:
                os.close(fd)
                raise
            # The previous holder removes the file as it releases it: if that happened between our open and our
            # flock, we locked a file no one else will ever open again. Lock the one at the path instead.
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and drop the lock (removed first, while still held: see :meth:`acquire`). Returns None;
        a no-op when the lock is not held."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.remove(self.path)
        os.close(self._fd)
        self._fd = None


def _read_pid(fd: int) -> int | None:
    """The pid written in a lock file (its holder may not have written it yet: wait a little)."""
    for _ in range(20):
        try:
            text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        except OSError:
            return None
        if text.isdigit():
            return int(text)
        time.sleep(0.05)
    return None
