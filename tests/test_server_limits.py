"""The server never falls over: admission in tokens (429 with Retry-After), payload limits (JSON 413), the API
key (401, public /health and /metrics), bad input naming the field and the index, out-of-memory isolation, and
the dropped work of clients that left. In-process servers on 127.0.0.1 (tests/server_harness.py); the encoder
is wrapped where a test needs a slow or failing forward pass."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time
import urllib.request

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_harness import HOST, get, overload, post, serve_in_thread
from tembed.pipeline import EncodeOutOfMemoryError
from tembed.server import ServerConfig, create_app

TEXTS = ["A man is playing a guitar.", "A woman is slicing an onion.", "The stock market fell sharply today."]


class WrappedEncoder:
    """The real encoder with a delay per call, a simulated out-of-memory error for texts containing ``HUGE``, and
    a count of the texts it really encoded."""

    def __init__(self, encoder, delay: float = 0.0) -> None:
        self.inner = encoder
        self.settings = encoder.settings
        self.tokenizer = encoder.tokenizer
        self.delay = delay
        self.calls: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    @property
    def healthy(self) -> bool:
        return self.inner.healthy

    def encode(self, texts, options):
        self.gate.wait(30)
        time.sleep(self.delay)
        self.calls.append(len(texts))
        if any("HUGE" in text for text in texts):
            raise EncodeOutOfMemoryError("out of memory on cpu encoding a single text (simulated)")
        return self.inner.encode(texts, options)

    def close(self) -> None:
        pass


def metric(base: str, name: str) -> float:
    """The value of a Prometheus sample (summed over labels) from GET /metrics."""
    status, _, text = get(base, "/metrics")
    assert status == 200
    total = 0.0
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


# ------------------------------------------------------------------------------------------------------ auth
def test_api_key_guards_every_route_but_health_and_metrics(minilm):
    app = create_app(minilm.encoder, ServerConfig(api_key="s3cret-key"))
    with serve_in_thread(app) as base:
        for path, body in (
            ("/v1/embeddings", {"input": "x"}),
            ("/embed", {"inputs": "x"}),
            ("/encode", {"inputs": "x"}),
        ):
            status, headers, answer = post(base, path, body)
            assert status == 401, path
            assert headers["www-authenticate"] == "Bearer"
            message = answer["error"]["message"] if path.startswith("/v1") else answer["error"]
            assert "API key" in message
            status, headers, _ = post(base, path, body, headers={"Authorization": "Bearer wrong-key"})
            assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert post(base, "/embed", {"inputs": "x"}, headers={"Authorization": "s3cret-key"})[0] == 401  # no Bearer
        for path in ("/health", "/ping", "/metrics"):
            assert get(base, path)[0] == 200, path
        assert get(base, "/info")[0] == 401
        status, _, vectors = post(base, "/embed", {"inputs": "x"}, headers={"Authorization": "Bearer s3cret-key"})
        assert status == 200 and np.allclose(vectors[0], minilm.encode("x"), atol=1e-6)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="not-the-key", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            client.embeddings.create(model="m", input="x")
        good = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret-key", max_retries=0)
        assert len(good.embeddings.create(model="m", input="x").data[0].embedding) == 384


# ------------------------------------------------------------------------------------------------------ payload
def test_a_body_over_the_payload_limit_gets_a_json_413_stating_the_limit(minilm):
    app = create_app(minilm.encoder, ServerConfig(payload_limit=20_000))
    big = {"input": ["word " * 1000] * 5}  # ~25 KB
    with serve_in_thread(app) as base:
        status, headers, answer = post(base, "/v1/embeddings", big)
        assert status == 413 and "20000 bytes" in answer["error"]["message"]
        assert answer["error"]["param"] is None and headers["content-type"].startswith("application/json")
        status, _, answer = post(base, "/embed", {"inputs": big["input"]})
        assert status == 413 and answer["error_type"] == "PayloadTooLarge" and "20000 bytes" in answer["error"]
        # A chunked body (no Content-Length) is cut off once it passes the limit.
        connection = http.client.HTTPConnection(HOST, int(base.rsplit(":", 1)[1]), timeout=30)
        connection.putrequest("POST", "/embed")
        connection.putheader("content-type", "application/json")
        connection.putheader("transfer-encoding", "chunked")
        connection.endheaders()
        payload = json.dumps({"inputs": big["input"]}).encode()
        for start in range(0, len(payload), 4096):
            piece = payload[start : start + 4096]
            connection.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        connection.send(b"0\r\n\r\n")
        response = connection.getresponse()
        body = json.loads(response.read())
        assert response.status == 413 and "20000 bytes" in body["error"]
        connection.close()
        assert post(base, "/embed", {"inputs": "small"})[0] == 200


def test_the_default_payload_limit_is_far_above_2_mb(minilm):
    assert ServerConfig().body_limit >= 32 * 1024 * 1024
    app = create_app(minilm.encoder)
    texts = ["lorem ipsum dolor " * 20_000, "sit amet " * 20_000]  # 3 MB of text, truncated to 256 tokens each
    with serve_in_thread(app) as base:
        status, headers, vectors = post(base, "/embed", {"inputs": texts})
        assert status == 200 and headers["x-truncated-inputs"] == "2"
        assert np.abs(np.asarray(vectors) - minilm.encode(texts)).max() < 1e-6


# ------------------------------------------------------------------------------------------------------ bad input
BAD_REQUESTS = [
    ({"input": []}, "input", None, "cannot be empty"),
    ({"input": ["ok", ""]}, "input", 1, "empty text"),
    ({"input": ["ok", "fine", "bad \ud800 text"]}, "input", 2, "lone surrogate"),
    ({"input": [[101, 7592], [7592, 999_999]]}, "input", 1, "outside this model's vocabulary"),
    ({"input": ["x"] * 2049}, "input", None, "limit of 2048"),
    ({"input": "x", "dimensions": 0}, "dimensions", None, "between 1 and"),
    ({"input": "x", "dimensions": 385}, "dimensions", None, "between 1 and"),
    ({"input": ["short", "word " * 400], "truncate": False}, "input", 1, "more than 256 tokens"),
    ({"input": 5}, "input", None, "input"),
    ({"input": [[7592], [101, 102]]}, "input", 1, "decode to an empty"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", None, "encoding_format"),
]


@pytest.mark.parametrize(("body", "param", "index", "words"), BAD_REQUESTS)
def test_bad_input_names_the_field_and_the_index(inputs_server, body, param, index, words):
    base, _ = inputs_server
    raw = json.dumps(body).encode()  # json escapes the lone surrogate as \ud800, as a client would send it
    status, headers, answer = post(base, "/v1/embeddings", raw)
    assert status == 400, answer
    error = answer["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"
    if index is not None:
        assert f"[{index}]" in error["message"] and str(index) in error["code"]
    assert headers["x-should-retry"] == "false"
    tei_body = {("inputs" if key == "input" else key): value for key, value in body.items()}
    tei_body.pop("encoding_format", None)
    status, _, answer = post(base, "/embed", json.dumps(tei_body).encode())
    if "encoding_format" in body:
        return
    assert status in (400, 422) and (status == 400) == (answer["error_type"] == "Empty"), answer
    assert answer["param"] == ("inputs" if param == "input" else param) and answer["index"] == index


def test_outputs_the_model_lacks_and_malformed_json_are_named(inputs_server):
    base, _ = inputs_server
    status, _, answer = post(base, "/encode", {"inputs": ["a"], "outputs": ["dense", "colbert"]})
    assert status == 422 and answer["param"] == "outputs" and "'colbert'" in answer["error"]
    status, _, answer = post(base, "/embed_sparse", {"inputs": ["a"]})
    assert status == 422 and answer["param"] == "outputs"
    status, _, answer = post(base, "/v1/embeddings", b'{"input": ["a", }')
    assert status == 400 and "not valid JSON" in answer["error"]["message"]
    status, _, answer = post(base, "/embed", b'{"inputs": ')
    assert status == 422 and answer["error_type"] == "Validation"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="m", input=[])
    assert caught.value.status_code == 400 and caught.value.param == "input" and caught.value.code == "empty"
    assert caught.value.type == "invalid_request_error"


def test_scoring_routes_check_both_sides_and_their_own_fields(minilm):
    app = create_app(minilm.encoder, ServerConfig(max_request_tokens=200, api_key="k"))
    key = {"Authorization": "Bearer k"}
    long_text = "word " * 150  # 152 tokens with CLS and SEP
    with serve_in_thread(app) as base:
        # max_request_tokens counts the query side and the passage side together.
        status, _, answer = post(base, "/score", {"pairs": [[long_text, long_text]]}, headers=key)
        assert status == 422 and "304 tokens" in answer["error"] and answer["param"] == "pairs"
        status, _, answer = post(base, "/rerank", {"query": "q", "texts": [long_text, long_text]}, headers=key)
        assert status == 422 and answer["param"] == "texts"
        status, _, answer = post(base, "/score", {"query": "q", "texts": [long_text]}, headers=key)
        assert status == 200 and set(answer["data"][0]) == {"index", "dense"}
        status, _, answer = post(
            base, "/rerank", {"query": "q", "texts": ["a", "word " * 300], "truncate": False}, headers=key
        )
        assert status == 422 and answer["param"] == "texts" and answer["index"] == 1
        for field in ("max_query_length", "max_passage_length"):
            for value in (0, -1):
                status, _, answer = post(base, "/score", {"pairs": [["a", "b"]], field: value}, headers=key)
                assert status == 422 and answer["param"] == field, answer
        status, _, answer = post(base, "/score", b'{"pairs": [["a", "b"]], "weights": [NaN, 1, 1]}', headers=key)
        assert status == 422 and answer["param"] == "weights"
        status, _, answer = post(base, "/embed", {"inputs": [True, False]}, headers=key)
        assert status == 422 and answer["param"] == "inputs"
        # HEAD on the public routes needs no key; two Authorization headers are refused whatever their order.
        for path in ("/health", "/ping"):
            request = urllib.request.Request(base + path, method="HEAD")
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200
        connection = http.client.HTTPConnection(HOST, int(base.rsplit(":", 1)[1]), timeout=30)
        connection.putrequest("POST", "/embed")
        connection.putheader("content-type", "application/json")
        connection.putheader("authorization", "Bearer k")
        connection.putheader("authorization", "Bearer wrong")
        connection.putheader("content-length", "15")
        connection.endheaders(b'{"inputs": "x"}')
        assert connection.getresponse().status == 401
        connection.close()


def test_token_ids_can_be_refused_and_a_strict_server_names_the_wrong_model(minilm):
    app = create_app(minilm.encoder, ServerConfig(reject_token_ids=True, strict_model=True, served_model_name="mini"))
    with serve_in_thread(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0)
        with pytest.raises(openai.BadRequestError) as caught:
            client.embeddings.create(model="mini", input=[[7592, 2088]])
        assert caught.value.param == "input" and "check_embedding_ctx_length=False" in str(caught.value)
        with pytest.raises(openai.BadRequestError) as caught:
            client.embeddings.create(model="text-embedding-3-small", input="hello")
        assert caught.value.param == "model" and "'mini'" in str(caught.value)
        assert len(client.embeddings.create(model="mini", input="hello").data) == 1
        assert [model.id for model in client.models.list().data] == ["mini"]


@pytest.fixture(scope="module")
def inputs_server(minilm):
    with serve_in_thread(create_app(minilm.encoder)) as base:
        yield base, minilm


# ------------------------------------------------------------------------------------------------------ overload
def test_past_the_queue_budget_a_request_waits_then_gets_429_with_retry_after(minilm):
    slow = WrappedEncoder(minilm.encoder)
    config = ServerConfig(max_request_tokens=40, max_queue_tokens=40, queue_timeout=0.3)
    seen_retries: list[str] = []
    app = create_app(slow, config)

    async def recording_app(scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/v1/embeddings":
            headers = dict(scope["headers"])
            seen_retries.append(headers.get(b"x-stainless-retry-count", b"-").decode())
        await app(scope, receive, send)

    with serve_in_thread(recording_app) as base:
        slow.gate.clear()  # the forward pass is held: the first request keeps its tokens
        first = threading.Thread(target=post, args=(base, "/embed", {"inputs": ["word " * 30]}))
        first.start()
        time.sleep(0.3)
        started = time.monotonic()
        status, headers, answer = post(base, "/embed", {"inputs": ["another text of twenty tokens " * 2]})
        waited = time.monotonic() - started
        assert status == 429 and headers["retry-after"] == "1" and answer["error_type"] == "Overloaded"
        assert 0.25 < waited < 3.0
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=2)
        with pytest.raises(openai.RateLimitError) as caught:
            client.embeddings.create(model="m", input=["one more waiting text " * 2])
        assert caught.value.status_code == 429 and caught.value.type == "rate_limit_error"
        assert seen_retries == ["0", "1", "2"]
        slow.gate.set()
        first.join(30)
        assert metric(base, "tembed_queue_tokens") == 0
        assert post(base, "/embed", {"inputs": ["fits now"]})[0] == 200
        assert metric(base, "tembed_overloaded_requests_total") >= 4


def test_bounded_overload_run_only_200_429_or_503_and_healthy_after(minilm):
    """The recipe of server-api.md section 6, scaled for 2 cores: 200 requests, 32 at once, a small budget."""
    app = create_app(minilm.encoder, ServerConfig(max_request_tokens=2000, max_queue_tokens=2000, queue_timeout=0.5))
    with serve_in_thread(app) as base:
        counts = asyncio.run(overload(base, total=200, concurrency=32, deadline=120.0))
        assert counts["unexpected"] == 0 and counts["transport_error"] == 0, counts
        assert counts[200] > 0 and counts[429] > 0, counts  # the budget really was exceeded
        assert get(base, "/health")[0] == 200
        assert metric(base, "tembed_queue_tokens") == 0
        assert post(base, "/embed", {"inputs": ["still fine"]})[0] == 200


# ------------------------------------------------------------------------------------------------------ clients that leave
def test_the_work_of_clients_that_left_is_dropped_and_their_tokens_freed(minilm):
    slow = WrappedEncoder(minilm.encoder, delay=0.2)
    app = create_app(slow, ServerConfig())
    with serve_in_thread(app) as base:
        slow.gate.clear()
        blocker = threading.Thread(target=post, args=(base, "/embed", {"inputs": ["hold the batcher"]}))
        blocker.start()
        time.sleep(0.2)

        async def impatient() -> int:
            async with httpx.AsyncClient(base_url=base, timeout=0.05) as client:
                failures = 0
                for i in range(50):
                    try:
                        await client.post("/embed", json={"inputs": [f"impatient text number {i}", "second one"]})
                    except httpx.TimeoutException:
                        failures += 1
                return failures

        assert asyncio.run(impatient()) == 50
        assert metric(base, "tembed_queue_tokens") > 0  # the 50 are still queued behind the held batch
        slow.gate.set()
        blocker.join(30)
        deadline = time.monotonic() + 5
        while metric(base, "tembed_queue_tokens") != 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(base, "tembed_queue_tokens") == 0
        assert sum(slow.calls) < 1 + 50 * 2  # their texts were never encoded (dropped, not computed)
        assert metric(base, "tembed_dropped_requests_total") == 50
        started = time.monotonic()
        assert post(base, "/embed", {"inputs": ["after the storm"]})[0] == 200
        assert time.monotonic() - started < 5


# ------------------------------------------------------------------------------------------------------ out of memory
def test_out_of_memory_fails_only_the_request_whose_text_does_not_fit(minilm):
    wrapped = WrappedEncoder(minilm.encoder)
    app = create_app(wrapped, ServerConfig())
    with serve_in_thread(app) as base:
        wrapped.gate.clear()  # hold the batcher so that the next requests are merged into one call
        results: dict[str, tuple] = {}

        def send(name: str, path: str, body: dict) -> None:
            results[name] = post(base, path, body)

        threads = [threading.Thread(target=send, args=("hold", "/embed", {"inputs": ["first"]}))]
        threads[0].start()
        time.sleep(0.3)
        for name, path, body in (
            ("good", "/embed", {"inputs": TEXTS}),
            ("huge", "/embed", {"inputs": ["a HUGE text"]}),
            ("openai_huge", "/v1/embeddings", {"input": ["another HUGE one"]}),
            ("good2", "/v1/embeddings", {"input": TEXTS[:2], "encoding_format": "float"}),
        ):
            threads.append(threading.Thread(target=send, args=(name, path, body)))
            threads[-1].start()
        time.sleep(0.5)
        wrapped.gate.set()
        for thread in threads:
            thread.join(30)
        assert results["good"][0] == 200
        assert np.abs(np.asarray(results["good"][2]) - minilm.encode(TEXTS)).max() < 1e-6
        good2 = np.asarray([item["embedding"] for item in results["good2"][2]["data"]])
        assert results["good2"][0] == 200 and np.abs(good2 - minilm.encode(TEXTS[:2])).max() < 1e-6
        status, _, answer = results["huge"]
        assert status == 424 and answer["error_type"] == "Backend" and "out of memory" in answer["error"]
        status, _, answer = results["openai_huge"]
        assert status == 500 and "out of memory" in answer["error"]["message"]
        assert max(wrapped.calls) >= 3  # the requests were merged before the split
        assert metric(base, "tembed_oom_splits_total") >= 1
        assert get(base, "/health")[0] == 200
