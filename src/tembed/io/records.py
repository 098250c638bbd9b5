"""What a corpus reader yields, and the checks that decide whether a raw value is a usable text.

A reader turns each line (each row, for parquet) of its input into one :data:`Item`: a :class:`Record` when the
text can be embedded, a :class:`Rejected` naming the problem otherwise. :class:`InputError` is for an input that
cannot be read at all. The helpers below are shared by every input format so that all of them reject the same
values with the same words.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

__all__ = [
    "InputError",
    "Item",
    "Record",
    "Rejected",
    "check_text",
    "decode_binary",
    "id_string",
    "join_title",
    "preview",
    "surrogate_problem",
    "utf8_problem",
]


class InputError(Exception):
    """The input cannot be read at all (missing file, unknown format, a column absent from the header)."""


@dataclass(frozen=True)
class Record:
    """One usable text.

    Attributes:
        line_number: where it was read, 1-based: the line in a line format (the first line of a CSV record that
            spans several), the row in parquet.
        id: the record's id as a string (see :func:`id_string`); the line number, as a string, when the input has
            no id for it.
        text: the text to embed, title joined in front when there is one (see :func:`join_title`); never empty or
            blank, always encodable as UTF-8.
    """

    line_number: int
    id: str
    text: str


@dataclass(frozen=True)
class Rejected:
    """A record that cannot be embedded, and why.

    Attributes:
        line_number: where it was read, 1-based, as for :class:`Record`.
        reason: one line saying what is wrong, e.g. ``"field 'text' is empty"`` or ``"not valid JSON: ..."``.
    """

    line_number: int
    reason: str


Item = Record | Rejected
"""What iterating a :class:`~tembed.io.readers.Reader` yields: a :class:`Record` or a :class:`Rejected`."""


def join_title(title: object, text: str) -> str:
    """Title and text as the reference's evaluation joins them: returns ``f"{title} {text}".strip()`` when there is
    a (truthy) title, else ``text`` unchanged."""
    return f"{title} {text}".strip() if title else text


def check_text(value: object, field: str) -> str | None:
    """Returns the problem with a text value (null, not a string, empty or blank, a lone surrogate) as one line
    naming ``field``, or None when ``value`` is a usable ``str``."""
    if value is None:
        return f"field {field!r} is null"
    if not isinstance(value, str):
        return f"field {field!r} is not a string ({type(value).__name__}: {preview(value)})"
    if not value.strip():
        return f"field {field!r} is empty"
    return surrogate_problem(value, field)


def surrogate_problem(value: str, field: str) -> str | None:
    """Returns the problem when ``value`` holds a lone surrogate (``"\\ud83d"``: valid as a JSON escape, not as
    Unicode text, so it cannot be encoded as UTF-8), naming ``field`` and the position; None otherwise."""
    if value.isascii():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"field {field!r} contains a lone surrogate at position {error.start}"
    return None


def preview(value: object) -> str:
    """Returns at most 40 characters showing ``value``: its JSON spelling, or its ``repr`` when it has none."""
    try:
        return json.dumps(value)[:40]
    except (TypeError, ValueError):
        return repr(value)[:40]


def id_string(value: object) -> str:
    """Returns an id as a string: strings as they are, JSON numbers and booleans in JSON spelling (``7``, ``1.5``,
    ``true``), anything else (a parquet date or decimal) as ``str()`` gives it."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    return str(value)


def utf8_problem(raw: bytes, error: UnicodeDecodeError) -> str:
    """Returns the rejection reason for a line that is not UTF-8: the first bad byte and its 1-based column."""
    return f"not valid UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})"


def decode_binary(value: object, field: str) -> tuple[object, str | None]:
    """Decodes a parquet binary value as UTF-8. Returns ``(text, None)``; ``(None, problem)`` when the bytes are
    not UTF-8; ``(value, None)`` unchanged when ``value`` is not bytes-like."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        return value, None
    raw = bytes(value)
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as error:
        return None, f"field {field!r} is not valid UTF-8 (byte 0x{raw[error.start]:02x} at byte {error.start + 1})"
