"""tembed: text embeddings (dense, sparse, ColBERT) for search, RAG, clustering and similarity.

Names are imported on first use (PEP 562), so ``import tembed`` is cheap and does not import torch until a
model is built.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "DEFAULT_MODEL": "tembed.models.registry",
    "Embedder": "tembed.embedder",
    "EmbedderConfig": "tembed.settings",
    "EncodeOptions": "tembed.settings",
    "EncodeOutputs": "tembed.outputs",
    "EncodeOutOfMemoryError": "tembed.pipeline",
    "Encoder": "tembed.encoder",
    "ModelNotFoundError": "tembed.models.resolve",
    "ModelSpec": "tembed.models.registry",
    "Role": "tembed.types",
    "Settings": "tembed.settings",
    "list_models": "tembed.models.registry",
    "open_encoder": "tembed.encoder",
    "quantize": "tembed.quantization",
    "resolve_model": "tembed.models.resolve",
    "resolve_settings": "tembed.settings",
}

if TYPE_CHECKING:
    from tembed.embedder import Embedder
    from tembed.encoder import Encoder, open_encoder
    from tembed.models.registry import DEFAULT_MODEL, ModelSpec, list_models
    from tembed.models.resolve import ModelNotFoundError, resolve_model
    from tembed.outputs import EncodeOutputs
    from tembed.pipeline import EncodeOutOfMemoryError
    from tembed.quantization import quantize
    from tembed.settings import EmbedderConfig, EncodeOptions, Settings, resolve_settings
    from tembed.types import Role


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tembed' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "DEFAULT_MODEL",
    "Embedder",
    "EmbedderConfig",
    "EncodeOptions",
    "EncodeOutOfMemoryError",
    "EncodeOutputs",
    "Encoder",
    "ModelNotFoundError",
    "ModelSpec",
    "Role",
    "Settings",
    "__version__",
    "list_models",
    "open_encoder",
    "quantize",
    "resolve_model",
    "resolve_settings",
]
