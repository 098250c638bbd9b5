"""The encode pipeline every front end shares: tokenize -> schedule -> run -> heads -> finish.

:class:`EncodePipeline` turns a list of already-prepared texts (instructions applied) into float32 vectors in
the caller's order. The library API, the worker pool and the corpus CLI all call :meth:`EncodePipeline.encode`;
only the scheduling around it differs.
"""

from __future__ import annotations

import logging
import warnings
from collections import deque
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from tembed.backends.base import Backend
from tembed.batching import plan_batches
from tembed.devices import is_out_of_memory, release_cached_memory
from tembed.heads import Head, HeadInput
from tembed.heads.dense import DenseHead
from tembed.outputs import EncodeOutputs
from tembed.progress import progress_bar, show_progress
from tembed.tokenize import TextTokenizer

logger = logging.getLogger(__name__)


class EncodeOutOfMemoryError(MemoryError):
    """Even a single text does not fit in the device's memory."""


class EncodePipeline:
    """Tokenizer + backend + heads, with token-budget batching and out-of-memory recovery.

    Args:
        tokenizer: the model's tokenizer.
        backend: runs the forward pass.
        heads: one head per output this pipeline can produce (``{"dense": DenseHead, ...}``, see
            :func:`tembed.heads.build_heads`).
        dim: the width of dense vectors (``truncate_dim`` or the hidden size).
    """

    def __init__(self, tokenizer: TextTokenizer, backend: Backend, heads: Mapping[str, Head], dim: int) -> None:
        self.tokenizer = tokenizer
        self.backend = backend
        self.heads = dict(heads)
        self.dim = dim
        # Shrinks after an out-of-memory error and stays shrunk, so later calls do not fail again.
        self.token_budget_after_oom: int | None = None

    @property
    def outputs(self) -> tuple[str, ...]:
        """The outputs this pipeline can produce."""
        return tuple(self.heads)

    def encode(
        self,
        texts: Sequence[str],
        *,
        max_length: int,
        batch_size: int,
        max_batch_tokens: int | None = None,
        outputs: Sequence[str] = ("dense",),
        show_progress_bar: bool | None = None,
    ) -> EncodeOutputs:
        """Outputs for prepared texts.

        Args:
            texts: the texts, instructions already applied.
            max_length: truncate each text to this many tokens (special tokens included).
            batch_size: the most texts per forward pass.
            max_batch_tokens: the most padded tokens per forward pass, or None.
            outputs: any of ``"dense"``, ``"sparse"``, ``"colbert"``; all come from the same forward pass.
            show_progress_bar: True / False, or None to show it for inputs of 1,024 texts or more when stderr is
                a terminal.

        Returns:
            The requested outputs, in the order of ``texts``: dense ``(n, dim)`` float32, sparse a list of
            ``{token_id: weight}``, colbert a list of ``(n_tokens, dim)`` float32 arrays; ``token_counts`` the
            tokens of each text after truncation (special tokens included).
        """
        token_ids = self.tokenizer.encode(texts, max_length)
        return self.encode_tokenized(
            token_ids,
            batch_size=batch_size,
            max_batch_tokens=max_batch_tokens,
            outputs=outputs,
            show_progress_bar=show_progress_bar,
        )

    def encode_tokenized(
        self,
        token_ids: Sequence[Sequence[int]],
        *,
        batch_size: int,
        max_batch_tokens: int | None = None,
        outputs: Sequence[str] = ("dense",),
        show_progress_bar: bool | None = None,
    ) -> EncodeOutputs:
        """Outputs for already tokenized texts; see :meth:`encode`."""
        self.check_outputs(outputs)
        count = len(token_ids)
        result = EncodeOutputs(
            dense=np.empty((count, self.dim), dtype=np.float32) if "dense" in outputs else None,
            sparse=[{}] * count if "sparse" in outputs else None,
            colbert=[np.empty((0, 0), dtype=np.float32)] * count if "colbert" in outputs else None,
            token_counts=np.fromiter((len(ids) for ids in token_ids), dtype=np.int64, count=count),
        )
        if not token_ids:
            return result
        lengths = [len(ids) for ids in token_ids]
        budget = _min_budget(max_batch_tokens, self.token_budget_after_oom)
        pending = deque(plan_batches(lengths, batch_size=batch_size, max_batch_tokens=budget))
        with progress_bar(count, show_progress(show_progress_bar, count)) as bar:
            while pending:
                indices = pending.popleft()
                try:
                    batch_result = self._run_batch([token_ids[i] for i in indices], outputs)
                except Exception as error:
                    if not is_out_of_memory(error):
                        raise
                    pending.extendleft(reversed(self._split_after_oom(indices, lengths, error)))
                    continue
                _scatter(result, batch_result, indices)
                bar.update(len(indices))
        return result

    def check_outputs(self, outputs: Sequence[str]) -> None:
        """Raise ValueError for an output name this model cannot produce."""
        if not outputs:
            raise ValueError("ask for at least one of the outputs dense, sparse, colbert")
        for name in outputs:
            if name not in self.heads:
                raise ValueError(f"output {name!r} is not available for this model (it has: {', '.join(self.outputs)})")

    def _run_batch(self, sequences: list[Sequence[int]], outputs: Sequence[str]) -> EncodeOutputs:
        batch = self.tokenizer.pad(sequences)
        want_logits = any(self.heads[name].needs_logits for name in outputs)
        dense = self.heads.get("dense")
        in_graph = dense.pooling if isinstance(dense, DenseHead) and tuple(outputs) == ("dense",) else None
        forward = self.backend.forward(batch, want_logits=want_logits, pooling=in_graph)
        if forward.pooled is not None and isinstance(dense, DenseHead):  # pooled inside the backend's graph
            return EncodeOutputs(dense=dense.finish_pooled(forward.pooled))
        if forward.hidden is None:
            raise RuntimeError(f"{type(self.backend).__name__} returned neither hidden states nor pooled vectors")
        hidden = forward.hidden
        inputs = HeadInput(
            hidden=hidden,
            mask=torch.from_numpy(batch.attention_mask).to(hidden.device),
            input_ids=torch.from_numpy(batch.input_ids),
            logits=forward.logits,
        )
        result = EncodeOutputs()
        for name in outputs:
            setattr(result, name, self.heads[name].run(inputs))
        return result

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


def _scatter(result: EncodeOutputs, batch: EncodeOutputs, indices: np.ndarray) -> None:
    if result.dense is not None:
        result.dense[indices] = batch.dense
    for name in ("sparse", "colbert"):
        target = getattr(result, name)
        if target is not None:
            for index, value in zip(indices.tolist(), getattr(batch, name), strict=True):
                target[index] = value


def _min_budget(*budgets: int | None) -> int | None:
    given = [b for b in budgets if b is not None]
    return min(given) if given else None
