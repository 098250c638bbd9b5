"""all-MiniLM-L6-v2 against sentence-transformers on real STS-B text, and the published STS-B figure."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from realdata import sts_b, sts_b_sentences

PUBLISHED_STSB_SPEARMAN = 82.03  # MTEB STSBenchmark test, all-MiniLM-L6-v2 (cosine Spearman x 100)


@pytest.fixture(scope="module")
def st_model(minilm_path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path, device="cpu")


def test_every_text_matches_sentence_transformers(minilm, st_model):
    texts = sts_b_sentences("test")[:600] + sts_b_sentences("dev")[:200]
    ours = minilm.encode(texts)
    theirs = st_model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    assert ours.shape == theirs.shape == (800, 384)
    cosines = np.sum(ours * theirs, axis=1) / np.linalg.norm(theirs, axis=1)
    print(
        f"[parity] sentence-transformers, 800 STS-B sentences: min cosine {cosines.min():.8f}, "
        f"max abs difference {np.abs(ours - theirs).max():.2e}"
    )
    assert cosines.min() >= 0.99999, f"min cosine {cosines.min():.7f}"
    assert np.abs(ours - theirs).max() <= 1e-5


def test_long_texts_truncate_like_sentence_transformers(minilm, st_model):
    from realdata import insuranceqa_answers

    texts = [a for a in insuranceqa_answers()[:400] if len(a.split()) > 200][:40]
    assert len(texts) >= 20
    ours = minilm.encode(texts)  # both truncate at the model's sentence_bert_config max_seq_length, 256
    theirs = st_model.encode(texts, normalize_embeddings=True)
    assert np.sum(ours * theirs, axis=1).min() >= 0.99999


def test_sts_b_spearman_is_the_published_figure(minilm):
    pairs = sts_b("test")
    first = minilm.encode([a for a, _, _ in pairs])
    second = minilm.encode([b for _, b, _ in pairs])
    scores = np.sum(first * second, axis=1)
    spearman = 100 * spearmanr(scores, [gold for _, _, gold in pairs]).statistic
    print(f"[parity] STS-B test Spearman: {spearman:.4f}")
    assert round(spearman, 2) == PUBLISHED_STSB_SPEARMAN, spearman
