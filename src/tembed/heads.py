"""Heads: pooling of the last hidden state, and the finishing steps (Matryoshka truncation, L2 norm)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
