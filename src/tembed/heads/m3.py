"""BGE-M3's sparse (lexical) and ColBERT heads, on ``sparse_linear.pt`` / ``colbert_linear.pt``."""

from __future__ import annotations

import numpy as np

from tembed.heads.base import HeadContext, HeadInput
from tembed.heads.ops import colbert_vectors, m3_token_weights, token_weights_to_dicts


class M3SparseHead:
    """Per text ``{token_id: weight}``: ``relu(sparse_linear(h_t))``, the max over a token's occurrences, weights
    > 0 only, CLS / EOS / PAD / UNK dropped (as FlagEmbedding)."""

    needs_logits = False

    def __init__(self, context: HeadContext) -> None:
        self.heads = context.m3_heads()
        self.excluded_ids = context.tokenizer.special_ids_without_weight()

    def run(self, forward: HeadInput) -> list[dict[int, float]]:
        weights = m3_token_weights(forward.hidden, self.heads) * forward.mask
        return token_weights_to_dicts(weights, forward.input_ids, self.excluded_ids)


class ColbertHead:
    """Per text an ``(n_tokens - 1, colbert_dim)`` float32 array: ``colbert_linear`` on every real token but the
    first (CLS), EOS kept, finished like the dense vector."""

    needs_logits = False

    def __init__(self, context: HeadContext) -> None:
        self.heads = context.m3_heads()
        self.normalize = context.normalize
        self.truncate_dim = context.truncate_dim

    @property
    def dim(self) -> int:
        """The width of each vector (``truncate_dim`` when smaller)."""
        width = self.heads.colbert_dim
        return min(width, self.truncate_dim) if self.truncate_dim else width

    def run(self, forward: HeadInput) -> list[np.ndarray]:
        return colbert_vectors(
            forward.hidden, forward.mask, self.heads, truncate_dim=self.truncate_dim, normalize=self.normalize
        )
