"""ASGI middleware, outermost first: request metrics, the API key, the body-size limit.

They are plain ASGI (not Starlette's ``BaseHTTPMiddleware``) so that a route still sees the client's disconnect
and a refused request's body is never read.
"""

from __future__ import annotations

import hmac
import time

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tembed.server.errors import ApiError, is_openai_route
from tembed.server.metrics import ServerMetrics
from tembed.server.responses import JsonResponse

KNOWN_ROUTES = {
    "/v1/embeddings",
    "/embeddings",
    "/v1/models",
    "/models",
    "/embed",
    "/",
    "/embed_sparse",
    "/tokenize",
    "/decode",
    "/info",
    "/health",
    "/ping",
    "/metrics",
    "/encode",
    "/score",
    "/rerank",
}


class BodyTooLarge(HTTPException):
    """A request body beyond the payload limit (raised while the body is read; rendered as JSON 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"the request body is larger than the server's payload limit of {limit} bytes "
            "(--payload-limit); send fewer or shorter inputs per request",
        )
        self.limit = limit


async def send_error(scope: Scope, receive: Receive, send: Send, error: ApiError) -> None:
    """Answer with ``error`` in the route's shape."""
    openai_shape = is_openai_route(scope["path"])
    response = JsonResponse(
        error.body(openai_shape), status_code=error.status(openai_shape), headers=error.response_headers()
    )
    await response(scope, receive, send)


class MetricsMiddleware:
    """Counts requests by route and status and times them (``tembed_requests_total``, ``tembed_request_seconds``)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in KNOWN_ROUTES else "other"
        started = time.perf_counter()
        status = {"code": 499}  # a client that leaves before the answer

        async def send_and_count(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            self.metrics.requests.labels(route=route, status=str(status["code"])).inc()
            self.metrics.request_seconds.labels(route=route).observe(time.perf_counter() - started)


class ApiKeyMiddleware:
    """Every route but the public ones needs ``Authorization: Bearer <key>`` (compared in constant time); else
    401 with ``WWW-Authenticate: Bearer``."""

    def __init__(self, app: ASGIApp, api_key: str | None, public: set[tuple[str, str]]) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.key is None or (scope["method"], scope["path"]) in self.public:
            await self.app(scope, receive, send)
            return
        given = _bearer(scope)
        if given is None or not hmac.compare_digest(given, self.key):
            why = "missing" if given is None else "wrong"
            error = ApiError(
                "Unauthorized",
                f"{why} API key: send the header 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await send_error(scope, receive, send, error)
            return
        await self.app(scope, receive, send)


def _bearer(scope: Scope) -> bytes | None:
    """The token of the one ``Authorization: Bearer <token>`` header; None when missing, not Bearer, or sent
    more than once (two headers would make the check depend on their order)."""
    values = [value for name, value in scope.get("headers", []) if name == b"authorization"]
    if len(values) != 1:
        return None
    scheme, _, token = values[0].partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" and token.strip() else None


class BodyLimitMiddleware:
    """A body beyond ``limit`` bytes gets a JSON 413 stating the limit: at once from ``Content-Length``, or as
    soon as a chunked body passes the limit (the rest is never read)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _content_length(scope)
        if length is not None and length > self.limit:
            await send_error(scope, receive, send, too_large(self.limit, length))
            return
        seen = {"bytes": 0}

        async def limited_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen["bytes"] += len(message.get("body", b""))
                if seen["bytes"] > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited_receive, send)


def too_large(limit: int, length: int | None = None) -> ApiError:
    size = f" ({length} bytes)" if length is not None else ""
    return ApiError(
        "PayloadTooLarge",
        f"the request body{size} is larger than the server's payload limit of "
        f"{limit} bytes (--payload-limit); send fewer or shorter inputs per request",
    )


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
