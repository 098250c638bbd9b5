"""Output quantization: float embeddings to int8 / uint8 scalar codes or packed binary, and back for rescoring.

The arithmetic is sentence-transformers' ``quantize_embeddings`` exactly (the same dtypes, the same bits), so
vectors quantized by tembed and by sentence-transformers can share one index:

* ``int8`` / ``uint8``: per dimension, the range ``[min, max]`` is cut into 255 steps
  (``step = (max - min) / 255``, a zero step counts as 1); a value's code is ``floor((x - min) / step)`` clipped to
  ``[0, 255]``, minus 128 for ``int8``. The ranges, a ``(2, dim)`` float32 array (row 0 the minima, row 1 the
  maxima), come from ``ranges``, else from ``calibration`` embeddings, else from the embeddings themselves;
* ``binary`` / ``ubinary``: one bit per dimension (``x > 0``), packed 8 to a byte (big-endian bit order, the last
  byte padded with zeros): ``ceil(dim / 8)`` bytes, as uint8 (``ubinary``) or minus 128 as int8 (``binary``).

Usage::

    from tembed.quantization import quantize, quantization_ranges, dequantize

    ranges = quantization_ranges(corpus_vectors)                     # (2, dim) float32
    codes = quantize(corpus_vectors, "int8", ranges=ranges)          # (n, dim) int8
    approx = dequantize(codes, "int8", ranges=ranges)                # (n, dim) float32, bucket centres
    bits = quantize(corpus_vectors, "ubinary")                       # (n, ceil(dim / 8)) uint8

A corpus too large for memory is calibrated a block at a time with :func:`update_ranges`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "PRECISIONS",
    "DenseQuantization",
    "bytes_per_vector",
    "dequantize",
    "load_ranges",
    "quantization_ranges",
    "quantize",
    "update_ranges",
]

PRECISIONS = ("int8", "uint8", "binary", "ubinary")
"""The quantized precisions (``"float32"`` is also accepted by :func:`quantize`, as a pass-through)."""

_SCALAR = ("int8", "uint8")
_BINARY = ("binary", "ubinary")


def _check_precision(precision: str, allowed: tuple[str, ...] = ("float32", *PRECISIONS)) -> None:
    if precision not in allowed:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(allowed)}")


def _check_floats(array: np.ndarray, what: str) -> None:
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{what} must be floating point to be quantized, not {array.dtype}")
    if array.ndim not in (1, 2):
        raise ValueError(f"{what} must be one vector (dim,) or a matrix (n, dim), not of shape {array.shape}")


def _checked_ranges(ranges: np.ndarray, dim: int) -> np.ndarray:
    """``ranges`` as float32, or ValueError unless its shape is ``(2, dim)``."""
    ranges = np.asarray(ranges)
    if ranges.shape != (2, dim):
        raise ValueError(f"ranges must have shape (2, {dim}) (minima and maxima per dimension), not {ranges.shape}")
    return ranges.astype(np.float32, copy=False)


def _starts_and_steps(ranges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    starts = ranges[0, :]
    steps = (ranges[1, :] - starts) / 255
    return starts, np.where(steps == 0, 1, steps)


def quantization_ranges(embeddings: np.ndarray) -> np.ndarray:
    """Per-dimension minima and maxima of ``embeddings`` (``(n, dim)`` floats, n >= 1): a ``(2, dim)`` float32
    array, row 0 the minima and row 1 the maxima: the ``ranges`` of :func:`quantize`."""
    embeddings = np.asarray(embeddings)
    _check_floats(embeddings, "embeddings")
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"ranges need a non-empty matrix (n, dim) of embeddings, not of shape {embeddings.shape}")
    return np.vstack((np.min(embeddings, axis=0), np.max(embeddings, axis=0))).astype(np.float32, copy=False)


def update_ranges(ranges: np.ndarray | None, block: np.ndarray) -> np.ndarray:
    """Merge the minima and maxima of ``block`` (``(n, dim)`` floats) into ``ranges`` (``(2, dim)``, or None for
    the first block) and return the merged ``(2, dim)`` float32 array (a new one; ``ranges`` is not changed).

    Calibrating block by block gives exactly :func:`quantization_ranges` of all the blocks stacked. An empty block
    leaves ``ranges`` as they are (ValueError when there are none yet)."""
    block = np.asarray(block)
    if block.ndim == 2 and block.shape[0] == 0:
        if ranges is None:
            raise ValueError("an empty block has no ranges: calibrate on at least one embedding")
        return _checked_ranges(ranges, block.shape[1])
    found = quantization_ranges(block)
    if ranges is None:
        return found
    ranges = _checked_ranges(ranges, found.shape[1])
    return np.vstack((np.minimum(ranges[0], found[0]), np.maximum(ranges[1], found[1])))


def quantize(
    embeddings: np.ndarray,
    precision: str,
    *,
    ranges: np.ndarray | None = None,
    calibration: np.ndarray | None = None,
) -> np.ndarray:
    """Quantize float embeddings, bit for bit like sentence-transformers'
    ``quantize_embeddings(embeddings, precision, ranges=ranges, calibration_embeddings=calibration)``.

    Args:
        embeddings: ``(n, dim)`` or ``(dim,)`` floating-point vectors (any float dtype; integers are refused).
        precision: ``"int8"``, ``"uint8"``, ``"binary"``, ``"ubinary"`` (see the module docstring), or
            ``"float32"`` (a float32 copy).
        ranges: int8 / uint8 only: ``(2, dim)`` per-dimension minima and maxima (cast to float32). Default None:
            from ``calibration``, else from ``embeddings`` (which then must hold more than one vector).
        calibration: int8 / uint8 only, when ``ranges`` is None: ``(m, dim)`` representative embeddings whose
            minima and maxima are the ranges. Default None.

    Returns:
        int8 / uint8: ``(n, dim)`` (or ``(dim,)``) of dtype int8 / uint8; binary / ubinary: ``(n, ceil(dim / 8))``
        of int8 / uint8; float32: ``(n, dim)`` float32.

    Raises:
        ValueError: an unknown precision, integer (or non-1-D / 2-D) embeddings, ranges of the wrong shape,
            calibration embeddings of another dimension, or int8 / uint8 ranges to infer from a single embedding.
    """
    _check_precision(precision)
    embeddings = np.asarray(embeddings)
    _check_floats(embeddings, "embeddings")
    dim = embeddings.shape[-1]
    if embeddings.ndim == 2 and embeddings.shape[0] == 0:
        if precision in _SCALAR:
            return np.zeros((0, dim), dtype=np.int8 if precision == "int8" else np.uint8)
        if precision in _BINARY:
            return np.zeros((0, (dim + 7) // 8), dtype=np.int8 if precision == "binary" else np.uint8)
    if precision == "float32":
        return embeddings.astype(np.float32)
    if precision == "binary":
        return (np.packbits(embeddings > 0, axis=-1) - 128).astype(np.int8)
    if precision == "ubinary":
        return np.packbits(embeddings > 0, axis=-1)
    if ranges is None:
        ranges = _ranges_to_use(embeddings, precision, calibration)
    starts, steps = _starts_and_steps(_checked_ranges(ranges, dim))
    codes = np.clip(np.floor((embeddings - starts) / steps), 0, 255)
    if precision == "uint8":
        return codes.astype(np.uint8)
    return (codes - 128).astype(np.int8)


def _ranges_to_use(embeddings: np.ndarray, precision: str, calibration: np.ndarray | None) -> np.ndarray:
    """The ranges int8 / uint8 quantization infers: from the calibration embeddings, else from the embeddings."""
    if calibration is None:
        if embeddings.ndim == 1 or embeddings.shape[0] == 1:
            raise ValueError(
                f"cannot compute {precision} quantization ranges from a single embedding: pass ranges or "
                "calibration embeddings from a representative set of embeddings"
            )
        calibration = embeddings
    calibration = np.asarray(calibration)
    _check_floats(calibration, "calibration embeddings")
    if calibration.ndim != 2 or calibration.shape[-1] != embeddings.shape[-1]:
        raise ValueError(
            f"calibration embeddings of shape {calibration.shape} do not match embeddings of dimension "
            f"{embeddings.shape[-1]}: pass a matrix (m, {embeddings.shape[-1]})"
        )
    return np.vstack((np.min(calibration, axis=0), np.max(calibration, axis=0)))


def dequantize(
    codes: np.ndarray, precision: str, ranges: np.ndarray | None = None, dim: int | None = None
) -> np.ndarray:
    """Approximate float vectors from codes made by :func:`quantize`, as float32 (what a rescoring step uses).

    Args:
        codes: ``(n, width)`` or ``(width,)`` codes of ``precision`` (int8 / uint8).
        precision: one of :data:`PRECISIONS`.
        ranges: int8 / uint8: the ``(2, dim)`` ranges the codes were made with (required).
        dim: binary / ubinary: the vectors' dimension (required: the packed bytes are padded to a multiple of 8);
            int8 / uint8: optional, checked against ``codes``. Default None.

    Returns:
        int8 / uint8: ``(n, dim)`` float32, each code's bucket centre ``start + (code + 0.5) * step`` (code in
        0..255, i.e. plus 128 for int8; ``start``, ``step`` as in :func:`quantize`): within half a step of the
        original value when that value lay inside the ranges. binary / ubinary: ``(n, dim)`` float32 of the bits,
        1.0 where the original value was > 0 and 0.0 elsewhere.

    Raises:
        ValueError: an unknown precision, codes of the wrong dtype, missing or mis-shaped ranges, a missing dim.
    """
    _check_precision(precision, PRECISIONS)
    codes = np.asarray(codes)
    signed = precision in ("int8", "binary")
    if codes.dtype != (np.int8 if signed else np.uint8):
        raise ValueError(f"{precision} codes must be of dtype {'int8' if signed else 'uint8'}, not {codes.dtype}")
    unsigned = (codes.astype(np.int16) + 128).astype(np.uint8) if signed else codes
    if precision in _BINARY:
        if dim is None or not 0 < dim <= 8 * codes.shape[-1]:
            width = codes.shape[-1]
            raise ValueError(
                f"dequantizing {precision} codes of width {width} needs their dim (1 to {8 * width}), not {dim}"
            )
        return np.unpackbits(unsigned, axis=-1)[..., :dim].astype(np.float32)
    if ranges is None:
        raise ValueError(f"dequantizing {precision} codes needs the ranges they were made with")
    if dim is not None and dim != codes.shape[-1]:
        raise ValueError(f"{precision} codes of width {codes.shape[-1]} do not have dim {dim}")
    starts, steps = _starts_and_steps(_checked_ranges(ranges, codes.shape[-1]))
    return (starts + (unsigned.astype(np.float32) + np.float32(0.5)) * steps).astype(np.float32, copy=False)


def bytes_per_vector(precision: str, dim: int) -> int:
    """The bytes one ``dim``-dimensional vector takes at ``precision``: float32 ``4 * dim``, int8 / uint8 ``dim``,
    binary / ubinary ``ceil(dim / 8)`` (e.g. 1536 / 384 / 48 for 384 dimensions)."""
    _check_precision(precision)
    if precision == "float32":
        return 4 * dim
    return dim if precision in _SCALAR else math.ceil(dim / 8)


def load_ranges(path: str) -> np.ndarray:
    """Read quantization ranges from a ``.npy`` file: a ``(2, dim)`` array of finite numbers, row 0 the minima and
    row 1 the maxima (each minimum <= its maximum), returned as float32; ValueError naming the problem if not."""
    try:
        ranges = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(f"{path}: cannot read quantization ranges: {error}") from None
    if not isinstance(ranges, np.ndarray) or ranges.ndim != 2 or ranges.shape[0] != 2:
        shape = getattr(ranges, "shape", None)
        raise ValueError(f"{path}: quantization ranges must be an array of shape (2, dim), not {shape}")
    if not (np.issubdtype(ranges.dtype, np.floating) or np.issubdtype(ranges.dtype, np.integer)):
        raise ValueError(f"{path}: quantization ranges must be numbers, not {ranges.dtype}")
    ranges = ranges.astype(np.float32)
    if not np.isfinite(ranges).all():
        raise ValueError(f"{path}: quantization ranges must be finite")
    if (ranges[0] > ranges[1]).any():
        raise ValueError(f"{path}: quantization ranges: row 0 (the minima) exceeds row 1 (the maxima)")
    return ranges


@dataclass(frozen=True, eq=False)
class DenseQuantization:
    """How a corpus job stores its dense vectors: quantized at ``precision`` in the column ``dense_<precision>``.

    Attributes:
        precision: one of :data:`PRECISIONS`.
        ranges: int8 / uint8: ``(2, dim)`` float32 ranges to use (e.g. from :func:`load_ranges`); default None:
            calibrated on the whole corpus (exact per-dimension minima and maxima). Not used for binary.
        ranges_file: where ``ranges`` were read from, recorded in the output's metadata. Default None.
    """

    precision: str
    ranges: np.ndarray | None = None
    ranges_file: str | None = None

    def __post_init__(self) -> None:
        _check_precision(self.precision, PRECISIONS)
        if self.ranges is not None and self.precision in _BINARY:
            raise ValueError(f"{self.precision} quantization takes no ranges (they are for int8 and uint8)")

    @property
    def column(self) -> str:
        """The output column: ``dense_int8``, ``dense_uint8``, ``dense_binary`` or ``dense_ubinary``."""
        return f"dense_{self.precision}"

    @property
    def calibrated(self) -> bool:
        """Whether the ranges are to be computed from the corpus (int8 / uint8 without ranges)."""
        return self.precision in _SCALAR and self.ranges is None

    def check(self, dim: int) -> None:
        """ValueError unless the ranges (if any) fit vectors of ``dim`` dimensions."""
        if self.ranges is not None and self.ranges.shape != (2, dim):
            where = f"{self.ranges_file}: " if self.ranges_file else ""
            shape = self.ranges.shape
            raise ValueError(
                f"{where}quantization ranges of shape {shape} do not fit {dim} dimensions: expected (2, {dim})"
            )

    def metadata(self, dim: int, ranges: np.ndarray | None) -> dict[str, Any]:
        """The ``"quantization"`` entry of the output's metadata: ``{"precision", "dim", "ranges", "calibration"}``
        with ``ranges`` (those used, None for binary or an empty corpus) as ``[[minima], [maxima]]`` and
        ``calibration`` ``"corpus"``, the ranges file's path (``"given"`` for ranges passed without one), or None
        for binary."""
        calibration = None
        if self.precision in _SCALAR:
            calibration = "corpus" if self.ranges is None else self.ranges_file or "given"
        listed = None if ranges is None else np.asarray(ranges, dtype=np.float32).tolist()
        return {"precision": self.precision, "dim": dim, "ranges": listed, "calibration": calibration}
