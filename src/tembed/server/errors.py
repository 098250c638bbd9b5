"""The server's one error type and its two wire shapes (OpenAI's and TEI's), chosen by the route.

* ``/v1/*`` and ``/embeddings``: ``{"error": {"message", "type", "param", "code"}}`` (what the ``openai`` client
  reads into ``BadRequestError.param`` / ``.code``); validation failures are 400 there, as OpenAI answers them.
* TEI and native routes: ``{"error": message, "error_type": "Validation" | "Empty" | ..., "param", "index"}``;
  validation failures are 422, as TEI answers them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# error_type -> (TEI / native status, OpenAI status, OpenAI error type)
_STATUS: dict[str, tuple[int, int, str]] = {
    "Validation": (422, 400, "invalid_request_error"),
    "Empty": (400, 400, "invalid_request_error"),
    "Unauthorized": (401, 401, "authentication_error"),
    "NotFound": (404, 404, "invalid_request_error"),
    "PayloadTooLarge": (413, 413, "invalid_request_error"),
    "Overloaded": (429, 429, "rate_limit_error"),
    "Backend": (424, 500, "server_error"),
    "Unhealthy": (503, 503, "server_error"),
}


@dataclass
class ApiError(Exception):
    """A request the server refuses or cannot serve.

    Attributes:
        error_type: one of ``Validation``, ``Empty``, ``Unauthorized``, ``NotFound``, ``PayloadTooLarge``,
            ``Overloaded``, ``Backend``, ``Unhealthy`` (TEI's names, plus tembed's).
        message: what went wrong and, where it helps, what to do.
        param: the request field at fault (``"input"``, ``"dimensions"``...), or None.
        index: the index of the bad item in the input list, or None.
        headers: extra response headers (``Retry-After``, ``WWW-Authenticate``).
    """

    error_type: str
    message: str
    param: str | None = None
    index: int | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)
        if self.error_type not in _STATUS:
            raise ValueError(f"unknown error type {self.error_type!r}")

    def status(self, openai_shape: bool) -> int:
        """The HTTP status on an OpenAI route (``openai_shape``) or a TEI / native one."""
        tei, openai, _ = _STATUS[self.error_type]
        return openai if openai_shape else tei

    def body(self, openai_shape: bool) -> dict[str, Any]:
        """The JSON body in the route's shape."""
        if openai_shape:
            code = self.error_type.lower() if self.index is None else f"{self.error_type.lower()}_at_index_{self.index}"
            return {
                "error": {
                    "message": self.message,
                    "type": _STATUS[self.error_type][2],
                    "param": self.param,
                    "code": code,
                }
            }
        return {"error": self.message, "error_type": self.error_type, "param": self.param, "index": self.index}

    def response_headers(self) -> dict[str, str]:
        """``headers`` plus ``x-should-retry: false`` for a 4xx other than 429 (clients should not retry those)."""
        headers = dict(self.headers)
        if self.error_type not in ("Overloaded", "Backend", "Unhealthy"):
            headers.setdefault("x-should-retry", "false")
        return headers


def is_openai_route(path: str) -> bool:
    """True for the routes that answer in OpenAI's shapes."""
    return path.startswith("/v1/") or path in ("/embeddings", "/models")


def item_error(param: str, index: int | None, message: str, *, error_type: str = "Validation") -> ApiError:
    """An ApiError about ``param[index]`` whose message starts with that location."""
    where = param if index is None else f"{param}[{index}]"
    return ApiError(error_type, f"{where}: {message}", param=param, index=index)
