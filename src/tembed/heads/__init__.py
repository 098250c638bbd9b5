"""Heads: from one forward pass to each output (dense vectors, sparse weights, ColBERT vectors).

:mod:`~tembed.heads.ops` holds the math; :mod:`~tembed.heads.dense`, :mod:`~tembed.heads.m3` and
:mod:`~tembed.heads.splade` the heads; :mod:`~tembed.heads.registry` which head serves which output and model.
"""

from tembed.heads.base import Head, HeadContext, HeadInput
from tembed.heads.ops import (
    M3Heads,
    MissingHeadError,
    colbert_vectors,
    finish,
    m3_token_weights,
    pool,
    splade_term_weights,
    token_weights_to_dicts,
    vocab_weights_to_dicts,
)
from tembed.heads.registry import HEADS, build_heads

__all__ = [
    "HEADS",
    "Head",
    "HeadContext",
    "HeadInput",
    "M3Heads",
    "MissingHeadError",
    "build_heads",
    "colbert_vectors",
    "finish",
    "m3_token_weights",
    "pool",
    "splade_term_weights",
    "token_weights_to_dicts",
    "vocab_weights_to_dicts",
]
