"""Turning the core's outputs into response bodies: dense truncation, base64, sparse and ColBERT forms, and a
fast JSON encoder (orjson: numpy float32 arrays are written as the shortest decimal that reads back as the same
float32)."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson
from starlette.responses import Response

from tembed.server.errors import ApiError
from tembed.server.service import Encoded


class JsonResponse(Response):
    """JSON written by orjson, numpy arrays included."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def check_dimensions(dimensions: int | None, dim: int) -> None:
    """Raise a Validation ApiError naming ``dimensions`` unless it is None or in ``1..dim``."""
    if dimensions is not None and not 1 <= dimensions <= dim:
        raise ApiError(
            "Validation", f"dimensions must be between 1 and this model's {dim}, got {dimensions}", param="dimensions"
        )


def dense_vectors(dense: np.ndarray, dimensions: int | None, normalize: bool) -> np.ndarray:
    """``(n, d)`` float32: the first ``dimensions`` columns re-normalized to unit length (as FlagEmbedding's
    ``truncate_dim`` and TEI do), or all of them; L2-normalized when ``normalize``."""
    vectors = np.asarray(dense, dtype=np.float32)
    if dimensions is not None and dimensions < vectors.shape[1]:
        vectors = vectors[:, :dimensions]
        normalize = True
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, np.float32(1e-12))
    return np.ascontiguousarray(vectors, dtype=np.float32)


def b64_floats(array: np.ndarray) -> str:
    """Standard base64 (with padding) of the little-endian float32 bytes of ``array``, row-major."""
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode("ascii")


def sparse_pairs(vector: Mapping[int, float]) -> list[dict[str, Any]]:
    """TEI's sparse form: ``[{"index": token_id, "value": w}]`` in ascending index order."""
    return [{"index": int(token), "value": float(vector[token])} for token in sorted(vector)]


def sparse_arrays(vector: Mapping[int, float]) -> dict[str, list]:
    """tembed's sparse form: ``{"indices": [...], "values": [...]}``, indices ascending."""
    indices = sorted(vector)
    return {"indices": [int(i) for i in indices], "values": [float(vector[i]) for i in indices]}


def colbert_value(matrix: np.ndarray, encoding_format: str) -> Any:
    """A ColBERT matrix as rows of floats, or ``{"shape": [rows, dim], "data": base64}``."""
    if encoding_format == "base64":
        return {"shape": list(matrix.shape), "data": b64_floats(matrix)}
    return np.ascontiguousarray(matrix, dtype=np.float32)


def usage(encoded: Encoded) -> dict[str, int]:
    """OpenAI's usage block, in the model's real tokens."""
    return {"prompt_tokens": encoded.tokens, "total_tokens": encoded.tokens}


def cost_headers(encoded: Encoded, started: float) -> dict[str, str]:
    """TEI-style headers: tokens computed, inputs truncated, total time in ms."""
    import time

    return {
        "x-compute-tokens": str(encoded.tokens),
        "x-truncated-inputs": str(encoded.truncated),
        "x-total-time": str(round((time.perf_counter() - started) * 1000)),
    }
