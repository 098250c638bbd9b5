"""Which head computes which output for which kind of model.

A new head is one module (a class with ``needs_logits``, ``__init__(context)`` and ``run(forward)``, see
:class:`tembed.heads.base.Head`) plus one line here. The key is ``(output, model kind)``; ``"*"`` matches any
kind. The output must be a field of :class:`tembed.outputs.EncodeOutputs` (``dense``, ``sparse``, ``colbert``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tembed.heads.base import Head, HeadContext
from tembed.heads.dense import DenseHead
from tembed.heads.m3 import ColbertHead, M3SparseHead
from tembed.heads.splade import SpladeHead

HEADS: dict[tuple[str, str], Callable[[HeadContext], Head]] = {
    ("dense", "*"): DenseHead,
    ("sparse", "m3"): M3SparseHead,
    ("sparse", "splade"): SpladeHead,
    ("colbert", "m3"): ColbertHead,
}


def build_heads(context: HeadContext, outputs: Sequence[str]) -> dict[str, Head]:
    """One head per output, for ``context.kind``.

    Raises:
        ValueError: no head computes an output for this kind of model.
    """
    heads: dict[str, Head] = {}
    for output in outputs:
        build = HEADS.get((output, context.kind)) or HEADS.get((output, "*"))
        if build is None:
            raise ValueError(f"no head computes {output!r} for a {context.kind!r} model")
        heads[output] = build(context)
    return heads
