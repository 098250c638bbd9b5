"""``BGEM3FlagModel``: FlagEmbedding's BGE-M3 class on tembed's pipeline (dense, sparse, ColBERT in one pass).

Same constructor, ``encode`` / ``encode_queries`` / ``encode_corpus`` (a dict with ``dense_vecs``,
``lexical_weights``, ``colbert_vecs``), ``compute_score``, ``compute_lexical_matching_score``,
``colbert_score`` and ``convert_id_to_token`` as FlagEmbedding 1.4.2; with ``use_fp16=False`` on the CPU the
outputs are the same within 1e-5 (tested against FlagEmbedding itself). Lexical weights use FlagEmbedding's
string token-id keys here, with python float values (JSON-serializable); ``tembed.Embedder`` gives int keys.

Deliberate differences besides those of :mod:`tembed.compat.flagembedding`:

* missing ``colbert_linear.pt`` / ``sparse_linear.pt`` is an error, not random heads (pass
  ``return_sparse``/``return_colbert_vecs`` only with a complete model);
* ``compute_score`` encodes queries and passages length-sorted in token-budget batches; its ColBERT score is
  exactly ``colbert_score`` (FlagEmbedding's padded computation clips a query token's best similarity at 0 for
  passages shorter than the longest in their batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tembed.compat.flagembedding._facade import FlagFacade, Role, base_arguments, check_encode_kwargs
from tembed.outputs import EncodeOutputs
from tembed.scoring import colbert_score, lexical_scores

_IGNORED = ("convert_to_numpy",)  # FlagEmbedding's M3 ignores it too: outputs are numpy

Returns = tuple[bool | None, bool | None, bool | None]
"""A call's ``(return_dense, return_sparse, return_colbert_vecs)``; None takes the constructor's."""


class BGEM3FlagModel(FlagFacade):
    """Mirrors ``FlagEmbedding.BGEM3FlagModel`` (``M3Embedder``): same parameters, order and defaults.

    Differs as the module and package docstrings say; ``convert_to_numpy`` is accepted and ignored, as in
    FlagEmbedding (outputs are numpy), and the passage instruction parameters are tembed's.

    Args (beyond ``FlagModel``'s):
        colbert_dim: -1 (the default) takes the ColBERT width from ``colbert_linear.pt``; a positive value must
            match it.
        return_dense, return_sparse, return_colbert_vecs: the defaults for ``encode`` calls (dense only).
    """

    DEFAULT_POOLING_METHOD = "cls"
    OUTPUTS = ("dense", "sparse", "colbert")

    def __init__(
        self,
        model_name_or_path: str,
        normalize_embeddings: bool = True,
        use_fp16: bool = True,
        use_bf16: bool = False,
        query_instruction_for_retrieval: str | None = None,
        query_instruction_format: str = "{}{}",
        devices: str | int | Sequence[str | int] | None = None,
        pooling_method: str = "cls",
        trust_remote_code: bool | None = False,
        cache_dir: str | None = None,
        colbert_dim: int = -1,
        batch_size: int = 256,
        query_max_length: int = 512,
        passage_max_length: int = 512,
        return_dense: bool = True,
        return_sparse: bool = False,
        return_colbert_vecs: bool = False,
        truncate_dim: int | None = None,
        passage_instruction_for_retrieval: str | None = None,
        passage_instruction_format: str = "{}{}",
        **kwargs: Any,
    ) -> None:
        kwargs.pop("convert_to_numpy", None)  # FlagEmbedding's M3 ignores it too: outputs are numpy
        if kwargs:
            raise TypeError(f"BGEM3FlagModel() got unexpected keyword argument(s): {', '.join(sorted(kwargs))}")
        super().__init__(**base_arguments(locals()))
        actual = self.embedder.settings_.colbert_dim
        if colbert_dim > 0 and truncate_dim is None and actual is not None and actual != colbert_dim:
            raise ValueError(f"colbert_dim={colbert_dim} but colbert_linear.pt has {actual} outputs")
        self.return_dense = return_dense
        self.return_sparse = return_sparse
        self.return_colbert_vecs = return_colbert_vecs

    # ------------------------------------------------------------------------------------------------ encode
    def _encode_m3(
        self,
        role: Role,
        texts: str | list[str],
        batch_size: int | None,
        max_length: int | None,
        returns: Returns,
        instruction: str | None = None,
        instruction_format: str | None = None,
    ) -> dict[str, Any]:
        defaults = (self.return_dense, self.return_sparse, self.return_colbert_vecs)
        wanted = [default if given is None else given for given, default in zip(returns, defaults, strict=True)]
        names = tuple(name for name, on in zip(self.OUTPUTS, wanted, strict=True) if on)
        if not names:
            raise ValueError("Must choose one or more from `return_colbert_vecs`, `return_sparse`, `return_dense`")
        options = self._encode_options(role, batch_size, max_length, instruction, instruction_format)
        result: EncodeOutputs = self.embedder.encode(texts, outputs=names, **options)
        sparse = result.sparse
        lexical: dict[str, float] | list[dict[str, float]] | None = None
        if isinstance(sparse, dict):
            lexical = _str_keys(sparse)
        elif sparse is not None:
            lexical = [_str_keys(item) for item in sparse]
        return {"dense_vecs": result.dense, "lexical_weights": lexical, "colbert_vecs": result.colbert}

    def encode(  # type: ignore[override]
        self,
        sentences: list[str] | str,
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool | None = None,
        return_sparse: bool | None = None,
        return_colbert_vecs: bool | None = None,
        instruction: str | None = None,
        instruction_format: str | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """``{"dense_vecs", "lexical_weights", "colbert_vecs"}`` for any texts; unrequested outputs are None."""
        check_encode_kwargs("encode", kwargs, _IGNORED)
        returns = (return_dense, return_sparse, return_colbert_vecs)
        return self._encode_m3("text", sentences, batch_size, max_length, returns, instruction, instruction_format)

    def encode_queries(  # type: ignore[override]
        self,
        queries: list[str] | str,
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool | None = None,
        return_sparse: bool | None = None,
        return_colbert_vecs: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Queries (instruction applied, ``query_max_length``), all requested outputs."""
        check_encode_kwargs("encode_queries", kwargs, _IGNORED)
        returns = (return_dense, return_sparse, return_colbert_vecs)
        return self._encode_m3("query", queries, batch_size, max_length, returns)

    def encode_corpus(  # type: ignore[override]
        self,
        corpus: list[str] | str,
        batch_size: int | None = None,
        max_length: int | None = None,
        return_dense: bool | None = None,
        return_sparse: bool | None = None,
        return_colbert_vecs: bool | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Passages (passage instruction if set, ``passage_max_length``), all requested outputs."""
        check_encode_kwargs("encode_corpus", kwargs, _IGNORED)
        returns = (return_dense, return_sparse, return_colbert_vecs)
        return self._encode_m3("passage", corpus, batch_size, max_length, returns)

    # ------------------------------------------------------------------------------------------------ scores
    def compute_score(
        self,
        sentence_pairs: list[tuple[str, str]] | tuple[str, str],
        batch_size: int | None = None,
        max_query_length: int | None = None,
        max_passage_length: int | None = None,
        weights_for_different_modes: list[float] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any] | list:
        """Scores of (query, passage) pairs: colbert, sparse, dense, sparse+dense, colbert+sparse+dense."""
        check_encode_kwargs("compute_score", kwargs)
        if isinstance(sentence_pairs, list) and not sentence_pairs:
            return []
        weights = weights_for_different_modes if weights_for_different_modes is not None else (1.0, 1.0, 1.0)
        if len(weights) != 3:
            raise ValueError("weights_for_different_modes must have 3 values: dense, sparse, colbert")
        return self.embedder.compute_score(
            sentence_pairs,
            weights=weights,
            max_query_length=max_query_length or self.query_max_length,
            max_passage_length=max_passage_length or self.passage_max_length,
            batch_size=batch_size or self.batch_size,
        )

    @staticmethod
    def compute_lexical_matching_score(lexical_weights_1: Any, lexical_weights_2: Any) -> float | np.ndarray:
        """dict x dict: ``sum of w1[t] * w2[t]`` over shared tokens; list x list: a matrix."""
        return lexical_scores(lexical_weights_1, lexical_weights_2)

    @staticmethod
    def colbert_score(q_reps: np.ndarray, p_reps: np.ndarray) -> torch.Tensor:
        """Mean over query vectors of the best dot product; a 0-dim tensor, as FlagEmbedding returns."""
        return torch.tensor(colbert_score(q_reps, p_reps), dtype=torch.float32)

    def convert_id_to_token(self, lexical_weights: dict | list[dict]) -> dict | list[dict]:
        """Token text -> weight; a dict or a one-element list gives a dict, as FlagEmbedding does."""
        items = [lexical_weights] if isinstance(lexical_weights, dict) else list(lexical_weights)
        decode = self.tokenizer.decode
        converted = [{decode([int(token)]): weight for token, weight in item.items()} for item in items]
        return converted[0] if len(converted) == 1 else converted


def _str_keys(vector: dict[int, float]) -> dict[str, float]:
    """A sparse vector with FlagEmbedding's string token-id keys."""
    return {str(token): weight for token, weight in vector.items()}
