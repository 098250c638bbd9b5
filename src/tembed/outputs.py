"""What an encode call returns when it asks for several outputs, and the sparse-vector helpers.

Outputs:

* ``dense``: ``(n, dim)`` float32 (``(dim,)`` for one string);
* ``sparse``: per text a ``dict`` token id (int) -> weight (python float), only weights > 0;
* ``colbert``: per text a ``(n_tokens, dim)`` float32 array (BGE-M3: CLS dropped, EOS kept, L2-normalized).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tembed.types import OUTPUT_NAMES

# FlagEmbedding's BGEM3FlagModel keys.
REFERENCE_KEYS: dict[str, str] = {"dense_vecs": "dense", "lexical_weights": "sparse", "colbert_vecs": "colbert"}

SparseVector = dict[int, float]


class _ReferenceKeys:
    """Item access by output name or by FlagEmbedding's M3 keys (``dense_vecs``, ``lexical_weights``,
    ``colbert_vecs``)."""

    def __getitem__(self, key: str) -> Any:
        name = REFERENCE_KEYS.get(key, key)
        if name not in OUTPUT_NAMES:
            raise KeyError(key)
        return getattr(self, name)

    def keys(self) -> Iterator[str]:
        """FlagEmbedding's keys, as its M3 ``encode`` returns them."""
        return iter(REFERENCE_KEYS)


@dataclass
class TextOutputs(_ReferenceKeys):
    """The outputs of a single text (an encode call given one string); an output not asked for is None.

    Attributes:
        dense: ``(dim,)`` float32.
        sparse: ``{token_id: weight}``.
        colbert: ``(n_tokens, dim)`` float32.
        token_count: the text's tokens as encoded (instruction and special tokens included, after truncation).
    """

    dense: np.ndarray | None = None
    sparse: SparseVector | None = None
    colbert: np.ndarray | None = None
    token_count: int | None = None


@dataclass
class EncodeOutputs(_ReferenceKeys):
    """The outputs of one encode call over a list of texts, in the caller's order; an output not asked for is
    None.

    Also readable with FlagEmbedding's keys: ``result["dense_vecs"]``, ``result["lexical_weights"]``,
    ``result["colbert_vecs"]`` (the sparse weights keep int keys here; the FlagEmbedding facade converts).

    Attributes:
        dense: ``(n, dim)`` float32.
        sparse: a list of ``{token_id: weight}`` dicts.
        colbert: a list of ``(n_tokens, dim)`` float32 arrays.
        token_counts: ``(n,)`` int64, the tokens of each text as encoded (instruction and special tokens
            included, after truncation); None where not known.
    """

    dense: np.ndarray | None = None
    sparse: list[SparseVector] | None = None
    colbert: list[np.ndarray] | None = None
    token_counts: np.ndarray | None = None

    def __len__(self) -> int:
        for name in ("dense", "sparse", "colbert", "token_counts"):
            value = getattr(self, name)
            if value is not None:
                return len(value)
        return 0

    def first(self) -> TextOutputs:
        """The outputs of the first text (for a single-string input)."""
        return TextOutputs(
            dense=None if self.dense is None else self.dense[0],
            sparse=None if self.sparse is None else self.sparse[0],
            colbert=None if self.colbert is None else self.colbert[0],
            token_count=None if self.token_counts is None else int(self.token_counts[0]),
        )

    def take(self, indices: Sequence[int] | np.ndarray) -> EncodeOutputs:
        """The outputs of the texts at ``indices``, in that order."""
        order = np.asarray(indices, dtype=np.int64)
        positions = order.tolist()
        return EncodeOutputs(
            dense=None if self.dense is None else self.dense[order],
            sparse=None if self.sparse is None else [self.sparse[i] for i in positions],
            colbert=None if self.colbert is None else [self.colbert[i] for i in positions],
            token_counts=None if self.token_counts is None else self.token_counts[order],
        )

    @classmethod
    def concatenate(cls, parts: Sequence[EncodeOutputs]) -> EncodeOutputs:
        """Join the outputs of consecutive chunks; an output is kept only when every part has it."""
        merged = cls()
        if not parts:
            return merged
        dense = [p.dense for p in parts if p.dense is not None]
        sparse = [p.sparse for p in parts if p.sparse is not None]
        colbert = [p.colbert for p in parts if p.colbert is not None]
        counts = [p.token_counts for p in parts if p.token_counts is not None]
        if len(dense) == len(parts):
            merged.dense = np.concatenate(dense, axis=0)
        if len(sparse) == len(parts):
            merged.sparse = [vector for part in sparse for vector in part]
        if len(colbert) == len(parts):
            merged.colbert = [matrix for part in colbert for matrix in part]
        if len(counts) == len(parts):
            merged.token_counts = np.concatenate(counts)
        return merged


def sparse_to_arrays(vector: SparseVector) -> tuple[np.ndarray, np.ndarray]:
    """``(indices int64, values float32)`` of one sparse vector, indices ascending (for Qdrant, Milvus, ...)."""
    indices = np.fromiter(sorted(vector), dtype=np.int64, count=len(vector))
    values = np.fromiter((vector[i] for i in indices.tolist()), dtype=np.float32, count=len(vector))
    return indices, values


def sparse_to_csr(vectors: Sequence[SparseVector], vocab_size: int) -> Any:
    """A ``scipy.sparse.csr_matrix`` of shape ``(len(vectors), vocab_size)``, float32 (needs scipy)."""
    try:
        from scipy.sparse import csr_matrix
    except ImportError as error:  # pragma: no cover - scipy is optional
        raise ImportError("sparse_to_csr needs scipy: pip install scipy") from error
    indptr = np.zeros(len(vectors) + 1, dtype=np.int64)
    all_indices, all_values = [], []
    for row, vector in enumerate(vectors):
        indices, values = sparse_to_arrays(vector)
        if len(indices) and indices[-1] >= vocab_size:
            raise ValueError(f"vectors[{row}] has token id {int(indices[-1])} >= vocab_size {vocab_size}")
        all_indices.append(indices)
        all_values.append(values)
        indptr[row + 1] = indptr[row] + len(indices)
    indices = np.concatenate(all_indices) if all_indices else np.zeros(0, dtype=np.int64)
    values = np.concatenate(all_values) if all_values else np.zeros(0, dtype=np.float32)
    return csr_matrix((values, indices, indptr), shape=(len(vectors), vocab_size), dtype=np.float32)


def sparse_top_k(vector: SparseVector, k: int) -> SparseVector:
    """The ``k`` largest weights of a sparse vector (ties broken by the smaller token id)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    kept = sorted(vector.items(), key=lambda item: (-item[1], item[0]))[:k]
    return dict(kept)
