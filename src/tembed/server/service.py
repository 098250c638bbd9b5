"""From a request's inputs to the core's outputs: validation, token counting, admission, the batcher, and the
wait for the answer (dropping the work of a client that has gone).

Routes call :meth:`EmbeddingService.encode`; every error comes out as an :class:`~tembed.server.errors.ApiError`
that names the field and the index of the bad item.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from tembed.encoder import Encoder
from tembed.outputs import EncodeOutputs
from tembed.server.admission import TokenGate
from tembed.server.batcher import RequestBatcher, UnhealthyError
from tembed.server.config import DEFAULT_SERVER_BATCH_TOKENS, ServerConfig
from tembed.server.errors import ApiError, item_error
from tembed.server.metrics import ServerMetrics
from tembed.settings import EncodeOptions, Settings, clamp_max_length
from tembed.text import apply_instruction, check_encodable
from tembed.tokenize import TextTokenizer

logger = logging.getLogger(__name__)

Inputs = str | list[str] | list[int] | list[list[int]]
INLINE_TOKENIZE_CHARS = 8192
"""Inputs up to this many characters are tokenized on the event loop (well under a millisecond); longer ones
in a thread, so the loop keeps serving."""


class ClientGoneError(Exception):
    """The client disconnected before its answer was ready; its work was dropped."""


@dataclass
class Encoded:
    """A request's outputs, with what its texts cost."""

    outputs: EncodeOutputs
    tokens: int
    truncated: int


@dataclass
class Counted:
    """A request's texts with their token counts after truncation."""

    counts: list[int]
    truncated: int

    @property
    def total(self) -> int:
        return sum(self.counts)


@dataclass
class Prepared:
    """Texts ready for admission: their options (max length clamped) and token counts."""

    texts: list[str]
    options: EncodeOptions
    counted: Counted
    param: str


class EmbeddingService:
    """The model behind the routes: one encoder, its tokenizer, the token gate and the batcher.

    Args:
        encoder: the shared core's encoder (a :class:`~tembed.local_encoder.LocalEncoder` or a pool).
        config: the server's limits.
        metrics: where counts go.
    """

    def __init__(self, encoder: Encoder, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.encoder = encoder
        self.config = config
        self.metrics = metrics
        self.settings: Settings = encoder.settings
        tokenizer = getattr(encoder, "tokenizer", None)
        self.tokenizer = tokenizer if isinstance(tokenizer, TextTokenizer) else self._load_tokenizer()
        self.model_name = config.served_model_name or self.settings.model
        workers = len(getattr(encoder, "devices", [None]))
        self.batch_tokens = (self.settings.max_batch_tokens or DEFAULT_SERVER_BATCH_TOKENS) * workers
        self.gate = TokenGate(config.queue_tokens, config.queue_timeout, metrics.queue_tokens.set)
        self.batcher = RequestBatcher(
            encoder, self.batch_tokens, on_batch=metrics.observe_batch, on_oom_split=metrics.oom_splits.inc
        )

    def _load_tokenizer(self) -> TextTokenizer:
        return TextTokenizer(self.settings.path, trust_remote_code=self.settings.trust_remote_code)

    @property
    def healthy(self) -> bool:
        return self.batcher.healthy

    def close(self) -> None:
        """Finish queued work and stop the batcher (the encoder is closed by its owner)."""
        self.batcher.close()

    # ------------------------------------------------------------------------------------------------ inputs
    def texts_of(self, inputs: Inputs, param: str) -> list[str]:
        """The texts of a request's ``inputs``: a string, a list of strings, token ids or lists of token ids
        (this model's tokenizer; decoded, then encoded again as text, as TEI does).

        Raises:
            ApiError: empty input, too many inputs, a bad text or a token id outside the vocabulary.
        """
        items: list[Any] = [inputs] if isinstance(inputs, str) else list(inputs)
        if items and all(isinstance(item, int) for item in items):
            items = [items]
        if not items:
            raise ApiError("Empty", f"`{param}` cannot be empty", param=param)
        limit = self.config.max_client_batch_size
        if len(items) > limit:
            raise ApiError(
                "Validation",
                f"`{param}` has {len(items)} items, more than the server's limit of {limit} "
                "(--max-client-batch-size); split the request",
                param=param,
            )
        if isinstance(items[0], list):
            return self._decode_ids(items, param)
        for index, text in enumerate(items):
            if not isinstance(text, str):
                raise item_error(param, index, "mix of text and token ids; send all texts or all token lists")
            if not text:
                raise item_error(param, index, "empty text", error_type="Empty")
            try:
                check_encodable(text, f"{param}[{index}]")
            except ValueError as error:
                raise ApiError("Validation", str(error), param=param, index=index) from None
        return items

    def _decode_ids(self, sequences: list[Any], param: str) -> list[str]:
        if self.config.reject_token_ids:
            raise ApiError(
                "Validation",
                "this server does not take token-id inputs (--reject-token-ids); send text. "
                "LangChain's OpenAIEmbeddings sends tiktoken ids unless check_embedding_ctx_length=False",
                param=param,
            )
        vocab = self.settings.vocab_size or len(self.tokenizer.hf)
        for index, ids in enumerate(sequences):
            if not isinstance(ids, list) or not ids:
                raise item_error(param, index, "a token-id input must be a non-empty list of ints", error_type="Empty")
            for position, token in enumerate(ids):
                if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab:
                    raise item_error(
                        param,
                        index,
                        f"token id {token!r} at position {position} is outside this "
                        f"model's vocabulary (0..{vocab - 1}); token ids must come from its tokenizer",
                    )
        texts = self.tokenizer.decode(sequences)
        for index, text in enumerate(texts):
            if not text.strip():
                raise item_error(
                    param,
                    index,
                    "the token ids decode to an empty text (special tokens are dropped)",
                    error_type="Empty",
                )
        return texts

    # ------------------------------------------------------------------------------------------------ encode
    async def encode(
        self,
        request: Request,
        texts: list[str],
        options: EncodeOptions,
        *,
        truncate: bool = True,
        param: str = "input",
    ) -> Encoded:
        """The outputs of ``texts`` (already checked by :meth:`texts_of`) under ``options``, merged with other
        requests' texts by the batcher: :meth:`prepare`, :meth:`check_request_tokens`, then :meth:`run`.

        Raises:
            ApiError: an output the model lacks, a text too long with ``truncate=False``, too many tokens, no room
                in the queue in time (429), a dead worker (503), a failed forward pass.
            ClientGoneError: the client disconnected; its queued work was dropped.
        """
        prepared = await self.prepare(texts, options, truncate=truncate, param=param)
        self.check_request_tokens(prepared)
        return await self.run(request, prepared)

    async def prepare(
        self, texts: list[str], options: EncodeOptions, *, truncate: bool = True, param: str = "input"
    ) -> Prepared:
        """Check the outputs and count the tokens of ``texts`` as the model will see them (a long input is
        tokenized off the event loop)."""
        if not self.healthy:
            raise self._unhealthy()
        for name in options.outputs:
            if name not in self.settings.outputs:
                raise ApiError(
                    "Validation",
                    f"output {name!r} is not available for this model (it has: {', '.join(self.settings.outputs)})",
                    param="outputs",
                )
        limit = clamp_max_length(self.settings.max_length_for(options), self.settings.max_seq_length, warn=False)
        options = EncodeOptions(role=options.role, max_length=limit, outputs=options.outputs)
        if sum(len(text) for text in texts) <= INLINE_TOKENIZE_CHARS:
            counted = self.count_tokens(texts, options, limit, truncate, param)
        else:
            counted = await asyncio.to_thread(self.count_tokens, texts, options, limit, truncate, param)
        return Prepared(texts=texts, options=options, counted=counted, param=param)

    def check_request_tokens(self, *parts: Prepared) -> None:
        """Raise a Validation ApiError when the parts of one request hold more than ``max_request_tokens``."""
        total = sum(part.counted.total for part in parts)
        if total > self.config.max_request_tokens:
            raise ApiError(
                "Validation",
                f"the request has {total} tokens, more than the limit of "
                f"{self.config.max_request_tokens} (--max-request-tokens); split it",
                param=max(parts, key=lambda part: part.counted.total).param,  # the side that holds the most
            )

    async def run(self, request: Request, prepared: Prepared) -> Encoded:
        """Admit the prepared texts' tokens (or 429), queue them with the batcher and wait for their outputs."""
        counted = prepared.counted
        self.metrics.truncated.inc(counted.truncated)
        await self.gate.acquire(counted.total)
        try:
            job = self.batcher.submit(prepared.texts, prepared.options, counted.counts)
        except UnhealthyError:
            self.gate.release(counted.total)
            raise self._unhealthy() from None
        try:
            outputs = await _wait(request, job.future, job.cancel)
            return Encoded(outputs=outputs, tokens=counted.total, truncated=counted.truncated)
        except ClientGoneError:
            self.metrics.dropped.inc()
            raise
        except Exception as error:
            raise self._failed(error) from error
        finally:
            self.gate.release(counted.total)

    def count_tokens(
        self, texts: Sequence[str], options: EncodeOptions, limit: int, truncate: bool, param: str
    ) -> Counted:
        """Tokens per text as the model will see them (instruction and special tokens, after truncation)."""
        instruction, template = self.settings.instruction_for(options)
        counts = self.tokenizer.lengths(apply_instruction(list(texts), instruction, template))
        long = [index for index, count in enumerate(counts) if count > limit]
        if long and not truncate:
            raise item_error(
                param,
                long[0],
                f"has more than {limit} tokens, this model's limit for it, and "
                "truncate is false; shorten it or send truncate: true",
            )
        return Counted(counts=[min(count, limit) for count in counts], truncated=len(long))

    def _unhealthy(self) -> ApiError:
        return ApiError(
            "Unhealthy", f"the model cannot serve: {self.batcher.why_unhealthy()}", headers={"Retry-After": "5"}
        )

    def _failed(self, error: Exception) -> ApiError:
        from tembed.pool.errors import PoolClosedError, WorkerDiedError

        if isinstance(error, ApiError):
            return error
        if isinstance(error, (UnhealthyError, WorkerDiedError, PoolClosedError)):
            return ApiError("Unhealthy", f"the model cannot serve: {error}", headers={"Retry-After": "5"})
        logger.error("encoding failed: %s: %s", type(error).__name__, error)
        return ApiError("Backend", f"encoding failed: {type(error).__name__}: {error}")


async def _wait(request: Request, future: Any, cancel: Any) -> Any:
    """The result of a concurrent.futures ``future``; if the client disconnects first, ``cancel()`` and raise
    :class:`ClientGoneError`."""
    result = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        cancel()
        raise
    finally:
        gone.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await gone
    if result in done:
        return result.result()
    cancel()
    result.cancel()
    raise ClientGoneError()


async def _disconnected(request: Request) -> None:
    """Return when the client has disconnected (the request body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
