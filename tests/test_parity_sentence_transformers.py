"""all-MiniLM-L6-v2 against sentence-transformers on real STS-B text (the published STS-B figure is checked by
``tembed eval sts --builtin stsb`` in test_eval.py)."""

from __future__ import annotations

import numpy as np
import pytest

from realdata import sts_b_sentences


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


@pytest.fixture(scope="module")
def minilm_without_normalize(minilm_path, tmp_path_factory):
    """A copy of all-MiniLM-L6-v2 whose modules.json has no Normalize module (as dot-product checkpoints ship),
    in a folder whose name matches no registry entry, so only the folder's files decide."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("st-files") / "minilm-dot-product"
    shutil.copytree(minilm_path, folder)
    modules_path = folder / "modules.json"
    modules = json.loads(modules_path.read_text())
    assert any(m["type"].endswith(".Normalize") for m in modules)
    modules = [m for m in modules if not m["type"].endswith(".Normalize")]
    modules_path.write_text(json.dumps(modules))
    return str(folder)


def test_a_folder_without_normalize_gives_raw_vectors_like_sentence_transformers(minilm_without_normalize):
    from sentence_transformers import SentenceTransformer

    from tembed import Embedder, EmbedderConfig, resolve_settings

    texts = sts_b_sentences("test")[:200]
    theirs = SentenceTransformer(minilm_without_normalize, device="cpu").encode(texts, convert_to_numpy=True)
    norms = np.linalg.norm(theirs, axis=1)
    assert norms.min() > 2.0  # sentence-transformers does not normalize this folder: raw mean-pooled vectors
    settings, _ = resolve_settings(EmbedderConfig(minilm_without_normalize))
    assert settings.normalize is False  # read from the files, before any weight is loaded
    with Embedder(minilm_without_normalize, device="cpu") as embedder:
        assert embedder.normalize is False
        ours = embedder.encode(texts)
        print(
            f"[parity] no Normalize module, 200 STS-B sentences: norms {norms.min():.2f}-{norms.max():.2f}, "
            f"max abs difference {np.abs(ours - theirs).max():.2e}"
        )
        assert np.abs(ours - theirs).max() <= 1e-4  # raw vectors of norm ~3-8: 1e-5 relative
        assert np.allclose(np.linalg.norm(ours, axis=1), norms, rtol=1e-5)
    with Embedder(minilm_without_normalize, device="cpu", normalize=True) as forced:
        assert np.abs(forced.encode(texts) - theirs / norms[:, None]).max() <= 1e-5
