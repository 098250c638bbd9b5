"""The server's M3 and sparse routes (``/encode``, ``/embed_sparse``, ``/score``, ``/rerank``) over plain HTTP, on
a tiny random BGE-M3 with the real XLM-R tokenizer and on the real SPLADE-tiny, compared with the library
(``tembed.Embedder``): never with numbers the server itself produced."""

from __future__ import annotations

import base64
import itertools

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from server_harness import post, serve_in_thread
from tembed import Embedder
from tembed.server import create_app

from realdata import sts_b_sentences

ATOL = 1e-6
ALL = ["dense", "sparse", "colbert"]
MODES = ("dense", "sparse", "colbert", "sparse+dense", "colbert+sparse+dense")
SENTENCES = sts_b_sentences("test")
TEXTS = [
    "What is BGE M3?",
    "BM25 is a bag-of-words retrieval function that ranks a set of documents based on the query terms appearing "
    "in each document",
    *SENTENCES[:4],
    "the the the cat sat on the mat, the end",  # repeated tokens: the sparse weight is their maximum
]


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _b64(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), "<f4")


def _assert_sparse(indices: list[int], values: list[float], expected: dict[int, float]) -> None:
    assert all(a < b for a, b in itertools.pairwise(indices)), "indices must be ascending and unique"
    assert indices == sorted(expected)
    assert len(values) == len(indices)
    if indices:
        assert _max_diff(values, [expected[i] for i in indices]) <= ATOL


@pytest.fixture(scope="module")
def m3(tiny_m3_path):
    with Embedder(tiny_m3_path, device="cpu") as embedder:
        yield embedder


@pytest.fixture(scope="module")
def base(m3):
    with serve_in_thread(create_app(m3.encoder)) as url:
        yield url


@pytest.fixture(scope="module")
def expected(m3):
    return m3.encode(TEXTS, outputs=ALL)


def _ok(base: str, path: str, body: dict):
    status, _, answer = post(base, path, body)
    assert status == 200, answer
    return answer


# ------------------------------------------------------------------------------------------------ /encode
def test_encode_all_outputs_equal_the_library(base, expected):
    body = _ok(base, "/encode", {"inputs": TEXTS, "outputs": ALL})
    assert [item["index"] for item in body["data"]] == list(range(len(TEXTS)))
    assert body["usage"]["prompt_tokens"] == int(expected.token_counts.sum())
    dense = np.asarray([item["dense"] for item in body["data"]], np.float32)
    assert dense.shape == expected.dense.shape
    assert _max_diff(dense, expected.dense) <= ATOL
    for item, sparse, colbert in zip(body["data"], expected.sparse, expected.colbert, strict=True):
        _assert_sparse(item["sparse"]["indices"], item["sparse"]["values"], sparse)
        rows = np.asarray(item["colbert"], np.float32)
        assert rows.shape == colbert.shape
        assert _max_diff(rows, colbert) <= ATOL


def test_encode_base64_decodes_to_the_library_arrays(base, expected):
    body = _ok(base, "/encode", {"inputs": TEXTS, "outputs": ALL, "encoding_format": "base64"})
    for index, item in enumerate(body["data"]):
        assert _max_diff(_b64(item["dense"]), expected.dense[index]) <= ATOL
        shape = item["colbert"]["shape"]
        assert shape == list(expected.colbert[index].shape)
        rows = _b64(item["colbert"]["data"]).reshape(shape)
        assert _max_diff(rows, expected.colbert[index]) <= ATOL
        _assert_sparse(item["sparse"]["indices"], item["sparse"]["values"], expected.sparse[index])


def test_encode_one_output_dimensions_and_tokens(base, xlmr_tokenizer_json, expected):
    body = _ok(base, "/encode", {"inputs": TEXTS, "outputs": ["sparse"], "return_tokens": True})
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=xlmr_tokenizer_json)  # the model's tokenizer.json
    for item, sparse in zip(body["data"], expected.sparse, strict=True):
        assert set(item) == {"index", "sparse"}
        _assert_sparse(item["sparse"]["indices"], item["sparse"]["values"], sparse)
        assert item["sparse"]["tokens"] == tokenizer.convert_ids_to_tokens(item["sparse"]["indices"])
    body = _ok(base, "/encode", {"inputs": TEXTS[:3], "dimensions": 16})
    head = expected.dense[:3, :16]
    dense = np.asarray([item["dense"] for item in body["data"]], np.float32)
    assert _max_diff(dense, head / np.linalg.norm(head, axis=1, keepdims=True)) <= ATOL


def test_embed_sparse_equals_the_library(base, m3):
    body = _ok(base, "/embed_sparse", {"inputs": TEXTS})
    for pairs, sparse in zip(body, m3.encode(TEXTS, outputs="sparse"), strict=True):
        assert all(set(pair) == {"index", "value"} for pair in pairs)
        _assert_sparse([pair["index"] for pair in pairs], [pair["value"] for pair in pairs], sparse)


# ------------------------------------------------------------------------------------------------ /score, /rerank
def _assert_scores(data: list[dict], reference: dict[str, list[float]]) -> None:
    assert [item["index"] for item in data] == list(range(len(reference["dense"])))
    for mode in MODES:
        assert _max_diff([item[mode] for item in data], reference[mode]) <= ATOL, mode


@pytest.mark.parametrize("weights", [None, (0.5, 0.2, 0.3)])
def test_score_pairs_and_query_texts_equal_compute_score(base, m3, weights):
    pairs = [(TEXTS[0], TEXTS[1]), (SENTENCES[0], SENTENCES[1379]), (SENTENCES[5], SENTENCES[1384])]
    extra = {} if weights is None else {"weights": list(weights)}
    library = {} if weights is None else {"weights": weights}
    body = _ok(base, "/score", {"pairs": [list(pair) for pair in pairs], **extra})
    _assert_scores(body["data"], m3.compute_score(pairs, **library))
    query, texts = TEXTS[0], TEXTS[1:5]
    body = _ok(base, "/score", {"query": query, "texts": texts, **extra})
    _assert_scores(body["data"], m3.compute_score([(query, text) for text in texts], **library))


@pytest.mark.parametrize("weights", [None, (0.2, 0.3, 0.5)])
def test_rerank_orders_by_the_library_hybrid_score(base, m3, weights):
    query, texts = SENTENCES[10], SENTENCES[1389:1395]
    extra = {} if weights is None else {"weights": list(weights)}
    library = {} if weights is None else {"weights": weights}
    reference = np.asarray(m3.compute_score([(query, text) for text in texts], **library)["colbert+sparse+dense"])
    status, _, body = post(base, "/rerank", {"query": query, "texts": texts, "return_text": True, **extra})
    assert status == 200, body
    assert [item["index"] for item in body] == np.argsort(-reference, kind="stable").tolist()
    assert _max_diff([item["score"] for item in body], reference[[item["index"] for item in body]]) <= ATOL
    assert [item["text"] for item in body] == [texts[item["index"]] for item in body]


# ------------------------------------------------------------------------------------------------ other models
def test_an_output_the_model_lacks_is_refused(minilm):
    with serve_in_thread(create_app(minilm.encoder)) as url:
        status, _, body = post(url, "/encode", {"inputs": ["a cat"], "outputs": ["colbert"]})
        assert status == 422, body
        assert body["param"] == "outputs" and "colbert" in body["error"]
        status, _, body = post(url, "/embed_sparse", {"inputs": ["a cat"]})
        assert status == 422, body
        assert "sparse" in body["error"]


def test_splade_sparse_equals_the_library(splade_path):
    texts = SENTENCES[:20]
    with Embedder(splade_path, device="cpu") as splade, serve_in_thread(create_app(splade.encoder)) as url:
        expected = splade.encode(texts, outputs=["dense", "sparse"])
        body = _ok(url, "/embed_sparse", {"inputs": texts})
        for pairs, sparse in zip(body, expected.sparse, strict=True):
            _assert_sparse([pair["index"] for pair in pairs], [pair["value"] for pair in pairs], sparse)
        body = _ok(url, "/encode", {"inputs": texts, "outputs": ["dense", "sparse"]})
        assert _max_diff([item["dense"] for item in body["data"]], expected.dense) <= ATOL
        for item, sparse in zip(body["data"], expected.sparse, strict=True):
            _assert_sparse(item["sparse"]["indices"], item["sparse"]["values"], sparse)
