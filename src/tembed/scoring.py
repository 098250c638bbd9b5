"""Scores between queries and passages: dense, lexical (sparse), ColBERT late interaction, and their mix.

Formulas (BGE-M3 paper; FlagEmbedding section 4 of the reference notes):

* dense: ``q . p`` (cosine for normalized vectors);
* lexical: ``sum over shared tokens t of w_q[t] * w_p[t]``;
* colbert: ``(1 / n_q) * sum_i max_j q_i . p_j`` over the query's vectors;
* ``sparse+dense = (w_sparse * sparse + w_dense * dense) / (w_sparse + w_dense)``;
  ``colbert+sparse+dense = (w_colbert * colbert + w_sparse * sparse + w_dense * dense) / (sum of weights)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tembed.encoder import Encoder
    from tembed.outputs import EncodeOutputs


def lexical_score(query: Mapping, passage: Mapping) -> float:
    """``sum over shared keys of query[key] * passage[key]`` as a python float (int or str keys)."""
    if len(query) > len(passage):
        query, passage = passage, query
    return float(sum(weight * passage[token] for token, weight in query.items() if token in passage))


def lexical_scores(first: Mapping | Sequence[Mapping], second: Mapping | Sequence[Mapping]) -> float | np.ndarray:
    """Lexical matching: dict x dict gives a float, list x list a ``(len1, len2)`` float64 matrix."""
    if isinstance(first, Mapping) and isinstance(second, Mapping):
        return lexical_score(first, second)
    if isinstance(first, Mapping) or isinstance(second, Mapping):
        raise ValueError("lexical weights must be two dicts or two lists of dicts")
    return np.array([[lexical_score(a, b) for b in second] for a in first], dtype=np.float64).reshape(
        len(first), len(second)
    )


def colbert_score(query: np.ndarray, passage: np.ndarray) -> float:
    """Late interaction: the mean over query vectors of the best dot product with any passage vector.

    Args:
        query: ``(n_q, dim)`` ColBERT vectors.
        passage: ``(n_p, dim)`` ColBERT vectors.
    """
    query = np.asarray(query, dtype=np.float32)
    passage = np.asarray(passage, dtype=np.float32)
    if query.shape[0] == 0 or passage.shape[0] == 0:
        return 0.0
    return float((query @ passage.T).max(axis=1).mean())


def colbert_scores(queries: Sequence[np.ndarray], passages: Sequence[np.ndarray]) -> np.ndarray:
    """``(len(queries), len(passages))`` ColBERT scores, float64."""
    return np.array([[colbert_score(q, p) for p in passages] for q in queries], dtype=np.float64).reshape(
        len(queries), len(passages)
    )


def combine_scores(
    dense: np.ndarray, sparse: np.ndarray, colbert: np.ndarray, weights: Sequence[float] = (1.0, 1.0, 1.0)
) -> dict[str, np.ndarray]:
    """All five score modes from the three scores and ``weights = (dense, sparse, colbert)``."""
    if len(weights) != 3:
        raise ValueError(f"weights must be (dense, sparse, colbert), got {weights!r}")
    w_dense, w_sparse, w_colbert = (float(w) for w in weights)
    if w_dense + w_sparse <= 0 or w_dense + w_sparse + w_colbert <= 0:
        raise ValueError(f"weights must have a positive sum, got {weights!r}")
    return {
        "colbert": colbert,
        "sparse": sparse,
        "dense": dense,
        "sparse+dense": (w_sparse * sparse + w_dense * dense) / (w_sparse + w_dense),
        "colbert+sparse+dense": (w_colbert * colbert + w_sparse * sparse + w_dense * dense)
        / (w_dense + w_sparse + w_colbert),
    }


def pair_scores(
    queries: EncodeOutputs, passages: EncodeOutputs, weights: Sequence[float] = (1.0, 1.0, 1.0)
) -> dict[str, np.ndarray]:
    """The five score modes of aligned (query, passage) pairs: row i of ``queries`` with row i of ``passages``.

    Both need dense, sparse and ColBERT outputs (lists, not single-text values). Returns float64 ``(n,)`` arrays.
    """
    if queries.dense is None or queries.sparse is None or queries.colbert is None:
        raise ValueError("pair_scores needs dense, sparse and colbert outputs of the queries")
    if passages.dense is None or passages.sparse is None or passages.colbert is None:
        raise ValueError("pair_scores needs dense, sparse and colbert outputs of the passages")
    dense = np.asarray(np.sum(queries.dense * passages.dense, axis=1, dtype=np.float64))
    pairs = zip(queries.sparse, passages.sparse, strict=True)
    sparse = np.array([lexical_score(q, p) for q, p in pairs], dtype=np.float64).reshape(dense.shape)
    colbert_pairs = zip(queries.colbert, passages.colbert, strict=True)
    colbert = np.array([colbert_score(q, p) for q, p in colbert_pairs], dtype=np.float64).reshape(dense.shape)
    return combine_scores(dense, sparse, colbert, weights)


def check_pairs(pairs: Sequence[tuple[str, str]] | tuple[str, str]) -> tuple[list[tuple[str, str]], bool]:
    """``(list of (query, passage) pairs, was_one_pair)``; a non-pair item raises TypeError naming its index."""
    single = len(pairs) == 2 and all(isinstance(item, str) for item in pairs)
    given: list[Any] = [pairs] if single else list(pairs)
    for index, pair in enumerate(given):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise TypeError(f"pairs[{index}] must be a (query, passage) pair, got {pair!r:.80}")
    return [(pair[0], pair[1]) for pair in given], single


def score_pairs(
    encoder: Encoder,
    pairs: Sequence[tuple[str, str]] | tuple[str, str],
    *,
    weights: Sequence[float] = (1.0, 1.0, 1.0),
    max_lengths: tuple[int, int],
    batch_size: int | None = None,
) -> dict[str, Any]:
    """BGE-M3's ``compute_score``: queries and passages each encoded once (all three outputs, no instruction,
    at ``max_lengths = (query, passage)`` tokens), then the five modes per pair (see
    :meth:`tembed.Embedder.compute_score`): lists of floats, or floats for one pair."""
    from tembed.settings import EncodeOptions
    from tembed.text import check_texts

    pair_list, single = check_pairs(pairs)
    sides = []
    for side, what in enumerate(("queries of pairs", "passages of pairs")):
        options = EncodeOptions(
            max_length=max_lengths[side], outputs=("dense", "sparse", "colbert"), batch_size=batch_size
        )
        items, _ = check_texts([pair[side] for pair in pair_list], what=what)
        sides.append(encoder.encode(items, options))
    scores = pair_scores(sides[0], sides[1], weights)
    return {str(name): (float(values[0]) if single else values.tolist()) for name, values in scores.items()}
