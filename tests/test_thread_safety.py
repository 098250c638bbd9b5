"""One Embedder shared by many threads (as a web server or a thread pool uses it): every caller gets its own,
correct vectors, on every backend."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tembed import Embedder

from realdata import insuranceqa_answers, sts_b_sentences

THREADS = 8
CALLS_PER_THREAD = 6


def _jobs() -> list[dict]:
    """Calls that differ in texts, lengths, instruction and max_length, so a mixed-up result or a truncation taken
    from another thread's call shows."""
    sentences = sts_b_sentences("test")[:400]
    answers = insuranceqa_answers()[:64]
    jobs = []
    for index in range(THREADS * CALLS_PER_THREAD):
        texts = sentences[(index * 7) % 360 : (index * 7) % 360 + 5 + index % 9] + answers[index % 8 :: 8][:3]
        jobs.append(
            {
                "texts": texts,
                "max_length": (16, 48, 256)[index % 3],
                "instruction": "query: " if index % 4 == 0 else None,
            }
        )
    return jobs


def _hammer(embedder: Embedder, jobs: list[dict]) -> list[np.ndarray]:
    """Run every job from THREADS threads at once (released together by a barrier)."""
    barrier = threading.Barrier(THREADS)

    def worker(thread: int) -> list[tuple[int, np.ndarray]]:
        barrier.wait()
        mine = range(thread, len(jobs), THREADS)
        return [
            (i, embedder.encode(jobs[i]["texts"], max_length=jobs[i]["max_length"], instruction=jobs[i]["instruction"]))
            for i in mine
        ]

    with ThreadPoolExecutor(THREADS) as executor:
        results = dict(pair for part in executor.map(worker, range(THREADS)) for pair in part)
    return [results[i] for i in range(len(jobs))]


@pytest.mark.parametrize(
    ("backend", "precision"),
    [("torch", "fp32"), ("onnx", "fp32"), ("openvino", "fp32"), ("onnx", "int8"), ("openvino", "int8")],
)
def test_threads_sharing_one_embedder_get_their_own_vectors(minilm_path, backend, precision):
    if precision == "int8" and backend == "openvino":
        pytest.importorskip("nncf")
    jobs = _jobs()
    with Embedder(minilm_path, device="cpu", backend=backend, precision=precision, batch_size=8) as embedder:
        sequential = [
            embedder.encode(job["texts"], max_length=job["max_length"], instruction=job["instruction"]) for job in jobs
        ]
        threaded = _hammer(embedder, jobs)
    worst = max(float(np.abs(a - b).max()) for a, b in zip(threaded, sequential, strict=True))
    print(f"[{backend} {precision}] {len(jobs)} calls from {THREADS} threads: max |threaded - sequential| {worst:.2e}")
    for index, (mine, expected) in enumerate(zip(threaded, sequential, strict=True)):
        assert mine.shape == expected.shape, f"call {index}"
        np.testing.assert_allclose(mine, expected, atol=1e-5, err_msg=f"call {index}")


def test_threads_sharing_a_pooled_embedder(minilm_path):
    """A pooled Embedder (two CPU worker processes) called from many threads."""
    jobs = _jobs()[: THREADS * 2]
    with Embedder(minilm_path, device=["cpu", "cpu"], batch_size=8) as embedder:
        sequential = [
            embedder.encode(job["texts"], max_length=job["max_length"], instruction=job["instruction"]) for job in jobs
        ]
        threaded = _hammer(embedder, jobs)
    for index, (mine, expected) in enumerate(zip(threaded, sequential, strict=True)):
        np.testing.assert_allclose(mine, expected, atol=1e-5, err_msg=f"call {index}")


def test_threads_with_different_max_lengths_truncate_their_own_texts(minilm_path):
    """The tokenizer's truncation setting is shared state: each call must keep its own max_length."""
    long_texts = insuranceqa_answers()[:40]
    with Embedder(minilm_path, device="cpu", backend="torch") as embedder:
        expected = {n: embedder.tokenizer.encode(long_texts, n) for n in (8, 64)}
        barrier = threading.Barrier(THREADS)

        def worker(thread: int) -> bool:
            barrier.wait()
            length = (8, 64)[thread % 2]
            return all(embedder.tokenizer.encode(long_texts, length) == expected[length] for _ in range(30))

        with ThreadPoolExecutor(THREADS) as executor:
            assert all(executor.map(worker, range(THREADS)))


def test_threads_sharing_a_flag_icl_model(minilm_path):
    """FlagICLModel counts tokens without truncation between the truncated encodes of other threads."""
    from tembed.compat.flagembedding import FlagICLModel

    model = FlagICLModel(minilm_path, devices="cpu", query_instruction_for_retrieval="Find the answer.")
    queries = [[text] for text in insuranceqa_answers()[:24]]
    lengths = [(64, 128)[i % 2] for i in range(len(queries))]
    sequential = [model.encode_queries(q, max_length=n) for q, n in zip(queries, lengths, strict=True)]
    barrier = threading.Barrier(6)

    def worker(thread: int) -> list[tuple[int, np.ndarray]]:
        barrier.wait()
        return [(i, model.encode_queries(queries[i], max_length=lengths[i])) for i in range(thread, len(queries), 6)]

    with ThreadPoolExecutor(6) as executor:
        threaded = dict(pair for part in executor.map(worker, range(6)) for pair in part)
    for index, expected in enumerate(sequential):
        np.testing.assert_allclose(threaded[index], expected, atol=1e-5, err_msg=f"query {index}")
