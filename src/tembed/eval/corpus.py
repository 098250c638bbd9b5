"""The corpus side of a retrieval evaluation: encoded by the corpus job (as ``tembed encode`` does) into a
Parquet file, then read back a block at a time, so memory is bounded by a block, not by the corpus.

The Parquet file is the one ``tembed encode`` writes (columns ``id``, ``dense`` or ``dense_<precision>``,
``sparse_ids`` / ``sparse_weights``, ``colbert``; the run's options as JSON under the schema metadata key
``tembed``), so an already encoded corpus is reused with ``--corpus-embeddings`` after checking that its options
match the evaluation's.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from tembed.eval.data import BeirFolder, EvalDataError, corpus_reader

if TYPE_CHECKING:
    import pyarrow as pa

    from tembed.encoder import Encoder
    from tembed.jobs.outcome import JobResult
    from tembed.settings import EmbedderConfig, EncodeOptions

# The options of an encoded corpus that must equal the evaluation's for its vectors to be reused.
CHECKED_OPTIONS = ("model", "kind", "max_length", "precision", "title_field", "text_field", "id_field")


def encode_corpus(
    data: BeirFolder,
    encoder: Encoder,
    config: EmbedderConfig,
    options: EncodeOptions,
    output: str,
    *,
    quiet: bool,
    progress: bool,
    report: Callable[[str], None],
    skip_invalid: bool = False,
) -> JobResult:
    """Encode ``data.corpus`` (passage role) to the Parquet ``output`` through the corpus job, resuming a run of
    the same options that was interrupted there. A document id seen before is a bad record (ids name documents in
    the qrels). Raises :class:`~tembed.jobs.errors.JobError` as the job does (bad records stop it unless
    ``skip_invalid``)."""
    import dataclasses

    from tembed.io.checkpoint import PartialRun
    from tembed.io.formats import count_items
    from tembed.jobs.corpus import CorpusJob, JobOptions
    from tembed.jobs.plan import CorpusRequest, prepare

    request = CorpusRequest(
        data.corpus, output, "jsonl", "text", "_id", "title", resume=PartialRun(output).exists(), restart=False
    )
    job_options = JobOptions(skip_invalid=skip_invalid, unique_ids=True, quiet=quiet, progress=progress)
    if progress and not quiet:
        job_options = dataclasses.replace(job_options, total=count_items(data.corpus, "jsonl"))
    with contextlib.ExitStack() as held:
        prepared = prepare(request, config, options, held)
        job = CorpusJob(
            encoder,
            options,
            prepared.reader,
            output,
            "parquet",
            prepared.checkpoint(encoder.settings),
            job_options,
            report=report,
        )
        return job.run()


class CorpusEmbeddings:
    """An encoded corpus (a ``tembed encode`` Parquet file) read a block of rows at a time.

    Attributes:
        path: the file. ``rows``: its rows. ``names``: its columns. ``options``: the run's recorded options.
        quantization: the ``tembed encode --quantize`` record (precision, dim, ranges), or None.
    """

    def __init__(self, path: str) -> None:
        import pyarrow.parquet as pq

        if not os.path.isfile(path):
            raise EvalDataError(f"{path}: no such file")
        try:
            self._file = pq.ParquetFile(path)
        except Exception as error:  # pyarrow raises ArrowInvalid / OSError for a file that is not Parquet
            raise EvalDataError(f"{path}: not a readable Parquet file ({error})") from None
        self.path = path
        self.rows = self._file.metadata.num_rows
        self.names = list(self._file.schema_arrow.names)
        raw = (self._file.schema_arrow.metadata or {}).get(b"tembed")
        self.options: dict[str, Any] = json.loads(raw) if raw else {}
        self.quantization: dict[str, Any] | None = self.options.get("quantization")
        if "id" not in self.names:
            raise EvalDataError(f"{path}: no 'id' column: not an output of tembed encode")

    def check(self, recorded: dict[str, Any], columns: Sequence[str]) -> None:
        """EvalDataError unless the file has ``columns`` and was encoded with the options in ``recorded``."""
        missing = [name for name in columns if name not in self.names]
        if missing:
            raise EvalDataError(
                f"{self.path}: no column {', '.join(missing)} (it has {', '.join(self.names)}); encode the corpus "
                f"with those outputs or pass another --corpus-embeddings"
            )
        differ = [
            f"{key} {self.options.get(key)!r} (evaluation: {recorded.get(key)!r})"
            for key in CHECKED_OPTIONS
            if key in recorded and self.options.get(key) != recorded[key]
        ]
        if differ:
            raise EvalDataError(
                f"{self.path} was encoded with other options: {'; '.join(differ)}; remove it or pass another path"
            )

    def blocks(self, columns: Sequence[str], rows: int) -> Iterator[tuple[int, pa.RecordBatch]]:
        """``(first row, batch)`` of ``columns``, ``rows`` rows a batch, in file order."""
        first = 0
        for batch in self._file.iter_batches(batch_size=rows, columns=list(columns)):
            yield first, batch
            first += batch.num_rows


def verify_ids(corpus: CorpusEmbeddings, data: BeirFolder) -> None:
    """EvalDataError unless the file holds the documents of ``data.corpus`` row for row (the same ids in the same
    order, records the reader rejects left out), each id once: a file encoded from another corpus is refused."""
    from tembed.io.readers import Record
    from tembed.jobs.records import id_hashes

    expected = (item.id for item in corpus_reader(data.corpus) if isinstance(item, Record))
    hashes = []
    row = 0
    for _, batch in corpus.blocks(["id"], 65_536):
        ids = id_block(batch)
        for offset, doc_id in enumerate(ids):
            wanted = next(expected, None)
            if wanted != doc_id:
                raise EvalDataError(
                    f"{corpus.path} row {row + offset:,} holds id {doc_id!r} where {data.corpus} has "
                    f"{wanted!r}: it was encoded from another corpus; remove it or pass another --corpus-embeddings"
                )
        hashes.append(id_hashes(ids))
        row += len(ids)
    extra = next(expected, None)
    if extra is not None:
        raise EvalDataError(f"{corpus.path} holds {row:,} documents, {data.corpus} more (first missing: {extra!r})")
    joined = np.sort(np.concatenate(hashes)) if hashes else np.zeros(0, dtype=np.uint64)
    if len(joined) and bool(np.any(joined[1:] == joined[:-1])):
        raise EvalDataError(f"{data.corpus}: a document id appears twice; ids must name one document each")


def dense_block(batch: pa.RecordBatch, column: str = "dense") -> np.ndarray:
    """A fixed-size-list column as a ``(rows, width)`` array (float32 for ``dense``, the codes' dtype else)."""
    array = batch.column(column)
    width = array.type.list_size
    values = array.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(array), width)


def sparse_block(batch: pa.RecordBatch, vocab_size: int, first_row: int) -> Any:
    """The ``sparse_ids`` / ``sparse_weights`` columns as a ``(rows, vocab_size)`` float32 CSR matrix."""
    from scipy.sparse import csr_matrix

    ids = batch.column("sparse_ids")
    weights = batch.column("sparse_weights")
    offsets = ids.offsets.to_numpy()
    indptr = (offsets - offsets[0]).astype(np.int64)
    indices = ids.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    values = weights.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    if len(indices) and int(indices.max()) >= vocab_size:
        row = first_row + int(np.searchsorted(indptr, int(np.argmax(indices >= vocab_size)), side="right")) - 1
        raise EvalDataError(f"row {row}: token id {int(indices.max())} >= the model's vocabulary {vocab_size}")
    return csr_matrix((values, indices, indptr), shape=(len(ids), vocab_size), dtype=np.float32)


def colbert_block(batch: pa.RecordBatch) -> list[np.ndarray]:
    """The ``colbert`` column as one ``(tokens, dim)`` float32 array per row."""
    array = batch.column("colbert")
    width = array.type.value_type.list_size
    offsets = array.offsets.to_numpy()
    flat = array.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    base = offsets[0]
    return [flat[start - base : end - base] for start, end in itertools.pairwise(offsets)]


def id_block(batch: pa.RecordBatch) -> list[str]:
    return [str(value) for value in batch.column("id").to_pylist()]
