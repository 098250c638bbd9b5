"""Arrow batches of texts to Arrow batches of embeddings: :class:`RayEncoder`, the callable class for
``ray.data.Dataset.map_batches``, and :class:`TableEncoder`, the in-process core it shares with ``tembed encode
--engine ray``.

The output columns are exactly those of the single-machine ``tembed encode`` Parquet output
(:func:`tembed.io.writers.schema`): ``id`` (string), ``dense`` (``fixed_size_list<float32, dim>``),
``sparse_ids`` / ``sparse_weights`` (``list<int32>`` / ``list<float32>``), ``colbert``
(``list<fixed_size_list<float32, dim>>``); plain Arrow types, no Ray tensor extension types, so files written by
Ray read back with plain pyarrow as the local job's do.

Nothing here imports ray at module level: the classes work (and are tested) in a plain process too.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tembed.io import writers
from tembed.io.records import Record, check_text, id_string
from tembed.jobs.retry import NotTheTexts, encode_by_halves
from tembed.settings import EmbedderConfig, EncodeOptions, clamp_max_length

if TYPE_CHECKING:
    import pyarrow as pa

    from tembed.encoder import Encoder
    from tembed.outputs import EncodeOutputs

__all__ = ["RayEncoder", "TableEncoder", "actor_threads", "naming_record"]


def actor_threads(threads: int | None = None) -> int:
    """The threads an actor's model uses: ``threads`` if given, else the CPUs Ray assigned to the actor (rounded
    up, at least 1), else ``OMP_NUM_THREADS`` (Ray sets it to the actor's ``num_cpus``), else 1."""
    if threads is not None:
        return max(1, int(threads))
    try:
        import ray

        if ray.is_initialized():
            assigned = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if assigned:
                return max(1, math.ceil(assigned))
    except Exception:  # not inside a Ray worker: fall back to the environment
        pass
    return max(1, int(os.environ.get("OMP_NUM_THREADS", "1") or 1))


def naming_record(error: Exception, where: str) -> Exception:
    """``error`` with ``where`` (e.g. ``"record id 'doc-7'"``) in its message and its type kept: a new exception
    of the same type when the type takes one message argument, else ``error`` itself with ``where`` added as a
    note. Raise the result ``from error``."""
    message = f"{where}: {error}"
    try:
        named = type(error)(message)
    except Exception:
        named = None
    if named is not None and str(named) == message:
        return named
    add_note = getattr(error, "add_note", None)  # Python 3.11+
    if add_note is not None:
        add_note(where)
    return error


class TableEncoder:
    """One model, loaded once, turning texts and ids into a table of the local Parquet schema.

    Args:
        config: the model configuration (picklable; see :class:`~tembed.settings.EmbedderConfig`).
        options: role (query / passage / plain), outputs, max length (see :class:`~tembed.settings.EncodeOptions`).
        device: ``"cpu"``, ``"cuda"``, ...; None: the first GPU, else the CPU.
        threads: torch / OpenVINO threads; None: :func:`actor_threads`.
        metadata: more entries for the schema's ``b"tembed"`` metadata (after ``model``, ``kind``, ``dim``).

    Attributes:
        encoder: the open :class:`~tembed.encoder.Encoder`; ``call_options``: ``options`` with the max length
            clamped to the model's; ``schema``: the output's :class:`pyarrow.Schema`; ``load_seconds``.
    """

    def __init__(
        self,
        config: EmbedderConfig,
        options: EncodeOptions,
        *,
        device: str | None = None,
        threads: int | None = None,
        metadata: Mapping[str, object] | None = None,
    ) -> None:
        from tembed.encoder import open_encoder
        from tembed.pool.worker import prepare_process

        started = time.perf_counter()
        prepare_process(actor_threads(threads))
        self.encoder: Encoder = open_encoder(config.replace(show_progress_bar=False), device)
        settings = self.encoder.settings
        token_limit = clamp_max_length(
            settings.max_length_for(options), settings.max_seq_length, warn=options.max_length is not None
        )
        self.call_options = dataclasses.replace(options, max_length=token_limit)
        colbert_dim = settings.colbert_dim if "colbert" in options.outputs else None
        described = {"model": config.model, "kind": options.role.value, "dim": settings.dim, **(metadata or {})}
        self.schema = writers.schema(options.outputs, settings.dim, colbert_dim, metadata=described)
        self.load_seconds = time.perf_counter() - started

    def encode(self, texts: Sequence[str]) -> EncodeOutputs:
        """The outputs of ``texts`` (already checked) with the call options."""
        return self.encoder.encode(texts, self.call_options)

    def table(self, ids: Sequence[str], result: EncodeOutputs) -> pa.Table:
        """The output table of encoded texts: one row per id, in order."""
        return writers.chunk_table(ids, result, self.schema)

    def encode_records(self, records: list[Record]) -> tuple[list[Record], EncodeOutputs | None, list[Any]]:
        """Encode records; when the batch fails, again by halves down to the records that fail alone. Returns
        ``(records encoded, their outputs, [(record, error), ...] for those that fail)``.

        Raises:
            Exception: the batch's own error when it fails whatever the texts (:class:`NotTheTexts`).
        """
        try:
            return records, self.encode([r.text for r in records]), []
        except Exception as error:
            try:
                return encode_by_halves(self.encode, records, error)
            except NotTheTexts:
                raise error from None

    def close(self) -> None:
        self.encoder.close()


class RayEncoder:
    """The callable class for ``Dataset.map_batches(RayEncoder, batch_format="pyarrow", ...)``: the model is
    loaded once per actor; each call maps an Arrow batch with a text column (and an id column) to an Arrow batch
    of the single-machine ``tembed encode`` Parquet schema (see the module docstring).

    Usage::

        ds = ray.data.read_parquet("corpus/")
        ds = ds.map_batches(RayEncoder, fn_constructor_kwargs={"config": EmbedderConfig("all-MiniLM-L6-v2")},
                            batch_format="pyarrow", batch_size=512,
                            compute=ray.data.ActorPoolStrategy(size=2), num_cpus=1)
        ds.write_parquet("embeddings/")

    or :func:`tembed.ray.encode_dataset`, which also checks the CPU budget.

    Args:
        config: the model configuration (an :class:`~tembed.settings.EmbedderConfig`, or a model name).
        options: role, outputs, max length; default ``EncodeOptions()`` (plain texts, dense).
        text_column: the column holding the texts (default ``"text"``).
        id_column: the column holding the ids, passed through as strings (numbers in JSON spelling); None or a
            column the batch lacks: the row's position in the batch is not an id, so the batch is refused unless
            ``id_column`` is None, in which case ids are ``""``.
        device: None: the first GPU Ray gave the actor, else the CPU.
        threads: None: the CPUs Ray gave the actor (:func:`actor_threads`).

    Raises (from a call):
        ValueError: a batch without the text / id column, or a text that is null, not a string, empty or holds a
            lone surrogate: the message names the record's id (or row) and the field.
        Exception: encoding a record fails: the original exception type and message, with the record's id.
    """

    def __init__(
        self,
        config: EmbedderConfig | str,
        options: EncodeOptions | None = None,
        *,
        text_column: str = "text",
        id_column: str | None = "id",
        device: str | None = None,
        threads: int | None = None,
    ) -> None:
        if isinstance(config, str):
            config = EmbedderConfig(model=config)
        self.text_column = text_column
        self.id_column = id_column
        self.core = TableEncoder(config, options or EncodeOptions(), device=device, threads=threads)

    @property
    def schema(self) -> pa.Schema:
        """The Arrow schema of every output batch."""
        return self.core.schema

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Encode one batch (a :class:`pyarrow.Table`; a dict of columns is accepted too). Returns the table of
        the output schema, one row per input row, in order."""
        import pyarrow as pa

        if not isinstance(batch, pa.Table):
            batch = pa.table(batch)
        records = self._records(batch)
        done, result, failures = self.core.encode_records(records)
        if failures:
            record, error = failures[0]
            where = f"record id {record.id!r}" if self.id_column is not None else f"row {record.line_number - 1}"
            raise naming_record(error, where) from error
        if result is None:  # an empty batch
            return self.core.schema.empty_table()
        return self.core.table([r.id for r in done], result)

    def _records(self, batch: pa.Table) -> list[Record]:
        names = batch.column_names
        if self.text_column not in names:
            raise ValueError(f"the batch has no text column {self.text_column!r} (columns: {', '.join(names)})")
        if self.id_column is not None and self.id_column not in names:
            raise ValueError(f"the batch has no id column {self.id_column!r} (columns: {', '.join(names)})")
        texts = batch.column(self.text_column).to_pylist()
        ids = batch.column(self.id_column).to_pylist() if self.id_column is not None else [""] * len(texts)
        records = []
        for row, (identifier, text) in enumerate(zip(ids, texts, strict=False)):
            if self.id_column is None:
                named = f"row {row}"
            elif identifier is None:
                raise ValueError(f"row {row}: field {self.id_column!r} (the id) is null")
            else:
                named = f"record id {id_string(identifier)!r}"
            problem = check_text(text, self.text_column)
            if problem:
                raise ValueError(f"{named}: {problem}")
            records.append(Record(row + 1, id_string(identifier), text))
        return records
