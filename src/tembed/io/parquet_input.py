"""Reading a parquet corpus row by row from any row on, one batch of ``_BATCH_ROWS`` rows in memory at a time.

:class:`~tembed.io.readers.Reader` turns each row into a record; this module only opens the file, picks the
columns and the row groups, and converts each batch to Python values.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

from tembed.io.records import InputError

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

__all__ = ["parquet_rows"]

_BATCH_ROWS = 1024


def parquet_rows(
    path: str, text_field: str, extra_fields: tuple[str | None, ...], start: int
) -> Generator[dict[str, object], None, None]:
    """Yield the rows of the parquet file ``path`` from row ``start`` (0-based: the rows already read) on, in order.

    Each row is a ``{column: value}`` dict holding ``text_field`` and those of ``extra_fields`` (None entries
    ignored) that the file has; values are what ``pyarrow`` gives (str, int, date, ...), except that a string
    column holding invalid UTF-8 gives bytes, so the rows at fault can be rejected one by one.

    Raises :class:`InputError` (on the first ``next``) when the file is not readable parquet or has no
    ``text_field`` column. The file is closed when the generator ends or is closed.
    """
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as error:
        raise InputError(f"{path}: not a readable parquet file ({error})") from None
    try:
        wanted = _columns_to_read(path, parquet.schema_arrow.names, text_field, extra_fields)
        groups, skip = _row_groups_from(parquet, start)
        if not groups:
            return
        for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, row_groups=groups, columns=wanted):
            if skip >= batch.num_rows:  # the start may lie many batches into its row group
                skip -= batch.num_rows
                continue
            columns = {name: _column_values(batch.column(name)) for name in wanted}
            for position in range(skip, batch.num_rows):
                yield {name: values[position] for name, values in columns.items()}
            skip = 0
    finally:
        parquet.close()


def _columns_to_read(path: str, names: list[str], text_field: str, extra_fields: tuple[str | None, ...]) -> list[str]:
    """The columns to read: the text column, then each extra field the file has; InputError without a text column."""
    if text_field not in names:
        raise InputError(f"{path}: no column {text_field!r} (columns: {', '.join(names)})")
    wanted = [text_field]
    for extra in extra_fields:
        if extra and extra in names and extra not in wanted:
            wanted.append(extra)
    return wanted


def _row_groups_from(parquet: pq.ParquetFile, row: int) -> tuple[list[int], int]:
    """The row groups of ``parquet`` holding rows ``row`` (0-based) onwards, and how many rows of the first of them
    come before ``row``; ``([], 0)`` when the file has no row past it."""
    groups: list[int] = []
    skip, seen = 0, 0
    for index in range(parquet.num_row_groups):
        size = parquet.metadata.row_group(index).num_rows
        if seen + size > row:
            if not groups:
                skip = row - seen
            groups.append(index)
        seen += size
    return groups, skip


def _column_values(column: pa.Array) -> list[object]:
    """A batch column as Python values; a string column holding invalid UTF-8 comes back as bytes, so that the rows
    at fault are rejected one by one instead of failing the whole batch."""
    try:
        values: list[object] = column.to_pylist()
    except UnicodeDecodeError:
        import pyarrow as pa

        values = column.cast(pa.large_binary()).to_pylist()
    return values
