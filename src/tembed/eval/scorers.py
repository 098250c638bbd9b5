"""First-stage scorers: the scores of every query against one block of corpus rows (see :mod:`tembed.eval.search`).

Each scorer names the corpus columns it reads and the extra values the search carries along with its candidates
(the dense and sparse parts of a hybrid score, for the ColBERT rerank; the float rescoring score of a quantized
search).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from tembed.eval.corpus import CorpusEmbeddings, dense_block, sparse_block
from tembed.eval.data import EvalDataError

if TYPE_CHECKING:
    import pyarrow as pa

    from tembed.eval.search import EncodedQueries, SearchOptions

Scores = tuple[np.ndarray, dict[str, np.ndarray]]


@dataclass
class DenseScorer:
    """``q . d`` (``colbert`` mode's first stage too)."""

    columns: tuple[str, ...] = ("dense",)
    extras: tuple[str, ...] = ()

    def score(self, queries: EncodedQueries, batch: pa.RecordBatch, first_row: int) -> Scores:
        assert queries.outputs.dense is not None
        return queries.outputs.dense @ dense_block(batch).T, {}


@dataclass
class LexicalScorer:
    """``sum over shared tokens of w_q w_d``, by a sparse matrix product."""

    vocab_size: int
    columns: tuple[str, ...] = ("sparse_ids", "sparse_weights")
    extras: tuple[str, ...] = ()
    _queries: Any = None

    def query_matrix(self, queries: EncodedQueries) -> Any:
        from tembed.outputs import sparse_to_csr

        if self._queries is None or self._queries[0] is not queries:
            assert queries.outputs.sparse is not None
            self._queries = (queries, sparse_to_csr(queries.outputs.sparse, self.vocab_size))
        return self._queries[1]

    def score(self, queries: EncodedQueries, batch: pa.RecordBatch, first_row: int) -> Scores:
        documents = sparse_block(batch, self.vocab_size, first_row)
        product = self.query_matrix(queries) @ documents.T
        return np.asarray(product.toarray(), dtype=np.float64), {}


@dataclass
class HybridScorer:
    """``(w_dense dense + w_sparse sparse) / (w_dense + w_sparse)``, carrying both parts for the ColBERT rerank."""

    weights: tuple[float, float, float]
    lexical: LexicalScorer
    columns: tuple[str, ...] = ("dense", "sparse_ids", "sparse_weights")
    extras: tuple[str, ...] = ("dense", "sparse")

    def score(self, queries: EncodedQueries, batch: pa.RecordBatch, first_row: int) -> Scores:
        w_dense, w_sparse, _ = self.weights
        dense = DenseScorer().score(queries, batch, first_row)[0].astype(np.float64)
        sparse = self.lexical.score(queries, batch, first_row)[0]
        # ColBERT alone (no dense or sparse weight): the dense score finds its candidates
        first = (w_dense * dense + w_sparse * sparse) / (w_dense + w_sparse) if w_dense + w_sparse > 0 else dense
        return first, {"dense": dense, "sparse": sparse}


@dataclass
class QuantizedScorer:
    """Quantized codes: int8 / uint8 dot product of the (int8) codes, or minus the Hamming distance of the bits;
    with ``rescore``, the float query against the dequantized document as an extra."""

    precision: str
    dim: int
    ranges: np.ndarray | None
    column: str
    rescore: bool
    columns: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()
    _query: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.columns = (self.column,)
        self.extras = ("rescore",) if self.rescore else ()

    def codes(self, batch: pa.RecordBatch) -> np.ndarray:
        from tembed.quantization import quantize

        block = dense_block(batch, self.column)
        if self.column == "dense":
            return quantize(block, self.precision, ranges=self.ranges)
        return block

    def features(self, codes: np.ndarray) -> np.ndarray:
        """What the first stage multiplies: centred int8 codes, or 0 / 1 bits (float64, exact)."""
        if self.precision in ("int8", "uint8"):
            centred = codes.astype(np.int16) - (128 if self.precision == "uint8" else 0)
            return centred.astype(np.float64)
        packed = (codes.astype(np.int16) + 128).astype(np.uint8) if self.precision == "binary" else codes
        return np.unpackbits(packed, axis=-1)[:, : self.dim].astype(np.float64)

    def query_side(self, queries: EncodedQueries) -> tuple[np.ndarray, np.ndarray]:
        from tembed.quantization import quantize

        if self._query.get("of") is not queries:
            assert queries.outputs.dense is not None
            features = self.features(quantize(queries.outputs.dense, self.precision, ranges=self.ranges))
            self._query = {"of": queries, "features": features, "bits": features.sum(axis=1)}
        return self._query["features"], self._query["bits"]

    def score(self, queries: EncodedQueries, batch: pa.RecordBatch, first_row: int) -> Scores:
        from tembed.quantization import dequantize

        codes = self.codes(batch)
        query_features, query_bits = self.query_side(queries)
        documents = self.features(codes)
        product = query_features @ documents.T
        if self.precision in ("binary", "ubinary"):  # -(|q| + |d| - 2 q.d): minus the Hamming distance
            product = 2 * product - query_bits[:, None] - documents.sum(axis=1)[None, :]
        extras = {}
        if self.rescore:
            assert queries.outputs.dense is not None
            restored = dequantize(codes, self.precision, ranges=self.ranges, dim=self.dim)
            extras["rescore"] = queries.outputs.dense.astype(np.float64) @ restored.astype(np.float64).T
        return product, extras


def first_stage_scorer(
    corpus: CorpusEmbeddings,
    queries: EncodedQueries,
    options: SearchOptions,
    *,
    vocab_size: int | None,
    dim: int | None,
) -> Any:
    """The scorer of ``options.mode`` (and quantization) for this corpus file."""
    if options.quantize is not None:
        return _quantized_scorer(corpus, options, dim)
    if options.mode in ("sparse", "hybrid"):
        if not vocab_size:
            raise ValueError("sparse search needs the model's vocabulary size")
        lexical = LexicalScorer(vocab_size)
        return lexical if options.mode == "sparse" else HybridScorer(options.weights, lexical)
    return DenseScorer()


def _quantized_scorer(corpus: CorpusEmbeddings, options: SearchOptions, dim: int | None) -> QuantizedScorer:
    from tembed.quantization import update_ranges

    precision = str(options.quantize)
    column = f"dense_{precision}"
    record = corpus.quantization or {}
    if column in corpus.names:
        ranges = np.asarray(record["ranges"], dtype=np.float32) if record.get("ranges") is not None else None
        width = int(record.get("dim") or dim or 0)
    elif "dense" in corpus.names:
        column = "dense"
        ranges = options.ranges
        if ranges is None and precision in ("int8", "uint8"):  # calibrated on the whole corpus: exact min / max
            for _, batch in corpus.blocks(["dense"], 65_536):
                ranges = update_ranges(ranges, dense_block(batch))
        width = int(dim or 0)
    else:
        raise EvalDataError(f"{corpus.path}: no dense or {column} column to search with {precision} vectors")
    if precision in ("int8", "uint8") and ranges is None:
        raise EvalDataError(f"{corpus.path}: {column} has no quantization ranges in its metadata")
    if options.ranges is not None and column != "dense":
        raise EvalDataError(f"{corpus.path}: {column} was quantized with the ranges in its metadata; drop the ranges")
    return QuantizedScorer(precision, width, ranges, column, options.rescore)
