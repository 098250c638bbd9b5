"""The interface every backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


@dataclass
class TokenBatch:
    """One padded micro-batch.

    Attributes:
        input_ids: (batch, seq) int64.
        attention_mask: (batch, seq) int64, 1 for real tokens.
        token_type_ids: (batch, seq) int64 zeros, or None when the model takes none.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray | None = None

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.size)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class BackendOutput:
    """What a forward pass gives the heads.

    Attributes:
        hidden: (batch, seq, hidden) last hidden state, on the backend's device, in the compute dtype.
        logits: (batch, seq, vocab) masked-LM logits (SPLADE models, when asked for), else None.
    """

    hidden: torch.Tensor
    logits: torch.Tensor | None = None


class Backend(Protocol):
    """Runs a model on token batches.

    Attributes:
        device: where the forward pass runs (``torch.device``).
        hidden_size: width of the last hidden state.
    """

    device: torch.device
    hidden_size: int

    def forward(self, batch: TokenBatch, *, want_logits: bool = False) -> BackendOutput:
        """Run the model; ``want_logits`` asks a masked-LM model for its vocabulary logits too."""
        ...

    def close(self) -> None:
        """Release the model and its memory."""
        ...
