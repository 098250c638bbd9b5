"""Before a corpus job runs: the request checked, the output locked, the partial run found and checked.

Everything here happens before the model loads, except :meth:`Prepared.checkpoint`, which checks what the
loaded model resolved to (backend, device types, model files) against an interrupted run's record.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tembed.io.checkpoint import Manifest, OutputLock, OutputLocked, PartialRun, ResumeError, model_fingerprint
from tembed.io.readers import STDIN, Cursor, InputError, Reader, detect_format, fingerprint
from tembed.io.writers import ids_path, output_format, rejects_path
from tembed.jobs.errors import EXIT_FAILED, EXIT_REFUSED, JobError, cannot_write
from tembed.settings import EmbedderConfig, EncodeOptions, Settings


@dataclass(frozen=True)
class CorpusRequest:
    """What to encode and where: the input and its fields, the output, the outputs, resume / restart.

    Attributes:
        input_path: the corpus file, or ``"-"`` for stdin.
        output: a ``.parquet`` or ``.npy`` path.
        input_format: ``jsonl``, ``csv``, ``tsv``, ``parquet`` or ``txt``; None: from the suffix (stdin: jsonl).
        text_field, id_field, title_field: the fields / columns; ``""`` turns id or title off.
        resume: continue an interrupted run; ``restart``: discard it first.
    """

    input_path: str
    output: str
    input_format: str | None = None
    text_field: str = "text"
    id_field: str = "id"
    title_field: str = "title"
    resume: bool = False
    restart: bool = False

    @property
    def stdin(self) -> bool:
        return self.input_path == STDIN


@dataclass
class Checkpoint:
    """The partial run a job writes to: its folder, its manifest, and whether the job starts it afresh."""

    partial: PartialRun
    manifest: Manifest
    fresh: bool


@dataclass
class Prepared:
    """A request checked, its output locked and its interrupted run (if resumed) checked against its options."""

    request: CorpusRequest
    in_format: str
    out_format: str
    partial: PartialRun
    source: dict[str, Any]
    options: dict[str, Any]
    resumed: Manifest | None = field(default=None)

    def reader(self, cursor: Cursor | None) -> Reader:
        request = self.request
        return Reader(
            request.input_path,
            self.in_format,
            text_field=request.text_field,
            id_field=request.id_field or None,
            title_field=request.title_field or None,
            cursor=cursor,
        )

    def checkpoint(self, settings: Settings, devices: Sequence[str] | None = None) -> Checkpoint:
        """The manifest to write to, once the model is loaded: a fresh one recording what the model resolved to,
        or the interrupted run's, after checking that the model is the same (JobError, exit code 2, if not)."""
        loaded = model_record(settings, devices)
        if self.resumed is None:
            manifest = Manifest(input=self.source, options=self.options, model=loaded)
            return Checkpoint(self.partial, manifest, fresh=True)
        try:
            self.partial.check_model(self.resumed, loaded, settings.path)
        except ResumeError as error:
            raise JobError(str(error), EXIT_REFUSED) from None
        return Checkpoint(self.partial, self.resumed, fresh=False)


def model_record(settings: Settings, devices: Sequence[str] | None = None) -> dict[str, Any]:
    """What the vectors depend on beyond the options, known once the model is loaded (recorded for --resume): the
    backend used, the device types (``"cpu"``, ``"cuda"``: not the indexes nor how many, so a run on two GPUs
    resumes on one) and a fingerprint of the model's files.

    The batch size is left out on purpose: batches are sorted by length and padding is masked, so it changes a
    vector by float rounding only (~1e-6), and a run stopped by running out of memory must be able to resume with
    a smaller one. The precision is an option, checked before the model loads.
    """
    names = [name for name in devices or () if name not in ("", "auto")] or settings.device.split(",")
    types = sorted({_device_type(name) for name in names})
    return {"backend": settings.backend, "device": ",".join(types), "files": model_fingerprint(settings.path)}


def _device_type(name: str) -> str:
    name = name.strip()
    return "cuda" if name.isdigit() else name.split(":")[0]


def prepare(
    request: CorpusRequest, config: EmbedderConfig, options: EncodeOptions, held: contextlib.ExitStack
) -> Prepared:
    """Check the request, lock the output (released by ``held``) and find the partial run to continue.

    Raises:
        JobError: exit code 2 for a usage error or a run refused before it starts; 1 for an output that cannot
            be written.
    """
    in_format, out_format = _check_request(request, options)
    # Held until the run ends, before anything else is read or written at OUTPUT: a second run on the same output
    # would otherwise delete the first one's parts (--resume drops unrecorded files) or interleave with them.
    # Creating the lock file is also the first write: a read-only or full output folder is reported here.
    lock = OutputLock(request.output)
    try:
        lock.acquire()
    except OutputLocked as error:
        raise JobError(str(error), EXIT_REFUSED) from None
    except OSError as error:
        raise JobError(cannot_write(request.output, error, lock.path), EXIT_FAILED) from None
    held.callback(lock.release)

    partial = PartialRun(request.output)
    if partial.exists() and not os.access(partial.directory, os.W_OK):
        denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        raise JobError(cannot_write(request.output, denied, partial.directory), EXIT_FAILED)
    source = {"path": STDIN} if request.stdin else fingerprint(request.input_path)
    recorded = recorded_options(request, config, options, in_format, out_format)
    prepared = Prepared(request, in_format, out_format, partial, dict(source), recorded)
    prepared.resumed = _interrupted_run(prepared)
    return prepared


def recorded_options(
    request: CorpusRequest, config: EmbedderConfig, options: EncodeOptions, in_format: str, out_format: str
) -> dict[str, Any]:
    """The options that change the vectors, recorded in the manifest and compared by --resume."""
    return {
        "model": config.model,
        "kind": options.role.value,
        "text_field": request.text_field,
        "id_field": request.id_field,
        "title_field": request.title_field,
        "input_format": in_format,
        "output_format": out_format,
        "outputs": list(options.outputs),
        "max_length": options.max_length,
        "precision": config.precision,
        "trust_remote_code": bool(config.trust_remote_code),
    }


def _interrupted_run(prepared: Prepared) -> Manifest | None:
    """The manifest to continue (--resume), None for a fresh run; JobError when a partial run is in the way."""
    request, partial = prepared.request, prepared.partial
    try:
        if request.resume:
            return partial.resume(prepared.source, prepared.options)
    except ResumeError as error:
        raise JobError(str(error), EXIT_REFUSED) from None
    if partial.exists() and not request.restart:
        if request.stdin:  # --resume is refused for stdin: only --restart helps
            advice = "pass --restart to discard it and start over (a run reading stdin cannot be resumed)"
        else:
            advice = "pass --resume to continue it, or --restart to discard it and start over"
        raise JobError(f"an interrupted run left {partial.directory}: {advice}", EXIT_REFUSED)
    return None


def _check_request(request: CorpusRequest, options: EncodeOptions) -> tuple[str, str]:
    """``(input format, output format)``, or JobError (exit code 2) for a request that cannot run."""
    input_path, output = request.input_path, request.output
    if request.resume and request.restart:
        raise JobError("--resume and --restart contradict each other: pick one", EXIT_REFUSED)
    if not request.stdin and os.path.isdir(input_path):
        raise JobError(f"{input_path}: is a directory, not a file", EXIT_REFUSED)
    try:
        out_format = output_format(output)
        in_format = detect_format(input_path, request.input_format)
    except (ValueError, InputError) as error:
        raise JobError(str(error), EXIT_REFUSED) from None
    if out_format == "npy" and options.outputs != ("dense",):
        wanted = ", ".join(options.outputs)
        raise JobError(f"{output}: .npy holds dense vectors only; write .parquet for {wanted}", EXIT_REFUSED)
    if request.stdin and request.resume:
        raise JobError("--resume needs an input file: a run reading stdin cannot be checked and continued", 2)
    if not request.stdin and not os.path.isfile(input_path):
        raise JobError(f"{input_path}: no such file", EXIT_REFUSED)
    directory = os.path.dirname(os.path.abspath(output))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise JobError(f"{output}: {directory} is not a folder", EXIT_REFUSED)
    if not os.path.isdir(directory):
        raise JobError(f"{output}: the folder {directory} does not exist", EXIT_REFUSED)
    if not request.stdin:
        _refuse_overwriting_the_input(input_path, output, out_format)
    return in_format, out_format


def _refuse_overwriting_the_input(input_path: str, output: str, out_format: str) -> None:
    """Stop before anything is written if the output, its ids / rejects / lock file or partial folder is the input."""
    targets = [("the output", output)]
    if out_format == "npy":
        targets.append((f"the ids file of {output}", ids_path(output)))
    targets.append((f"the rejects file of {output}", rejects_path(output)))
    targets.append((f"the lock file of {output}", output + ".lock"))
    real_input = os.path.realpath(input_path)
    for what, path in targets:
        if os.path.realpath(path) == real_input or (os.path.exists(path) and os.path.samefile(path, input_path)):
            raise JobError(f"{path} is the input file: writing {what} would destroy it; choose another --output", 2)
    partial = os.path.realpath(PartialRun(output).directory)
    if real_input.startswith(partial + os.sep):
        raise JobError(f"the input {input_path} is inside {output}.partial, which the run replaces; move it first", 2)
