"""Model families (the registry) and resolving a model name to its files."""

from tembed.models.registry import DEFAULT_MODEL, REGISTRY, ModelSpec, list_models, lookup
from tembed.models.resolve import ModelNotFoundError, ResolvedModel, resolve_model

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "ModelNotFoundError",
    "ModelSpec",
    "ResolvedModel",
    "list_models",
    "lookup",
    "resolve_model",
]
