"""The output folder of ``tembed encode --engine ray`` as the driver keeps it: its lock, its manifest
(``_tembed/run.json``: the options, the model, the inputs' fingerprints and the shard plan), starting, resuming
or discarding a run, counting what is done, and finishing (the rejects merged, the run marked complete).

The layout is described in :mod:`tembed.ray.shard_job`; why resume uses this manifest and not Ray Data's
checkpoints, in :mod:`tembed.ray.run`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Sequence
from typing import Any

from tembed.io.checkpoint import OutputLock, OutputLocked
from tembed.io.files import write_durably
from tembed.jobs.corpus import JobOptions
from tembed.jobs.errors import EXIT_REFUSED, JobError
from tembed.jobs.plan import CorpusRequest
from tembed.ray.shard_job import OutputFolder
from tembed.ray.shards import Shard

__all__ = ["count_done", "finish", "lock_output", "start_or_resume"]


def lock_output(folder: OutputFolder, held: contextlib.ExitStack) -> None:
    lock = OutputLock(folder.path.rstrip(os.sep))
    try:
        os.makedirs(os.path.dirname(lock.path) or ".", exist_ok=True)
        lock.acquire()
    except OutputLocked as error:
        raise JobError(str(error), EXIT_REFUSED) from None
    except OSError as error:
        raise JobError(f"cannot write {folder.path}: {error.strerror}") from None
    held.callback(lock.release)


def start_or_resume(folder: OutputFolder, request: CorpusRequest, manifest: dict[str, Any]) -> None:
    """A fresh folder gets the manifest; an interrupted or finished run is continued (--resume, after checking
    it is the same job), discarded (--restart) or refused."""
    if os.path.exists(folder.path) and not os.path.isdir(folder.path):
        raise JobError(f"{folder.path} is a file: --engine ray writes a folder of Parquet files", EXIT_REFUSED)
    recorded = None if request.restart and not request.resume else _read_manifest(folder)
    if request.restart and os.path.isdir(folder.path) and os.path.isfile(folder.manifest):
        _discard(folder)
    elif recorded is None:
        if os.path.isdir(folder.path) and os.listdir(folder.path):
            raise JobError(f"{folder.path} exists and is not a tembed output folder: choose a new one", EXIT_REFUSED)
    elif request.resume:
        _check_same_job(folder, recorded, manifest)
        shutil.rmtree(folder.temporary, ignore_errors=True)  # files of actors killed mid-shard
        return
    else:
        state = "a finished" if recorded.get("complete") else "an interrupted"
        raise JobError(
            f"{folder.path} holds {state} run of tembed encode --engine ray: pass --resume to continue it (only "
            f"what is missing is encoded) or --restart to discard it",
            EXIT_REFUSED,
        )
    os.makedirs(folder.state, exist_ok=True)
    write_durably(folder.manifest, json.dumps(manifest, indent=1).encode())


def _read_manifest(folder: OutputFolder) -> dict[str, Any] | None:
    loaded: Any
    try:
        with open(folder.manifest, "rb") as handle:
            loaded = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        loaded = None
        problem = str(error)
    else:
        problem = "not a tembed run manifest"
    if isinstance(loaded, dict) and isinstance(loaded.get("options"), dict):
        return loaded
    raise JobError(f"{folder.manifest}: unreadable ({problem}); pass --restart to start over", EXIT_REFUSED)


def _check_same_job(folder: OutputFolder, recorded: dict[str, Any], manifest: dict[str, Any]) -> None:
    if recorded.get("model") != manifest["model"]:
        before = recorded["model"] if isinstance(recorded.get("model"), dict) else {}
        changed = [
            f"{key} {before.get(key)!r} -> {value!r}"
            for key, value in manifest["model"].items()
            if before.get(key) != value
        ]
        raise JobError(
            f"cannot resume: the model differs from the interrupted run ({'; '.join(changed)}); rerun with the same "
            f"model, backend and device, or with --restart",
            EXIT_REFUSED,
        )
    for key in ("version", "shard_lines", "shards"):
        if recorded.get(key) != manifest[key]:
            raise JobError(f"{folder.path}: the interrupted run has another {key}; pass --restart", EXIT_REFUSED)
    for name, value in manifest["options"].items():
        if recorded["options"].get(name) != value:
            was = recorded["options"].get(name)
            raise JobError(
                f"{folder.path}: the interrupted run used {name}={was!r}, this one {value!r}; rerun with the same "
                f"options, or pass --restart",
                EXIT_REFUSED,
            )
    before = {entry["path"]: entry for entry in recorded.get("inputs", [])}
    for entry in manifest["inputs"]:
        if before.get(entry["path"]) != entry:
            raise JobError(
                f"{entry['path']} changed since the interrupted run (or was not part of it); pass --restart",
                EXIT_REFUSED,
            )
    if len(before) != len(manifest["inputs"]):
        raise JobError(f"{folder.path}: the interrupted run read other input files; pass --restart", EXIT_REFUSED)


def _discard(folder: OutputFolder) -> None:
    for name in os.listdir(folder.path):
        if name.startswith("part-") and name.endswith(".parquet"):
            os.remove(os.path.join(folder.path, name))
    shutil.rmtree(folder.state, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(folder.rejects)


def count_done(folder: OutputFolder, done: set[int]) -> tuple[int, int]:
    """Records written and rejected by the shards already done (from Parquet footers and rejects files)."""
    import pyarrow.parquet as pq

    rows = sum(pq.ParquetFile(folder.part(index)).metadata.num_rows for index in done)
    return rows, sum(_count_lines(folder.shard_rejects(index)) for index in done)


def _count_lines(path: str) -> int:
    try:
        with open(path, "rb") as handle:
            return sum(1 for _ in handle)
    except FileNotFoundError:
        return 0


def finish(
    folder: OutputFolder, shards: Sequence[Shard], manifest: dict[str, Any], job_options: JobOptions, result: Any
) -> None:
    """Check every shard is done, merge the rejects (in input order) beside the folder, mark the run complete."""
    missing = [s.index for s in shards if not os.path.exists(folder.part(s.index))]
    if missing:
        raise JobError(f"{len(missing)} shards have no part file after the run (first: {missing[0]}); rerun --resume")
    if job_options.skip_invalid or result.rejected:
        chunks = []
        for shard in shards:
            with contextlib.suppress(FileNotFoundError), open(folder.shard_rejects(shard.index), "rb") as handle:
                chunks.append(handle.read())
        write_durably(folder.rejects, b"".join(chunks))
    shutil.rmtree(folder.temporary, ignore_errors=True)
    write_durably(folder.manifest, json.dumps({**manifest, "complete": True}, indent=1).encode())
