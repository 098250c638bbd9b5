"""The encode pipeline every front end shares: tokenize -> schedule -> run -> heads -> finish.

:class:`EncodePipeline` turns a list of already-prepared texts (instructions applied) into float32 vectors in
the caller's order. The library API, the worker pool and the corpus CLI all call :meth:`EncodePipeline.encode`;
only the scheduling around it differs.
"""

from __future__ import annotations

import logging
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from tembed.backends.base import Backend
from tembed.batching import plan_batches
from tembed.devices import is_out_of_memory, release_cached_memory
from tembed.heads import finish, pool
from tembed.tokenize import TextTokenizer

logger = logging.getLogger(__name__)

PROGRESS_BAR_MIN_TEXTS = 1024


class EncodeOutOfMemoryError(MemoryError):
    """Even a single text does not fit in the device's memory."""


@dataclass
class HeadConfig:
    """What the heads do with the last hidden state.

    Attributes:
        pooling: ``"cls"``, ``"mean"`` or ``"last_token"``.
        normalize: L2-normalize after truncation.
        truncate_dim: keep only the first dimensions (Matryoshka), or None.
    """

    pooling: str
    normalize: bool = True
    truncate_dim: int | None = None


class EncodePipeline:
    """Tokenizer + backend + heads, with token-budget batching and out-of-memory recovery.

    Args:
        tokenizer: the model's tokenizer.
        backend: runs the forward pass.
        heads: pooling and finishing.
    """

    def __init__(self, tokenizer: TextTokenizer, backend: Backend, heads: HeadConfig) -> None:
        self.tokenizer = tokenizer
        self.backend = backend
        self.heads = heads
        # Shrinks after an out-of-memory error and stays shrunk, so later calls do not fail again.
        self.token_budget_after_oom: int | None = None

    @property
    def dim(self) -> int:
        return self.heads.truncate_dim or self.backend.hidden_size

    def encode(
        self,
        texts: Sequence[str],
        *,
        max_length: int,
        batch_size: int,
        max_batch_tokens: int | None = None,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        """Vectors for prepared texts.

        Args:
            texts: the texts, instructions already applied.
            max_length: truncate each text to this many tokens (special tokens included).
            batch_size: the most texts per forward pass.
            max_batch_tokens: the most padded tokens per forward pass, or None.
            show_progress_bar: True / False, or None to show it for inputs of 1,024 texts or more.

        Returns:
            (len(texts), dim) float32, in the order of ``texts``.
        """
        token_ids = self.tokenizer.encode(texts, max_length)
        return self.encode_tokenized(
            token_ids, batch_size=batch_size, max_batch_tokens=max_batch_tokens, show_progress_bar=show_progress_bar
        )

    def encode_tokenized(
        self,
        token_ids: Sequence[Sequence[int]],
        *,
        batch_size: int,
        max_batch_tokens: int | None = None,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        """Vectors for already tokenized texts; see :meth:`encode`."""
        output = np.empty((len(token_ids), self.dim), dtype=np.float32)
        if not token_ids:
            return output
        lengths = [len(ids) for ids in token_ids]
        budget = _min_budget(max_batch_tokens, self.token_budget_after_oom)
        pending = deque(plan_batches(lengths, batch_size=batch_size, max_batch_tokens=budget))
        show = len(token_ids) >= PROGRESS_BAR_MIN_TEXTS if show_progress_bar is None else show_progress_bar
        with tqdm(total=len(token_ids), desc="Encoding", unit="text", disable=not show, leave=False) as bar:
            while pending:
                indices = pending.popleft()
                try:
                    vectors = self._run_batch([token_ids[i] for i in indices])
                except Exception as error:
                    if not is_out_of_memory(error):
                        raise
                    pending.extendleft(reversed(self._split_after_oom(indices, lengths, error)))
                    continue
                output[indices] = vectors
                bar.update(len(indices))
        return output

    def _run_batch(self, sequences: list[Sequence[int]]) -> np.ndarray:
        batch = self.tokenizer.pad(sequences)
        hidden = self.backend.forward(batch)
        mask = torch.from_numpy(batch.attention_mask).to(hidden.device)
        vectors = pool(hidden, mask, self.heads.pooling)
        vectors = finish(vectors, truncate_dim=self.heads.truncate_dim, normalize=self.heads.normalize)
        return vectors.cpu().numpy()

    def _split_after_oom(self, indices: np.ndarray, lengths: Sequence[int], error: BaseException) -> list[np.ndarray]:
        device = self.backend.device
        release_cached_memory(device)
        longest = max(lengths[i] for i in indices)
        if len(indices) == 1:
            raise EncodeOutOfMemoryError(
                f"out of memory on {device} encoding a single text of {longest} tokens; "
                "lower max_length, use a lower precision, or a device with more memory"
            ) from error
        half = (len(indices) + 1) // 2
        self.token_budget_after_oom = max(longest, half * longest)
        warnings.warn(
            f"out of memory on {device} with a batch of {len(indices)} texts x {longest} tokens; "
            f"retrying in halves, and capping batches at {self.token_budget_after_oom} tokens from now on",
            RuntimeWarning,
            stacklevel=4,
        )
        return [indices[:half], indices[half:]]


def _min_budget(*budgets: int | None) -> int | None:
    given = [b for b in budgets if b is not None]
    return min(given) if given else None
