"""Scheduling: sort by token length, cut into micro-batches by a text count and a padded-token budget."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def plan_batches(lengths: Sequence[int], *, batch_size: int, max_batch_tokens: int | None = None) -> list[np.ndarray]:
    """Cut texts into micro-batches, longest first.

    Texts are sorted by descending token length (a stable sort, so equal lengths keep their input order) and
    taken greedily: a batch holds at most ``batch_size`` texts and, when ``max_batch_tokens`` is set, at most
    that many padded tokens (texts x its longest text), but always at least one text.

    Args:
        lengths: token count per text.
        batch_size: the most texts per batch.
        max_batch_tokens: the most padded tokens per batch, or None for no budget.

    Returns:
        Index arrays into ``lengths``, one per batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
    counts = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-counts, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        size = batch_size
        if max_batch_tokens is not None:
            size = max(1, min(batch_size, max_batch_tokens // max(1, int(counts[order[start]]))))
        batches.append(order[start : start + size])
        start += size
    return batches
