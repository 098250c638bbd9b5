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

OUTPUT_NAMES: tuple[str, ...] = ("dense", "sparse", "colbert")
# FlagEmbedding's BGEM3FlagModel keys.
REFERENCE_KEYS: dict[str, str] = {"dense_vecs": "dense", "lexical_weights": "sparse", "colbert_vecs": "colbert"}

SparseVector = dict[int, float]


@dataclass
class EncodeOutputs:
    """The outputs of one encode call, in the caller's order; an output not asked for is None.

    Also readable with FlagEmbedding's keys: ``result["dense_vecs"]``, ``result["lexical_weights"]``,
    ``result["colbert_vecs"]`` (the sparse weights keep int keys here; the FlagEmbedding facade converts).

    Attributes:
        dense: ``(n, dim)`` float32, or ``(dim,)`` for a single string.
        sparse: a list of ``{token_id: weight}`` dicts, or one dict for a single string.
        colbert: a list of ``(n_tokens, dim)`` float32 arrays, or one array for a single string.
    """

    dense: np.ndarray | None = None
    sparse: list[SparseVector] | SparseVector | None = None
    colbert: list[np.ndarray] | np.ndarray | None = None

    def __getitem__(self, key: str) -> Any:
        name = REFERENCE_KEYS.get(key, key)
        if name not in OUTPUT_NAMES:
            raise KeyError(key)
        return getattr(self, name)

    def keys(self) -> Iterator[str]:
        """FlagEmbedding's keys, as its M3 ``encode`` returns them."""
        return iter(REFERENCE_KEYS)

    def __len__(self) -> int:
        for name in OUTPUT_NAMES:
            value = getattr(self, name)
            if value is not None:
                return 1 if isinstance(value, dict) or (name == "dense" and value.ndim == 1) else len(value)
        return 0

    def first(self) -> EncodeOutputs:
        """The outputs of the first text (for a single-string input)."""
        return EncodeOutputs(
            dense=None if self.dense is None else self.dense[0],
            sparse=None if self.sparse is None else self.sparse[0],  # type: ignore[index]
            colbert=None if self.colbert is None else self.colbert[0],  # type: ignore[index]
        )

    def take(self, indices: Sequence[int] | np.ndarray) -> EncodeOutputs:
        """The outputs of the texts at ``indices``, in that order."""
        order = np.asarray(indices, dtype=np.int64)
        return EncodeOutputs(
            dense=None if self.dense is None else self.dense[order],
            sparse=None if self.sparse is None else [self.sparse[i] for i in order.tolist()],  # type: ignore[index]
            colbert=None if self.colbert is None else [self.colbert[i] for i in order.tolist()],  # type: ignore[index]
        )

    @classmethod
    def concatenate(cls, parts: Sequence[EncodeOutputs]) -> EncodeOutputs:
        """Join the outputs of consecutive chunks (lists of texts, not single strings)."""
        if not parts:
            return cls()
        merged = cls()
        if parts[0].dense is not None:
            merged.dense = np.concatenate([p.dense for p in parts], axis=0)  # type: ignore[misc]
        if parts[0].sparse is not None:
            merged.sparse = [vector for p in parts for vector in p.sparse]  # type: ignore[union-attr]
        if parts[0].colbert is not None:
            merged.colbert = [matrix for p in parts for matrix in p.colbert]  # type: ignore[union-attr]
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
