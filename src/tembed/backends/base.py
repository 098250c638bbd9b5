"""The interface every backend implements, and the batches it runs on.

Imports neither torch nor any inference engine at run time (the tensor types are for type checkers only), so
tokenizing code can build :class:`TokenBatch` without loading a backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig


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
        hidden: (batch, seq, hidden) last hidden state, on the backend's device, in the compute dtype; None
            only when ``pooled`` is given.
        logits: (batch, seq, vocab) masked-LM logits (SPLADE models, when asked for), else None.
        pooled: (batch, hidden) float32 vectors pooled inside the backend's graph (see ``Backend.forward``'s
            ``pooling``), else None.
    """

    hidden: torch.Tensor | None
    logits: torch.Tensor | None = None
    pooled: torch.Tensor | None = None


class Backend(Protocol):
    """Runs a model on token batches.

    Attributes:
        device: where the forward pass runs (``torch.device``).
        hidden_size: width of the last hidden state.
        config: the model's transformers config (the pipeline reads its position limit).
        effective_precision: the precision the forward pass really runs in (``"fp32"``, ``"bf16"``, ``"fp16"``,
            ``"int8"``), which can differ from the one asked for (bf16 on a CPU without native bf16).
    """

    device: torch.device
    hidden_size: int
    config: PretrainedConfig
    effective_precision: str

    def forward(self, batch: TokenBatch, *, want_logits: bool = False, pooling: str | None = None) -> BackendOutput:
        """Run the model.

        Args:
            batch: the padded token batch.
            want_logits: ask a masked-LM model for its vocabulary logits too.
            pooling: ``"cls"`` or ``"mean"`` when only pooled vectors are needed. A backend that pools inside its
                compiled graph (saving the copy of the whole hidden state) returns them in ``pooled``; any other
                backend ignores it and returns ``hidden``, which the pipeline pools.
        """
        ...

    def close(self) -> None:
        """Release the model and its memory."""
        ...


class BackendFactory(Protocol):
    """How :func:`tembed.backends.create_backend` builds a registered backend: its class's ``create``, which takes
    every backend's options and uses those it needs (see :data:`tembed.backends.select.REGISTRY`)."""

    def create(
        self,
        path: str,
        *,
        device: torch.device,
        precision: str,
        dtype: torch.dtype,
        trust_remote_code: bool,
        masked_lm: bool,
    ) -> Backend: ...
