"""The input of ``tembed encode --engine ray``, cut into shards: the unit of work an actor reads, encodes and
writes, and the unit of ``--resume``.

* :func:`input_files`: a file, a folder (its corpus files, sorted) or a glob;
* :func:`plan_shards`: per file, shards of about ``lines`` lines (JSON Lines, text) or rows (Parquet) each, each
  starting at an exact reader cursor (byte offset and line number, found by one scan of the file on the driver),
  so that every actor reads its shard with tembed's own reader and reports bad records by file and line as the
  single-machine job does. CSV / TSV files are cut every ``lines`` records by parsing them on the driver (a
  quoted field may span lines, so a newline is not a record boundary);
* :func:`shard_items`: the items of one shard (run in the actor).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from tembed.io.formats import FORMATS, STDIN, detect_format
from tembed.io.readers import Cursor, InputError, Item, Reader, start_cursor

__all__ = ["DEFAULT_SHARD_LINES", "MAX_SHARDS", "Fields", "Shard", "input_files", "plan_shards", "shard_items"]

DEFAULT_SHARD_LINES = 1000
"""Lines (rows) per shard: large enough to keep an actor busy for a second or more, small enough for a
fine-grained resume and an even spread over the actors (at 5,000, a 20,000-text corpus whose long texts sit at
its end left one actor alone with the last shard: 1.27x the local job's time, against 1.12x at 1,000; docs/ray.md)."""
MAX_SHARDS = 999_999
"""Part files are named ``part-NNNNNN.parquet``: six digits keep them in input order when sorted by name."""
_SCAN_BLOCK = 1 << 22
_SUFFIXES = {".jsonl", ".ndjson", ".csv", ".tsv", ".tab", ".parquet", ".pq", ".txt", ".text"}


@dataclass(frozen=True)
class Fields:
    """Where the text, id and title are in a record (as ``--text-field`` / ``--id-field`` / ``--title-field``)."""

    text: str = "text"
    id: str | None = "id"
    title: str | None = "title"


@dataclass(frozen=True)
class Shard:
    """A piece of one input file.

    Attributes:
        index: the shard's number in the whole input, from 0 (its part file is ``part-{index:06d}.parquet``).
        path: the file, absolute (actors on other nodes have other working folders); ``name``: the file as the
            user gave it, for messages and the rejects file. ``fmt``: its format (see
            :data:`~tembed.io.formats.FORMATS`).
        offset, line, row: the reader cursor the shard starts at (see :data:`~tembed.io.readers.Cursor`).
        last: the last line (row, for Parquet) of the shard, 1-based; -1: to the end of the file.
    """

    index: int
    path: str
    name: str
    fmt: str
    offset: int = 0
    line: int = 0
    row: int = 0
    last: int = -1

    @property
    def cursor(self) -> Cursor:
        return {"offset": self.offset, "line": self.line, "row": self.row}

    def as_row(self) -> dict[str, object]:
        """The shard as a row of plain values (for ``ray.data.from_items``); :meth:`from_row` reverses it."""
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, object]) -> Shard:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})  # type: ignore[arg-type]


def input_files(spec: str) -> list[str]:
    """The input files of ``spec``: the file itself; a folder's corpus files (by suffix, not recursing; names
    starting with ``.`` or ``_`` skipped), sorted; or a glob's matches, sorted.

    Raises:
        InputError: stdin (the Ray engine reads files every node can reach), or nothing matches.
    """
    if spec == STDIN:
        raise InputError("--engine ray reads files (every node reads its shards), not stdin: pass the file's path")
    if os.path.isfile(spec):
        return [spec]
    if os.path.isdir(spec):
        names = sorted(
            name
            for name in os.listdir(spec)
            if not name.startswith((".", "_")) and os.path.splitext(name)[1].lower() in _SUFFIXES
        )
        files = [os.path.join(spec, name) for name in names if os.path.isfile(os.path.join(spec, name))]
        if not files:
            raise InputError(f"{spec}: the folder holds no .jsonl, .csv, .tsv, .parquet or .txt file")
        return files
    if glob.has_magic(spec):
        files = sorted(path for path in glob.glob(spec, recursive=True) if os.path.isfile(path))
        if not files:
            raise InputError(f"{spec}: no file matches")
        return files
    raise InputError(f"{spec}: no such file or folder")


def plan_shards(
    files: list[str], fmt: str | None, lines: int = DEFAULT_SHARD_LINES, fields: Fields | None = None
) -> list[Shard]:
    """The shards of ``files``, in input order (see the module docstring). ``fmt``: the format of every file, or
    None (each file's suffix); ``fields``: where the text is (CSV / TSV files are cut by parsing them).

    Raises:
        InputError: an unknown format, a file that cannot be read (named), more than :data:`MAX_SHARDS` shards.
    """
    if fmt is not None and fmt not in FORMATS:
        raise InputError(f"unknown input format {fmt!r}: use one of {', '.join(FORMATS)}")
    shards: list[Shard] = []
    for path in files:
        file_format = detect_format(path, fmt)
        try:
            pieces = _pieces(path, file_format, lines, fields or Fields())
        except InputError:
            raise
        except Exception as error:  # unreadable: permissions, not Parquet, an I/O error
            raise InputError(f"{path}: cannot be read ({type(error).__name__}: {error})") from None
        for cursor, last in pieces:
            shards.append(Shard(len(shards), os.path.abspath(path), path, file_format, **cursor, last=last))
        if len(shards) > MAX_SHARDS:
            raise InputError(f"more than {MAX_SHARDS:,} shards: raise --shard-lines or join small files")
    return shards


def _pieces(path: str, fmt: str, lines: int, fields: Fields) -> list[tuple[Cursor, int]]:
    """``(start cursor, last line or -1)`` of each shard of one file."""
    if fmt in ("csv", "tsv"):
        return _record_boundaries(path, fmt, lines, fields)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(path).metadata.num_rows
        first_rows = range(0, max(rows, 1), lines)
        return [({"offset": 0, "line": 0, "row": r}, -1 if r + lines >= rows else r + lines) for r in first_rows]
    boundaries = _line_boundaries(path, lines)
    starts = [start_cursor(), *({"offset": o, "line": n, "row": 0} for o, n in boundaries)]
    return [(start, starts[i + 1]["line"] if i + 1 < len(starts) else -1) for i, start in enumerate(starts)]


def _line_boundaries(path: str, every: int) -> list[tuple[int, int]]:
    """``(byte offset, lines before it)`` after every ``every`` lines, short of the end of the file."""
    size = os.path.getsize(path)
    boundaries: list[tuple[int, int]] = []
    line = 0
    base = 0
    with open(path, "rb") as handle:
        while block := handle.read(_SCAN_BLOCK):
            count = block.count(b"\n")
            if line + count < (len(boundaries) + 1) * every:
                line += count  # no boundary in this block: counted at memory speed
            else:
                position = 0
                while (newline := block.find(b"\n", position)) >= 0:
                    line += 1
                    position = newline + 1
                    if line % every == 0 and base + position < size:
                        boundaries.append((base + position, line))
            base += len(block)
    return boundaries


def _record_boundaries(path: str, fmt: str, every: int, fields: Fields) -> list[tuple[Cursor, int]]:
    """Shards of ``every`` records of a CSV / TSV file, found by parsing it with tembed's reader (a quoted field
    may span lines, so only the parser knows where a record ends); each starts at the reader's exact cursor."""
    reader = Reader(path, fmt, text_field=fields.text, id_field=fields.id, title_field=fields.title)
    pieces: list[tuple[Cursor, int]] = []
    start: Cursor = start_cursor()
    count = 0
    for _ in reader:
        count += 1
        if count == every:
            pieces.append((start, reader.cursor["line"]))
            start, count = dict(reader.cursor), 0
    if count or not pieces:
        pieces.append((start, -1))
    return pieces


def shard_items(shard: Shard, fields: Fields) -> Iterator[Item]:
    """The items (records and rejects) of one shard, in file order, read with tembed's reader from the shard's
    cursor up to its last line."""
    reader = Reader(
        shard.path, shard.fmt, text_field=fields.text, id_field=fields.id, title_field=fields.title,
        cursor=shard.cursor,
    )  # fmt: skip
    for item in reader:
        if shard.last >= 0 and item.line_number > shard.last:
            return
        yield item
