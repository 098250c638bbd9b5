"""Int8 post-training quantization of an fp32 ONNX export: the recipes ``precision="int8"`` runs.

The rule that picks what stays in floating point is model-agnostic: it looks at the graph's weight MatMuls (a
MatMul or Gemm whose second input is a constant 2-D weight) in topological order, and at their shapes, never at
model-specific node names.

* :func:`quantize_dynamic_int8`: ONNX Runtime dynamic quantization, per-channel int8 weights, activations quantized
  per batch at run time, on the graph :func:`fuse_for_onnxruntime` fused. No calibration data. The int8 of CPUs
  without VNNI (:func:`tembed.backends.cpu.int8_engine`).
* :func:`write_openvino_int8`: the OpenVINO/NNCF recipe per instruction set (:data:`OPENVINO_INT8_RECIPES`):
  post-training quantization (:func:`quantize_openvino`: static activation scales, SmoothQuant for transformers) or
  int8 weights only (:func:`compress_openvino_int8`), saved as IR.

Calibration text ships with the package (:func:`calibration_texts`, ``calibration.txt``: generic English queries and
passages written for this purpose, none taken from an evaluation set). The recipes that were measured and not
adopted (ONNX Runtime static QDQ and MatMulNBits, other fp32 rules, SmoothQuant alphas) live with the search that
measured them, ``benchmarks/int8_recipes.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeAlias

import numpy as np

from tembed.backends.cpu import cpu_flags, has_int8_dot
from tembed.backends.telemetry import disable_openvino_telemetry

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
    constants: dict[str, tuple[int, ...]] = {}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute:
            for attribute in node.attribute:
                if attribute.name == "value":
                    constants[node.output[0]] = tuple(attribute.t.dims)
    found: list[tuple[str, tuple[int, ...]]] = []
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


def down_projections(matmuls: Sequence[tuple[str, tuple[int, ...]]]) -> list[int]:
    """Indexes (in ``matmuls``, from :func:`weight_matmuls`) of the down-projections: weights with more inputs than
    outputs, i.e. the FFN output MatMul of each transformer layer."""
    return [i for i, (_, shape) in enumerate(matmuls) if shape[0] > shape[1]]


# A rule naming the weight MatMuls to keep in floating point: a rule name, or a function of the ONNX model.
Fp32Rule: TypeAlias = str | Callable[[Any], list[str]]


def fp32_nodes(model: Any, rule: Fp32Rule) -> list[str]:
    """Names of the weight MatMuls a rule keeps in fp32 (``model``: an ``onnx.ModelProto``).

    Rules: ``"none"`` (quantize every weight MatMul) or ``"first_down"`` (the first down-projection, the first
    layer's FFN output MatMul, stays in floating point); or a function ``model -> names`` (the rules the int8
    search tried: ``benchmarks/int8_recipes.py``).
    """
    if callable(rule):
        return rule(model)
    if rule == "none":
        return []
    if rule == "first_down":
        matmuls = weight_matmuls(model)
        downs = down_projections(matmuls)
        return [matmuls[downs[0]][0]] if downs else []
    raise ValueError(f"unknown fp32 rule {rule!r}")


def uses_external_data(source: str) -> bool:
    """Whether an ONNX file keeps its weights in external files (exports of models over ~1.5 GB)."""
    import onnx

    model = onnx.load(source, load_external_data=False)
    return any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)


def fuse_for_onnxruntime(source: str, target: str) -> bool:
    """ONNX Runtime's transformer fusions (``onnxruntime.transformers.optimizer``, model type ``bert``: bias + GELU,
    residual add + LayerNorm, attention where its pattern matches) on an fp32 export, saved to ``target``.

    The fused graph computes the same function in fewer, larger kernels (fp32 vectors equal to 6 digits of cosine);
    under dynamic int8 it runs 7-8% faster on AVX2 (docs/cpu-performance.md). Returns False (``target`` not
    written) for exports with external weights, which are quantized unfused.
    """
    if uses_external_data(source):
        return False
    from onnxruntime.transformers import optimizer

    fused = optimizer.optimize_model(source, model_type="bert", num_heads=0, hidden_size=0, opt_level=1)
    fused.save_model_to_file(target)
    return True


def quantize_dynamic_int8(source: str, target: str, *, keep_fp32: Fp32Rule = "none") -> None:
    """ONNX Runtime dynamic int8: per-channel symmetric int8 weights, uint8 activations quantized per batch (the
    activation scale is the batch's range, so a text's vector varies slightly with its batch)."""
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


def _ov_names(ov_model: Any, onnx_names: Iterable[str]) -> list[str]:
    """OpenVINO op names of the given ONNX MatMul nodes (OpenVINO keeps the ONNX output tensor names)."""
    wanted = set(onnx_names)
    return [
        op.get_friendly_name()
        for op in ov_model.get_ops()
        if op.get_type_name() == "MatMul" and op.get_friendly_name() in wanted
    ]


def _ignored_scope(ov_model: Any, source: str, names: list[str]) -> Any:
    """NNCF's ignored scope for the given ONNX MatMul nodes of ``source``: their OpenVINO op names."""
    import nncf
    import onnx

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
    return nncf.IgnoredScope(names=found, validate=False)


def quantize_openvino(
    source: str,
    feeds: Sequence[dict[str, np.ndarray]],
    *,
    keep_fp32: Fp32Rule = "none",
    preset: str = "performance",
    **nncf_options: Any,
) -> Any:
    """NNCF post-training int8 quantization (transformer model type) of an ONNX export; returns an ``ov.Model``.

    ``keep_fp32`` is a :func:`fp32_nodes` rule; those MatMuls go into NNCF's ignored scope. ``nncf_options`` go to
    ``nncf.quantize`` as they are (``advanced_parameters``...). Compile the result with the ``bf16`` inference
    precision hint on CPUs with AVX512-BF16/AMX so the unquantized ops run in bf16. (NNCF's overflow fix, 7-bit
    weights for CPUs without VNNI, was measured and not adopted: see :data:`OPENVINO_INT8_RECIPES`.)
    """
    import nncf
    import onnx
    import openvino as ov

    ov_model = ov.Core().read_model(source)
    names = fp32_nodes(onnx.load(source, load_external_data=False), keep_fp32)
    if names:
        nncf_options["ignored_scope"] = _ignored_scope(ov_model, source, names)
    return nncf.quantize(
        ov_model,
        nncf.Dataset(list(feeds)),
        model_type=nncf.ModelType.TRANSFORMER,
        preset=nncf.QuantizationPreset.MIXED if preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE,
        subset_size=max(1, sum(len(f["input_ids"]) for f in feeds)),
        **nncf_options,
    )


def calibration_feeds(
    tokenize: Callable[[list[str]], dict[str, np.ndarray]], texts: Sequence[str], batch_size: int = 16
) -> list[dict[str, np.ndarray]]:
    """Model inputs for calibration: ``texts`` sorted by length, tokenized in padded batches by ``tokenize``."""
    ordered = sorted(texts, key=len)
    return [tokenize(list(ordered[i : i + batch_size])) for i in range(0, len(ordered), batch_size)]


OPENVINO_INT8_RULE = "first_down"  # the first layer's FFN output MatMul stays in floating point (bf16/f32)

# The OpenVINO int8 recipe depends on the CPU that runs it (the cached IR's file name carries the recipe's name):
# * "vnni": CPUs with int8 dot products that add into int32 (AVX512-VNNI, AVX-VNNI, AMX-INT8): static int8
#   (int8 activations and weights, calibrated), the recipe measured on Zen 4 (docs/cpu-performance.md).
# * "no-vnni": every other CPU (AVX2, AVX-512 without VNNI, unknown): int8 weights, floating-point activations
#   (NNCF weight compression, no calibration). There static int8 loses too much: u8 x s8 products are summed in
#   pairs into int16 (vpmaddubsw), which saturates with full-range weights, and NNCF's overflow fix (7-bit weights)
#   removes the saturation but loses as much to the coarser weights; int8 weights alone stay faithful (the
#   measurements: docs/cpu-performance.md, "CPUs without VNNI or bf16").
OPENVINO_INT8_RECIPES: dict[str, dict[str, Any]] = {
    "vnni": {"keep_fp32": OPENVINO_INT8_RULE, "preset": "mixed"},
    "no-vnni": {"weights_only": True},
}


def openvino_int8_recipe(flags: frozenset[str] | None = None) -> str:
    """The :data:`OPENVINO_INT8_RECIPES` name for this CPU: ``"vnni"`` with AVX512-VNNI / AVX-VNNI / AMX-INT8,
    else ``"no-vnni"`` (also where the flags cannot be read: int8 weights alone are faithful on every CPU)."""
    return "vnni" if has_int8_dot(cpu_flags() if flags is None else flags) else "no-vnni"


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
