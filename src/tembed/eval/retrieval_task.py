"""``tembed.eval.retrieval``: a model on a BEIR folder, measured as MTEB measures it.

Queries are encoded with the query role (the model's query instruction), the corpus with the passage role through
the corpus job (:mod:`tembed.eval.corpus`), the corpus searched exactly a block at a time (:mod:`tembed.eval.search`)
and the ranking scored by pytrec_eval (:mod:`tembed.eval.metrics`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tembed.eval.corpus import CorpusEmbeddings, encode_corpus, verify_ids
from tembed.eval.data import BeirFolder, EvalDataError, beir_folder, read_qrels, read_queries
from tembed.eval.metrics import K_VALUES, check_k_values, retrieval_metrics
from tembed.eval.report import EvalReport, settings_record
from tembed.eval.search import EncodedQueries, SearchOptions, search
from tembed.io.checkpoint import PartialRun
from tembed.models.registry import DEFAULT_MODEL
from tembed.settings import EncodeOptions
from tembed.types import Role

if TYPE_CHECKING:
    from tembed.encoder import Encoder
    from tembed.settings import EmbedderConfig, Settings


def retrieval(
    data_dir: str,
    model: str | EmbedderConfig = DEFAULT_MODEL,
    *,
    split: str = "test",
    mode: str = "dense",
    weights: Sequence[float] | None = None,
    k_values: Sequence[int] = K_VALUES,
    rerank_top_k: int = 100,
    quantize: str | None = None,
    quantize_ranges: np.ndarray | None = None,
    rescore: bool = False,
    rescore_multiplier: int = 4,
    corpus_embeddings: str | None = None,
    skip_invalid: bool = False,
    query_max_length: int | None = None,
    passage_max_length: int | None = None,
    ignore_identical_ids: bool = True,
    device: Any = None,
    encoder: Encoder | None = None,
    block_rows: int | None = None,
    progress: bool = False,
    report: Callable[[str], None] | None = None,
) -> EvalReport:
    """Evaluate retrieval of ``model`` on the BEIR folder ``data_dir`` (see :mod:`tembed.eval.data`).

    Args:
        data_dir: a folder with ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``.
        model: a name or folder, or an :class:`~tembed.EmbedderConfig` (outputs set to the mode's needs).
        split: the qrels file (default ``test``).
        mode: ``dense`` (default), ``sparse`` (BGE-M3 lexical weights, SPLADE), ``colbert`` (dense, then the first
            ``rerank_top_k``, default 100, reranked by ColBERT) or ``hybrid`` (FlagEmbedding's weighted sum with
            ``weights = (dense, sparse, colbert)``, default ``(0.4, 0.2, 0.4)``).
        k_values: the cut-offs (default 1, 3, 5, 10, 100, 1000); the deepest is the ranking depth.
        quantize: ``int8``, ``uint8``, ``binary`` or ``ubinary`` dense vectors (None: float32), with the int8
            ``quantize_ranges`` (``(2, dim)``; None: the corpus's min and max); ``rescore``: the first
            ``depth x rescore_multiplier`` (default 4) candidates rescored with the float query.
        corpus_embeddings: a Parquet of the encoded corpus: reused when it exists (its options and ids checked),
            else written there (resumed if interrupted); None: a temporary file.
        skip_invalid: leave out corpus documents the reader rejects (an empty text, a repeated id) instead of
            stopping; their count is ``data["corpus_rejected"]``.
        query_max_length, passage_max_length: tokens per query / passage (None: the model's defaults).
        ignore_identical_ids: leave out a document whose id is the query's (default True, as MTEB).
        device: where the model runs; ``encoder``: an open encoder to use instead (left open).
        block_rows: corpus rows per search block (None: about 8 million scores per block).
        progress: progress bars on stderr; ``report``: receives status lines (None: silent).

    Returns:
        An :class:`~tembed.eval.report.EvalReport` whose ``metrics`` are ``ndcg_at_k``, ``map_at_k``,
        ``recall_at_k``, ``precision_at_k`` and ``mrr_at_k`` for every k.
    """
    k_values = check_k_values(k_values)
    options = SearchOptions(
        mode=mode, weights=tuple(weights) if weights is not None else SearchOptions.weights,  # type: ignore[arg-type]
        depth=max(k_values), rerank_top_k=rerank_top_k, quantize=quantize, ranges=quantize_ranges, rescore=rescore,
        rescore_multiplier=rescore_multiplier, ignore_identical_ids=ignore_identical_ids, block_rows=block_rows,
    )  # fmt: skip
    data, qrels, (query_ids, query_texts) = _read(data_dir, split)
    config = _with_outputs(model, options.outputs)
    timings: dict[str, float] = {}
    with contextlib.ExitStack() as held:
        started = time.perf_counter()
        if encoder is None:
            from tembed.encoder import open_encoder

            encoder = open_encoder(config, device)
            held.callback(encoder.close)
        timings["load"] = time.perf_counter() - started
        path = corpus_embeddings or os.path.join(held.enter_context(tempfile.TemporaryDirectory()), "c.parquet")
        keep = corpus_embeddings is not None
        job = _CorpusJob(data, path, config, passage_max_length, progress, report, skip_invalid, keep)
        corpus, rejected = _corpus(job, encoder, options, timings)
        settings = encoder.settings
        run = _rank(encoder, corpus, query_ids, query_texts, query_max_length, options, timings, progress)
    started = time.perf_counter()
    metrics = retrieval_metrics(qrels, run, k_values)
    timings["metrics"] = time.perf_counter() - started
    data_record = {**data.fingerprint(), **_counts(query_ids, corpus.rows, rejected, qrels)}
    record, memory = _options_record(options, k_values, corpus_embeddings), _memory(options, settings)
    return EvalReport("retrieval", metrics, settings_record(settings), data_record, record, timings, memory)


def _rank(
    encoder: Encoder,
    corpus: CorpusEmbeddings,
    query_ids: list[str],
    query_texts: list[str],
    max_length: int | None,
    options: SearchOptions,
    timings: dict[str, float],
    progress: bool,
) -> dict[str, dict[str, float]]:
    """Encode the queries (query role) and search the corpus (a bar over corpus rows when ``progress``); the
    seconds go to ``timings``."""
    from tembed.eval.search import QUERY_BLOCK
    from tembed.progress import progress_bar

    started = time.perf_counter()
    query_options = EncodeOptions(role=Role.QUERY, max_length=max_length, outputs=options.outputs)
    queries = EncodedQueries(query_ids, encoder.encode(query_texts, query_options))
    timings["encode_queries"] = time.perf_counter() - started
    started = time.perf_counter()
    settings = encoder.settings
    passes = -(-len(query_ids) // QUERY_BLOCK)
    with progress_bar(corpus.rows * passes, progress, desc="search") as bar:
        run = search(corpus, queries, options, vocab_size=settings.vocab_size, dim=settings.dim, progress=bar.update)
    timings["search"] = time.perf_counter() - started
    return run


def _counts(query_ids: list[str], rows: int, rejected: int, qrels: dict[str, dict[str, int]]) -> dict[str, int]:
    judgements = sum(len(docs) for docs in qrels.values())
    return {
        "queries_evaluated": len(query_ids),
        "corpus_rows": rows,
        "corpus_rejected": rejected,
        "judgements": judgements,
    }


def _read(data_dir: str, split: str) -> tuple[BeirFolder, dict[str, dict[str, int]], tuple[list[str], list[str]]]:
    data = beir_folder(data_dir, split)
    qrels = read_qrels(data.qrels)
    return data, qrels, read_queries(data.queries, qrels)


def _with_outputs(model: str | EmbedderConfig, outputs: tuple[str, ...]) -> EmbedderConfig:
    import dataclasses

    from tembed.settings import EmbedderConfig

    config = EmbedderConfig(model=model) if isinstance(model, str) else model
    return dataclasses.replace(config, outputs=outputs, show_progress_bar=False)


@dataclass(frozen=True)
class _CorpusJob:
    """Where and how the corpus side is encoded (or found)."""

    data: BeirFolder
    path: str
    config: EmbedderConfig
    max_length: int | None
    progress: bool
    report: Callable[[str], None] | None
    skip_invalid: bool
    keep: bool  # the path is the user's --corpus-embeddings (else a temporary file)


def _corpus(
    job: _CorpusJob, encoder: Encoder, options: SearchOptions, timings: dict[str, float]
) -> tuple[CorpusEmbeddings, int]:
    """The encoded corpus and the documents rejected: the file at ``job.path`` when it is complete (checked against
    the options and the corpus's ids), else encoded there now (the seconds go to ``timings["encode_corpus"]``)."""
    from tembed.jobs.plan import CorpusRequest, recorded_options

    if os.path.splitext(job.path)[1].lower() not in (".parquet", ".pq"):
        raise EvalDataError(f"--corpus-embeddings {job.path}: a .parquet file (what tembed encode writes)")
    passage = EncodeOptions(role=Role.PASSAGE, max_length=job.max_length, outputs=options.outputs)
    if os.path.exists(job.path) and not PartialRun(job.path).exists():
        corpus = CorpusEmbeddings(job.path)
        request = CorpusRequest(job.data.corpus, job.path, "jsonl", "text", "_id", "title")
        corpus.check(recorded_options(request, job.config, passage, "jsonl", "parquet"), _columns(options))
        verify_ids(corpus, job.data)
        if job.report is not None:
            job.report(f"reusing the corpus embeddings in {job.path} ({corpus.rows:,} rows)")
        rejected = 0
    else:
        started = time.perf_counter()
        with _eval_advice(job):
            result = encode_corpus(
                job.data, encoder, job.config, passage, job.path, quiet=job.report is None, progress=job.progress,
                report=job.report or _silent, skip_invalid=job.skip_invalid,
            )  # fmt: skip
        timings["encode_corpus"] = time.perf_counter() - started
        corpus, rejected = CorpusEmbeddings(job.path), result.rejected
    if corpus.rows == 0:
        raise EvalDataError(f"{job.data.corpus}: no documents to search")
    return corpus, rejected


@contextlib.contextmanager
def _eval_advice(job: _CorpusJob) -> Iterator[None]:
    """The corpus job's errors with advice for ``tembed eval`` (whose options differ from ``tembed encode``'s)."""
    from tembed.jobs.errors import JobError, JobInterrupted

    def kept() -> str:
        if job.keep and PartialRun(job.path).exists():
            return (
                f"; what was encoded is kept in {job.path}.partial and a rerun with this --corpus-embeddings continues"
            )
        return ""

    try:
        yield
    except JobError as error:
        head = str(error).split("\n", 1)[0]
        advice = f"fix {job.data.corpus}, or rerun with --skip-invalid to leave such documents out"
        raise JobError(f"{head}\n{advice}{kept()}", error.code) from None
    except JobInterrupted:
        raise JobInterrupted("interrupted" + (kept() or "; nothing kept")) from None


def _columns(options: SearchOptions) -> list[str]:
    columns = ["sparse_ids", "sparse_weights"] if "sparse" in options.outputs else []
    if "dense" in options.outputs and options.quantize is None:
        columns.append("dense")
    if options.uses_colbert:
        columns.append("colbert")
    return columns


def _silent(message: str) -> None:
    pass


def _options_record(options: SearchOptions, k_values: Sequence[int], corpus_embeddings: str | None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "mode": options.mode,
        "k_values": list(k_values),
        "ignore_identical_ids": options.ignore_identical_ids,
        "corpus_embeddings": corpus_embeddings,
    }
    if options.mode == "hybrid":
        record["weights"] = list(options.weights)
    if options.uses_colbert:
        record["rerank_top_k"] = options.rerank_top_k
    if options.quantize is not None:
        record.update(quantize=options.quantize, rescore=options.rescore)
        if options.rescore:
            record["rescore_multiplier"] = options.rescore_multiplier
    return record


def _memory(options: SearchOptions, settings: Settings) -> dict[str, Any]:
    """Bytes per vector as searched (and per ColBERT token)."""
    dim, colbert_dim = settings.dim, settings.colbert_dim
    from tembed.quantization import bytes_per_vector

    if "dense" not in options.outputs:
        return {}
    precision = options.quantize or "float32"
    memory: dict[str, Any] = {"dense_precision": precision, "dense_bytes_per_vector": bytes_per_vector(precision, dim)}
    if options.uses_colbert and colbert_dim:
        memory["colbert_bytes_per_token"] = 4 * colbert_dim
    return memory
