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

import numpy as np

SCORE_MODES: tuple[str, ...] = ("colbert", "sparse", "dense", "sparse+dense", "colbert+sparse+dense")


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
