"""``tembed serve``: an HTTP server over the shared core, with OpenAI, TEI and native M3 routes.

* :func:`create_app` builds the FastAPI app for an encoder; :class:`ServerConfig` holds its limits;
* requests are admitted by tokens (:mod:`.admission`), merged into encode calls by one scheduler thread
  (:mod:`.batcher`) and answered in each protocol's shapes (:mod:`.routes`). See ``docs/server.md``.

Needs the ``server`` extra (``pip install "tembed[server]"``): fastapi, uvicorn, prometheus-client, orjson.
Importing this package imports none of them until :func:`create_app` is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tembed.server.config import ServerConfig

if TYPE_CHECKING:
    from tembed.server.app import create_app

__all__ = ["ServerConfig", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from tembed.server.app import create_app

        return create_app
    raise AttributeError(f"module 'tembed.server' has no attribute {name!r}")
