"""tembed on Ray Data: the map_batches encoder, ``tembed encode --engine ray``, faults and resume.

The in-process tests run on a two-node cluster simulated on this machine (``ray.cluster_utils.Cluster``: a head
and a worker node of 1 CPU each, so two 1-CPU actors land on two nodes); the driver-kill and Ctrl-C tests run the
real command in a subprocess on a private local instance (``--address local``, 2 CPUs). Tests end only the
processes they started, by pid (never ``ray stop``). Vectors are compared with a single-process
:class:`tembed.Embedder` / ``tembed encode`` run: within 1e-6.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
import contextlib

import ray
import ray.data

from tembed import Embedder
from tembed.cli import app
from tembed.io import writers
from tembed.io.readers import Reader
from tembed.jobs.corpus import JobOptions
from tembed.jobs.plan import CorpusRequest
from tembed.ray import RayEncoder, ResourceError, encode_dataset
from tembed.ray.batch import naming_record
from tembed.ray.run import RayJobOptions, run_ray_job
from tembed.ray.shards import Fields, plan_shards, shard_items
from tembed.settings import EmbedderConfig, EncodeOptions

TOL = 1e-6
WORDS = [
    "the",
    "a",
    "river",
    "bank",
    "money",
    "loan",
    "fish",
    "water",
    "cell",
    "phone",
    "signal",
    "tower",
    "light",
    "heavy",
    "rain",
]


def corpus_texts(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=3 + int(rng.integers(0, 40)))) + f" #{i}" for i in range(count)]


def write_jsonl(path, texts, start=0) -> None:
    with open(path, "w") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"id": f"doc-{start + i}", "text": text}) + "\n")


def run_cli(*args: str):
    return CliRunner().invoke(app, ["encode", *args], catch_exceptions=False)


# ---------------------------------------------------------------------------------------------- shards, no Ray
def test_shards_start_at_exact_cursors_and_cover_every_line_once(tmp_path):
    texts = corpus_texts(257)
    path = tmp_path / "c.jsonl"
    write_jsonl(path, texts)
    with open(path, "a") as handle:  # blank lines and a bad line move the boundaries off record counts
        handle.write("\n\nnot json\n")
        handle.write(json.dumps({"id": "last", "text": "the end"}))  # no final newline
    whole = list(Reader(str(path), "jsonl"))
    shards = plan_shards([str(path)], None, lines=50)
    assert [s.line for s in shards] == [0, 50, 100, 150, 200, 250]
    pieces = [item for shard in shards for item in shard_items(shard, Fields())]
    assert pieces == whole
    assert sum(1 for item in whole if hasattr(item, "reason")) == 1

    table = pa.table({"id": [f"p{i}" for i in range(23)], "text": texts[:23]})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=5)
    csv = tmp_path / "c.csv"
    csv.write_text('id,text\n1,"a quoted\nfield over two lines"\n2,plain\n')
    shards = plan_shards([str(tmp_path / "p.parquet"), str(csv)], None, lines=10)
    assert [(s.fmt, s.row, s.last) for s in shards] == [
        ("parquet", 0, 10), ("parquet", 10, 20), ("parquet", 20, -1), ("csv", 0, -1),
    ]  # fmt: skip
    ids = [item.id for shard in shards for item in shard_items(shard, Fields())]
    assert ids == [f"p{i}" for i in range(23)] + ["1", "2"]
    csv_shards = plan_shards([str(csv)], None, lines=1)  # cut by parsing: the quoted newline is not a boundary
    assert [(s.line, s.last) for s in csv_shards] == [(0, 3), (3, 4)]
    assert [item for s in csv_shards for item in shard_items(s, Fields())] == list(Reader(str(csv), "csv"))


def test_a_parquet_shard_starting_deep_in_a_row_group_reads_each_row_once(tmp_path):
    rows = 12000  # one row group of 12,000 rows, read in batches of 1,024: shards start mid-group
    path = tmp_path / "one_group.parquet"
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(rows)], "text": [f"t{i}" for i in range(rows)]}), path)
    shards = plan_shards([str(path)], None, lines=5000)
    items = [item for shard in shards for item in shard_items(shard, Fields())]
    assert [item.id for item in items] == [f"d{i}" for i in range(rows)]
    assert [item.line_number for item in items] == list(range(1, rows + 1))


def test_what_the_ray_engine_cannot_do_is_refused_before_anything_is_written(tmp_path, corpus):
    out = tmp_path / "out"
    cases = [
        (["--resume", "--restart"], "--resume and --restart contradict each other"),
        (["--unique-ids"], "--unique-ids needs one reader"),
        (["-o", str(tmp_path / "x.npy")], "not a .npy file"),
        (["-m", str(tmp_path / "no-such-model")], "cannot load"),
    ]
    for extra, message in cases:
        result = run_cli(str(corpus), "-o", str(out), "--engine", "ray", *extra)
        assert result.exit_code == 2 and message in result.output, result.output
    assert not out.exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.parquet").write_bytes(b"not parquet at all")
    result = run_cli(str(bad), "-o", str(out), "--engine", "ray")
    assert result.exit_code == 2 and "broken.parquet: cannot be read" in result.output


def test_naming_a_record_keeps_the_exception_type():
    named = naming_record(RuntimeError("boom"), "record id 'x'")
    assert type(named) is RuntimeError and str(named) == "record id 'x': boom"
    key_error = KeyError("k")  # str() of a KeyError is the repr of its argument: the id goes in a note
    assert naming_record(key_error, "record id 'z'") is key_error and key_error.__notes__ == ["record id 'z'"]

    class TwoArgs(Exception):
        def __init__(self, a, b):
            super().__init__(a, b)

    error = TwoArgs(1, 2)
    same = naming_record(error, "record id 'y'")
    assert same is error and same.__notes__ == ["record id 'y'"]


# ---------------------------------------------------------------------------------------------- two nodes
@pytest.fixture(scope="module")
def two_nodes():
    """A head and a worker node of 1 CPU each on this machine, this process its driver."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": 200 << 20, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1, object_store_memory=200 << 20)
    ray.init(address=cluster.address, log_to_driver=False, logging_level="error")
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


M3_OUTPUTS = ("dense", "sparse", "colbert")


def assert_matches_embedder(table: pa.Table, texts: list[str], model_path: str, role: str) -> None:
    """The table's columns are the local schema's and its rows equal a single-process Embedder's outputs (1e-6)."""
    with Embedder(model_path, backend="torch", device="cpu") as model:
        encode = model.encode_queries if role == "query" else model.encode_corpus
        expected = encode(texts, outputs=M3_OUTPUTS)
        wanted = writers.schema(M3_OUTPUTS, model.settings_.dim, model.settings_.colbert_dim)
    assert [(f.name, f.type) for f in table.schema] == [(f.name, f.type) for f in wanted]
    dense = np.array(table["dense"].to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(dense, expected.dense, atol=TOL, rtol=0)
    for row, sparse in enumerate(expected.sparse):
        ids, weights = table["sparse_ids"][row].as_py(), table["sparse_weights"][row].as_py()
        assert ids == sorted(sparse)
        np.testing.assert_allclose(weights, [sparse[i] for i in ids], atol=TOL, rtol=0)
    for row, vectors in enumerate(expected.colbert):
        np.testing.assert_allclose(np.array(table["colbert"][row].as_py()), vectors, atol=TOL, rtol=0)


def test_map_batches_gives_the_embedders_three_outputs_in_plain_arrow_types(two_nodes, tiny_m3_path, tmp_path):
    texts = corpus_texts(40, seed=1)
    config = EmbedderConfig(model=tiny_m3_path, backend="torch")
    options = EncodeOptions(role="query", outputs=M3_OUTPUTS)
    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)], override_num_blocks=4)
    encoded = encode_dataset(ds, config, options, actors=1, batch_size=16, reserve_cpus=1)
    encoded.write_parquet(str(tmp_path / "out"))
    table = pq.read_table(tmp_path / "out")  # plain pyarrow, no Ray types
    table = table.take(np.argsort(np.array(table["id"].to_pylist(), dtype=int)))
    assert table["id"].to_pylist() == [str(i) for i in range(len(texts))]
    assert_matches_embedder(table, texts, tiny_m3_path, "query")


def test_an_error_in_an_actor_reaches_the_caller_with_its_type_and_the_record(two_nodes, minilm_path):
    rows = [{"id": f"ok-{i}", "text": "a fine text"} for i in range(5)] + [{"id": "bad-7", "text": "  "}]
    ds = encode_dataset(ray.data.from_items(rows), EmbedderConfig(minilm_path, backend="torch"), actors=1)
    with pytest.raises(ValueError, match=r"record id 'bad-7': field 'text' is empty"):
        ds.materialize()
    # The same class in this process: a missing column names the columns there are.
    encoder = RayEncoder(EmbedderConfig(minilm_path, backend="torch"), text_column="body")
    with pytest.raises(ValueError, match=r"no text column 'body' \(columns: id, text\)"):
        encoder(pa.table({"id": ["a"], "text": ["x"]}))


def test_actors_that_cannot_all_run_are_refused_at_once(two_nodes):
    ds = ray.data.from_items([{"id": "a", "text": "b"}])
    started = time.perf_counter()
    with pytest.raises(ResourceError, match="2 actors x 1 CPUs \\+ 1 for Ray Data's read / write tasks = 3 CPUs"):
        encode_dataset(ds, "all-MiniLM-L6-v2", actors=2, cpus_per_actor=1)
    with pytest.raises(ResourceError, match="an actor cannot span nodes"):  # 2 CPUs in all, but 1 per node
        encode_dataset(ds, "all-MiniLM-L6-v2", actors=1, cpus_per_actor=2, reserve_cpus=0)
    assert time.perf_counter() - started < 5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray-corpus")
    path = folder / "corpus.jsonl"
    write_jsonl(path, corpus_texts(600, seed=2))
    return path


@pytest.fixture(scope="module")
def local_output(corpus, minilm_path):
    """The single-machine command's output on the same corpus (the reference for every Ray run)."""
    out = corpus.parent / "local.parquet"
    result = run_cli(str(corpus), "-o", str(out), "-m", minilm_path, "--backend", "torch", "-q")
    assert result.exit_code == 0, result.output
    return pq.read_table(out)


def assert_same_output(folder, expected: pa.Table) -> None:
    table = pq.read_table(folder)
    assert table.schema == expected.schema and table.schema.metadata == expected.schema.metadata
    assert table["id"].to_pylist() == expected["id"].to_pylist()  # every record once, in input order
    got = np.array(table["dense"].to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(got, np.array(expected["dense"].to_pylist()), atol=TOL, rtol=0)


def test_the_ray_command_writes_what_the_local_command_writes_even_when_an_actor_is_killed(
    two_nodes, corpus, local_output, minilm_path, tmp_path
):
    out = tmp_path / "out"
    args = [str(corpus), "-o", str(out), "-m", minilm_path, "--backend", "torch", "--engine", "ray"]
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(result=run_cli(*args, "--shard-lines", "40")))
    thread.start()
    wait_for(lambda: parts(out) >= 2, 120, "two shards")
    victims = ray_worker_pids()
    assert victims, "no actor process found"
    os.kill(victims[0], signal.SIGKILL)  # Ray restarts the actor and runs its shard again
    thread.join(300)
    result = outcome["result"]
    assert result.exit_code == 0, result.output
    assert "encoded 600 texts on 2 Ray actors" in result.output
    assert sorted(os.listdir(out)) == ["_tembed", *(f"part-{i:06d}.parquet" for i in range(15))]
    assert_same_output(out, local_output)
    again = run_cli(*args, "--shard-lines", "40")
    assert again.exit_code == 2 and "holds a finished run" in again.output and "--resume" in again.output


def test_bad_records_name_file_and_line_or_go_to_the_rejects(two_nodes, minilm_path, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl", ["first text", "second text"])
    with open(data / "a.jsonl", "a") as handle:
        handle.write('{"id": "broken", "text": \n' + json.dumps({"id": "a-3", "text": "after the bad line"}) + "\n")
    (data / "b.csv").write_text('id,text\nb-1,"a csv text"\nb-2,\nb-3,last csv text\n')
    pq.write_table(pa.table({"id": ["c-1", "c-2"], "text": ["parquet one", "parquet two"]}), data / "c.parquet")
    out = tmp_path / "out"
    args = [str(data), "-o", str(out), "-m", minilm_path, "--backend", "torch", "--engine", "ray", "--actors", "1"]
    failed = run_cli(*args)
    assert failed.exit_code == 1
    assert f"{data / 'a.jsonl'} line 3: not valid JSON" in failed.output or f"{data / 'b.csv'} line 3" in failed.output
    assert "--skip-invalid" in failed.output and "--resume" in failed.output
    result = run_cli(*args, "--restart", "--skip-invalid")
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table["id"].to_pylist() == ["doc-0", "doc-1", "a-3", "b-1", "b-3", "c-1", "c-2"]
    texts = ["first text", "second text", "after the bad line", "a csv text", "last csv text", "parquet one"]
    with Embedder(minilm_path, backend="torch", device="cpu") as model:
        expected = model.encode_corpus([*texts, "parquet two"])
    got = np.array(table["dense"].to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
    with open(str(out) + ".rejects.jsonl") as handle:
        rejects = [json.loads(line) for line in handle]
    assert [(os.path.basename(r["input"]), r["line"]) for r in rejects] == [("a.jsonl", 3), ("b.csv", 3)]
    assert "field 'text' is empty" in rejects[1]["reason"]


def ray_worker_pids(marker: str = "ShardEncoder") -> list[int]:
    """The pids of this test process's Ray actors running ``marker`` (descendants of the cluster's raylets,
    which this process started)."""
    me = psutil.Process()
    found = []
    for process in me.children(recursive=True):
        try:
            if marker in " ".join(process.cmdline()):
                found.append(process.pid)
        except psutil.Error:
            continue
    return found


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def parts(folder) -> int:
    return sum(1 for name in os.listdir(folder) if name.startswith("part-")) if os.path.isdir(folder) else 0


def cli_process(*args: str) -> subprocess.Popen:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    command = [sys.executable, "-m", "tembed.cli", "encode", *args]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_ctrl_c_as_a_terminal
    )


def _ctrl_c_as_a_terminal() -> None:
    """The child takes SIGINT as from a terminal even when this suite runs as a background job, whose SIGINT the
    shell set to ignored (inherited through exec: Python then installs no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_ctrl_c_then_driver_killed_then_resume_completes_without_duplicates(
    two_nodes, corpus, local_output, minilm_path, tmp_path
):
    out = tmp_path / "out"
    args = [str(corpus), "-o", str(out), "-m", minilm_path, "--backend", "torch", "--engine", "ray"]
    args += ["--address", "local", "--shard-lines", "20"]
    one_actor = ["--actors", "1"]  # slow enough that the signals land mid-run
    # Ctrl-C: exit 130, what is kept is said, and every process the run started is gone.
    first = cli_process(*args, *one_actor)
    wait_for(lambda: parts(out) >= 1, 180, "the first shard")
    started = descendants(first.pid)
    first.send_signal(signal.SIGINT)  # after the first of 30 shards: about 8 s of work left
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 130, stderr
    assert "interrupted:" in stderr and "--resume" in stderr
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in started), 60, "Ray exit")
    after_interrupt = parts(out)
    # The driver killed outright: its Ray processes are ended here by pid, the shards written stay.
    second = cli_process(*args, *one_actor, "--resume")
    wait_for(lambda: parts(out) >= after_interrupt + 2, 180, "more shards")
    started = descendants(second.pid)
    second.kill()
    second.communicate(timeout=30)
    for process in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    done_before = parts(out)
    assert after_interrupt < done_before < 30
    options = JobOptions(quiet=True)
    request = CorpusRequest(str(corpus), str(out), resume=True)
    config = EmbedderConfig(minilm_path, backend="torch", show_progress_bar=False)
    result = run_ray_job(request, config, EncodeOptions(role="passage"), options, RayJobOptions(shard_lines=20))
    assert result.shards_before == done_before and result.rows_done == 600 - 20 * done_before
    assert_same_output(out, local_output)
    # Resuming with another backend would mix vectors of two backends in one folder: refused.
    other = run_cli(*args, "--resume", "--backend", "onnx")
    assert other.exit_code == 2 and "cannot resume: the model differs" in other.output
    assert "backend 'torch' -> 'onnx'" in other.output


def test_a_stalled_run_stops_with_a_clear_error(two_nodes, corpus, minilm_path, tmp_path):
    out = tmp_path / "out"
    args = [str(corpus), "-o", str(out), "-m", minilm_path, "--backend", "torch", "--engine", "ray"]
    result = run_cli(*args, "--stall-timeout", "1", "--actors", "1")
    assert result.exit_code == 1
    assert "no shard finished in 1 s (--stall-timeout)" in result.output and "--resume" in result.output


def test_ray_is_imported_only_when_used():
    code = "import sys, tembed, tembed.ray, tembed.cli.encode; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
