"""The ONNX Runtime backend: the cached ONNX export (:mod:`tembed.backends.export`) on ONNX Runtime's CPU
provider, in fp32 or dynamic int8."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tembed.backends import export
from tembed.backends._onnx_common import OnnxBackendBase, cpu_threads, onnx_feed
from tembed.backends.base import BackendOutput, TokenBatch

if TYPE_CHECKING:
    from onnxruntime import InferenceSession, SessionOptions

PRECISIONS = ("fp32", "int8")


def session_options() -> SessionOptions:
    """One sequential session on torch's thread count, every graph optimization, warnings off."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = cpu_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


class OnnxRuntimeBackend(OnnxBackendBase):
    """ONNX Runtime on the CPU.

    Args:
        path: the model folder (exported on first use, then cached).
        precision: ``"fp32"`` (same vectors as torch within float round-off) or ``"int8"`` (dynamic
            quantization with per-channel int8 weights, activations quantized per batch, on the graph ONNX Runtime's
            transformer fusions made; mean cosine 0.993 to fp32, min 0.968 on STS-B; the int8 that is faster than
            fp32 on CPUs without VNNI: :func:`tembed.backends.cpu.int8_engine`).
        masked_lm: export the masked-LM logits too (SPLADE).
        trust_remote_code: allow the checkpoint's own code during export.
    """

    def __init__(
        self, path: str, *, precision: str = "fp32", masked_lm: bool = False, trust_remote_code: bool = False
    ) -> None:
        import onnxruntime as ort

        if precision not in PRECISIONS:
            raise ValueError(f"backend='onnx' supports precision fp32 or int8, got {precision!r}")
        super().__init__(path, precision=precision, masked_lm=masked_lm, trust_remote_code=trust_remote_code)
        options = session_options()

        def open_export(onnx_path: str) -> InferenceSession:
            model_file = onnx_path if precision == "fp32" else export.onnxruntime_int8(onnx_path)
            return ort.InferenceSession(model_file, options, providers=["CPUExecutionProvider"])

        self.session: InferenceSession | None = self._load(open_export)
        self.effective_precision = precision

    def forward(self, batch: TokenBatch, *, want_logits: bool = False, pooling: str | None = None) -> BackendOutput:
        """The last hidden state (and logits for masked-LM exports) as CPU float32 tensors (``pooling`` is
        ignored: the pipeline pools)."""
        if self.session is None:
            raise RuntimeError("this backend is closed")
        self._check(want_logits)
        names = ["last_hidden_state", "logits"] if want_logits else ["last_hidden_state"]
        arrays: list[Any] = self.session.run(names, onnx_feed(batch, self.input_names))
        return self._output(arrays, want_logits)

    def close(self) -> None:
        self.session = None
