"""Loading is safe and loud: no checkpoint code without opt-in, no encoding with a missing tokenizer, corrupt files
named, bad instruction templates and unencodable text refused with the item named."""

from __future__ import annotations

import contextlib
import json
import os
import shutil

import numpy as np
import pytest

from tembed import Embedder, resolve_model
from tembed.compat.flagembedding import FlagAutoModel
from tembed.models import resolve as resolve_module
from tembed.models.files import ModelFilesError
from tembed.models.registry import REGISTRY, registry_vouches_for_code

REMOTE_ENTRY = REGISTRY["gte-base-en-v1.5"]  # a registry entry that needs the checkpoint's own code


def _copy_model(source: str, target: str, *, skip: tuple[str, ...] = ()) -> str:
    """A real copy (not links) of a model folder, so files can be changed."""
    os.makedirs(target)
    for name in os.listdir(source):
        if name in skip:
            continue
        path = os.path.join(source, name)
        (shutil.copytree if os.path.isdir(path) else shutil.copy)(path, os.path.join(target, name))
    return target


def _remote_code_checkpoint(folder: str, minilm_path: str, marker: str) -> str:
    """MiniLM's tokenizer and weights with a config that, like gte's, loads its model through ``auto_map`` code
    that writes ``marker`` when it is imported."""
    _copy_model(minilm_path, folder)
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    config.update(
        model_type="new",
        auto_map={"AutoConfig": "configuration.NewConfig", "AutoModel": "modeling.NewModel"},
    )
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    code = f"open({marker!r}, 'a').write(__name__ + '\\n')\n"
    with open(os.path.join(folder, "configuration.py"), "w", encoding="utf-8") as handle:
        handle.write(
            code + "from transformers import BertConfig\n\nclass NewConfig(BertConfig):\n    model_type = 'new'\n"
        )
    with open(os.path.join(folder, "modeling.py"), "w", encoding="utf-8") as handle:
        handle.write(code + "from transformers import BertModel as NewModel\n")
    return folder


@pytest.mark.parametrize("layout", ["registry-named folder", "checkpoint under it"])
def test_a_folder_named_like_a_registry_entry_runs_no_code_without_opt_in(tmp_path, minilm_path, layout, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    marker = str(tmp_path / "code-ran.txt")
    folder = str(tmp_path / REMOTE_ENTRY.name)
    if layout == "checkpoint under it":
        os.makedirs(folder)
        folder = os.path.join(folder, "checkpoint-500")
    _remote_code_checkpoint(folder, minilm_path, marker)
    assert resolve_model(folder).in_registry  # found by basename: the registry's pooling etc. apply ...
    with pytest.raises(ModelFilesError, match="trust_remote_code=True") as info:
        Embedder(folder, device="cpu", backend="torch")  # ... but not its trust_remote_code
    assert "configuration.py" in str(info.value) and folder in str(info.value)
    with pytest.raises(ModelFilesError, match="trust_remote_code=True"):
        FlagAutoModel.from_finetuned(folder, devices="cpu")
    assert not os.path.exists(marker), "the checkpoint's code ran without trust_remote_code=True"

    # The check can fail: with the user's explicit opt-in the same folder runs its code.
    with contextlib.suppress(Exception):  # the stand-in code need not build a working model: importing it is the point
        Embedder(folder, device="cpu", backend="torch", trust_remote_code=True).close()
    assert os.path.exists(marker)


def test_registry_vouches_only_for_the_exact_hub_id(tmp_path, minilm_path, monkeypatch):
    assert registry_vouches_for_code(REMOTE_ENTRY.hub_id)
    assert registry_vouches_for_code(REMOTE_ENTRY.name)  # the bare registry name is fetched from that hub id
    assert not registry_vouches_for_code("any-org/" + REMOTE_ENTRY.name)
    assert not registry_vouches_for_code(f"{REMOTE_ENTRY.hub_id}/checkpoint-500")
    assert not registry_vouches_for_code("BAAI/bge-small-en-v1.5")  # an entry that needs no code

    # Another organisation's repository with the same basename, found in the Hugging Face cache.
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    marker = str(tmp_path / "code-ran.txt")
    snapshot = _remote_code_checkpoint(str(tmp_path / "hub" / "snapshot"), minilm_path, marker)
    monkeypatch.setattr(resolve_module, "_fetch", lambda hub_id, cache_dir=None: (snapshot, "hf-cache"))
    resolved = resolve_model("any-org/" + REMOTE_ENTRY.name)
    assert resolved.in_registry and not resolved.trust_remote_code
    with pytest.raises(ModelFilesError, match="trust_remote_code=True"):
        Embedder("any-org/" + REMOTE_ENTRY.name, device="cpu", backend="torch")
    assert not os.path.exists(marker)
    assert resolve_model(REMOTE_ENTRY.hub_id).trust_remote_code  # the entry's own hub id keeps its setting


def test_a_folder_without_tokenizer_files_is_refused(tmp_path, minilm_path):
    tokenizer_files = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
    folder = _copy_model(minilm_path, str(tmp_path / "no-tokenizer"), skip=tokenizer_files)
    with pytest.raises(ModelFilesError) as info:
        Embedder(folder, device="cpu", backend="torch")
    message = str(info.value)
    assert folder in message and "tokenizer.json" in message and "vocab.txt" in message


def test_a_tokenizer_far_smaller_than_the_vocabulary_is_refused(tmp_path, minilm_path):
    folder = _copy_model(minilm_path, str(tmp_path / "small-tokenizer"), skip=("tokenizer.json",))
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as handle:
        handle.write("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")  # 5 tokens for a 30,522-row embedding
    with pytest.raises(ModelFilesError, match=r"has 5 tokens but the model's vocabulary has 30,522") as info:
        Embedder(folder, device="cpu", backend="torch")
    assert folder in str(info.value)


def test_corrupt_config_json_is_named(tmp_path, minilm_path):
    folder = _copy_model(minilm_path, str(tmp_path / "bad-config"))
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as handle:
        handle.write('{"model_type": "bert", "hidden_size": 38')
    with pytest.raises(ModelFilesError, match=r"config\.json is not valid JSON") as info:
        Embedder(folder, device="cpu", backend="torch")
    assert os.path.join(folder, "config.json") in str(info.value)


def test_truncated_safetensors_is_named(tmp_path, minilm_path):
    folder = _copy_model(minilm_path, str(tmp_path / "truncated"), skip=("pytorch_model.bin",))
    weights = os.path.join(folder, "model.safetensors")
    size = os.path.getsize(weights)
    with open(weights, "r+b") as handle:
        handle.truncate(size // 2)
    with pytest.raises(ModelFilesError, match="is truncated") as info:
        Embedder(folder, device="cpu")
    assert weights in str(info.value)
    with open(weights, "r+b") as handle:
        handle.truncate(5)
    with pytest.raises(ModelFilesError, match="not a readable safetensors file"):
        Embedder(folder, device="cpu")


@pytest.mark.parametrize("template", ["{}", "Instruct: {}", "{}{}{}", "{instruction}{text}", "{0}{0}", "{}{"])
def test_an_instruction_format_without_two_slots_is_refused(minilm, minilm_path, template):
    with pytest.raises(ValueError, match="instruction_format"):
        minilm.encode(["a text"], instruction="query: ", instruction_format=template)
    with pytest.raises(ValueError, match="instruction_format"):
        Embedder(minilm_path, device="cpu", query_instruction_format=template)


def test_two_slot_instruction_formats_still_work(minilm):
    plain = minilm.encode(["query: a text"])
    for template in ("{}{}", "{0}{1}", "{}\\n{}"):
        expected = minilm.encode([template.replace("\\n", "\n").format("query: ", "a text")])
        np.testing.assert_allclose(
            minilm.encode(["a text"], instruction="query: ", instruction_format=template), expected, atol=1e-6
        )
    np.testing.assert_allclose(minilm.encode(["a text"], instruction="query: "), plain, atol=1e-6)


def test_a_lone_surrogate_is_named_with_its_position(minilm):
    texts = ["fine", "bad \ud83d here", "also fine"]
    with pytest.raises(ValueError, match=r"texts\[1\] contains a lone surrogate at position 4"):
        minilm.encode(texts)
    with pytest.raises(ValueError, match=r"queries\[0\] contains a lone surrogate at position 0"):
        minilm.encode_queries(["\udc80 at the start"])
    with pytest.raises(ValueError, match="lone surrogate at position 2"):
        minilm.encode("ok\ud800")
    assert minilm.encode(["emoji 🙂 and accents é are fine"]).shape == (1, 384)


def test_own_code_for_a_model_type_transformers_knows_is_refused_unless_the_user_chooses(tmp_path, minilm_path):
    """gte-Qwen2 is a ``qwen2`` with its own attention code: quietly loading the built-in class would give other
    vectors than the checkpoint's code. The user chooses: True runs the code, an explicit False the built-in class."""
    marker = str(tmp_path / "code-ran.txt")
    folder = _remote_code_checkpoint(str(tmp_path / "my-copy"), minilm_path, marker)
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    config["model_type"] = "bert"  # known to transformers
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    with pytest.raises(ModelFilesError, match="trust_remote_code=False to load it with transformers' built-in 'bert'"):
        Embedder(folder, device="cpu", backend="torch")
    with Embedder(folder, device="cpu", backend="torch", trust_remote_code=False) as builtin:
        assert builtin.encode("a text").shape == (384,)
    assert not os.path.exists(marker)


def test_the_command_line_has_trust_remote_code(tmp_path, minilm_path, monkeypatch):
    from typer.testing import CliRunner

    from tembed.cli import app

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    marker = str(tmp_path / "code-ran.txt")
    folder = _remote_code_checkpoint(str(tmp_path / REMOTE_ENTRY.name), minilm_path, marker)
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "a text"}\n', encoding="utf-8")
    args = ["encode", str(source), "-o", str(tmp_path / "out.parquet"), "-m", folder, "--backend", "torch"]
    refused = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert refused.exit_code == 2 and "--trust-remote-code" in refused.output
    assert not os.path.exists(marker)
    CliRunner().invoke(app, [*args, "--device", "cpu", "--trust-remote-code"])
    assert os.path.exists(marker)  # the flag reaches the loader


def test_a_tokenizer_can_be_pickled(minilm):
    import pickle

    copy = pickle.loads(pickle.dumps(minilm.tokenizer))
    assert copy.encode(["a text"], 16) == minilm.tokenizer.encode(["a text"], 16)
