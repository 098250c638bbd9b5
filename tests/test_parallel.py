"""The multi-process worker pool (tembed.pool), on real text with the real all-MiniLM-L6-v2 checkpoint.

Worker processes take a few seconds each to import torch and load the model, so one 2-worker pool is shared by
most tests; the fault tests start their own.
"""

from __future__ import annotations

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

from tembed.local_encoder import LocalEncoder
from tembed.outputs import EncodeOutputs
from tembed.pool import (
    EmbedderPool,
    PoolClosedError,
    RemoteWorkerError,
    WorkerDiedError,
    resolve_devices,
)
from tembed.pool.errors import pack_exception, unpack_exception
from tembed.pool.scheduler import merge_chunks, plan_chunks
from tembed.settings import EmbedderConfig, EncodeOptions

from realdata import insuranceqa_answers, sts_b_sentences

TOLERANCE = 1e-5
QUERY = EncodeOptions(role="query")


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
def local(minilm_path):
    """The single-process encoder the pool must agree with."""
    with LocalEncoder(EmbedderConfig(model=minilm_path), "cpu") as encoder:
        yield encoder


@pytest.fixture(scope="module")
def reference(local, texts) -> EncodeOutputs:
    return local.encode(texts)


@pytest.fixture(scope="module")
def pool(minilm_path):
    with EmbedderPool(EmbedderConfig(model=minilm_path), ["cpu", "cpu"]) as shared:
        yield shared
    assert _wait_gone([pid for pid in shared.pids if pid]) == []


# ------------------------------------------------------------------------------------------------ results
def test_two_cpu_workers_equal_one_process(pool, texts, reference):
    assert len(texts) >= 2000
    assert pool.threads_per_worker == max(1, len(os.sched_getaffinity(0)) // 2)
    result = pool.encode(texts)
    assert isinstance(result, EncodeOutputs)
    assert result.dense.shape == reference.dense.shape == (len(texts), 384)
    assert result.dense.dtype == np.float32
    np.testing.assert_allclose(result.dense, reference.dense, atol=TOLERANCE, rtol=0)
    np.testing.assert_array_equal(result.token_counts, reference.token_counts)


def test_pool_equals_a_local_encoder_within_1e6_with_token_counts(pool, local):
    sentences = sts_b_sentences("dev")[:300]
    for options in (EncodeOptions(), QUERY, EncodeOptions(role="passage", max_length=16)):
        mine, theirs = pool.encode(sentences, options), local.encode(sentences, options)
        assert mine.dense.shape == theirs.dense.shape == (300, 384)
        np.testing.assert_allclose(mine.dense, theirs.dense, atol=1e-6, rtol=0)
        assert mine.token_counts.dtype == np.int64
        np.testing.assert_array_equal(mine.token_counts, theirs.token_counts)
        assert mine.sparse is None and mine.colbert is None


def test_settings_are_a_local_encoders_but_for_the_device(pool, local):
    assert pool.settings.device == "cpu,cpu"
    assert pool.settings.replace(device=local.settings.device) == local.settings
    assert pool.embedding_dim == local.settings.dim == 384
    assert pool.num_workers == 2 and [str(d) for d in pool.devices] == ["cpu", "cpu"]


def test_shapes_and_checks(pool, local, texts):
    sample = texts[:40]
    one = pool.encode(sample[:1])
    assert one.dense.shape == (1, 384) and one.token_counts.shape == (1,)
    empty = pool.encode([])
    assert empty.dense.shape == (0, 384) and len(empty.token_counts) == 0
    np.testing.assert_allclose(pool.encode(sample, QUERY).dense, local.encode(sample, QUERY).dense, atol=TOLERANCE)
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
        pool.encode(["ok", 3])
    with pytest.raises(TypeError, match="one text"):
        pool.encode("just one text")
    with pytest.raises(TypeError, match="EncodeOptions"):
        pool.encode(sample, {"role": "query"})


def test_repeated_calls_reuse_the_same_workers(pool, texts, reference):
    pids = list(pool.pids)
    for start in (0, 500, 1000):
        got = pool.encode(texts[start : start + 100]).dense
        np.testing.assert_allclose(got, reference.dense[start : start + 100], atol=TOLERANCE, rtol=0)
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
    pool.stats.reset()
    seen = []
    for ids, outputs in pool.encode_stream(source(), block_size=block):
        if not seen:
            assert pulled <= 2 * block  # the input is read lazily: at most two blocks held
        assert ids.dtype == np.int64 and len(ids) == len(outputs) == len(outputs.token_counts)
        np.testing.assert_allclose(outputs.dense, reference.dense[ids], atol=TOLERANCE, rtol=0)
        seen.append(ids)
    order = np.concatenate(seen)
    np.testing.assert_array_equal(order, np.arange(len(subset)))
    assert 0 < pool.stats.max_outstanding <= pool.max_pending_chunks
    assert pool.stats.chunks_sent == pool.stats.chunks_received >= len(subset) // block
    assert list(pool.encode_stream(iter([]))) == []


def test_stream_over_a_generator_equals_encode(pool):
    sentences = sts_b_sentences("dev")[:400] + insuranceqa_answers()[150:200]
    random.Random(1).shuffle(sentences)
    whole = pool.encode(sentences, QUERY)
    blocks = list(pool.encode_stream((text for text in sentences), QUERY, block_size=64))
    assert [len(ids) for ids, _ in blocks] == [64] * 7 + [2]
    streamed = EncodeOutputs.concatenate([outputs for _, outputs in blocks])
    np.testing.assert_array_equal(np.concatenate([ids for ids, _ in blocks]), np.arange(len(sentences)))
    np.testing.assert_allclose(streamed.dense, whole.dense, atol=1e-6, rtol=0)
    np.testing.assert_array_equal(streamed.token_counts, whole.token_counts)


def test_stream_errors_name_the_position_and_refuse_a_string(pool):
    with pytest.raises(TypeError, match=r"texts\[3\] must be a str"):
        list(pool.encode_stream(iter(["a", "b", "c", None]), block_size=2))
    with pytest.raises(TypeError, match="one text"):
        next(pool.encode_stream("just one text"))


def test_abandoned_stream_frees_the_pool(pool, texts, reference):
    stream = pool.encode_stream(iter(texts), block_size=64)
    next(stream)
    with pytest.raises(RuntimeError, match="unfinished encode_stream"):
        pool.encode(texts[:3])
    stream.close()  # what leaving a for loop early does; its chunks still in flight are dropped later
    np.testing.assert_allclose(pool.encode(texts[:100]).dense, reference.dense[:100], atol=TOLERANCE, rtol=0)


# ------------------------------------------------------------------------------------------------ faults
def test_worker_exception_reaches_the_caller_with_type_and_message(pool, texts, reference):
    pids = list(pool.pids)
    with pytest.raises(ValueError, match="output 'sparse' is not available for this model") as info:
        pool.encode(texts[:300], EncodeOptions(outputs=("sparse",)))  # raised inside the workers
    assert "Traceback" in str(info.value.__cause__)
    assert any("raised in tembed worker" in note for note in getattr(info.value, "__notes__", []))
    # The pool stays usable, with the same workers, and late results of the failed call are dropped.
    np.testing.assert_allclose(pool.encode(texts[:200]).dense, reference.dense[:200], atol=TOLERANCE, rtol=0)
    assert pool.pids == pids


class _Unpicklable(str):
    def __reduce__(self):
        raise TypeError("this instruction cannot be pickled")


def test_an_unpicklable_argument_raises_in_the_caller_and_the_pool_stays_usable(pool, texts, reference):
    sent = pool.stats.chunks_sent
    with pytest.raises(TypeError, match="cannot be pickled"):
        pool.encode(texts[:50], EncodeOptions(instruction=_Unpicklable("query: ")))
    assert pool.stats.chunks_sent == sent  # nothing went out
    np.testing.assert_allclose(pool.encode(texts[:100]).dense, reference.dense[:100], atol=TOLERANCE, rtol=0)


def test_an_exception_that_does_not_unpickle_becomes_remote_worker_error():
    class Odd(Exception):
        def __init__(self, a, b):
            super().__init__(f"{a}-{b}")

    try:
        raise Odd(1, 2)
    except Odd as error:
        packed = pack_exception(error)
    assert packed.blob is None
    error = unpack_exception(packed, "worker 0 (cpu, pid 123)")
    assert isinstance(error, RemoteWorkerError)
    assert "Odd: 1-2" in str(error)
    assert "raise Odd(1, 2)" in str(error.__cause__)
    assert any("worker 0 (cpu, pid 123)" in note for note in getattr(error, "__notes__", []))


def test_sigkill_mid_run_raises_within_seconds_and_breaks_the_pool(minilm_path):
    many_short_texts = sts_b_sentences("test") * 3  # short texts: the first chunk comes back quickly
    victim_pool = EmbedderPool(minilm_path, ["cpu", "cpu"])
    pids = list(victim_pool.pids)
    killed_at = []

    def kill_after_first_result():
        deadline = time.monotonic() + 60
        while victim_pool.stats.chunks_received < 1 and time.monotonic() < deadline:
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
    # In the caller, before any process starts:
    with pytest.raises(OSError, match="does-not-exist"):
        EmbedderPool(str(tmp_path / "does-not-exist"), ["cpu", "cpu"])
    with pytest.raises(TypeError, match="no_such_option"):
        EmbedderPool(minilm_path, ["cpu"], no_such_option=1)
    with pytest.raises(TypeError, match="no_such_option"):
        EmbedderPool(EmbedderConfig(model=minilm_path), ["cpu"], no_such_option=1)
    with pytest.raises(ValueError, match="pooling must be one of"):
        EmbedderPool(minilm_path, ["cpu", "cpu"], pooling="bogus")
    assert {p.pid for p in multiprocessing.active_children()} == before
    # Inside the workers, while they load the model:
    start = time.monotonic()
    with pytest.raises(ValueError, match="exceeds the model's dimension") as info:
        EmbedderPool(minilm_path, ["cpu", "cpu"], truncate_dim=100_000)
    assert time.monotonic() - start < 120
    assert any("while loading the model" in note for note in getattr(info.value, "__notes__", []))
    assert "Traceback" in str(info.value.__cause__)
    leftover = {p.pid for p in multiprocessing.active_children()} - before
    assert _wait_gone(leftover) == []


def test_bad_arguments(minilm_path):
    with pytest.raises(ValueError, match="fork"):
        EmbedderPool(minilm_path, ["cpu"], start_method="fork")
    with pytest.raises(ValueError, match="empty"):
        EmbedderPool(minilm_path, [])
    with pytest.raises(ValueError, match="chunk_size"):
        EmbedderPool(minilm_path, ["cpu"], chunk_size=0)
    with pytest.raises(ValueError, match="max_pending_chunks"):
        EmbedderPool(minilm_path, ["cpu"], max_pending_chunks=0)
    with pytest.raises(TypeError, match="not device="):
        EmbedderPool(minilm_path, ["cpu"], device="cpu")


def _run_script(tmp_path, name: str, body: str, minilm_path: str) -> subprocess.CompletedProcess:
    script = tmp_path / name
    script.write_text(textwrap.dedent(body).replace("MODEL", repr(minilm_path)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path
    )


def test_unclosed_pools_are_reaped_quietly_at_interpreter_exit_even_after_a_kill(tmp_path, minilm_path):
    # One pool left open and healthy; one with a worker killed by SIGKILL and never used again. Exit must print
    # nothing (no __del__ noise, no "leaked semaphore" warning) and leave no worker behind.
    done = _run_script(
        tmp_path,
        "leaves_pools_open.py",
        """
        import os, signal, time
        from tembed.pool import EmbedderPool

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
        from tembed.pool import EmbedderPool

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
    assert [str(d) for d in resolve_devices("cpu,cpu")] == ["cpu", "cpu"]
    assert [str(d) for d in resolve_devices(" cpu , cpu ")] == ["cpu", "cpu"]
    assert len(resolve_devices(None)) == 1
    with pytest.raises(ValueError):
        resolve_devices([])
    with pytest.raises(ValueError):
        resolve_devices(["cpu", "nonsense"])
    with pytest.raises(ValueError, match="empty entry"):
        resolve_devices("cpu,")


def test_plan_chunks_sorts_by_length_and_shares_small_inputs():
    texts = ["x" * (i % 13) for i in range(200)]
    chunks = plan_chunks(texts, chunk_size=256, workers=2)
    assert [len(c) for c in chunks] == [25] * 8  # a small input: 4 chunks per worker
    assert [len(c) for c in plan_chunks(texts[:50], chunk_size=256, workers=2)] == [16, 16, 16, 2]  # >= 16 each
    order = np.concatenate(chunks)
    np.testing.assert_array_equal(np.sort(order), np.arange(200))
    lengths = [len(texts[i]) for i in order]
    assert lengths == sorted(lengths, reverse=True)
    assert [len(c) for c in plan_chunks(texts * 30, chunk_size=256, workers=2)][:2] == [256, 256]
    (empty,) = plan_chunks([], chunk_size=256, workers=2)
    assert empty.dtype == np.int64 and len(empty) == 0


def test_merge_chunks_restores_input_order_for_every_output():
    positions = [np.array([3, 0]), np.array([1, 2])]

    def part(idx):
        return EncodeOutputs(
            dense=np.array([[float(i)] for i in idx], dtype=np.float32),
            sparse=[{int(i): float(i)} for i in idx],
            colbert=[np.full((int(i) + 1, 2), float(i), dtype=np.float32) for i in idx],
            token_counts=np.array([10 + int(i) for i in idx], dtype=np.int64),
        )

    merged = merge_chunks([(p, part(p)) for p in positions], 4)
    np.testing.assert_array_equal(merged.dense[:, 0], [0, 1, 2, 3])
    assert merged.sparse == [{0: 0.0}, {1: 1.0}, {2: 2.0}, {3: 3.0}]
    assert [m.shape[0] for m in merged.colbert] == [1, 2, 3, 4]
    np.testing.assert_array_equal(merged.token_counts, [10, 11, 12, 13])
    only = part(np.arange(3))
    assert merge_chunks([(np.arange(3), only)], 3) is only  # one chunk in order: as is
    dense_only = merge_chunks([(p, EncodeOutputs(dense=part(p).dense)) for p in positions], 4)
    assert dense_only.sparse is None and dense_only.colbert is None and dense_only.token_counts is None


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
    workers = pool.pool if hasattr(pool, "pool") else pool  # an Embedder over an EmbedderPool, or the pool itself
    assert isinstance(workers, EmbedderPool) and workers.num_workers == 2
    assert workers.closed and not any(_alive(pid) for pid in workers.pids)
