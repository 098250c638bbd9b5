"""One model on one device: the :class:`~tembed.encoder.Encoder` that every other front end ends up calling.

``LocalEncoder(config, device)`` resolves the settings once (:func:`tembed.settings.resolve_settings`), loads the
tokenizer, the backend and the heads, and encodes with :class:`tembed.pipeline.EncodePipeline`:

    texts -> check -> instruction (by role) -> tokenize (truncate) -> schedule -> forward -> heads -> finish

It is safe to call from many threads at once (the tokenizer and the backends guard their shared state).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from tembed.backends import create_backend
from tembed.backends.base import Backend
from tembed.devices import resolve_device, resolve_dtype
from tembed.encoder import DEFAULT_STREAM_BLOCK, iter_blocks
from tembed.heads import HeadContext, build_heads
from tembed.heads.m3 import ColbertHead
from tembed.models.architecture import ModelFacts, max_positions, read_model_facts
from tembed.models.files import check_model_folder, check_tokenizer_size, read_json_file
from tembed.models.resolve import ResolvedModel, resolve_model
from tembed.outputs import EncodeOutputs
from tembed.pipeline import EncodePipeline
from tembed.settings import EmbedderConfig, EncodeOptions, Settings, clamp_max_length, resolve_settings
from tembed.text import apply_instruction, check_texts
from tembed.tokenize import TextTokenizer
from tembed.types import DeviceLike


class LocalEncoder:
    """One model on one device.

    Args:
        config: what to load and how (:class:`~tembed.settings.EmbedderConfig`).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, an int, or None / ``"auto"`` (the first GPU if
            any, else the CPU).

    Attributes:
        settings: the effective :class:`~tembed.settings.Settings`, with the backend's real precision.
        resolved: the model's files (:class:`~tembed.models.resolve.ResolvedModel`).
        device: the ``torch.device`` the model runs on.
        tokenizer, backend, pipeline: the stages (for inspection and tests).
    """

    def __init__(self, config: EmbedderConfig, device: DeviceLike = None) -> None:
        resolved = resolve_model(config.model, cache_dir=config.cache_dir)
        remote = resolved.trust_remote_code if config.trust_remote_code is None else config.trust_remote_code
        check_model_folder(resolved.path, trust_remote_code=remote, explicit=config.trust_remote_code is not None)
        self.device = resolve_device(device)
        self.tokenizer = TextTokenizer(resolved.path, trust_remote_code=remote)
        facts = _loaded_facts(resolved.path, remote, self.tokenizer)
        planned, self.resolved = resolve_settings(config, str(self.device), resolved, facts)
        model_config = read_json_file(os.path.join(resolved.path, "config.json"))  # valid: resolve_model read it
        check_tokenizer_size(resolved.path, len(self.tokenizer.hf), model_config.get("vocab_size"))
        masked_lm = planned.kind == "splade" and "sparse" in planned.outputs  # SPLADE weights need the LM logits
        self.backend, backend_name = self._build_backend(config, planned, resolved, masked_lm)
        hidden = int(self.backend.hidden_size)
        if config.truncate_dim is not None and config.truncate_dim > hidden:
            self.backend.close()
            raise ValueError(f"truncate_dim={config.truncate_dim} exceeds the model's dimension {hidden}")
        heads = build_heads(self._head_context(planned, backend_name), planned.outputs)
        self.pipeline = EncodePipeline(self.tokenizer, self.backend, heads, dim=config.truncate_dim or hidden)
        colbert = heads.get("colbert")
        self.settings: Settings = planned.replace(
            backend=backend_name,
            effective_precision=self.backend.effective_precision,
            hidden_size=hidden,
            dim=self.pipeline.dim,
            vocab_size=len(self.tokenizer.hf),
            colbert_dim=colbert.dim if isinstance(colbert, ColbertHead) else None,
        )
        self._closed = False

    def _build_backend(
        self, config: EmbedderConfig, planned: Settings, resolved: ResolvedModel, masked_lm: bool
    ) -> tuple[Backend, str]:
        """The backend the settings chose; with ``backend="auto"``, torch (and a warning) if it cannot start."""
        options: dict[str, Any] = dict(
            device=self.device,
            precision=config.precision,
            dtype=resolve_dtype(config.precision, self.device),
            trust_remote_code=planned.trust_remote_code,
            masked_lm=masked_lm,
        )
        try:
            return create_backend(planned.backend, resolved.path, **options), planned.backend
        except (RuntimeError, ImportError) as error:
            if config.backend != "auto" or planned.backend == "torch" or config.precision == "int8":
                raise
            warnings.warn(f"{planned.backend} backend unavailable ({error}); using torch", stacklevel=4)
            return create_backend("torch", resolved.path, **options), "torch"

    def _head_context(self, planned: Settings, backend_name: str) -> HeadContext:
        import torch

        # Head weights run in the model's dtype with torch; exported backends hand float32 hidden states over.
        dtype = resolve_dtype(planned.precision, self.device) if backend_name == "torch" else torch.float32
        return HeadContext(
            path=planned.path,
            kind=planned.kind,
            pooling=planned.pooling,
            normalize=planned.normalize,
            truncate_dim=planned.truncate_dim,
            device=self.device,
            dtype=dtype,
            tokenizer=self.tokenizer,
        )

    # ----------------------------------------------------------------------------------------------- encoding
    def encode(self, texts: Sequence[str], options: EncodeOptions | None = None) -> EncodeOutputs:
        """The outputs of ``texts`` in their order (see :class:`~tembed.outputs.EncodeOutputs`).

        Args:
            texts: a list of strings (a single string is refused: wrap it in a list).
            options: the call's :class:`~tembed.settings.EncodeOptions`; default: plain dense vectors.

        Returns:
            The requested outputs plus ``token_counts``: dense ``(n, dim)`` float32, sparse one
            ``{token_id: weight}`` per text, ColBERT one ``(n_tokens, colbert_dim)`` float32 array per text.

        Raises:
            TypeError / ValueError: a bad text (its index is named), an output this model lacks.
            RuntimeError: the encoder is closed.
        """
        options = options or EncodeOptions()
        if isinstance(texts, str):
            raise TypeError("texts must be a list of str; for one text pass [text]")
        items, _ = check_texts(texts, what="texts")
        if self._closed:
            raise RuntimeError("this encoder is closed")
        self.pipeline.check_outputs(options.outputs)
        instruction, template = self.settings.instruction_for(options)
        settings = self.settings
        return self.pipeline.encode(
            apply_instruction(items, instruction, template),
            max_length=clamp_max_length(settings.max_length_for(options), settings.max_seq_length),
            batch_size=options.batch_size or settings.batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            outputs=options.outputs,
            show_progress_bar=settings.show_progress_bar,
        )

    def encode_stream(
        self, texts: Iterable[str], options: EncodeOptions | None = None, *, block_size: int | None = None
    ) -> Iterator[tuple[np.ndarray, EncodeOutputs]]:
        """Encode an iterable of any size a block at a time (default 1,024 texts); yields ``(positions, outputs)``
        per block, in input order. Only one block is held at a time."""
        start = 0
        for block in iter_blocks(texts, block_size or DEFAULT_STREAM_BLOCK):
            outputs = self.encode(block, options)
            yield np.arange(start, start + len(block), dtype=np.int64), outputs
            start += len(block)

    # ----------------------------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Release the model and its memory. Idempotent."""
        if not self._closed:
            self._closed = True
            self.backend.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def healthy(self) -> bool:
        """True until :meth:`close` (one process: nothing else can stop it)."""
        return not self._closed

    def __enter__(self) -> LocalEncoder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.settings
        return f"LocalEncoder(model={s.model!r}, device={s.device!r}, backend={s.backend!r}, dim={s.dim})"


def _loaded_facts(path: str, trust_remote_code: bool, tokenizer: TextTokenizer) -> ModelFacts:
    """The files' :class:`ModelFacts`, with the token limit as transformers' loaded config gives it: its class
    defaults and renamed keys (GPT-2's ``n_positions``) count, as the model will use them."""
    from transformers import AutoConfig

    facts = read_model_facts(path)
    loaded = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    fields = {name: getattr(loaded, name, None) for name in ("max_position_embeddings", "model_type", "pad_token_id")}
    return dataclasses.replace(facts, max_positions=max_positions(fields, tokenizer.model_max_length))
