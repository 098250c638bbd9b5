"""What one Ray actor of ``tembed encode --engine ray`` does: :class:`ShardEncoder` reads a shard of the input
with tembed's reader, checks its records with the single-machine rules, encodes them a chunk at a time and writes
the shard's part file, then returns one summary row.

The output folder (:class:`OutputFolder`)::

    OUTPUT/part-000000.parquet       one per shard, the single-machine schema (row groups per chunk)
    OUTPUT/_tembed/run.json          the run's options, inputs and shard plan (for --resume)
    OUTPUT/_tembed/rejects-000000.jsonl   a shard's bad records (--skip-invalid), written before its part
    OUTPUT/_tembed/tmp/              part files being written
    OUTPUT.rejects.jsonl             every bad record, in input order, written at the end (as the local job)

A part file appears by ``os.replace`` once complete, and is the shard's commit: a shard is done exactly when its
part file exists. An actor killed mid-shard leaves only a temporary file; Ray restarts the actor and runs the
shard again, and the rerun replaces the same name, so no row is ever written twice. Plain pyarrow reads the folder
(``pq.read_table(OUTPUT)``): it skips names starting with ``_``.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tembed.io.files import fsync_directory, synced_file, write_durably
from tembed.io.readers import Item, Record, Rejected
from tembed.jobs.corpus import CHUNK_OUTPUT_BYTES, token_total
from tembed.jobs.errors import error_text
from tembed.jobs.plan import model_record
from tembed.jobs.records import OutputWeigher, chunks, split_items
from tembed.ray.batch import TableEncoder, naming_record
from tembed.ray.shards import Fields, Shard, shard_items
from tembed.settings import EmbedderConfig, EncodeOptions

if TYPE_CHECKING:
    import pyarrow as pa

    from tembed.outputs import EncodeOutputs

__all__ = ["BadRecord", "ModelMismatch", "OutputFolder", "ShardEncoder", "ShardSpec", "summary_schema"]


class BadRecord(ValueError):
    """A record the single-machine job would stop at (without ``--skip-invalid``): the message names the file and
    line."""


@dataclass(frozen=True)
class OutputFolder:
    """The paths of a Ray engine output folder (see the module docstring)."""

    path: str

    @property
    def state(self) -> str:
        return os.path.join(self.path, "_tembed")

    @property
    def manifest(self) -> str:
        return os.path.join(self.state, "run.json")

    @property
    def temporary(self) -> str:
        return os.path.join(self.state, "tmp")

    @property
    def rejects(self) -> str:
        """The merged rejects file, beside the folder: ``out/`` -> ``out.rejects.jsonl``."""
        return self.path.rstrip(os.sep) + ".rejects.jsonl"

    def part(self, index: int) -> str:
        return os.path.join(self.path, f"part-{index:06d}.parquet")

    def shard_rejects(self, index: int) -> str:
        return os.path.join(self.state, f"rejects-{index:06d}.jsonl")


@dataclass(frozen=True)
class ShardSpec:
    """What every actor needs besides the model: where to write and the job's record rules.

    Attributes:
        output: the output folder (absolute; on shared storage for a cluster).
        fields: the text / id / title fields.
        skip_invalid: bad records go to the rejects instead of failing the run.
        chunk_size: records per encode call and per row group.
        metadata: the schema's ``b"tembed"`` metadata beyond model, kind and dim (the run's options).
        files: every input file and its format (for the driver's progress bar).
        model: what the model must resolve to on every actor (:func:`~tembed.jobs.plan.model_record`: backend,
            device type, files fingerprint), so that no output mixes vectors of different models or backends.
    """

    output: str
    fields: Fields = field(default_factory=Fields)
    skip_invalid: bool = False
    chunk_size: int = 2048
    metadata: dict[str, Any] = field(default_factory=dict)
    files: tuple[tuple[str, str], ...] = ()
    model: dict[str, Any] = field(default_factory=dict)


class ModelMismatch(RuntimeError):
    """An actor's model resolved to another backend, device type or model files than the run's."""


def _check_model(expected: dict[str, Any], loaded: dict[str, Any]) -> None:
    if expected == loaded:
        return
    keys = sorted(set(expected) | set(loaded))
    changed = [
        f"{key} {expected.get(key)!r} -> {loaded.get(key)!r}" for key in keys if expected.get(key) != loaded.get(key)
    ]
    raise ModelMismatch(
        f"the model on this node differs from the run's ({'; '.join(changed)}): install the same model files and "
        f"tembed on every node"
    )


def _node_id() -> str:
    """The Ray node this runs on (several nodes may share one host name), or the host name outside Ray."""
    try:
        import ray

        return str(ray.get_runtime_context().get_node_id())
    except Exception:
        return socket.gethostname()


def summary_schema() -> pa.Schema:
    """The schema of the rows :class:`ShardEncoder` returns: one per shard done."""
    import pyarrow as pa

    return pa.schema(
        [
            ("shard", pa.int64()),
            ("rows", pa.int64()),
            ("rejected", pa.int64()),
            ("tokens", pa.int64()),
            ("seconds", pa.float64()),
            ("ready", pa.float64()),
            ("load_seconds", pa.float64()),
            ("node", pa.string()),
        ]
    )


@dataclass
class _ShardState:
    rows: int = 0
    tokens: int = 0
    rejects: list[Rejected] = field(default_factory=list)


class ShardEncoder:
    """The callable class of ``tembed encode --engine ray``: ``map_batches(ShardEncoder, batch_size=1, ...)`` over
    rows of :meth:`Shard.as_row`. The model is loaded once per actor (:class:`~tembed.ray.batch.TableEncoder`).

    Raises (from a call):
        BadRecord: a bad record without ``skip_invalid``: ``"FILE line N: reason"``.
        Exception: a record that fails to encode, without ``skip_invalid``: its original type and message, with
            ``"FILE line N (id 'x')"`` in front.
    """

    def __init__(
        self,
        config: EmbedderConfig,
        options: EncodeOptions,
        spec: ShardSpec,
        *,
        device: str | None = None,
        threads: int | None = None,
    ) -> None:
        self.spec = spec
        self.folder = OutputFolder(spec.output)
        self.core = TableEncoder(config, options, device=device, threads=threads, metadata=spec.metadata)
        if spec.model:
            _check_model(spec.model, model_record(self.core.encoder.settings, [device or "cpu"]))
        self.ready = time.time()
        settings = self.core.encoder.settings
        self.weigh: Callable[[Item], int] | None = None
        if OutputWeigher.needed(options.outputs):
            colbert_dim = settings.colbert_dim if "colbert" in options.outputs else None
            instruction = settings.instruction_for(self.core.call_options)
            token_limit = self.core.call_options.max_length or 0
            self.weigh = OutputWeigher(options.outputs, settings.dim, colbert_dim, instruction, token_limit)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        rows = [self.encode_shard(Shard.from_row(row)) for row in batch.to_pylist()]
        return pa.Table.from_pylist(rows, schema=summary_schema())

    def encode_shard(self, shard: Shard) -> dict[str, Any]:
        """Read, check, encode and write one shard (see the module docstring). Returns its summary row."""
        import pyarrow.parquet as pq

        started = time.perf_counter()
        state = _ShardState()
        os.makedirs(self.folder.temporary, exist_ok=True)
        temporary = os.path.join(self.folder.temporary, f"part-{shard.index:06d}.{uuid.uuid4().hex}.parquet")
        items = shard_items(shard, self.spec.fields)
        with synced_file(temporary) as handle, pq.ParquetWriter(handle, self.core.schema) as writer:
            for chunk in chunks(items, self.spec.chunk_size, self.weigh, CHUNK_OUTPUT_BYTES):
                self._chunk(shard, chunk, writer, state)
        if state.rejects:
            lines = [
                json.dumps({"input": shard.name, "line": r.line_number, "reason": r.reason}) + "\n"
                for r in sorted(state.rejects, key=lambda r: r.line_number)
            ]
            write_durably(self.folder.shard_rejects(shard.index), "".join(lines).encode())
        os.replace(temporary, self.folder.part(shard.index))
        fsync_directory(self.folder.path)
        return {
            "shard": shard.index,
            "rows": state.rows,
            "rejected": len(state.rejects),
            "tokens": state.tokens,
            "seconds": time.perf_counter() - started,
            "ready": self.ready,
            "load_seconds": self.core.load_seconds,
            "node": _node_id(),
        }

    def _chunk(self, shard: Shard, chunk: list[Item], writer: Any, state: _ShardState) -> None:
        records, rejects = split_items(chunk)
        if rejects and not self.spec.skip_invalid:
            raise BadRecord(f"{shard.name} line {rejects[0].line_number}: {rejects[0].reason}")
        state.rejects.extend(rejects)
        if not records:
            return
        done, result, failures = self._encode(shard, records)
        if failures:
            record, error = failures[0]
            if not self.spec.skip_invalid:
                raise naming_record(error, f"{shard.name} line {record.line_number} (id {record.id!r})") from error
            state.rejects.extend(Rejected(r.line_number, f"encoding failed: {error_text(e)}") for r, e in failures)
        if done and result is not None:
            writer.write_table(self.core.table([r.id for r in done], result), row_group_size=len(done))
            state.rows += len(done)
            state.tokens += token_total(result)

    def _encode(self, shard: Shard, records: list[Record]) -> tuple[list[Record], EncodeOutputs | None, list[Any]]:
        try:
            return self.core.encode_records(records)
        except Exception as error:  # fails whatever the texts: name the lines, keep the type
            first, last = records[0].line_number, records[-1].line_number
            raise naming_record(error, f"{shard.name} lines {first}-{last}") from error
