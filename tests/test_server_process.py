"""``tembed serve`` as users run it: the command line in a subprocess on 127.0.0.1, answering the official
``openai`` client and ``huggingface_hub``'s ``InferenceClient`` with the library's vectors; SIGTERM drains the
requests in flight and exits; a worker pool whose worker dies turns /health to 503 and fails requests fast."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import huggingface_hub.constants
import numpy as np
import openai
import pytest
from huggingface_hub import InferenceClient
from sentence_transformers import SentenceTransformer

from server_harness import ServerProcess, get, overload, post

from realdata import sts_b_sentences


def _children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_tembed_serve_answers_real_clients_then_drains_on_sigterm(minilm, minilm_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # HF_HUB_OFFLINE=1 (CI sets it) blocks every request of huggingface_hub's client, even to 127.0.0.1.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    texts = sts_b_sentences()[:40]
    expected = minilm.encode(texts)
    with ServerProcess(minilm_path, "--device", "cpu", "--served-model-name", "minilm", "--api-key", "k1") as server:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="k1", max_retries=0)
        answer = client.embeddings.create(model="minilm", input=texts)  # the client's default: base64
        vectors = np.asarray([item.embedding for item in answer.data], dtype=np.float32)
        assert np.abs(vectors - expected).max() < 1e-6 and answer.model == "minilm"
        reference = SentenceTransformer(minilm_path, device="cpu").encode(texts, normalize_embeddings=True)
        assert np.sum(vectors * reference, axis=1).min() >= 0.99999
        hub = InferenceClient(model=server.base, api_key="k1")
        assert np.abs(hub.feature_extraction(texts[0]) - expected[:1]).max() < 1e-6
        # SIGTERM while a long request is in flight: it is answered, then the server exits.
        long_texts = [" ".join(sts_b_sentences()[i : i + 12]) for i in range(0, 12 * 80, 12)]
        result: dict = {}
        request = threading.Thread(
            target=lambda: result.update(
                answer=post(
                    server.base, "/embed", {"inputs": long_texts}, headers={"Authorization": "Bearer k1"}, timeout=120
                )
            )
        )
        request.start()
        time.sleep(1.0)
        assert server.process.poll() is None
        server.process.send_signal(signal.SIGTERM)
        request.join(120)
        status, _, vectors = result["answer"]
        assert status == 200 and len(vectors) == len(long_texts)
        assert np.abs(np.asarray(vectors[:5]) - minilm.encode(long_texts[:5])).max() < 1e-6
        # uvicorn exits by re-raising the signal once it has drained (so a supervisor sees "terminated by SIGTERM").
        assert server.process.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "requests drained, model closed" in server.output()
        with pytest.raises(OSError):
            get(server.base, "/health", timeout=2)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_a_pool_server_under_overload_then_a_dead_worker_turns_health_to_503(minilm, minilm_path):
    budget = ("--max-queue-tokens", "3000", "--max-request-tokens", "3000", "--queue-timeout", "0.3")
    with ServerProcess(minilm_path, "--device", "cpu,cpu", *budget) as server:
        server.wait_ready(timeout=180)
        texts = sts_b_sentences()[:7]
        status, _, vectors = post(server.base, "/embed", {"inputs": texts})
        assert status == 200 and np.abs(np.asarray(vectors) - minilm.encode(texts)).max() < 1e-6
        # Overload, twice: only 200 / 429 (with Retry-After), healthy after, and the memory of the second round
        # stays within a fixed bound of the first.
        rounds = []
        for _ in range(2):
            counts = asyncio.run(overload(server.base, total=120, concurrency=32, deadline=60.0))
            assert counts["unexpected"] == 0 and counts["transport_error"] == 0 and counts[429] > 0, counts
            assert get(server.base, "/health")[0] == 200
            rounds.append(_rss_kib(server.process.pid))
        assert rounds[1] - rounds[0] < 64 * 1024, rounds
        workers = _children(server.process.pid)
        assert len(workers) >= 2  # the two workers (and multiprocessing's resource tracker)
        os.kill(workers[-1], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while get(server.base, "/health")[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.1)
        status, headers, answer = get(server.base, "/health")
        assert status == 503 and "retry-after" in headers and answer["status"] == "unhealthy"
        started = time.monotonic()
        status, headers, answer = post(server.base, "/embed", {"inputs": ["anyone there?"]}, timeout=30)
        assert status == 503 and answer["error_type"] == "Unhealthy" and "retry-after" in headers
        status, _, answer = post(server.base, "/v1/embeddings", {"input": ["anyone there?"]}, timeout=30)
        assert status == 503 and answer["error"]["type"] == "server_error"
        assert time.monotonic() - started < 5
        assert get(server.base, "/metrics")[0] == 200
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(timeout=60)
        time.sleep(0.5)
        assert not [pid for pid in workers if _alive(pid)]
