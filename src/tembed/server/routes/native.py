"""tembed's own routes: ``POST /encode`` (dense, sparse and ColBERT from one forward pass), ``POST /score``
(FlagEmbedding's ``compute_score`` modes) and ``POST /rerank`` (TEI's shape, scored by the M3 hybrid score, or
the dense cosine for a dense-only model)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Request

from tembed.outputs import EncodeOutputs
from tembed.scoring import colbert_score, combine_scores, lexical_score
from tembed.server.errors import ApiError
from tembed.server.responses import (
    JsonResponse,
    b64_floats,
    check_dimensions,
    colbert_value,
    cost_headers,
    dense_vectors,
    sparse_arrays,
    usage,
)
from tembed.server.routes.common import check_truncation_direction, role_for, service_of
from tembed.server.schemas import EncodeRequest, RerankRequest, ScoreRequest
from tembed.server.service import EmbeddingService, Encoded
from tembed.settings import EncodeOptions
from tembed.types import Role

router = APIRouter()


@router.post("/encode")
async def encode(body: EncodeRequest, request: Request) -> JsonResponse:
    """Any of dense, sparse and ColBERT per input, in input order (see ``docs/server.md``)."""
    started = time.perf_counter()
    service = service_of(request)
    check_truncation_direction(body.truncation_direction)
    check_dimensions(body.dimensions, service.settings.dim)
    if not body.outputs:
        raise ApiError("Validation", "outputs: ask for at least one of dense, sparse, colbert", param="outputs")
    texts = service.texts_of(body.inputs, "inputs")
    outputs = tuple(dict.fromkeys(body.outputs))
    if body.max_length is not None and body.max_length < 1:
        raise ApiError("Validation", f"max_length must be >= 1, got {body.max_length}", param="max_length")
    options = EncodeOptions(role=role_for(body.input_type), max_length=body.max_length, outputs=outputs)
    encoded = await service.encode(request, texts, options, truncate=body.truncate, param="inputs")
    data = _encode_items(service, encoded.outputs, body)
    content = {"object": "list", "model": service.model_name, "data": data, "usage": usage(encoded)}
    return JsonResponse(content, headers=cost_headers(encoded, started))


def _encode_items(service: EmbeddingService, outputs: EncodeOutputs, body: EncodeRequest) -> list[dict[str, Any]]:
    as_base64 = body.encoding_format == "base64"
    dense = None if outputs.dense is None else dense_vectors(outputs.dense, body.dimensions, normalize=False)
    items: list[dict[str, Any]] = []
    for index in range(len(outputs)):
        item: dict[str, Any] = {"index": index}
        if dense is not None:
            item["dense"] = b64_floats(dense[index]) if as_base64 else dense[index]
        if outputs.sparse is not None:
            item["sparse"] = sparse_arrays(outputs.sparse[index])
            if body.return_tokens:
                ids = item["sparse"]["indices"]
                item["sparse"]["tokens"] = service.tokenizer.hf.convert_ids_to_tokens(ids)
        if outputs.colbert is not None:
            item["colbert"] = colbert_value(outputs.colbert[index], body.encoding_format)
        items.append(item)
    return items


@router.post("/score")
async def score(body: ScoreRequest, request: Request) -> JsonResponse:
    """Dense, sparse, ColBERT and the mixed modes per (query, passage) pair, as FlagEmbedding's
    ``BGEM3FlagModel.compute_score`` gives them (no instruction; ``max_query_length`` / ``max_passage_length``
    default to the model's query / passage lengths). A model without some output gets only the modes it has."""
    service = service_of(request)
    queries, passages = _score_sides(body)
    names = ("query", "texts") if body.query is not None else ("pairs", "pairs")
    settings = service.settings
    sides = _Sides(
        queries=service.texts_of(queries, names[0]),
        passages=service.texts_of(passages, names[1]),
        params=names,
        roles=(Role.PLAIN, Role.PLAIN),
        lengths=(
            _length(body.max_query_length, settings.query_max_length, "max_query_length"),
            _length(body.max_passage_length, settings.passage_max_length, "max_passage_length"),
        ),
    )
    q_encoded, p_encoded = await _both_sides(service, request, sides)
    table = _scores(q_encoded.outputs, p_encoded.outputs, len(sides.passages), body.weights)
    data = [
        {"index": index, **{mode: float(values[index]) for mode, values in table.items()}}
        for index in range(len(sides.passages))
    ]
    return JsonResponse(
        {"object": "list", "model": service.model_name, "data": data, "usage": _usage_sum(q_encoded, p_encoded)}
    )


def _length(value: int | None, default: int, name: str) -> int:
    if value is None:
        return default
    if value < 1:
        raise ApiError("Validation", f"{name} must be >= 1, got {value}", param=name)
    return value


def _score_sides(body: ScoreRequest) -> tuple[list[str], list[str]]:
    if body.pairs is not None:
        if body.query is not None or body.texts is not None:
            raise ApiError("Validation", "send either pairs or query with texts, not both", param="pairs")
        if not body.pairs:
            raise ApiError("Empty", "`pairs` cannot be empty", param="pairs")
        return [pair[0] for pair in body.pairs], [pair[1] for pair in body.pairs]
    if body.query is None or body.texts is None:
        raise ApiError("Validation", "send pairs, or a query with texts", param="pairs")
    if not body.texts:
        raise ApiError("Empty", "`texts` cannot be empty", param="texts")
    return [body.query], list(body.texts)


@dataclass
class _Sides:
    """The two sides of a scoring request: texts, the field each came from, roles and max lengths."""

    queries: list[str]
    passages: list[str]
    params: tuple[str, str]
    roles: tuple[Role, Role]
    lengths: tuple[int | None, int | None]
    truncate: bool = True


async def _both_sides(service: EmbeddingService, request: Request, sides: _Sides) -> tuple[Encoded, Encoded]:
    """Both sides encoded with every output the model has; the request's tokens (both sides) are checked
    against ``max_request_tokens`` together."""
    outputs = tuple(name for name in ("dense", "sparse", "colbert") if name in service.settings.outputs)
    prepared = [
        await service.prepare(
            texts, EncodeOptions(role=role, max_length=length, outputs=outputs), truncate=sides.truncate, param=param
        )
        for texts, role, length, param in zip(
            (sides.queries, sides.passages), sides.roles, sides.lengths, sides.params, strict=True
        )
    ]
    service.check_request_tokens(*prepared)
    q_encoded, p_encoded = await asyncio.gather(*(service.run(request, part) for part in prepared))
    return q_encoded, p_encoded


def _scores(queries: EncodeOutputs, passages: EncodeOutputs, count: int, weights: Any) -> dict[str, np.ndarray]:
    """Per-pair scores; one query is paired with every passage."""
    rows = [0] * count if len(queries) == 1 else list(range(count))
    table: dict[str, np.ndarray] = {}
    if queries.dense is not None and passages.dense is not None:
        table["dense"] = np.asarray(np.sum(queries.dense[rows] * passages.dense, axis=1, dtype=np.float64))
    if queries.sparse is not None and passages.sparse is not None:
        table["sparse"] = np.array(
            [lexical_score(queries.sparse[r], p) for r, p in zip(rows, passages.sparse, strict=True)]
        )
    if queries.colbert is not None and passages.colbert is not None:
        table["colbert"] = np.array(
            [colbert_score(queries.colbert[r], p) for r, p in zip(rows, passages.colbert, strict=True)]
        )
    if len(table) == 3:
        try:
            table = combine_scores(table["dense"], table["sparse"], table["colbert"], weights)
        except ValueError as error:
            raise ApiError("Validation", str(error), param="weights") from None
    return table


def _usage_sum(*sides: Encoded) -> dict[str, int]:
    tokens = sum(side.tokens for side in sides)
    return {"prompt_tokens": tokens, "total_tokens": tokens}


@router.post("/rerank")
async def rerank(body: RerankRequest, request: Request) -> JsonResponse:
    """TEI's ``[{"index", "score", "text"?}]``, best first: the query encoded as a query (its instruction), the
    texts as passages; scored by ``colbert+sparse+dense`` with ``weights`` for a model with all three outputs,
    else by the dense cosine (or the sparse score for a sparse-only model). ``raw_scores`` changes nothing (the
    scores are never squashed)."""
    service = service_of(request)
    sides = _Sides(
        queries=service.texts_of([body.query], "query"),
        passages=service.texts_of(body.texts, "texts"),
        params=("query", "texts"),
        roles=(Role.QUERY, Role.PASSAGE),
        lengths=(None, None),
        truncate=True if body.truncate is None else body.truncate,
    )
    q_encoded, p_encoded = await _both_sides(service, request, sides)
    texts = sides.passages
    table = _scores(q_encoded.outputs, p_encoded.outputs, len(texts), body.weights or (1.0, 1.0, 1.0))
    mode = next(m for m in ("colbert+sparse+dense", "dense", "sparse") if m in table)
    order = np.argsort(-table[mode], kind="stable")
    results = [
        {"index": int(i), "score": float(table[mode][i]), **({"text": texts[i]} if body.return_text else {})}
        for i in order
    ]
    return JsonResponse(results)
