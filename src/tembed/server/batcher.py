"""The request batcher: one scheduler thread merges the texts of concurrent requests into encode calls.

Requests are cut into parts of at most one batch budget of tokens when they are submitted, so a 2,048-text
request and a one-sentence request interleave. The scheduler takes the oldest part, adds the parts behind it that
share its :class:`~tembed.settings.EncodeOptions` while the budget allows, skips the parts of requests whose
client has gone, and calls the shared core's ``Encoder.encode`` on the merged texts: the same tokenize -> sort by
length -> cut by the token budget -> forward -> heads path the library uses, on the same model object (or the
worker pool, for several devices). Each part's slice of the outputs goes back to its request, in order.

Faults: an out-of-memory error is first handled by the core (it halves the batch down to one text); if a merged
call still fails with it, the scheduler retries the parts one half at a time, so only the request whose text does
not fit fails. A worker that died (a pool) fails the requests involved and marks the batcher unhealthy; later
submissions fail at once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import numpy as np

from tembed.encoder import Encoder
from tembed.outputs import EncodeOutputs
from tembed.settings import EncodeOptions

logger = logging.getLogger(__name__)


class UnhealthyError(RuntimeError):
    """The encoder can no longer serve (a worker died, or the batcher stopped)."""


@dataclass(eq=False)
class Job:
    """One request's texts on their way through the batcher.

    Attributes:
        future: resolves to the request's :class:`~tembed.outputs.EncodeOutputs`, in its order.
    """

    texts: list[str]
    options: EncodeOptions
    future: Future[EncodeOutputs] = field(default_factory=Future)
    parts_left: int = 0
    outputs: list[EncodeOutputs | None] = field(default_factory=list)

    def cancel(self) -> None:
        """Drop the work not yet started (the client has gone)."""
        self.future.cancel()

    @property
    def dropped(self) -> bool:
        return self.future.done()


@dataclass(eq=False)
class _Part:
    job: Job
    slot: int
    start: int
    stop: int
    tokens: int


@dataclass
class BatchStats:
    """What the scheduler did, for metrics (updated by its thread)."""

    batches: int = 0
    texts: int = 0
    oom_splits: int = 0
    dropped_parts: int = 0


class RequestBatcher:
    """Merges concurrent requests into encode calls on one encoder, off the event loop.

    Args:
        encoder: the shared core's encoder (one device, or a pool for several).
        batch_tokens: the most tokens per encode call (the library's ``max_batch_tokens`` times the workers).
        on_batch: called with ``(texts, tokens)`` after each encode call (metrics).
        on_oom_split: called when a merged call is split after an out-of-memory error (metrics).
    """

    def __init__(
        self,
        encoder: Encoder,
        batch_tokens: int,
        on_batch: Callable[[int, int], None] | None = None,
        on_oom_split: Callable[[], None] | None = None,
    ) -> None:
        self.encoder = encoder
        self.batch_tokens = batch_tokens
        self.stats = BatchStats()
        self._on_batch = on_batch or (lambda texts, tokens: None)
        self._on_oom_split = on_oom_split or (lambda: None)
        self._parts: deque[_Part] = deque()
        self._condition = threading.Condition()
        self._stopping = False
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tembed-batcher", daemon=True)
        self._thread.start()

    # --------------------------------------------------------------------------------------------- callers
    def submit(self, texts: list[str], options: EncodeOptions, token_counts: Sequence[int]) -> Job:
        """Queue a request's texts; ``token_counts`` (per text) decide where it is cut into parts.

        Raises:
            UnhealthyError: the encoder cannot serve any more.
        """
        job = Job(texts=texts, options=options)
        parts = self._cut(job, token_counts)
        job.parts_left = len(parts)
        job.outputs = [None] * len(parts)
        if not parts:
            raise ValueError("a request needs at least one text")
        with self._condition:
            if self._failure is not None or self._stopping:
                raise UnhealthyError(self.why_unhealthy())
            self._parts.extend(parts)
            self._condition.notify()
        return job

    def _cut(self, job: Job, token_counts: Sequence[int]) -> list[_Part]:
        parts: list[_Part] = []
        start, tokens = 0, 0
        for index, count in enumerate(token_counts):
            if index > start and tokens + count > self.batch_tokens:
                parts.append(_Part(job, len(parts), start, index, tokens))
                start, tokens = index, 0
            tokens += count
        if len(job.texts) > start:
            parts.append(_Part(job, len(parts), start, len(job.texts), tokens))
        return parts

    @property
    def healthy(self) -> bool:
        """True while the scheduler runs and the encoder can serve (no dead worker)."""
        if self._failure is not None or not self._thread.is_alive():
            return False
        check = getattr(self.encoder, "healthy", None)
        return bool(check) if check is not None else True

    def why_unhealthy(self) -> str:
        if self._failure is not None:
            return f"the encoder failed and cannot serve: {self._failure}"
        if self._stopping:
            return "the server is shutting down"
        return "a worker of the encoder is not running"

    def close(self, timeout: float | None = None) -> None:
        """Finish the queued work, then stop the scheduler thread."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join(timeout)

    # --------------------------------------------------------------------------------------------- scheduler
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as error:  # a bug here must not leave requests waiting forever
            logger.exception("the batcher stopped")
            with self._condition:
                self._failure = error
                pending, self._parts = list(self._parts), deque()
            for part in pending:
                _fail(part.job, UnhealthyError(f"the batcher stopped: {error}"))

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._parts and not self._stopping:
                    self._condition.wait()
                if not self._parts:
                    return
                batch = self._take()
            if batch:
                self._encode(batch)

    def _take(self) -> list[_Part]:
        """The oldest live part and the parts behind it with the same options, within the token budget."""
        while self._parts and self._parts[0].job.dropped:
            self._parts.popleft()
            self.stats.dropped_parts += 1
        if not self._parts:
            return []
        first = self._parts.popleft()
        batch, tokens, kept = [first], first.tokens, deque[_Part]()
        while self._parts:
            part = self._parts.popleft()
            if part.job.dropped:
                self.stats.dropped_parts += 1
            elif part.job.options == first.job.options and tokens + part.tokens <= self.batch_tokens:
                batch.append(part)
                tokens += part.tokens
            else:
                kept.append(part)
                if tokens + part.tokens > self.batch_tokens and part.job.options == first.job.options:
                    break
        self._parts.extendleft(reversed(kept))
        return batch

    def _encode(self, batch: list[_Part]) -> None:
        from tembed.devices import is_out_of_memory
        from tembed.pipeline import EncodeOutOfMemoryError

        texts = [text for part in batch for text in part.job.texts[part.start : part.stop]]
        try:
            outputs = self.encoder.encode(texts, batch[0].job.options)
        except BaseException as error:
            if isinstance(error, (EncodeOutOfMemoryError, MemoryError)) or is_out_of_memory(error):
                if len(batch) > 1:
                    self.stats.oom_splits += 1
                    self._on_oom_split()
                    half = len(batch) // 2
                    self._encode(batch[:half])
                    self._encode(batch[half:])
                    return
            elif _is_fatal(error):
                self._failure = error
                logger.error("the encoder cannot serve any more: %s", error)
            for part in batch:
                _fail(part.job, error)
            if not isinstance(error, Exception):
                raise
            return
        self.stats.batches += 1
        self.stats.texts += len(texts)
        self._on_batch(len(texts), int(outputs.token_counts.sum()) if outputs.token_counts is not None else 0)
        offset = 0
        for part in batch:
            size = part.stop - part.start
            _deliver(part, outputs.take(np.arange(offset, offset + size)))
            offset += size


def _is_fatal(error: BaseException) -> bool:
    """A dead worker or a closed pool: nothing later can succeed."""
    from tembed.pool.errors import PoolClosedError, WorkerDiedError

    return isinstance(error, (WorkerDiedError, PoolClosedError)) or not isinstance(error, Exception)


def _fail(job: Job, error: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):  # the client went away meanwhile and the future was cancelled
        job.future.set_exception(error)


def _deliver(part: _Part, outputs: EncodeOutputs) -> None:
    job = part.job
    if job.future.done():
        return
    job.outputs[part.slot] = outputs
    job.parts_left -= 1
    if job.parts_left == 0:
        parts = [output for output in job.outputs if output is not None]
        with contextlib.suppress(InvalidStateError):  # cancelled meanwhile (the client went away)
            job.future.set_result(parts[0] if len(parts) == 1 else EncodeOutputs.concatenate(parts))
