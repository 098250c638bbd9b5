"""Exact search of encoded queries over an encoded corpus, a block of corpus rows at a time.

First stage, over every document (scores of a ``(queries, block)`` slab, merged into a running top list):

* ``dense``: ``q . d``; ``sparse``: the lexical dot product ``sum w_q[t] w_d[t]`` (scipy sparse matrices);
* ``hybrid``: ``(w_dense dense + w_sparse sparse) / (w_dense + w_sparse)`` (FlagEmbedding's ``sparse+dense``);
* ``colbert``: dense, then reranked;
* with output quantization (dense only): int8 / uint8 codes' dot product (uint8 searches as its int8 codes: the
  same buckets offset by 128), or minus the Hamming distance of the sign bits for binary / ubinary.

Second stage:

* ColBERT (``colbert`` mode, or ``hybrid`` with a ColBERT weight): the first ``rerank_top_k`` documents of each
  query are rescored by late interaction (``colbert``: the ColBERT score; ``hybrid``: FlagEmbedding's
  ``colbert+sparse+dense``, ``(w_d dense + w_s sparse + w_c colbert) / (w_d + w_s + w_c)``) in a second pass over
  the corpus; the rest of the list follows in first-stage order.
* Rescoring (``rescore``, as sentence-transformers' quantization guide): the first stage keeps
  ``depth x rescore_multiplier`` candidates by quantized score, which are reordered by the float query against the
  document's quantized vector (int8 / uint8: dequantized to bucket centres; binary: its 0 / 1 bits) and cut to
  ``depth``.

Ties keep corpus order (the earlier row first). A document whose id equals the query's id is left out (as MTEB).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tembed.eval.corpus import CorpusEmbeddings, colbert_block, id_block

if TYPE_CHECKING:
    from tembed.outputs import EncodeOutputs

MODES = ("dense", "sparse", "colbert", "hybrid")
DEFAULT_HYBRID_WEIGHTS = (0.4, 0.2, 0.4)
"""``(dense, sparse, colbert)``: the weights FlagEmbedding's BGE-M3 examples use."""
SCORE_CELLS = 8_000_000
"""Scores held per slab (queries x corpus rows): 64 MB of float64; the block of rows follows from it."""
MAX_BLOCK_ROWS = 16_384
"""Corpus rows read per block at most (few queries): 25 MB of 384-d float32 vectors."""
QUERY_BLOCK = 2048
"""Queries searched per pass over the corpus (bounds the top lists: queries x depth)."""


@dataclass(frozen=True)
class SearchOptions:
    """How to search (see the module docstring).

    Attributes:
        mode: ``dense`` (default), ``sparse``, ``colbert`` or ``hybrid``.
        weights: ``(dense, sparse, colbert)`` for ``hybrid`` (default :data:`DEFAULT_HYBRID_WEIGHTS`).
        depth: documents ranked per query (default 1000: the largest cut-off).
        rerank_top_k: documents reranked by ColBERT per query (default 100).
        quantize: ``int8``, ``uint8``, ``binary`` or ``ubinary`` to search quantized vectors; None: float.
        ranges: the ``(2, dim)`` int8 / uint8 ranges (None: from the corpus file, else calibrated on the corpus).
        rescore: rescore quantized candidates with the float query; ``rescore_multiplier``: candidates per slot.
        ignore_identical_ids: leave out a document whose id is the query's (default True, as MTEB).
        block_rows: corpus rows per block (None: from :data:`SCORE_CELLS`).
    """

    mode: str = "dense"
    weights: tuple[float, float, float] = DEFAULT_HYBRID_WEIGHTS
    depth: int = 1000
    rerank_top_k: int = 100
    quantize: str | None = None
    ranges: np.ndarray | None = None
    rescore: bool = False
    rescore_multiplier: int = 4
    ignore_identical_ids: bool = True
    block_rows: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: use one of {', '.join(MODES)}")
        if len(self.weights) != 3 or min(self.weights) < 0 or sum(self.weights) <= 0:
            raise ValueError(f"weights must be 3 non-negative numbers (dense, sparse, colbert), got {self.weights}")
        if self.quantize is not None and self.quantize not in ("int8", "uint8", "binary", "ubinary"):
            raise ValueError(f"quantize {self.quantize!r}: use int8, uint8, binary or ubinary")
        if self.quantize is not None and self.mode != "dense":
            raise ValueError("output quantization searches dense vectors: use it with mode dense")
        if self.rescore and self.quantize is None:
            raise ValueError("rescore needs a quantized search (quantize int8, uint8, binary or ubinary)")
        if self.depth < 1 or self.rerank_top_k < 1 or self.rescore_multiplier < 1:
            raise ValueError("depth, rerank_top_k and rescore_multiplier must be >= 1")

    @property
    def uses_colbert(self) -> bool:
        return self.mode == "colbert" or (self.mode == "hybrid" and self.weights[2] > 0)

    @property
    def outputs(self) -> tuple[str, ...]:
        """The encoder outputs this search needs."""
        if self.mode == "sparse":
            return ("sparse",)
        if self.mode == "hybrid":
            return ("dense", "sparse", "colbert") if self.weights[2] > 0 else ("dense", "sparse")
        return ("dense", "colbert") if self.mode == "colbert" else ("dense",)


class TopList:
    """The best ``width`` documents per query so far: scores (float64, ``-inf`` for none) and corpus rows, plus
    named extra values carried along (the components of a hybrid score, a rescoring score)."""

    def __init__(self, queries: int, width: int, extras: Sequence[str] = ()) -> None:
        self.width = width
        self.scores = np.full((queries, 0), -np.inf)
        self.rows = np.zeros((queries, 0), dtype=np.int64)
        self.extras = {name: np.zeros((queries, 0)) for name in extras}

    def add(self, scores: np.ndarray, first_row: int, extras: dict[str, np.ndarray]) -> None:
        """Merge a ``(queries, block)`` slab of rows ``first_row...``; stable, so ties keep the earlier row."""
        queries, count = scores.shape
        rows = np.broadcast_to(np.arange(first_row, first_row + count, dtype=np.int64), (queries, count))
        merged = np.concatenate([self.scores, scores.astype(np.float64, copy=False)], axis=1)
        order = np.argsort(-merged, axis=1, kind="stable")[:, : self.width]
        self.scores = np.take_along_axis(merged, order, axis=1)
        self.rows = np.take_along_axis(np.concatenate([self.rows, rows], axis=1), order, axis=1)
        for name, values in self.extras.items():
            both = np.concatenate([values, extras[name].astype(np.float64, copy=False)], axis=1)
            self.extras[name] = np.take_along_axis(both, order, axis=1)

    def reorder(self, keys: np.ndarray, width: int) -> None:
        """Reorder each query's list by ``keys`` (high first, stable) and keep ``width``."""
        order = np.argsort(-keys, axis=1, kind="stable")[:, :width]
        self.scores = np.take_along_axis(keys, order, axis=1)
        self.rows = np.take_along_axis(self.rows, order, axis=1)
        self.extras = {name: np.take_along_axis(values, order, axis=1) for name, values in self.extras.items()}


@dataclass
class EncodedQueries:
    """Queries' ids and outputs (from :meth:`Encoder.encode` with the query role)."""

    ids: list[str]
    outputs: EncodeOutputs

    def take(self, start: int, stop: int) -> EncodedQueries:
        return EncodedQueries(self.ids[start:stop], self.outputs.take(np.arange(start, stop)))


def search(
    corpus: CorpusEmbeddings,
    queries: EncodedQueries,
    options: SearchOptions,
    *,
    vocab_size: int | None = None,
    dim: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Rank the corpus for every query (see the module docstring).

    Args:
        corpus: the encoded corpus, with the columns the mode needs.
        queries: the encoded queries, with the outputs the mode needs.
        options: :class:`SearchOptions`.
        vocab_size: the width of sparse vectors (sparse and hybrid modes).
        dim: the dense width (binary quantization).
        progress: called with the corpus rows done after each block of the first pass.

    Returns:
        The run: ``{query_id: {corpus_id: score}}``, at most ``options.depth`` documents per query. After a ColBERT
        rerank the documents below the reranked ones keep their first-stage order with their scores shifted below
        the lowest reranked score.
    """
    from tembed.eval.scorers import first_stage_scorer

    scorer = first_stage_scorer(corpus, queries, options, vocab_size=vocab_size, dim=dim)
    run: dict[str, dict[str, float]] = {}
    for start in range(0, len(queries.ids), QUERY_BLOCK):
        part = queries.take(start, min(start + QUERY_BLOCK, len(queries.ids)))
        top = _first_stage(corpus, part, options, scorer, progress)
        if options.rescore:
            top.reorder(np.where(np.isfinite(top.scores), top.extras["rescore"], -np.inf), options.depth)
        if options.uses_colbert:
            _colbert_rerank(corpus, part, options, top)
        run.update(_to_ids(corpus, part.ids, top))
    return run


def _first_stage(
    corpus: CorpusEmbeddings,
    queries: EncodedQueries,
    options: SearchOptions,
    scorer: Any,
    progress: Callable[[int], None] | None,
) -> TopList:
    width = options.depth * (options.rescore_multiplier if options.rescore else 1)
    if options.uses_colbert:
        width = max(width, options.rerank_top_k)
    top = TopList(len(queries.ids), width, scorer.extras)
    block = options.block_rows or min(MAX_BLOCK_ROWS, max(256, SCORE_CELLS // max(1, len(queries.ids))))
    positions = {query_id: position for position, query_id in enumerate(queries.ids)}
    for first_row, batch in corpus.blocks(["id", *scorer.columns], block):
        scores, extras = scorer.score(queries, batch, first_row)
        if options.mode == "sparse":  # no shared token: not retrieved (as from an inverted index)
            scores = np.where(scores > 0, scores, -np.inf)
        if options.ignore_identical_ids:
            for column, doc_id in enumerate(id_block(batch)):
                row = positions.get(doc_id)
                if row is not None:
                    scores[row, column] = -np.inf
        top.add(scores, first_row, extras)
        if progress is not None:
            progress(batch.num_rows)
    return top


def _colbert_rerank(corpus: CorpusEmbeddings, queries: EncodedQueries, options: SearchOptions, top: TopList) -> None:
    """Rescore the first ``rerank_top_k`` of each list with ColBERT (second pass), then put them first."""
    from tembed.scoring import colbert_score

    assert queries.outputs.colbert is not None, "the queries have no ColBERT vectors"
    reranked = min(options.rerank_top_k, top.rows.shape[1])
    candidates = np.where(np.isfinite(top.scores[:, :reranked]), top.rows[:, :reranked], -1)
    colbert = np.zeros(candidates.shape)
    flat = candidates.ravel()
    order = np.argsort(flat, kind="stable")
    sorted_rows = flat[order]
    for first_row, batch in corpus.blocks(["colbert"], 1024):
        lo, hi = np.searchsorted(sorted_rows, [first_row, first_row + batch.num_rows])
        if lo == hi:
            continue
        documents = colbert_block(batch)
        for position in order[lo:hi]:
            query, slot = divmod(int(position), reranked)
            document = documents[int(flat[position]) - first_row]
            colbert[query, slot] = colbert_score(queries.outputs.colbert[query], document)
    weights = options.weights
    if options.mode == "colbert":
        final = colbert
    else:
        parts = [weights[0] * top.extras["dense"][:, :reranked], weights[1] * top.extras["sparse"][:, :reranked]]
        final = (parts[0] + parts[1] + weights[2] * colbert) / sum(weights)
    final = np.where(candidates >= 0, final, -np.inf)
    order_in_head = np.argsort(-final, axis=1, kind="stable")
    top.rows[:, :reranked] = np.take_along_axis(top.rows[:, :reranked], order_in_head, axis=1)
    head = np.take_along_axis(final, order_in_head, axis=1)
    tail = top.scores[:, reranked:]
    with np.errstate(invalid="ignore"):  # -inf - -inf where a list is empty: masked below
        lowest = np.min(np.where(np.isfinite(head), head, np.inf), axis=1, keepdims=True)
        highest = np.max(np.where(np.isfinite(tail), tail, -np.inf), axis=1, keepdims=True) if tail.size else lowest
        shift = np.where(np.isfinite(lowest) & np.isfinite(highest), highest - lowest + 1.0, 0.0)
    top.scores[:, :reranked] = head
    top.scores[:, reranked:] = tail - shift


def _to_ids(corpus: CorpusEmbeddings, query_ids: list[str], top: TopList) -> Iterator[tuple[str, dict[str, float]]]:
    """The lists as ``{corpus id: score}`` (one pass over the id column for the rows that were kept)."""
    kept = np.isfinite(top.scores)
    wanted = np.unique(top.rows[kept])
    names: dict[int, str] = {}
    for first_row, batch in corpus.blocks(["id"], 65_536):
        lo, hi = np.searchsorted(wanted, [first_row, first_row + batch.num_rows])
        if lo < hi:
            ids = batch.column("id")
            for row in wanted[lo:hi].tolist():
                names[row] = str(ids[row - first_row].as_py())
    for position, query_id in enumerate(query_ids):
        rows = top.rows[position][kept[position]].tolist()
        scores = top.scores[position][kept[position]].tolist()
        yield query_id, {names[row]: score for row, score in zip(rows, scores, strict=True)}


__all__ = ["DEFAULT_HYBRID_WEIGHTS", "MODES", "EncodedQueries", "SearchOptions", "TopList", "search"]
