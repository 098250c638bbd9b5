"""Baseline for ``benchmarks/server_bench.py``: a plain sentence-transformers model behind a minimal FastAPI route.

What many teams run: one ``model.encode`` per request, no batching across requests. The route is a plain ``def``,
so FastAPI runs each request in its thread pool (the documented way to serve blocking code); ``--async-route``
makes it ``async def`` instead, which serializes requests on the event loop. OpenAI-shaped JSON in and out.

    .venv/bin/python benchmarks/plain_st_server.py MODEL_PATH --host 127.0.0.1 --port 8001
"""

from __future__ import annotations

import argparse
import copy
import threading
from typing import Any

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel


class EmbeddingRequest(BaseModel):
    input: str | list[str]
    model: str = "m"
    encoding_format: str = "float"


def build_app(model_path: str, device: str = "cpu", async_route: bool = False) -> FastAPI:
    """A FastAPI app with ``POST /v1/embeddings`` (each request encoded on its own) and ``GET /health``."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path, device=device)
    # usage is counted on a copy under a lock: a call without padding on the model's own tokenizer, from another
    # thread, would switch padding off under a concurrent encode ("expected sequence of length 15 ... (got 13)")
    counter, counter_lock = copy.deepcopy(model.tokenizer), threading.Lock()
    app = FastAPI()

    def embed(request: EmbeddingRequest) -> dict[str, Any]:
        texts = [request.input] if isinstance(request.input, str) else request.input
        vectors = model.encode(texts, normalize_embeddings=True)
        with counter_lock:
            tokens = sum(
                len(ids) for ids in counter(texts, truncation=True, max_length=model.max_seq_length)["input_ids"]
            )
        return {
            "object": "list",
            "model": request.model,
            "data": [{"object": "embedding", "embedding": v.tolist(), "index": i} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def embed_async(request: EmbeddingRequest) -> dict[str, Any]:
        return embed(request)

    app.post("/v1/embeddings")(embed_async if async_route else embed)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--async-route", action="store_true", help="async def route: requests run one at a time")
    args = parser.parse_args()
    app = build_app(args.model, args.device, args.async_route)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
