"""The int8 recipes that benchmarks/int8_search.py measured and tembed did not adopt.

tembed ships only what ``precision="int8"`` runs (``tembed.backends.quantize``); this module holds the rest of the
search, on top of the shipped helpers:

* :func:`rule`: the full language of fp32 rules (which weight MatMuls stay in floating point), as functions that
  ``tembed.backends.quantize.fp32_nodes`` (and every ``keep_fp32=``) accepts.
* :func:`quantize_static_qdq`: ONNX Runtime static QDQ quantization (per-channel weights, calibrated activation
  ranges).
* :func:`quantize_nbits_int8`: ONNX Runtime ``MatMulNBits`` with 8-bit block-quantized weights.
* :func:`smooth_quant_options`: NNCF's SmoothQuant alpha, for ``tembed.backends.quantize.quantize_openvino``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tembed.backends.quantize import Fp32Rule, down_projections, fp32_nodes, weight_matmuls


def _rule_indexes(part: str, count: int, downs: list[int]) -> set[int]:
    """The weight MatMul indexes (of ``count``, with down-projections ``downs``) one part of a rule keeps."""
    if part == "none":
        return set()
    if part in ("last_down", "first_down", "last_block", "first_block") and not downs:
        return set()
    if part == "last_down":
        return {downs[-1]}
    if part == "first_down":
        return {downs[0]}
    if part == "all_down":
        return set(downs)
    if part == "last_block":
        start = downs[-2] + 1 if len(downs) > 1 else 0
        return set(range(start, count))
    if part == "first_block":
        return set(range(downs[0] + 1))
    if part.startswith("down_") and part[5:].isdigit():
        return {downs[int(part[5:])]} if int(part[5:]) < len(downs) else set()
    if part.startswith("last_") and part[5:].isdigit():
        return set(range(max(0, count - int(part[5:])), count))
    raise ValueError(f"unknown fp32 rule {part!r}")


def rule(spec: str) -> Callable[[Any], list[str]]:
    """An fp32 rule (combine parts with ``+``), as a function ``onnx.ModelProto -> node names``.

    * ``"none"``: quantize every weight MatMul.
    * ``"last_down"``: the last down-projection (weight with more inputs than outputs, i.e. the last FFN output
      MatMul of a transformer encoder).
    * ``"first_down"``: the first down-projection (the first layer's FFN output MatMul; tembed's rule).
    * ``"all_down"``: every down-projection.
    * ``"last_block"``: the weight MatMuls after the last-but-one down-projection (the whole last layer).
    * ``"first_block"``: the weight MatMuls up to and including the first down-projection (the whole first layer).
    * ``"down_I"``: the I-th down-projection (0-based: layer I's FFN output MatMul).
    * ``"last_N"``: the last N weight MatMuls.
    """

    def names(model: Any) -> list[str]:
        matmuls = weight_matmuls(model)
        downs = down_projections(matmuls)
        keep: set[int] = set()
        for part in spec.split("+"):
            keep |= _rule_indexes(part, len(matmuls), downs)
        return [matmuls[i][0] for i in sorted(keep)]

    return names


class _FeedReader:
    """ONNX Runtime's calibration data reader over prepared feeds."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self.feeds = list(feeds)
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def rewind(self) -> None:
        self.position = 0


def quantize_static_qdq(
    source: str,
    target: str,
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    keep_fp32: Fp32Rule = "none",
    calibrate: str = "minmax",
) -> None:
    """ONNX Runtime static QDQ int8 of the weight MatMuls: per-channel int8 weights, calibrated uint8 activations."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    model = onnx.load(source, load_external_data=False)
    exclude = fp32_nodes(model, keep_fp32)
    include = [name for name, _ in weight_matmuls(model) if name not in exclude]
    quantize_static(
        source,
        target,
        _FeedReader(feeds),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        reduce_range=False,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm"],
        nodes_to_quantize=include,
        calibrate_method=methods[calibrate],
        extra_options={"MatMulConstBOnly": True, "CalibMovingAverage": calibrate == "minmax"},
    )


def quantize_nbits_int8(
    source: str, target: str, *, block_size: int = 32, accuracy_level: int = 4, keep_fp32: Fp32Rule = "none"
) -> None:
    """ONNX Runtime ``MatMulNBits`` with 8-bit block-quantized weights (symmetric, ``block_size`` along K).

    With ``accuracy_level=4`` ONNX Runtime quantizes the activations to int8 per row and per block of K at run time
    and uses integer dot-product kernels (AVX512-VNNI / AVX-VNNI / NEON dot), so each token gets its own scales:
    no calibration, and a text's embedding does not depend on the other texts in its batch.
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(source, load_external_data=False)
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=8,
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=accuracy_level,
        nodes_to_exclude=fp32_nodes(model, keep_fp32),
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    quantizer.model.save_model_to_file(target, use_external_data_format=False)


def smooth_quant_options(alpha: float | None) -> dict[str, Any]:
    """``nncf.quantize`` options setting SmoothQuant's alpha for MatMuls (none for NNCF's default)."""
    if alpha is None:
        return {}
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    return {
        "advanced_parameters": AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=alpha)
        )
    }
