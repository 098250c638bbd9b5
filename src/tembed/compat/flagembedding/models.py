"""``FlagModel``, ``FlagLLMModel`` and ``FlagICLModel``: FlagEmbedding's dense embedders on tembed's pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tembed.compat.flagembedding._facade import FlagFacade, base_arguments, check_encode_kwargs
from tembed.text import apply_instruction, check_texts, normalize_format


class FlagModel(FlagFacade):
    """Mirrors ``FlagEmbedding.FlagModel`` (``BaseEmbedder``), the encoder embedder (BGE v1/v1.5, e5, gte, bce).

    Same parameters, order and defaults as FlagEmbedding 1.4.2: ``pooling_method="cls"`` (or ``"mean"``),
    ``normalize_embeddings=True``, ``use_fp16=True``, ``batch_size=256``, ``query_max_length=512``,
    ``passage_max_length=512``, no default instruction. Differs as the package docstring says, and takes
    ``passage_instruction_for_retrieval`` / ``passage_instruction_format`` (tembed's).
    """

    DEFAULT_POOLING_METHOD = "cls"


class FlagLLMModel(FlagFacade):
    """Mirrors ``FlagEmbedding.FlagLLMModel`` (``BaseLLMEmbedder``): decoder-only embedders (e5-mistral, gte-Qwen,
    Qwen3-Embedding, bge-multilingual-gemma2).

    Same positional parameters as FlagEmbedding 1.4.2 (it has no ``pooling_method`` among them); default
    ``query_instruction_format="Instruct: {}\\nQuery: {}"``. Last-token pooling only: ``pooling_method`` is
    keyword-only, and anything but ``"last_token"`` raises ``ValueError``, as in FlagEmbedding. Differs as the
    package docstring says; the passage instruction parameters are tembed's (keyword-only).
    """

    DEFAULT_POOLING_METHOD = "last_token"
    DEFAULT_QUERY_INSTRUCTION_FORMAT = "Instruct: {}\nQuery: {}"

    def __init__(
        self,
        model_name_or_path: str,
        normalize_embeddings: bool = True,
        use_fp16: bool = True,
        use_bf16: bool = False,
        query_instruction_for_retrieval: str | None = None,
        query_instruction_format: str | None = "Instruct: {}\nQuery: {}",
        devices: str | int | Sequence[str | int] | None = None,
        trust_remote_code: bool | None = False,
        cache_dir: str | None = None,
        batch_size: int = 256,
        query_max_length: int = 512,
        passage_max_length: int = 512,
        convert_to_numpy: bool = True,
        truncate_dim: int | None = None,
        *,
        pooling_method: str | None = None,
        passage_instruction_for_retrieval: str | None = None,
        passage_instruction_format: str = "{}{}",
    ) -> None:
        if pooling_method not in (None, "last_token"):
            raise ValueError(
                f"Pooling method {pooling_method} is not supported: {type(self).__name__} pools the last token"
            )
        super().__init__(**base_arguments(locals()))


class FlagICLModel(FlagLLMModel):
    """Mirrors ``FlagEmbedding.FlagICLModel`` (``ICLLLMEmbedder``), the in-context-learning embedder (bge-en-icl).

    Same positional parameters as FlagEmbedding 1.4.2 (``suffix`` before ``devices``). Queries are built as
    FlagEmbedding does: each example formatted with ``examples_instruction_format``
    (``"<instruct>{}\\n<query>{}\\n<response>{}"``), joined by blank lines, then the instructed query (truncated
    to fit ``max_length`` and decoded back to text), then ``suffix`` (``"\\n<response>"``). Passages are encoded
    plainly. Differs as :class:`FlagLLMModel` does.

    Args:
        suffix: appended to every query (default ``"\\n<response>"``).
        examples_for_task: a list of ``{"instruct", "query", "response"}`` dicts, or None.
        examples_instruction_format: template for one example.
    """

    DEFAULT_QUERY_INSTRUCTION_FORMAT = "<instruct>{}\n<query>{}"

    def __init__(
        self,
        model_name_or_path: str,
        normalize_embeddings: bool = True,
        use_fp16: bool = True,
        use_bf16: bool = False,
        query_instruction_for_retrieval: str | None = None,
        query_instruction_format: str | None = "<instruct>{}\n<query>{}",
        suffix: str = "\n<response>",
        devices: str | int | Sequence[str | int] | None = None,
        examples_for_task: list[dict[str, str]] | None = None,
        examples_instruction_format: str = "<instruct>{}\n<query>{}\n<response>{}",
        trust_remote_code: bool | None = False,
        cache_dir: str | None = None,
        batch_size: int = 256,
        query_max_length: int = 512,
        passage_max_length: int = 512,
        convert_to_numpy: bool = True,
        truncate_dim: int | None = None,
        *,
        pooling_method: str | None = None,
        passage_instruction_for_retrieval: str | None = None,
        passage_instruction_format: str = "{}{}",
    ) -> None:
        super().__init__(**base_arguments(locals()))
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
        default_instruction = str(self.query_instruction_for_retrieval)  # None formats as "None" in FlagEmbedding too
        formatted = [
            self.get_detailed_example(
                self.examples_instruction_format,
                example.get("instruct", default_instruction),
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
        check_encode_kwargs("encode_queries", kwargs)
        items, single = check_texts(queries, what="queries")
        max_length = max_length or self.query_max_length
        texts = apply_instruction(items, self.query_instruction_for_retrieval, self.query_instruction_format)
        count = self.embedder.tokenizer.count  # shares the tokenizer's lock with every other encode call
        budget = max_length - count("<s>") - count(f"{self.suffix}</s>")
        prompt_length = (count(self.prefix) + count(self.suffix) + max_length + 8) // 8 * 8 + 8
        truncated = self.embedder.tokenizer.encode(texts, budget, add_special_tokens=False)
        prompts = [self.prefix + text + self.suffix for text in self.tokenizer.batch_decode(truncated)]
        result = self._encode("text", prompts, batch_size, prompt_length, convert_to_numpy)
        return result[0] if single else result
