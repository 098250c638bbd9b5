"""The small vocabularies every layer shares: outputs, pooling, precision, backend names, and roles.

Each is a ``Literal`` for type checkers plus the tuple of its values (derived with ``typing.get_args``, so the
two cannot drift) for run-time checks. Nothing here imports torch.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Literal, Union, get_args

if TYPE_CHECKING:
    import torch

Output = Literal["dense", "sparse", "colbert"]
OUTPUT_NAMES: tuple[str, ...] = get_args(Output)

Pooling = Literal["cls", "mean", "last_token"]
POOLING_METHODS: tuple[str, ...] = get_args(Pooling)

Precision = Literal["auto", "fp32", "fp16", "bf16", "int8"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

DeviceLike = Union[str, int, "torch.device", None]  # a forward reference: torch is not imported here
"""``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, ``"auto"``, an int (a CUDA index), a ``torch.device`` or None."""


class Role(str, Enum):
    """What the texts of an encode call are; it picks the instruction and the default max length.

    ``QUERY``: the query instruction and ``query_max_length``; ``PASSAGE``: the passage instruction (if any) and
    ``passage_max_length``; ``PLAIN``: no instruction unless one is given, ``passage_max_length``.
    A plain string works wherever a Role is expected (``Role("query")``).
    """

    QUERY = "query"
    PASSAGE = "passage"
    PLAIN = "plain"


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise ValueError naming ``name`` and the choices when ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def check_positive(name: str, value: object) -> None:
    """Raise ValueError unless ``value`` is an int >= 1 (a bool is refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
