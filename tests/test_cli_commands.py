"""``tembed models``, ``tembed info``, ``tembed embed``, and ``tembed encode`` on a worker pool (``--device cpu,cpu``).

* ``models`` lists the registry without importing torch;
* ``info`` prints the effective settings from the model's files alone: no torch, no weights, no export;
* ``embed`` prints sentence-transformers' vectors, with the query instruction for ``--kind query``;
* ``encode --device cpu,cpu`` writes the file ``--device cpu`` writes, also after a SIGKILL and ``--resume``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from typer.testing import CliRunner

from tembed.cli import app
from tembed.io.checkpoint import PartialRun
from tembed.models.registry import list_models
from test_cli_encode import encode_ok, leftovers, read_output, shared_models, write_input

from realdata import insuranceqa_answers, sts_b_sentences

__all__ = ["shared_models"]  # fixtures used here

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -X importtime -m tembed.cli ARGS``: stdout is the command's, stderr lists every import."""
    command = [sys.executable, "-X", "importtime", "-m", "tembed.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env or ENV, timeout=timeout, check=False)


def imported(stderr: str) -> set[str]:
    """The modules ``-X importtime`` reports."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


# ----------------------------------------------------------------------------------------------- models
def test_models_lists_the_registry_without_torch():
    listed = CliRunner().invoke(app, ["models"], catch_exceptions=False)
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    assert lines[0].split()[:2] == ["name", "family"]
    names = [line.split()[0] for line in lines[1:]]
    assert names == [spec.hub_id or spec.name for spec in list_models()]

    started = time.perf_counter()
    process = run_cli("models")
    seconds = time.perf_counter() - started
    assert process.returncode == 0, process.stderr
    assert process.stdout == listed.stdout
    modules = imported(process.stderr)
    assert "tembed.cli" in modules and "torch" not in modules and "transformers" not in modules
    print(f"tembed models: {seconds:.2f} s wall in a subprocess (import timing on)")
    assert seconds < 10


# ----------------------------------------------------------------------------------------------- info
def test_info_reads_the_files_without_building_the_model(minilm_path, tmp_path):
    cache = tmp_path / "export-cache"
    cache.mkdir()
    started = time.perf_counter()
    process = run_cli("info", env=dict(ENV, TEMBED_CACHE=str(cache)))
    seconds = time.perf_counter() - started
    assert process.returncode == 0, process.stderr
    info = json.loads(process.stdout)
    print(f"tembed info: {seconds:.2f} s wall in a subprocess (import timing on)")
    assert seconds < 10
    assert os.listdir(cache) == []  # no ONNX / OpenVINO export
    modules = imported(process.stderr)
    assert "torch" not in modules and "openvino" not in modules and "onnxruntime" not in modules

    assert info["model"] == MINILM and os.path.samefile(info["path"], minilm_path)
    assert info["source"].startswith("package:") and info["registry_entry"] == "all-MiniLM-L6-v2"
    assert info["family"] == "sentence-transformers" and info["kind"] == "encoder"
    assert info["pooling"] == "mean" and info["normalize"] is True
    assert info["dim"] == info["embedding_dim"] == 384 and info["outputs"] == ["dense"]
    assert info["query_max_length"] == info["passage_max_length"] == 256
    assert info["device"] == "cpu" and info["backend"] in ("torch", "onnx", "openvino")
    # What the model's published sentence-transformers files say (the values above come from them).
    with open(os.path.join(minilm_path, "1_Pooling", "config.json"), encoding="utf-8") as handle:
        assert json.load(handle)["pooling_mode_mean_tokens"] is True
    with open(os.path.join(minilm_path, "modules.json"), encoding="utf-8") as handle:
        assert any(module["type"].endswith("Normalize") for module in json.load(handle))
    with open(os.path.join(minilm_path, "sentence_bert_config.json"), encoding="utf-8") as handle:
        assert json.load(handle)["max_seq_length"] == 256


def test_info_options_and_errors(tmp_path):
    result = CliRunner().invoke(app, ["info", MINILM, "--backend", "torch", "--precision", "bf16"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["backend"] == "torch" and info["precision"] == "bf16"
    missing = CliRunner().invoke(app, ["info", str(tmp_path / "no-such-model")])
    assert missing.exit_code == 2 and missing.stderr.startswith("error: cannot resolve ")
    assert len(missing.stderr.splitlines()) == 1


# ----------------------------------------------------------------------------------------------- embed
def embed(*args: str) -> np.ndarray:
    result = CliRunner().invoke(app, ["embed", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return np.array([json.loads(line) for line in result.stdout.splitlines()], dtype=np.float64)


def test_embed_prints_sentence_transformers_vectors(minilm_path):
    from sentence_transformers import SentenceTransformer

    from tembed.models.resolve import resolve_model

    folder = resolve_model(MINILM).path
    vectors = embed("a cat", "a dog", "--device", "cpu")
    assert vectors.shape == (2, 384)
    want = SentenceTransformer(folder, device="cpu").encode(["a cat", "a dog"])
    np.testing.assert_allclose(vectors, want, atol=1e-5)


def test_embed_kind_query_applies_the_query_instruction(minilm_path, tmp_path):
    """MiniLM's files in a folder named like e5 (mean pooling, like MiniLM): the registry's ``"query: "``
    instruction applies to --kind query, as Embedder.encode_queries applies it."""
    from sentence_transformers import SentenceTransformer

    from tembed import Embedder

    folder = tmp_path / "e5-small-v2"
    folder.mkdir()
    for name in os.listdir(minilm_path):
        os.symlink(os.path.join(minilm_path, name), folder / name)
    texts = ["how do cats sleep", "a dog"]
    query = embed(*texts, "-m", str(folder), "--kind", "query", "--device", "cpu")
    plain = embed(*texts, "-m", str(folder), "--device", "cpu")
    with Embedder(str(folder), device="cpu") as embedder:
        np.testing.assert_allclose(query, embedder.encode_queries(texts), atol=1e-5)
        np.testing.assert_allclose(plain, embedder.encode(texts), atol=1e-5)
    reference = SentenceTransformer(minilm_path, device="cpu")
    np.testing.assert_allclose(query, reference.encode([f"query: {t}" for t in texts]), atol=1e-5)
    assert np.abs(query - plain).max() > 1e-3


def test_kind_lists_its_choices():
    for command in ("embed", "encode"):
        shown = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
        assert "query" in shown.stdout and "passage" in shown.stdout and "plain" in shown.stdout
    wrong = CliRunner().invoke(app, ["embed", "x", "--kind", "document"])
    assert wrong.exit_code == 2 and "document" in wrong.output


# ----------------------------------------------------------------------------------------------- a pool
def _saved_tokens(monkeypatch) -> list[tuple[int, int]]:
    """``(rows, tokens)`` of every manifest a run saves."""
    saved: list[tuple[int, int]] = []
    real = PartialRun.save

    def save(self, manifest):
        saved.append((manifest.rows, manifest.tokens))
        real(self, manifest)

    monkeypatch.setattr(PartialRun, "save", save)
    return saved


def test_encode_on_a_pool_equals_one_device(shared_models, minilm_path, tmp_path, monkeypatch):
    from tembed.pool import EmbedderPool
    from tembed.settings import EncodeOptions

    sentences = sts_b_sentences("test")[:1379]  # 1,379 sentences (every sentence1): four chunks, the last shorter
    rows = [(f"sts-{index}", text) for index, text in enumerate(sentences)]
    source = write_input(tmp_path / "sts.jsonl", "jsonl", rows)
    common = ["-m", minilm_path, "--max-length", "64", "--chunk-size", "350"]
    results, tokens = {}, {}
    for label, device in (("one", "cpu"), ("pool", "cpu,cpu")):
        output = str(tmp_path / f"{label}.parquet")
        with monkeypatch.context() as patch:
            tokens[label] = _saved_tokens(patch)
            encode_ok(source, "-o", output, *common, "--device", device)
        results[label] = read_output(output)
    pools = [encoder for (_, devices), encoder in shared_models.items() if devices == ("cpu", "cpu")]
    assert len(pools) == 1 and isinstance(pools[0], EmbedderPool)  # the run really went through a pool

    (one_ids, one_dense), (pool_ids, pool_dense) = results["one"], results["pool"]
    assert pool_ids == one_ids == [identifier for identifier, _ in rows]
    diff = float(np.abs(pool_dense - one_dense).max())
    print(f"--device cpu,cpu vs cpu: {len(rows)} rows, max abs diff {diff:.3g}, tokens {tokens['one'][-1][1]:,}")
    assert diff <= 1e-6
    assert tokens["pool"] == tokens["one"]  # per chunk
    single = next(encoder for (_, devices), encoder in shared_models.items() if devices == "cpu")
    counts = single.encode(sentences[:350], EncodeOptions(role="passage", max_length=64)).token_counts
    assert (350, int(counts.sum())) in tokens["one"] and counts.sum() > 350  # the first chunk's, as encoded


def test_pool_killed_then_resumed_equals_one_device(shared_models, minilm_path, tmp_path):
    """``--device cpu,cpu`` SIGKILLed after some chunks, then ``--resume`` on the pool again: the file an
    uninterrupted single-device run writes."""
    rows = [(f"ans-{index}", text) for index, text in enumerate(insuranceqa_answers()[:600])]  # 12 chunks of 50
    source = write_input(tmp_path / "answers.jsonl", "jsonl", rows)
    common = ["-m", minilm_path, "--max-length", "48", "--chunk-size", "50"]
    killed = str(tmp_path / "killed.parquet")
    command = [sys.executable, "-m", "tembed.cli", "encode", source, "-o", killed, *common, "--device", "cpu,cpu"]
    process = subprocess.Popen(
        command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    parts = 0
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None and parts < 2:
            try:
                with open(killed + ".partial/manifest.json", encoding="utf-8") as handle:
                    parts = len(json.load(handle)["parts"])
            except (FileNotFoundError, ValueError):
                parts = 0
            time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)
        _wait_for_the_workers(process.pid)
    assert process.returncode == -signal.SIGKILL, stderr.decode()
    assert 2 <= parts < 12, parts
    assert not os.path.exists(killed)

    resumed = encode_ok(source, "-o", killed, *common, "--device", "cpu,cpu", "--resume")
    assert "resuming" in resumed.stderr and f"{parts * 50:,} records done" in resumed.stderr
    full = str(tmp_path / "full.parquet")
    encode_ok(source, "-o", full, *common, "--device", "cpu", "--chunk-size", "200")
    (killed_ids, killed_dense), (full_ids, full_dense) = read_output(killed), read_output(full)
    assert killed_ids == full_ids == [identifier for identifier, _ in rows]
    diff = float(np.abs(killed_dense - full_dense).max())
    print(f"pool SIGKILLed after {parts} chunks, resumed on the pool: {len(rows)} rows, max abs diff {diff:.3g}")
    assert diff <= 1e-6
    assert leftovers(killed) == ["killed.parquet"]


def _wait_for_the_workers(group: int) -> None:
    """The killed parent's workers exit by themselves once it is gone; stop any left after a while."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


# ----------------------------------------------------------------------------------------------- the job alone
class CountingEncoder:
    """An Encoder without a model: a vector per text from its words, one token per word plus two."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.calls = 0

    def encode(self, texts, options):
        from tembed.outputs import EncodeOutputs

        self.calls += 1
        dense = np.zeros((len(texts), self.settings.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.split():
                dense[row, sum(map(ord, word)) % self.settings.dim] += 1.0
        counts = np.array([min(len(t.split()) + 2, options.max_length) for t in texts], dtype=np.int64)
        return EncodeOutputs(dense=dense, token_counts=counts)

    def close(self) -> None:
        pass


def test_the_corpus_job_runs_without_typer_on_any_encoder(minilm_path, tmp_path):
    import contextlib as context

    from tembed.jobs.corpus import CorpusJob, JobOptions
    from tembed.jobs.plan import CorpusRequest, prepare
    from tembed.settings import EmbedderConfig, EncodeOptions, resolve_settings

    texts = sts_b_sentences("dev")[:50]
    source = write_input(tmp_path / "c.jsonl", "jsonl", [(f"d{i}", t) for i, t in enumerate(texts)])
    output = str(tmp_path / "out.parquet")
    config = EmbedderConfig(model=minilm_path)
    options = EncodeOptions(role="passage", max_length=16)
    encoder = CountingEncoder(resolve_settings(config, "cpu")[0])  # settings from the files: nothing loaded
    said: list[str] = []
    with context.ExitStack() as held:
        prepared = prepare(CorpusRequest(source, output), config, options, held)
        checkpoint = prepared.checkpoint(encoder.settings)
        job = CorpusJob(encoder, options, prepared.reader, output, prepared.out_format, checkpoint, JobOptions(7))
        job.report = said.append
        result = job.run()
    ids, dense = read_output(output)
    assert ids == [f"d{i}" for i in range(50)] and encoder.calls == 8  # chunks of 7
    np.testing.assert_array_equal(dense, encoder.encode(texts, options).dense)
    assert result.rows == 50 and result.tokens == sum(min(len(t.split()) + 2, 16) for t in texts)
    assert len(said) == 1 and said[0].startswith("encoded 50 texts")
    assert leftovers(output) == ["out.parquet"]

    check = "import sys, tembed.jobs.corpus, tembed.jobs.plan; print(sorted({'typer', 'torch'} & set(sys.modules)))"
    process = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=ENV, check=True)
    assert process.stdout.strip() == "[]"  # the job needs neither the command line nor torch


def test_the_resume_record_names_device_types_not_devices(minilm_path):
    """A run on cpu,cpu resumes on cpu (and cuda:0,cuda:1 on cuda:1): the same vectors; cpu vs cuda is refused."""
    from tembed.jobs.plan import model_record
    from tembed.settings import EmbedderConfig, resolve_settings

    settings = resolve_settings(EmbedderConfig(model=minilm_path, backend="torch"), "cpu")[0]
    one = model_record(settings)
    assert one["device"] == "cpu" and one["backend"] == "torch" and len(one["files"]) == 24
    assert model_record(settings.replace(device="cpu,cpu")) == one  # a pool's settings name its devices
    assert model_record(settings, ["cpu", "cpu", "cpu"]) == one
    gpus = model_record(settings.replace(device="cuda:0,cuda:1"))
    assert gpus == model_record(settings.replace(device="cuda:1")) == {**one, "device": "cuda"}
    assert model_record(settings, ["cpu", "cuda:0"])["device"] == "cpu,cuda"
