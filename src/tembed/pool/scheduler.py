"""One call's work: blocks of input cut into length-sorted chunks, and chunk outputs merged back in input order.

A call reads its input a block at a time (the whole list for :meth:`EmbedderPool.encode`, ``block_size`` texts
for :meth:`EmbedderPool.encode_stream`). Each block is sorted by length, longest first, and cut into chunks of
similar length, so that a worker's forward passes pad little; the outputs of a block's chunks are merged back
into the block's input order with :meth:`EncodeOutputs.concatenate` and :meth:`EncodeOutputs.take`.
:class:`PoolStats` counts the chunks a pool sends and receives.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from tembed.outputs import EncodeOutputs

DEFAULT_CHUNK_SIZE = 256
"""Texts per worker task. Small enough to balance load and bound memory, large enough that IPC is noise."""
MIN_CHUNK_SIZE = 16
CHUNKS_PER_WORKER_SMALL_INPUT = 4
"""A small input is cut into about this many chunks per worker, so all workers share it evenly."""
BLOCKS_HELD = 2
"""The most blocks a call holds at once: one being merged, one being worked on."""


@dataclass
class PoolStats:
    """A pool's traffic since it started (or since :meth:`reset`).

    Attributes:
        chunks_sent: chunks sent to workers.
        chunks_received: chunk outputs received for the call that sent them (late answers of an abandoned call
            are not counted).
        max_outstanding: the most chunks sent and not yet answered at once, over all workers (at most
            ``max_pending_chunks``).
    """

    chunks_sent: int = 0
    chunks_received: int = 0
    max_outstanding: int = 0

    def reset(self) -> None:
        self.chunks_sent = self.chunks_received = self.max_outstanding = 0


def plan_chunks(texts: list[str], chunk_size: int, workers: int) -> list[np.ndarray]:
    """The positions of each chunk: texts sorted by length in characters (longest first), cut into runs.

    A small input is cut into chunks smaller than ``chunk_size`` (at least :data:`MIN_CHUNK_SIZE`), so that every
    worker gets a share. An empty input gives one empty chunk: it still goes to a worker, for the outputs' shape.
    """
    n = len(texts)
    if n == 0:
        return [np.zeros(0, dtype=np.int64)]
    size = min(chunk_size, max(MIN_CHUNK_SIZE, math.ceil(n / (CHUNKS_PER_WORKER_SMALL_INPUT * workers))))
    lengths = np.fromiter((len(text) for text in texts), dtype=np.int64, count=n)
    order = np.argsort(-lengths, kind="stable")
    return [order[i : i + size] for i in range(0, n, size)]


def merge_chunks(parts: list[tuple[np.ndarray, EncodeOutputs]], n: int) -> EncodeOutputs:
    """The outputs of ``n`` texts in input order, from ``(positions, outputs)`` of chunks that cover them."""
    if len(parts) == 1 and len(parts[0][0]) == n and np.array_equal(parts[0][0], np.arange(n)):
        return parts[0][1]
    joined = EncodeOutputs.concatenate([outputs for _, outputs in parts])
    inverse = np.argsort(np.concatenate([positions for positions, _ in parts]), kind="stable")
    return joined.take(inverse)


@dataclass
class Block:
    """A run of consecutive input texts; its chunk outputs until all are in."""

    start: int
    size: int
    remaining: int = 0
    parts: list[tuple[np.ndarray, EncodeOutputs]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.remaining == 0


@dataclass
class Chunk:
    """Texts of one block, at ``positions`` in it, to be sent to a worker as one task."""

    block: Block
    positions: np.ndarray
    texts: list[str]


class Schedule:
    """The state of one call: blocks read lazily, chunks to send and in flight, finished blocks in order.

    Args:
        blocks: the input, a list of texts at a time.
        chunk_size: the most texts per chunk.
        workers: the number of workers (small blocks are cut so that each gets a share).
    """

    def __init__(self, blocks: Iterator[list[str]], chunk_size: int, workers: int) -> None:
        self._blocks = blocks
        self._chunk_size = chunk_size
        self._workers = workers
        self._position = 0
        self._source_done = False
        self._pending: deque[Block] = deque()
        self._to_send: deque[Chunk] = deque()
        self._in_flight: dict[int, Chunk] = {}

    @property
    def finished(self) -> bool:
        """Everything was read, answered and handed out."""
        return self._source_done and not self._pending

    def read_block(self) -> bool:
        """Read the next block, only when the workers would otherwise run dry and fewer than two are held.

        Returns:
            whether a block was read (its chunks are then ready to send).
        """
        if self._to_send or self._source_done or len(self._pending) >= BLOCKS_HELD:
            return False
        try:
            texts = next(self._blocks)
        except StopIteration:
            self._source_done = True
            return False
        block = Block(self._position, len(texts))
        self._position += len(texts)
        for positions in plan_chunks(texts, self._chunk_size, self._workers):
            self._to_send.append(Chunk(block, positions, [texts[i] for i in positions]))
            block.remaining += 1
        self._pending.append(block)
        return True

    def has_chunk(self) -> bool:
        return bool(self._to_send)

    def next_chunk(self) -> Chunk:
        """The next chunk to send (call :meth:`sent` once it is sent)."""
        return self._to_send[0]

    def sent(self, chunk_id: int) -> None:
        """The chunk from :meth:`next_chunk` went out as ``chunk_id``."""
        self._in_flight[chunk_id] = self._to_send.popleft()

    def received(self, chunk_id: int, outputs: EncodeOutputs) -> int:
        """Store the outputs of chunk ``chunk_id``; returns its number of texts."""
        chunk = self._in_flight.pop(chunk_id)
        chunk.block.parts.append((chunk.positions, outputs))
        chunk.block.remaining -= 1
        return len(chunk.positions)

    def pop_complete(self) -> tuple[int, int, EncodeOutputs] | None:
        """``(start, size, outputs)`` of the first held block once all its chunks are in (merged in input order,
        and released); else None."""
        if not self._pending or not self._pending[0].complete:
            return None
        block = self._pending.popleft()
        outputs = merge_chunks(block.parts, block.size)
        block.parts = []
        return block.start, block.size, outputs
