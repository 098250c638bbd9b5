"""The math of the heads: pooling, finishing (Matryoshka truncation, L2 norm), BGE-M3 and SPLADE weights, ColBERT."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tembed.models.architecture import M3_COLBERT_FILE, M3_SPARSE_FILE


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, method: str) -> torch.Tensor:
    """One vector per text.

    Args:
        hidden: (batch, seq, hidden) last hidden state.
        attention_mask: (batch, seq), 1 for real tokens.
        method: ``"cls"`` (first token), ``"mean"`` (masked mean) or ``"last_token"`` (the last real token,
            with left or right padding).

    Returns:
        (batch, hidden) in float32.
    """
    if method == "cls":
        return hidden[:, 0].float()
    if method == "mean":
        mask = attention_mask.unsqueeze(-1).float()
        return (hidden.float() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    if method == "last_token":
        left_padded = bool((attention_mask[:, -1].sum() == attention_mask.shape[0]).item())
        if left_padded:
            return hidden[:, -1].float()
        last = attention_mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
    raise ValueError(f"pooling must be one of cls, mean, last_token; got {method!r}")


def finish(vectors: torch.Tensor, *, truncate_dim: int | None, normalize: bool) -> torch.Tensor:
    """Keep the first ``truncate_dim`` dimensions, then L2-normalize (eps 1e-12) if asked."""
    if truncate_dim is not None:
        vectors = vectors[..., :truncate_dim]
    if normalize:
        vectors = F.normalize(vectors, p=2, dim=-1)
    return vectors


# --------------------------------------------------------------------------------------------- BGE-M3 heads


class MissingHeadError(FileNotFoundError):
    """A model that should have BGE-M3 heads lacks their files."""


class M3Heads(torch.nn.Module):
    """BGE-M3's two extra heads, loaded from the model folder (never randomly initialized).

    * ``sparse_linear``: ``Linear(hidden, 1)``; token weight = ``relu(sparse_linear(h_t))``.
    * ``colbert_linear``: ``Linear(hidden, colbert_dim)``; vectors for every token after the first.
    """

    def __init__(self, sparse_linear: torch.nn.Linear, colbert_linear: torch.nn.Linear) -> None:
        super().__init__()
        self.sparse_linear = sparse_linear
        self.colbert_linear = colbert_linear

    @classmethod
    def load(cls, folder: str, *, device: torch.device, dtype: torch.dtype) -> M3Heads:
        """Load ``colbert_linear.pt`` and ``sparse_linear.pt`` (torch state dicts, ``weights_only``)."""
        import os

        linears = []
        for name in (M3_SPARSE_FILE, M3_COLBERT_FILE):
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                raise MissingHeadError(
                    f"{path} is missing: this BGE-M3-style model needs {M3_SPARSE_FILE} and {M3_COLBERT_FILE} for "
                    "sparse and ColBERT outputs (tembed never uses random heads). To use its dense vectors only, "
                    "pass outputs=('dense',) to Embedder."
                )
            state = torch.load(path, map_location="cpu", weights_only=True)
            out_features, in_features = state["weight"].shape
            linear = torch.nn.Linear(in_features, out_features, bias="bias" in state)
            linear.load_state_dict(state)
            linears.append(linear)
        return cls(*linears).to(device=device, dtype=dtype).eval()

    @property
    def colbert_dim(self) -> int:
        return int(self.colbert_linear.out_features)


def m3_token_weights(hidden: torch.Tensor, heads: M3Heads) -> torch.Tensor:
    """``relu(sparse_linear(h))`` per token: (batch, seq) float32."""
    with torch.inference_mode():
        return torch.relu(heads.sparse_linear(hidden)).squeeze(-1).float()


def splade_term_weights(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """SPLADE: ``max over tokens of log1p(relu(logits)) * mask``: (batch, vocab) float32."""
    with torch.inference_mode():
        weights = torch.log1p(torch.relu(logits.float())) * attention_mask.unsqueeze(-1).float()
        return weights.max(dim=1).values


def token_weights_to_dicts(
    weights: torch.Tensor, input_ids: torch.Tensor, excluded_ids: set[int]
) -> list[dict[int, float]]:
    """Per text ``{token_id: max weight over its occurrences}``, weights > 0 only, ``excluded_ids`` dropped."""
    result = []
    for row_weights, row_ids in zip(weights.cpu().tolist(), input_ids.cpu().tolist(), strict=True):
        vector: dict[int, float] = {}
        for weight, token in zip(row_weights, row_ids, strict=True):
            if weight > 0 and token not in excluded_ids and weight > vector.get(token, 0.0):
                vector[token] = weight
        result.append(vector)
    return result


def vocab_weights_to_dicts(weights: torch.Tensor) -> list[dict[int, float]]:
    """Per text ``{token_id: weight}`` for the non-zero entries of a (batch, vocab) matrix."""
    result = []
    for row in weights.cpu():
        indices = torch.nonzero(row > 0).squeeze(-1)
        result.append(dict(zip(indices.tolist(), row[indices].tolist(), strict=True)))
    return result


def colbert_vectors(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    heads: M3Heads,
    *,
    truncate_dim: int | None,
    normalize: bool,
) -> list:
    """BGE-M3 ColBERT vectors per text: ``colbert_linear`` on every real token but the first (CLS), EOS kept.

    Returns:
        A list of ``(n_real_tokens - 1, colbert_dim)`` float32 numpy arrays.
    """
    with torch.inference_mode():
        vectors = heads.colbert_linear(hidden).float()
        vectors = finish(vectors, truncate_dim=truncate_dim, normalize=normalize)
    vectors = vectors.cpu().numpy()
    lengths = attention_mask.sum(dim=1).cpu().tolist()
    left_padded = bool((attention_mask[:, -1] == 1).all().item()) and not bool((attention_mask[:, 0] == 1).all())
    seq = attention_mask.shape[1]
    result = []
    for row, length in enumerate(lengths):
        start = seq - length if left_padded else 0
        result.append(vectors[row, start + 1 : start + length].copy())
    return result
