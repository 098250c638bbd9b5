"""``tembed serve [MODEL]``: the HTTP server (:mod:`tembed.server`) on uvicorn.

The model is loaded once (one device, or a worker pool for ``--device cpu,cpu`` / ``cuda:0,cuda:1``), then
uvicorn serves the app. SIGTERM and Ctrl-C stop accepting connections, let the requests in flight finish, stop the
batcher and the workers, and exit.
"""

from __future__ import annotations

from typing import Annotated

import typer

from tembed.cli.common import DEVICE_HELP, MODEL_HELP, TRUST_REMOTE_CODE_HELP, parse_device
from tembed.models.registry import DEFAULT_MODEL
from tembed.server.config import (
    API_KEY_ENV,
    DEFAULT_MAX_CLIENT_BATCH_SIZE,
    DEFAULT_MAX_REQUEST_TOKENS,
    DEFAULT_QUEUE_TIMEOUT,
    PAYLOAD_BYTES_PER_TOKEN,
)

Model = Annotated[str, typer.Argument(help=MODEL_HELP + " Default: the bundled all-MiniLM-L6-v2.")]
Host = Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0 for every interface).")]
Port = Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on.")]
Device = Annotated[
    str | None,
    typer.Option(
        "--device",
        help=DEVICE_HELP + " (default: the first GPU, else cpu); several devices "
        "put the worker pool behind the batcher.",
    ),
]
Precision = Annotated[str, typer.Option("--precision", help="auto, fp32, fp16, bf16 or int8 (CPU).")]
Backend = Annotated[
    str, typer.Option("--backend", help="auto (OpenVINO on CPU for encoders, else torch), torch, onnx or openvino.")
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar=API_KEY_ENV,
        help="Require 'Authorization: Bearer <key>' on every route but "
        "/health, /ping and /metrics. Default: none (open).",
        show_envvar=True,
    ),
]
ServedName = Annotated[
    str | None,
    typer.Option("--served-model-name", help="The model name in responses and /v1/models (default: MODEL as given)."),
]
MaxBatchTokens = Annotated[
    int | None,
    typer.Option(
        "--max-batch-tokens",
        min=1,
        help="Padded tokens per forward pass, as in the library (default: 4096 on the CPU, 16384 per GPU).",
    ),
]
MaxClientBatch = Annotated[
    int,
    typer.Option(
        "--max-client-batch-size",
        min=1,
        help="Most inputs in one request; larger requests are split into batches internally.",
    ),
]
MaxRequestTokens = Annotated[
    int, typer.Option("--max-request-tokens", min=1, help="Most tokens in one request, after truncation.")
]
PayloadLimit = Annotated[
    int | None,
    typer.Option(
        "--payload-limit",
        min=1,
        help="Largest request body in bytes (default: "
        f"--max-request-tokens x {PAYLOAD_BYTES_PER_TOKEN}, 38.4 MB); larger bodies get 413.",
    ),
]
MaxQueueTokens = Annotated[
    int | None,
    typer.Option(
        "--max-queue-tokens",
        min=1,
        help="Most tokens admitted and not yet answered (default: "
        "2 x --max-request-tokens); beyond it requests wait --queue-timeout, then get 429.",
    ),
]
QueueTimeout = Annotated[
    float,
    typer.Option("--queue-timeout", min=0.0, help="Seconds a request waits for room before a 429 with Retry-After."),
]
StrictModel = Annotated[
    bool,
    typer.Option(
        "--strict-model", help="Answer 400 to an OpenAI request naming another model (default: served anyway)."
    ),
]
RejectTokenIds = Annotated[
    bool,
    typer.Option(
        "--reject-token-ids",
        help="Answer 400 to token-id inputs (for clients that send another "
        "tokenizer's ids, such as LangChain's default tiktoken ids).",
    ),
]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help=TRUST_REMOTE_CODE_HELP)]
LogLevel = Annotated[str, typer.Option("--log-level", help="uvicorn's log level: warning, info, debug...")]


def serve_command(
    model: Model = DEFAULT_MODEL,
    host: Host = "127.0.0.1",
    port: Port = 8080,
    device: Device = None,
    precision: Precision = "auto",
    backend: Backend = "auto",
    api_key: ApiKey = None,
    served_model_name: ServedName = None,
    max_batch_tokens: MaxBatchTokens = None,
    max_client_batch_size: MaxClientBatch = DEFAULT_MAX_CLIENT_BATCH_SIZE,
    max_request_tokens: MaxRequestTokens = DEFAULT_MAX_REQUEST_TOKENS,
    payload_limit: PayloadLimit = None,
    max_queue_tokens: MaxQueueTokens = None,
    queue_timeout: QueueTimeout = DEFAULT_QUEUE_TIMEOUT,
    strict_model: StrictModel = False,
    reject_token_ids: RejectTokenIds = False,
    trust_remote_code: TrustRemoteCode = False,
    log_level: LogLevel = "warning",
) -> None:
    """Serve a model over HTTP: OpenAI /v1/embeddings, TEI /embed, /embed_sparse, and /encode, /score, /rerank."""
    from tembed.server.config import ServerConfig
    from tembed.settings import EmbedderConfig

    try:
        server_config = ServerConfig(
            served_model_name=served_model_name or model,
            api_key=api_key,
            max_client_batch_size=max_client_batch_size,
            max_request_tokens=max_request_tokens,
            max_queue_tokens=max_queue_tokens,
            queue_timeout=queue_timeout,
            payload_limit=payload_limit,
            strict_model=strict_model,
            reject_token_ids=reject_token_ids,
        )
        config = EmbedderConfig(
            model=model,
            backend=backend,
            precision=precision,
            max_batch_tokens=max_batch_tokens,
            show_progress_bar=False,
            trust_remote_code=trust_remote_code or None,
        )
    except (TypeError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    run_server(config, server_config, parse_device(device), host, port, log_level)


def run_server(config: object, server_config: object, device: object, host: str, port: int, log_level: str) -> None:
    """Load the model, then serve until SIGTERM / Ctrl-C (uvicorn drains the requests in flight first)."""
    import uvicorn

    from tembed.encoder import open_encoder
    from tembed.server import create_app

    encoder = open_encoder(config, device)  # type: ignore[arg-type]
    try:
        app = create_app(encoder, server_config, close_encoder=True)  # type: ignore[arg-type]
        s = encoder.settings
        typer.echo(
            f"tembed serve: {s.model} on {s.device} ({s.backend}, {s.effective_precision}, outputs "
            f"{', '.join(s.outputs)}) at http://{host}:{port}",
            err=True,
        )
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=60)
    finally:
        encoder.close()
