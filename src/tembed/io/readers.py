"""Streaming corpus readers: ``.jsonl``, ``.csv``, ``.tsv``, ``.parquet``, ``.txt`` and stdin.

A reader yields, lazily and in file order, one :class:`Record` per usable text and one :class:`Rejected` per bad
one (invalid JSON, invalid UTF-8, a missing / empty / non-string text, a lone surrogate), each with its line number
(the row number for parquet, 1-based). Nothing is held beyond the current line / batch, so a corpus of any size
streams.

After each item, :attr:`Reader.cursor` says where the next one starts (a byte offset and line number for the
line formats, a row index for parquet); a later reader opened with that cursor continues exactly there. This is
how ``tembed encode --resume`` skips what an interrupted run already wrote without re-parsing it.

The item types and text checks live in :mod:`tembed.io.records`, format detection in :mod:`tembed.io.formats`
(both re-exported here), the parquet file handling in :mod:`tembed.io.parquet_input`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Literal, cast

from tembed.io.formats import FORMATS, STDIN, count_items, detect_format, fingerprint
from tembed.io.parquet_input import parquet_rows
from tembed.io.records import (
    InputError,
    Item,
    Record,
    Rejected,
    check_text,
    decode_binary,
    id_string,
    join_title,
    surrogate_problem,
    utf8_problem,
)

__all__ = [
    "FORMATS",
    "STDIN",
    "Cursor",
    "InputError",
    "Item",
    "Reader",
    "Record",
    "Rejected",
    "count_items",
    "detect_format",
    "fingerprint",
    "id_string",
]

Cursor = dict[str, int]
"""Where a reader stands: ``{"offset": byte offset, "line": lines consumed, "row": parquet rows consumed}``
(the line formats use offset and line, parquet uses row; the others stay 0). JSON-serializable as is."""

_Quoting = Literal[0, 1, 2, 3]  # csv.QUOTE_* as typeshed spells them


def start_cursor() -> Cursor:
    """Returns the cursor of a reader that has read nothing: ``{"offset": 0, "line": 0, "row": 0}``."""
    return {"offset": 0, "line": 0, "row": 0}


@dataclass(frozen=True)
class _Columns:
    """Where the fields are in a CSV / TSV row: the header's width and 0-based positions (None: no such column)."""

    width: int
    text_at: int
    id_at: int | None
    title_at: int | None


class Reader:
    """Iterate a corpus file as :data:`Item` values: a :class:`Record` or a :class:`Rejected` per line / row.

    Iterating yields, in file order, ``Record(line_number, id, text)`` for each usable text and
    ``Rejected(line_number, reason)`` for each bad one; blank lines of the line formats yield nothing. An input
    that cannot be read at all (a missing file or column, malformed CSV quoting) raises :class:`InputError`.

    Args:
        path: the file, or ``"-"`` for standard input (binary).
        fmt: one of :data:`FORMATS`.
        text_field: the field / column holding the text (ignored for ``txt``).
        id_field: the field / column holding the id; records without it get their line number.
        title_field: an optional field joined before the text (``f"{title} {text}".strip()``).
        cursor: where to start, from a previous reader's :attr:`cursor` (None: the beginning).
        stdin: the binary stream read for ``"-"`` (default ``sys.stdin.buffer``).

    Attributes:
        name: the path, or ``"<stdin>"``, for messages.
        fmt: the format read, one of :data:`FORMATS`.
        cursor: a :data:`Cursor` pointing just past the last item yielded (or skipped, for blank lines).
    """

    def __init__(
        self,
        path: str,
        fmt: str,
        *,
        text_field: str = "text",
        id_field: str | None = "id",
        title_field: str | None = "title",
        cursor: Cursor | None = None,
        stdin: BinaryIO | None = None,
    ) -> None:
        self.path = path
        self.name = "<stdin>" if path == STDIN else path
        self.fmt = detect_format(path, fmt)
        self.text_field = text_field
        self.id_field = id_field or None
        self.title_field = title_field or None
        self._stdin = stdin
        self._pending: Cursor = {}
        self.cursor: Cursor = dict(cursor) if cursor else start_cursor()
        if path == STDIN:
            if self.fmt == "parquet":
                raise InputError("parquet cannot be read from stdin: pass the file's path")
            if cursor and any(cursor.values()):
                raise InputError("a run reading stdin cannot be resumed: its input cannot be checked")
        elif not os.path.isfile(path):
            raise InputError(f"{path}: no such file")

    def __iter__(self) -> Iterator[Item]:
        """Returns a generator of the items from :attr:`cursor` on (see the class docstring)."""
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
            return Rejected(line_number, utf8_problem(raw, error))
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            return Rejected(line_number, f"not valid JSON: {error.msg} (column {error.colno})")
        if not isinstance(record, dict):
            return Rejected(line_number, f"not a JSON object (a JSON {type(record).__name__})")
        if self.text_field not in record:
            return Rejected(line_number, f"no field {self.text_field!r}")
        text = record[self.text_field]
        title = record.get(self.title_field) if self.title_field else None
        if title is not None and not isinstance(title, str):
            return Rejected(line_number, f"field {self.title_field!r} is not a string ({type(title).__name__})")
        problem = check_text(text, self.text_field)
        if problem and not (isinstance(text, str) and not text.strip() and title and title.strip()):
            return Rejected(line_number, problem)  # a blank text with a title is the title (as BEIR joins them)
        identifier = record.get(self.id_field) if self.id_field else None
        if isinstance(identifier, (dict, list)):
            return Rejected(line_number, f"field {self.id_field!r} is not a string or number")
        return self._record(line_number, identifier, title, text)

    def _record(self, line_number: int, identifier: object, title: str | None, text: str) -> Item:
        """A record, or Rejected when its title or id holds a lone surrogate (the text is checked already)."""
        identifier = str(line_number) if identifier is None else id_string(identifier)
        problem = (title and surrogate_problem(title, self.title_field or "title")) or surrogate_problem(
            identifier, self.id_field or "id"
        )
        if problem:
            return Rejected(line_number, problem)
        return Record(line_number, identifier, join_title(title, text))

    def _txt(self) -> Iterator[Item]:
        for line_number, raw in self._lines(self._open()):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                item: Item = Rejected(line_number, utf8_problem(raw, error))
            else:
                item = Record(line_number, str(line_number), text) if text.strip() else Rejected(line_number, "empty")
            self._advance()
            yield item

    # ------------------------------------------------------------------------------------------ csv and tsv
    def _delimited(self) -> Iterator[Item]:
        delimiter = "," if self.fmt == "csv" else "\t"
        # TSV has no quoting convention (fields hold no tabs or newlines); CSV follows RFC 4180.
        quoting: _Quoting = csv.QUOTE_MINIMAL if self.fmt == "csv" else csv.QUOTE_NONE
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        columns = self._columns(self._header(delimiter, quoting))
        bad_bytes: dict[int, str] = {}

        def decoded(handle: BinaryIO) -> Iterator[str]:
            for line_number, raw in self._lines(handle):
                try:
                    yield raw.decode("utf-8") + "\n"
                except UnicodeDecodeError as error:
                    bad_bytes[line_number] = utf8_problem(raw, error)
                    yield raw.decode("utf-8", errors="replace") + "\n"

        start = self.cursor["line"] + 1
        try:
            for row in csv.reader(decoded(self._open()), delimiter=delimiter, quoting=quoting, strict=True):
                end = self._pending["line"]
                item = self._row_item(start, row, columns, bad_bytes)
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

    def _header(self, delimiter: str, quoting: _Quoting) -> list[str]:
        saved = self.cursor
        self.cursor = start_cursor()
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

    def _columns(self, header: list[str]) -> _Columns:
        """The positions of the text, id and title columns; InputError when the text column is missing."""
        positions = {name: index for index, name in enumerate(header)}
        if self.text_field not in positions:
            raise InputError(f"{self.name}: no column {self.text_field!r} in the header (columns: {', '.join(header)})")
        return _Columns(
            width=len(header),
            text_at=positions[self.text_field],
            id_at=positions.get(self.id_field) if self.id_field else None,
            title_at=positions.get(self.title_field) if self.title_field else None,
        )

    def _row_item(self, start: int, row: list[str], columns: _Columns, bad_bytes: dict[int, str]) -> Item | None:
        """The item of a CSV / TSV record starting at line ``start``; None for a blank line."""
        if bad_bytes:
            line_number = min(bad_bytes)
            return Rejected(line_number, bad_bytes[line_number])
        if not row or row == [""]:
            return None  # a blank line
        if len(row) <= columns.text_at:
            return Rejected(
                start, f"no field {self.text_field!r} (the row has {len(row)} fields, the header {columns.width})"
            )
        text = row[columns.text_at]
        problem = check_text(text, self.text_field)
        if problem:
            return Rejected(start, problem)
        title_at, id_at = columns.title_at, columns.id_at
        title = row[title_at] if title_at is not None and title_at < len(row) else None
        identifier = row[id_at] if id_at is not None and id_at < len(row) and row[id_at] != "" else None
        return self._record(start, identifier, title, text)

    # ------------------------------------------------------------------------------------------------ parquet
    def _parquet(self) -> Iterator[Item]:
        row = self.cursor["row"]
        rows = parquet_rows(self.path, self.text_field, (self.id_field, self.title_field), row)
        with contextlib.closing(rows):
            for values in rows:
                row += 1
                self.cursor = {"offset": 0, "line": 0, "row": row}
                yield self._parquet_item(row, values)

    def _parquet_item(self, row: int, values: dict[str, object]) -> Item:
        text, problem = decode_binary(values[self.text_field], self.text_field)
        problem = problem or check_text(text, self.text_field)
        if problem:
            return Rejected(row, problem)
        title: object = None
        identifier: object = None
        if self.title_field in values:
            title, problem = decode_binary(values[self.title_field], self.title_field or "title")
            if problem:
                return Rejected(row, problem)
        if self.id_field in values:
            identifier, problem = decode_binary(values[self.id_field], self.id_field or "id")
            if problem:
                return Rejected(row, problem)
        # check_text passed: the text is a str.
        return self._record(row, identifier, None if title is None else str(title), cast(str, text))
