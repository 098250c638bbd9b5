"""The corpus job: a corpus file to parquet / npy embeddings, a chunk at a time, checkpointed, resumable.

Each chunk of records is encoded through an :class:`~tembed.encoder.Encoder` (one device, or a worker pool: the
job does not care), written durably to ``OUTPUT.partial/part-NNNNNN.parquet`` and recorded in the manifest with
the reader's cursor; at the end the parts are merged into ``OUTPUT`` (see :mod:`tembed.io.checkpoint`). Bad
records stop the job or go to the rejects file (``skip_invalid``); a chunk that fails to encode is retried by
halves (:mod:`tembed.jobs.retry`). With ``quantization`` the parts stay float32 (so ``--resume`` is unchanged) and
the dense vectors are quantized as the parts are merged into a parquet output (:mod:`tembed.quantization`).

Usage (what ``tembed encode`` does, :mod:`tembed.cli.encode`)::

    with contextlib.ExitStack() as held:
        prepared = prepare(request, config, options, held)      # checks, lock, partial run (no model yet)
        encoder = open_encoder(config, device)
        try:
            job = CorpusJob(encoder, options, prepared.reader, request.output, prepared.out_format,
                            prepared.checkpoint(encoder.settings))
            result = job.run()                                  # JobError / JobInterrupted
        finally:
            encoder.close()
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tembed.io import writers
from tembed.io.readers import InputError, Record, Rejected
from tembed.jobs import DEFAULT_CHUNK_SIZE
from tembed.jobs.errors import (
    EXIT_REFUSED,
    WRITE_ERRNOS,
    JobError,
    bad_record,
    error_text,
    interrupted,
    names,
    remove_if_empty,
    write_failed,
)
from tembed.jobs.outcome import JobResult, Report, progress_bar, report_to_stderr, summary
from tembed.jobs.plan import Checkpoint
from tembed.jobs.records import (
    IdHashes,
    OutputWeigher,
    ReaderFactory,
    chunks,
    reload_ids,
    split_items,
    split_line_break_ids,
)
from tembed.jobs.retry import NotTheTexts, encode_by_halves
from tembed.outputs import EncodeOutputs
from tembed.settings import EncodeOptions, clamp_max_length

if TYPE_CHECKING:
    import numpy as np

    from tembed.encoder import Encoder
    from tembed.io.readers import Item, Reader
    from tembed.quantization import DenseQuantization

CHUNK_OUTPUT_BYTES = 64_000_000
"""With ColBERT or sparse outputs, a chunk also ends once the estimated output of its records reaches this many
bytes (ColBERT: tokens x dim x 4; sparse: tokens x SPARSE_BYTES_PER_TOKEN), so long texts do not multiply the
memory. A chunk's output is held several times over while it is converted and written (about 6x measured), hence
64 MB."""


@dataclass(frozen=True)
class JobOptions:
    """How a corpus job runs (what does not change the vectors).

    Attributes:
        chunk_size: records per chunk: per output row group and per checkpoint.
        skip_invalid: bad records (and texts that fail to encode) go to the rejects file instead of stopping.
        unique_ids: a record whose id an earlier record has is a bad record (else duplicates are counted).
        quiet: no progress bar, no resume notice and no summary.
        progress: draw a progress bar (on stderr) when not quiet.
        total: the records expected, for the bar (None: unknown).
        chunk_output_bytes: the output-size bound of a ColBERT / sparse chunk; None: :data:`CHUNK_OUTPUT_BYTES`.
    """

    chunk_size: int = DEFAULT_CHUNK_SIZE
    skip_invalid: bool = False
    unique_ids: bool = False
    quiet: bool = False
    progress: bool = False
    total: int | None = None
    chunk_output_bytes: int | None = None


@dataclass
class _Counters:
    """Where the job stood when this run started, and its clock."""

    rows: int
    rejected: int
    tokens: int
    seconds: float
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


@dataclass
class CorpusJob:
    """Encode a corpus to ``output`` through ``encoder`` (see the module docstring).

    Args:
        encoder: any :class:`~tembed.encoder.Encoder`, already open (the caller closes it).
        encode_options: the role, max length and outputs of every encode call.
        reader_factory: opens the input at a cursor (None: the beginning).
        output: the ``.parquet`` or ``.npy`` path; ``out_format``: ``"parquet"`` or ``"npy"``.
        checkpoint: the partial run to write to (fresh, or resumed and checked).
        options: :class:`JobOptions`.
        report: receives the lines for the user (the resume notice, the summary).
        load_seconds: the time the model took to load, for the summary.
        quantization: how to quantize the dense column of a parquet output at the merge (default None: float32).
    """

    encoder: Encoder
    encode_options: EncodeOptions
    reader_factory: ReaderFactory
    output: str
    out_format: str
    checkpoint: Checkpoint
    options: JobOptions = JobOptions()
    report: Report = report_to_stderr
    load_seconds: float = 0.0
    quantization: DenseQuantization | None = None

    def __post_init__(self) -> None:
        settings = self.encoder.settings
        asked = self.encode_options
        if self.quantization is not None:  # checked before anything is encoded
            if self.out_format != "parquet" or "dense" not in asked.outputs:
                raise JobError("quantization needs the dense output written to .parquet", EXIT_REFUSED)
            try:
                self.quantization.check(settings.dim)
            except ValueError as error:
                raise JobError(str(error), EXIT_REFUSED) from None
        # Clamped (with one warning for a --max-length beyond the model's limit) once for the whole run.
        self.token_limit = clamp_max_length(
            settings.max_length_for(asked), settings.max_seq_length, warn=asked.max_length is not None
        )
        self.call_options = dataclasses.replace(asked, max_length=self.token_limit)
        self.colbert_dim = settings.colbert_dim if "colbert" in asked.outputs else None
        manifest = self.checkpoint.manifest
        metadata = {"model": manifest.options["model"], "kind": asked.role.value, "dim": settings.dim}
        self.table_schema = writers.schema(
            asked.outputs, settings.dim, self.colbert_dim, metadata={**metadata, **manifest.options}
        )
        self.known_ids = IdHashes(keep_lines=self.options.unique_ids)
        self.bar: Any = None

    # ------------------------------------------------------------------------------------------------ run
    def run(self) -> JobResult:
        """Encode what is left, merge, and report (unless quiet).

        Raises:
            JobError: a bad record or a chunk that fails to encode (without skip_invalid), an unreadable input,
                a failed write (exit code 1); what is kept for --resume is said.
            JobInterrupted: KeyboardInterrupt (Ctrl-C, or SIGTERM turned into it) stopped the job.
        """
        partial, manifest = self.checkpoint.partial, self.checkpoint.manifest
        input_path = str(manifest.input.get("path", ""))
        try:
            return self._run()
        except InputError as error:
            raise JobError(str(error)) from None
        except OSError as error:
            if error.errno not in WRITE_ERRNOS or names(error.filename, input_path):
                raise
            raise JobError(write_failed(self.output, error, partial, stdin=input_path == "-")) from None

    def _run(self) -> JobResult:
        partial, manifest = self.checkpoint.partial, self.checkpoint.manifest
        if self.checkpoint.fresh:
            partial.start(manifest)
        elif not self.options.quiet:
            self.report(
                f"resuming {partial.directory}: {manifest.rows:,} records done"
                + (f", {manifest.rejected:,} rejected" if manifest.rejected else "")
                + (f", continuing at line {manifest.cursor['line'] + 1:,}" if manifest.cursor.get("line") else "")
            )
        before = _Counters(manifest.rows, manifest.rejected, manifest.tokens, manifest.seconds)
        show = self.options.progress and not self.options.quiet
        self.bar = progress_bar(self.options.total, manifest.rows + manifest.rejected, show)
        try:
            self._encode_all(before)
            self.bar.close()
            self._merge()
        except InputError:
            remove_if_empty(partial, manifest)
            raise
        except KeyboardInterrupt:
            raise interrupted(partial, manifest) from None
        finally:
            self.bar.close()  # before any message (tqdm's close is idempotent)
        partial.remove()
        result = self._result(before)
        if not self.options.quiet:
            self.report(summary(result, self.output, self.load_seconds))
        return result

    # ------------------------------------------------------------------------------------------------ chunks
    def _encode_all(self, before: _Counters) -> None:
        partial, manifest = self.checkpoint.partial, self.checkpoint.manifest
        if manifest.parts:  # the ids the interrupted run wrote, for duplicate counting / refusal
            parts = [partial.path(name) for name in manifest.parts]
            reload_ids(self.known_ids, parts, self.reader_factory, manifest.cursor)
        if manifest.input_done:
            return
        reader = self.reader_factory(manifest.cursor)
        outputs = self.encode_options.outputs
        weigh: Callable[[Item], int] | None = None
        if OutputWeigher.needed(outputs):
            instruction = self.encoder.settings.instruction_for(self.encode_options)
            weigh = OutputWeigher(outputs, self.encoder.settings.dim, self.colbert_dim, instruction, self.token_limit)
        budget = self.options.chunk_output_bytes or CHUNK_OUTPUT_BYTES
        for chunk in chunks(reader, self.options.chunk_size, weigh, budget):
            self._chunk(reader, chunk, before)
        manifest.input_done = True
        partial.save(manifest)

    def _chunk(self, reader: Reader, chunk: list[Item], before: _Counters) -> None:
        """Check, encode and write one chunk, then record it in the manifest."""
        partial, manifest = self.checkpoint.partial, self.checkpoint.manifest
        records, rejects = self._checked(chunk)
        if rejects and not self.options.skip_invalid:
            first = rejects[0]
            raise bad_record(f"{reader.name} line {first.line_number}: {first.reason}", partial, manifest, self.output)
        index = len(manifest.parts) + len(manifest.reject_files)
        result = None
        if records:
            records, result, failed = self._encode(reader.name, records)
            rejects = _in_file_order(rejects, failed)
        if records and result is not None:
            name = f"part-{index:06d}.parquet"
            writers.write_part(
                partial.path(name), writers.chunk_table([r.id for r in records], result, self.table_schema)
            )
            manifest.parts.append(name)
            self.known_ids.add(records)
            manifest.tokens += token_total(result)
        if rejects:
            name = f"rejects-{index:06d}.jsonl"
            lines = [
                json.dumps({"input": reader.name, "line": item.line_number, "reason": item.reason}) + "\n"
                for item in rejects
            ]
            writers.write_durably(partial.path(name), "".join(lines).encode())
            manifest.reject_files.append(name)
        manifest.rows += len(records)
        manifest.rejected += len(rejects)
        manifest.cursor = reader.cursor
        manifest.seconds = before.seconds + before.elapsed()
        partial.save(manifest)
        self.bar.update(len(chunk))
        if before.elapsed() > 0:
            self.bar.set_postfix_str(
                f"{(manifest.tokens - before.tokens) / before.elapsed():,.0f} tok/s", refresh=False
            )

    def _checked(self, chunk: list[Item]) -> tuple[list[Record], list[Rejected]]:
        """A chunk's records to encode and its bad records (ids .npy cannot hold, duplicates with unique_ids)."""
        records, rejects = split_items(chunk)
        if self.out_format == "npy":
            records, line_breaks = split_line_break_ids(records)
            rejects = _in_file_order(rejects, line_breaks)
        if self.options.unique_ids:
            records, duplicates = self.known_ids.refuse_duplicates(records)
            rejects = _in_file_order(rejects, duplicates)
        return records, rejects

    def _encode_texts(self, texts: Sequence[str]) -> EncodeOutputs:
        return self.encoder.encode(texts, self.call_options)

    def _encode(self, name: str, records: list[Record]) -> tuple[list[Record], EncodeOutputs | None, list[Rejected]]:
        """``(records encoded, their outputs, rejects)``: any failure of the library is named with its lines, never
        a traceback; with skip_invalid a failing chunk is encoded by halves and only the texts that fail are
        rejected."""
        try:
            return records, self._encode_texts([r.text for r in records]), []
        except Exception as error:
            if not self.options.skip_invalid:
                raise self._encode_failed(name, records, error) from None
            try:
                done, result, failures = encode_by_halves(self._encode_texts, records, error)
            except NotTheTexts:
                raise self._encode_failed(name, records, error) from None
            failed = [Rejected(r.line_number, f"encoding failed: {error_text(e)}") for r, e in failures]
            return done, result, failed

    def _encode_failed(self, name: str, records: list[Record], error: BaseException) -> JobError:
        first, last = records[0].line_number, records[-1].line_number
        where = f"line {first}" if first == last else f"lines {first}-{last}"
        head = f"{name} {where}: encoding failed: {error_text(error)}"
        return bad_record(head, self.checkpoint.partial, self.checkpoint.manifest, self.output)

    # ------------------------------------------------------------------------------------------------ the end
    def _merge(self) -> None:
        """The parts into OUTPUT (redone by --resume if interrupted): temporary files in the partial folder, then
        ``os.replace`` into place, the main output last."""
        partial, manifest = self.checkpoint.partial, self.checkpoint.manifest
        parts = [partial.path(name) for name in manifest.parts]
        final_tmp = partial.path("final.tmp")
        moves = []
        if self.out_format == "parquet" and self.quantization is not None:
            self._merge_quantized(parts, final_tmp, self.quantization)
        elif self.out_format == "parquet":
            writers.merge_parquet(parts, final_tmp, self.table_schema)
        else:
            ids_tmp = partial.path("ids.tmp")
            writers.merge_npy(parts, final_tmp, ids_tmp, manifest.rows, self.encoder.settings.dim)
            moves.append((ids_tmp, writers.ids_path(self.output)))
        if self.options.skip_invalid or manifest.rejected:
            rejects_tmp = partial.path("rejects.tmp")
            with open(rejects_tmp, "wb") as handle:
                for name in manifest.reject_files:
                    with open(partial.path(name), "rb") as part:
                        handle.write(part.read())
                handle.flush()
                os.fsync(handle.fileno())
            moves.append((rejects_tmp, writers.rejects_path(self.output)))
        moves.append((final_tmp, self.output))
        for source, destination in moves:
            os.replace(source, destination)

    def _merge_quantized(self, parts: list[str], destination: str, quantization: DenseQuantization) -> None:
        """The parts into ``destination`` with the dense column quantized: int8 / uint8 without given ranges are
        calibrated on the whole corpus first (one more pass over the parts' dense column)."""
        from tembed.quantization import bytes_per_vector, quantize

        dim, precision = self.encoder.settings.dim, quantization.precision
        ranges = writers.dense_ranges(parts) if quantization.calibrated else quantization.ranges
        entry = quantization.metadata(dim, ranges)
        dtype = "int8" if precision in ("int8", "binary") else "uint8"
        width = bytes_per_vector(precision, dim)
        output_schema = writers.quantized_schema(self.table_schema, quantization.column, dtype, width, entry)

        def codes_of(dense: np.ndarray) -> np.ndarray:
            return quantize(dense, precision, ranges=ranges)

        def transform(table: Any) -> Any:
            return writers.quantize_dense(table, output_schema, codes_of)

        writers.merge_parquet(parts, destination, self.table_schema, output_schema=output_schema, transform=transform)

    def _result(self, before: _Counters) -> JobResult:
        manifest = self.checkpoint.manifest
        done = manifest.rows - before.rows
        return JobResult(
            rows=manifest.rows,
            rejected=manifest.rejected,
            tokens=manifest.tokens,
            distinct_ids=self.known_ids.distinct,
            rows_done=done,
            rows_before=before.rows,
            tokens_done=manifest.tokens - before.tokens,
            seconds=before.elapsed(),
            nothing_left=not self.checkpoint.fresh and done == 0 and manifest.rejected == before.rejected,
        )


def _in_file_order(first: list[Rejected], second: list[Rejected]) -> list[Rejected]:
    return sorted(first + second, key=lambda item: item.line_number) if second else first


def token_total(result: EncodeOutputs) -> int:
    """The tokens a chunk was encoded with (instruction and special tokens included, after truncation)."""
    counts = result.token_counts
    if counts is None:
        return 0
    return int(counts) if isinstance(counts, int) else int(counts.sum())
