"""What a finished corpus job did, and the summary line it says."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tembed.io.writers import rejects_path

Report = Callable[[str], None]
"""Receives the lines a job says to the user (the resume notice, the summary)."""


def report_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class JobResult:
    """What a finished job did.

    Attributes:
        rows, rejected, tokens: records written, records rejected and tokens encoded, in all (the interrupted
            run's included); ``distinct_ids``: the distinct ids among the rows.
        rows_before: the rows the interrupted run had written; ``rows_done``, ``tokens_done``, ``seconds``: this
            run's share and time.
        nothing_left: a resumed run found every record done (it only merged).
    """

    rows: int
    rejected: int
    tokens: int
    distinct_ids: int
    rows_done: int
    rows_before: int
    tokens_done: int
    seconds: float
    nothing_left: bool

    @property
    def duplicates(self) -> int:
        return self.rows - self.distinct_ids


def summary(result: JobResult, output: str, load_seconds: float) -> str:
    """The line said at the end: the records, the rate, the output and its size."""
    seconds = result.seconds
    rate = result.rows_done / seconds if seconds > 0 else 0.0
    token_rate = result.tokens_done / seconds if seconds > 0 else 0.0
    resumed = f" ({result.rows_before:,} from the interrupted run)" if result.rows_before else ""
    extra = f", {result.rejected:,} rejected (listed in {rejects_path(output)})" if result.rejected else ""
    if result.duplicates:
        extra += f", {result.duplicates:,} duplicate ids (--unique-ids refuses them)"
    wrote = f"wrote {output} ({size_text(os.path.getsize(output))})"
    if result.nothing_left:
        return (
            f"nothing left to encode: all {result.rows + result.rejected:,} records were done by the "
            f"interrupted run{extra}; {wrote}"
        )
    return (
        f"encoded {result.rows:,} texts{resumed}{extra} in {seconds:.1f} s "
        f"(+{load_seconds:.1f} s loading the model): {rate:,.1f} texts/s, {token_rate:,.0f} tokens/s; {wrote}"
    )


def progress_bar(total: int | None, initial: int, show: bool) -> Any:
    """The job's tqdm bar on stderr (texts; a tokens/s postfix is set per chunk), disabled unless ``show``."""
    from tqdm.auto import tqdm

    terminal = shutil.get_terminal_size((100, 20))  # a terminal that reports no size (0 x 0) hides tqdm's bar
    return tqdm(
        total=total,
        initial=initial,
        unit="text",
        desc="encode",
        file=sys.stderr,
        disable=not show,
        ncols=terminal.columns,
        nrows=terminal.lines,
        smoothing=0.1,
    )


def size_text(num_bytes: float) -> str:
    """``812 B``, ``90.1 kB``, ``1.2 GB``."""
    for unit in ("B", "kB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return ""
