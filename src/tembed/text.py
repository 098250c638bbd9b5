"""Preparing texts: input checks that name the bad item, and instruction formatting."""

from __future__ import annotations

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
    """
    if isinstance(texts, str):
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
    return items, False


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
    template = normalize_format(instruction_format or "{}{}")
    try:
        return [template.format(instruction, text) for text in texts]
    except (IndexError, KeyError) as error:
        raise ValueError(
            f"instruction_format {instruction_format!r} must have two positional slots: format(instruction, text)"
        ) from error
