"""Admission counted in tokens: a request holds its tokens from admission until its answer is computed.

Past ``max_queue_tokens`` in flight a request waits, in arrival order, up to ``queue_timeout`` seconds, then is
refused (429 with ``Retry-After``). The tokens of waiting requests are capped at ``max_queue_tokens`` too, so the
memory held by admitted and waiting requests together never exceeds twice the budget, whatever the load.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable

from tembed.server.errors import ApiError


class TokenGate:
    """A token budget shared by the requests of one event loop.

    Args:
        max_tokens: the most tokens admitted and not yet answered.
        queue_timeout: how long a request may wait for room, in seconds.
        on_change: called with the tokens in flight after every change (a metrics gauge).
    """

    def __init__(self, max_tokens: int, queue_timeout: float, on_change: Callable[[int], None] | None = None) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_queue_tokens must be >= 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self.queue_timeout = queue_timeout
        self.in_flight = 0
        self.waiting = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._on_change = on_change or (lambda tokens: None)

    @property
    def retry_after(self) -> int:
        """Seconds a refused client should wait before retrying (at least 1)."""
        return max(1, math.ceil(self.queue_timeout))

    async def acquire(self, tokens: int) -> None:
        """Admit ``tokens``, waiting up to ``queue_timeout``.

        Raises:
            ApiError: ``Overloaded`` (429, ``Retry-After``) after the wait, or at once when the waiting line is full;
                ``Validation`` when one request needs more than the whole budget.
        """
        if tokens > self.max_tokens:
            raise ApiError(
                "Validation",
                f"the request has {tokens} tokens, more than the server's whole queue "
                f"budget of {self.max_tokens} tokens (--max-queue-tokens); send fewer or shorter inputs",
                param="input",
            )
        if not self._waiters and self.in_flight + tokens <= self.max_tokens:
            self._admit(tokens)
            return
        if self.waiting + tokens > self.max_tokens:
            raise self._overloaded("the waiting line is full")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (tokens, future)
        self._waiters.append(entry)
        self.waiting += tokens
        try:
            await asyncio.wait_for(asyncio.shield(future), self.queue_timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError) as error:
            if future.done() and not future.cancelled():  # admitted at the last moment: give the tokens back
                self.release(tokens)
            else:
                future.cancel()
                self._remove(entry)
            if isinstance(error, asyncio.CancelledError):
                raise
            raise self._overloaded(f"no room within {self.queue_timeout:g} s") from None

    def release(self, tokens: int) -> None:
        """Give back the tokens of an answered (or abandoned) request and admit waiters that now fit."""
        self.in_flight -= tokens
        while self._waiters and self.in_flight + self._waiters[0][0] <= self.max_tokens:
            tokens_waiting, future = self._waiters.popleft()
            self.waiting -= tokens_waiting
            if not future.done():
                future.set_result(None)
                self.in_flight += tokens_waiting
        self._on_change(self.in_flight)

    def _admit(self, tokens: int) -> None:
        self.in_flight += tokens
        self._on_change(self.in_flight)

    def _remove(self, entry: tuple[int, asyncio.Future[None]]) -> None:
        try:
            self._waiters.remove(entry)
            self.waiting -= entry[0]
        except ValueError:
            pass
        self.release(0)  # a waiter behind this one may fit now

    def _overloaded(self, why: str) -> ApiError:
        return ApiError(
            "Overloaded",
            f"the model is overloaded ({why}; {self.in_flight} of {self.max_tokens} tokens in flight); "
            f"retry after {self.retry_after} s",
            headers={"Retry-After": str(self.retry_after)},
        )
