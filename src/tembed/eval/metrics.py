"""Retrieval metrics by pytrec_eval (trec_eval's code), named and averaged as MTEB reports them.

* ``ndcg_at_k``: trec_eval ``ndcg_cut.k`` (graded relevance from the qrels);
* ``map_at_k``: ``map_cut.k``; ``recall_at_k``: ``recall.k``; ``precision_at_k``: ``P.k``;
* ``mrr_at_k``: ``recip_rank`` of the run cut after its first ``k`` documents (trec_eval's reciprocal rank has no
  cut-off of its own), cut in trec_eval's own order;
* each averaged over the evaluated queries (MTEB's mean). A document is relevant when its qrels score is >= 1.

The run holds the search's real scores, as MTEB hands them to pytrec_eval, so trec_eval orders the documents
itself: by score, ties by document id, descending.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

K_VALUES = (1, 3, 5, 10, 100, 1000)
"""The cut-offs reported by default (MTEB's)."""

MEASURES = {"ndcg_at": "ndcg_cut", "map_at": "map_cut", "recall_at": "recall", "precision_at": "P"}

Run = Mapping[str, Mapping[str, float]]
"""``{query_id: {corpus_id: score}}``: what the search retrieved for each query (pytrec_eval's run)."""


def _require_pytrec_eval() -> Any:
    try:
        import pytrec_eval
    except ImportError:
        raise ImportError('retrieval metrics need pytrec_eval: pip install "tembed[eval]"') from None
    return pytrec_eval


def check_k_values(k_values: Sequence[int]) -> tuple[int, ...]:
    """The cut-offs as a tuple; ValueError unless they are whole numbers >= 1 (pytrec_eval aborts on 0)."""
    values = tuple(k_values)
    if not values or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in values):
        raise ValueError(f"k_values must be whole numbers >= 1, got {list(values)}")
    return values


def trec_order(scores: Mapping[str, float]) -> list[tuple[str, float]]:
    """``(doc, score)`` in trec_eval's ranking order: score descending, ties by document id descending."""
    return sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)


def retrieval_metrics(
    qrels: Mapping[str, Mapping[str, int]], run: Run, k_values: Sequence[int] = K_VALUES
) -> dict[str, float]:
    """MTEB-named metrics (see the module docstring) of ``run`` against ``qrels``, as fractions in [0, 1].

    Args:
        qrels: ``{query_id: {corpus_id: graded relevance}}``.
        run: ``{query_id: {corpus_id: score}}``; a query of ``qrels`` missing from it retrieved nothing.
        k_values: the cut-offs (whole numbers >= 1).

    Returns:
        ``{"ndcg_at_10": ..., "map_at_10": ..., "recall_at_10": ..., "precision_at_10": ..., "mrr_at_10": ...}``
        for every k.
    """
    k_values = check_k_values(k_values)
    pytrec_eval = _require_pytrec_eval()
    cuts = ",".join(str(k) for k in k_values)
    judged = {query: dict(docs) for query, docs in qrels.items()}
    evaluator = pytrec_eval.RelevanceEvaluator(judged, {f"{measure}.{cuts}" for measure in MEASURES.values()})
    full = {query: {doc: float(score) for doc, score in run.get(query, {}).items()} for query in judged}
    per_query = evaluator.evaluate(full)
    count = len(per_query)
    if count == 0:
        raise ValueError("no query of the qrels could be evaluated")
    metrics: dict[str, float] = {}
    for name, measure in MEASURES.items():
        for k in k_values:
            metrics[f"{name}_{k}"] = sum(scores[f"{measure}_{k}"] for scores in per_query.values()) / count
    reciprocal = pytrec_eval.RelevanceEvaluator(judged, {"recip_rank"})
    ordered = {query: trec_order(scores) for query, scores in full.items()}
    for k in k_values:
        cut = reciprocal.evaluate({query: dict(items[:k]) for query, items in ordered.items()})
        metrics[f"mrr_at_{k}"] = sum(scores["recip_rank"] for scores in cut.values()) / len(cut)
    return {name: metrics[name] for name in sorted(metrics, key=_metric_order)}


def _metric_order(name: str) -> tuple[int, int]:
    prefix, _, k = name.rpartition("_")
    order = ["ndcg_at", "map_at", "recall_at", "precision_at", "mrr_at"]
    return order.index(prefix), int(k)
