"""The devices of a pool, and the CPU cores its CPU workers share."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from tembed.devices import resolve_device
from tembed.types import DeviceLike


def resolve_devices(device: DeviceLike | Sequence[DeviceLike]) -> list[torch.device]:
    """The devices of a ``device`` argument, as a list (one worker each).

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``, an int, ``"auto"`` / None (one device: the first
            GPU, else MPS, else the CPU); a comma-separated string of those (``"cpu,cpu"``,
            ``"cuda:0,cuda:1"``, as a command line gives them); or a list / tuple of those (repeat ``"cpu"`` for
            several CPU workers).

    Raises:
        ValueError: an entry names no device or an unavailable one, or the list is empty.
    """
    if isinstance(device, str):
        if "," not in device:
            return [resolve_device(device)]
        entries = [entry.strip() for entry in device.split(",")]
        if not all(entries):
            raise ValueError(f"device {device!r} has an empty entry: give device names separated by commas")
        return [resolve_device(entry) for entry in entries]
    if isinstance(device, Sequence):
        if not device:
            raise ValueError("device list is empty: give at least one device")
        return [resolve_device(entry) for entry in device]
    return [resolve_device(device)]


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def cpu_threads_per_worker(devices: list[torch.device], threads_per_worker: int | None) -> int:
    """Torch threads per CPU worker: ``threads_per_worker``, else the cores divided among the CPU workers."""
    n_cpu = sum(1 for d in devices if d.type == "cpu")
    return threads_per_worker or max(1, available_cores() // max(1, n_cpu))
