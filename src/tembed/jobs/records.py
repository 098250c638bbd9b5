"""The records of a corpus job: chunks (by count and by output bytes), ids (duplicates counted or refused).

* :func:`chunks` cuts the reader's items into chunks of at most ``size``, ending one early once its estimated
  output reaches a byte budget (:class:`OutputWeigher`);
* :class:`IdHashes` keeps the distinct ids written so far, as 64-bit hashes, for the duplicate count and
  ``--unique-ids``; :func:`reload_ids` fills it again on ``--resume``;
* :func:`split_line_break_ids` rejects ids an ``.ids.txt`` file cannot hold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from tembed.io.readers import Cursor, Item, Reader, Record, Rejected
from tembed.text import apply_instruction

T = TypeVar("T")
Hashes = npt.NDArray[np.uint64]
Lines = npt.NDArray[np.int64]
ReaderFactory = Callable[[Cursor | None], Reader]
"""Opens the job's input at a cursor (None: the beginning)."""

SPARSE_BYTES_PER_TOKEN = 100
"""Python dict entries of a sparse output (an int key and a float weight), per token, as an estimate."""
SPECIAL_TOKENS_BOUND = 4
"""CLS / SEP / BOS / EOS a tokenizer adds around a text."""
_RELOAD_BATCH = 65536


def chunks(
    items: Iterable[T], size: int, weigh: Callable[[T], int] | None = None, budget: int = 0
) -> Iterator[list[T]]:
    """Items in chunks of ``size``; with ``weigh`` (an item's estimated output bytes), a chunk also ends as soon as
    its items reach ``budget`` bytes. A chunk ends right after an item, so the reader's cursor is exact."""
    chunk: list[T] = []
    weight = 0
    for item in items:
        chunk.append(item)
        if weigh is not None:
            weight += weigh(item)
        if len(chunk) >= size or (weigh is not None and weight >= budget):
            yield chunk
            chunk = []
            weight = 0
    if chunk:
        yield chunk


class OutputWeigher:
    """A bound on a record's output bytes (its tokens times the bytes per token, plus its dense vector), to end
    ColBERT / sparse chunks by size (see :func:`chunks`); a rejected item weighs nothing.

    A text has at most as many tokens as its UTF-8 bytes (a byte-level tokenizer's worst case) plus the special
    tokens, and never more than the max length: that bound costs no tokenizer pass over the corpus (the encode
    step tokenizes each text once), at the price of chunks smaller than the budget for most text.
    """

    def __init__(
        self,
        outputs: Sequence[str],
        dim: int,
        colbert_dim: int | None,
        instruction: tuple[str | None, str],
        token_limit: int,
    ) -> None:
        colbert = 4 * (colbert_dim or 0) if "colbert" in outputs else 0
        self.per_token = colbert + (SPARSE_BYTES_PER_TOKEN if "sparse" in outputs else 0)
        self.fixed = 4 * dim if "dense" in outputs else 0
        self.instruction, self.instruction_format = instruction
        self.token_limit = token_limit

    @staticmethod
    def needed(outputs: Sequence[str]) -> bool:
        """Whether outputs of these names vary with the text's length (dense only: a fixed size per record)."""
        return "colbert" in outputs or "sparse" in outputs

    def __call__(self, item: Item) -> int:
        if isinstance(item, Rejected):
            return 0
        try:
            prepared = apply_instruction([item.text], self.instruction, self.instruction_format)[0]
            tokens = min(self.token_limit, len(prepared.encode("utf-8", "surrogatepass")) + SPECIAL_TOKENS_BOUND)
        except Exception:  # the encode step reports it; count the most a text can take
            tokens = self.token_limit
        return self.fixed + tokens * self.per_token


def id_hashes(ids: Sequence[str]) -> Hashes:
    """The 64-bit blake2b hash of each id."""
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(i.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
            for i in ids
        ),
        dtype=np.uint64,
        count=len(ids),
    )


def line_numbers(records: Sequence[Record]) -> Lines:
    return np.fromiter((r.line_number for r in records), dtype=np.int64, count=len(records))


class IdHashes:
    """The distinct ids written so far, as 64-bit hashes (blake2b) in a few sorted numpy runs.

    8 bytes per distinct id (16 with ``keep_lines``, which also keeps the line of each id's first record, for
    ``--unique-ids``' message), plus a transient copy while two runs merge; lookups are vectorized per chunk. Two
    different ids share a hash with a chance of about n^2 / 2^65 (n ids): 3e-4 for 100 million.
    """

    def __init__(self, keep_lines: bool) -> None:
        self.keep_lines = keep_lines
        self._runs: list[tuple[Hashes, Lines | None]] = []  # (sorted hashes, their first lines or None), largest first

    @property
    def distinct(self) -> int:
        return sum(len(keys) for keys, _ in self._runs)

    def lookup(self, hashes: Hashes) -> tuple[npt.NDArray[np.bool_], Lines]:
        """For each hash: whether it was seen, and the line it was first seen at (0 when not kept)."""
        found = np.zeros(len(hashes), dtype=bool)
        lines = np.zeros(len(hashes), dtype=np.int64)
        for keys, key_lines in self._runs:
            if not len(keys):
                continue
            at = np.minimum(np.searchsorted(keys, hashes), len(keys) - 1)
            hit = keys[at] == hashes
            if key_lines is not None:
                lines[hit] = key_lines[at[hit]]
            found |= hit
        return found, lines

    def refuse_duplicates(self, records: list[Record]) -> tuple[list[Record], list[Rejected]]:
        """``(kept, rejected)``: a record whose id was written before, or is earlier in ``records``, is rejected."""
        if not records:
            return records, []
        hashes = id_hashes([r.id for r in records])
        found, lines = self.lookup(hashes)
        _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
        first_of = first[inverse.reshape(-1)]
        kept: list[Record] = []
        rejected: list[Rejected] = []
        for position, record in enumerate(records):
            if found[position]:
                earlier = int(lines[position])
            elif first_of[position] != position:
                earlier = records[first_of[position]].line_number
            else:
                kept.append(record)
                continue
            where = f"line {earlier} has it too" if earlier else "the interrupted run wrote it already"
            rejected.append(Rejected(record.line_number, f"duplicate id {record.id!r} ({where})"))
        return kept, rejected

    def add(self, records: Sequence[Record]) -> None:
        """Add the ids of records written (those seen before are counted once)."""
        self.add_hashes(id_hashes([r.id for r in records]), line_numbers(records))

    def add_hashes(self, hashes: Hashes, lines: Lines) -> None:
        """Add ids by their hashes, with the line of each (0: not known)."""
        found, _ = self.lookup(hashes)
        keys, first = np.unique(hashes[~found], return_index=True)
        if not len(keys):
            return
        self._runs.append((keys, lines[~found][first] if self.keep_lines else None))
        # Merge runs of similar size (a binary counter): O(log n) runs, each id merged O(log n) times.
        while len(self._runs) >= 2 and len(self._runs[-2][0]) <= 2 * len(self._runs[-1][0]):
            (keys_a, lines_a), (keys_b, lines_b) = self._runs[-2], self._runs[-1]
            merged = np.concatenate([keys_a, keys_b])
            order = np.argsort(merged, kind="stable")
            merged_lines = None if lines_a is None or lines_b is None else np.concatenate([lines_a, lines_b])[order]
            self._runs[-2:] = [(merged[order], merged_lines)]

    def fill_lines(self, hashes: Hashes, lines: Lines) -> None:
        """Set the first line of ids whose line is not known yet (0), from records in file order."""
        keys_unique, first = np.unique(hashes, return_index=True)
        for keys, key_lines in self._runs:
            if key_lines is None or not len(keys):
                continue
            at = np.minimum(np.searchsorted(keys, keys_unique), len(keys) - 1)
            hit = (keys[at] == keys_unique) & (key_lines[at] == 0)
            key_lines[at[hit]] = lines[first[hit]]


def reload_ids(known: IdHashes, parts: Sequence[str], reader_factory: ReaderFactory, cursor: Cursor) -> None:
    """On --resume: the ids in the parts already written; with --unique-ids also the line of each, by reading the
    input again up to where the interrupted run stopped (ids only; nothing is encoded)."""
    import pyarrow.parquet as pq

    for part in parts:
        ids = pq.read_table(part, columns=["id"]).column("id").to_pylist()
        known.add_hashes(id_hashes(ids), np.zeros(len(ids), dtype=np.int64))
    if not known.keep_lines:
        return
    last_line = max(cursor.get("line", 0), cursor.get("row", 0))
    batch: list[Record] = []
    for item in reader_factory(None):
        if item.line_number > last_line:
            break
        if isinstance(item, Record):
            batch.append(item)
        if len(batch) >= _RELOAD_BATCH:
            known.fill_lines(id_hashes([r.id for r in batch]), line_numbers(batch))
            batch = []
    if batch:
        known.fill_lines(id_hashes([r.id for r in batch]), line_numbers(batch))


def split_line_break_ids(records: list[Record]) -> tuple[list[Record], list[Rejected]]:
    """``(kept, rejected)``: an id holding a line break cannot be written to ``.ids.txt``."""
    kept: list[Record] = []
    bad: list[Rejected] = []
    for record in records:
        if "\n" in record.id or "\r" in record.id:
            bad.append(Rejected(record.line_number, "the id holds a line break (not allowed in .ids.txt)"))
        else:
            kept.append(record)
    return kept, bad


def split_items(chunk: Sequence[Item]) -> tuple[list[Record], list[Rejected]]:
    """A chunk's records and rejects, each in file order."""
    records = [item for item in chunk if isinstance(item, Record)]
    rejects = [item for item in chunk if isinstance(item, Rejected)]
    return records, rejects
