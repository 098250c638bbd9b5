"""Retrieval metrics by pytrec_eval (trec_eval's code), named and averaged as MTEB reports them.

* ``ndcg_at_k``: trec_eval ``ndcg_cut.k`` (graded relevance from the qrels);
* ``map_at_k``: ``map_cut.k``; ``recall_at_k``: ``recall.k``; ``precision_at_k``: ``P.k``;
* ``mrr_at_k``: ``recip_rank`` of the ranking cut after its first ``k`` documents (trec_eval's reciprocal rank
  has no cut-off of its own);
* each averaged over the evaluated queries (MTEB's mean). A document is relevant when its qrels score is >= 1.

The ranking handed to pytrec_eval carries rank-based scores (``len - position``), so trec_eval evaluates exactly
the order tembed's search produced (its own tie-break, by document id, never applies).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

K_VALUES = (1, 3, 5, 10, 100, 1000)
"""The cut-offs reported by default (MTEB's)."""

MEASURES = {"ndcg_at": "ndcg_cut", "map_at": "map_cut", "recall_at": "recall", "precision_at": "P"}

Ranking = Mapping[str, Sequence[str]]
"""``{query_id: [corpus_id, ...]}`` best first."""


def _require_pytrec_eval() -> Any:
    try:
        import pytrec_eval
    except ImportError:
        raise ImportError('retrieval metrics need pytrec_eval: pip install "tembed[eval]"') from None
    return pytrec_eval


def ranking_to_run(ranking: Ranking, depth: int | None = None) -> dict[str, dict[str, float]]:
    """A pytrec_eval run from a ranking: the first ``depth`` documents (all: None) with scores ``n - position``."""
    run: dict[str, dict[str, float]] = {}
    for query_id, documents in ranking.items():
        kept = documents if depth is None else documents[:depth]
        count = len(kept)
        run[query_id] = {doc: float(count - position) for position, doc in enumerate(kept)}
    return run


def retrieval_metrics(
    qrels: Mapping[str, Mapping[str, int]], ranking: Ranking, k_values: Sequence[int] = K_VALUES
) -> dict[str, float]:
    """MTEB-named metrics (see the module docstring) of ``ranking`` against ``qrels``, as fractions in [0, 1].

    Args:
        qrels: ``{query_id: {corpus_id: graded relevance}}``.
        ranking: ``{query_id: [corpus_id, ...]}`` best first; every query of ``qrels`` should have an entry (a
            missing or empty one counts as retrieving nothing).
        k_values: the cut-offs.

    Returns:
        ``{"ndcg_at_10": ..., "map_at_10": ..., "recall_at_10": ..., "precision_at_10": ..., "mrr_at_10": ...}``
        for every k.
    """
    pytrec_eval = _require_pytrec_eval()
    cuts = ",".join(str(k) for k in k_values)
    judged = {query: dict(docs) for query, docs in qrels.items()}
    evaluator = pytrec_eval.RelevanceEvaluator(judged, {f"{measure}.{cuts}" for measure in MEASURES.values()})
    full = {query: list(ranking.get(query, ())) for query in judged}
    per_query = evaluator.evaluate(ranking_to_run(full))
    count = len(per_query)
    if count == 0:
        raise ValueError("no query of the qrels could be evaluated")
    metrics: dict[str, float] = {}
    for name, measure in MEASURES.items():
        for k in k_values:
            metrics[f"{name}_{k}"] = sum(scores[f"{measure}_{k}"] for scores in per_query.values()) / count
    reciprocal = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"})
    for k in k_values:
        cut = reciprocal.evaluate(ranking_to_run(full, depth=k))
        metrics[f"mrr_at_{k}"] = sum(scores["recip_rank"] for scores in cut.values()) / len(cut)
    return {name: metrics[name] for name in sorted(metrics, key=_metric_order)}


def _metric_order(name: str) -> tuple[int, int]:
    prefix, _, k = name.rpartition("_")
    order = ["ndcg_at", "map_at", "recall_at", "precision_at", "mrr_at"]
    return order.index(prefix), int(k)
