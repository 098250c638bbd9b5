"""A drop-in for FlagEmbedding users: ``FlagModel``, ``FlagLLMModel``, ``FlagICLModel``, ``FlagAutoModel``.

Replace ``from FlagEmbedding import FlagModel`` with ``from tembed.compat.flagembedding import FlagModel``: the
constructor parameters, their defaults and the method names are FlagEmbedding 1.4.2's, and in fp32 on the CPU
the vectors are the same (max abs difference <= 1e-5, checked against FlagEmbedding itself in the tests).
Everything runs through tembed's one pipeline.

Deliberate differences from FlagEmbedding:

* ``devices=None`` means one device (the first GPU, else the CPU), not every visible GPU; a list of several
  devices starts a warm worker pool at construction (each worker loads the model; nothing is pickled) that
  stops with ``close()`` -- a worker failure reaches the caller instead of hanging.
* Outputs are float32 whatever the compute precision (FlagEmbedding returns float16 arrays on GPUs).
* ``use_fp16`` / ``use_bf16`` apply on GPUs; on the CPU the model runs in fp32, as in FlagEmbedding, but the model
  is not mutated between calls.
* The batch size is never probed with a throw-away forward pass; it shrinks only on a real out-of-memory error.
* Unknown keyword arguments raise ``TypeError`` instead of silently becoming attributes or tokenizer arguments
  (``pad_to_multiple_of`` is accepted and ignored: it changes padding, not the vectors).
* The model is placed on its device once; nothing is cleaned up in ``__del__`` (use ``close()`` or ``with``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from enum import Enum
from typing import Any

import numpy as np
import torch

from tembed.devices import resolve_device
from tembed.embedder import Embedder
from tembed.models.registry import lookup, registry_key, registry_vouches_for_code
from tembed.text import apply_instruction, check_texts, normalize_format

logger = logging.getLogger(__name__)

_IGNORED_ENCODE_KWARGS = {"pad_to_multiple_of"}


def _device_list(devices: str | int | Sequence[str | int] | None) -> list[str | int | None]:
    if devices is None or isinstance(devices, (str, int)):
        return [devices]
    devices = list(devices)
    if not devices:
        raise ValueError("devices=[]: give at least one device")
    return devices


def _check_encode_kwargs(method: str, kwargs: dict[str, Any]) -> None:
    unknown = set(kwargs) - _IGNORED_ENCODE_KWARGS
    if unknown:
        raise TypeError(f"{method}() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")


class _FlagFacade:
    """The shared constructor and encode methods of FlagEmbedding's ``AbsEmbedder``."""

    DEFAULT_POOLING_METHOD = "cls"
    DEFAULT_QUERY_INSTRUCTION_FORMAT = "{}{}"
    OUTPUTS: tuple[str, ...] = ("dense",)

    def __init__(
        self,
        model_name_or_path: str,
        normalize_embeddings: bool = True,
        use_fp16: bool = True,
        use_bf16: bool = False,
        query_instruction_for_retrieval: str | None = None,
        query_instruction_format: str | None = None,
        devices: str | int | Sequence[str | int] | None = None,
        pooling_method: str | None = None,
        trust_remote_code: bool | None = False,
        cache_dir: str | None = None,
        batch_size: int = 256,
        query_max_length: int = 512,
        passage_max_length: int = 512,
        convert_to_numpy: bool = True,
        truncate_dim: int | None = None,
        passage_instruction_for_retrieval: str | None = None,
        passage_instruction_format: str = "{}{}",
    ) -> None:
        if cache_dir is not None:
            import os

            os.environ.setdefault("HF_HUB_CACHE", cache_dir)
        self.model_name_or_path = model_name_or_path
        self.normalize_embeddings = normalize_embeddings
        self.use_fp16 = use_fp16
        self.use_bf16 = use_bf16
        self.query_instruction_for_retrieval = query_instruction_for_retrieval
        self.query_instruction_format = query_instruction_format or self.DEFAULT_QUERY_INSTRUCTION_FORMAT
        self.passage_instruction_for_retrieval = passage_instruction_for_retrieval
        self.passage_instruction_format = passage_instruction_format
        self.pooling_method = pooling_method or self.DEFAULT_POOLING_METHOD
        self.batch_size = batch_size
        self.query_max_length = query_max_length
        self.passage_max_length = passage_max_length
        self.convert_to_numpy = convert_to_numpy
        self.truncate_dim = truncate_dim
        device_list = _device_list(devices)
        target_device = resolve_device(device_list[0])
        precision = "fp32"
        if target_device.type != "cpu":
            precision = "bf16" if use_bf16 else ("fp16" if use_fp16 else "fp32")
        self._embedder_options: dict[str, Any] = dict(
            pooling=self.pooling_method,
            normalize=normalize_embeddings,
            query_instruction="",
            passage_instruction="",
            query_max_length=query_max_length,
            passage_max_length=passage_max_length,
            batch_size=batch_size,
            precision=precision,
            truncate_dim=truncate_dim,
            trust_remote_code=trust_remote_code,
            outputs=self.OUTPUTS,
            backend="torch",
        )
        self.embedder = Embedder(
            model_name_or_path,
            device=device_list if len(device_list) > 1 else target_device,
            pooling=self.pooling_method,
            normalize=normalize_embeddings,
            query_instruction="",
            passage_instruction="",
            query_max_length=query_max_length,
            passage_max_length=passage_max_length,
            batch_size=batch_size,
            precision=precision,
            truncate_dim=truncate_dim,
            trust_remote_code=trust_remote_code,
            outputs=self.OUTPUTS,
            backend="torch",
        )
        self.target_devices = [str(resolve_device(d)) for d in device_list]
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer (loaded in this process on first use when encoding runs in a pool)."""
        if self._tokenizer is None:
            if self.embedder.pool is None:
                self._tokenizer = self.embedder.tokenizer.hf
            else:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.embedder.resolved.path)
        return self._tokenizer

    # ------------------------------------------------------------------------------------------ worker pools
    def start_multi_process_pool(self, target_devices: Any = None) -> Any:
        """A warm worker pool (:class:`tembed.parallel.EmbedderPool`) on ``target_devices``.

        FlagEmbedding passes a worker function here; tembed's workers need none, so a callable is ignored and
        the constructor's devices are used. Stop it with :meth:`stop_multi_process_pool` (or ``pool.close()``).
        """
        from tembed.parallel import EmbedderPool

        devices = self.target_devices if target_devices is None or callable(target_devices) else target_devices
        return EmbedderPool(self.model_name_or_path, _device_list(devices), **self._embedder_options)

    def encode_multi_process(self, sentences: list[str], pool: Any, **kwargs: Any) -> Any:
        """Encode on a pool from :meth:`start_multi_process_pool`: ``encode`` semantics, results in order."""
        convert_to_numpy = kwargs.pop("convert_to_numpy", None)
        options = {key: kwargs.pop(key) for key in ("batch_size", "max_length") if key in kwargs}
        _check_encode_kwargs("encode_multi_process", kwargs)
        numpy_out = self.convert_to_numpy if convert_to_numpy is None else convert_to_numpy
        options.setdefault("max_length", self.passage_max_length)
        return pool.encode(sentences, convert_to="numpy" if numpy_out else "torch", **options)

    @staticmethod
    def stop_multi_process_pool(pool: Any) -> None:
        """Stop a pool from :meth:`start_multi_process_pool` (idempotent; no process is left)."""
        pool.close()

    # FlagEmbedding's helper, kept for users who call it.
    @staticmethod
    def get_detailed_instruct(instruction_format: str, instruction: str, sentence: str) -> str:
        """``instruction_format.format(instruction, sentence)`` with a literal ``\\n`` turned into a newline."""
        return normalize_format(instruction_format).format(instruction, sentence)

    def _run(
        self,
        texts: str | list[str],
        *,
        batch_size: int | None,
        max_length: int,
        convert_to_numpy: bool | None,
        instruction: str | None,
        instruction_format: str,
    ) -> np.ndarray | torch.Tensor:
        numpy_out = self.convert_to_numpy if convert_to_numpy is None else convert_to_numpy
        return self.embedder.encode(
            texts,
            instruction=instruction,
            instruction_format=instruction_format,
            max_length=max_length,
            batch_size=batch_size or self.batch_size,
            convert_to="numpy" if numpy_out else "torch",
        )

    def encode_queries(
        self,
        queries: list[str] | str,
        batch_size: int | None = None,
        max_length: int | None = None,
        convert_to_numpy: bool | None = None,
        **kwargs: Any,
    ) -> np.ndarray | torch.Tensor:
        """Queries with ``query_instruction_for_retrieval`` applied, truncated at ``query_max_length``."""
        _check_encode_kwargs("encode_queries", kwargs)
        return self._run(
            queries,
            batch_size=batch_size,
            max_length=max_length or self.query_max_length,
            convert_to_numpy=convert_to_numpy,
            instruction=self.query_instruction_for_retrieval,
            instruction_format=self.query_instruction_format,
        )

    def encode_corpus(
        self,
        corpus: list[str] | str,
        batch_size: int | None = None,
        max_length: int | None = None,
        convert_to_numpy: bool | None = None,
        **kwargs: Any,
    ) -> np.ndarray | torch.Tensor:
        """Passages, with ``passage_instruction_for_retrieval`` if set, truncated at ``passage_max_length``."""
        _check_encode_kwargs("encode_corpus", kwargs)
        return self._run(
            corpus,
            batch_size=batch_size,
            max_length=max_length or self.passage_max_length,
            convert_to_numpy=convert_to_numpy,
            instruction=self.passage_instruction_for_retrieval,
            instruction_format=self.passage_instruction_format,
        )

    def encode(
        self,
        sentences: list[str] | str,
        batch_size: int | None = None,
        max_length: int | None = None,
        convert_to_numpy: bool | None = None,
        instruction: str | None = None,
        instruction_format: str | None = None,
        **kwargs: Any,
    ) -> np.ndarray | torch.Tensor:
        """Any texts, with an optional instruction, truncated at ``passage_max_length`` by default."""
        _check_encode_kwargs("encode", kwargs)
        return self._run(
            sentences,
            batch_size=batch_size,
            max_length=max_length or self.passage_max_length,
            convert_to_numpy=convert_to_numpy,
            instruction=instruction,
            instruction_format=instruction_format or "{}{}",
        )

    def stop_self_pool(self) -> None:
        """Stop the worker pool started for several ``devices`` (nothing to do on one device)."""
        if self.embedder.pool is not None:
            self.embedder.pool.close()

    def close(self) -> None:
        """Release the model."""
        self.embedder.close()

    def __enter__(self) -> _FlagFacade:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class FlagModel(_FlagFacade):
    """FlagEmbedding's encoder embedder (BGE v1/v1.5, e5, gte, bce): CLS or mean pooling.

    Same parameters and defaults as ``FlagEmbedding.FlagModel`` 1.4.2: ``pooling_method="cls"``,
    ``normalize_embeddings=True``, ``use_fp16=True``, ``batch_size=256``, ``query_max_length=512``,
    ``passage_max_length=512``, no default instruction. See the module docstring for deliberate differences.
    """

    DEFAULT_POOLING_METHOD = "cls"


class FlagLLMModel(_FlagFacade):
    """FlagEmbedding's decoder-only embedder (e5-mistral, gte-Qwen, Qwen3-Embedding, bge-multilingual-gemma2).

    Last-token pooling only (another ``pooling_method`` raises ``ValueError``, as in FlagEmbedding); default
    ``query_instruction_format="Instruct: {}\\nQuery: {}"``.
    """

    DEFAULT_POOLING_METHOD = "last_token"
    DEFAULT_QUERY_INSTRUCTION_FORMAT = "Instruct: {}\nQuery: {}"

    def __init__(self, model_name_or_path: str, *args: Any, pooling_method: str | None = None, **kwargs: Any) -> None:
        if pooling_method not in (None, "last_token"):
            raise ValueError(
                f"Pooling method {pooling_method} is not supported: {type(self).__name__} pools the last token"
            )
        super().__init__(model_name_or_path, *args, pooling_method="last_token", **kwargs)


class FlagICLModel(FlagLLMModel):
    """FlagEmbedding's in-context-learning embedder (bge-en-icl).

    Queries are built as FlagEmbedding does: each example formatted with ``examples_instruction_format``
    (``"<instruct>{}\\n<query>{}\\n<response>{}"``), joined by blank lines, then the instructed query (truncated
    to fit ``max_length`` and decoded back to text), then ``suffix`` (``"\\n<response>"``). Passages are encoded
    plainly.

    Args:
        suffix: appended to every query (default ``"\\n<response>"``).
        examples_for_task: a list of ``{"instruct", "query", "response"}`` dicts, or None.
        examples_instruction_format: template for one example.
    """

    DEFAULT_QUERY_INSTRUCTION_FORMAT = "<instruct>{}\n<query>{}"

    def __init__(
        self,
        model_name_or_path: str,
        *args: Any,
        suffix: str = "\n<response>",
        examples_for_task: list[dict[str, str]] | None = None,
        examples_instruction_format: str = "<instruct>{}\n<query>{}\n<response>{}",
        **kwargs: Any,
    ) -> None:
        super().__init__(model_name_or_path, *args, **kwargs)
        self.suffix = suffix
        self.examples_for_task = examples_for_task
        self.examples_instruction_format = examples_instruction_format
        self.prefix = ""
        self.set_examples()

    @staticmethod
    def get_detailed_example(instruction_format: str, instruction: str, query: str, response: str) -> str:
        """One in-context example: ``instruction_format.format(instruction, query, response)``."""
        return normalize_format(instruction_format).format(instruction, query, response)

    def set_examples(self, examples_for_task: list[dict[str, str]] | None = None) -> None:
        """Set the in-context examples (None keeps the constructor's); builds the query prefix."""
        examples = examples_for_task if examples_for_task is not None else self.examples_for_task
        if examples is None:
            self.prefix = ""
            return
        formatted = [
            self.get_detailed_example(
                self.examples_instruction_format,
                example.get("instruct", self.query_instruction_for_retrieval),  # type: ignore[arg-type]
                example.get("query", ""),
                example.get("response", ""),
            )
            for example in examples
        ]
        self.prefix = "\n\n".join(formatted) + "\n\n"

    def encode_queries(
        self,
        queries: list[str] | str,
        batch_size: int | None = None,
        max_length: int | None = None,
        convert_to_numpy: bool | None = None,
        **kwargs: Any,
    ) -> np.ndarray | torch.Tensor:
        """Queries inside the in-context prompt (examples, instructed query, suffix)."""
        _check_encode_kwargs("encode_queries", kwargs)
        items, single = check_texts(queries, what="queries")
        max_length = max_length or self.query_max_length
        texts = apply_instruction(items, self.query_instruction_for_retrieval, self.query_instruction_format)
        count = self.embedder.tokenizer.count  # shares the tokenizer's lock with every other encode call
        budget = max_length - count("<s>") - count(f"{self.suffix}</s>")
        prompt_length = (count(self.prefix) + count(self.suffix) + max_length + 8) // 8 * 8 + 8
        truncated = self.embedder.tokenizer.encode(texts, budget, add_special_tokens=False)
        prompts = [self.prefix + text + self.suffix for text in self.tokenizer.batch_decode(truncated)]
        result = self._run(
            prompts,
            batch_size=batch_size,
            max_length=prompt_length,
            convert_to_numpy=convert_to_numpy,
            instruction=None,
            instruction_format="{}{}",
        )
        return result[0] if single else result


class EmbedderModelClass(Enum):
    """FlagEmbedding's ``model_class`` values."""

    ENCODER_ONLY_BASE = "encoder-only-base"
    ENCODER_ONLY_M3 = "encoder-only-m3"
    DECODER_ONLY_BASE = "decoder-only-base"
    DECODER_ONLY_ICL = "decoder-only-icl"


_CLASS_BY_MODEL_CLASS: dict[EmbedderModelClass, type[_FlagFacade]] = {
    EmbedderModelClass.ENCODER_ONLY_BASE: FlagModel,
    EmbedderModelClass.DECODER_ONLY_BASE: FlagLLMModel,
    EmbedderModelClass.DECODER_ONLY_ICL: FlagICLModel,
}
_CLASS_BY_KIND: dict[str, type[_FlagFacade]] = {"encoder": FlagModel, "decoder": FlagLLMModel, "icl": FlagICLModel}


class FlagAutoModel:
    """FlagEmbedding's factory: picks the class, pooling and instruction format from the registry.

    ``FlagAutoModel.from_finetuned("BAAI/bge-base-en-v1.5", query_instruction_for_retrieval=...)``. Unlike
    FlagEmbedding, a model that is not in the registry (a local fine-tune with another folder name) is not an
    error: its class and pooling come from its own files (sentence-transformers config, architecture).
    """

    def __init__(self) -> None:
        raise OSError("FlagAutoModel is designed to be instantiated using `FlagAutoModel.from_finetuned(...)`.")

    @classmethod
    def from_finetuned(
        cls,
        model_name_or_path: str,
        model_class: str | EmbedderModelClass | None = None,
        normalize_embeddings: bool = True,
        use_fp16: bool = True,
        use_bf16: bool = False,
        query_instruction_for_retrieval: str | None = None,
        devices: str | int | Sequence[str | int] | None = None,
        pooling_method: str | None = None,
        trust_remote_code: bool | None = None,
        query_instruction_format: str | None = None,
        truncate_dim: int | None = None,
        **kwargs: Any,
    ) -> _FlagFacade:
        """Build the right facade for a model, as ``FlagEmbedding.FlagAutoModel.from_finetuned`` does."""
        if model_class is not None:
            chosen = EmbedderModelClass(model_class)
            target = BGEM3FlagModel if chosen is EmbedderModelClass.ENCODER_ONLY_M3 else _CLASS_BY_MODEL_CLASS[chosen]
            pooling_method = pooling_method or target.DEFAULT_POOLING_METHOD
            trust_remote_code = bool(trust_remote_code)
            query_instruction_format = query_instruction_format or "{}{}"
        else:
            spec = lookup(registry_key(model_name_or_path))
            if spec is None:
                from tembed.models.resolve import resolve_model

                spec = resolve_model(model_name_or_path).spec
                logger.info("%s is not in the registry; using its own files: %s", model_name_or_path, spec)
            target = BGEM3FlagModel if spec.kind == "m3" else _CLASS_BY_KIND[spec.kind]
            pooling_method = pooling_method or spec.pooling
            if trust_remote_code is None and registry_vouches_for_code(model_name_or_path):
                trust_remote_code = True  # the registry vouches for its exact hub ids only, never a look-alike
            query_instruction_format = query_instruction_format or spec.query_instruction_format
        return target(
            model_name_or_path,
            normalize_embeddings=normalize_embeddings,
            use_fp16=use_fp16,
            use_bf16=use_bf16,
            query_instruction_for_retrieval=query_instruction_for_retrieval,
            query_instruction_format=query_instruction_format,
            devices=devices,
            pooling_method=pooling_method,
            trust_remote_code=trust_remote_code,
            truncate_dim=truncate_dim,
            **kwargs,
        )


from tembed.compat.flagembedding_m3 import BGEM3FlagModel  # noqa: E402  (it builds on _FlagFacade above)

__all__ = [
    "BGEM3FlagModel",
    "EmbedderModelClass",
    "FlagAutoModel",
    "FlagICLModel",
    "FlagLLMModel",
    "FlagModel",
]
