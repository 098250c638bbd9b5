"""Settings resolved once: the config, the per-call options, the effective settings read from files alone."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest

from tembed import EmbedderConfig, EncodeOptions, Role, resolve_settings
from tembed.models.registry import BGE_EN_QUERY_INSTRUCTION


def _python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_import_and_settings_do_not_import_torch(minilm_path):
    out = _python(
        "import sys, tembed\n"
        "print('torch' in sys.modules)\n"
        f"settings, _ = tembed.resolve_settings(tembed.EmbedderConfig({minilm_path!r}))\n"
        "print(settings.dim, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    assert out.split() == ["False", "384", "False", "False"]


def test_settings_come_from_the_sentence_transformers_files(minilm_path):
    # all-MiniLM-L6-v2's own files: 1_Pooling/config.json (mean), modules.json (Normalize),
    # sentence_bert_config.json (max_seq_length 256), config.json (hidden 384, 512 positions), vocab 30,522.
    settings, resolved = resolve_settings(EmbedderConfig(minilm_path))
    assert (settings.pooling, settings.normalize, settings.dim, settings.hidden_size) == ("mean", True, 384, 384)
    assert (settings.query_max_length, settings.passage_max_length, settings.max_seq_length) == (256, 256, 512)
    assert settings.vocab_size == 30522 and settings.model_type == "bert"
    assert settings.outputs == ("dense",) and settings.path == resolved.path
    assert settings.as_dict()["outputs"] == ["dense"]


def test_the_config_wins_over_the_files(minilm_path):
    config = EmbedderConfig(minilm_path, pooling="cls", normalize=False, truncate_dim=128, passage_max_length=100)
    settings, _ = resolve_settings(config)
    assert (settings.pooling, settings.normalize, settings.dim, settings.passage_max_length) == ("cls", False, 128, 100)
    with pytest.warns(UserWarning, match="exceeds the model's limit of 512"):
        assert resolve_settings(config.replace(query_max_length=4096))[0].query_max_length == 512


def test_config_is_checked_and_picklable(minilm_path):
    config = EmbedderConfig(minilm_path, outputs=["dense"], batch_size=8)
    assert config.outputs == ("dense",)
    assert pickle.loads(pickle.dumps(config)) == config
    for bad, match in (
        (dict(pooling="max"), "pooling must be one of"),
        (dict(precision="int4"), "precision must be one of"),
        (dict(backend="tensorrt"), "backend must be one of"),
        (dict(batch_size=0), "batch_size must be a positive int"),
        (dict(outputs=("dense", "bogus")), "outputs must be one of"),
        (dict(query_instruction_format="{}"), "exactly two positional slots"),
    ):
        with pytest.raises(ValueError, match=match):
            EmbedderConfig(minilm_path, **bad)
    with pytest.raises(ValueError, match="can produce dense"):
        resolve_settings(EmbedderConfig(minilm_path, outputs=("sparse",)))
    with pytest.raises(ValueError, match="exceeds the model's dimension 384"):
        resolve_settings(EmbedderConfig(minilm_path, truncate_dim=1000))


def test_roles_pick_instruction_format_and_length(tmp_path, minilm_path):
    import shutil

    # A folder named like BGE small English v1.5 gets that registry entry: its published query instruction.
    named = shutil.copytree(minilm_path, tmp_path / "bge-small-en-v1.5")
    with pytest.warns(UserWarning):  # the registry pools with cls, the folder's files say mean
        settings, _ = resolve_settings(EmbedderConfig(str(named), query_max_length=32))
    assert settings.instruction_for(EncodeOptions(role=Role.QUERY)) == (BGE_EN_QUERY_INSTRUCTION, "{}{}")
    assert settings.instruction_for(EncodeOptions(role="passage")) == (None, "{}{}")
    assert settings.instruction_for(EncodeOptions()) == (None, "{}{}")
    assert settings.instruction_for(EncodeOptions(role="query", instruction="")) == (None, "{}{}")
    explicit = EncodeOptions(instruction="Q: ", instruction_format="{}\\n{}")
    assert settings.instruction_for(explicit) == ("Q: ", "{}\\n{}")
    assert settings.max_length_for(EncodeOptions(role="query")) == 32
    assert settings.max_length_for(EncodeOptions(role="plain")) == settings.passage_max_length
    assert settings.max_length_for(EncodeOptions(role="query", max_length=7)) == 7


def test_encode_options_are_checked():
    assert EncodeOptions(role="query").role is Role.QUERY
    assert EncodeOptions(outputs="sparse").outputs == ("sparse",)
    with pytest.raises(ValueError):
        EncodeOptions(role="document")
    with pytest.raises(ValueError, match="at least one"):
        EncodeOptions(outputs=())
    with pytest.raises(ValueError, match="positive int"):
        EncodeOptions(max_length=0)


def test_the_embedder_reads_the_effective_settings(minilm):
    settings = minilm.settings_
    assert minilm.embedding_dim == settings.dim == 384
    assert minilm.settings()["effective_precision"] == settings.effective_precision == "fp32"
    assert minilm.tokenizer is minilm.encoder.tokenizer
    assert minilm.vocab_size == len(minilm.tokenizer.hf) == 30522


def test_no_progress_bar_when_stderr_is_not_a_terminal(monkeypatch):
    import io

    from tembed.progress import show_progress

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not show_progress(None, 5000)
    assert show_progress(True, 3)

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert show_progress(None, 5000) and not show_progress(None, 10)


def test_a_pooled_embedder_has_the_attributes_of_a_single_one(minilm, minilm_path):
    from tembed import Embedder

    names = [
        "embedding_dim",
        "pooling",
        "normalize",
        "truncate_dim",
        "outputs",
        "query_instruction",
        "query_instruction_format",
        "passage_instruction",
        "passage_instruction_format",
        "query_max_length",
        "passage_max_length",
        "max_seq_length",
        "batch_size",
        "max_batch_tokens",
        "precision",
        "effective_precision",
        "backend_name",
        "vocab_size",
    ]
    with Embedder(minilm_path, device=["cpu", "cpu"]) as pooled:
        for name in names:
            assert getattr(pooled, name) == getattr(minilm, name), name
        single, several = minilm.settings(), pooled.settings()
        assert several.pop("device") == "cpu,cpu" and single.pop("device") == "cpu"
        assert several == single
        assert pooled.tokenizer.hf.get_vocab() == minilm.tokenizer.hf.get_vocab()
        assert pooled.spec == minilm.spec and pooled.resolved.path == minilm.resolved.path
        assert pooled.convert_id_to_token({2003: 0.5}) == minilm.convert_id_to_token({2003: 0.5})
        assert "cpu,cpu" in repr(pooled) and pooled.pool is not None and minilm.pool is None
        with pytest.raises(AttributeError, match="lives in each worker"):
            pooled.backend  # noqa: B018
        with pytest.warns(UserWarning, match="exceeds the model's limit of 512"):  # raised here, not in a worker
            pooled.encode(["a text"], max_length=5000)


def test_the_token_limit_of_a_config_without_positions_is_the_loaded_configs(minilm_path, tmp_path):
    import json
    import shutil

    from tembed import Embedder

    # No max_position_embeddings, no tokenizer limit, no sentence-transformers length: transformers' BertConfig
    # still has 512 positions, and the model cannot take more.
    folder = shutil.copytree(minilm_path, tmp_path / "minilm-bare")
    for name, key in (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length")):
        data = json.loads((folder / name).read_text())
        data.pop(key, None)
        (folder / name).write_text(json.dumps(data))
    (folder / "sentence_bert_config.json").unlink()
    with pytest.warns(UserWarning, match="exceeds the model's limit of 512"):
        embedder = Embedder(folder, device="cpu", backend="torch", passage_max_length=1000)
    with embedder:
        assert embedder.max_seq_length == 512 and embedder.passage_max_length == 512
        assert embedder.encode("word " * 700).shape == (384,)
