"""Scheduling and token counting that the pipeline and the server share: padding-aware micro-batches, and
untruncated token counts equal to what the tokenizer's own call gives."""

from __future__ import annotations

import numpy as np
import pytest

from tembed.batching import plan_batches
from tembed.tokenize import TextTokenizer

from realdata import sts_b_sentences


def test_batches_are_sorted_longest_first_and_cover_every_text_once():
    lengths = [5, 40, 12, 40, 7, 30]
    batches = plan_batches(lengths, batch_size=2)
    order = np.concatenate(batches).tolist()
    assert sorted(order) == list(range(6))
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
    assert order[:2] == [1, 3]  # equal lengths keep their input order
    assert all(len(batch) <= 2 for batch in batches)


def test_the_token_budget_counts_padded_tokens():
    batches = plan_batches([100] * 20, batch_size=64, max_batch_tokens=500)
    assert [len(batch) for batch in batches] == [5, 5, 5, 5]
    assert [len(b) for b in plan_batches([1000, 10], batch_size=64, max_batch_tokens=500)] == [1, 1]


def test_a_batch_of_eight_or_more_ends_before_a_text_much_shorter_than_its_longest():
    # 10 texts of 30 tokens then 10 of 10: padding the short ones to 30 would triple their cost.
    lengths = [30] * 10 + [10] * 10
    batches = plan_batches(lengths, batch_size=64)
    assert [len(batch) for batch in batches] == [10, 10]
    # Under 8 texts a batch is never cut for padding (a few short calls cost more than the padding).
    assert [len(b) for b in plan_batches([30] * 3 + [10] * 3, batch_size=64)] == [6]
    # Lengths within 0.8 of the longest stay together.
    assert [len(b) for b in plan_batches([30] * 10 + [24] * 10, batch_size=64)] == [20]


@pytest.mark.parametrize("which", ["minilm", "splade", "m3", "decoder"])
def test_untruncated_lengths_equal_the_tokenizers_own_call(
    which, minilm_path, splade_path, tiny_m3_path, tiny_decoder_paths
):
    path = {"minilm": minilm_path, "splade": splade_path, "m3": tiny_m3_path}.get(which)
    if path is None:
        path = next(iter(tiny_decoder_paths.values()))
    tokenizer = TextTokenizer(path)
    texts = [*sts_b_sentences()[:50], "word " * 700, "ünïcödé テキスト 🤖", " "]
    expected = [len(ids) for ids in tokenizer.encode(texts, 100_000)]
    assert tokenizer.lengths(texts) == expected
    # The shared truncation setting is restored by the next call: truncation still applies.
    assert max(len(ids) for ids in tokenizer.encode(texts, 16)) == 16
    assert tokenizer.lengths(texts) == expected
