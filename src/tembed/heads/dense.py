"""The dense head: pooling (CLS, mean, last token), then Matryoshka truncation and L2 normalization."""

from __future__ import annotations

import numpy as np
import torch

from tembed.heads.base import HeadContext, HeadInput
from tembed.heads.ops import finish, pool


class DenseHead:
    """One ``(dim,)`` float32 vector per text. A backend that pools inside its graph hands the pooled vectors
    to :meth:`finish_pooled` instead."""

    needs_logits = False

    def __init__(self, context: HeadContext) -> None:
        self.pooling = context.pooling
        self.normalize = context.normalize
        self.truncate_dim = context.truncate_dim

    def run(self, forward: HeadInput) -> np.ndarray:
        """``(batch, dim)`` float32."""
        return self.finish_pooled(pool(forward.hidden, forward.mask, self.pooling))

    def finish_pooled(self, pooled: torch.Tensor) -> np.ndarray:
        """Truncate and normalize already pooled ``(batch, hidden)`` vectors: ``(batch, dim)`` float32."""
        return finish(pooled, truncate_dim=self.truncate_dim, normalize=self.normalize).cpu().numpy()
