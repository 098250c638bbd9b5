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


class Backend(Protocol):
    """Runs a model on token batches.

    Attributes:
        device: where the forward pass runs (``torch.device``).
        hidden_size: width of the last hidden state.
    """

    device: torch.device
    hidden_size: int

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        """The last hidden state, (batch, seq, hidden), on ``device``, in the compute dtype."""
        ...

    def close(self) -> None:
        """Release the model and its memory."""
        ...
