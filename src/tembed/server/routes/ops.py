"""The public operational routes (never behind the API key): ``GET /health``, ``/ping``, ``/`` and
``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from tembed.server.responses import JsonResponse
from tembed.server.routes.common import service_of

router = APIRouter()
PUBLIC_ROUTES = {(method, path) for method in ("GET", "HEAD") for path in ("/health", "/ping", "/", "/metrics")}


@router.api_route("/health", methods=["GET", "HEAD"])
@router.api_route("/ping", methods=["GET", "HEAD"])
@router.api_route("/", methods=["GET", "HEAD"])
async def health(request: Request) -> JsonResponse:
    """200 ``{"status": "ok"}`` while the model can serve; 503 (``Retry-After``) once a worker died or the server
    is shutting down."""
    service = service_of(request)
    if service.healthy:
        return JsonResponse({"status": "ok"})
    return JsonResponse(
        {"status": "unhealthy", "error": service.batcher.why_unhealthy(), "error_type": "Unhealthy"},
        status_code=503,
        headers={"Retry-After": "5"},
    )


@router.api_route("/metrics", methods=["GET", "HEAD"])
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    registry = service_of(request).metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
