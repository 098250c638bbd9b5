"""``tembed.eval.sts``: Spearman and Pearson correlation of cosine similarity with gold scores, as MTEB's STS
evaluator computes them (scipy's ``spearmanr`` / ``pearsonr`` of the cosines against the gold scores), x 100."""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from tembed.eval.data import StsPairs, read_sts
from tembed.eval.report import EvalReport, settings_record
from tembed.models.registry import DEFAULT_MODEL
from tembed.types import Role

if TYPE_CHECKING:
    from tembed.encoder import Encoder
    from tembed.settings import EmbedderConfig


def cosine_scores(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two ``(n, dim)`` matrices, in float64 (0 for a zero vector)."""
    first = np.asarray(first, dtype=np.float64)
    second = np.asarray(second, dtype=np.float64)
    norms = np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1)
    return np.sum(first * second, axis=1) / np.where(norms == 0, 1.0, norms)


def sts(
    pairs: StsPairs | str,
    model: str | EmbedderConfig = DEFAULT_MODEL,
    *,
    role: Role | str = Role.PLAIN,
    max_length: int | None = None,
    device: Any = None,
    encoder: Encoder | None = None,
) -> EvalReport:
    """Evaluate ``model`` on sentence pairs with gold scores.

    Args:
        pairs: :class:`~tembed.eval.data.StsPairs` (e.g. :func:`~tembed.eval.data.builtin_sts`) or a ``.tsv`` /
            ``.csv`` / ``.jsonl`` file with ``sentence1``, ``sentence2`` and ``score``.
        model: a model name or folder, or an :class:`~tembed.EmbedderConfig`. Default: tembed's default model.
        role: ``plain`` (default: no instruction, as MTEB encodes STS), ``query`` or ``passage``.
        max_length: tokens per sentence (None: the role's default).
        device: where the model runs (ignored with ``encoder``).
        encoder: an open encoder to use (left open); None: one is opened and closed here.

    Returns:
        An :class:`~tembed.eval.report.EvalReport` with ``cosine_spearman`` and ``cosine_pearson`` (x 100).
    """
    from scipy.stats import pearsonr, spearmanr

    from tembed.encoder import open_encoder
    from tembed.settings import EmbedderConfig, EncodeOptions

    data = read_sts(pairs) if isinstance(pairs, str) else pairs
    config = EmbedderConfig(model=model) if isinstance(model, str) else model
    timings: dict[str, float] = {}
    with contextlib.ExitStack() as held:
        started = time.perf_counter()
        if encoder is None:
            encoder = open_encoder(config, device)
            held.callback(encoder.close)
        timings["load"] = time.perf_counter() - started
        started = time.perf_counter()
        options = EncodeOptions(role=Role(role), max_length=max_length, outputs=("dense",))
        vectors = encoder.encode([*data.first, *data.second], options).dense
        timings["encode"] = time.perf_counter() - started
        settings = encoder.settings
    assert vectors is not None
    count = len(data.first)
    cosines = cosine_scores(vectors[:count], vectors[count:])
    gold = np.asarray(data.gold, dtype=np.float64)
    if np.ptp(cosines) == 0:
        raise ValueError(f"every pair has the cosine {cosines[0]:.6f}: a correlation is undefined")
    metrics = {
        "cosine_spearman": 100 * float(spearmanr(gold, cosines).statistic),
        "cosine_pearson": 100 * float(pearsonr(gold, cosines).statistic),
    }
    return EvalReport(
        task="sts",
        metrics=metrics,
        model=settings_record(settings),
        data=data.source,
        options={"role": Role(role).value, "max_length": max_length},
        timings=timings,
    )
