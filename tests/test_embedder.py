"""Embedder behaviour: shapes, instructions, order, batching invariance, errors, lifetime."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from tembed import Embedder, EncodeOutOfMemoryError

from realdata import insuranceqa_answers, sts_b_sentences

INSTRUCTION = "Represent this sentence for searching relevant passages: "


def test_shapes_and_dtypes(minilm):
    assert minilm.encode("hello world").shape == (384,)
    assert minilm.encode(["a", "b", "c"]).shape == (3, 384)
    empty = minilm.encode([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32
    assert minilm.encode(("a", "b")).dtype == np.float32
    tensor = minilm.encode(["a", "b"], convert_to="torch")
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32 and tensor.shape == (2, 384)
    assert minilm.embedding_dim == 384
    assert minilm.max_seq_length == 512  # the model's position embeddings
    np.testing.assert_allclose(np.linalg.norm(minilm.encode(["x", "a longer text"]), axis=1), 1.0, atol=1e-6)


def test_hello_world_matches_the_recorded_reference_value(minilm):
    # transformers + mean pooling + L2 norm, recorded in shared/reference/offline-models-and-data.md
    np.testing.assert_allclose(
        minilm.encode("hello world")[:5], [-0.034477, 0.031023, 0.006735, 0.026109, -0.039362], atol=2e-6
    )


def test_instruction_goes_on_queries_only(minilm_path):
    texts = sts_b_sentences("test")[:20]
    with Embedder(minilm_path, device="cpu", query_instruction=INSTRUCTION) as embedder:
        queries = embedder.encode_queries(texts)
        passages = embedder.encode_corpus(texts)
        plain = embedder.encode(texts)
        by_hand = embedder.encode([INSTRUCTION + t for t in texts])
    np.testing.assert_allclose(queries, by_hand, atol=1e-6)
    np.testing.assert_allclose(passages, plain, atol=1e-6)
    assert np.abs(queries - passages).max() > 1e-2


def test_explicit_instruction_and_format_with_literal_newline(minilm):
    texts = ["where is the cat", "tax on a used car"]
    formatted = minilm.encode(texts, instruction="Find answers", instruction_format="Instruct: {}\\nQuery: {}")
    by_hand = minilm.encode([f"Instruct: Find answers\nQuery: {t}" for t in texts])
    np.testing.assert_allclose(formatted, by_hand, atol=1e-6)
    with pytest.raises(ValueError, match="two positional slots"):
        minilm.encode(texts, instruction="x", instruction_format="{0}{1}{2}")


def test_passage_instruction(minilm_path):
    with Embedder(minilm_path, device="cpu", passage_instruction="passage: ") as embedder:
        np.testing.assert_allclose(
            embedder.encode_corpus(["a red car"]), embedder.encode(["passage: a red car"]), atol=1e-6
        )
        np.testing.assert_allclose(embedder.encode_queries(["a red car"]), embedder.encode(["a red car"]), atol=1e-6)


def test_order_is_kept_with_mixed_lengths(minilm):
    texts = sts_b_sentences("test")[:30] + insuranceqa_answers()[:30]
    rng = np.random.default_rng(0)
    texts = [texts[i] for i in rng.permutation(len(texts))]
    together = minilm.encode(texts)
    one_by_one = np.stack([minilm.encode(t) for t in texts])
    assert np.abs(together - one_by_one).max() <= 1e-5


@pytest.mark.parametrize(("batch_size", "max_batch_tokens"), [(1, None), (7, None), (256, 512), (64, 100_000)])
def test_batching_does_not_change_vectors(minilm_path, batch_size, max_batch_tokens):
    texts = sts_b_sentences("dev")[:80] + insuranceqa_answers()[100:140]
    with Embedder(minilm_path, device="cpu", batch_size=32) as baseline:
        expected = baseline.encode(texts)
    with Embedder(minilm_path, device="cpu", batch_size=batch_size, max_batch_tokens=max_batch_tokens) as other:
        assert np.abs(other.encode(texts) - expected).max() <= 1e-5


def test_max_batch_tokens_caps_padded_tokens(minilm_path, monkeypatch):
    texts = sts_b_sentences("dev")[:50] + insuranceqa_answers()[:50]
    with Embedder(minilm_path, device="cpu", max_batch_tokens=1024) as embedder:
        seen = []
        forward = embedder.backend.forward

        def spy(batch, **kwargs):
            seen.append(batch.input_ids.shape)
            return forward(batch, **kwargs)

        monkeypatch.setattr(embedder.backend, "forward", spy)
        embedder.encode(texts)
    assert all(rows * cols <= 1024 for rows, cols in seen)
    assert sum(rows for rows, _ in seen) == len(texts)
    assert max(rows for rows, _ in seen) > 20  # short texts still fill batches


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (None, TypeError, "got None"),
        (42, TypeError, "got int"),
        (b"bytes", TypeError, "got bytes"),
        (["fine", None], TypeError, r"texts\[1\] must be a str, got NoneType"),
        (["fine", "ok", 3.5], TypeError, r"texts\[2\] must be a str, got float"),
    ],
)
def test_bad_input_names_the_item(minilm, bad, error, match):
    with pytest.raises(error, match=match):
        minilm.encode(bad)


def test_bad_query_input_names_queries(minilm):
    with pytest.raises(TypeError, match=r"queries\[0\]"):
        minilm.encode_queries([1])


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"max_length": -1}, {"convert_to": "list"}])
def test_bad_call_options(minilm, kwargs):
    with pytest.raises(ValueError):
        minilm.encode(["a"], **kwargs)


def test_max_length_beyond_the_model_is_clamped_with_a_warning(minilm):
    long_text = insuranceqa_answers()[0] * 20
    with pytest.warns(UserWarning, match="exceeds the model's limit of 512"):
        clamped = minilm.encode(long_text, max_length=4096)
    np.testing.assert_allclose(clamped, minilm.encode(long_text, max_length=512), atol=1e-6)


def test_max_length_truncates(minilm):
    text = insuranceqa_answers()[3]
    np.testing.assert_allclose(
        minilm.encode(text, max_length=16),
        minilm.encode(minilm.tokenizer.hf.decode(minilm.tokenizer.encode([text], 16)[0][1:-1])),
        atol=1e-5,
    )
    assert np.abs(minilm.encode(text, max_length=16) - minilm.encode(text, max_length=128)).max() > 1e-3


def test_truncate_dim_then_normalize(minilm_path, minilm):
    texts = ["a cat sat on the mat", "stock markets fell"]
    with Embedder(minilm_path, device="cpu", truncate_dim=128) as small:
        assert small.embedding_dim == 128
        vectors = small.encode(texts)
    full = minilm.encode(texts)
    with Embedder(minilm_path, device="cpu", normalize=False) as raw:
        unnormalized = raw.encode(texts)
    expected = unnormalized[:, :128] / np.linalg.norm(unnormalized[:, :128], axis=1, keepdims=True)
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    assert np.abs(vectors - full[:, :128]).max() > 1e-3
    with pytest.raises(ValueError, match="truncate_dim"):
        Embedder(minilm_path, device="cpu", truncate_dim=1000)


def test_oom_shrinks_the_batch_and_keeps_results(minilm_path, monkeypatch):
    texts = sts_b_sentences("test")[:200]
    with Embedder(minilm_path, device="cpu") as embedder:
        expected = embedder.encode(texts)
        forward = embedder.backend.forward

        def limited(batch, **kwargs):
            if batch.padded_tokens > 600:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return forward(batch, **kwargs)

        monkeypatch.setattr(embedder.backend, "forward", limited)
        with pytest.warns(RuntimeWarning, match="out of memory"):
            result = embedder.encode(texts)
        assert np.abs(result - expected).max() <= 1e-5
        assert embedder.pipeline.token_budget_after_oom is not None
        assert embedder.pipeline.token_budget_after_oom <= 600 * 2
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the remembered budget avoids new OOMs on the next call
            embedder.encode(texts)


def test_oom_on_a_single_text_is_a_clear_error(minilm_path, monkeypatch):
    with Embedder(minilm_path, device="cpu") as embedder:

        def always_oom(batch, **kwargs):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

        monkeypatch.setattr(embedder.backend, "forward", always_oom)
        with pytest.raises(EncodeOutOfMemoryError, match="single text of"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            embedder.encode(["one", "two", "three"])


def test_other_errors_are_not_treated_as_oom(minilm_path, monkeypatch):
    with Embedder(minilm_path, device="cpu") as embedder:
        calls = []

        def broken(batch, **kwargs):
            calls.append(len(batch))
            raise RuntimeError("shape mismatch in some layer")

        monkeypatch.setattr(embedder.backend, "forward", broken)
        with pytest.raises(RuntimeError, match="shape mismatch"):
            embedder.encode(sts_b_sentences("test")[:100])
        assert len(calls) == 1  # no retry, no shrinking


def test_progress_bar_on_long_inputs_on_a_terminal_and_switchable(minilm, minilm_path, capsys, monkeypatch):
    from tembed import progress

    monkeypatch.setattr(progress, "PROGRESS_BAR_MIN_TEXTS", 40)  # a "long" input, without encoding 1,024 texts
    texts = sts_b_sentences("train")[:60]
    minilm.encode(texts)
    assert "Encoding" not in capsys.readouterr().err  # stderr is not a terminal here: logs stay clean
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: True)
    minilm.encode(texts)
    assert "Encoding" in capsys.readouterr().err
    minilm.encode(texts[:20])
    assert "Encoding" not in capsys.readouterr().err
    with Embedder(minilm_path, device="cpu", show_progress_bar=False, backend="torch") as quiet:
        quiet.encode(texts)
        assert "Encoding" not in capsys.readouterr().err


def test_close_and_context_manager(minilm_path):
    with Embedder(minilm_path, device="cpu") as embedder:
        embedder.encode("x")
    with pytest.raises(RuntimeError, match="closed"):
        embedder.encode("x")
    embedder.close()  # idempotent


def test_model_is_placed_once(minilm_path, monkeypatch):
    with Embedder(minilm_path, device="cpu", backend="torch") as embedder:
        moves = []
        monkeypatch.setattr(embedder.backend.model, "to", lambda *a, **k: moves.append(a))
        embedder.encode(["a", "b"])
        embedder.encode_queries(["c"])
    assert moves == []


def test_bad_constructor_options(minilm_path):
    with pytest.raises(ValueError, match="pooling"):
        Embedder(minilm_path, device="cpu", pooling="max")
    with pytest.raises(ValueError, match="precision"):
        Embedder(minilm_path, device="cpu", precision="fp8")
    with pytest.raises(ValueError, match="CUDA is not available"):
        Embedder(minilm_path, device="cuda:0") if not torch.cuda.is_available() else pytest.skip("has CUDA")
    with pytest.raises(ValueError, match="batch_size"):
        Embedder(minilm_path, device="cpu", batch_size=0)


def test_bf16_precision_stays_close_and_returns_float32(minilm_path, minilm):
    texts = sts_b_sentences("test")[:100]
    with Embedder(minilm_path, device="cpu", precision="bf16") as embedder:
        vectors = embedder.encode(texts)
    assert vectors.dtype == np.float32
    assert np.sum(vectors * minilm.encode(texts), axis=1).min() >= 0.999


def test_compute_dtype_per_device_and_precision():
    from tembed.devices import resolve_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_dtype("auto", cpu) == torch.float32  # faithful on the CPU
    assert resolve_dtype("auto", cuda) == torch.float16  # fp16 compute on GPUs by default
    assert resolve_dtype("bf16", cuda) == torch.bfloat16
    assert resolve_dtype("int8", cpu) == torch.float32  # int8 weights, float32 activations
    with pytest.raises(ValueError, match="precision"):
        resolve_dtype("fp8", cpu)
