"""What a head is: it turns one forward pass into one output (``dense``, ``sparse``, ``colbert``) per text.

A head is built once per model from a :class:`HeadContext` and then called per batch with a :class:`HeadInput`.
Which head computes an output for a model kind is looked up in :data:`tembed.heads.registry.HEADS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch

    from tembed.heads.ops import M3Heads
    from tembed.tokenize import TextTokenizer


@dataclass(frozen=True)
class HeadInput:
    """One batch's forward pass, as every head sees it.

    Attributes:
        hidden: ``(batch, seq, hidden)`` last hidden state.
        mask: ``(batch, seq)`` attention mask (1 for real tokens), on the hidden state's device.
        input_ids: ``(batch, seq)`` int64 token ids (CPU).
        logits: ``(batch, seq, vocab)`` masked-LM logits when a head asked for them, else None.
    """

    hidden: torch.Tensor
    mask: torch.Tensor
    input_ids: torch.Tensor
    logits: torch.Tensor | None = None


class Head(Protocol):
    """Computes one output per text of a batch.

    Attributes:
        needs_logits: the head reads masked-LM logits (the backend then returns them).
    """

    needs_logits: bool

    def run(self, forward: HeadInput) -> np.ndarray | list[Any]:
        """The output of each text of the batch, in batch order: a ``(batch, ...)`` array or a list."""
        ...


@dataclass
class HeadContext:
    """What building a head may use: the model's files, its settings, where it runs.

    Attributes:
        path: the model folder. ``kind``: the registry / file kind (``"encoder"``, ``"m3"``, ``"splade"``...).
        pooling, normalize, truncate_dim: the effective dense settings (ColBERT is finished the same way).
        device: the ``torch.device``; ``dtype``: the dtype for head weights.
        tokenizer: the model's tokenizer (special ids).
    """

    path: str
    kind: str
    pooling: str
    normalize: bool
    truncate_dim: int | None
    device: torch.device
    dtype: torch.dtype
    tokenizer: TextTokenizer
    _m3: M3Heads | None = field(default=None, repr=False)

    def m3_heads(self) -> M3Heads:
        """BGE-M3's ``sparse_linear`` / ``colbert_linear``, loaded once and shared by the heads that use them.

        Raises:
            MissingHeadError: a head file is missing (with the ``outputs=("dense",)`` workaround).
        """
        if self._m3 is None:
            from tembed.heads.ops import M3Heads

            self._m3 = M3Heads.load(self.path, device=self.device, dtype=self.dtype)
        return self._m3
