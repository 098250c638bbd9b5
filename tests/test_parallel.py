"""The multi-process worker pool (tembed.parallel), on real text with the real all-MiniLM-L6-v2 checkpoint.

Worker processes take 2-3 s each to import torch and load the model, so one 2-worker pool is shared by most
tests; the fault tests start their own.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from tembed.parallel import (
    EmbedderPool,
    PoolClosedError,
    RemoteWorkerError,
    WorkerDiedError,
    _merge,
    _pack_exception,
    _unpack_exception,
    _Worker,
    resolve_devices,
)

from realdata import insuranceqa_answers, sts_b_sentences

TOLERANCE = 1e-5


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/status") as handle:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in handle)
    except FileNotFoundError:
        return False


def _wait_gone(pids, seconds: float = 5.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        left = [pid for pid in pids if _alive(pid)]
        if not left:
            return []
        time.sleep(0.1)
    return [pid for pid in pids if _alive(pid)]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """2,050 real texts: short STS-B sentences and long InsuranceQA answers, mixed."""
    mixed = sts_b_sentences("test")[:1900] + insuranceqa_answers()[:150]
    random.Random(0).shuffle(mixed)
    return mixed


@pytest.fixture(scope="module")
def reference(minilm, texts) -> np.ndarray:
    return minilm.encode(texts)


@pytest.fixture(scope="module")
def pool(minilm_path):
    with EmbedderPool(minilm_path, ["cpu", "cpu"]) as shared:
        yield shared
    assert _wait_gone([pid for pid in shared.pids if pid]) == []


# ------------------------------------------------------------------------------------------------ results
def test_two_cpu_workers_equal_one_process(pool, texts, reference):
    assert len(texts) >= 2000
    assert pool.threads_per_worker == max(1, len(os.sched_getaffinity(0)) // 2)
    vectors = pool.encode(texts)
    assert vectors.shape == reference.shape == (len(texts), 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, reference, atol=TOLERANCE, rtol=0)


def test_shapes_and_instruction_methods_match_embedder(pool, minilm, texts):
    sample = texts[:40]
    assert pool.encode(sample[0]).shape == (384,)
    assert pool.encode([]).shape == (0, 384)
    assert pool.embedding_dim == 384
    np.testing.assert_allclose(pool.encode_queries(sample), minilm.encode_queries(sample), atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(pool.encode_corpus(sample[0]), minilm.encode_corpus(sample[0]), atol=TOLERANCE, rtol=0)
    tensor = pool.encode(sample, convert_to="torch")
    np.testing.assert_allclose(tensor.numpy(), minilm.encode(sample), atol=TOLERANCE, rtol=0)
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        pool.encode(["ok", 3])


def test_repeated_calls_reuse_the_same_workers(pool, texts, reference):
    pids = list(pool.pids)
    for start in (0, 500, 1000):
        np.testing.assert_allclose(
            pool.encode(texts[start : start + 100]), reference[start : start + 100], atol=TOLERANCE, rtol=0
        )
    assert pool.pids == pids
    assert all(_alive(pid) for pid in pids)
    ours = {p.pid for p in multiprocessing.active_children() if p.name.startswith("tembed-worker-")}
    assert set(pids) <= ours


def test_stream_keeps_input_order_with_mixed_lengths_and_bounded_work(pool, texts, reference):
    pulled = 0

    subset = texts[:900]

    def source():
        nonlocal pulled
        for text in subset:
            pulled += 1
            yield text

    block = 150
    pool._max_outstanding_seen = 0
    seen = []
    for ids, vectors in pool.stream(source(), block_size=block):
        if not seen:
            assert pulled <= 2 * block  # the input is read lazily: at most two blocks held
        assert ids.dtype == np.int64 and len(ids) == len(vectors)
        np.testing.assert_allclose(vectors, reference[ids], atol=TOLERANCE, rtol=0)
        seen.append(ids)
    order = np.concatenate(seen)
    np.testing.assert_array_equal(order, np.arange(len(subset)))
    assert 0 < pool._max_outstanding_seen <= pool.max_pending_chunks
    assert list(pool.stream(iter([]))) == []


def test_stream_errors_name_the_position_and_refuse_a_string(pool):
    with pytest.raises(TypeError, match=r"texts\[3\] must be a str"):
        list(pool.stream(iter(["a", "b", "c", None]), block_size=2))
    with pytest.raises(TypeError, match="one text"):
        next(pool.stream("just one text"))


def test_abandoned_stream_frees_the_pool(pool, texts, reference):
    stream = pool.stream(iter(texts), block_size=64)
    next(stream)
    with pytest.raises(RuntimeError, match="unfinished stream"):
        pool.encode(texts[:3])
    stream.close()  # what leaving a for loop early does; its chunks still in flight are dropped later
    np.testing.assert_allclose(pool.encode(texts[:100]), reference[:100], atol=TOLERANCE, rtol=0)


# ------------------------------------------------------------------------------------------------ faults
def test_worker_exception_reaches_the_caller_with_type_and_message(pool, texts, reference):
    pids = list(pool.pids)
    with pytest.raises(ValueError, match="max_length must be a positive int, got -1") as info:
        pool.encode(texts[:300], max_length=-1)
    assert "Traceback" in str(info.value.__cause__)
    assert any("raised in tembed worker" in note for note in getattr(info.value, "__notes__", []))
    with pytest.raises(AttributeError, match="no_such_method"):
        pool.map("no_such_method", ["a text"])
    with pytest.raises(ValueError, match="public"):
        pool.map("_encode", ["a text"])
    # The pool stays usable, with the same workers, and late results of the failed call are dropped.
    np.testing.assert_allclose(pool.encode(texts[:200]), reference[:200], atol=TOLERANCE, rtol=0)
    assert pool.pids == pids


def test_an_exception_that_does_not_unpickle_becomes_remote_worker_error():
    class Odd(Exception):
        def __init__(self, a, b):
            super().__init__(f"{a}-{b}")

    try:
        raise Odd(1, 2)
    except Odd as error:
        packed = _pack_exception(error)
    assert packed[0] is None
    worker = _Worker(0, "cpu", process=type("P", (), {"pid": 123})(), tasks=None, results=None)
    error = _unpack_exception(packed, worker)
    assert isinstance(error, RemoteWorkerError)
    assert "Odd: 1-2" in str(error)
    assert "raise Odd(1, 2)" in str(error.__cause__)


def test_sigkill_mid_run_raises_within_seconds_and_breaks_the_pool(minilm_path):
    many_short_texts = sts_b_sentences("test") * 3  # short texts: the first chunk comes back quickly
    victim_pool = EmbedderPool(minilm_path, ["cpu", "cpu"])
    pids = list(victim_pool.pids)
    killed_at = []

    def kill_after_first_result():
        deadline = time.monotonic() + 60
        while victim_pool._chunks_received < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        killed_at.append(time.monotonic())
        os.kill(pids[0], signal.SIGKILL)

    killer = threading.Thread(target=kill_after_first_result, daemon=True)
    killer.start()
    with pytest.raises(WorkerDiedError, match="SIGKILL") as info:
        victim_pool.encode(many_short_texts)
    raised_at = time.monotonic()
    killer.join(5)
    assert raised_at - killed_at[0] < 10
    assert info.value.pid == pids[0] and info.value.exitcode == -signal.SIGKILL and info.value.device == "cpu"
    assert _wait_gone(pids) == []  # the other worker was stopped too

    # Policy: the pool is broken; every later call says so and points at the original death.
    with pytest.raises(PoolClosedError, match="create a new EmbedderPool") as later:
        victim_pool.encode(["a text"])
    assert isinstance(later.value.__cause__, WorkerDiedError)
    victim_pool.close()
    victim_pool.close()
    assert not [p for p in multiprocessing.active_children() if p.pid in pids]


def test_a_worker_that_died_between_calls_is_reported_by_the_next_call(minilm_path):
    with EmbedderPool(minilm_path, ["cpu"]) as solo:
        solo.encode(["warm up"])
        (pid,) = solo.pids
        os.kill(pid, signal.SIGKILL)
        assert _wait_gone([pid]) == []  # dead (a zombie until the pool reaps it)
        with pytest.raises(WorkerDiedError, match=f"pid {pid}"):
            solo.encode(["still there?"])
        with pytest.raises(PoolClosedError):
            solo.encode(["again"])
    assert _wait_gone([pid]) == []


def test_start_up_failures_raise_from_the_constructor(minilm_path, tmp_path):
    before = {p.pid for p in multiprocessing.active_children()}
    with pytest.raises(OSError, match="does-not-exist"):
        EmbedderPool(str(tmp_path / "does-not-exist"), ["cpu", "cpu"])
    with pytest.raises(TypeError, match="no_such_option"):
        EmbedderPool(minilm_path, ["cpu"], no_such_option=1)
    start = time.monotonic()
    with pytest.raises(ValueError, match="pooling must be one of") as info:
        EmbedderPool(minilm_path, ["cpu", "cpu"], pooling="bogus")  # raised inside the workers
    assert time.monotonic() - start < 60
    assert any("while loading the model" in note for note in getattr(info.value, "__notes__", []))
    leftover = {p.pid for p in multiprocessing.active_children()} - before
    assert _wait_gone(leftover) == []


def test_bad_arguments(minilm_path):
    with pytest.raises(ValueError, match="fork"):
        EmbedderPool(minilm_path, ["cpu"], start_method="fork")
    with pytest.raises(ValueError, match="empty"):
        EmbedderPool(minilm_path, [])
    with pytest.raises(ValueError, match="chunk_size"):
        EmbedderPool(minilm_path, ["cpu"], chunk_size=0)


def _run_script(tmp_path, name: str, body: str, minilm_path: str) -> subprocess.CompletedProcess:
    script = tmp_path / name
    script.write_text(textwrap.dedent(body).replace("MODEL", repr(minilm_path)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )


def test_unclosed_pools_are_reaped_quietly_at_interpreter_exit_even_after_a_kill(tmp_path, minilm_path):
    # One pool left open and healthy; one with a worker killed by SIGKILL and never used again. Exit must print
    # nothing (no __del__ noise, no "leaked semaphore" warning) and leave no worker behind.
    done = _run_script(
        tmp_path,
        "leaves_pools_open.py",
        """
        import os, signal, time
        from tembed.parallel import EmbedderPool

        if __name__ == "__main__":
            healthy = EmbedderPool(MODEL, ["cpu"])
            healthy.encode(["a text", "another text"] * 50)
            hit = EmbedderPool(MODEL, ["cpu"])
            hit.encode(["a text"])
            os.kill(hit.pids[0], signal.SIGKILL)
            time.sleep(0.5)
            print(*healthy.pids, *hit.pids)
        """,
        minilm_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == ""
    pids = [int(pid) for pid in done.stdout.split()]
    assert len(pids) == 2
    assert _wait_gone(pids) == []


def test_a_script_without_main_guard_gets_a_clear_error_not_a_recursive_spawn(tmp_path, minilm_path):
    done = _run_script(
        tmp_path,
        "no_guard.py",
        """
        from tembed.parallel import EmbedderPool

        pool = EmbedderPool(MODEL, ["cpu"])
        print("created")
        """,
        minilm_path,
    )
    assert done.returncode != 0
    assert "created" not in done.stdout
    assert 'if __name__ == "__main__":' in done.stderr
    assert "WorkerDiedError" in done.stderr


# ------------------------------------------------------------------------------------------------ pieces
def test_resolve_devices():
    assert [str(d) for d in resolve_devices("cpu")] == ["cpu"]
    assert [str(d) for d in resolve_devices(["cpu", "cpu", "cpu"])] == ["cpu", "cpu", "cpu"]
    assert len(resolve_devices(None)) == 1
    with pytest.raises(ValueError):
        resolve_devices([])
    with pytest.raises(ValueError):
        resolve_devices(["cpu", "nonsense"])


@dataclasses.dataclass
class _Output:
    dense: np.ndarray
    weights: list


class _Concatenable:
    def __init__(self, values):
        self.values = list(values)

    @classmethod
    def concatenate(cls, parts):
        return cls(v for part in parts for v in part.values)

    def take(self, indices):
        return _Concatenable(self.values[i] for i in indices)


def test_merge_restores_input_order_for_every_output_kind():
    positions = [np.array([3, 0]), np.array([1, 2])]

    def part(idx):
        return np.array([[float(i)] for i in idx], dtype=np.float32)

    merged = _merge([part(p) for p in positions], positions, 4)
    np.testing.assert_array_equal(merged[:, 0], [0, 1, 2, 3])
    as_dict = _merge(
        [{"dense": part(p), "lexical": [{"w": int(i)} for i in p], "colbert": None} for p in positions], positions, 4
    )
    assert [d["w"] for d in as_dict["lexical"]] == [0, 1, 2, 3] and as_dict["colbert"] is None
    as_tuple = _merge([(part(p), list(p)) for p in positions], positions, 4)
    assert as_tuple[1] == [0, 1, 2, 3]
    as_dataclass = _merge([_Output(part(p), list(p)) for p in positions], positions, 4)
    assert as_dataclass.weights == [0, 1, 2, 3]
    custom = _merge([_Concatenable(p.tolist()) for p in positions], positions, 4)
    assert custom.values == [0, 1, 2, 3]
    with pytest.raises(TypeError, match="concatenate"):
        _merge([object(), object()], positions, 4)


# ------------------------------------------------------------------------------------ Embedder(device=[...])
def test_embedder_with_a_device_list_runs_a_pool_for_every_output(tiny_m3_path):
    from tembed import Embedder

    texts = sts_b_sentences("test")[:150] + insuranceqa_answers()[:30]
    pairs = list(zip(texts[:40], texts[40:80], strict=True))
    names = ("dense", "sparse", "colbert")
    with Embedder(tiny_m3_path, device="cpu") as single:
        expected = single.encode(texts, outputs=names)
        expected_scores = single.compute_score(pairs, weights=(0.4, 0.2, 0.4))
        expected_one = single.encode("What is BGE M3?", outputs=names)
    with Embedder(tiny_m3_path, device=["cpu", "cpu"]) as pooled:
        assert pooled.pool is not None and pooled.pool.num_workers == 2
        assert pooled.embedding_dim == 32 and pooled.outputs == names
        result = pooled.encode(texts, outputs=names)
        scores = pooled.compute_score(pairs, weights=(0.4, 0.2, 0.4))
        one = pooled.encode("What is BGE M3?", outputs=names)
        single_score = pooled.compute_score(pairs[0])
        pids = pooled.pool.pids
    assert np.abs(result.dense - expected.dense).max() <= 1e-5
    for mine, theirs in zip(result.sparse, expected.sparse, strict=True):
        assert set(mine) == set(theirs) and max((abs(mine[k] - v) for k, v in theirs.items()), default=0) <= 1e-5
    for mine, theirs in zip(result.colbert, expected.colbert, strict=True):
        assert mine.shape == theirs.shape and np.abs(mine - theirs).max(initial=0) <= 1e-5
    for mode, values in expected_scores.items():
        assert np.abs(np.array(scores[mode]) - np.array(values)).max() <= 1e-5
    assert isinstance(single_score["dense"], float)
    assert one.dense.shape == (32,) and isinstance(one.sparse, dict)
    assert np.abs(one.dense - expected_one.dense).max() <= 1e-5
    assert not any(_alive(pid) for pid in pids)


def test_flagembedding_facade_pool_methods(minilm_path):
    from tembed.compat.flagembedding import FlagModel

    texts = sts_b_sentences("dev")[:120]
    with FlagModel(minilm_path, pooling_method="mean", devices="cpu", use_fp16=False) as model:
        expected = model.encode(texts)
        pool = model.start_multi_process_pool(["cpu", "cpu"])
        try:
            pooled = model.encode_multi_process(texts, pool)
        finally:
            model.stop_multi_process_pool(pool)
    assert np.abs(pooled - expected).max() <= 1e-5
    assert pool.closed and not any(_alive(pid) for pid in pool.pids)
