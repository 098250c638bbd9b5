"""tembed: text embeddings (dense, sparse, ColBERT) for search, RAG, clustering and similarity."""

from tembed.embedder import Embedder
from tembed.models import DEFAULT_MODEL, ModelNotFoundError, ModelSpec, list_models, resolve_model
from tembed.pipeline import EncodeOutOfMemoryError

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "Embedder",
    "EncodeOutOfMemoryError",
    "ModelNotFoundError",
    "ModelSpec",
    "__version__",
    "list_models",
    "resolve_model",
]
