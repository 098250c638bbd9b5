"""Settings, resolved once: what the user asked for, what each call asks for, and what the model will really do.

* :class:`EmbedderConfig`: the constructor options of an embedder (immutable, picklable). A worker process, a
  Ray actor or a server replica builds its model from one; ``None`` means "from the model's files".
* :class:`EncodeOptions`: the options of one encode call (role, instruction, max length, outputs, batch size).
* :class:`Settings`: the effective values (pooling, normalize, instructions, lengths, dim, outputs, backend,
  precision) that the registry and the model's files made of a config. Every front end reads these;
  :func:`resolve_settings` computes them from files alone (no weights, no export, no torch), which is what
  ``tembed info`` prints.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from tembed.backends.select import BACKENDS
from tembed.models.architecture import ModelFacts, read_model_facts
from tembed.models.registry import DEFAULT_MODEL
from tembed.models.resolve import ResolvedModel, resolve_model
from tembed.text import check_instruction_format
from tembed.types import (
    OUTPUT_NAMES,
    POOLING_METHODS,
    PRECISIONS,
    Role,
    check_choice,
    check_positive,
)

DEFAULT_MAX_LENGTH = 512
"""Max tokens when neither the registry nor the model's files say (FlagEmbedding's default)."""
DEFAULT_CPU_MAX_BATCH_TOKENS = 4096
"""Padded tokens per forward pass on a CPU: batches this size stay in cache (docs/cpu-performance.md)."""
DEFAULT_CPU_BATCH_SIZE = 64
"""Texts per forward pass on a CPU: bigger batches push activations out of cache (docs/cpu-performance.md)."""
DEFAULT_GPU_BATCH_SIZE = 256


@dataclass(frozen=True)
class EmbedderConfig:
    """What the user asked for: the options of :class:`tembed.Embedder`, checked, immutable and picklable.

    Every field is documented on :class:`tembed.Embedder`; None means "from the registry or the model's files".
    ``outputs`` is a tuple (or None: all the model has). Invalid values raise ValueError here, in the caller,
    before any process or model is started.
    """

    model: str = DEFAULT_MODEL
    pooling: str | None = None
    normalize: bool | None = None
    query_instruction: str | None = None
    query_instruction_format: str | None = None
    passage_instruction: str | None = None
    passage_instruction_format: str | None = None
    query_max_length: int | None = None
    passage_max_length: int | None = None
    batch_size: int | None = None
    max_batch_tokens: int | None = None
    precision: str = "auto"
    truncate_dim: int | None = None
    show_progress_bar: bool | None = None
    trust_remote_code: bool | None = None
    outputs: tuple[str, ...] | None = None
    backend: str = "auto"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        model = self.model
        if isinstance(model, os.PathLike):
            object.__setattr__(self, "model", os.fspath(model))
        if isinstance(self.cache_dir, os.PathLike):
            object.__setattr__(self, "cache_dir", os.fspath(self.cache_dir))
        if not isinstance(self.model, str) or not self.model.strip():
            raise TypeError(f"model must be a non-empty string (a folder, registry name or hub id), got {model!r}")
        if self.pooling is not None:
            check_choice("pooling", self.pooling, POOLING_METHODS)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("backend", self.backend, BACKENDS)
        for name in ("batch_size", "max_batch_tokens", "truncate_dim", "query_max_length", "passage_max_length"):
            value = getattr(self, name)
            if value is not None:
                check_positive(name, value)
        for template in (self.query_instruction_format, self.passage_instruction_format):
            if template is not None:
                check_instruction_format(template)
        if self.outputs is not None:
            outputs = (self.outputs,) if isinstance(self.outputs, str) else tuple(self.outputs)
            for name in outputs:
                check_choice("outputs", name, OUTPUT_NAMES)
            object.__setattr__(self, "outputs", outputs)

    def replace(self, **changes: Any) -> EmbedderConfig:
        """A copy with some options changed (checked again)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class EncodeOptions:
    """The options of one encode call.

    Attributes:
        role: :class:`~tembed.types.Role` (or its string): ``"query"`` applies the query instruction and
            ``query_max_length``; ``"passage"`` the passage instruction and ``passage_max_length``; ``"plain"``
            (default) no instruction and ``passage_max_length``.
        instruction: overrides the role's instruction; ``""``: none; None: the role's.
        instruction_format: ``format(instruction, text)`` template; None: the role's (``"{}{}"`` for plain).
        max_length: max tokens per text; None: the role's. Beyond the model's limit it is clamped with a warning.
        outputs: any of ``"dense"``, ``"sparse"``, ``"colbert"`` (one forward pass for all); default dense.
        batch_size: the most texts per forward pass; None: the embedder's.
    """

    role: Role = Role.PLAIN
    instruction: str | None = None
    instruction_format: str | None = None
    max_length: int | None = None
    outputs: tuple[str, ...] = ("dense",)
    batch_size: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", Role(self.role))
        outputs = (self.outputs,) if isinstance(self.outputs, str) else tuple(self.outputs)
        if not outputs:
            raise ValueError("ask for at least one of the outputs dense, sparse, colbert")
        for name in outputs:
            check_choice("outputs", name, OUTPUT_NAMES)
        object.__setattr__(self, "outputs", outputs)
        for name in ("max_length", "batch_size"):
            value = getattr(self, name)
            if value is not None:
                check_positive(name, value)
        if self.instruction_format is not None:
            check_instruction_format(self.instruction_format)


@dataclass(frozen=True)
class Settings:
    """What a model really does under a config: the effective value of every option (read-only).

    Attributes:
        model: the name asked for; ``path``: the folder of its files; ``source``: where they were found.
        registry_entry: the registry entry that applied, or None. ``family``, ``kind``: from it or the files.
        pooling, normalize, truncate_dim: how dense vectors are made (normalize from the config, else the
            registry, else the folder's ``modules.json``: no Normalize module, no normalization).
        dim: the length of dense vectors (``truncate_dim`` or the hidden size); ``hidden_size``: the model's.
        outputs: the outputs this embedder produces. ``colbert_dim``: the width of ColBERT vectors (known once
            the heads are loaded; None before, or without ColBERT).
        query_instruction, query_instruction_format, passage_instruction, passage_instruction_format: as applied
            by the query and passage roles (None: no instruction).
        query_max_length, passage_max_length: default max tokens per role (clamped to ``max_seq_length``).
        max_seq_length: the most tokens the model takes (None: no limit known).
        batch_size, max_batch_tokens: the scheduling defaults (None: no token cap).
        precision: as asked; ``effective_precision``: what it runs in (``"auto"`` resolved; bf16 on a CPU without
            native bf16 runs in fp32). Before the model is loaded this is the planned value.
        backend: the concrete backend (``"torch"``, ``"onnx"``, ``"openvino"``); ``device``: where it runs.
        vocab_size: the tokenizer's vocabulary (the width of sparse vectors).
        trust_remote_code: whether the checkpoint's own code may run. ``model_type``: ``config.json``'s.
        show_progress_bar: True / False, or None (a bar for 1,024 texts or more, when stderr is a terminal).
    """

    model: str
    path: str
    source: str
    registry_entry: str | None
    family: str
    kind: str
    pooling: str
    normalize: bool
    truncate_dim: int | None
    dim: int
    hidden_size: int
    outputs: tuple[str, ...]
    colbert_dim: int | None
    query_instruction: str | None
    query_instruction_format: str
    passage_instruction: str | None
    passage_instruction_format: str
    query_max_length: int
    passage_max_length: int
    max_seq_length: int | None
    batch_size: int
    max_batch_tokens: int | None
    precision: str
    effective_precision: str
    backend: str
    device: str
    vocab_size: int | None
    trust_remote_code: bool
    model_type: str | None
    show_progress_bar: bool | None

    def instruction_for(self, options: EncodeOptions) -> tuple[str | None, str]:
        """The ``(instruction, format)`` an encode call applies (None: no instruction)."""
        if options.role is Role.QUERY:
            instruction, template = self.query_instruction, self.query_instruction_format
        elif options.role is Role.PASSAGE:
            instruction, template = self.passage_instruction, self.passage_instruction_format
        else:
            instruction, template = None, "{}{}"
        if options.instruction is not None:
            instruction = options.instruction
        return instruction or None, options.instruction_format or template

    def max_length_for(self, options: EncodeOptions) -> int:
        """The max tokens per text of an encode call, before clamping to the model's limit."""
        if options.max_length is not None:
            return options.max_length
        return self.query_max_length if options.role is Role.QUERY else self.passage_max_length

    def as_dict(self) -> dict[str, Any]:
        """Plain values (JSON-serializable), as ``tembed info`` prints them."""
        values = dataclasses.asdict(self)
        values["outputs"] = list(self.outputs)
        return values

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def resolve_settings(
    config: EmbedderConfig, device: str = "cpu", resolved: ResolvedModel | None = None, facts: ModelFacts | None = None
) -> tuple[Settings, ResolvedModel]:
    """The effective settings of ``config`` on ``device``, from the registry and the model's files only.

    Nothing is loaded, exported or downloaded beyond resolving the model's folder; torch is not imported.

    Args:
        config: what the user asked for.
        device: the device name (``"cpu"``, ``"cuda:0"``...), already resolved.
        resolved: the model's files, when already resolved.
        facts: the model's architecture facts, when known better than the files say (a loaded config's
            defaults, e.g. the token limit of a ``config.json`` without ``max_position_embeddings``).

    Returns:
        ``(settings, resolved_model)``.

    Raises:
        ValueError: an option the model cannot honour (an output it lacks, ``truncate_dim`` beyond its size).
    """
    resolved = resolve_model(config.model, cache_dir=config.cache_dir) if resolved is None else resolved
    spec = resolved.spec
    facts = read_model_facts(resolved.path) if facts is None else facts
    outputs = tuple(spec.outputs if config.outputs is None else config.outputs)
    unknown = [name for name in outputs if name not in spec.outputs]
    if unknown or not outputs:
        raise ValueError(f"outputs={outputs!r}: this model ({spec.kind}) can produce {', '.join(spec.outputs)}")
    hidden = facts.hidden_size or 0
    if config.truncate_dim is not None and hidden and config.truncate_dim > hidden:
        raise ValueError(f"truncate_dim={config.truncate_dim} exceeds the model's dimension {hidden}")
    on_cpu = device.split(":")[0] == "cpu"
    lengths = _LengthPolicy(facts, resolved)
    remote = resolved.trust_remote_code if config.trust_remote_code is None else config.trust_remote_code
    backend = _choose_backend(config, device, facts)
    settings = Settings(
        model=config.model,
        path=resolved.path,
        source=resolved.source,
        registry_entry=spec.name if resolved.in_registry else None,
        family=spec.family,
        kind=spec.kind,
        pooling=config.pooling or spec.pooling,
        normalize=spec.normalize if config.normalize is None else config.normalize,
        truncate_dim=config.truncate_dim,
        dim=config.truncate_dim or hidden,
        hidden_size=hidden,
        outputs=outputs,
        colbert_dim=None,
        query_instruction=spec.query_instruction if config.query_instruction is None else config.query_instruction,
        query_instruction_format=config.query_instruction_format or spec.query_instruction_format,
        passage_instruction=(
            spec.passage_instruction if config.passage_instruction is None else config.passage_instruction
        ),
        passage_instruction_format=config.passage_instruction_format or spec.passage_instruction_format,
        query_max_length=lengths.default(config.query_max_length, spec.query_max_length, "query_max_length"),
        passage_max_length=lengths.default(config.passage_max_length, spec.passage_max_length, "passage_max_length"),
        max_seq_length=facts.max_positions,
        batch_size=config.batch_size or (DEFAULT_CPU_BATCH_SIZE if on_cpu else DEFAULT_GPU_BATCH_SIZE),
        max_batch_tokens=(
            config.max_batch_tokens
            if config.max_batch_tokens is not None
            else (DEFAULT_CPU_MAX_BATCH_TOKENS if on_cpu else None)
        ),
        precision=config.precision,
        effective_precision=planned_precision(config.precision, backend, on_cpu),
        backend=backend,
        device=device,
        vocab_size=facts.vocab_size,
        trust_remote_code=remote,
        model_type=facts.model_type,
        show_progress_bar=config.show_progress_bar,
    )
    return settings, resolved


class _LengthPolicy:
    """Default max lengths: the config's, else the registry's, else the folder's ST config, else 512; clamped."""

    def __init__(self, facts: ModelFacts, resolved: ResolvedModel) -> None:
        self.limit = facts.max_positions
        self.from_files = resolved.st_config.max_seq_length

    def default(self, given: int | None, from_spec: int | None, name: str) -> int:
        if given is not None:
            return clamp_max_length(given, self.limit, name=name)
        return clamp_max_length(from_spec or self.from_files or DEFAULT_MAX_LENGTH, self.limit, warn=False)


def clamp_max_length(max_length: int, limit: int | None, *, name: str = "max_length", warn: bool = True) -> int:
    """``max_length`` limited to the model's ``limit``; a value beyond it is clamped, with a UserWarning."""
    import warnings

    check_positive(name, max_length)
    if limit is not None and max_length > limit:
        if warn:
            warnings.warn(
                f"{name}={max_length} exceeds the model's limit of {limit} tokens; texts are truncated at {limit}",
                UserWarning,
                stacklevel=4,
            )
        return limit
    return max_length


class _DeviceKind(NamedTuple):
    """What backend choice needs of a device (its type), without importing torch."""

    type: str


def _choose_backend(config: EmbedderConfig, device: str, facts: ModelFacts) -> str:
    from tembed.backends.select import choose_backend

    return choose_backend(config.backend, config.precision, _DeviceKind(device.split(":")[0]), facts.model_type)


def planned_precision(precision: str, backend: str, on_cpu: bool) -> str:
    """The precision a model will run in, before it is loaded (the backend reports the real one once built).

    ``"auto"`` is fp32 on a CPU and fp16 on a GPU; bf16 on OpenVINO runs in fp32 on a CPU without native bf16
    (AVX512-BF16 or AMX).
    """
    if precision == "auto":
        return "fp32" if on_cpu else "fp16"
    if precision == "bf16" and backend == "openvino":
        from tembed.backends.cpu import has_native_bf16

        return "bf16" if has_native_bf16() else "fp32"
    return precision


def several_devices(device: Any) -> list[Any] | None:
    """The device list when ``device`` names more than one device (a pool), else None.

    Raises:
        ValueError: an empty list.
    """
    if isinstance(device, (list, tuple)):
        if not device:
            raise ValueError("device=[]: give at least one device")
        if len(device) > 1:
            return list(device)
    return None


def single_device(device: Any) -> Any:
    """The one device of a value that is not a pool (a one-element list gives its element)."""
    return device[0] if isinstance(device, (list, tuple)) else device


def outputs_tuple(outputs: str | Sequence[str]) -> tuple[str, ...]:
    """``"dense"`` -> ``("dense",)``; a sequence -> a tuple."""
    return (outputs,) if isinstance(outputs, str) else tuple(outputs)
