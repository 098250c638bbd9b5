"""When the library draws a progress bar: asked for, or a long input on an interactive terminal.

Services and CI capture stderr, and a bar there is noise in their logs, so by default a bar is drawn only for
inputs of :data:`PROGRESS_BAR_MIN_TEXTS` texts or more **and** when stderr is a terminal. ``True`` / ``False``
always win.
"""

from __future__ import annotations

import sys
from typing import Any

PROGRESS_BAR_MIN_TEXTS = 1024


def show_progress(requested: bool | None, count: int | None) -> bool:
    """Whether to draw a bar for ``count`` texts (None: unknown) given the user's ``show_progress_bar``."""
    if requested is not None:
        return bool(requested)
    if count is not None and count < PROGRESS_BAR_MIN_TEXTS:
        return False
    return stderr_is_terminal()


def stderr_is_terminal() -> bool:
    stream: Any = sys.stderr
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


class NoBar:
    """What :func:`progress_bar` gives when no bar is drawn: no tqdm object, no monitor thread, no cost per call
    (a server encodes hundreds of small calls a second)."""

    def update(self, count: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NoBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


def progress_bar(total: int | None, show: bool, *, desc: str = "Encoding") -> Any:
    """A tqdm bar over texts when ``show``, else a :class:`NoBar` (tqdm is imported only for a real bar)."""
    if not show:
        return NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="text", leave=False)
