"""``tembed encode`` on awkward records: lone surrogates, texts the library cannot encode, binary parquet columns,
duplicate and non-string ids; ColBERT chunks bounded by output bytes; the docs' snippets; a SIGKILLed pool parent.

Runs go through the real command line with the shared models of test_cli_encode.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tembed.cli import encode as cli_encode
from tembed.jobs import corpus as corpus_job
from tembed.jobs.records import IdHashes, chunks
from test_cli_encode import (
    MAX_LENGTH,
    corpus,
    encode_ok,
    expected,
    interrupt_at_part,
    invoke,
    leftovers,
    read_output,
    shared_models,
)

from realdata import sts_b_sentences

__all__ = ["corpus", "expected", "shared_models"]  # fixtures used here

HERE = os.path.dirname(os.path.abspath(__file__))
SENTENCES = sts_b_sentences("dev")[:12]


def write_jsonl(path, lines: list[str]) -> str:
    """Write JSON Lines given as raw JSON text (so that escapes such as \\ud83d stay literal)."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(line + "\n" for line in lines)
    return str(path)


def rejects_of(output: str) -> list[dict]:
    with open(os.path.splitext(output)[0] + ".rejects.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


# ------------------------------------------------------------------------------------------- lone surrogates
SURROGATE_CASES = {
    "text": ('{"id": "b", "text": "bad \\ud83d here"}', "field 'text' contains a lone surrogate at position 4"),
    "title": (
        '{"id": "b", "title": "x\\udc00", "text": "fine text"}',
        "field 'title' contains a lone surrogate at position 1",
    ),
    "id": ('{"id": "b\\ud800", "text": "fine text"}', "field 'id' contains a lone surrogate at position 1"),
}


@pytest.mark.parametrize("case", list(SURROGATE_CASES))
def test_lone_surrogate_is_a_bad_record(shared_models, minilm, minilm_path, tmp_path, case):
    bad, reason = SURROGATE_CASES[case]
    good = [json.dumps({"id": f"g{i}", "text": text}) for i, text in enumerate(SENTENCES[:5])]
    source = write_jsonl(tmp_path / "s.jsonl", [good[0], bad, *good[1:]])
    output = str(tmp_path / "out.parquet")
    stopped = invoke(source, "-o", output, "-m", minilm_path)
    assert stopped.exit_code == 1
    assert stopped.stderr.startswith(f"error: {source} line 2: {reason}\n"), stopped.stderr
    assert leftovers(output) == []

    done = encode_ok(source, "-o", output, "-m", minilm_path, "--skip-invalid")
    assert "1 rejected" in done.stderr
    ids, dense = read_output(output)
    assert ids == [f"g{i}" for i in range(5)]
    np.testing.assert_allclose(dense, minilm.encode_corpus(SENTENCES[:5]), atol=1e-5)
    assert rejects_of(output) == [{"input": source, "line": 2, "reason": reason}]


# ------------------------------------------------------------------------------------------- encode failures
def _shared_minilm(shared_models, minilm_path):
    """The MiniLM encoder that every run of this module shares (as test_cli_encode.py opens it)."""
    config = cli_encode.encoder_config(minilm_path, "auto", "auto", None, ("dense",), False)
    shared = cli_encode.open_job_encoder(config, None)
    assert shared_models[(config, None)] is shared.encoder
    return shared.encoder


@pytest.fixture
def failing_marker(shared_models, minilm_path, monkeypatch):
    """The shared MiniLM encoder raises for any call holding a text with MARKER in it."""
    encoder = _shared_minilm(shared_models, minilm_path)
    real = encoder.encode
    calls = []

    def encode(texts, options=None):
        calls.append(len(texts))
        for text in texts:
            if "MARKER" in text:
                raise ValueError(f"cannot encode {text!r}")
        return real(texts, options)

    monkeypatch.setattr(encoder, "encode", encode)
    return calls


def test_encode_failure_names_its_lines_and_resume_skip_invalid_gets_past_it(
    failing_marker, minilm, minilm_path, tmp_path
):
    texts = SENTENCES[:10]
    texts[5] = "a MARKER text"  # line 6, in the second chunk of 4 (lines 5-8)
    source = write_jsonl(tmp_path / "c.jsonl", [json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(texts)])
    output = str(tmp_path / "out.parquet")
    args = [source, "-o", output, "-m", minilm_path, "--chunk-size", "4"]

    stopped = invoke(*args)  # catch_exceptions=False: a traceback would fail the test
    assert stopped.exit_code == 1, stopped.output
    first = stopped.stderr.splitlines()[0]
    assert first == f"error: {source} lines 5-8: encoding failed: ValueError: cannot encode 'a MARKER text'", first
    assert "the 4 records before are kept" in stopped.stderr and "--resume --skip-invalid" in stopped.stderr
    assert leftovers(output) == ["out.parquet.partial"]

    again = invoke(*args, "--resume")  # without --skip-invalid the same chunk fails again, the same way
    assert again.exit_code == 1 and first in again.stderr.splitlines()

    resumed = encode_ok(*args, "--resume", "--skip-invalid")
    assert "1 rejected" in resumed.stderr
    ids, dense = read_output(output)
    keep = [i for i in range(10) if i != 5]
    assert ids == [f"d{i}" for i in keep]
    np.testing.assert_allclose(dense, minilm.encode_corpus([texts[i] for i in keep]), atol=1e-5)
    (reject,) = rejects_of(output)
    assert reject["line"] == 6
    assert reject["reason"] == "encoding failed: ValueError: cannot encode 'a MARKER text'"
    assert leftovers(output) == ["out.parquet"]  # no partial folder left


def test_encode_failure_in_the_first_chunk_keeps_nothing_and_skip_invalid_bisects(
    failing_marker, minilm, minilm_path, tmp_path
):
    texts = SENTENCES[:9]
    texts[0] = "MARKER one"
    texts[7] = "MARKER two"
    source = write_jsonl(tmp_path / "c.jsonl", [json.dumps({"text": t}) for t in texts])
    output = str(tmp_path / "out.npy")
    stopped = invoke(source, "-o", output, "-m", minilm_path)
    assert stopped.exit_code == 1
    assert stopped.stderr.startswith(f"error: {source} lines 1-9: encoding failed: ValueError: cannot encode")
    assert "rerun with --skip-invalid" in stopped.stderr
    assert leftovers(output) == []

    failing_marker.clear()
    done = encode_ok(source, "-o", output, "-m", minilm_path, "--skip-invalid")
    assert "2 rejected" in done.stderr
    ids, dense = read_output(output)
    keep = [i for i in range(9) if i not in (0, 7)]
    assert ids == [str(i + 1) for i in keep]
    np.testing.assert_allclose(dense, minilm.encode_corpus([texts[i] for i in keep]), atol=1e-5)
    assert [r["line"] for r in rejects_of(output)] == [1, 8]
    assert len(failing_marker) <= 2 * 9  # halves, not one call per text after each failure


# ------------------------------------------------------------------------------------------- parquet binary
def test_parquet_binary_columns_are_decoded_or_rejected(shared_models, minilm, minilm_path, tmp_path):
    texts = SENTENCES[:5]
    table = pa.table(
        {
            "id": pa.array([b"a", b"b", b"c", b"d\xff", b"e"], type=pa.binary()),
            "title": pa.array([b"T\xc3\xa9", None, b"", b"x", b"y"], type=pa.large_binary()),
            "text": pa.array(
                [t.encode() for t in texts[:2]] + [b"caf\xe9 au lait"] + [t.encode() for t in texts[3:]],
                type=pa.binary(),
            ),
        }
    )
    source = str(tmp_path / "bin.parquet")
    pq.write_table(table, source)
    output = str(tmp_path / "out.parquet")
    stopped = invoke(source, "-o", output, "-m", minilm_path)
    assert stopped.exit_code == 1, stopped.output
    assert stopped.stderr.startswith(f"error: {source} line 3: field 'text' is not valid UTF-8 (byte 0xe9 at byte 4)")
    done = encode_ok(source, "-o", output, "-m", minilm_path, "--skip-invalid")
    assert "2 rejected" in done.stderr
    ids, dense = read_output(output)
    assert ids == ["a", "b", "e"]
    want = minilm.encode_corpus([f"Té {texts[0]}", texts[1], f"y {texts[4]}"])
    np.testing.assert_allclose(dense, want, atol=1e-5)
    assert [(r["line"], r["reason"]) for r in rejects_of(output)] == [
        (3, "field 'text' is not valid UTF-8 (byte 0xe9 at byte 4)"),
        (4, "field 'id' is not valid UTF-8 (byte 0xff at byte 2)"),
    ]


def test_parquet_string_column_with_invalid_utf8_rejects_the_row(shared_models, minilm_path, tmp_path):
    text = pa.array([b"first", b"caf\xe9", b"third"], type=pa.binary()).view(pa.string())  # written unvalidated
    source = str(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": text}), source)
    output = str(tmp_path / "out.parquet")
    stopped = invoke(source, "-o", output, "-m", minilm_path)
    assert stopped.exit_code == 1
    assert stopped.stderr.startswith(f"error: {source} line 2: field 'text' is not valid UTF-8 (byte 0xe9 at byte 4)")
    encode_ok(source, "-o", output, "-m", minilm_path, "--skip-invalid")
    assert read_output(output)[0] == ["a", "c"]


# ------------------------------------------------------------------------------------------- ids
def test_json_ids_keep_their_json_spelling(shared_models, minilm_path, tmp_path):
    values = ["true", "false", "1.5", "7", "1.0", "null", '"s"', "-0.25", "12345678901234567890"]
    lines = [f'{{"id": {value}, "text": "text {n}"}}' for n, value in enumerate(values)]
    source = write_jsonl(tmp_path / "ids.jsonl", lines)
    output = str(tmp_path / "out.parquet")
    encode_ok(source, "-o", output, "-m", minilm_path)
    ids, _ = read_output(output)
    assert ids == ["true", "false", "1.5", "7", "1.0", "6", "s", "-0.25", "12345678901234567890"]


def test_parquet_ids_keep_their_json_spelling(shared_models, minilm_path, tmp_path):
    source = str(tmp_path / "ids.parquet")
    pq.write_table(pa.table({"id": [True, False, None], "text": ["one", "two", "three"]}), source)
    output = str(tmp_path / "out.parquet")
    encode_ok(source, "-o", output, "-m", minilm_path)
    assert read_output(output)[0] == ["true", "false", "3"]


DUPLICATE_IDS = ["a", "b", "a", "c", "b", "d", "a"]


def _duplicate_input(tmp_path) -> str:
    return write_jsonl(
        tmp_path / "dup.jsonl",
        [json.dumps({"id": i, "text": SENTENCES[n]}) for n, i in enumerate(DUPLICATE_IDS)],
    )


def test_duplicate_ids_are_counted(shared_models, minilm_path, tmp_path):
    source = _duplicate_input(tmp_path)
    output = str(tmp_path / "out.parquet")
    done = encode_ok(source, "-o", output, "-m", minilm_path, "--chunk-size", "2")
    assert "encoded 7 texts, 3 duplicate ids (--unique-ids refuses them)" in done.stderr, done.stderr
    assert read_output(output)[0] == DUPLICATE_IDS


def test_unique_ids_stops_or_rejects(shared_models, minilm_path, tmp_path):
    source = _duplicate_input(tmp_path)
    output = str(tmp_path / "out.parquet")
    stopped = invoke(source, "-o", output, "-m", minilm_path, "--unique-ids", "--chunk-size", "2")
    assert stopped.exit_code == 1
    assert stopped.stderr.startswith(f"error: {source} line 3: duplicate id 'a' (line 1 has it too)\n")
    done = encode_ok(source, "-o", output, "-m", minilm_path, "--unique-ids", "--skip-invalid", "--restart")
    assert "3 rejected" in done.stderr and "duplicate ids" not in done.stderr
    assert read_output(output)[0] == ["a", "b", "c", "d"]
    assert [(r["line"], r["reason"]) for r in rejects_of(output)] == [
        (3, "duplicate id 'a' (line 1 has it too)"),
        (5, "duplicate id 'b' (line 2 has it too)"),
        (7, "duplicate id 'a' (line 1 has it too)"),
    ]


def test_unique_ids_across_a_resume(shared_models, minilm_path, tmp_path):

    source = _duplicate_input(tmp_path)
    output = str(tmp_path / "out.parquet")
    args = [source, "-o", output, "-m", minilm_path, "--chunk-size", "2", "--unique-ids", "--skip-invalid"]
    with pytest.MonkeyPatch.context() as patch:
        interrupt_at_part(patch, 2)
        assert invoke(*args).exit_code == 130  # lines 1-2 written; the earlier lines are read back on resume
    encode_ok(*args, "--resume")
    assert read_output(output)[0] == ["a", "b", "c", "d"]
    assert [(r["line"], r["reason"]) for r in rejects_of(output)] == [
        (3, "duplicate id 'a' (line 1 has it too)"),
        (5, "duplicate id 'b' (line 2 has it too)"),
        (7, "duplicate id 'a' (line 1 has it too)"),
    ]
    counted = encode_ok(source, "-o", str(tmp_path / "counted.parquet"), "-m", minilm_path, "--chunk-size", "3")
    assert "3 duplicate ids" in counted.stderr


def test_id_hashes_count_and_lines_match_a_set():
    rng = np.random.default_rng(0)
    known = IdHashes(keep_lines=True)
    seen: dict[str, int] = {}
    line = 0
    for _ in range(40):
        batch = []
        for value in rng.integers(0, 3000, size=int(rng.integers(1, 200))):
            line += 1
            batch.append(type("R", (), {"id": f"id-{value}", "line_number": line})())
        kept, rejected = known.refuse_duplicates(batch)
        for record in batch:
            if record.id in seen:
                assert any(r.line_number == record.line_number for r in rejected)
                assert f"line {seen[record.id]} has it too" in next(
                    r.reason for r in rejected if r.line_number == record.line_number
                )
            elif record in kept:
                seen[record.id] = record.line_number
        known.add(kept)
        assert known.distinct == len(seen)
    assert len(known._runs) <= 2 * int(np.log2(len(seen))) + 2


# ------------------------------------------------------------------------------------------- ColBERT memory
def test_colbert_chunks_are_bounded_by_output_bytes(shared_models, tiny_m3_path, corpus, tmp_path, monkeypatch):

    rows = corpus[:40]
    source = write_jsonl(tmp_path / "m3.jsonl", [json.dumps({"id": i, "text": t}) for i, t in rows])
    common = ["-m", tiny_m3_path, "--colbert", "--dense", "--max-length", "48", "--device", "cpu"]
    unbounded = str(tmp_path / "unbounded.parquet")
    encode_ok(source, "-o", unbounded, *common)
    assert pq.ParquetFile(unbounded).num_row_groups == 1

    # tiny M3: 32-d ColBERT vectors, 128 bytes a token; texts of 10-48 tokens: a few records per 20 kB chunk
    monkeypatch.setattr(corpus_job, "CHUNK_OUTPUT_BYTES", 20_000)
    bounded = str(tmp_path / "bounded.parquet")
    encode_ok(source, "-o", bounded, *common)
    groups = pq.ParquetFile(bounded)
    sizes = [groups.metadata.row_group(i).num_rows for i in range(groups.num_row_groups)]
    assert sum(sizes) == len(rows) and len(sizes) >= 4, sizes
    for index in range(groups.num_row_groups):  # each chunk's ColBERT output is within the budget plus one record
        colbert = groups.read_row_group(index, columns=["colbert"]).column("colbert").combine_chunks()
        values = len(colbert.flatten().flatten())
        assert (values - 48 * 32) * 4 < 20_000 or sizes[index] == 1
    assert_same_output(bounded, unbounded)

    # Interrupted after two chunks and resumed: the same file (the cursor points after the last written record).
    resumed = str(tmp_path / "resumed.parquet")
    with monkeypatch.context() as patch:
        interrupt_at_part(patch, 3)
        assert invoke(source, "-o", resumed, *common).exit_code == 130
    encode_ok(source, "-o", resumed, *common, "--resume")
    assert_same_output(resumed, unbounded)


def assert_same_output(path: str, reference: str) -> None:
    """Same ids, schema and vectors (within float round-off: other chunks are other batches)."""
    table, want = pq.read_table(path), pq.read_table(reference)
    assert table.schema.equals(want.schema)
    assert json.loads(table.schema.metadata[b"tembed"]) == json.loads(want.schema.metadata[b"tembed"])
    assert table.column("id").to_pylist() == want.column("id").to_pylist()
    for name in ("dense", "colbert"):
        got, expected_values = (t.column(name).combine_chunks() for t in (table, want))
        if name == "colbert":
            assert got.value_lengths().to_pylist() == expected_values.value_lengths().to_pylist()
            got, expected_values = got.flatten(), expected_values.flatten()
        np.testing.assert_allclose(got.flatten().to_numpy(), expected_values.flatten().to_numpy(), atol=1e-5)


def test_chunks_end_after_the_item_that_reaches_the_budget():
    items = [type("R", (), {"size": size})() for size in (5, 5, 11, 1, 1, 1, 30, 2)]
    parts = list(chunks(iter(items), 4, lambda record: record.size, 10))
    assert [[item.size for item in chunk] for chunk in parts] == [[5, 5], [11], [1, 1, 1, 30], [2]]


# ------------------------------------------------------------------------------------------- docs and summary
def _docs(name: str) -> str:
    with open(os.path.join(HERE, "..", "docs", name), encoding="utf-8") as handle:
        return handle.read()


def test_docs_state_the_cli_defaults():
    import inspect

    defaults = {name: p.default for name, p in inspect.signature(cli_encode.encode_command).parameters.items()}
    row = next(line for line in _docs("cli.md").splitlines() if line.startswith("| `--device`, `--precision`"))
    documented = [cell.strip().strip("`") for cell in row.split("|")[2].split(",")]
    assert documented[1:] == [defaults["precision"], defaults["backend"]], row


@pytest.mark.parametrize("rows", [0, 3])
def test_docs_parquet_snippet_reads_any_output(shared_models, minilm_path, tmp_path, monkeypatch, rows):
    source = write_jsonl(tmp_path / "in.jsonl", [json.dumps({"text": t}) for t in SENTENCES[:rows]] + ['{"text": ""}'])
    encode_ok(source, "-o", str(tmp_path / "corpus.parquet"), "-m", minilm_path, "--skip-invalid")
    snippet = re.search(r"```python\n(import numpy as np, pyarrow.parquet as pq\n.*?)```", _docs("cli.md"), re.S)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(snippet.group(1), scope)
    assert scope["dense"].shape == (rows, 384) and len(scope["ids"]) == rows


def test_resuming_a_finished_run_says_nothing_was_left(shared_models, minilm_path, corpus, tmp_path):
    from tembed.io import writers

    source = write_jsonl(tmp_path / "c.jsonl", [json.dumps({"id": i, "text": t}) for i, t in corpus[:12]])
    output = str(tmp_path / "out.parquet")
    args = [source, "-o", output, "-m", minilm_path, "--max-length", str(MAX_LENGTH), "--chunk-size", "5"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(writers, "merge_parquet", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        assert invoke(*args).exit_code == 130
    resumed = encode_ok(*args, "--resume")
    last = resumed.stderr.strip().splitlines()[-1]
    assert last.startswith("nothing left to encode: all 12 records were done by the interrupted run; wrote "), last
    assert "texts/s" not in resumed.stderr
    assert read_output(output)[0] == [i for i, _ in corpus[:12]]


# ------------------------------------------------------------------------------------------- pool parent SIGKILL
def test_sigkilled_pool_parent_leaves_no_leaked_semaphore_warning(minilm_path, tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import time
            from tembed import Embedder

            if __name__ == "__main__":
                embedder = Embedder({minilm_path!r}, device=["cpu", "cpu"])
                embedder.encode(["a text", "another text"])
                print("ready", flush=True)
                time.sleep(600)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,  # its own process group: the workers and the resource tracker share its stderr
    )
    try:
        assert process.stdout.readline().strip() == "ready", process.stderr.read()
        os.kill(process.pid, signal.SIGKILL)
        # stderr ends when every process holding it has exited: the workers (they notice the parent is gone
        # within a second) and multiprocessing's resource tracker (it warns about leaks as it exits).
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert "leaked semaphore" not in stderr, stderr
    assert "resource_tracker" not in stderr, stderr


def test_skip_invalid_does_not_reject_every_record_when_encoding_fails_whatever_the_texts(
    shared_models, minilm_path, tmp_path, monkeypatch
):
    """A failure that is not about the texts (a broken device, a closed model) stops the run even with
    --skip-invalid, rather than turning every record into a reject and exiting 0."""
    encoder = _shared_minilm(shared_models, minilm_path)
    real, calls = encoder.encode, []

    def encode(texts, options=None):
        calls.append(len(texts))
        if len(calls) > 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(texts, options)

    monkeypatch.setattr(encoder, "encode", encode)
    texts = sts_b_sentences("dev")[:300]
    source = write_jsonl(tmp_path / "c.jsonl", [json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(texts)])
    output = str(tmp_path / "out.parquet")
    stopped = invoke(source, "-o", output, "-m", minilm_path, "--chunk-size", "100", "--skip-invalid")
    assert stopped.exit_code == 1, stopped.stderr
    assert stopped.stderr.startswith(f"error: {source} lines 101-200: encoding failed: RuntimeError: CUDA error")
    assert "the 100 records before are kept" in stopped.stderr
    assert len(calls) < 30  # it gave up after two single texts failed like the chunk, not after 200
