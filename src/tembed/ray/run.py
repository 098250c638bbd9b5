"""The driver of ``tembed encode INPUT -o FOLDER --engine ray``: plan the shards, check or start the output
folder's manifest, run :class:`~tembed.ray.shard_job.ShardEncoder` actors over the shards that are not done,
then merge the rejects and say what was done.

Resume is tembed's: the manifest (``FOLDER/_tembed/run.json``) records the options, the input files'
fingerprints and the shard plan, and a shard is done exactly when its part file exists (see
:mod:`tembed.ray.shard_job`). Ray Data's own checkpointing (``CheckpointConfig``, beta in 2.60) is not used: it
needs unique ids, an extra actor holding a whole CPU (a hang on a 2-CPU machine), and re-reads the whole input
and every id on resume; the shard manifest needs none of that and cannot duplicate a row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tembed.io.formats import count_items, fingerprint
from tembed.io.readers import InputError
from tembed.jobs.corpus import JobOptions
from tembed.jobs.errors import EXIT_REFUSED, JobError, JobInterrupted, one_line
from tembed.jobs.outcome import Report, progress_bar, report_to_stderr, size_text
from tembed.jobs.plan import CorpusRequest, recorded_options
from tembed.ray.dataset import DEFAULT_STALL_TIMEOUT, check_resources, configure_data, default_actors, ray_session
from tembed.ray.folder import count_done, finish, lock_output, start_or_resume
from tembed.ray.shard_job import OutputFolder, ShardEncoder, ShardSpec
from tembed.ray.shards import DEFAULT_SHARD_LINES, Fields, Shard, input_files, plan_shards
from tembed.settings import EmbedderConfig, EncodeOptions

__all__ = ["RayJobOptions", "RayJobResult", "run_ray_job"]

_MANIFEST_VERSION = 1


@dataclass(frozen=True)
class RayJobOptions:
    """How the Ray engine runs (what does not change the vectors).

    Attributes:
        address: ``"local"`` (a private instance for this run), ``"auto"`` or ``"HOST:PORT"``.
        actors: actors in the pool; None: as many as fit the cluster.
        cpus_per_actor: CPUs per actor, also its threads (default 1).
        gpus_per_actor: GPUs per actor (default 0: CPU actors).
        shard_lines: lines (rows) per shard (default :data:`~tembed.ray.shards.DEFAULT_SHARD_LINES`).
        stall_timeout: seconds without a shard finishing before the run stops with an error.
        device: the actors' device; None: ``cuda`` with GPUs, else ``cpu``.
        num_cpus: CPUs a local instance offers; None: the machine's.
    """

    address: str = "local"
    actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    shard_lines: int = DEFAULT_SHARD_LINES
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    device: str | None = None
    num_cpus: int | None = None


@dataclass
class RayJobResult:
    """What a Ray run did: shards in all and done before it, records written and rejected (in all and by this
    run), tokens by this run, its seconds (``ray_seconds`` starting or joining Ray, ``encode_seconds`` from the
    first actor ready to the last shard), the actors and the nodes they ran on."""

    shards: int
    shards_before: int
    rows: int = 0
    rejected: int = 0
    rows_done: int = 0
    tokens_done: int = 0
    ray_seconds: float = 0.0
    load_seconds: float = 0.0
    encode_seconds: float = 0.0
    seconds: float = 0.0
    actors: int = 0
    nodes: set[str] = field(default_factory=set)


def run_ray_job(
    request: CorpusRequest,
    config: EmbedderConfig,
    options: EncodeOptions,
    job_options: JobOptions,
    ray_options: RayJobOptions,
    report: Report = report_to_stderr,
) -> RayJobResult:
    """Encode ``request.input_path`` (a file, folder or glob) into the folder ``request.output`` on Ray.

    Raises:
        JobError: a refused request (exit 2), a bad record, a failed actor, a stalled run (exit 1); the message
            names the file and line, or the record, and what is kept for ``--resume``.
        JobInterrupted: Ctrl-C / SIGTERM; the shards done are kept for ``--resume``.
    """
    started = time.perf_counter()
    _check_request(request, job_options, ray_options)
    folder = OutputFolder(os.path.abspath(request.output))
    try:
        files = input_files(request.input_path)
        shards = plan_shards(files, request.input_format, ray_options.shard_lines, _fields(request))
    except InputError as error:
        raise JobError(str(error), EXIT_REFUSED) from None
    inside = [path for path in files if os.path.abspath(path).startswith(folder.path.rstrip(os.sep) + os.sep)]
    if inside:
        raise JobError(f"{inside[0]} is inside the output folder {folder.path}: choose another output", EXIT_REFUSED)
    formats = sorted({shard.fmt for shard in shards})
    recorded = recorded_options(request, config, options, ",".join(formats), "parquet")
    manifest: dict[str, Any] = {
        "version": _MANIFEST_VERSION,
        "options": recorded,
        "inputs": [fingerprint(path) for path in files],
        "shard_lines": ray_options.shard_lines,
        "shards": len(shards),
        "model": _model_record(config, _device(ray_options)),
    }
    with contextlib.ExitStack() as held:
        lock_output(folder, held)
        start_or_resume(folder, request, manifest)
        done = {s.index for s in shards if os.path.exists(folder.part(s.index))}
        result = RayJobResult(shards=len(shards), shards_before=len(done))
        result.rows, result.rejected = count_done(folder, done)
        if done and not job_options.quiet:
            report(f"resuming {folder.path}: {len(done)} of {len(shards)} shards done ({result.rows:,} records)")
        todo = [s for s in shards if s.index not in done]
        if todo:
            spec = ShardSpec(folder.path, _fields(request), job_options.skip_invalid, job_options.chunk_size, recorded)
            files_read = tuple(sorted({(s.path, s.fmt) for s in shards}))
            spec = dataclasses.replace(spec, files=files_read, model=manifest["model"])
            _run_shards(todo, config, options, spec, ray_options, job_options, result)
        finish(folder, shards, manifest, job_options, result)
    result.seconds = time.perf_counter() - started
    if not job_options.quiet:
        report(ray_summary(result, folder))
    return result


def _check_request(request: CorpusRequest, job_options: JobOptions, ray_options: RayJobOptions) -> None:
    """Refuse what the Ray engine cannot do, before anything is read or written."""
    refusals = [
        (job_options.unique_ids, "--unique-ids needs one reader of the whole input; --engine ray reads shards"),
        (request.resume and request.restart, "--resume and --restart contradict each other: pass one"),
        (request.output.lower().endswith(".npy"), "--engine ray writes a folder of Parquet files, not a .npy file"),
        (
            bool(ray_options.gpus_per_actor) and ":" in (ray_options.device or ""),
            "--device cuda:N with --engine ray: Ray gives each actor its own GPUs; pass --device cuda",
        ),
    ]
    for refused, message in refusals:
        if refused:
            raise JobError(message, EXIT_REFUSED)


def _device(ray_options: RayJobOptions) -> str:
    return ray_options.device or ("cuda" if ray_options.gpus_per_actor else "cpu")


def _model_record(config: EmbedderConfig, device: str) -> dict[str, Any]:
    """What the model resolves to here (backend, device type, files), checked on every actor and by --resume;
    a model that cannot be found is refused before the output folder is touched."""
    from tembed.jobs.plan import model_record
    from tembed.settings import resolve_settings

    try:
        settings, _ = resolve_settings(config, device)
    except Exception as error:
        raise JobError(f"cannot load {config.model}: {one_line(error)}", EXIT_REFUSED) from None
    return model_record(settings, [device])


def _fields(request: CorpusRequest) -> Fields:
    return Fields(request.text_field, request.id_field or None, request.title_field or None)


def _run_shards(
    todo: Sequence[Shard],
    config: EmbedderConfig,
    options: EncodeOptions,
    spec: ShardSpec,
    ray_options: RayJobOptions,
    job_options: JobOptions,
    result: RayJobResult,
) -> None:
    """The shards not done yet, through a pool of :class:`ShardEncoder` actors; results counted as they come."""
    began = time.perf_counter()
    try:
        with ray_session(ray_options.address, ray_options.num_cpus):
            result.ray_seconds = time.perf_counter() - began
            dataset = _shard_dataset(todo, config, options, spec, ray_options, result)
            _consume(dataset, todo, spec, job_options, result)
    except (JobError, JobInterrupted):
        raise
    except KeyboardInterrupt:
        raise JobInterrupted(_kept(spec, result, "interrupted")) from None
    except Exception as error:
        raise JobError(_failure(error, spec, result, ray_options)) from None


def _shard_dataset(
    todo: Sequence[Shard],
    config: EmbedderConfig,
    options: EncodeOptions,
    spec: ShardSpec,
    ray_options: RayJobOptions,
    result: RayJobResult,
) -> Any:
    import ray.data

    from tembed.ray.dataset import ResourceError

    configure_data(ray_options.stall_timeout)
    cpus, gpus = ray_options.cpus_per_actor, ray_options.gpus_per_actor
    actors = ray_options.actors or default_actors(cpus, gpus)
    actors = min(actors, len(todo))
    try:
        check_resources(actors, cpus, gpus)
    except ResourceError as error:
        raise JobError(str(error), EXIT_REFUSED) from None
    result.actors = actors
    device = _device(ray_options)
    kwargs = {"config": config, "options": options, "spec": spec, "device": device, "threads": max(1, math.ceil(cpus))}
    dataset = ray.data.from_items([shard.as_row() for shard in todo], override_num_blocks=len(todo))
    return dataset.map_batches(
        ShardEncoder,
        fn_constructor_kwargs=kwargs,
        batch_format="pyarrow",
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        num_gpus=gpus or None,
    )


def _consume(
    dataset: Any, todo: Sequence[Shard], spec: ShardSpec, job_options: JobOptions, result: RayJobResult
) -> None:
    show = job_options.progress and not job_options.quiet
    total = None
    if show:  # the whole input's lines (a bound on its records), the shards done before counted in
        total = sum(count_items(path, fmt) or 0 for path, fmt in spec.files)
    bar = progress_bar(total, result.rows + result.rejected, show)
    first_ready = None
    seen: set[int] = set()
    try:
        for row in dataset.iter_rows():
            if row["shard"] in seen:  # a shard run again after its actor died: its part file was replaced
                continue
            seen.add(row["shard"])
            result.rows += row["rows"]
            result.rows_done += row["rows"]
            result.rejected += row["rejected"]
            result.tokens_done += row["tokens"]
            result.load_seconds = max(result.load_seconds, row["load_seconds"])
            result.nodes.add(row["node"])
            first_ready = row["ready"] if first_ready is None else min(first_ready, row["ready"])
            result.encode_seconds = time.time() - first_ready
            bar.update(row["rows"] + row["rejected"])
    finally:
        bar.close()


def _original(error: BaseException) -> BaseException:
    """The actor's own exception inside Ray's wrappers (``RayTaskError.cause``, ``__cause__``)."""
    seen = 0
    while seen < 8:
        inner = getattr(error, "cause", None) or error.__cause__
        if inner is None or inner is error:
            break
        error, seen = inner, seen + 1
    return error


def _kept(spec: ShardSpec, result: RayJobResult, what: str) -> str:
    done = sum(1 for name in os.listdir(spec.output) if name.startswith("part-"))
    return (
        f"{what}: {done} of {result.shards} shards are done in {spec.output}; rerun with --resume to encode only "
        f"the rest"
    )


def _failure(error: Exception, spec: ShardSpec, result: RayJobResult, ray_options: RayJobOptions) -> str:
    name = type(error).__name__
    if name == "ExecutionTimeoutError":
        head = (
            f"no shard finished in {ray_options.stall_timeout:g} s (--stall-timeout): the actors are stuck or a "
            f"shard is too slow (lower --shard-lines)"
        )
    elif name in ("ConnectionError", "RaySystemError") and not result.ray_seconds:
        head = f"cannot connect to Ray at {ray_options.address}: {one_line(error)}"
    else:
        original = _original(error)
        message = str(original).strip().splitlines()
        head = f"{type(original).__name__}: {message[0] if message else ''}"
        if type(original).__name__ == "BadRecord":
            head = message[0] + " (pass --skip-invalid to list bad records in the rejects file instead)"
    return f"{head}\n{_kept(spec, result, 'stopped')}"


def ray_summary(result: RayJobResult, folder: OutputFolder) -> str:
    """The line said at the end: records, rejects, rate after start-up, start-up, output size."""
    size = sum(
        os.path.getsize(os.path.join(folder.path, name)) for name in os.listdir(folder.path) if name.startswith("part-")
    )
    wrote = f"wrote {folder.path} ({result.shards} part files, {size_text(size)})"
    extra = f", {result.rejected:,} rejected (listed in {folder.rejects})" if result.rejected else ""
    if not result.rows_done and result.shards_before == result.shards:
        return f"nothing left to encode: all {result.shards} shards were done{extra}; {wrote}"
    before = f" ({result.rows - result.rows_done:,} from the interrupted run)" if result.shards_before else ""
    nodes = f"{len(result.nodes)} node" + ("" if len(result.nodes) == 1 else "s")
    seconds = result.encode_seconds
    rate = result.rows_done / seconds if seconds > 0 else 0.0
    return (
        f"encoded {result.rows:,} texts{before}{extra} on {result.actors} Ray actors ({nodes}): "
        f"{seconds:.1f} s after start-up, {rate:,.1f} texts/s (+{result.ray_seconds:.1f} s starting Ray, "
        f"+{result.load_seconds:.1f} s loading the model); {wrote}"
    )
