"""Backends run the Transformer forward pass: token batches in, last hidden states out.

Every backend has the same small interface (:class:`tembed.backends.base.Backend`), so the pipeline around it
(tokenize, schedule, heads, finish) is shared. :func:`create_backend` picks one from a backend name and a
precision.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

from tembed.backends.base import Backend, BackendOutput, TokenBatch
from tembed.backends.torch_backend import TorchBackend

BACKENDS: tuple[str, ...] = ("auto", "torch", "onnx", "openvino")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _telemetry_opted_in() -> bool:
    """Whether this user opted in to OpenVINO telemetry (``opt_in_out --opt_in`` writes ``1`` to the consent file
    ``~/intel/openvino_telemetry``; on Windows ``%LOCALAPPDATA%/Intel Corporation/openvino_telemetry``)."""
    if sys.platform == "win32":
        consent = os.path.join(os.environ.get("LOCALAPPDATA", ""), "Intel Corporation", "openvino_telemetry")
    else:
        consent = os.path.join(os.path.expanduser("~"), "intel", "openvino_telemetry")
    try:
        with open(consent, encoding="utf-8") as handle:
            return handle.readline().strip() == "1"
    except OSError:
        return False


def disable_openvino_telemetry() -> None:
    """Keep OpenVINO and NNCF from sending usage telemetry, unless the user opted in.

    ``import openvino`` initializes the ``openvino_telemetry`` package, which (without a consent file) writes a
    client ID under ``~/intel`` and sends an "import" event to Google Analytics; NNCF does the same when imported.
    Both fall back to a no-op stub when ``openvino_telemetry`` cannot be imported, so this makes it unimportable in
    this process (``sys.modules`` entry ``None``) before tembed imports either: nothing is written and nothing
    is sent, and the user's machine-wide setting is left alone. A user who opted in (``opt_in_out --opt_in``)
    keeps telemetry. Called before every ``import openvino`` / ``import nncf`` in tembed; a no-op if
    ``openvino_telemetry`` was already imported by someone else.
    """
    if "openvino_telemetry" in sys.modules or _telemetry_opted_in():
        return
    sys.modules["openvino_telemetry"] = None  # type: ignore[assignment]  # import raises ImportError: the stubs


# Architectures whose ONNX export is tested (encoder models: BERT, RoBERTa / XLM-R and friends).
EXPORT_TESTED_MODEL_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "camembert", "mpnet", "electra"}


def choose_backend(backend: str, precision: str, device: torch.device, model_type: str | None = None) -> str:
    """The concrete backend for a request.

    ``"auto"`` is torch on GPUs. On the CPU, for encoder models whose export is tested (``model_type`` in
    :data:`EXPORT_TESTED_MODEL_TYPES`) and with OpenVINO installed: ``fp32`` runs on OpenVINO (same vectors as
    torch, 1.2-1.6x faster here), ``bf16`` on OpenVINO (faster and more faithful than torch bf16; fp32 with a
    warning on CPUs without native bf16), ``int8`` on OpenVINO with NNCF (static int8 on CPUs with VNNI, int8
    weights only on the others: the recipes that meet tembed's int8 targets, see
    :data:`tembed.backends.quantize.OPENVINO_INT8_RECIPES`) when nncf is installed, else ONNX Runtime dynamic int8.
    Otherwise torch (int8: ONNX Runtime).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        if backend != "torch" and device.type != "cpu":
            raise ValueError(f"backend={backend!r} runs on the CPU only; use backend='torch' on {device}")
        return backend
    if device.type != "cpu":
        return "torch"
    exportable = model_type is None or model_type in EXPORT_TESTED_MODEL_TYPES
    if precision == "int8":
        return "openvino" if exportable and _installed("openvino") and _installed("nncf") else "onnx"
    if precision in ("auto", "fp32", "bf16") and exportable and _installed("openvino"):
        return "openvino"
    return "torch"


def create_backend(
    name: str,
    path: str,
    *,
    device: torch.device,
    precision: str,
    dtype: torch.dtype,
    trust_remote_code: bool,
    masked_lm: bool,
) -> Backend:
    """Build a backend by its concrete name (see :func:`choose_backend`)."""
    if name == "torch":
        if precision == "int8":
            raise ValueError("precision='int8' needs backend='onnx' (or 'auto')")
        return TorchBackend(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code, masked_lm=masked_lm)
    from tembed.backends.onnx_backend import OnnxRuntimeBackend, OpenVinoBackend

    concrete = "fp32" if precision == "auto" else precision
    if name == "onnx":
        if not _installed("onnxruntime"):
            raise ImportError("backend='onnx' needs onnxruntime: pip install 'tembed[onnx]'")
        return OnnxRuntimeBackend(path, precision=concrete, masked_lm=masked_lm, trust_remote_code=trust_remote_code)
    if not _installed("openvino"):
        raise ImportError("backend='openvino' needs openvino: pip install 'tembed[openvino]'")
    return OpenVinoBackend(path, precision=concrete, masked_lm=masked_lm, trust_remote_code=trust_remote_code)


__all__ = ["BACKENDS", "Backend", "BackendOutput", "TokenBatch", "TorchBackend", "choose_backend", "create_backend"]
