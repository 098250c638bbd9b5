"""Evaluation on users' own data, with the metrics computed as MTEB and BEIR compute them.

* :func:`retrieval`: a BEIR folder (corpus, queries, qrels); dense, sparse, ColBERT or hybrid search, optionally
  on quantized vectors; nDCG, MAP, recall, precision and MRR at 1, 3, 5, 10, 100, 1000 by pytrec_eval;
* :func:`sts`: sentence pairs with gold scores; Spearman and Pearson of cosine similarity (x 100).

Both return an :class:`EvalReport` (``.metrics``, ``.to_dict()``, ``.save(path)``, ``.table()``); ``tembed eval
retrieval`` and ``tembed eval sts`` are the same functions on the command line (docs/eval.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "EvalReport": "tembed.eval.report",
    "EvalDataError": "tembed.eval.data",
    "K_VALUES": "tembed.eval.metrics",
    "builtin_sts": "tembed.eval.data",
    "read_sts": "tembed.eval.data",
    "retrieval": "tembed.eval.retrieval_task",
    "retrieval_metrics": "tembed.eval.metrics",
    "sts": "tembed.eval.sts_task",
}

if TYPE_CHECKING:
    from tembed.eval.data import EvalDataError, builtin_sts, read_sts
    from tembed.eval.metrics import K_VALUES, retrieval_metrics
    from tembed.eval.report import EvalReport
    from tembed.eval.retrieval_task import retrieval
    from tembed.eval.sts_task import sts


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tembed.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "K_VALUES",
    "EvalDataError",
    "EvalReport",
    "builtin_sts",
    "read_sts",
    "retrieval",
    "retrieval_metrics",
    "sts",
]
