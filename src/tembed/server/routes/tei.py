"""TEI's routes: ``POST /embed`` (and ``POST /``, where ``huggingface_hub``'s ``InferenceClient`` posts),
``POST /embed_sparse``, ``POST /tokenize``, ``POST /decode`` and ``GET /info``."""

from __future__ import annotations

import asyncio
import time
from typing import cast

from fastapi import APIRouter, Request

from tembed.server.errors import ApiError
from tembed.server.responses import JsonResponse, check_dimensions, cost_headers, dense_vectors, sparse_pairs
from tembed.server.routes.common import check_truncation_direction, role_for, service_of
from tembed.server.schemas import DecodeRequest, EmbedRequest, EmbedSparseRequest, TokenizeRequest
from tembed.settings import EncodeOptions
from tembed.text import apply_instruction

router = APIRouter()


@router.post("/embed")
@router.post("/")
async def embed(body: EmbedRequest, request: Request) -> JsonResponse:
    """``[[f32]]``, one vector per input (a single string gives one row too)."""
    started = time.perf_counter()
    service = service_of(request)
    check_truncation_direction(body.truncation_direction)
    check_dimensions(body.dimensions, service.settings.dim)
    if not body.normalize and service.settings.normalize:
        raise ApiError(
            "Validation",
            "this model's configuration normalizes its vectors (a Normalize module), so "
            "normalize: false cannot give raw ones here",
            param="normalize",
        )
    texts = service.texts_of(body.inputs, "inputs")
    options = EncodeOptions(role=role_for(body.input_type, body.prompt_name))
    truncate = True if body.truncate is None else body.truncate
    encoded = await service.encode(request, texts, options, truncate=truncate, param="inputs")
    assert encoded.outputs.dense is not None
    normalize = body.normalize and not service.settings.normalize  # already unit length otherwise
    vectors = dense_vectors(encoded.outputs.dense, body.dimensions, normalize=normalize)
    return JsonResponse(vectors, headers=cost_headers(encoded, started))


@router.post("/embed_sparse")
async def embed_sparse(body: EmbedSparseRequest, request: Request) -> JsonResponse:
    """``[[{"index": token_id, "value": w}]]`` in ascending index order (BGE-M3 and SPLADE models)."""
    started = time.perf_counter()
    service = service_of(request)
    check_truncation_direction(body.truncation_direction)
    texts = service.texts_of(body.inputs, "inputs")
    options = EncodeOptions(role=role_for(body.input_type, body.prompt_name), outputs=("sparse",))
    truncate = True if body.truncate is None else body.truncate
    encoded = await service.encode(request, texts, options, truncate=truncate, param="inputs")
    assert encoded.outputs.sparse is not None
    return JsonResponse(
        [sparse_pairs(vector) for vector in encoded.outputs.sparse], headers=cost_headers(encoded, started)
    )


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> JsonResponse:
    """``[[{"id", "text", "special", "start", "stop"}]]`` per input, untruncated (the role's instruction first when
    ``prompt_name`` is ``query`` / ``passage``)."""
    service = service_of(request)
    texts = service.texts_of(body.inputs, "inputs")
    instruction, template = service.settings.instruction_for(EncodeOptions(role=role_for(None, body.prompt_name)))
    texts = apply_instruction(texts, instruction, template)  # as the encoder applies it

    def run() -> list:
        return [
            [
                {"id": i, "text": piece, "special": special, "start": start, "stop": stop}
                for i, piece, special, start, stop in service.tokenizer.tokens(
                    text, add_special_tokens=body.add_special_tokens
                )
            ]
            for text in texts
        ]

    return JsonResponse(await asyncio.to_thread(run))


@router.post("/decode")
async def decode(body: DecodeRequest, request: Request) -> JsonResponse:
    """``[str]``: the text of each list of token ids."""
    service = service_of(request)
    nested = bool(body.ids) and isinstance(body.ids[0], list)
    sequences = cast("list[list[int]]", body.ids if nested else [body.ids])
    vocab = len(service.tokenizer.hf)
    for index, ids in enumerate(sequences):
        for token in ids:
            if not 0 <= token < vocab:
                raise ApiError(
                    "Validation",
                    f"ids[{index}]: token id {token} is outside the vocabulary (0..{vocab - 1})",
                    param="ids",
                    index=index,
                )
    texts = service.tokenizer.decode(sequences, skip_special_tokens=body.skip_special_tokens)
    return JsonResponse(texts)


@router.get("/info")
async def info(request: Request) -> JsonResponse:
    """TEI's model and limit fields, plus tembed's: outputs, dimensions, vocabulary, the effective settings."""
    service = service_of(request)
    s = service.settings
    config = service.config
    from tembed import __version__

    return JsonResponse(
        {
            "model_id": service.model_name,
            "model_sha": None,
            "model_dtype": s.effective_precision,
            "model_type": {"embedding": {"pooling": s.pooling}},
            "max_concurrent_requests": None,
            "max_input_length": s.max_seq_length,
            "max_batch_tokens": service.batch_tokens,
            "max_batch_requests": None,
            "max_client_batch_size": config.max_client_batch_size,
            "auto_truncate": True,
            "tokenization_workers": None,
            "version": __version__,
            "outputs": list(s.outputs),
            "dense_dim": s.dim if "dense" in s.outputs else None,
            "colbert_dim": s.colbert_dim,
            "vocab_size": s.vocab_size,
            "max_request_tokens": config.max_request_tokens,
            "max_queue_tokens": config.queue_tokens,
            "queue_timeout": config.queue_timeout,
            "payload_limit": config.body_limit,
            "settings": s.as_dict(),
        }
    )
