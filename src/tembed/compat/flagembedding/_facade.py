"""What every FlagEmbedding facade shares: the base class (FlagEmbedding's ``AbsEmbedder``) and its helpers."""

from __future__ import annotations

import inspect
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from tembed.devices import DeviceLike, resolve_device
from tembed.embedder import Embedder
from tembed.text import normalize_format

Role = Literal["query", "passage", "text"]  # what an encode call embeds ("text": encode(), instruction per call)

IGNORED_ENCODE_KWARGS = frozenset({"pad_to_multiple_of"})

_Facade = TypeVar("_Facade", bound="FlagFacade")


def device_list(devices: DeviceLike | Sequence[DeviceLike]) -> list[DeviceLike]:
    """FlagEmbedding's ``devices`` as a non-empty list (None: one default device)."""
    if devices is None or isinstance(devices, (str, int, torch.device)):
        return [devices]
    listed: list[DeviceLike] = list(devices)
    if not listed:
        raise ValueError("devices=[]: give at least one device")
    return listed


def check_encode_kwargs(method: str, kwargs: Mapping[str, Any], also_ignored: Collection[str] = ()) -> None:
    """Raise ``TypeError`` for keyword arguments FlagEmbedding would have silently passed to its tokenizer."""
    unknown = set(kwargs) - IGNORED_ENCODE_KWARGS - set(also_ignored)
    if unknown:
        raise TypeError(f"{method}() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")


def _stacklevel_outside_package() -> int:
    """The ``warnings`` stacklevel, seen from this module's caller, of the first frame outside this package."""
    package = __name__.rpartition(".")[0]
    frame, level = inspect.currentframe(), 0
    while frame is not None and str(frame.f_globals.get("__name__", "")).startswith(package + "."):
        frame, level = frame.f_back, level + 1
    return level


def base_arguments(values: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`FlagFacade` constructor's arguments, picked by name out of a subclass constructor's ``locals()``.

    A subclass keeps its own explicit signature (FlagEmbedding's parameter order, for IDEs and positional
    callers) and forwards what it shares with the base without re-listing it.
    """
    return {name: values[name] for name in BASE_PARAMETERS if name in values}


class FlagFacade:
    """The shared constructor and encode methods, as FlagEmbedding's ``AbsEmbedder`` (1.4.2) has them.

    Differs from ``AbsEmbedder`` as the package docstring says; ``passage_instruction_for_retrieval`` /
    ``passage_instruction_format`` are tembed's (FlagEmbedding only has them when fine-tuning).
    """

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
        self.cache_dir = cache_dir
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
        devices_given = device_list(devices)
        target_device = resolve_device(devices_given[0])
        self._embedder_options = self._options_for_embedder(self._precision(target_device), trust_remote_code)
        several = len(devices_given) > 1
        self.embedder = Embedder(
            model_name_or_path, device=devices_given if several else target_device, **self._embedder_options
        )
        self.target_devices = [str(resolve_device(device)) for device in devices_given]

    def _options_for_embedder(self, precision: str, trust_remote_code: bool | None) -> dict[str, Any]:
        """The options of the ``Embedder`` (and of a pool's workers); the facade applies instructions per call."""
        return dict(
            pooling=self.pooling_method,
            normalize=self.normalize_embeddings,
            query_instruction="",
            passage_instruction="",
            query_max_length=self.query_max_length,
            passage_max_length=self.passage_max_length,
            batch_size=self.batch_size,
            precision=precision,
            truncate_dim=self.truncate_dim,
            trust_remote_code=trust_remote_code,
            outputs=self.OUTPUTS,
            backend="torch",
            cache_dir=self.cache_dir,
        )

    def _precision(self, device: torch.device) -> str:
        """fp16 / bf16 apply on GPUs only: on the CPU FlagEmbedding runs in fp32 too."""
        if device.type == "cpu":
            return "fp32"
        return "bf16" if self.use_bf16 else ("fp16" if self.use_fp16 else "fp32")

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer the model encodes with."""
        return self.embedder.tokenizer.hf

    # ------------------------------------------------------------------------------------------ worker pools
    def start_multi_process_pool(self, target_devices: Any = None) -> Embedder:
        """A warm worker pool on ``target_devices``: an :class:`~tembed.Embedder` over a
        :class:`tembed.pool.EmbedderPool` (one device: no extra process).

        FlagEmbedding passes a worker function here; tembed's workers need none, so a callable is ignored and
        the constructor's devices are used. Stop it with :meth:`stop_multi_process_pool` (or ``pool.close()``).
        """
        devices = self.target_devices if target_devices is None or callable(target_devices) else target_devices
        return Embedder(self.model_name_or_path, device=device_list(devices), **self._embedder_options)

    def encode_multi_process(self, sentences: list[str], pool: Any, **kwargs: Any) -> Any:
        """Encode on a pool from :meth:`start_multi_process_pool`: ``encode`` semantics, results in order."""
        convert_to_numpy = kwargs.pop("convert_to_numpy", None)
        options = {key: kwargs.pop(key) for key in ("batch_size", "max_length") if key in kwargs}
        check_encode_kwargs("encode_multi_process", kwargs)
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

    # ------------------------------------------------------------------------------------------------ encode
    def _encode_options(
        self,
        role: Role,
        batch_size: int | None,
        max_length: int | None,
        instruction: str | None = None,
        instruction_format: str | None = None,
    ) -> dict[str, Any]:
        """``Embedder.encode``'s keyword arguments for ``role``; the per-call values win where given."""
        if role == "query":
            instruction, instruction_format = self.query_instruction_for_retrieval, self.query_instruction_format
        elif role == "passage":
            instruction, instruction_format = self.passage_instruction_for_retrieval, self.passage_instruction_format
        else:
            instruction_format = instruction_format or "{}{}"
        return dict(
            instruction=instruction,
            instruction_format=instruction_format,
            max_length=max_length or (self.query_max_length if role == "query" else self.passage_max_length),
            batch_size=batch_size or self.batch_size,
        )

    def _encode(
        self,
        role: Role,
        texts: str | list[str],
        batch_size: int | None,
        max_length: int | None,
        convert_to_numpy: bool | None,
        instruction: str | None = None,
        instruction_format: str | None = None,
    ) -> np.ndarray | torch.Tensor:
        numpy_out = self.convert_to_numpy if convert_to_numpy is None else convert_to_numpy
        options = self._encode_options(role, batch_size, max_length, instruction, instruction_format)
        return self.embedder.encode(texts, convert_to="numpy" if numpy_out else "torch", **options)

    def encode_queries(
        self,
        queries: list[str] | str,
        batch_size: int | None = None,
        max_length: int | None = None,
        convert_to_numpy: bool | None = None,
        **kwargs: Any,
    ) -> np.ndarray | torch.Tensor:
        """Queries with ``query_instruction_for_retrieval`` applied, truncated at ``query_max_length``."""
        check_encode_kwargs("encode_queries", kwargs)
        return self._encode("query", queries, batch_size, max_length, convert_to_numpy)

    def encode_corpus(
        self,
        corpus: list[str] | str,
        batch_size: int | None = None,
        max_length: int | None = None,
        convert_to_numpy: bool | None = None,
        **kwargs: Any,
    ) -> np.ndarray | torch.Tensor:
        """Passages, with ``passage_instruction_for_retrieval`` if set, truncated at ``passage_max_length``."""
        check_encode_kwargs("encode_corpus", kwargs)
        return self._encode("passage", corpus, batch_size, max_length, convert_to_numpy)

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
        check_encode_kwargs("encode", kwargs)
        return self._encode(
            "text", sentences, batch_size, max_length, convert_to_numpy, instruction, instruction_format
        )

    # ---------------------------------------------------------------------------------------------- lifetime
    def stop_self_pool(self) -> None:
        """Stop the worker pool started for several ``devices`` (nothing to do on one device)."""
        if self.embedder.pool is not None:
            self.embedder.pool.close()

    def close(self) -> None:
        """Release the model."""
        self.embedder.close()

    def __enter__(self: _Facade) -> _Facade:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


BASE_PARAMETERS: tuple[str, ...] = tuple(inspect.signature(FlagFacade.__init__).parameters)[1:]  # all but self
