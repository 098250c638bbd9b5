"""What a model folder's files say about its architecture, read without loading weights or importing torch.

``config.json`` gives the model type, hidden size and positions; ``tokenizer.json`` / ``tokenizer_config.json``
give the vocabulary size and the tokenizer's declared length limit; the presence of BGE-M3's head files marks an
M3 model. :func:`read_model_facts` is what ``tembed info`` and the effective settings are built from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from tembed.models.files import read_json_file

M3_COLBERT_FILE = "colbert_linear.pt"
M3_SPARSE_FILE = "sparse_linear.pt"

# Position ids of these models start after the padding index, so pad_token_id + 1 positions are not usable.
ROBERTA_LIKE_MODEL_TYPES = frozenset(
    {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "data2vec-text"}
)
DECODER_MODEL_TYPES = frozenset(
    {
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3",
        "gpt2",
        "gpt_neox",
        "phi",
        "phi3",
        "minicpm",
        "opt",
    }
)
_NO_LIMIT = 1_000_000  # tokenizers without a limit declare int(1e30)


@dataclass(frozen=True)
class ModelFacts:
    """The architecture facts that settings depend on.

    Attributes:
        model_type: ``config.json``'s ``model_type`` (``"bert"``, ``"xlm-roberta"``...), or None.
        hidden_size: the width of the last hidden state (the dense dimension before truncation).
        max_positions: the most tokens the position embeddings allow (RoBERTa-like models: minus the padding
            offset), else the tokenizer's declared limit, else None (no limit known).
        vocab_size: the tokenizer's vocabulary, added tokens included (the width of sparse vectors).
        is_decoder: a causal LM (last-token pooling by default).
        has_m3_heads: ``colbert_linear.pt`` or ``sparse_linear.pt`` is present.
        is_masked_lm: the architecture is ``...ForMaskedLM`` (SPLADE-style sparse weights).
    """

    model_type: str | None
    hidden_size: int | None
    max_positions: int | None
    vocab_size: int | None
    is_decoder: bool
    has_m3_heads: bool
    is_masked_lm: bool


def read_model_facts(path: str, config: dict[str, Any] | None = None) -> ModelFacts:
    """The :class:`ModelFacts` of a model folder (``config`` is ``config.json`` when already read)."""
    config = read_json_file(os.path.join(path, "config.json")) if config is None else config
    model_type = config.get("model_type")
    architectures = [str(name) for name in config.get("architectures") or []]
    hidden = config.get("hidden_size") or config.get("d_model") or config.get("n_embd")
    return ModelFacts(
        model_type=str(model_type) if model_type else None,
        hidden_size=int(hidden) if hidden else None,
        max_positions=max_positions(config, _tokenizer_max_length(path)),
        vocab_size=_tokenizer_vocab_size(path) or _int_or_none(config.get("vocab_size")),
        is_decoder=model_type in DECODER_MODEL_TYPES or any(a.endswith("ForCausalLM") for a in architectures),
        has_m3_heads=any(os.path.isfile(os.path.join(path, name)) for name in (M3_COLBERT_FILE, M3_SPARSE_FILE)),
        is_masked_lm=any(a.endswith("ForMaskedLM") for a in architectures),
    )


def max_positions(config: dict[str, Any], tokenizer_max_length: int | None) -> int | None:
    """The most tokens a model takes: ``max_position_embeddings`` (RoBERTa-like: minus ``pad_token_id + 1``),
    else the tokenizer's declared limit, else None."""
    positions = _int_or_none(config.get("max_position_embeddings"))
    if positions:
        if config.get("model_type") in ROBERTA_LIKE_MODEL_TYPES:
            positions -= (config.get("pad_token_id", 1) or 1) + 1
        return positions
    return tokenizer_max_length


def _tokenizer_max_length(path: str) -> int | None:
    file = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(file):
        return None
    value = read_json_file(file).get("model_max_length")
    return int(value) if isinstance(value, (int, float)) and 0 < value < _NO_LIMIT else None


def _tokenizer_vocab_size(path: str) -> int | None:
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        return None
    from tokenizers import Tokenizer

    return int(Tokenizer.from_file(file).get_vocab_size(with_added_tokens=True))


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None
