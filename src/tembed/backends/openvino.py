"""The OpenVINO backend: the cached ONNX export (:mod:`tembed.backends.export`) compiled for the CPU, in fp32, bf16
or int8 (an NNCF IR derived from the export), with the pooled vectors computed inside the graph."""

from __future__ import annotations

import contextlib
import queue
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tembed.backends import export
from tembed.backends._onnx_common import OnnxBackendBase, caller_stacklevel, cpu_threads, onnx_feed
from tembed.backends.base import BackendOutput, TokenBatch
from tembed.backends.telemetry import disable_openvino_telemetry

if TYPE_CHECKING:
    from openvino import CompiledModel, InferRequest, Model

disable_openvino_telemetry()  # before anything here imports openvino or nncf

# The inference precision hint per precision (int8: the unquantized ops run in bf16, or f32 without native bf16).
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "bf16"}

# Extra graph outputs of the OpenVINO model: pooling method -> output name.
POOLED_OUTPUTS = {"mean": "pooled_mean", "cls": "pooled_cls"}


def with_pooled_outputs(model: Model) -> Model:
    """An OpenVINO model with two more outputs after ``last_hidden_state``: ``pooled_mean`` (masked mean over the
    real tokens, as :func:`tembed.heads.pool`) and ``pooled_cls`` (the first token), both (batch, hidden) f32."""
    import openvino.opset13 as ops

    hidden = model.output("last_hidden_state").get_node().input_value(0)
    mask = next(p for p in model.get_parameters() if p.get_friendly_name() == "attention_mask")
    axis = ops.constant(np.array([1], dtype=np.int64))
    weights = ops.convert(ops.unsqueeze(mask, ops.constant(np.array([-1], dtype=np.int64))), "f32")
    total = ops.reduce_sum(ops.multiply(hidden, weights), axis, keep_dims=False)
    count = ops.maximum(ops.reduce_sum(weights, axis, keep_dims=False), ops.constant(np.float32(1e-9)))
    pooled = {
        "mean": ops.divide(total, count),
        "cls": ops.gather(hidden, ops.constant(np.int64(0)), ops.constant(np.int64(1))),
    }
    results = []
    for method, node in pooled.items():
        result = ops.result(node)
        result.output(0).set_names({POOLED_OUTPUTS[method]})
        results.append(result)
    model.add_results(results)
    return model


def compiled_precision(compiled: CompiledModel, precision: str) -> str:
    """The precision an OpenVINO compiled model runs in: its inference precision, read back after compiling
    (``"int8"`` stays ``"int8"``; its unquantized ops follow the hint)."""
    if precision == "int8":
        return precision
    try:
        name = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    except Exception:  # an OpenVINO without this property: trust the hint
        return precision
    return {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(name, precision)


def _optimal_requests(compiled: CompiledModel) -> int:
    """How many infer requests the compiled model runs at once (its streams); 1 if it does not say."""
    try:
        return int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    except Exception:
        return 1


def compile_config(hint: str) -> dict[str, Any]:
    """The CPU plugin's settings: one stream on torch's thread count, latency hint, unpinned threads."""
    return {
        "INFERENCE_NUM_THREADS": cpu_threads(),
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        # Several worker processes each run their own OpenVINO: pinned threads would all land on the
        # first cores. Leave placement to the OS.
        "ENABLE_CPU_PINNING": False,
        "INFERENCE_PRECISION_HINT": hint,
    }


class OpenVinoBackend(OnnxBackendBase):
    """OpenVINO on the CPU, reading the same ONNX export.

    Args:
        path: the model folder.
        precision: ``"fp32"`` (f32 inference hint: faithful) or ``"bf16"`` (bf16 hint: faster on CPUs with
            AVX512-BF16 or AMX, cosine >= 0.9999 to fp32; fp32 on the others) or ``"int8"`` (NNCF int8 per
            instruction set, see :data:`tembed.backends.quantize.OPENVINO_INT8_RECIPES`: static int8 calibrated on
            the packaged text with VNNI, int8 weights only without; built once and cached).
        masked_lm: export the masked-LM logits too (SPLADE).
        trust_remote_code: allow the checkpoint's own code during export.
    """

    def __init__(
        self, path: str, *, precision: str = "fp32", masked_lm: bool = False, trust_remote_code: bool = False
    ) -> None:
        import openvino as ov

        if precision not in PRECISION_HINTS:
            raise ValueError(f"backend='openvino' supports precision fp32, bf16 or int8, got {precision!r}")
        super().__init__(path, precision=precision, masked_lm=masked_lm, trust_remote_code=trust_remote_code)
        core = ov.Core()
        hint = PRECISION_HINTS[precision]
        if precision == "int8" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            hint = "f32"
        self.int8_recipe: str | None = None
        if precision == "int8":
            from tembed.backends.quantize import openvino_int8_recipe

            self.int8_recipe = openvino_int8_recipe()
        config = compile_config(hint)

        def open_export(onnx_path: str) -> CompiledModel:
            model_file = onnx_path
            if precision == "int8":
                model_file = export.openvino_int8(
                    onnx_path, path, self.input_names, trust_remote_code, self.int8_recipe
                )
            return core.compile_model(with_pooled_outputs(core.read_model(model_file)), "CPU", config)

        compiled = self._load(open_export)
        self.compiled: CompiledModel | None = compiled
        # What the compiled model really runs in: OpenVINO ignores the bf16 hint on CPUs without AVX512-BF16/AMX.
        self.effective_precision = compiled_precision(compiled, precision)
        if self.effective_precision != precision:
            warnings.warn(
                f"precision={precision!r}: this CPU has no native {precision} (AVX512-BF16 or AMX), so OpenVINO runs "
                f"{self.effective_precision} (the same vectors as fp32, without the speed-up)",
                stacklevel=caller_stacklevel(),
            )
        self._idle_requests = self._infer_requests(compiled)

    @staticmethod
    def _infer_requests(compiled: CompiledModel) -> queue.Queue[InferRequest]:
        """The idle infer requests, one per stream.

        An infer request holds its inputs and outputs, so it serves one call at a time. The compiled model runs
        OPTIMAL_NUMBER_OF_INFER_REQUESTS requests at once (one per stream: 1 with the latency hint, whose one request
        already uses every core); each forward takes an idle request, waiting while all are busy, and gives it back
        after copying the outputs out. Concurrent callers never share a request, and never run more inferences than
        there are streams (more only fight over the cores: benchmarks/concurrency.py).
        """
        idle: queue.Queue[InferRequest] = queue.Queue()
        for _ in range(max(1, _optimal_requests(compiled))):
            idle.put(compiled.create_infer_request())
        return idle

    @contextlib.contextmanager
    def _request(self) -> Iterator[InferRequest]:
        """An infer request this thread has to itself until the block ends (waits for one to be idle)."""
        if self.compiled is None:
            raise RuntimeError("this backend is closed")
        request = self._idle_requests.get()
        try:
            yield request
        finally:
            self._idle_requests.put(request)

    def forward(self, batch: TokenBatch, *, want_logits: bool = False, pooling: str | None = None) -> BackendOutput:
        """The last hidden state (and logits for masked-LM exports) as CPU float32 tensors.

        With ``pooling="mean"`` or ``"cls"`` (and no logits), only the vectors pooled inside the graph are copied
        out, as ``pooled`` (batch, hidden) float32, which saves copying the whole hidden state out of the graph.
        """
        self._check(want_logits)
        pooled_output = POOLED_OUTPUTS.get(pooling or "") if not want_logits else None
        if pooled_output is not None:
            names = [pooled_output]
        else:
            names = ["last_hidden_state", "logits"] if want_logits else ["last_hidden_state"]
        with self._request() as request:
            result = request.infer(onnx_feed(batch, self.input_names))
            # The outputs live in the request's buffers, which the next call overwrites: copy before giving it back.
            arrays = [np.array(result[name], copy=True) for name in names]
        if pooled_output is not None:
            return BackendOutput(hidden=None, pooled=torch.from_numpy(arrays[0]))
        return self._output(arrays, want_logits)

    def close(self) -> None:
        self.compiled = None  # requests in use finish their call; later calls are refused
