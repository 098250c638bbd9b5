"""The head registry: each output is computed by a registered head; a new head is a class plus a registry line."""

from __future__ import annotations

import numpy as np
import torch

from tembed import Embedder
from tembed.heads import HEADS

from realdata import sts_b_sentences


class MaxPoolingHead:
    """A head written here: max over the real tokens of the last hidden state, not normalized."""

    needs_logits = False

    def __init__(self, context):
        self.context = context

    def run(self, forward):
        masked = forward.hidden.masked_fill(forward.mask.unsqueeze(-1) == 0, float("-inf"))
        return masked.max(dim=1).values.float().cpu().numpy()


def test_a_registered_head_computes_its_output(minilm_path, monkeypatch):
    from transformers import AutoModel, AutoTokenizer

    monkeypatch.setitem(HEADS, ("dense", "encoder"), MaxPoolingHead)  # only for kind "encoder"
    texts = sts_b_sentences("test")[:6]
    with Embedder(minilm_path, device="cpu", backend="torch") as embedder:
        ours = embedder.encode(texts, outputs=("dense",)).dense
    # The oracle: plain transformers, one text at a time, max over its tokens.
    tokenizer, model = AutoTokenizer.from_pretrained(minilm_path), AutoModel.from_pretrained(minilm_path).eval()
    with torch.inference_mode():
        expected = [model(**tokenizer(t, return_tensors="pt")).last_hidden_state[0].max(dim=0).values for t in texts]
    assert np.abs(ours - torch.stack(expected).numpy()).max() <= 1e-5


def test_colbert_width_follows_truncate_dim(tiny_m3_path):
    with Embedder(tiny_m3_path, device="cpu", backend="torch", truncate_dim=16) as embedder:
        result = embedder.encode(["a short text", "another one, a little longer"], outputs=("dense", "colbert"))
        assert embedder.settings_.colbert_dim == 16 == result.colbert[0].shape[1]
        assert result.dense.shape == (2, 16)
