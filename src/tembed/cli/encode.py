"""``tembed encode INPUT -o OUTPUT``: the options parsed into a :class:`~tembed.jobs.plan.CorpusRequest`, an
:class:`~tembed.settings.EmbedderConfig`, :class:`~tembed.settings.EncodeOptions` and
:class:`~tembed.jobs.corpus.JobOptions`, then the corpus job run (:mod:`tembed.jobs`).

The model is opened through :func:`open_job_encoder` (one device, or a worker pool for ``--device cpu,cpu`` /
``cuda:0,cuda:1``): the one place tests replace to share a model between runs.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer

from tembed.cli.common import DEVICE_HELP, MODEL_HELP, TRUST_REMOTE_CODE_HELP, parse_device
from tembed.jobs import DEFAULT_CHUNK_SIZE
from tembed.models.registry import DEFAULT_MODEL
from tembed.ray.dataset import DEFAULT_STALL_TIMEOUT
from tembed.ray.shards import DEFAULT_SHARD_LINES
from tembed.types import Role

if TYPE_CHECKING:
    from tembed.encoder import Encoder
    from tembed.jobs.corpus import JobOptions
    from tembed.jobs.plan import CorpusRequest
    from tembed.quantization import DenseQuantization
    from tembed.ray.run import RayJobOptions
    from tembed.settings import EmbedderConfig, EncodeOptions

KIND_HELP = "passage (corpus instruction and length), query, or plain (no instruction)."

# The options, as typer reads them from the annotations (their defaults are in encode_command's signature).
Input = Annotated[
    str, typer.Argument(metavar="INPUT", help="A .jsonl, .csv, .tsv, .parquet or .txt file; - for stdin.")
]
Output = Annotated[str, typer.Option("--output", "-o", help="Where to write: a .parquet or .npy file.")]
Model = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)]
Kind = Annotated[Role, typer.Option("--kind", help=KIND_HELP)]
TextField = Annotated[str, typer.Option("--text-field", help="Field / column holding the text.")]
IdField = Annotated[str, typer.Option("--id-field", help="Field / column holding the id; else line numbers.")]
TitleField = Annotated[
    str, typer.Option("--title-field", help='Field joined before the text as f"{title} {text}"; "" for none.')
]
Format = Annotated[
    str | None,
    typer.Option(
        "--format", help="Input format (jsonl, csv, tsv, parquet, txt); default: from the suffix, stdin: jsonl."
    ),
]
Dense = Annotated[bool, typer.Option("--dense", help="Write dense vectors (the default when no output is named).")]
Sparse = Annotated[bool, typer.Option("--sparse", help="Write sparse lexical weights (BGE-M3, SPLADE).")]
Colbert = Annotated[bool, typer.Option("--colbert", help="Write ColBERT token vectors (BGE-M3).")]
Device = Annotated[str | None, typer.Option("--device", help=DEVICE_HELP + " (default: the first GPU, else cpu).")]
Backend = Annotated[
    str, typer.Option("--backend", help="auto (OpenVINO on CPU for encoders, else torch), torch, onnx or openvino.")
]
Precision = Annotated[str, typer.Option("--precision", help="auto, fp32, fp16, bf16 or int8 (CPU).")]
BatchSize = Annotated[
    int | None,
    typer.Option("--batch-size", min=1, help="Most texts per forward pass (default: 64 on the CPU, 256 on GPUs)."),
]
MaxLength = Annotated[
    int | None, typer.Option("--max-length", min=1, help="Most tokens per text (default: the model's).")
]
ChunkSize = Annotated[int, typer.Option("--chunk-size", min=1, help="Records per row group and per resume checkpoint.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run on the same input and options.")]
Restart = Annotated[bool, typer.Option("--restart", help="Discard an interrupted run's partial results first.")]
SkipInvalid = Annotated[
    bool,
    typer.Option(
        "--skip-invalid", help="Skip bad records, listing them in OUTPUT's .rejects.jsonl, instead of stopping."
    ),
]
UniqueIds = Annotated[
    bool,
    typer.Option(
        "--unique-ids", help="A record whose id an earlier record has is a bad record (default: counted only)."
    ),
]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help=TRUST_REMOTE_CODE_HELP)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no summary.")]
Quantize = Annotated[
    str | None,
    typer.Option(
        "--quantize",
        help="Write the dense vectors as int8, uint8 (per-dimension buckets) or binary, ubinary (sign bits, packed) "
        "in the column dense_PRECISION of a .parquet output; see docs/cli.md.",
    ),
]
QuantizeRanges = Annotated[
    str | None,
    typer.Option(
        "--quantize-ranges",
        help="int8 / uint8: a .npy of shape (2, dim), the per-dimension minima and maxima to use (default: the "
        "corpus's own).",
    ),
]
Engine = Annotated[
    str,
    typer.Option(
        "--engine",
        help="local (this machine; OUTPUT a file) or ray (Ray Data actors; INPUT a file, folder or glob, OUTPUT a "
        "folder of Parquet files). Needs the tembed[ray] extra; see docs/ray.md.",
    ),
]
Address = Annotated[
    str,
    typer.Option(
        "--address", help="Ray: local (a private instance for this run), auto (this machine's cluster) or HOST:PORT."
    ),
]
Actors = Annotated[int | None, typer.Option("--actors", min=1, help="Ray: actors (default: as many as fit).")]
CpusPerActor = Annotated[
    float, typer.Option("--cpus-per-actor", min=0.01, help="Ray: CPUs per actor, also its threads.")
]
GpusPerActor = Annotated[float, typer.Option("--gpus-per-actor", min=0, help="Ray: GPUs per actor (0: CPU actors).")]
ShardLines = Annotated[
    int, typer.Option("--shard-lines", min=1, help="Ray: lines (rows) per shard: the unit of work and of --resume.")
]
StallTimeout = Annotated[
    float, typer.Option("--stall-timeout", min=1, help="Ray: seconds without a shard finishing before an error.")
]


def open_job_encoder(config: EmbedderConfig, device: str | list[str] | None) -> Encoder:
    """The run's encoder: a :class:`~tembed.local_encoder.LocalEncoder` on one device, an
    :class:`~tembed.pool.EmbedderPool` on several. Tests replace this to share one model between runs."""
    from tembed.encoder import open_encoder

    return open_encoder(config, device)


def encode_command(
    input_path: Input,
    output: Output,
    model: Model = DEFAULT_MODEL,
    kind: Kind = Role.PASSAGE,
    text_field: TextField = "text",
    id_field: IdField = "id",
    title_field: TitleField = "title",
    input_format: Format = None,
    dense: Dense = False,
    sparse: Sparse = False,
    colbert: Colbert = False,
    device: Device = None,
    backend: Backend = "auto",
    precision: Precision = "auto",
    batch_size: BatchSize = None,
    max_length: MaxLength = None,
    chunk_size: ChunkSize = DEFAULT_CHUNK_SIZE,
    resume: Resume = False,
    restart: Restart = False,
    skip_invalid: SkipInvalid = False,
    unique_ids: UniqueIds = False,
    trust_remote_code: TrustRemoteCode = False,
    quiet: Quiet = False,
    quantize: Quantize = None,
    quantize_ranges: QuantizeRanges = None,
    engine: Engine = "local",
    address: Address = "local",
    actors: Actors = None,
    cpus_per_actor: CpusPerActor = 1.0,
    gpus_per_actor: GpusPerActor = 0.0,
    shard_lines: ShardLines = DEFAULT_SHARD_LINES,
    stall_timeout: StallTimeout = DEFAULT_STALL_TIMEOUT,
) -> None:
    """Embed a corpus file to parquet or npy (streamed, checkpointed per chunk, resumable with --resume), or with
    --engine ray a file, folder or glob to a folder of parquet files on Ray actors."""
    from tembed.jobs.corpus import JobOptions
    from tembed.jobs.errors import EXIT_INTERRUPTED, EXIT_REFUSED, JobError, JobInterrupted
    from tembed.jobs.plan import CorpusRequest
    from tembed.progress import stderr_is_terminal
    from tembed.settings import EncodeOptions

    devices = parse_device(device)
    request = CorpusRequest(input_path, output, input_format, text_field, id_field, title_field, resume, restart)
    wanted = tuple(name for name, on in (("dense", dense), ("sparse", sparse), ("colbert", colbert)) if on)
    job_options = JobOptions(chunk_size, skip_invalid, unique_ids, quiet, progress=stderr_is_terminal())
    try:
        config = encoder_config(model, backend, precision, batch_size, wanted or ("dense",), trust_remote_code)
        options = EncodeOptions(role=kind, max_length=max_length, outputs=wanted or ("dense",))
        quantization = quantization_option(quantize, quantize_ranges, output, options.outputs, engine)
    except (TypeError, ValueError) as error:  # an option EmbedderConfig / EncodeOptions refuses
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(EXIT_REFUSED) from None
    if engine not in ("local", "ray"):
        typer.echo(f"error: --engine {engine!r}: use local or ray", err=True)
        raise typer.Exit(EXIT_REFUSED)
    with _sigterm_as_keyboard_interrupt():
        try:
            if engine == "ray":
                ray_options = _ray_options(
                    address, actors, cpus_per_actor, gpus_per_actor, shard_lines, stall_timeout, devices
                )
                run_ray_encode(request, config, options, job_options, ray_options)
                return
            with contextlib.ExitStack() as held:  # what the run holds to its end (the output's lock), released last
                run_encode(request, config, options, job_options, devices, held, quantization)
        except JobError as stop:
            typer.echo(f"error: {stop}", err=True)
            raise typer.Exit(stop.code) from None
        except JobInterrupted as stopped:
            typer.echo(str(stopped), err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None


def _ray_options(
    address: str,
    actors: int | None,
    cpus_per_actor: float,
    gpus_per_actor: float,
    shard_lines: int,
    stall_timeout: float,
    devices: str | list[str] | None,
) -> RayJobOptions:
    from tembed.jobs.errors import EXIT_REFUSED, JobError

    if isinstance(devices, list):
        raise JobError("--engine ray runs one device per actor: pass --device cpu or cuda, and --actors", EXIT_REFUSED)
    from tembed.ray.run import RayJobOptions

    return RayJobOptions(address, actors, cpus_per_actor, gpus_per_actor, shard_lines, stall_timeout, devices)


def run_ray_encode(
    request: CorpusRequest,
    config: EmbedderConfig,
    options: EncodeOptions,
    job_options: JobOptions,
    ray_options: RayJobOptions,
) -> None:
    """The Ray engine (:func:`tembed.ray.run_ray_job`); a clear error when the ``tembed[ray]`` extra is missing."""
    from tembed.jobs.errors import EXIT_REFUSED, JobError

    try:
        import ray.data  # noqa: F401
    except ImportError:
        raise JobError('--engine ray needs Ray Data: pip install "tembed[ray]"', EXIT_REFUSED) from None
    from tembed.ray.run import run_ray_job

    run_ray_job(request, config, options, job_options, ray_options, report=_say)


def quantization_option(
    precision: str | None, ranges_file: str | None, output: str, outputs: tuple[str, ...], engine: str
) -> DenseQuantization | None:
    """The run's :class:`~tembed.quantization.DenseQuantization` from ``--quantize`` / ``--quantize-ranges`` (None
    without ``--quantize``); ValueError naming the problem for a combination that cannot run."""
    from tembed.io.writers import output_format
    from tembed.quantization import PRECISIONS, DenseQuantization, load_ranges

    if precision is None:
        if ranges_file is not None:
            raise ValueError("--quantize-ranges needs --quantize int8 or uint8")
        return None
    if precision not in PRECISIONS:
        raise ValueError(f"--quantize {precision!r}: use one of {', '.join(PRECISIONS)}")
    if engine == "ray":
        raise ValueError("--quantize is not supported with --engine ray: quantize with --engine local")
    if "dense" not in outputs:
        raise ValueError(f"--quantize quantizes the dense vectors: add --dense (the outputs are {', '.join(outputs)})")
    try:
        npy = output_format(output) == "npy"
    except ValueError:  # a bad suffix is reported with the other checks of the output
        npy = False
    if npy:
        raise ValueError(f"{output}: --quantize writes a dense_{precision} column: write .parquet, not .npy")
    if ranges_file is None:
        return DenseQuantization(precision)
    if precision not in ("int8", "uint8"):
        raise ValueError(f"--quantize-ranges is for int8 and uint8: {precision} takes the sign of each value")
    return DenseQuantization(precision, load_ranges(ranges_file), ranges_file)


def encoder_config(
    model: str,
    backend: str,
    precision: str,
    batch_size: int | None,
    outputs: tuple[str, ...],
    trust_remote_code: bool,
) -> EmbedderConfig:
    """The model options of a run, as :func:`open_job_encoder` receives them."""
    from tembed.settings import EmbedderConfig

    return EmbedderConfig(
        model=model,
        backend=backend,
        precision=precision,
        batch_size=batch_size,
        outputs=outputs,
        show_progress_bar=False,
        trust_remote_code=trust_remote_code or None,  # unset: the registry decides
    )


def run_encode(
    request: CorpusRequest,
    config: EmbedderConfig,
    options: EncodeOptions,
    job_options: JobOptions,
    device: str | list[str] | None,
    held: contextlib.ExitStack,
    quantization: DenseQuantization | None = None,
) -> None:
    """Check and lock (before the model loads), open the encoder, check it against an interrupted run, run the job
    (``quantization``: how to store the dense vectors, default None: float32).

    Raises:
        JobError, JobInterrupted: see :meth:`tembed.jobs.corpus.CorpusJob.run`.
    """
    import dataclasses

    from tembed.io.readers import count_items
    from tembed.jobs.corpus import CorpusJob
    from tembed.jobs.errors import EXIT_REFUSED, JobError, one_line
    from tembed.jobs.plan import prepare

    prepared = prepare(request, config, options, held)
    started = time.perf_counter()
    try:
        encoder = open_job_encoder(config, device)
    except Exception as error:  # any loader failure (a failed ONNX export too) in one line; not KeyboardInterrupt
        raise JobError(f"cannot load {config.model}: {one_line(error)}", EXIT_REFUSED) from None
    load_seconds = time.perf_counter() - started
    try:
        # What the vectors depend on that is known only now: checked before anything is encoded.
        checkpoint = prepared.checkpoint(encoder.settings, device if isinstance(device, list) else None)
        if job_options.progress and not job_options.quiet:
            job_options = dataclasses.replace(job_options, total=count_items(request.input_path, prepared.in_format))
        job = CorpusJob(
            encoder,
            options,
            prepared.reader,
            request.output,
            prepared.out_format,
            checkpoint,
            job_options,
            report=_say,
            load_seconds=load_seconds,
            quantization=quantization,
        )
        job.run()
    finally:
        encoder.close()


def _say(message: str) -> None:
    typer.echo(message, err=True)


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_as_keyboard_interrupt() -> Iterator[None]:
    """SIGTERM stops a run as cleanly as Ctrl-C (in the main thread; elsewhere signals cannot be set)."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
