"""Preparing texts: input checks that name the bad item, and instruction formatting."""

from __future__ import annotations

import string
from collections.abc import Sequence


def check_texts(texts: str | Sequence[str], *, what: str = "texts") -> tuple[list[str], bool]:
    """Validate the input of an encode call.

    Args:
        texts: one string or a sequence (list, tuple) of strings.
        what: the argument's name, used in error messages.

    Returns:
        ``(list_of_texts, was_single_string)``.

    Raises:
        TypeError: ``texts`` is None, not a str / sequence of str, or holds a non-str item (the index is named).
        ValueError: a text holds a lone surrogate (``"\\ud83d"``), which cannot be encoded as UTF-8 (the index and
            the position are named).
    """
    if isinstance(texts, str):
        check_encodable(texts, what)
        return [texts], True
    if texts is None:
        raise TypeError(f"{what} must be a str or a list of str, got None")
    if hasattr(texts, "tolist") and not isinstance(texts, (list, tuple)):  # a 1-D numpy array of str
        texts = texts.tolist()
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence):
        raise TypeError(f"{what} must be a str or a list of str, got {type(texts).__name__}")
    items = list(texts)
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(f"{what}[{index}] must be a str, got {type(item).__name__}: {item!r:.80}")
        check_encodable(item, f"{what}[{index}]")
    return items, False


def check_encodable(text: str, name: str) -> None:
    """Raise ValueError naming ``name`` when ``text`` cannot be encoded as UTF-8 (a lone surrogate)."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{name} contains a lone surrogate at position {error.start} ({text[error.start]!r}): it is not valid "
            "Unicode text and cannot be encoded as UTF-8 (decode the source with errors='replace', or drop it)"
        ) from None


def normalize_format(instruction_format: str) -> str:
    """Turn a literal backslash-n in a format string into a newline, as FlagEmbedding does."""
    return instruction_format.replace("\\n", "\n")


def apply_instruction(texts: list[str], instruction: str | None, instruction_format: str | None) -> list[str]:
    """``instruction_format.format(instruction, text)`` for every text; the texts unchanged without instruction.

    Args:
        texts: the texts.
        instruction: the instruction, e.g. ``"Represent this sentence for searching relevant passages: "``.
        instruction_format: a template with two ``{}`` slots, default ``"{}{}"``; a literal ``\\n`` becomes a
            newline.
    """
    if not instruction:
        return texts
    template = check_instruction_format(instruction_format or "{}{}")
    return [template.format(instruction, text) for text in texts]


def check_instruction_format(instruction_format: str) -> str:
    """The template with ``\\n`` turned into a newline, after checking it has exactly two positional slots.

    ``"{}{}"``, ``"Instruct: {}\\nQuery: {}"`` and ``"{0} {1}"`` pass. A template with one slot (``"{}"``,
    ``"Instruct: {}"``) would silently drop the text and one with named or extra slots cannot be filled:
    both raise ValueError.
    """
    template = normalize_format(instruction_format)
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as error:  # an unmatched brace
        raise ValueError(f"instruction_format {instruction_format!r} is not a valid format string: {error}") from None
    positions = [field.split(".")[0].split("[")[0] for field in fields]
    if positions not in (["", ""], ["0", "1"], ["1", "0"]):
        raise ValueError(
            f"instruction_format {instruction_format!r} must have exactly two positional slots, "
            f"format(instruction, text), such as '{{}}{{}}'; it has {len(fields)} ({', '.join(map(repr, fields))})"
        )
    return template
