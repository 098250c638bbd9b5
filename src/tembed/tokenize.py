"""Tokenization with truncation, and per-batch padding (right or left, as the tokenizer says)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from tembed.backends.base import TokenBatch


class TextTokenizer:
    """A Hugging Face fast tokenizer with the two operations the pipeline needs; safe to call from many threads.

    Args:
        path: the model folder (``tokenizer.json`` / ``tokenizer_config.json``).
        trust_remote_code: allow custom tokenizer code.

    Attributes:
        hf: the ``transformers`` tokenizer.
        pad_id: the id used for padding (the pad token, else EOS, else 0).
        padding_side: ``"right"`` or ``"left"``.
        returns_token_type_ids: whether the model takes ``token_type_ids`` (passed as zeros).
    """

    def __init__(self, path: str, *, trust_remote_code: bool = False) -> None:
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self._lock = threading.Lock()
        pad_id = self.hf.pad_token_id
        if pad_id is None:
            pad_id = self.hf.eos_token_id
        self.pad_id = int(pad_id) if pad_id is not None else 0
        self.padding_side = self.hf.padding_side
        self.returns_token_type_ids = "token_type_ids" in self.hf.model_input_names

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_lock"]  # a lock cannot be pickled: a copy gets its own
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def count(self, text: str) -> int:
        """The number of tokens of ``text`` without special tokens and without truncation."""
        with self._lock:  # an untruncated call resets the shared truncation setting too
            return len(self.hf(text, add_special_tokens=False, truncation=False)["input_ids"])

    def lengths(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text with special tokens, untruncated: what :meth:`encode` gives before truncation (the fast
        tokenizer's Rust encoder directly, about half the cost of the Python call for one short text)."""
        if not texts:
            return []
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is None:  # a slow tokenizer
            return [len(ids) for ids in self.encode(texts, 1 << 30)]
        with self._lock:  # transformers sets truncation and padding again on its next call
            backend.no_truncation()
            backend.no_padding()
            encodings = backend.encode_batch(list(texts), add_special_tokens=True)
        return [len(encoding.ids) for encoding in encodings]

    def special_ids_without_weight(self) -> set[int]:
        """Token ids that never get a sparse weight: CLS, EOS, PAD and UNK, as BGE-M3 does."""
        ids = (self.hf.cls_token_id, self.hf.eos_token_id, self.hf.pad_token_id, self.hf.unk_token_id)
        return {int(token) for token in ids if token is not None}

    @property
    def model_max_length(self) -> int | None:
        """The tokenizer's declared limit, or None when it declares none."""
        value = getattr(self.hf, "model_max_length", None)
        return int(value) if value and value < 1_000_000 else None

    def encode(self, texts: Sequence[str], max_length: int, *, add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids per text, truncated to ``max_length`` tokens (special tokens included), unpadded."""
        if not texts:
            return []
        # A fast tokenizer keeps its truncation settings in shared state that each call sets and then reads: two
        # threads with different max_length would truncate with each other's length (or fail with "Already
        # borrowed"). One call at a time; the Rust side still uses its own threads within a batch.
        with self._lock:
            encoded = self.hf(
                list(texts),
                truncation=True,
                max_length=max_length,
                padding=False,
                add_special_tokens=add_special_tokens,
                return_attention_mask=False,
                return_token_type_ids=False,
            )
        return encoded["input_ids"]

    def pad(self, sequences: Sequence[Sequence[int]]) -> TokenBatch:
        """Pad a batch to its longest sequence, on the tokenizer's padding side."""
        longest = max(len(ids) for ids in sequences)
        input_ids = np.full((len(sequences), longest), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(sequences), longest), dtype=np.int64)
        for row, ids in enumerate(sequences):
            if self.padding_side == "left":
                input_ids[row, longest - len(ids) :] = ids
                attention_mask[row, longest - len(ids) :] = 1
            else:
                input_ids[row, : len(ids)] = ids
                attention_mask[row, : len(ids)] = 1
        token_type_ids = np.zeros_like(input_ids) if self.returns_token_type_ids else None
        return TokenBatch(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)

    def decode(self, sequences: Sequence[Sequence[int]], *, skip_special_tokens: bool = True) -> list[str]:
        """The text of each token-id sequence (ids must be inside the vocabulary)."""
        with self._lock:
            return [str(self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)) for ids in sequences]

    def tokens(self, text: str, *, add_special_tokens: bool = True) -> list[tuple[int, str, bool, int, int]]:
        """``(id, text, special, start, stop)`` per token of ``text``, untruncated; ``start`` / ``stop`` are
        character offsets into ``text`` and ``text`` the token's piece of it (the token string for a special
        token)."""
        with self._lock:
            encoded = self.hf(
                text,
                add_special_tokens=add_special_tokens,
                truncation=False,
                return_offsets_mapping=True,
                return_special_tokens_mask=True,
            )
            pieces = self.hf.convert_ids_to_tokens(encoded["input_ids"])
        result = []
        for token, piece, special, (start, stop) in zip(
            encoded["input_ids"], pieces, encoded["special_tokens_mask"], encoded["offset_mapping"], strict=True
        ):
            result.append((int(token), piece if special else text[start:stop], bool(special), int(start), int(stop)))
        return result
