"""Reading a folder's sentence-transformers files (``modules.json``, ``1_Pooling/config.json``, Normalize,
``sentence_bert_config.json``, ``config_sentence_transformers.json``).

Only what changes the vectors is read: the pooling mode, whether a Normalize module follows, the max sequence
length and the ``query`` / ``passage`` (or ``document``) prompts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from tembed.models.files import read_json_file

_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "last_token",
}
_UNSUPPORTED_POOLING_KEYS = (
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
)


@dataclass(frozen=True)
class SentenceTransformersConfig:
    """What a folder's sentence-transformers files say; None where they say nothing.

    Attributes:
        pooling: ``"cls"``, ``"mean"`` or ``"last_token"``.
        normalize: True when ``modules.json`` lists a Normalize module, False when it lists modules but no
            Normalize, None without ``modules.json``.
        max_seq_length: from ``sentence_bert_config.json``.
        query_prompt: the ``query`` prompt of ``config_sentence_transformers.json``.
        passage_prompt: the ``passage`` or ``document`` prompt.
    """

    pooling: str | None = None
    normalize: bool | None = None
    max_seq_length: int | None = None
    query_prompt: str | None = None
    passage_prompt: str | None = None

    @property
    def is_empty(self) -> bool:
        return self == SentenceTransformersConfig()


def _pooling_from(config: dict[str, Any], path: str) -> str | None:
    if config.get("pooling_mode"):  # newer ST versions write a single string
        mode = str(config["pooling_mode"]).replace("lasttoken", "last_token")
        if mode not in ("cls", "mean", "last_token"):
            raise ValueError(f"{path}: pooling_mode {mode!r} is not supported (cls, mean, lasttoken are)")
        return mode
    chosen = [mode for key, mode in _POOLING_KEYS.items() if config.get(key)]
    unsupported = [key for key in _UNSUPPORTED_POOLING_KEYS if config.get(key)]
    if unsupported or len(chosen) > 1:
        raise ValueError(
            f"{path}: pooling {', '.join(unsupported + chosen)} is not supported; "
            "tembed pools with exactly one of cls, mean, last_token (pass pooling=... to override)"
        )
    return chosen[0] if chosen else None


def read_sentence_transformers_config(folder: str) -> SentenceTransformersConfig:
    """Read the sentence-transformers files of a model folder (all optional)."""
    pooling = normalize = max_seq_length = query_prompt = passage_prompt = None
    modules_path = os.path.join(folder, "modules.json")
    if os.path.isfile(modules_path):
        modules = read_json_file(modules_path)
        types = [str(module.get("type", "")) for module in modules]
        normalize = any(t.endswith(".Normalize") for t in types)
        for module in modules:
            if str(module.get("type", "")).endswith(".Pooling"):
                pooling_path = os.path.join(folder, module.get("path", ""), "config.json")
                if os.path.isfile(pooling_path):
                    pooling = _pooling_from(read_json_file(pooling_path), pooling_path)
    sbert_path = os.path.join(folder, "sentence_bert_config.json")
    if os.path.isfile(sbert_path):
        value = read_json_file(sbert_path).get("max_seq_length")
        max_seq_length = int(value) if value else None
    st_path = os.path.join(folder, "config_sentence_transformers.json")
    if os.path.isfile(st_path):
        prompts = read_json_file(st_path).get("prompts") or {}
        query_prompt = prompts.get("query") or None
        passage_prompt = prompts.get("passage") or prompts.get("document") or None
    return SentenceTransformersConfig(pooling, normalize, max_seq_length, query_prompt, passage_prompt)
