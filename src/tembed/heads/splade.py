"""The SPLADE sparse head: term weights from the masked-LM logits."""

from __future__ import annotations

from tembed.heads.base import HeadContext, HeadInput
from tembed.heads.ops import splade_term_weights, vocab_weights_to_dicts


class SpladeHead:
    """Per text ``{token_id: weight}``: ``max over tokens of log1p(relu(logits)) * mask``, weights > 0 only."""

    needs_logits = True

    def __init__(self, context: HeadContext) -> None:
        del context  # nothing to load: the weights come from the model's own masked-LM head

    def run(self, forward: HeadInput) -> list[dict[int, float]]:
        if forward.logits is None:
            raise RuntimeError("the backend returned no masked-LM logits for SPLADE weights")
        return vocab_weights_to_dicts(splade_term_weights(forward.logits, forward.mask))
