"""The FastAPI app: routes, error shapes, middleware, and the lifetime of the service behind them."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from tembed.encoder import Encoder
from tembed.server.config import ServerConfig
from tembed.server.errors import ApiError, is_openai_route
from tembed.server.metrics import ServerMetrics
from tembed.server.middleware import ApiKeyMiddleware, BodyLimitMiddleware, BodyTooLarge, MetricsMiddleware, too_large
from tembed.server.responses import JsonResponse
from tembed.server.routes import native, openai, ops, tei
from tembed.server.service import ClientGoneError, EmbeddingService

logger = logging.getLogger(__name__)


def create_app(encoder: Encoder, config: ServerConfig | None = None, *, close_encoder: bool = False) -> FastAPI:
    """An app serving ``encoder`` (a :class:`~tembed.local_encoder.LocalEncoder`, or a pool for several devices).

    Args:
        encoder: the shared core's encoder; every route encodes through it.
        config: limits and options (default :class:`~tembed.server.config.ServerConfig`).
        close_encoder: close the encoder when the app shuts down (``tembed serve`` does; a caller that owns the
            encoder keeps it open).
    """
    config = config or ServerConfig()
    metrics = ServerMetrics()
    service = EmbeddingService(encoder, config, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()  # uvicorn has drained the in-flight requests by now
        if close_encoder:
            encoder.close()
            print("tembed serve: requests drained, model closed", file=sys.stderr, flush=True)

    app = FastAPI(
        title="tembed",
        summary="Text embeddings: OpenAI, TEI and native M3 routes",
        lifespan=lifespan,
        **_no_telemetry(),
    )
    app.state.service = service
    for module in (openai, tei, native, ops):
        app.include_router(module.router)
    _add_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit=config.body_limit)
    app.add_middleware(ApiKeyMiddleware, api_key=config.api_key, public=ops.PUBLIC_ROUTES)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def _no_telemetry() -> dict[str, Any]:
    """FastAPI's own OpenTelemetry (recent versions) off: no traces, metrics or logs leave through it, and no
    per-request check of global providers. Older FastAPI versions have no such option."""
    import inspect

    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False, "auto_configure": False}}


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> Response:
        if error.error_type == "Overloaded":
            request.app.state.service.metrics.overloaded.inc()
        return _render(request, error)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> Response:
        return _render(request, _from_validation(error.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        if isinstance(error, BodyTooLarge):
            return _render(request, too_large(error.limit))
        kind = {404: "NotFound", 413: "PayloadTooLarge"}.get(error.status_code, "Validation")
        result = _render(request, ApiError(kind, str(error.detail)))
        if error.status_code not in (404, 413, 422, 400):
            result.status_code = error.status_code  # 405 and the like keep their status
        return result

    @app.exception_handler(ClientGoneError)
    async def client_gone(request: Request, error: ClientGoneError) -> Response:
        return Response(status_code=499)  # nobody reads it; counted as 499 in the metrics


def _render(request: Request, error: ApiError) -> Response:
    openai_shape = is_openai_route(request.url.path)
    return JsonResponse(
        error.body(openai_shape), status_code=error.status(openai_shape), headers=error.response_headers()
    )


def _from_validation(errors: Any) -> ApiError:
    """The first pydantic error as an ApiError naming the field (and the item's index when the error is in a
    list item)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    location = [part for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return ApiError("Validation", f"the body is not valid JSON: {first.get('msg')}", param=None)
    names = [str(part) for part in location if isinstance(part, str)]
    param = names[0] if names else None
    indices = [part for part in location if isinstance(part, int)]
    index = indices[0] if indices and param in ("input", "inputs", "texts", "pairs", "ids") else None
    where = ".".join(str(part) for part in location) or "body"
    if first.get("type") == "missing":
        return ApiError("Validation", f"{where}: field required", param=param)
    return ApiError("Validation", f"{where}: {first.get('msg')}", param=param, index=index)
