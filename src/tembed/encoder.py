"""The one interface every front end encodes through, and the factory that opens one.

An :class:`Encoder` is one model on one device (:class:`tembed.local_encoder.LocalEncoder`) or on several
(:class:`tembed.pool.EmbedderPool`, one worker process per device). The friendly API (:class:`tembed.Embedder`),
the corpus job (:mod:`tembed.jobs.corpus`) and, later, the server and the Ray integration call only this.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from tembed.outputs import EncodeOutputs
    from tembed.settings import EmbedderConfig, EncodeOptions, Settings

DEFAULT_STREAM_BLOCK = 1024
"""Texts read from a stream at a time by :func:`iter_blocks` (a single-device encoder's default block)."""


@runtime_checkable
class Encoder(Protocol):
    """Encodes lists and streams of texts with one model.

    Attributes:
        settings: the effective :class:`~tembed.settings.Settings` (dim, outputs, instructions, lengths...).
    """

    settings: Settings

    def encode(self, texts: Sequence[str], options: EncodeOptions) -> EncodeOutputs:
        """The outputs of ``texts`` in their order, with ``token_counts`` (tokens per text after truncation).

        Raises:
            TypeError / ValueError: a text is not a str or is not valid Unicode (its index is named).
        """
        ...

    def encode_stream(
        self, texts: Iterable[str], options: EncodeOptions, *, block_size: int | None = None
    ) -> Iterator[tuple[np.ndarray, EncodeOutputs]]:
        """Encode an iterable of any size in order, a block at a time: yields ``(positions, outputs)`` per block,
        ``positions`` the int64 input positions of the block. Memory is bounded by the block size."""
        ...

    def close(self) -> None:
        """Release the model (and stop worker processes). Idempotent."""
        ...


def open_encoder(config: EmbedderConfig, device: Any = None, **pool_options: Any) -> Encoder:
    """An encoder for ``config`` on ``device``: one device gives a :class:`~tembed.local_encoder.LocalEncoder`;
    a list of several (``["cuda:0", "cuda:1"]``, ``["cpu", "cpu"]``) a :class:`~tembed.pool.EmbedderPool`
    (``pool_options`` such as ``threads_per_worker`` go to it).
    """
    from tembed.settings import several_devices, single_device

    devices = several_devices(device)
    if devices is not None:
        from tembed.pool import EmbedderPool

        return EmbedderPool(config, devices, **pool_options)
    if pool_options:
        raise TypeError(f"pool options {sorted(pool_options)} need several devices")
    from tembed.local_encoder import LocalEncoder

    return LocalEncoder(config, single_device(device))


def iter_blocks(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    """``texts`` in consecutive lists of ``size`` (the last shorter); each item checked to be a str.

    Raises:
        TypeError: ``texts`` is a single string, or an item is not a str (its position in the stream is named).
    """
    import itertools

    from tembed.types import check_positive

    if isinstance(texts, (str, bytes)):
        raise TypeError("a stream takes an iterable of texts; for one text use encode()")
    check_positive("block_size", size)
    iterator = iter(texts)
    offset = 0
    while True:
        block = list(itertools.islice(iterator, size))
        if not block:
            return
        for index, item in enumerate(block):
            if not isinstance(item, str):
                raise TypeError(f"texts[{offset + index}] must be a str, got {type(item).__name__}: {item!r:.80}")
        offset += len(block)
        yield block
