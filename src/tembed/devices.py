"""Devices, compute precision, and telling a real out-of-memory error from every other error."""

from __future__ import annotations

import torch

from tembed.types import PRECISIONS, DeviceLike

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: DeviceLike) -> torch.device:
    """One device from a user's value.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, an int (CUDA index), ``"auto"`` or None
            (the first GPU if any, else Apple MPS if any, else the CPU).

    Raises:
        ValueError: the value names no device, or a device that is not available here.
    """
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda:0")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if isinstance(device, bool):
        raise ValueError(f"device must be a str, int or torch.device, got {device!r}")
    if isinstance(device, int):
        device = f"cuda:{device}"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a device name (cpu, cuda, cuda:N, mps, auto)") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available on this machine")
        index = 0 if resolved.index is None else resolved.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        return torch.device("cuda", index)
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available on this machine")
    return resolved


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype for a precision on a device.

    ``"auto"`` is fp32 on the CPU (faithful) and fp16 on GPUs; ``"int8"`` computes in float32 around int8
    weights. Outputs are float32 whatever the compute dtype.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if precision == "int8":  # int8 weights, float32 activations and outputs (OpenVINO / ONNX Runtime)
        return torch.float32
    return _DTYPES[precision]


def is_out_of_memory(error: BaseException) -> bool:
    """True only for a real out-of-memory error (CUDA, MPS or the CPU allocator), never for other errors."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    if not isinstance(error, RuntimeError):
        return False
    message = str(error)
    return (
        "CUDA out of memory" in message
        or "MPS backend out of memory" in message
        or "DefaultCPUAllocator: can't allocate memory" in message
        or "DefaultCPUAllocator: not enough memory" in message
    )


def release_cached_memory(device: torch.device) -> None:
    """Give cached allocator blocks back after an out-of-memory error."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()
