"""Facts about an input before it is read: its format, its identity for ``--resume``, its size for a progress bar."""

from __future__ import annotations

import hashlib
import os

from tembed.io.records import InputError

__all__ = ["FORMATS", "STDIN", "count_items", "detect_format", "fingerprint"]

FORMATS: tuple[str, ...] = ("jsonl", "csv", "tsv", "parquet", "txt")
"""The input formats a :class:`~tembed.io.readers.Reader` reads."""
STDIN = "-"
"""The path that means standard input."""

_SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "txt",
    ".text": "txt",
}
_FINGERPRINT_BYTES = 1 << 20
_COUNT_BLOCK_BYTES = 1 << 22


def detect_format(path: str, fmt: str | None = None) -> str:
    """Returns the input format, one of :data:`FORMATS`: ``fmt`` if given, else from the file suffix; stdin
    defaults to ``"jsonl"``. Raises :class:`InputError` for an unknown ``fmt`` or suffix."""
    if fmt is not None:
        if fmt not in FORMATS:
            raise InputError(f"unknown input format {fmt!r}: use one of {', '.join(FORMATS)}")
        return fmt
    if path == STDIN:
        return "jsonl"
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in _SUFFIXES:
        raise InputError(
            f"{path}: cannot tell the format from the suffix {suffix or '(none)'!r}; "
            f"use .jsonl, .csv, .tsv, .parquet or .txt, or pass --format"
        )
    return _SUFFIXES[suffix]


def fingerprint(path: str) -> dict[str, str | int]:
    """What identifies an input file for ``--resume``. Returns ``{"path": absolute path, "size": bytes,
    "mtime_ns": int, "head_sha256": hex sha-256 of the first MiB}``."""
    stat = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        digest.update(handle.read(_FINGERPRINT_BYTES))
    return {
        "path": os.path.abspath(path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "head_sha256": digest.hexdigest(),
    }


def count_items(path: str, fmt: str) -> int | None:
    """Returns a cheap upper bound on the records in a file, for a progress bar's total: its lines (less the
    header for csv / tsv), or its rows for parquet; None for stdin, which cannot be counted ahead."""
    if path == STDIN:
        return None
    if fmt == "parquet":
        import pyarrow.parquet as pq

        rows: int = pq.ParquetFile(path).metadata.num_rows
        return rows
    lines = 0
    last = b"\n"
    with open(path, "rb") as handle:
        while block := handle.read(_COUNT_BLOCK_BYTES):
            lines += block.count(b"\n")
            last = block[-1:]
    lines += last != b"\n"
    return lines - 1 if fmt in ("csv", "tsv") else lines
