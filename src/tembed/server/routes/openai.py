"""OpenAI's routes: ``POST /v1/embeddings`` (and ``/embeddings``), ``GET /v1/models`` (and ``/models``)."""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter, Request

from tembed.server.errors import ApiError
from tembed.server.responses import JsonResponse, b64_floats, check_dimensions, cost_headers, dense_vectors, usage
from tembed.server.routes.common import role_for, service_of
from tembed.server.schemas import OpenAIEmbeddingRequest
from tembed.settings import EncodeOptions

logger = logging.getLogger(__name__)
router = APIRouter()
STARTED = int(time.time())


@router.post("/v1/embeddings")
@router.post("/embeddings")
async def embeddings(body: OpenAIEmbeddingRequest, request: Request) -> JsonResponse:
    """Dense vectors in OpenAI's shape; ``encoding_format`` ``float`` or ``base64`` (little-endian float32),
    ``dimensions`` (truncate, then re-normalize), ``usage`` in the model's tokens."""
    started = time.perf_counter()
    service = service_of(request)
    if body.model is not None and body.model != service.model_name:
        if service.config.strict_model:
            raise ApiError(
                "Validation",
                f"model {body.model!r} is not served here; this server serves {service.model_name!r}",
                param="model",
            )
        logger.debug("request for model %r served by %r", body.model, service.model_name)
    check_dimensions(body.dimensions, service.settings.dim)
    texts = service.texts_of(body.input, "input")
    encoded = await service.encode(
        request, texts, EncodeOptions(role=role_for(body.input_type)), truncate=body.truncate, param="input"
    )
    assert encoded.outputs.dense is not None
    vectors = dense_vectors(encoded.outputs.dense, body.dimensions, normalize=False)
    as_base64 = body.encoding_format == "base64"
    data = [
        {"object": "embedding", "embedding": b64_floats(vector) if as_base64 else vector, "index": index}
        for index, vector in enumerate(vectors)
    ]
    content = {"object": "list", "data": data, "model": service.model_name, "usage": usage(encoded)}
    return JsonResponse(content, headers=cost_headers(encoded, started))


@router.get("/v1/models")
@router.get("/models")
async def models(request: Request) -> JsonResponse:
    """The one served model, in OpenAI's list shape."""
    name = service_of(request).model_name
    return JsonResponse(
        {"object": "list", "data": [{"id": name, "object": "model", "created": STARTED, "owned_by": "tembed"}]}
    )
