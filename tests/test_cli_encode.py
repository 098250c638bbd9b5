"""``tembed encode``: every input and output format on real text, resume after SIGKILL, bad input, stdin.

Runs go through the real command line (typer's CliRunner, in-process) with one encoder per distinct set of model
options shared between runs (``tembed.cli.encode.open_job_encoder`` replaced); the SIGKILL test runs
``python -m tembed.cli encode`` as a subprocess and kills it mid-run.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tembed.cli import app
from tembed.cli import encode as cli_encode
from tembed.io.readers import Reader

from realdata import insuranceqa_answers, sts_b_sentences

MAX_LENGTH = 32
INPUT_FORMATS = ("jsonl", "csv", "tsv", "parquet", "txt")


class SharedEncoder:
    """An encoder shared between runs: the run's close() leaves it open (the fixture closes it at the end)."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder

    @property
    def settings(self):
        return self.encoder.settings

    def encode(self, texts, options):
        return self.encoder.encode(texts, options)

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def shared_models():
    """Open each model once for the whole module: the CLI's opener returns a cached encoder, one per distinct
    (model options, devices): the model, backend, precision, batch size, outputs and devices of a run."""
    from tembed.encoder import open_encoder

    cache: dict = {}

    def open_job_encoder(config, device):
        key = (config, tuple(device) if isinstance(device, list) else device)
        if key not in cache:
            cache[key] = open_encoder(config, device)
        return SharedEncoder(cache[key])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli_encode, "open_job_encoder", open_job_encoder)
        yield cache
    for encoder in cache.values():
        encoder.close()


@pytest.fixture(scope="module")
def corpus() -> list[tuple[str, str]]:
    """(id, text): 60 InsuranceQA answers and 60 STS-B sentences (commas, quotes, apostrophes)."""
    texts = insuranceqa_answers()[:60] + sts_b_sentences("test")[:60]
    assert all("\t" not in text and "\n" not in text for text in texts)
    return [(f"doc-{index:04d}", text) for index, text in enumerate(texts)]


@pytest.fixture(scope="module")
def expected(minilm, corpus) -> np.ndarray:
    return minilm.encode_corpus([text for _, text in corpus], max_length=MAX_LENGTH)


def invoke(*args: str, stdin: bytes | None = None):
    return CliRunner().invoke(app, ["encode", *args], input=stdin, catch_exceptions=False)


def encode_ok(*args: str, stdin: bytes | None = None):
    result = invoke(*args, stdin=stdin)
    assert result.exit_code == 0, result.output
    return result


def write_input(path, fmt: str, rows: list[tuple[str, str]]) -> str:
    path = str(path)
    if fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps({"id": i, "text": t}) + "\n" for i, t in rows)
    elif fmt == "csv":
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "text"])
            writer.writerows(rows)
    elif fmt == "tsv":
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("id\ttext\n")
            handle.writelines(f"{i}\t{t}\n" for i, t in rows)
    elif fmt == "parquet":
        table = pa.table({"id": [i for i, _ in rows], "text": [t for _, t in rows]})
        pq.write_table(table, path, row_group_size=37)  # several row groups
    elif fmt == "txt":
        with open(path, "w", encoding="utf-8") as handle:
            handle.writelines(f"{t}\n" for _, t in rows)
    return path


def read_output(path: str) -> tuple[list[str], np.ndarray]:
    if path.endswith(".npy"):
        with open(path[: -len(".npy")] + ".ids.txt", encoding="utf-8") as handle:
            ids = handle.read().splitlines()
        return ids, np.load(path)
    table = pq.read_table(path)
    ids = table.column("id").to_pylist()
    dense = table.column("dense").combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
    return ids, dense


def leftovers(output: str) -> list[str]:
    folder = os.path.dirname(output)
    return sorted(name for name in os.listdir(folder) if name.startswith(os.path.basename(output)))


# ----------------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("out_suffix", ["parquet", "npy"])
@pytest.mark.parametrize("fmt", INPUT_FORMATS)
def test_every_input_and_output_format(shared_models, minilm_path, corpus, expected, tmp_path, fmt, out_suffix):
    source = write_input(tmp_path / f"corpus.{fmt}", fmt, corpus)
    output = str(tmp_path / f"emb.{out_suffix}")
    result = encode_ok(source, "-o", output, "-m", minilm_path, "--max-length", str(MAX_LENGTH), "--chunk-size", "64")
    ids, dense = read_output(output)
    want_ids = [str(n) for n in range(1, len(corpus) + 1)] if fmt == "txt" else [i for i, _ in corpus]
    assert ids == want_ids
    assert dense.dtype == np.float32 and dense.shape == (len(corpus), 384)
    np.testing.assert_allclose(dense, expected, atol=1e-5)
    assert f"encoded {len(corpus)} texts" in result.stderr
    assert not os.path.exists(output + ".partial")
    if out_suffix == "parquet":
        assert pq.ParquetFile(output).num_row_groups == 2  # one row group per chunk of 64
        assert pq.read_schema(output).field("dense").type == pa.list_(pa.float32(), 384)


def test_title_is_joined_like_the_reference(shared_models, minilm, minilm_path, corpus, tmp_path):
    rows = corpus[:40]
    source = tmp_path / "titled.jsonl"
    with open(source, "w", encoding="utf-8") as handle:
        for index, (identifier, text) in enumerate(rows):
            title = f"Answer {index}" if index % 2 else ""
            handle.write(json.dumps({"id": identifier, "title": title, "text": text}) + "\n")
    output = str(tmp_path / "titled.parquet")
    encode_ok(str(source), "-o", output, "-m", minilm_path, "--max-length", str(MAX_LENGTH))
    joined = [f"{'Answer ' + str(i) if i % 2 else ''} {text}".strip() for i, (_, text) in enumerate(rows)]
    _, dense = read_output(output)
    np.testing.assert_allclose(dense, minilm.encode_corpus(joined, max_length=MAX_LENGTH), atol=1e-5)


def test_sparse_and_colbert_columns(shared_models, tiny_m3_path, corpus, tmp_path):
    from tembed import Embedder

    rows = corpus[:30]
    source = write_input(tmp_path / "m3.jsonl", "jsonl", rows)
    output = str(tmp_path / "m3.parquet")
    args = ["--dense", "--sparse", "--colbert", "--max-length", "48", "--device", "cpu"]
    encode_ok(source, "-o", output, "-m", tiny_m3_path, *args)
    table = pq.read_table(output)
    assert table.column_names == ["id", "dense", "sparse_ids", "sparse_weights", "colbert"]
    with Embedder(tiny_m3_path, device="cpu") as m3:
        want = m3.encode_corpus([t for _, t in rows], max_length=48, outputs=("dense", "sparse", "colbert"))
    _, dense = read_output(output)
    np.testing.assert_allclose(dense, want.dense, atol=1e-5)
    for row, (token_ids, weights, colbert) in enumerate(
        zip(
            table.column("sparse_ids").to_pylist(),
            table.column("sparse_weights").to_pylist(),
            table.column("colbert").to_pylist(),
            strict=True,
        )
    ):
        assert token_ids == sorted(want.sparse[row])
        np.testing.assert_allclose(weights, [want.sparse[row][t] for t in token_ids], atol=1e-5)
        np.testing.assert_allclose(np.asarray(colbert, dtype=np.float32), want.colbert[row], atol=1e-5)
    only_sparse = str(tmp_path / "sparse.parquet")
    encode_ok(source, "-o", only_sparse, "-m", tiny_m3_path, "--sparse", "--max-length", "48", "--device", "cpu")
    assert pq.read_schema(only_sparse).names == ["id", "sparse_ids", "sparse_weights"]


def test_npy_refuses_sparse(minilm_path, tmp_path):
    result = invoke("x.jsonl", "-o", str(tmp_path / "e.npy"), "--sparse", "-m", minilm_path)
    assert result.exit_code == 2
    assert ".npy holds dense vectors only" in result.stderr


# ----------------------------------------------------------------------------------------------- stdin
@pytest.mark.parametrize("fmt", ["jsonl", "txt", "csv"])
def test_stdin(shared_models, minilm_path, corpus, expected, tmp_path, fmt):
    with open(write_input(tmp_path / f"in.{fmt}", fmt, corpus[:50]), "rb") as handle:
        data = handle.read()
    output = str(tmp_path / "stdin.parquet")
    args = ["-", "-o", output, "-m", minilm_path, "--max-length", str(MAX_LENGTH)]
    encode_ok(*args, *([] if fmt == "jsonl" else ["--format", fmt]), stdin=data)  # stdin defaults to jsonl
    ids, dense = read_output(output)
    assert ids == ([str(n) for n in range(1, 51)] if fmt == "txt" else [i for i, _ in corpus[:50]])
    np.testing.assert_allclose(dense, expected[:50], atol=1e-5)


# ----------------------------------------------------------------------------------------------- progress
def test_quiet_and_summary(shared_models, minilm_path, corpus, tmp_path):
    source = write_input(tmp_path / "c.txt", "txt", corpus[:20])
    loud = encode_ok(source, "-o", str(tmp_path / "a.parquet"), "-m", minilm_path)
    summary = loud.stderr.strip().splitlines()
    assert len(summary) == 1 and "texts/s" in summary[0] and "tokens/s" in summary[0]  # no bar: not a terminal
    assert "encoded 20 texts" in summary[0] and "a.parquet (" in summary[0]
    quiet = encode_ok(source, "-o", str(tmp_path / "b.parquet"), "-m", minilm_path, "--quiet")
    assert quiet.stderr == "" and quiet.stdout == ""


# ----------------------------------------------------------------------------------------------- bad input
JSONL_GOOD = [json.dumps({"id": f"g{i}", "text": t}).encode() for i, t in enumerate(sts_b_sentences("dev")[:6])]
BAD_JSONL = {
    "invalid JSON": (
        b'{"id": "b", "text": "unterminated}',
        "not valid JSON: Unterminated string starting at (column 21)",
    ),
    "invalid UTF-8": (b'{"id": "b", "text": "caf\xe9 au lait"}', "not valid UTF-8 (byte 0xe9 at column 25)"),
    "missing text": (b'{"id": "b", "body": "no text here"}', "no field 'text'"),
    "empty text": (b'{"id": "b", "text": "   "}', "field 'text' is empty"),
    "non-string text": (b'{"id": "b", "text": 42}', "field 'text' is not a string (int: 42)"),
    "null text": (b'{"id": "b", "text": null}', "field 'text' is null"),
    "not an object": (b'["b", "a list"]', "not a JSON object (a JSON list)"),
}


@pytest.mark.parametrize("case", list(BAD_JSONL))
def test_bad_jsonl_record_stops_the_run(shared_models, minilm_path, tmp_path, case):
    bad, reason = BAD_JSONL[case]
    source = tmp_path / "bad.jsonl"
    source.write_bytes(b"\n".join([*JSONL_GOOD[:3], bad, *JSONL_GOOD[3:]]) + b"\n")
    output = str(tmp_path / "out.parquet")
    result = invoke(str(source), "-o", output, "-m", minilm_path, "--chunk-size", "2")
    assert result.exit_code == 1
    message = result.stderr.splitlines()[0]
    assert message.startswith(f"error: {source} line 4: {reason}"), message
    assert "out.parquet was not written" in result.stderr and "--skip-invalid" in result.stderr
    # Chunks before the bad line are kept for --resume, but nothing at OUTPUT looks complete.
    assert leftovers(output) == ["out.parquet.partial"]
    resumed = invoke(str(source), "-o", output, "-m", minilm_path, "--resume", "--skip-invalid")
    assert resumed.exit_code == 0, resumed.output
    assert read_output(output)[0] == [f"g{i}" for i in range(6)]


@pytest.mark.parametrize("case", list(BAD_JSONL))
def test_bad_jsonl_record_skipped(shared_models, minilm, minilm_path, tmp_path, case):
    bad, reason = BAD_JSONL[case]
    source = tmp_path / "bad.jsonl"
    source.write_bytes(b"\n".join([*JSONL_GOOD[:3], bad, *JSONL_GOOD[3:], bad]) + b"\n")
    output = str(tmp_path / "out.npy")
    result = encode_ok(str(source), "-o", output, "-m", minilm_path, "--skip-invalid", "--chunk-size", "3")
    assert "2 rejected" in result.stderr
    ids, dense = read_output(output)
    assert ids == [f"g{i}" for i in range(6)]
    np.testing.assert_allclose(dense, minilm.encode_corpus(sts_b_sentences("dev")[:6]), atol=1e-5)
    with open(tmp_path / "out.rejects.jsonl", encoding="utf-8") as handle:
        rejects = [json.loads(line) for line in handle]
    assert [r["line"] for r in rejects] == [4, 8]
    assert all(r["reason"].startswith(reason) and r["input"] == str(source) for r in rejects)


def test_bad_first_chunk_leaves_nothing(shared_models, minilm_path, tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_bytes(b'{"id": 1, "text": "fine"}\n{"id": 2}\n')
    output = str(tmp_path / "out.parquet")
    result = invoke(str(source), "-o", output, "-m", minilm_path)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {source} line 2: no field 'text'\n")
    assert leftovers(output) == []


BAD_OTHER = {
    "txt invalid UTF-8": ("txt", b"first line\nsecond \xff line\nthird line\n", 2, "not valid UTF-8 (byte 0xff"),
    "txt empty line": ("txt", b"first line\n\nthird line\n", 2, "empty"),
    "csv invalid UTF-8": ("csv", b"id,text\na,first\nb,caf\xe9\nc,third\n", 3, "not valid UTF-8 (byte 0xe9"),
    "csv missing text": ("csv", b"id,text\na,first\nb\nc,third\n", 3, "no field 'text' (the row has 1 fields"),
    "csv empty text": ("csv", b'id,text\na,first\nb,""\nc,third\n', 3, "field 'text' is empty"),
    "tsv empty text": ("tsv", b"id\ttext\na\tfirst\nb\t \nc\tthird\n", 3, "field 'text' is empty"),
}


@pytest.mark.parametrize("case", list(BAD_OTHER))
def test_bad_records_in_other_formats(shared_models, minilm_path, tmp_path, case):
    fmt, data, line, reason = BAD_OTHER[case]
    source = tmp_path / f"bad.{fmt}"
    source.write_bytes(data)
    output = str(tmp_path / "out.parquet")
    stopped = invoke(str(source), "-o", output, "-m", minilm_path)
    assert stopped.exit_code == 1
    assert stopped.stderr.startswith(f"error: {source} line {line}: {reason}"), stopped.stderr
    assert leftovers(output) == []
    encode_ok(str(source), "-o", output, "-m", minilm_path, "--skip-invalid")
    ids, _ = read_output(output)
    assert ids == (["1", "3"] if fmt == "txt" else ["a", "c"])
    with open(tmp_path / "out.rejects.jsonl", encoding="utf-8") as handle:
        (reject,) = [json.loads(row) for row in handle]
    assert reject["line"] == line and reject["reason"].startswith(reason)


def test_parquet_input_bad_rows_and_missing_column(shared_models, minilm_path, tmp_path):
    source = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": ["first", None, "third"]}), source)
    output = str(tmp_path / "out.parquet")
    stopped = invoke(source, "-o", output, "-m", minilm_path)
    assert stopped.exit_code == 1 and f"error: {source} line 2: field 'text' is null" in stopped.stderr
    encode_ok(source, "-o", output, "-m", minilm_path, "--skip-invalid")
    assert read_output(output)[0] == ["a", "c"]
    missing = invoke(source, "-o", output, "-m", minilm_path, "--text-field", "body")
    assert missing.exit_code == 1 and "no column 'body' (columns: id, text)" in missing.stderr


# ----------------------------------------------------------------------------------------------- resume
def interrupt_at_part(patch, number: int) -> None:
    """Make the ``number``-th part write raise KeyboardInterrupt (as Ctrl-C would), the earlier ones succeed."""
    from tembed.io import writers

    real, calls = writers.write_part, []

    def write_part(path, table):
        calls.append(path)
        if len(calls) >= number:
            raise KeyboardInterrupt
        real(path, table)

    patch.setattr(writers, "write_part", write_part)


def test_interrupt_then_resume_equals_uninterrupted(shared_models, minilm_path, corpus, expected, tmp_path):
    from tembed.io import writers

    source = write_input(tmp_path / "c.jsonl", "jsonl", corpus)
    output = str(tmp_path / "out.parquet")
    args = [source, "-o", output, "-m", minilm_path, "--max-length", str(MAX_LENGTH), "--chunk-size", "30"]
    real_write_part = writers.write_part
    calls = []

    def write_part_then_interrupt(path, table):
        calls.append(path)
        if len(calls) == 3:
            real_write_part(path, table)  # the part is written, the manifest not yet updated: an orphan
            raise KeyboardInterrupt
        real_write_part(path, table)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(writers, "write_part", write_part_then_interrupt)
        stopped = invoke(*args)
    assert stopped.exit_code == 130
    assert "interrupted: 60 records are kept" in stopped.stderr and "--resume" in stopped.stderr
    assert leftovers(output) == ["out.parquet.partial"]

    refused = invoke(*args)
    assert refused.exit_code == 2 and "pass --resume to continue it, or --restart" in refused.stderr
    changed = invoke(*args[:-4], "--max-length", "16", "--chunk-size", "30", "--resume")
    assert changed.exit_code == 2 and "options differ" in changed.stderr and "max_length 32 -> 16" in changed.stderr

    resumed = encode_ok(*args, "--resume")
    assert "resuming" in resumed.stderr and "60 records done" in resumed.stderr
    ids, dense = read_output(output)
    assert ids == [i for i, _ in corpus]
    np.testing.assert_allclose(dense, expected, atol=1e-5)
    assert leftovers(output) == ["out.parquet"]


def test_resume_refuses_a_changed_input(shared_models, minilm_path, corpus, tmp_path):
    from tembed.io import writers

    source = write_input(tmp_path / "c.txt", "txt", corpus[:60])
    output = str(tmp_path / "out.npy")
    args = [source, "-o", output, "-m", minilm_path, "--chunk-size", "20", "--max-length", "16"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(writers, "write_part", lambda path, table: (_ for _ in ()).throw(KeyboardInterrupt))
        assert invoke(*args).exit_code == 130
    assert leftovers(output) == []  # nothing was done: nothing kept
    with pytest.MonkeyPatch.context() as patch:
        real, calls = writers.write_part, []
        patch.setattr(writers, "write_part", lambda p, t: calls.append(p) or (real(p, t) if len(calls) < 2 else _kbi()))
        assert invoke(*args).exit_code == 130
    with open(source, "a", encoding="utf-8") as handle:
        handle.write("one more line\n")
    refused = invoke(*args, "--resume")
    assert refused.exit_code == 2 and "the input changed" in refused.stderr
    restarted = encode_ok(*args, "--restart")
    assert "encoded 61 texts" in restarted.stderr
    assert read_output(output)[1].shape == (61, 384)


def _kbi():
    raise KeyboardInterrupt


def test_sigkill_then_resume_equals_uninterrupted(shared_models, minilm_path, tmp_path):
    """A run killed with SIGKILL after some chunks, then rerun with --resume, gives the uninterrupted file."""
    answers = insuranceqa_answers()[:1200]
    rows = [(f"ans-{i}", text) for i, text in enumerate(answers)]
    source = write_input(tmp_path / "answers.jsonl", "jsonl", rows)
    common = ["-m", minilm_path, "--max-length", "32", "--chunk-size", "50", "--device", "cpu"]
    killed_out = str(tmp_path / "killed.parquet")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "tembed.cli", "encode", source, "-o", killed_out, *common]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = killed_out + ".partial/manifest.json"
    deadline = time.monotonic() + 120
    parts = 0
    try:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with open(manifest, encoding="utf-8") as handle:
                    parts = len(json.load(handle)["parts"])
            except (FileNotFoundError, ValueError):
                parts = 0
            if parts >= 2:
                break
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, stderr.decode()
    assert parts >= 2
    assert not os.path.exists(killed_out)  # nothing complete-looking while unfinished

    encode_ok(source, "-o", killed_out, *common, "--resume")
    full_out = str(tmp_path / "full.parquet")
    encode_ok(source, "-o", full_out, *common, "--chunk-size", "512")
    killed_ids, killed_dense = read_output(killed_out)
    full_ids, full_dense = read_output(full_out)
    assert killed_ids == full_ids == [i for i, _ in rows]
    assert len(set(killed_ids)) == len(rows)
    diff = float(np.abs(killed_dense - full_dense).max())
    print(f"SIGKILL after {parts} chunks, then --resume: {len(rows)} rows, max abs diff {diff:.3g}")
    assert diff <= 1e-5


# ----------------------------------------------------------------------------------------------- readers
def test_reader_cursor_continues_exactly(tmp_path, corpus):
    """A reader opened at another's cursor yields exactly the remaining items, for every line format."""
    for fmt in INPUT_FORMATS:
        source = write_input(tmp_path / f"c.{fmt}", fmt, corpus[:50])
        full = list(Reader(source, fmt))
        first = Reader(source, fmt)
        head = []
        for item in first:
            head.append(item)
            if len(head) == 17:
                break
        rest = list(Reader(source, fmt, cursor=first.cursor))
        assert head + rest == full, fmt
