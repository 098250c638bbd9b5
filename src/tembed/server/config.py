"""The server's limits and options (what ``tembed serve`` takes on its command line)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_CLIENT_BATCH_SIZE = 2048
DEFAULT_MAX_REQUEST_TOKENS = 300_000
"""OpenAI's cap on the tokens of one embeddings request."""
DEFAULT_QUEUE_TIMEOUT = 5.0
DEFAULT_SERVER_BATCH_TOKENS = 16_384
"""The tokens per encode call when the model's settings set no budget (GPUs): TEI's default."""
PAYLOAD_BYTES_PER_TOKEN = 128
"""Body bytes allowed per token of ``max_request_tokens``: room for JSON escapes (a ``\\u`` escape is 6 bytes
a character) and long tokens; 300,000 tokens give 38.4 MB."""
API_KEY_ENV = "TEMBED_API_KEY"


@dataclass(frozen=True)
class ServerConfig:
    """How the server admits, batches and answers requests.

    Attributes:
        served_model_name: the name in responses and ``/v1/models``; None: the model's name.
        api_key: the bearer token every route but ``/health``, ``/ping`` and ``/metrics`` requires; None: open.
        max_client_batch_size: the most inputs in one request (default 2,048; split into batches internally).
        max_request_tokens: the most tokens in one request, after truncation (default 300,000).
        max_queue_tokens: the most tokens admitted and not yet answered; default twice ``max_request_tokens``.
        queue_timeout: seconds a request waits for room before a 429 (default 5).
        payload_limit: the largest request body in bytes; None: ``max_request_tokens x 128`` (38.4 MB).
        strict_model: answer 400 to an OpenAI request whose ``model`` is not the served name (else a warning).
        reject_token_ids: answer 400 to token-id inputs (clients that send another tokenizer's ids).
    """

    served_model_name: str | None = None
    api_key: str | None = None
    max_client_batch_size: int = DEFAULT_MAX_CLIENT_BATCH_SIZE
    max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS
    max_queue_tokens: int | None = None
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT
    payload_limit: int | None = None
    strict_model: bool = False
    reject_token_ids: bool = False

    def __post_init__(self) -> None:
        for name in ("max_client_batch_size", "max_request_tokens", "max_queue_tokens", "payload_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.queue_timeout < 0:
            raise ValueError(f"queue_timeout must be >= 0, got {self.queue_timeout}")
        if self.max_queue_tokens is not None and self.max_queue_tokens < self.max_request_tokens:
            raise ValueError(
                f"max_queue_tokens ({self.max_queue_tokens}) must be at least max_request_tokens "
                f"({self.max_request_tokens}), or the largest allowed request could never be admitted"
            )
        if self.api_key == "":
            raise ValueError("api_key is empty; leave it unset for an open server")

    @property
    def queue_tokens(self) -> int:
        """The effective ``max_queue_tokens``."""
        return self.max_queue_tokens or 2 * self.max_request_tokens

    @property
    def body_limit(self) -> int:
        """The effective ``payload_limit`` in bytes."""
        return self.payload_limit or self.max_request_tokens * PAYLOAD_BYTES_PER_TOKEN
