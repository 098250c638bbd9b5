"""Pooling against plain-transformers computations written here, on real checkpoints and tiny decoders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from tembed import Embedder

from realdata import sts_b_sentences


def _plain_transformers(path: str, texts: list[str], pooling: str, max_length: int = 512) -> np.ndarray:
    """One text at a time (no padding at all), pooled by hand: an independent reference."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    vectors = []
    with torch.no_grad():
        for text in texts:
            inputs = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
            hidden = model(**inputs).last_hidden_state[0]
            vector = {"cls": hidden[0], "mean": hidden.mean(dim=0), "last_token": hidden[-1]}[pooling]
            vectors.append(F.normalize(vector, dim=-1).numpy())
    return np.stack(vectors)


def test_cls_pooling_on_splade_tiny_bert(splade_path):
    texts = sts_b_sentences("test")[:300]
    with Embedder(splade_path, device="cpu", pooling="cls") as embedder:
        ours = embedder.encode(texts, batch_size=32)
        assert embedder.embedding_dim == 128
    reference = _plain_transformers(splade_path, texts, "cls")
    assert np.abs(ours - reference).max() <= 1e-5


def test_cls_vector_of_hello_world_matches_the_recorded_value(splade_path):
    # Recorded with transformers 5.24 AutoModel + CLS + L2 norm (shared/reference/offline-models-and-data.md).
    with Embedder(splade_path, device="cpu", pooling="cls") as embedder:
        vector = embedder.encode("hello world")
    np.testing.assert_allclose(vector[:5], [0.002793, -0.098, -0.274502, -0.046639, -0.07858], atol=2e-6)


def test_mean_pooling_on_splade_tiny_bert(splade_path):
    texts = sts_b_sentences("dev")[:100]
    with Embedder(splade_path, device="cpu", pooling="mean") as embedder:
        ours = embedder.encode(texts, batch_size=16)
    assert np.abs(ours - _plain_transformers(splade_path, texts, "mean")).max() <= 1e-5


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_token_pooling_with_left_and_right_padding(tiny_decoder_paths, side):
    path = tiny_decoder_paths[side]
    texts = [*sts_b_sentences("test")[:64], "a", "short one", "x " * 40]
    with Embedder(path, device="cpu") as embedder:
        assert embedder.pooling == "last_token"  # decided from the architecture: a decoder
        assert embedder.tokenizer.padding_side == side
        ours = embedder.encode(texts, batch_size=16)
    reference = _plain_transformers(path, texts, "last_token")
    assert np.abs(ours - reference).max() <= 1e-5
    # Different texts give different vectors: the model is not degenerate.
    assert np.sum(ours[0] * ours[1]) < 0.99
