"""Output quantization: bit-for-bit parity with sentence-transformers' ``quantize_embeddings`` on real MiniLM
vectors, the errors, dequantization, and ``tembed encode --quantize`` end to end (typer's CliRunner, in-process,
one encoder shared between runs by replacing ``tembed.cli.encode.open_job_encoder``)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import tembed
from tembed.cli import app
from tembed.cli import encode as cli_encode
from tembed.quantization import (
    PRECISIONS,
    bytes_per_vector,
    dequantize,
    quantization_ranges,
    quantize,
    update_ranges,
)

from realdata import insuranceqa_answers, sts_b_sentences

DIM = 384
MAX_LENGTH = 48


def _reference():
    """sentence-transformers' ``quantize_embeddings``, its own file loaded without importing the whole package (an
    import that takes over 10 s, most of this file's run time); the ordinary import if that fails."""
    try:
        folder = os.path.join(os.path.dirname(importlib.util.find_spec("sentence_transformers").origin), "util")
        package = types.ModuleType("_st_util")
        package.__path__ = [folder]
        sys.modules.setdefault("_st_util", package)
        spec = importlib.util.spec_from_file_location("_st_util.quantization", os.path.join(folder, "quantization.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module.quantize_embeddings
    except Exception:
        from sentence_transformers.util.quantization import quantize_embeddings

        return quantize_embeddings


quantize_embeddings = _reference()


@pytest.fixture(scope="module")
def vectors(minilm) -> np.ndarray:
    """MiniLM vectors of 400 STS-B test sentences: 300 to quantize, 100 for calibration."""
    return minilm.encode_corpus(sts_b_sentences("test")[:400], max_length=MAX_LENGTH)


def same(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    assert np.array_equal(ours, theirs)


# ------------------------------------------------------------------------------------------------ the library
@pytest.mark.parametrize("precision", [*PRECISIONS, "float32"])
def test_parity_with_sentence_transformers(vectors, precision):
    corpus, calibration = vectors[:300], vectors[300:]
    ranges = quantization_ranges(calibration)
    same(quantize(corpus, precision), quantize_embeddings(corpus, precision))
    same(quantize(corpus, precision, ranges=ranges), quantize_embeddings(corpus, precision, ranges=ranges))
    same(
        quantize(corpus, precision, calibration=calibration),
        quantize_embeddings(corpus, precision, calibration_embeddings=calibration),
    )
    wide = corpus.astype(np.float64)
    same(quantize(wide, precision), quantize_embeddings(wide, precision))
    same(quantize(wide, precision, ranges=ranges), quantize_embeddings(wide, precision, ranges=ranges))
    same(quantize(corpus[7], precision, ranges=ranges), quantize_embeddings(corpus[7], precision, ranges=ranges))
    same(quantize(corpus[:0], precision), quantize_embeddings(corpus[:0], precision))
    float64_ranges = ranges.astype(np.float64) + 1e-9  # cast to float32 first, like the reference
    same(
        quantize(corpus, precision, ranges=float64_ranges),
        quantize_embeddings(corpus, precision, ranges=float64_ranges),
    )


def test_public_export_and_sizes():
    from tembed import quantization

    assert tembed.quantize is quantization.quantize
    assert "quantize" in tembed.__all__
    assert [bytes_per_vector(p, DIM) for p in ("float32", "int8", "uint8", "binary", "ubinary")] == [
        1536,
        384,
        384,
        48,
        48,
    ]
    assert bytes_per_vector("binary", 385) == 49


def test_ranges_by_blocks_equal_the_whole(vectors):
    ranges = None
    for start in range(0, len(vectors), 64):
        ranges = update_ranges(ranges, vectors[start : start + 64])
    ranges = update_ranges(ranges, vectors[:0])  # an empty block changes nothing
    whole = np.vstack((vectors.min(axis=0), vectors.max(axis=0)))
    same(ranges, whole.astype(np.float32))
    same(quantization_ranges(vectors), ranges)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda v: quantize(v, "int4"), "unknown precision 'int4'"),
        (lambda v: quantize((v * 100).astype(np.int8), "int8"), "must be floating point"),
        (lambda v: quantize(v.astype(np.int64), "binary"), "must be floating point"),
        (lambda v: quantize(v, "int8", ranges=np.zeros((3, DIM))), r"ranges must have shape \(2, 384\)"),
        (lambda v: quantize(v, "uint8", ranges=np.zeros((2, 10))), r"ranges must have shape \(2, 384\)"),
        (lambda v: quantize(v[0], "int8"), "from a single embedding"),
        (lambda v: quantize(v[:1], "uint8"), "from a single embedding"),
        (lambda v: quantize(v, "int8", calibration=v[:, :10]), "calibration embeddings of shape"),
        (lambda v: quantize(v[None], "int8"), "not of shape"),
        (lambda v: quantization_ranges(v[:0]), "non-empty matrix"),
        (lambda v: update_ranges(None, v[:0]), "empty block"),
        (lambda v: update_ranges(quantization_ranges(v), v[:, :10]), r"shape \(2, 10\)"),
        (lambda v: dequantize(quantize(v, "int8"), "int8"), "needs the ranges"),
        (lambda v: dequantize(quantize(v, "ubinary"), "ubinary"), "needs their dim"),
        (lambda v: dequantize(quantize(v, "ubinary"), "binary", dim=DIM), "must be of dtype int8"),
        (lambda v: dequantize(quantize(v, "binary"), "float32", dim=DIM), "unknown precision 'float32'"),
        (lambda v: bytes_per_vector("fp16", DIM), "unknown precision 'fp16'"),
    ],
)
def test_errors_name_the_problem(vectors, call, message):
    with pytest.raises(ValueError, match=message):
        call(vectors[:50])


@pytest.mark.parametrize("precision", ["binary", "ubinary"])
def test_dequantize_binary_is_the_sign_bits(vectors, precision):
    bits = dequantize(quantize(vectors, precision), precision, dim=DIM)
    same(bits, (vectors > 0).astype(np.float32))
    same(dequantize(quantize(vectors[3], precision), precision, dim=DIM), (vectors[3] > 0).astype(np.float32))


@pytest.mark.parametrize("precision", ["int8", "uint8"])
def test_dequantize_scalar_lies_within_a_step(vectors, precision):
    ranges = quantization_ranges(vectors)
    approx = dequantize(quantize(vectors, precision, ranges=ranges), precision, ranges=ranges)
    assert approx.dtype == np.float32 and approx.shape == vectors.shape
    steps = (ranges[1] - ranges[0]) / 255
    assert (np.abs(approx - vectors) <= steps * (1 + 1e-4)).all()
    # Rescoring with the bucket centres ranks almost like the float vectors.
    exact, rescored = vectors @ vectors[0], approx @ vectors[0]
    assert np.corrcoef(exact, rescored)[0, 1] > 0.999


# ------------------------------------------------------------------------------------------------ tembed encode
class SharedEncoder:
    """An encoder shared between runs: the run's close() leaves it open (the fixture closes it at the end)."""

    def __init__(self, encoder) -> None:
        self.encoder = encoder

    @property
    def settings(self):
        return self.encoder.settings

    def encode(self, texts, options):
        return self.encoder.encode(texts, options)

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def shared_encoder(minilm, minilm_path):
    """Every run of MiniLM encodes with the session's ``minilm`` (one model load for the whole file)."""

    def open_job_encoder(config, device):
        assert config.model == minilm_path and config.outputs == ("dense",)
        return SharedEncoder(minilm.encoder)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli_encode, "open_job_encoder", open_job_encoder)
        yield


def invoke(*args: str):
    return CliRunner().invoke(app, ["encode", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    """60 InsuranceQA answers as jsonl."""
    path = tmp_path_factory.mktemp("quantize") / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for index, text in enumerate(insuranceqa_answers()[:60]):
            handle.write(json.dumps({"id": f"doc-{index:03d}", "text": text}) + "\n")
    return str(path)


def encode_args(source: str, output: str, minilm_path: str, *more: str) -> list[str]:
    return [source, "-o", output, "-m", minilm_path, "--max-length", str(MAX_LENGTH), "--chunk-size", "16", *more]


@pytest.fixture(scope="module")
def plain(shared_encoder, source, minilm_path, tmp_path_factory) -> tuple[list[str], np.ndarray]:
    """The float run: its ids and ``(60, 384)`` dense matrix."""
    output = str(tmp_path_factory.mktemp("plain") / "plain.parquet")
    result = invoke(*encode_args(source, output, minilm_path))
    assert result.exit_code == 0, result.output
    table = pq.read_table(output)
    return table.column("id").to_pylist(), table.column("dense").combine_chunks().flatten().to_numpy().reshape(-1, DIM)


def read_quantized(output: str, precision: str) -> tuple[list[str], np.ndarray, dict]:
    table = pq.read_table(output)
    column = table.column(f"dense_{precision}").combine_chunks()
    codes = column.flatten().to_numpy().reshape(len(table), column.type.list_size)
    return table.column("id").to_pylist(), codes, json.loads(table.schema.metadata[b"tembed"])


@pytest.mark.parametrize("precision", ["int8", "ubinary"])
def test_encode_quantize(shared_encoder, source, minilm_path, plain, tmp_path, precision):
    output = str(tmp_path / f"{precision}.parquet")
    result = invoke(*encode_args(source, output, minilm_path, "--quantize", precision))
    assert result.exit_code == 0, result.output
    assert pq.ParquetFile(output).num_row_groups == 4  # one per part of 16
    dtype = pa.int8() if precision == "int8" else pa.uint8()
    width = bytes_per_vector(precision, DIM)
    assert pq.read_schema(output).names == ["id", f"dense_{precision}"]
    assert pq.read_schema(output).field(f"dense_{precision}").type == pa.list_(dtype, width)
    ids, codes, metadata = read_quantized(output, precision)
    plain_ids, dense = plain
    assert ids == plain_ids
    entry = metadata["quantization"]
    assert entry["precision"] == precision and entry["dim"] == DIM
    assert metadata["dim"] == DIM and metadata["outputs"] == ["dense"]
    if precision == "int8":
        ranges = np.asarray(entry["ranges"], dtype=np.float32)
        same(ranges, np.vstack((dense.min(axis=0), dense.max(axis=0))))
        assert entry["calibration"] == "corpus"
        same(codes, quantize(dense, "int8", ranges=ranges))
        same(codes, quantize_embeddings(dense, "int8", ranges=ranges))
    else:
        assert entry["ranges"] is None and entry["calibration"] is None
        same(codes, quantize(dense, "ubinary"))


def test_encode_honours_a_ranges_file(shared_encoder, source, minilm_path, plain, vectors, tmp_path):
    ranges = quantization_ranges(vectors)  # calibrated on other text than the corpus
    ranges_file = str(tmp_path / "ranges.npy")
    np.save(ranges_file, ranges.astype(np.float64))
    output = str(tmp_path / "uint8.parquet")
    args = encode_args(source, output, minilm_path, "--quantize", "uint8", "--quantize-ranges", ranges_file)
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    _, codes, metadata = read_quantized(output, "uint8")
    assert metadata["quantization"]["calibration"] == ranges_file
    same(np.asarray(metadata["quantization"]["ranges"], dtype=np.float32), ranges)
    same(codes, quantize(plain[1], "uint8", ranges=ranges))


@pytest.mark.parametrize(
    ("more", "message"),
    [
        (["--quantize", "int4"], "--quantize 'int4': use one of int8, uint8, binary, ubinary"),
        (["--quantize", "float32"], "--quantize 'float32'"),
        (["--quantize", "int8", "--engine", "ray"], "not supported with --engine ray"),
        (["--quantize", "int8", "--sparse"], "--quantize quantizes the dense vectors"),
        (["--quantize-ranges", "r.npy"], "--quantize-ranges needs --quantize"),
        (["--quantize", "binary", "--quantize-ranges", "RANGES"], "--quantize-ranges is for int8 and uint8"),
        (["--quantize", "int8", "--quantize-ranges", "missing.npy"], "cannot read quantization ranges"),
        (["--quantize", "int8", "--quantize-ranges", "BAD"], "must be an array of shape (2, dim), not (3, 384)"),
    ],
)
def test_encode_refusals(source, minilm_path, tmp_path, more, message):
    np.save(tmp_path / "ranges.npy", np.zeros((2, DIM), dtype=np.float32))
    np.save(tmp_path / "bad.npy", np.zeros((3, DIM), dtype=np.float32))
    paths = {"RANGES": str(tmp_path / "ranges.npy"), "BAD": str(tmp_path / "bad.npy")}
    more = [paths.get(arg, arg) for arg in more]
    result = invoke(*encode_args(source, str(tmp_path / "out.parquet"), minilm_path, *more))
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not (tmp_path / "out.parquet").exists()


def test_encode_refuses_npy_and_ranges_of_another_dim(shared_encoder, source, minilm_path, tmp_path):
    result = invoke(*encode_args(source, str(tmp_path / "out.npy"), minilm_path, "--quantize", "int8"))
    assert result.exit_code == 2
    assert "write .parquet, not .npy" in result.stderr
    np.save(tmp_path / "small.npy", np.zeros((2, 128), dtype=np.float32))
    more = ["--quantize", "int8", "--quantize-ranges", str(tmp_path / "small.npy")]
    result = invoke(*encode_args(source, str(tmp_path / "out.parquet"), minilm_path, *more))
    assert result.exit_code == 2, result.output
    assert "do not fit 384 dimensions: expected (2, 384)" in result.stderr
    assert not (tmp_path / "out.parquet").exists() and not (tmp_path / "out.parquet.partial").exists()
