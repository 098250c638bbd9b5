"""``FlagAutoModel`` and ``EmbedderModelClass``: FlagEmbedding's factory, choosing a facade class per model."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from enum import Enum
from typing import Any

from tembed.compat.flagembedding._facade import FlagFacade
from tembed.compat.flagembedding.m3 import BGEM3FlagModel
from tembed.compat.flagembedding.models import FlagICLModel, FlagLLMModel, FlagModel
from tembed.models.registry import lookup, registry_key, registry_vouches_for_code

logger = logging.getLogger(__name__)


class EmbedderModelClass(Enum):
    """Mirrors FlagEmbedding's ``EmbedderModelClass``: the ``model_class`` values of ``from_finetuned``."""

    ENCODER_ONLY_BASE = "encoder-only-base"
    ENCODER_ONLY_M3 = "encoder-only-m3"
    DECODER_ONLY_BASE = "decoder-only-base"
    DECODER_ONLY_ICL = "decoder-only-icl"


_CLASS_BY_MODEL_CLASS: dict[EmbedderModelClass, type[FlagFacade]] = {
    EmbedderModelClass.ENCODER_ONLY_BASE: FlagModel,
    EmbedderModelClass.ENCODER_ONLY_M3: BGEM3FlagModel,
    EmbedderModelClass.DECODER_ONLY_BASE: FlagLLMModel,
    EmbedderModelClass.DECODER_ONLY_ICL: FlagICLModel,
}
_CLASS_BY_KIND: dict[str, type[FlagFacade]] = {
    "encoder": FlagModel,
    "m3": BGEM3FlagModel,
    "decoder": FlagLLMModel,
    "icl": FlagICLModel,
}


class FlagAutoModel:
    """Mirrors ``FlagEmbedding.FlagAutoModel``: picks the class, pooling and instruction format from the registry.

    ``FlagAutoModel.from_finetuned("BAAI/bge-base-en-v1.5", query_instruction_for_retrieval=...)``. Unlike
    FlagEmbedding, a model that is not in the registry (a local fine-tune with another folder name) is not an
    error: its class and pooling come from its own files (sentence-transformers config, architecture).
    """

    def __init__(self) -> None:
        raise OSError("FlagAutoModel is designed to be instantiated using `FlagAutoModel.from_finetuned(...)`.")

    @classmethod
    def from_finetuned(
        cls,
        model_name_or_path: str,
        model_class: str | EmbedderModelClass | None = None,
        normalize_embeddings: bool = True,
        use_fp16: bool = True,
        use_bf16: bool = False,
        query_instruction_for_retrieval: str | None = None,
        devices: str | int | Sequence[str | int] | None = None,
        pooling_method: str | None = None,
        trust_remote_code: bool | None = None,
        query_instruction_format: str | None = None,
        truncate_dim: int | None = None,
        **kwargs: Any,
    ) -> FlagFacade:
        """Build the right facade for a model, as ``FlagEmbedding.FlagAutoModel.from_finetuned`` does."""
        if model_class is not None:
            target = _CLASS_BY_MODEL_CLASS[EmbedderModelClass(model_class)]
            pooling_method = pooling_method or target.DEFAULT_POOLING_METHOD
            trust_remote_code = bool(trust_remote_code)
            query_instruction_format = query_instruction_format or "{}{}"
        else:
            spec = lookup(registry_key(model_name_or_path))
            if spec is None:
                from tembed.models.resolve import resolve_model

                spec = resolve_model(model_name_or_path).spec
                logger.info("%s is not in the registry; using its own files: %s", model_name_or_path, spec)
            target = _CLASS_BY_KIND[spec.kind]
            pooling_method = pooling_method or spec.pooling
            if trust_remote_code is None and registry_vouches_for_code(model_name_or_path):
                trust_remote_code = True  # the registry vouches for its exact hub ids only, never a look-alike
            query_instruction_format = query_instruction_format or spec.query_instruction_format
        return target(
            model_name_or_path,
            normalize_embeddings=normalize_embeddings,
            use_fp16=use_fp16,
            use_bf16=use_bf16,
            query_instruction_for_retrieval=query_instruction_for_retrieval,
            query_instruction_format=query_instruction_format,
            devices=devices,
            pooling_method=pooling_method,
            trust_remote_code=trust_remote_code,
            truncate_dim=truncate_dim,
            **kwargs,
        )
