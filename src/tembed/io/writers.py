"""Writing embeddings: parquet row groups per chunk, durable part files, and the final merge.

Columns of a parquet output (and of each part file), in this order:

* ``id``: ``string``, not null;
* ``dense``: ``fixed_size_list<float32, dim>`` (a list of float32 per row);
* ``sparse_ids`` / ``sparse_weights``: ``list<int32>`` / ``list<float32>``, token ids ascending (``--sparse``);
* ``colbert``: ``list<fixed_size_list<float32, dim>>``, one vector per token (``--colbert``).

The schema's metadata holds, under the key ``b"tembed"``, the run's options as JSON.

With quantization (``tembed encode --quantize``), the merge writes, in place of ``dense``, the column
``dense_<precision>``: ``fixed_size_list<int8 or uint8, width>`` (width ``dim`` for int8 / uint8, ``ceil(dim / 8)``
for binary / ubinary; see :mod:`tembed.quantization`), and the metadata gains a ``"quantization"`` entry. The part
files always hold float32 ``dense``.

A ``.npy`` output holds the dense ``(n, dim)`` float32 matrix; its ids go one per line to ``NAME.ids.txt``.
Skipped records go, one JSON object per line (``{"input", "line", "reason"}``), to ``NAME.rejects.jsonl``.

Every file is written through :mod:`tembed.io.files` (fsync before rename); :func:`write_durably` is re-exported
from there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from tembed.io.files import atomic_write, synced_file, write_durably

if TYPE_CHECKING:
    import pyarrow as pa

    from tembed.outputs import EncodeOutputs, SparseVector

__all__ = [
    "chunk_table",
    "dense_ranges",
    "ids_path",
    "merge_npy",
    "merge_parquet",
    "output_format",
    "quantize_dense",
    "quantized_schema",
    "rejects_path",
    "schema",
    "write_durably",
    "write_part",
]


def output_format(path: str) -> str:
    """Returns ``"parquet"`` (suffix ``.parquet`` / ``.pq``) or ``"npy"`` (``.npy``) from the output's suffix;
    raises ValueError for any other suffix."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".npy":
        return "npy"
    raise ValueError(f"{path}: the output must end in .parquet or .npy")


def ids_path(output: str) -> str:
    """Returns where the ids of a ``.npy`` output go: ``emb.npy`` -> ``emb.ids.txt``."""
    return os.path.splitext(output)[0] + ".ids.txt"


def rejects_path(output: str) -> str:
    """Returns where skipped records are listed: ``emb.parquet`` -> ``emb.rejects.jsonl``."""
    return os.path.splitext(output)[0] + ".rejects.jsonl"


def schema(
    outputs: Sequence[str], dim: int, colbert_dim: int | None = None, metadata: Mapping[str, object] | None = None
) -> pa.Schema:
    """Returns the arrow schema of an output holding ``outputs`` (names from ``"dense"``, ``"sparse"``,
    ``"colbert"``): the columns listed in the module docstring, ``dim`` wide for dense and ``colbert_dim`` (default
    ``dim``) for ColBERT, with ``metadata`` as JSON under the key ``b"tembed"`` when given."""
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


def chunk_table(ids: Sequence[str], result: EncodeOutputs, table_schema: pa.Schema) -> pa.Table:
    """Returns the arrow table of one encoded chunk: one row per id, in order, with the columns of
    ``table_schema`` (see :func:`schema`) filled from ``result``, the outputs of encoding the chunk's texts."""
    import pyarrow as pa

    columns: list[pa.Array] = [pa.array(list(ids), type=pa.string())]
    names = table_schema.names
    if "dense" in names:
        if result.dense is None:
            raise ValueError("the schema has a dense column but the result has no dense output")
        dense = np.ascontiguousarray(result.dense, dtype=np.float32)
        columns.append(pa.FixedSizeListArray.from_arrays(pa.array(dense.reshape(-1)), dense.shape[1]))
    if "sparse_ids" in names:
        if not isinstance(result.sparse, list):
            raise ValueError("the schema has sparse columns but the result has no per-text sparse vectors")
        columns.extend(_sparse_columns(len(ids), result.sparse))
    if "colbert" in names:
        if result.colbert is None:
            raise ValueError("the schema has a colbert column but the result has no colbert output")
        width = table_schema.field("colbert").type.value_type.list_size
        columns.append(_colbert_column(len(ids), result.colbert, width))
    return pa.Table.from_arrays(columns, schema=table_schema)


def _sparse_columns(rows: int, vectors: Sequence[SparseVector]) -> tuple[pa.Array, pa.Array]:
    """The ``sparse_ids`` (``list<int32>``) and ``sparse_weights`` (``list<float32>``) columns, ids ascending."""
    import pyarrow as pa

    offsets = np.zeros(rows + 1, dtype=np.int32)
    token_ids: list[int] = []
    weights: list[float] = []
    for row, vector in enumerate(vectors):
        for token in sorted(vector):
            token_ids.append(int(token))
            weights.append(float(vector[token]))
        offsets[row + 1] = len(token_ids)
    return (
        pa.ListArray.from_arrays(pa.array(offsets), pa.array(token_ids, type=pa.int32())),
        pa.ListArray.from_arrays(pa.array(offsets), pa.array(weights, type=pa.float32())),
    )


def _colbert_column(rows: int, matrices: Sequence[np.ndarray] | np.ndarray, width: int) -> pa.Array:
    """The ``colbert`` column (``list<fixed_size_list<float32, width>>``): per text its ``(tokens, width)`` matrix."""
    import pyarrow as pa

    counts = [len(vectors) for vectors in matrices]
    offsets = np.zeros(rows + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    flat = (
        np.concatenate([np.asarray(v, dtype=np.float32).reshape(-1) for v in matrices])
        if sum(counts)
        else np.zeros(0, dtype=np.float32)
    )
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat), width)
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def write_part(path: str, table: pa.Table) -> None:
    """Write one chunk's table to ``path`` as a parquet file of a single row group, with :func:`atomic_write`.
    Returns None; the file holds ``table``'s columns (see the module docstring)."""
    import pyarrow.parquet as pq

    atomic_write(path, lambda handle: pq.write_table(table, handle, row_group_size=max(table.num_rows, 1)))


def merge_parquet(
    parts: Iterable[str],
    destination: str,
    table_schema: pa.Schema,
    *,
    output_schema: pa.Schema | None = None,
    transform: Callable[[pa.Table], pa.Table] | None = None,
) -> None:
    """Concatenate part files (read with ``table_schema``), in order, into one parquet file at ``destination``
    (fsynced, not renamed), one row group per non-empty part. Returns None.

    ``transform`` (default None: none) maps each part's table to what is written, with ``output_schema``'s columns
    and metadata (default: ``table_schema``); one part is in memory at a time."""
    import pyarrow.parquet as pq

    written_schema = table_schema if output_schema is None else output_schema
    with synced_file(destination) as handle, pq.ParquetWriter(handle, written_schema) as writer:
        for part in parts:
            table = pq.read_table(part, schema=table_schema)
            if table.num_rows:
                writer.write_table(table if transform is None else transform(table), row_group_size=table.num_rows)


def _dense_matrix(table: pa.Table) -> np.ndarray:
    """The ``(rows, dim)`` float32 matrix of a table's ``dense`` column."""
    column = table.column("dense").combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(len(column), column.type.list_size)


def dense_ranges(parts: Iterable[str]) -> np.ndarray | None:
    """The exact per-dimension minima and maxima (``(2, dim)`` float32, see
    :func:`tembed.quantization.quantization_ranges`) of the ``dense`` column of all the part files, read one part at
    a time; None when they hold no rows."""
    import pyarrow.parquet as pq

    from tembed.quantization import update_ranges

    ranges = None
    for part in parts:
        table = pq.read_table(part, columns=["dense"])
        if table.num_rows:
            ranges = update_ranges(ranges, _dense_matrix(table))
    return ranges


def quantized_schema(table_schema: pa.Schema, column: str, dtype: str, width: int, entry: Any) -> pa.Schema:
    """``table_schema`` with its ``dense`` field replaced, in place, by ``column`` of type
    ``fixed_size_list<dtype, width>`` (``dtype`` ``"int8"`` or ``"uint8"``) and ``entry`` added to the JSON under
    ``b"tembed"`` as ``"quantization"``."""
    import pyarrow as pa

    index = table_schema.get_field_index("dense")
    if index < 0:
        raise ValueError("quantization needs the dense output: the schema has no dense column")
    replaced = table_schema.set(index, pa.field(column, pa.list_(pa.from_numpy_dtype(np.dtype(dtype)), width)))
    metadata = dict(table_schema.metadata or {})
    options = json.loads(metadata.get(b"tembed", b"{}"))
    metadata[b"tembed"] = json.dumps({**options, "quantization": entry}).encode()
    return replaced.with_metadata(metadata)


def quantize_dense(table: pa.Table, output_schema: pa.Schema, codes_of: Callable[[np.ndarray], np.ndarray]) -> pa.Table:
    """``table`` with its float ``dense`` column replaced by the codes ``codes_of`` makes from its ``(rows, dim)``
    float32 matrix (``(rows, width)``, of the dtype of the column in ``output_schema`` at ``dense``'s place)."""
    import pyarrow as pa

    index = table.schema.get_field_index("dense")
    field = output_schema.field(index)
    codes = np.ascontiguousarray(codes_of(_dense_matrix(table)))
    column = pa.FixedSizeListArray.from_arrays(pa.array(codes.reshape(-1)), codes.shape[1])
    return table.set_column(index, field, column.cast(field.type)).replace_schema_metadata(output_schema.metadata)


def merge_npy(parts: Sequence[str], destination: str, ids_destination: str, rows: int, dim: int) -> None:
    """Build, from part files in order, a ``.npy`` at ``destination`` holding the ``(rows, dim)`` float32 dense
    matrix and a UTF-8 text file at ``ids_destination`` holding the ids, one per line; both fsynced, not renamed.
    One part is in memory at a time. Returns None; RuntimeError when the parts do not hold ``rows`` rows."""
    import pyarrow.parquet as pq

    matrix = np.lib.format.open_memmap(destination, mode="w+", dtype=np.float32, shape=(rows, dim))
    written = 0
    with synced_file(ids_destination) as ids_handle:
        for part in parts:
            table = pq.read_table(part, columns=["id", "dense"])
            count = table.num_rows
            if count:
                flat = table.column("dense").combine_chunks().flatten().to_numpy(zero_copy_only=False)
                matrix[written : written + count] = flat.reshape(count, dim)
                ids = "".join(f"{identifier}\n" for identifier in table.column("id").to_pylist())
                ids_handle.write(ids.encode("utf-8"))
            written += count
    if written != rows:
        raise RuntimeError(f"the parts hold {written} rows, the manifest says {rows}")
    matrix.flush()
    del matrix
    with open(destination, "rb+") as handle:
        os.fsync(handle.fileno())
