"""Int8 post-training quantization of an fp32 ONNX export (ONNX Runtime and OpenVINO/NNCF recipes).

The rules that pick what stays in floating point are model-agnostic: they look at the graph's weight MatMuls
(a MatMul or Gemm whose second input is a constant 2-D weight) in topological order, and at their shapes, never at
model-specific node names.

* :func:`quantize_dynamic_int8`: ONNX Runtime dynamic quantization, per-channel int8 weights, activations quantized
  per batch at run time. No calibration data.
* :func:`quantize_static_qdq`: ONNX Runtime static QDQ quantization (per-channel weights, calibrated activation
  ranges).
* :func:`quantize_openvino`: NNCF post-training quantization of the export for OpenVINO (static activation scales,
  SmoothQuant for transformers), returning an ``openvino.Model``.

Calibration text ships with the package (:func:`calibration_texts`, ``calibration.txt``: generic English queries and
passages written for this purpose, none taken from an evaluation set).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from tembed.backends import disable_openvino_telemetry

disable_openvino_telemetry()  # before anything here imports openvino or nncf
CALIBRATION_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calibration.txt")


def calibration_texts(path: str = CALIBRATION_FILE) -> list[str]:
    """The shipped calibration texts, one per non-empty line."""
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


def weight_matmuls(model: Any) -> list[tuple[str, tuple[int, ...]]]:
    """``(node name, weight shape)`` of every MatMul/Gemm with a constant 2-D weight, in graph order.

    ``model`` is an ``onnx.ModelProto``. Graph order is topological for exported models, so the list runs from the
    first layer to the last.
    """
    from onnx import numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    constants = {}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute:
            for attribute in node.attribute:
                if attribute.name == "value":
                    constants[node.output[0]] = tuple(attribute.t.dims)
    found = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        weight = node.input[1]
        if weight in initializers:
            shape = tuple(numpy_helper.to_array(initializers[weight]).shape)
        elif weight in constants:
            shape = constants[weight]
        else:
            continue
        if len(shape) == 2:
            found.append((node.name, shape))
    return found


def fp32_nodes(model: Any, rule: str) -> list[str]:
    """Names of the weight MatMuls a rule keeps in fp32.

    Rules (combine with ``+``):

    * ``"none"``: quantize every weight MatMul.
    * ``"last_down"``: the last down-projection (weight with more inputs than outputs, i.e. the last FFN output
      MatMul of a transformer encoder).
    * ``"first_down"``: the first down-projection (the first layer's FFN output MatMul).
    * ``"all_down"``: every down-projection.
    * ``"last_block"``: the weight MatMuls after the last-but-one down-projection (the whole last layer).
    * ``"first_block"``: the weight MatMuls up to and including the first down-projection (the whole first layer).
    * ``"down_I"``: the I-th down-projection (0-based: layer I's FFN output MatMul).
    * ``"last_N"``: the last N weight MatMuls.
    """
    matmuls = weight_matmuls(model)
    downs = [i for i, (_, shape) in enumerate(matmuls) if shape[0] > shape[1]]
    keep: set[int] = set()
    for part in rule.split("+"):
        if part == "none":
            continue
        if part == "last_down" and downs:
            keep.add(downs[-1])
        elif part == "first_down" and downs:
            keep.add(downs[0])
        elif part == "all_down":
            keep.update(downs)
        elif part == "last_block" and downs:
            start = downs[-2] + 1 if len(downs) > 1 else 0
            keep.update(range(start, len(matmuls)))
        elif part == "first_block" and downs:
            keep.update(range(downs[0] + 1))
        elif part.startswith("down_") and part[5:].isdigit():
            if int(part[5:]) < len(downs):
                keep.add(downs[int(part[5:])])
        elif part.startswith("last_") and part[5:].isdigit():
            keep.update(range(max(0, len(matmuls) - int(part[5:])), len(matmuls)))
        elif part not in ("last_down", "first_down", "last_block", "first_block"):
            raise ValueError(f"unknown fp32 rule {part!r}")
    return [matmuls[i][0] for i in sorted(keep)]


def quantize_dynamic_int8(source: str, target: str, *, keep_fp32: str = "none") -> None:
    """ONNX Runtime dynamic int8: per-channel symmetric int8 weights, uint8 activations quantized per batch."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    exclude = fp32_nodes(onnx.load(source, load_external_data=False), keep_fp32)
    quantize_dynamic(
        source,
        target,
        weight_type=QuantType.QInt8,
        per_channel=True,
        reduce_range=False,
        op_types_to_quantize=["MatMul", "Gemm"],
        nodes_to_exclude=exclude,
        extra_options={"MatMulConstBOnly": True},
    )


class _FeedReader:
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
    keep_fp32: str = "none",
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


def _ov_names(ov_model: Any, onnx_names: Iterable[str]) -> list[str]:
    """OpenVINO op names of the given ONNX MatMul nodes (OpenVINO keeps the ONNX output tensor names)."""
    wanted = set(onnx_names)
    return [
        op.get_friendly_name()
        for op in ov_model.get_ops()
        if op.get_type_name() == "MatMul" and op.get_friendly_name() in wanted
    ]


def quantize_openvino(
    source: str,
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    keep_fp32: str = "none",
    preset: str = "performance",
    smooth_quant_alpha: float | None = None,
) -> Any:
    """NNCF post-training int8 quantization (transformer model type) of an ONNX export; returns an ``ov.Model``.

    ``keep_fp32`` is a :func:`fp32_nodes` rule; those MatMuls go into NNCF's ignored scope. Compile the result with
    the ``bf16`` inference precision hint on CPUs with AVX512-BF16/AMX so the unquantized ops run in bf16. (NNCF's
    overflow fix, 7-bit weights for CPUs without VNNI, was measured and not adopted: see
    :data:`OPENVINO_INT8_RECIPES`.)
    """
    import nncf
    import onnx
    import openvino as ov

    ov_model = ov.Core().read_model(source)
    names = fp32_nodes(onnx.load(source, load_external_data=False), keep_fp32)
    ignored = None
    if names:
        found = _ov_names(ov_model, names)
        if len(found) != len(names):
            # fall back to matching by the MatMul's output tensor name
            onnx_model = onnx.load(source, load_external_data=False)
            outputs = {n.name: n.output[0] for n in onnx_model.graph.node}
            wanted = {outputs[n] for n in names}
            found = [
                op.get_friendly_name()
                for op in ov_model.get_ops()
                if op.get_type_name() == "MatMul" and wanted & set(op.output(0).get_names())
            ]
        ignored = nncf.IgnoredScope(names=found, validate=False)
    advanced = None
    if smooth_quant_alpha is not None:
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

        advanced = AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=smooth_quant_alpha)
        )
    kwargs: dict[str, Any] = {}
    if ignored is not None:
        kwargs["ignored_scope"] = ignored
    if advanced is not None:
        kwargs["advanced_parameters"] = advanced
    return nncf.quantize(
        ov_model,
        nncf.Dataset(list(feeds)),
        model_type=nncf.ModelType.TRANSFORMER,
        preset=nncf.QuantizationPreset.MIXED if preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE,
        subset_size=max(1, sum(len(f["input_ids"]) for f in feeds)),
        **kwargs,
    )


def calibration_feeds(
    tokenize: Callable[[list[str]], dict[str, np.ndarray]], texts: Sequence[str], batch_size: int = 16
) -> list[dict[str, np.ndarray]]:
    """Model inputs for calibration: ``texts`` sorted by length, tokenized in padded batches by ``tokenize``."""
    ordered = sorted(texts, key=len)
    return [tokenize(list(ordered[i : i + batch_size])) for i in range(0, len(ordered), batch_size)]


def quantize_nbits_int8(
    source: str, target: str, *, block_size: int = 32, accuracy_level: int = 4, keep_fp32: str = "none"
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


OPENVINO_INT8_RULE = "first_down"  # the first layer's FFN output MatMul stays in floating point (bf16/f32)

# The OpenVINO int8 recipe depends on the CPU that runs it (the cached IR's file name carries the recipe's name):
# * "vnni": CPUs with int8 dot products that add into int32 (AVX512-VNNI, AVX-VNNI, AMX-INT8): static int8
#   (int8 activations and weights, calibrated), the recipe measured on Zen 4 (docs/cpu-performance.md).
# * "no-vnni": every other CPU (AVX2, AVX-512 without VNNI, unknown): int8 weights, floating-point activations
#   (NNCF weight compression, no calibration). There static int8 loses too much: u8 x s8 products are summed in
#   pairs into int16 (vpmaddubsw), which saturates with full-range weights (MiniLM on Zen 3: min cosine 0.9688,
#   against 0.9759 for the same model with its int8 ops emulated in f32), and NNCF's overflow fix (7-bit weights)
#   removes the saturation but loses as much to the coarser weights (min 0.9657). Weight compression there:
#   mean cosine 0.9996, min 0.998.
OPENVINO_INT8_RECIPES: dict[str, dict[str, Any]] = {
    "vnni": {"keep_fp32": OPENVINO_INT8_RULE, "preset": "mixed"},
    "no-vnni": {"weights_only": True},
}
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (``avx2``, ``avx512_vnni``...); empty where unknown."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def openvino_int8_recipe(flags: frozenset[str] | None = None) -> str:
    """The :data:`OPENVINO_INT8_RECIPES` name for this CPU: ``"vnni"`` with AVX512-VNNI / AVX-VNNI / AMX-INT8,
    else ``"no-vnni"`` (also where the flags cannot be read: int8 weights alone are faithful on every CPU)."""
    return "vnni" if (cpu_flags() if flags is None else flags) & _VNNI_FLAGS else "no-vnni"


def tokenized_calibration(
    model_path: str, input_names: Sequence[str], *, max_length: int = 256, trust_remote_code: bool = False
) -> list[dict[str, np.ndarray]]:
    """The shipped calibration texts as model inputs (int64, right-padded batches of 16, sorted by length)."""
    from tembed.tokenize import TextTokenizer

    tokenizer = TextTokenizer(model_path, trust_remote_code=trust_remote_code)

    def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
        batch = tokenizer.pad(tokenizer.encode(texts, max_length))
        feed = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if "token_type_ids" in input_names:
            feed["token_type_ids"] = np.zeros_like(batch.input_ids)
        return feed

    return calibration_feeds(tokenize, calibration_texts())


def write_openvino_int8(
    source: str,
    target_xml: str,
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    keep_fp32: str = OPENVINO_INT8_RULE,
    preset: str = "mixed",
    weights_only: bool = False,
) -> None:
    """The recommended OpenVINO int8 recipe, saved as IR (``target_xml`` + ``.bin``).

    NNCF static PTQ (transformer model type: SmoothQuant, per-channel int8 weights), the mixed preset (asymmetric
    activations) and the first FFN down-projection left unquantized. ``weights_only=True``: int8 weights only
    (:func:`compress_openvino_int8`, ``feeds`` unused), the recipe for CPUs without VNNI (see
    :data:`OPENVINO_INT8_RECIPES`). Compile with the ``bf16`` precision hint where the CPU has AVX512-BF16/AMX (the
    floating-point ops then run in bf16).
    """
    import openvino as ov

    if weights_only:
        model = compress_openvino_int8(source)
    else:
        model = quantize_openvino(source, feeds, keep_fp32=keep_fp32, preset=preset)
    ov.save_model(model, target_xml)


def compress_openvino_int8(source: str) -> Any:
    """NNCF int8 weight compression of an ONNX export (per-channel asymmetric int8 weights of every MatMul and
    embedding table, turned back into floating point inside the kernels; activations stay floating point). No
    calibration. Returns an ``ov.Model``."""
    import nncf
    import openvino as ov

    return nncf.compress_weights(ov.Core().read_model(source), mode=nncf.CompressWeightsMode.INT8_ASYM)
