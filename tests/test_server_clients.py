"""The HTTP server through clients nobody on the team wrote (the official ``openai`` package and
``huggingface_hub.InferenceClient``) and plain standard-library HTTP, on all-MiniLM-L6-v2 with real STS-B
sentences. Every vector is compared with the library (``tembed.Embedder``) and sentence-transformers, never with
numbers the server produced."""

from __future__ import annotations

import base64
import threading

import huggingface_hub.constants
import numpy as np
import openai
import pytest
from huggingface_hub import InferenceClient
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from sentence_transformers import SentenceTransformer
from transformers import AutoTokenizer

from server_harness import get, post, serve_in_thread
from tembed import Embedder
from tembed.server import create_app
from tembed.settings import EmbedderConfig

from realdata import sts_b_sentences

ATOL = 1e-6
SENTENCES = sts_b_sentences("test")
TEXTS = SENTENCES[:8]


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _f32(response) -> np.ndarray:
    return np.asarray([item.embedding for item in response.data], np.float32)


def _b64(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), "<f4")


@pytest.fixture(scope="module")
def base(minilm):
    with serve_in_thread(create_app(minilm.encoder)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base):
    return OpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0)


@pytest.fixture(scope="module")
def hf_tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def long_text(hf_tokenizer) -> str:
    """Real sentences joined until they are well over the model's 256 tokens."""
    text, index = "", 100
    while len(hf_tokenizer(text)["input_ids"]) <= 300:
        text += SENTENCES[index] + " "
        index += 1
    return text.strip()


# ------------------------------------------------------------------------------------------------ openai
def test_openai_base64_and_float_equal_the_library_and_sentence_transformers(client, minilm, minilm_path, hf_tokenizer):
    default = client.embeddings.create(model="m", input=TEXTS)  # the client asks for base64
    floats = client.embeddings.create(model="m", input=TEXTS, encoding_format="float")
    assert [item.index for item in default.data] == list(range(len(TEXTS)))
    assert np.array_equal(_f32(default), _f32(floats))
    expected = minilm.encode(TEXTS)
    assert _f32(default).shape == (len(TEXTS), 384)
    assert _max_diff(_f32(default), expected) <= ATOL
    reference = SentenceTransformer(minilm_path, device="cpu").encode(TEXTS, normalize_embeddings=True)
    cosines = np.sum(_f32(default) * reference, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosines.min() >= 0.99999
    true_tokens = sum(len(ids) for ids in hf_tokenizer(TEXTS)["input_ids"])
    assert default.usage.prompt_tokens == true_tokens == floats.usage.prompt_tokens
    assert default.usage.total_tokens == true_tokens


def test_raw_base64_is_little_endian_float32(base, minilm):
    status, _, body = post(base, "/v1/embeddings", {"input": TEXTS[:3], "encoding_format": "base64"})
    assert status == 200, body
    vectors = np.stack([_b64(item["embedding"]) for item in body["data"]])
    assert vectors.shape == (3, 384)
    assert _max_diff(vectors, minilm.encode(TEXTS[:3])) <= ATOL
    assert body["object"] == "list" and body["data"][0]["object"] == "embedding"


def test_openai_dimensions_are_the_first_columns_renormalized(client, minilm):
    response = client.embeddings.create(model="m", input=TEXTS[:4], dimensions=64, encoding_format="float")
    vectors = _f32(response)
    assert vectors.shape == (4, 64)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    head = minilm.encode(TEXTS[:4])[:, :64]
    assert _max_diff(vectors, head / np.linalg.norm(head, axis=1, keepdims=True)) <= ATOL
    base64_form = _f32(client.embeddings.create(model="m", input=TEXTS[:4], dimensions=64))
    assert np.array_equal(base64_form, vectors)


def test_openai_token_ids_give_the_vector_of_the_text(client, minilm, hf_tokenizer):
    texts = SENTENCES[20:22]
    ids = [hf_tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    for sequence in ids:  # the ids round-trip, so the test is meaningful
        assert hf_tokenizer(hf_tokenizer.decode(sequence), add_special_tokens=False)["input_ids"] == sequence
    vectors = _f32(client.embeddings.create(model="m", input=ids, encoding_format="float"))
    assert _max_diff(vectors, minilm.encode(texts)) <= ATOL
    single = _f32(client.embeddings.create(model="m", input=ids[0], encoding_format="float"))
    assert _max_diff(single, minilm.encode(texts[:1])) <= ATOL


def test_openai_models_list_has_the_served_name(client, minilm):
    names = [model.id for model in client.models.list().data]
    assert names == [minilm.settings_.model]
    assert client.embeddings.create(model="anything", input=["x"]).model == minilm.settings_.model


def test_openai_empty_input_is_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="m", input=[])
    error = caught.value
    assert error.status_code == 400
    assert error.param == "input"
    assert error.type == "invalid_request_error"
    assert error.code and "input" in error.message


@pytest.mark.parametrize("dimensions", [0, 10_000])
def test_openai_bad_dimensions_name_the_field(client, dimensions):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="m", input=["a sentence"], dimensions=dimensions)
    assert caught.value.status_code == 400
    assert caught.value.param == "dimensions"
    assert str(dimensions) in caught.value.message


def test_openai_too_long_without_truncation_names_the_index(client, minilm, hf_tokenizer, long_text):
    inputs = [TEXTS[0], long_text]
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="m", input=inputs, extra_body={"truncate": False})
    error = caught.value
    assert error.status_code == 400 and error.param == "input"
    assert "input[1]" in error.message
    assert error.body["code"] == error.code and "1" in str(error.code)
    truncated = client.embeddings.create(model="m", input=inputs, encoding_format="float")
    assert _max_diff(_f32(truncated), minilm.encode(inputs)) <= ATOL
    assert truncated.usage.prompt_tokens == len(hf_tokenizer(TEXTS[0])["input_ids"]) + 256


# ------------------------------------------------------------------------------------------------ huggingface_hub
@pytest.mark.parametrize("path", ["", "/embed"])
def test_inference_client_feature_extraction(base, minilm, monkeypatch, path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # conftest's offline mode: 127.0.0.1 only
    hub = InferenceClient(model=base + path, api_key="k")  # a dummy key: no stored token is sent
    one = hub.feature_extraction("hi")
    assert one.shape == (1, 384)
    assert _max_diff(one, minilm.encode(["hi"])) <= ATOL
    two = hub.feature_extraction(TEXTS[:2], normalize=True, truncate=True)
    assert two.shape == (2, 384)
    assert _max_diff(two, minilm.encode(TEXTS[:2])) <= ATOL


# ------------------------------------------------------------------------------------------------ input_type
@pytest.fixture(scope="module")
def instructed(minilm_path):
    config = EmbedderConfig(model=minilm_path, query_instruction="query: ", passage_instruction="passage: ")
    embedder = Embedder.from_config(config, "cpu")  # its encoder is the LocalEncoder the app serves
    with embedder, serve_in_thread(create_app(embedder.encoder)) as url:
        yield embedder, url


def test_input_type_applies_the_instructions(instructed, minilm):
    embedder, url = instructed
    texts = TEXTS[:3]
    queries, passages = embedder.encode_queries(texts), embedder.encode_corpus(texts)
    vectors = {}
    for input_type in ("query", "passage", "raw"):
        status, _, body = post(url, "/encode", {"inputs": texts, "input_type": input_type})
        assert status == 200, body
        vectors[input_type] = np.asarray([item["dense"] for item in body["data"]], np.float32)
    assert _max_diff(vectors["query"], queries) <= ATOL
    assert _max_diff(vectors["passage"], passages) <= ATOL
    assert _max_diff(vectors["raw"], minilm.encode(texts)) <= ATOL
    assert _max_diff(vectors["raw"], vectors["query"]) > 1e-3  # the instruction really changes the vector
    assert _max_diff(queries, passages) > 1e-3
    client = OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
    for input_type, expected in (("query", queries), ("passage", passages)):
        response = client.embeddings.create(model="m", input=texts, extra_body={"input_type": input_type})
        assert _max_diff(_f32(response), expected) <= ATOL
    status, _, body = post(url, "/embed", {"inputs": texts, "prompt_name": "query"})
    assert status == 200 and _max_diff(body, queries) <= ATOL


# ------------------------------------------------------------------------------------------------ concurrency
def _batch_counts(base: str) -> tuple[float, float]:
    status, _, text = get(base, "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(text.decode()):
        if family.name == "tembed_batch_size":
            samples = {sample.name: sample.value for sample in family.samples}
            return samples["tembed_batch_size_count"], samples["tembed_batch_size_sum"]
    raise AssertionError("no tembed_batch_size histogram in /metrics")


def _one_request(base: str, client: OpenAI, index: int, texts: list[str]) -> np.ndarray:
    kind = index % 3
    if kind == 0:  # the openai client (base64)
        return _f32(client.embeddings.create(model="m", input=texts))
    if kind == 1:  # plain HTTP, base64
        status, _, body = post(base, "/v1/embeddings", {"input": texts, "encoding_format": "base64"})
        assert status == 200, body
        assert [item["index"] for item in body["data"]] == list(range(len(texts)))
        return np.stack([_b64(item["embedding"]) for item in body["data"]])
    status, _, body = post(base, "/embed", {"inputs": texts})  # TEI
    assert status == 200, body
    return np.asarray(body, np.float32)


def _concurrent_requests(count: int) -> list[list[str]]:
    """``count`` requests of distinct real sentences (1 or 5 each); the last holds 17 texts of over 256 tokens,
    more than one batch budget (4,096 tokens), so the batcher cuts it into parts and joins them again."""
    requests, start = [], 200
    for index in range(count - 1):
        size = 5 if index % 2 else 1
        requests.append(SENTENCES[start : start + size])
        start += size
    requests.append([" ".join(SENTENCES[1000 + 30 * i : 1030 + 30 * i]) for i in range(17)])
    return requests


def test_concurrent_requests_are_merged_and_each_gets_its_own_vectors(base, client, minilm):
    requests = _concurrent_requests(64)
    expected = minilm.encode([text for texts in requests for text in texts])
    batches_before, texts_before = _batch_counts(base)
    barrier = threading.Barrier(len(requests), timeout=60)
    results: dict[int, np.ndarray | BaseException] = {}

    def worker(index: int) -> None:
        try:
            barrier.wait()
            results[index] = _one_request(base, client, index, requests[index])
        except BaseException as error:  # reported below
            results[index] = error

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    offset = 0
    for index, texts in enumerate(requests):
        result = results.get(index)
        assert isinstance(result, np.ndarray), f"request {index}: {result!r}"
        assert result.shape == (len(texts), 384)
        assert _max_diff(result, expected[offset : offset + len(texts)]) <= ATOL, f"request {index}"
        offset += len(texts)
    batches_after, texts_after = _batch_counts(base)
    assert texts_after - texts_before == offset
    assert batches_after - batches_before < len(requests)


# ------------------------------------------------------------------------------------------------ TEI extras
def test_info_fields(base):
    status, _, info = get(base, "/info")
    assert status == 200
    assert info["dense_dim"] == 384
    assert info["max_client_batch_size"] == 2048
    assert info["outputs"] == ["dense"]


def test_tokenize_matches_the_tokenizer_and_decode_round_trips(base, hf_tokenizer):
    texts = TEXTS[:2]
    status, _, tokens = post(base, "/tokenize", {"inputs": texts})
    assert status == 200, tokens
    for text, listed in zip(texts, tokens, strict=True):
        ids = hf_tokenizer(text)["input_ids"]
        assert [token["id"] for token in listed] == ids
        assert [token["special"] for token in listed] == [i in hf_tokenizer.all_special_ids for i in ids]
        for token, piece in zip(listed, hf_tokenizer.convert_ids_to_tokens(ids), strict=True):
            if token["special"]:  # TEI: a special token's text is the token
                assert token["text"] == piece
            else:  # TEI: the slice of the input at the token's offsets
                assert token["text"] == text[token["start"] : token["stop"]]
                assert token["text"].lower() == piece.removeprefix("##")
    status, _, bare = post(base, "/tokenize", {"inputs": texts[0], "add_special_tokens": False})
    assert [token["id"] for token in bare[0]] == hf_tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    ids = [hf_tokenizer(text)["input_ids"] for text in texts]
    status, _, decoded = post(base, "/decode", {"ids": ids})
    assert status == 200, decoded
    assert decoded == [hf_tokenizer.decode(sequence, skip_special_tokens=True) for sequence in ids]
    assert decoded[0].replace(" ", "") == texts[0].lower().replace(" ", "")
    status, _, one = post(base, "/decode", {"ids": ids[1], "skip_special_tokens": False})
    assert one == [hf_tokenizer.decode(ids[1], skip_special_tokens=False)]
