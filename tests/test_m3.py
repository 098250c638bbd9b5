"""BGE-M3 outputs (dense, sparse, ColBERT) and scores on a tiny random M3 with the real XLM-R tokenizer,
against a plain PyTorch implementation of the formulas written here; SPLADE on the real SPLADE-tiny."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

from tembed import Embedder
from tembed.heads import MissingHeadError
from tembed.outputs import EncodeOutputs, sparse_to_arrays, sparse_to_csr, sparse_top_k
from tembed.scoring import colbert_score, colbert_scores, lexical_scores

from realdata import insuranceqa_answers, sts_b_sentences

M3_README_1 = ["What is BGE M3?", "Defination of BM25"]
M3_README_2 = [
    "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
    "BM25 is a bag-of-words retrieval function that ranks a set of documents based on the query terms appearing "
    "in each document",
]


class PlainM3:
    """BGE-M3 by the paper's formulas, one text at a time (no padding): the independent reference."""

    def __init__(self, path: str) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.sparse = torch.nn.Linear(self.model.config.hidden_size, 1)
        self.sparse.load_state_dict(torch.load(os.path.join(path, "sparse_linear.pt"), weights_only=True))
        colbert_state = torch.load(os.path.join(path, "colbert_linear.pt"), weights_only=True)
        self.colbert = torch.nn.Linear(*reversed(colbert_state["weight"].shape))
        self.colbert.load_state_dict(colbert_state)
        self.unused = {0, 1, 2, 3}  # <s>, <pad>, </s>, <unk>

    @torch.no_grad()
    def __call__(self, text: str, max_length: int = 8192):
        ids = self.tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
        hidden = self.model(**ids).last_hidden_state[0]
        dense = F.normalize(hidden[0], dim=-1).numpy()
        weights = torch.relu(self.sparse(hidden)).squeeze(-1).tolist()
        lexical: dict[int, float] = {}
        for token, weight in zip(ids["input_ids"][0].tolist(), weights, strict=True):
            if token not in self.unused and weight > 0:
                lexical[token] = max(lexical.get(token, 0.0), weight)
        colbert = F.normalize(self.colbert(hidden[1:]), dim=-1).numpy()
        return dense, lexical, colbert


@pytest.fixture(scope="module")
def m3(tiny_m3_path):
    with Embedder(tiny_m3_path, device="cpu") as embedder:
        yield embedder


@pytest.fixture(scope="module")
def plain(tiny_m3_path):
    return PlainM3(tiny_m3_path)


def _assert_sparse_equal(ours: dict, expected: dict, atol: float = 1e-5) -> None:
    assert set(ours) == set(expected)
    for token, weight in expected.items():
        assert abs(ours[token] - weight) <= atol
        assert isinstance(ours[token], float) and isinstance(token, int)


def test_tokenizes_like_the_bge_m3_readme(m3):
    assert m3.tokenizer.encode(["What is BGE M3?"], 512) == [[0, 4865, 83, 335, 11679, 276, 363, 32, 2]]
    weights = m3.encode("What is BGE M3?", outputs="sparse")
    assert set(m3.convert_id_to_token(weights)) <= {"What", "is", "B", "GE", "M", "3", "?"}
    assert len(weights) >= 3  # the calibrated bias gives most real tokens a positive weight


def test_all_three_outputs_match_the_formulas(m3, plain):
    texts = M3_README_1 + M3_README_2 + sts_b_sentences("test")[:40] + insuranceqa_answers()[:10]
    result = m3.encode(texts, outputs=("dense", "sparse", "colbert"))
    assert isinstance(result, EncodeOutputs)
    assert result.dense.shape == (len(texts), 32) and result.dense.dtype == np.float32
    for index, text in enumerate(texts):
        dense, lexical, colbert = plain(text)
        assert np.abs(result.dense[index] - dense).max() <= 1e-5
        _assert_sparse_equal(result.sparse[index], lexical)
        assert result.colbert[index].shape == colbert.shape and result.colbert[index].dtype == np.float32
        assert np.abs(result.colbert[index] - colbert).max() <= 1e-5
    # "What is BGE M3?" has 9 tokens: 8 ColBERT vectors (CLS dropped, EOS kept), as in the M3 README
    assert result.colbert[0].shape == (8, 32)
    np.testing.assert_allclose(np.linalg.norm(result.colbert[0], axis=1), 1.0, atol=1e-6)


def test_reference_keys_and_single_string(m3):
    one = m3.encode("What is BGE M3?", outputs=("dense", "sparse", "colbert"))
    assert one["dense_vecs"].shape == (32,)
    assert isinstance(one["lexical_weights"], dict)
    assert one["colbert_vecs"].shape == (8, 32)
    assert list(one.keys()) == ["dense_vecs", "lexical_weights", "colbert_vecs"]
    only_sparse = m3.encode(["a", "b"], outputs=("sparse",))
    assert only_sparse.dense is None and only_sparse.colbert is None and len(only_sparse.sparse) == 2


def test_one_forward_pass_for_all_outputs(m3, monkeypatch):
    calls = []
    forward = m3.backend.forward

    def counting(batch, **kwargs):
        calls.append(len(batch))
        return forward(batch, **kwargs)

    monkeypatch.setattr(m3.backend, "forward", counting)
    m3.encode(M3_README_1 + M3_README_2, outputs=("dense", "sparse", "colbert"))
    assert calls == [4]


def test_empty_string(m3):
    result = m3.encode(["", "hello world"], outputs=("dense", "sparse", "colbert"))
    assert result.sparse[0] == {}
    assert result.colbert[0].shape == (1, 32)  # </s> only
    assert result.colbert[1].shape == (4, 32)  # ▁hell o ▁world </s>


def test_texts_beyond_max_length_are_truncated(m3, plain):
    long_text = " ".join(insuranceqa_answers()[:40])
    result = m3.encode([long_text, "short"], max_length=64, outputs=("dense", "sparse", "colbert"))
    assert result.colbert[0].shape == (63, 32)
    dense, lexical, colbert = plain(long_text, max_length=64)
    assert np.abs(result.dense[0] - dense).max() <= 1e-5
    _assert_sparse_equal(result.sparse[0], lexical)
    assert np.abs(result.colbert[0] - colbert).max() <= 1e-5


def test_the_8192_token_window_with_bounded_batches(tiny_m3_path, plain, tmp_path):
    text = " ".join(insuranceqa_answers()[:120])  # far beyond 8,192 tokens
    short = sts_b_sentences("test")[:20]
    # Named like the real checkpoint, the folder gets the registry's BGE-M3 entry: the published 8,192-token
    # window is then the default length, with no max_length passed.
    named = shutil.copytree(tiny_m3_path, tmp_path / "bge-m3")
    with Embedder(named, device="cpu", max_batch_tokens=8192) as embedder:
        assert embedder.spec.name == "bge-m3"
        assert (embedder.query_max_length, embedder.passage_max_length) == (512, 8192)  # FlagEmbedding BGEM3 defaults
        seen = []
        forward = embedder.backend.forward

        def spy(batch, **kwargs):
            seen.append(batch.input_ids.shape)
            return forward(batch, **kwargs)

        embedder.backend.forward = spy
        result = embedder.encode([*short, text], outputs=("dense", "colbert"))
    assert result.colbert[-1].shape == (8191, 32)
    assert all(rows * cols <= 8192 for rows, cols in seen)
    dense, _, colbert = plain(text, max_length=8192)
    assert np.abs(result.dense[-1] - dense).max() <= 1e-5
    assert np.abs(result.colbert[-1] - colbert).max() <= 1e-5


def test_mixed_lengths_keep_order(m3):
    texts = sts_b_sentences("dev")[:20] + insuranceqa_answers()[:20]
    texts = [texts[i] for i in np.random.default_rng(1).permutation(len(texts))]
    together = m3.encode(texts, outputs=("dense", "sparse", "colbert"))
    for index in (0, 7, 19, 33):
        alone = m3.encode(texts[index], outputs=("dense", "sparse", "colbert"))
        assert np.abs(together.dense[index] - alone.dense).max() <= 1e-5
        _assert_sparse_equal(together.sparse[index], alone.sparse)
        assert np.abs(together.colbert[index] - alone.colbert).max() <= 1e-5


def test_scores_match_the_formulas(m3, plain):
    queries = m3.encode(M3_README_1, outputs=("dense", "sparse", "colbert"))
    passages = m3.encode(M3_README_2, outputs=("dense", "sparse", "colbert"))
    expected_lexical = np.zeros((2, 2))
    expected_colbert = np.zeros((2, 2))
    for i, query in enumerate(M3_README_1):
        _, q_lex, q_col = plain(query)
        for j, passage in enumerate(M3_README_2):
            _, p_lex, p_col = plain(passage)
            expected_lexical[i, j] = sum(w * p_lex[t] for t, w in q_lex.items() if t in p_lex)
            expected_colbert[i, j] = (torch.from_numpy(q_col) @ torch.from_numpy(p_col).T).max(dim=1).values.mean()
    np.testing.assert_allclose(lexical_scores(queries.sparse, passages.sparse), expected_lexical, atol=1e-5)
    assert lexical_scores(queries.sparse[0], queries.sparse[1]) == pytest.approx(
        sum(w * queries.sparse[1].get(t, 0.0) for t, w in queries.sparse[0].items())
    )
    np.testing.assert_allclose(colbert_scores(queries.colbert, passages.colbert), expected_colbert, atol=1e-5)
    with pytest.raises(ValueError):
        lexical_scores(queries.sparse[0], queries.sparse)

    pairs = [(q, p) for q in M3_README_1 for p in M3_README_2]
    scores = m3.compute_score(pairs, weights=(0.4, 0.2, 0.4), max_passage_length=128)
    dense = (queries.dense @ passages.dense.T).reshape(-1)
    sparse, colbert = expected_lexical.reshape(-1), expected_colbert.reshape(-1)
    np.testing.assert_allclose(scores["dense"], dense, atol=1e-5)
    np.testing.assert_allclose(scores["sparse"], sparse, atol=1e-5)
    np.testing.assert_allclose(scores["colbert"], colbert, atol=1e-5)
    np.testing.assert_allclose(scores["sparse+dense"], (0.2 * sparse + 0.4 * dense) / 0.6, atol=1e-5)
    np.testing.assert_allclose(
        scores["colbert+sparse+dense"], (0.4 * colbert + 0.2 * sparse + 0.4 * dense) / 1.0, atol=1e-5
    )
    single = m3.compute_score((M3_README_1[0], M3_README_2[0]))
    assert isinstance(single["dense"], float) and single["dense"] == pytest.approx(dense[0], abs=1e-5)
    with pytest.raises(TypeError, match=r"pairs\[1\]"):
        m3.compute_score([("a", "b"), ("only one",)])


def test_sparse_helpers(m3):
    weights = m3.encode(sts_b_sentences("test")[:5], outputs="sparse")
    indices, values = sparse_to_arrays(weights[0])
    assert indices.dtype == np.int64 and values.dtype == np.float32
    assert list(indices) == sorted(weights[0]) and np.allclose(values, [weights[0][i] for i in indices])
    matrix = sparse_to_csr(weights, m3.vocab_size)
    assert matrix.shape == (5, 250002)
    assert matrix[0, indices[0]] == pytest.approx(values[0])
    np.testing.assert_allclose((matrix @ matrix.T).toarray(), lexical_scores(weights, weights), rtol=1e-5)
    top = sparse_top_k(weights[0], 2)
    assert len(top) == min(2, len(weights[0])) and min(top.values()) >= max(
        [w for t, w in weights[0].items() if t not in top], default=0
    )


def test_missing_heads_are_an_error_unless_dense_only(tmp_path, tiny_m3_path):
    folder = tmp_path / "m3-without-colbert"
    shutil.copytree(tiny_m3_path, folder)
    os.remove(folder / "colbert_linear.pt")
    with pytest.raises(MissingHeadError, match="colbert_linear.pt is missing"):
        Embedder(str(folder), device="cpu", outputs=("dense", "sparse", "colbert"))
    with Embedder(str(folder), device="cpu", outputs=("dense",)) as dense_only:
        assert dense_only.outputs == ("dense",)
        with pytest.raises(ValueError, match="not available"):
            dense_only.encode("x", outputs="sparse")


def test_dense_only_models_refuse_sparse(minilm):
    with pytest.raises(ValueError, match="not available"):
        minilm.encode("x", outputs=("dense", "colbert"))


# ------------------------------------------------------------------------------------------------ SPLADE
def test_splade_against_plain_transformers(splade_path):
    texts = [*sts_b_sentences("test")[:60], "hello world", ""]
    tokenizer = AutoTokenizer.from_pretrained(splade_path)
    model = AutoModelForMaskedLM.from_pretrained(splade_path).eval()
    with Embedder(splade_path, device="cpu") as embedder:
        assert embedder.outputs == ("dense", "sparse")
        ours = embedder.encode(texts, outputs="sparse", batch_size=16)
        hello = embedder.convert_id_to_token(embedder.encode("hello world", outputs="sparse"))
    with torch.no_grad():
        for text, vector in zip(texts, ours, strict=True):
            inputs = tokenizer(text, return_tensors="pt")
            weights = torch.log1p(torch.relu(model(**inputs).logits[0])).max(dim=0).values
            expected = {int(i): float(weights[i]) for i in torch.nonzero(weights > 0).squeeze(-1)}
            _assert_sparse_equal(vector, expected)
    # The recorded top terms of this real trained model (shared/reference/offline-models-and-data.md).
    top = sorted(hello.items(), key=lambda item: -item[1])[:3]
    assert [t for t, _ in top] == ["hello", "world", "goodbye"]
    assert top[0][1] == pytest.approx(2.80, abs=0.01) and top[1][1] == pytest.approx(2.19, abs=0.01)


def test_splade_scores(splade_path):
    with Embedder(splade_path, device="cpu") as embedder:
        queries = embedder.encode(["how to reset a router", "flood insurance"], outputs="sparse")
        docs = embedder.encode(
            ["Hold the reset button on the router for ten seconds.", "Flood damage needs separate insurance."],
            outputs="sparse",
        )
    scores = lexical_scores(queries, docs)
    assert scores[0, 0] > scores[0, 1] and scores[1, 1] > scores[1, 0]
    assert colbert_score(np.eye(2, dtype=np.float32), np.eye(2, dtype=np.float32)) == pytest.approx(1.0)
