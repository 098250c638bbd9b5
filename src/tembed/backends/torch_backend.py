"""The PyTorch backend: a transformers ``AutoModel`` placed on its device once."""

from __future__ import annotations

import contextlib
import gc
import inspect
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from tembed.backends.base import BackendOutput, TokenBatch
from tembed.devices import release_cached_memory

if TYPE_CHECKING:
    from tembed.backends.base import Backend

_PRECISION_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bar (unused MLM heads, missing pooler) during a load."""
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if bar_was_enabled:
            hf_logging.enable_progress_bar()


class TorchBackend:
    """Runs a Hugging Face model with PyTorch.

    Args:
        path: the model folder.
        device: where to run; the weights are moved there once, here.
        dtype: the compute dtype (float32, float16 or bfloat16).
        trust_remote_code: allow the checkpoint's own modelling code.
        masked_lm: load the masked-LM head too (SPLADE); its logits are computed only when asked for.
    """

    def __init__(
        self,
        path: str,
        *,
        device: torch.device,
        dtype: torch.dtype,
        trust_remote_code: bool = False,
        masked_lm: bool = False,
    ) -> None:
        from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

        self.device = device
        self.dtype = dtype
        self.config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        loader = AutoModelForMaskedLM if masked_lm else AutoModel
        with quiet_transformers():
            model = loader.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
        self.model: torch.nn.Module | None = model.to(device).eval()
        # The encoder alone, for calls that need no vocabulary logits.
        self.encoder: torch.nn.Module | None = model.base_model if masked_lm else model
        self.masked_lm = masked_lm
        self.hidden_size = int(getattr(self.config, "hidden_size", 0) or model.get_input_embeddings().embedding_dim)
        self.effective_precision = _PRECISION_NAMES.get(dtype, str(dtype).removeprefix("torch."))
        self._accepts_token_type_ids = "token_type_ids" in forward_parameters(self.encoder)

    @classmethod
    def create(
        cls,
        path: str,
        *,
        device: torch.device,
        precision: str,
        dtype: torch.dtype,
        trust_remote_code: bool,
        masked_lm: bool,
    ) -> Backend:
        """The :class:`tembed.backends.base.BackendFactory` entry point: torch runs ``dtype`` (int8 is refused)."""
        if precision == "int8":
            raise ValueError("precision='int8' needs backend='onnx' (or 'auto')")
        return cls(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code, masked_lm=masked_lm)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def forward(self, batch: TokenBatch, *, want_logits: bool = False, pooling: str | None = None) -> BackendOutput:
        """The last hidden state (and masked-LM logits when asked for and loaded), on the device.

        ``pooling`` is ignored: the pipeline pools the hidden state (on the device, where it already is).
        """
        if self.model is None or self.encoder is None:
            raise RuntimeError("this backend is closed")
        if want_logits and not self.masked_lm:
            raise ValueError("this model was loaded without a masked-LM head: no vocabulary logits")
        inputs = {"input_ids": self._tensor(batch.input_ids), "attention_mask": self._tensor(batch.attention_mask)}
        if batch.token_type_ids is not None and self._accepts_token_type_ids:
            inputs["token_type_ids"] = self._tensor(batch.token_type_ids)
        with torch.inference_mode():
            if want_logits:
                output = self.model(**inputs, output_hidden_states=True, return_dict=True)
                return BackendOutput(hidden=output.hidden_states[-1], logits=output.logits)
            return BackendOutput(hidden=self.encoder(**inputs, return_dict=True).last_hidden_state)

    def close(self) -> None:
        """Drop the model and give its memory back."""
        if self.model is not None:
            self.model = self.encoder = None
            gc.collect()
            release_cached_memory(self.device)


def forward_parameters(model: torch.nn.Module) -> set[str]:
    """The names of a model's ``forward`` parameters (whether it takes ``token_type_ids``, say)."""
    return set(inspect.signature(model.forward).parameters)
