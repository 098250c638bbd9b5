"""Writing embeddings: parquet row groups per chunk, durable part files, and the final atomic merge.

Columns of a parquet output:

* ``id``: string;
* ``dense``: ``fixed_size_list<float32, dim>`` (a list of float32 per row);
* ``sparse_ids`` / ``sparse_weights``: ``list<int32>`` / ``list<float32>``, token ids ascending (``--sparse``);
* ``colbert``: ``list<fixed_size_list<float32, dim>>``, one vector per token (``--colbert``).

A ``.npy`` output holds the dense ``(n, dim)`` float32 matrix; its ids go one per line to ``NAME.ids.txt``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

OUTPUT_FORMATS: tuple[str, ...] = ("parquet", "npy")


def output_format(path: str) -> str:
    """``"parquet"`` or ``"npy"`` from the output's suffix; ValueError otherwise."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".npy":
        return "npy"
    raise ValueError(f"{path}: the output must end in .parquet or .npy")


def ids_path(output: str) -> str:
    """Where the ids of a ``.npy`` output go: ``emb.npy`` -> ``emb.ids.txt``."""
    return os.path.splitext(output)[0] + ".ids.txt"


def rejects_path(output: str) -> str:
    """Where skipped records are listed: ``emb.parquet`` -> ``emb.rejects.jsonl``."""
    return os.path.splitext(output)[0] + ".rejects.jsonl"


def schema(outputs: Sequence[str], dim: int, colbert_dim: int | None = None, metadata: dict | None = None) -> Any:
    """The arrow schema of an output with these columns."""
    import pyarrow as pa

    fields = [pa.field("id", pa.string(), nullable=False)]
    if "dense" in outputs:
        fields.append(pa.field("dense", pa.list_(pa.float32(), dim)))
    if "sparse" in outputs:
        fields.append(pa.field("sparse_ids", pa.list_(pa.int32())))
        fields.append(pa.field("sparse_weights", pa.list_(pa.float32())))
    if "colbert" in outputs:
        fields.append(pa.field("colbert", pa.list_(pa.list_(pa.float32(), colbert_dim or dim))))
    encoded = {b"tembed": json.dumps(metadata).encode()} if metadata else None
    return pa.schema(fields, metadata=encoded)


def chunk_table(ids: Sequence[str], result: Any, table_schema: Any) -> Any:
    """An arrow table of one encoded chunk (``result``: an :class:`~tembed.outputs.EncodeOutputs`)."""
    import pyarrow as pa

    columns: list[Any] = [pa.array(list(ids), type=pa.string())]
    names = table_schema.names
    if "dense" in names:
        dense = np.ascontiguousarray(result.dense, dtype=np.float32)
        columns.append(pa.FixedSizeListArray.from_arrays(pa.array(dense.reshape(-1)), dense.shape[1]))
    if "sparse_ids" in names:
        offsets = np.zeros(len(ids) + 1, dtype=np.int32)
        token_ids: list[int] = []
        weights: list[float] = []
        for row, vector in enumerate(result.sparse):
            for token in sorted(vector):
                token_ids.append(int(token))
                weights.append(float(vector[token]))
            offsets[row + 1] = len(token_ids)
        columns.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(token_ids, type=pa.int32())))
        columns.append(pa.ListArray.from_arrays(pa.array(offsets), pa.array(weights, type=pa.float32())))
    if "colbert" in names:
        width = table_schema.field("colbert").type.value_type.list_size
        counts = [len(vectors) for vectors in result.colbert]
        offsets = np.zeros(len(ids) + 1, dtype=np.int32)
        np.cumsum(counts, out=offsets[1:])
        flat = (
            np.concatenate([np.asarray(v, dtype=np.float32).reshape(-1) for v in result.colbert])
            if sum(counts)
            else np.zeros(0, dtype=np.float32)
        )
        inner = pa.FixedSizeListArray.from_arrays(pa.array(flat), width)
        columns.append(pa.ListArray.from_arrays(pa.array(offsets), inner))
    return pa.Table.from_arrays(columns, schema=table_schema)


def fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_durably(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file, fsync, then ``os.replace``."""
    temporary = path + ".tmp"
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_part(path: str, table: Any) -> None:
    """Write one chunk as a single-row-group parquet file, durably and atomically."""
    import pyarrow.parquet as pq

    temporary = path + ".tmp"
    with open(temporary, "wb") as handle:
        pq.write_table(table, handle, row_group_size=max(table.num_rows, 1))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def merge_parquet(parts: Iterable[str], destination: str, table_schema: Any) -> None:
    """Concatenate part files into one parquet file at ``destination``, one row group per part."""
    import pyarrow.parquet as pq

    with open(destination, "wb") as handle:
        with pq.ParquetWriter(handle, table_schema) as writer:
            for part in parts:
                table = pq.read_table(part, schema=table_schema)
                if table.num_rows:
                    writer.write_table(table, row_group_size=table.num_rows)
        handle.flush()
        os.fsync(handle.fileno())


def merge_npy(parts: Sequence[str], destination: str, ids_destination: str, rows: int, dim: int) -> None:
    """Build an ``(rows, dim)`` float32 ``.npy`` and its ids file from part files, one part in memory at a time."""
    import pyarrow.parquet as pq

    matrix = np.lib.format.open_memmap(destination, mode="w+", dtype=np.float32, shape=(rows, dim))
    written = 0
    with open(ids_destination, "w", encoding="utf-8", newline="\n") as ids_handle:
        for part in parts:
            table = pq.read_table(part, columns=["id", "dense"])
            count = table.num_rows
            if count:
                flat = table.column("dense").combine_chunks().flatten().to_numpy(zero_copy_only=False)
                matrix[written : written + count] = flat.reshape(count, dim)
                ids_handle.writelines(f"{identifier}\n" for identifier in table.column("id").to_pylist())
            written += count
        ids_handle.flush()
        os.fsync(ids_handle.fileno())
    if written != rows:
        raise RuntimeError(f"the parts hold {written} rows, the manifest says {rows}")
    matrix.flush()
    del matrix
    with open(destination, "rb+") as handle:
        os.fsync(handle.fileno())
