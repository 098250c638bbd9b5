"""Which backend runs a model: the registry of backends, the ``"auto"`` choice, and building one by name.

Adding a backend is one module with a class that implements :class:`tembed.backends.base.Backend` and has a
``create`` class method (:class:`tembed.backends.base.BackendFactory`), plus one line in :data:`REGISTRY`. Nothing
here imports a backend's module (nor torch, nor an inference engine) until that backend is built.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, NamedTuple, Protocol, cast

if TYPE_CHECKING:
    import torch

    from tembed.backends.base import Backend, BackendFactory


class BackendEntry(NamedTuple):
    """A registered backend.

    Attributes:
        module: the module that defines it, imported when the backend is built.
        cls: the class's name in that module (a :class:`tembed.backends.base.BackendFactory`).
        cpu_only: whether it runs on the CPU only (asked for on another device, it is refused).
        requires: the package it needs, checked before its module is imported (None: a core dependency that is
            always there).
    """

    module: str
    cls: str
    cpu_only: bool
    requires: str | None = None


REGISTRY: dict[str, BackendEntry] = {
    "torch": BackendEntry("tembed.backends.torch_backend", "TorchBackend", cpu_only=False),
    "onnx": BackendEntry("tembed.backends.onnxruntime", "OnnxRuntimeBackend", cpu_only=True, requires="onnxruntime"),
    "openvino": BackendEntry("tembed.backends.openvino", "OpenVinoBackend", cpu_only=True, requires="openvino"),
}

BACKENDS: tuple[str, ...] = ("auto", *REGISTRY)

# Architectures whose ONNX export is tested (encoder models: BERT, RoBERTa / XLM-R and friends).
EXPORT_TESTED_MODEL_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "camembert", "mpnet", "electra"}


class HasDeviceType(Protocol):
    """What :func:`choose_backend` reads of a device: its type (a ``torch.device``, or any stand-in)."""

    @property
    def type(self) -> str: ...


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def choose_backend(backend: str, precision: str, device: HasDeviceType, model_type: str | None = None) -> str:
    """The concrete backend for a request (``device``: a ``torch.device`` or anything with its ``type``).

    ``"auto"`` is torch on GPUs. On the CPU, for encoder models whose export is tested (``model_type`` in
    :data:`EXPORT_TESTED_MODEL_TYPES`): ``fp32`` runs on OpenVINO (same vectors as torch, and faster), ``bf16`` on
    OpenVINO (faster and more faithful than torch bf16; fp32 with a warning on CPUs without native bf16), ``int8``
    on the engine this CPU's instruction set makes fastest (:func:`tembed.backends.cpu.int8_engine`): OpenVINO
    static int8 with VNNI / AMX, ONNX Runtime dynamic int8 without (where OpenVINO int8 is slower than fp32).
    The choice never depends on which packages are installed (OpenVINO, NNCF and ONNX Runtime are dependencies).
    Other models run on torch (int8: ONNX Runtime).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        if REGISTRY[backend].cpu_only and device.type != "cpu":
            raise ValueError(f"backend={backend!r} runs on the CPU only; use backend='torch' on {device.type}")
        return backend
    if device.type != "cpu":
        return "torch"
    exportable = model_type is None or model_type in EXPORT_TESTED_MODEL_TYPES
    if precision == "int8":
        from tembed.backends.cpu import int8_engine

        return int8_engine() if exportable else "onnx"
    if precision in ("auto", "fp32", "bf16") and exportable:
        return "openvino"
    return "torch"


def backend_class(name: str) -> BackendFactory:
    """The class of a registered backend, its module imported now. ImportError (with the ``pip install`` that fixes
    it) when the package it needs is missing."""
    if name not in REGISTRY:
        raise ValueError(f"backend must be one of {', '.join(REGISTRY)}, got {name!r}")
    entry = REGISTRY[name]
    if entry.requires is not None and not _installed(entry.requires):
        raise ImportError(f"backend={name!r} needs {entry.requires}: pip install {entry.requires}")
    return cast("BackendFactory", getattr(importlib.import_module(entry.module), entry.cls))


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
    return backend_class(name).create(
        path, device=device, precision=precision, dtype=dtype, trust_remote_code=trust_remote_code, masked_lm=masked_lm
    )
