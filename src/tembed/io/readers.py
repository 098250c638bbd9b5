"""Streaming corpus readers: ``.jsonl``, ``.csv``, ``.tsv``, ``.parquet``, ``.txt`` and stdin.

A reader yields, lazily and in file order, one :class:`Record` per usable text and one :class:`Rejected` per bad
one (invalid JSON, invalid UTF-8, a missing / empty / non-string text, a lone surrogate), each with its line number
(the row number for parquet, 1-based). Nothing is held beyond the current line / batch, so a corpus of any size
streams.

After each item, :attr:`Reader.cursor` says where the next one starts (a byte offset and line number for the
line formats, a row index for parquet); a later reader opened with that cursor continues exactly there. This is
how ``tembed encode --resume`` skips what an interrupted run already wrote without re-parsing it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

FORMATS: tuple[str, ...] = ("jsonl", "csv", "tsv", "parquet", "txt")
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
STDIN = "-"
_FINGERPRINT_BYTES = 1 << 20
_PARQUET_BATCH_ROWS = 1024


class InputError(Exception):
    """The input cannot be read at all (missing file, unknown format, a column absent from the header)."""


@dataclass(frozen=True)
class Record:
    """One usable text: ``line_number`` is 1-based (the row number for parquet); ``id`` is a string."""

    line_number: int
    id: str
    text: str


@dataclass(frozen=True)
class Rejected:
    """A record that cannot be embedded, and why."""

    line_number: int
    reason: str


Item = Record | Rejected


def detect_format(path: str, fmt: str | None = None) -> str:
    """The input format: ``fmt`` if given, else from the file suffix; stdin defaults to JSON Lines."""
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


def fingerprint(path: str) -> dict[str, Any]:
    """What identifies an input file for ``--resume``: absolute path, size, mtime and a hash of its first MB."""
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
    """A cheap upper bound on the records in a file (lines, or parquet rows), for a progress bar's total."""
    if path == STDIN:
        return None
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    lines = 0
    last = b"\n"
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            lines += block.count(b"\n")
            last = block[-1:]
    lines += last != b"\n"
    return lines - 1 if fmt in ("csv", "tsv") else lines


def _join(title: Any, text: str) -> str:
    """Title and text as the reference's evaluation joins them: ``f"{title} {text}".strip()``."""
    return f"{title} {text}".strip() if title else text


def _check_text(value: Any, field: str) -> str | None:
    """The problem with a text value, or None when it is usable."""
    if value is None:
        return f"field {field!r} is null"
    if not isinstance(value, str):
        return f"field {field!r} is not a string ({type(value).__name__}: {_preview(value)})"
    if not value.strip():
        return f"field {field!r} is empty"
    return _surrogate_problem(value, field)


def _surrogate_problem(value: str, field: str) -> str | None:
    """A lone surrogate (``"\\ud83d"``: valid as a JSON escape, not as Unicode text) cannot be encoded as UTF-8."""
    if value.isascii():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"field {field!r} contains a lone surrogate at position {error.start}"
    return None


def _preview(value: Any) -> str:
    try:
        return json.dumps(value)[:40]
    except (TypeError, ValueError):
        return repr(value)[:40]


def id_string(value: Any) -> str:
    """An id as a string: strings as they are, JSON numbers and booleans in JSON spelling (``7``, ``1.5``,
    ``true``), anything else (a parquet date or decimal) as ``str()`` gives it."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    return str(value)


def _utf8_problem(raw: bytes, error: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})"


def _decode_binary(value: Any, field: str) -> tuple[Any, str | None]:
    """A parquet binary value decoded as UTF-8: ``(text, None)``, or ``(None, problem)`` when it is not UTF-8."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        return value, None
    raw = bytes(value)
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as error:
        return None, f"field {field!r} is not valid UTF-8 (byte 0x{raw[error.start]:02x} at byte {error.start + 1})"


class Reader:
    """Iterate a corpus file as :class:`Record` / :class:`Rejected` items.

    Args:
        path: the file, or ``"-"`` for standard input (binary).
        fmt: one of :data:`FORMATS`.
        text_field: the field / column holding the text (ignored for ``txt``).
        id_field: the field / column holding the id; records without it get their line number.
        title_field: an optional field joined before the text (``f"{title} {text}".strip()``).
        cursor: where to start, from a previous reader's :attr:`cursor` (None: the beginning).
        stdin: the binary stream read for ``"-"`` (default ``sys.stdin.buffer``).
    """

    def __init__(
        self,
        path: str,
        fmt: str,
        *,
        text_field: str = "text",
        id_field: str | None = "id",
        title_field: str | None = "title",
        cursor: dict[str, int] | None = None,
        stdin: BinaryIO | None = None,
    ) -> None:
        self.path = path
        self.name = "<stdin>" if path == STDIN else path
        self.fmt = detect_format(path, fmt)
        self.text_field = text_field
        self.id_field = id_field or None
        self.title_field = title_field or None
        self._stdin = stdin
        self._pending: dict[str, int] = {}
        self.cursor: dict[str, int] = dict(cursor) if cursor else {"offset": 0, "line": 0, "row": 0}
        if path == STDIN:
            if self.fmt == "parquet":
                raise InputError("parquet cannot be read from stdin: pass the file's path")
            if cursor and any(cursor.values()):
                raise InputError("a run reading stdin cannot be resumed: its input cannot be checked")
        elif not os.path.isfile(path):
            raise InputError(f"{path}: no such file")

    def __iter__(self) -> Iterator[Item]:
        if self.fmt == "parquet":
            return self._parquet()
        if self.fmt == "jsonl":
            return self._jsonl()
        if self.fmt == "txt":
            return self._txt()
        return self._delimited()

    # ------------------------------------------------------------------------------------------- line formats
    def _open(self) -> BinaryIO:
        if self.path == STDIN:
            return self._stdin or sys.stdin.buffer
        handle = open(self.path, "rb")  # noqa: SIM115 - closed by the generators below
        handle.seek(self.cursor["offset"])
        return handle

    def _lines(self, handle: BinaryIO) -> Iterator[tuple[int, bytes]]:
        """``(line_number, raw line without its newline)``; the cursor points past each line once it is yielded."""
        line_number = self.cursor["line"]
        offset = self.cursor["offset"]
        try:
            for raw in handle:
                line_number += 1
                offset += len(raw)
                self._pending = {"offset": offset, "line": line_number, "row": 0}
                yield line_number, raw.rstrip(b"\r\n") if raw.endswith(b"\n") else raw
        finally:
            if handle is not sys.stdin.buffer and handle is not self._stdin:
                handle.close()

    def _advance(self) -> None:
        self.cursor = self._pending

    def _jsonl(self) -> Iterator[Item]:
        for line_number, raw in self._lines(self._open()):
            if not raw.strip():
                self._advance()
                continue  # blank lines separate nothing in JSON Lines
            item = self._parse_json_line(line_number, raw)
            self._advance()
            yield item

    def _parse_json_line(self, line_number: int, raw: bytes) -> Item:
        try:
            line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            return Rejected(line_number, _utf8_problem(raw, error))
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            return Rejected(line_number, f"not valid JSON: {error.msg} (column {error.colno})")
        if not isinstance(record, dict):
            return Rejected(line_number, f"not a JSON object (a JSON {type(record).__name__})")
        if self.text_field not in record:
            return Rejected(line_number, f"no field {self.text_field!r}")
        text = record[self.text_field]
        problem = _check_text(text, self.text_field)
        if problem:
            return Rejected(line_number, problem)
        title = record.get(self.title_field) if self.title_field else None
        if title is not None and not isinstance(title, str):
            return Rejected(line_number, f"field {self.title_field!r} is not a string ({type(title).__name__})")
        identifier = record.get(self.id_field) if self.id_field else None
        if isinstance(identifier, (dict, list)):
            return Rejected(line_number, f"field {self.id_field!r} is not a string or number")
        return self._record(line_number, identifier, title, text)

    def _record(self, line_number: int, identifier: Any, title: str | None, text: str) -> Item:
        """A record, or Rejected when its title or id holds a lone surrogate (the text is checked already)."""
        identifier = str(line_number) if identifier is None else id_string(identifier)
        problem = (title and _surrogate_problem(title, self.title_field or "title")) or _surrogate_problem(
            identifier, self.id_field or "id"
        )
        if problem:
            return Rejected(line_number, problem)
        return Record(line_number, identifier, _join(title, text))

    def _txt(self) -> Iterator[Item]:
        for line_number, raw in self._lines(self._open()):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                item: Item = Rejected(line_number, _utf8_problem(raw, error))
            else:
                item = Record(line_number, str(line_number), text) if text.strip() else Rejected(line_number, "empty")
            self._advance()
            yield item

    def _delimited(self) -> Iterator[Item]:
        delimiter = "," if self.fmt == "csv" else "\t"
        # TSV has no quoting convention (fields hold no tabs or newlines); CSV follows RFC 4180.
        quoting = csv.QUOTE_MINIMAL if self.fmt == "csv" else csv.QUOTE_NONE
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        header = self._header(delimiter, quoting)
        columns = {name: index for index, name in enumerate(header)}
        if self.text_field not in columns:
            raise InputError(f"{self.name}: no column {self.text_field!r} in the header (columns: {', '.join(header)})")
        text_at = columns[self.text_field]
        id_at = columns.get(self.id_field) if self.id_field else None
        title_at = columns.get(self.title_field) if self.title_field else None
        bad_bytes: dict[int, str] = {}

        def decoded(handle: BinaryIO) -> Iterator[str]:
            for line_number, raw in self._lines(handle):
                try:
                    yield raw.decode("utf-8") + "\n"
                except UnicodeDecodeError as error:
                    bad_bytes[line_number] = _utf8_problem(raw, error)
                    yield raw.decode("utf-8", errors="replace") + "\n"

        start = self.cursor["line"] + 1
        try:
            for row in csv.reader(decoded(self._open()), delimiter=delimiter, quoting=quoting, strict=True):
                end = self._pending["line"]
                item = self._row_item(start, end, row, len(header), text_at, id_at, title_at, bad_bytes)
                bad_bytes.clear()
                self._advance()
                start = end + 1
                if item is not None:
                    yield item
        except csv.Error as error:
            # The csv module cannot recover inside a broken quoted field: name where it happened.
            raise InputError(
                f"{self.name} line {self._pending['line']}: malformed {self.fmt.upper()} ({error})"
            ) from None

    def _header(self, delimiter: str, quoting: int) -> list[str]:
        saved = self.cursor
        self.cursor = {"offset": 0, "line": 0, "row": 0}
        handle = self._open()
        lines = (raw.decode("utf-8-sig") + "\n" for _, raw in self._lines(handle))
        try:
            header = next(csv.reader(lines, delimiter=delimiter, quoting=quoting))
        except StopIteration:
            raise InputError(f"{self.name}: empty file, expected a header line") from None
        except UnicodeDecodeError:
            raise InputError(f"{self.name} line 1: the header is not valid UTF-8") from None
        finally:
            if self.path != STDIN:
                handle.close()
        self.cursor = saved if saved["line"] else self._pending
        return header

    def _row_item(
        self,
        start: int,
        end: int,
        row: list[str],
        width: int,
        text_at: int,
        id_at: int | None,
        title_at: int | None,
        bad_bytes: dict[int, str],
    ) -> Item | None:
        if bad_bytes:
            line_number = min(bad_bytes)
            return Rejected(line_number, bad_bytes[line_number])
        if not row or row == [""]:
            return None  # a blank line
        if len(row) <= text_at:
            return Rejected(start, f"no field {self.text_field!r} (the row has {len(row)} fields, the header {width})")
        text = row[text_at]
        problem = _check_text(text, self.text_field)
        if problem:
            return Rejected(start, problem)
        title = row[title_at] if title_at is not None and title_at < len(row) else None
        identifier = row[id_at] if id_at is not None and id_at < len(row) and row[id_at] != "" else None
        return self._record(start, identifier, title, text)

    # ------------------------------------------------------------------------------------------------ parquet
    def _parquet(self) -> Iterator[Item]:
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(self.path)
        except Exception as error:
            raise InputError(f"{self.path}: not a readable parquet file ({error})") from None
        names = parquet.schema_arrow.names
        if self.text_field not in names:
            raise InputError(f"{self.path}: no column {self.text_field!r} (columns: {', '.join(names)})")
        wanted = [self.text_field]
        for extra in (self.id_field, self.title_field):
            if extra and extra in names and extra not in wanted:
                wanted.append(extra)
        row = self.cursor["row"]
        groups, skip, seen = [], 0, 0
        for index in range(parquet.num_row_groups):
            size = parquet.metadata.row_group(index).num_rows
            if seen + size > row:
                if not groups:
                    skip = row - seen
                groups.append(index)
            seen += size
        if not groups:
            return
        try:
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=groups, columns=wanted):
                columns = {name: _column_values(batch.column(name)) for name in wanted}
                for position in range(skip, batch.num_rows):
                    row += 1
                    self.cursor = {"offset": 0, "line": 0, "row": row}
                    yield self._parquet_item(row, columns, position)
                skip = 0
        finally:
            parquet.close()

    def _parquet_item(self, row: int, columns: dict[str, list[Any]], position: int) -> Item:
        text, problem = _decode_binary(columns[self.text_field][position], self.text_field)
        problem = problem or _check_text(text, self.text_field)
        if problem:
            return Rejected(row, problem)
        title, identifier = None, None
        if self.title_field in columns:
            title, problem = _decode_binary(columns[self.title_field][position], self.title_field or "title")
            if problem:
                return Rejected(row, problem)
        if self.id_field in columns:
            identifier, problem = _decode_binary(columns[self.id_field][position], self.id_field or "id")
            if problem:
                return Rejected(row, problem)
        return self._record(row, identifier, None if title is None else str(title), text)


def _column_values(column: Any) -> list[Any]:
    """A parquet batch column as Python values; a string column holding invalid UTF-8 comes back as bytes, so
    that the rows at fault are rejected one by one instead of failing the whole batch."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        import pyarrow as pa

        return column.cast(pa.large_binary()).to_pylist()


def open_text_stream(data: bytes) -> BinaryIO:
    """A binary stream over bytes, for feeding a :class:`Reader` stdin in tests."""
    return io.BytesIO(data)
