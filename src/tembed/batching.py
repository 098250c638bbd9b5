"""Scheduling: sort by token length, cut into micro-batches by a text count, a padded-token budget and the
padding a batch would waste."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MIN_TEXTS_BEFORE_PADDING_CUT = 8
"""A batch holds at least this many texts before it is cut for padding (few calls for short inputs)."""
PADDING_CUT_RATIO = 0.8
"""A text shorter than this fraction of its batch's longest text starts a new batch (once the batch holds
``MIN_TEXTS_BEFORE_PADDING_CUT`` texts): every token of padding is computed like a real one."""


def plan_batches(lengths: Sequence[int], *, batch_size: int, max_batch_tokens: int | None = None) -> list[np.ndarray]:
    """Cut texts into micro-batches, longest first.

    Texts are sorted by descending token length (a stable sort, so equal lengths keep their input order) and
    taken greedily: a batch holds at most ``batch_size`` texts and, when ``max_batch_tokens`` is set, at most
    that many padded tokens (texts x its longest text), but always at least one text. A batch of at least 8 texts
    also ends before a text shorter than 0.8 x its longest: a small call of mixed lengths (what a server merges
    from concurrent requests) would otherwise pad every text to the longest one; measured on STS-B sentences,
    calls of 30-64 unsorted texts ran about 1.5x faster on the CPU.

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
        longest = max(1, int(counts[order[start]]))
        size = batch_size
        if max_batch_tokens is not None:
            size = max(1, min(batch_size, max_batch_tokens // longest))
        size = min(size, len(order) - start)
        if size > MIN_TEXTS_BEFORE_PADDING_CUT:
            tail = counts[order[start + MIN_TEXTS_BEFORE_PADDING_CUT : start + size]]
            short = np.flatnonzero(tail < PADDING_CUT_RATIO * longest)
            if short.size:
                size = MIN_TEXTS_BEFORE_PADDING_CUT + int(short[0])
        batches.append(order[start : start + size])
        start += size
    return batches
