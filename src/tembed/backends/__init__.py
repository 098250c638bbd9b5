"""Backends run the Transformer forward pass: token batches in, last hidden states out.

Every backend has the same small interface (:class:`tembed.backends.base.Backend`), so the pipeline around it
(tokenize, schedule, heads, finish) is shared. :func:`create_backend` builds one from a backend name and a
precision (the names and the ``"auto"`` choice: :mod:`tembed.backends.select`).

* :mod:`~tembed.backends.torch_backend`: PyTorch, any device.
* :mod:`~tembed.backends.onnxruntime`, :mod:`~tembed.backends.openvino`: ONNX Runtime and OpenVINO on the CPU, on
  one cached ONNX export (:mod:`~tembed.backends.export`); int8 recipes in :mod:`~tembed.backends.quantize`.

Importing this package loads neither torch nor an inference engine: a backend's module is imported when it is
built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tembed.backends.base import Backend, BackendOutput, TokenBatch
from tembed.backends.select import BACKENDS, EXPORT_TESTED_MODEL_TYPES, choose_backend, create_backend
from tembed.backends.telemetry import disable_openvino_telemetry

if TYPE_CHECKING:
    from tembed.backends.torch_backend import TorchBackend


def __getattr__(name: str) -> Any:
    """``TorchBackend``, imported (with torch) on first use."""
    if name == "TorchBackend":
        from tembed.backends.torch_backend import TorchBackend

        return TorchBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "EXPORT_TESTED_MODEL_TYPES",
    "Backend",
    "BackendOutput",
    "TokenBatch",
    "TorchBackend",
    "choose_backend",
    "create_backend",
    "disable_openvino_telemetry",
]
