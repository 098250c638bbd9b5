"""What this CPU can do: its model name and the instruction-set flags that pick tembed's CPU engines.

The int8 engine follows the instruction set, never which optional packages happen to be installed
(:func:`int8_engine`): with int8 dot products that add into int32 (AVX512-VNNI, AVX-VNNI, AMX-INT8) OpenVINO's
static int8 is the fastest; without them (AVX2 only: Zen 2/3, Haswell to Comet Lake; Skylake-X) OpenVINO int8 is
slower than fp32, and ONNX Runtime dynamic int8 is the one that pays (measurements: docs/cpu-performance.md).
"""

from __future__ import annotations

import platform

# The flags that decide an engine's speed here, in the order `describe_cpu` prints them.
INSTRUCTION_SET_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
CPUINFO = "/proc/cpuinfo"


def _cpuinfo_field(path: str, *keys: str) -> str | None:
    """The value of the first ``/proc/cpuinfo`` line starting with one of ``keys``; None where there is none."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith(keys):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def cpu_flags(path: str = CPUINFO) -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (``avx2``, ``avx512_vnni``...); empty where unknown."""
    return frozenset((_cpuinfo_field(path, "flags", "Features") or "").split())


def cpu_model(path: str = CPUINFO) -> str:
    """The CPU's model name (``/proc/cpuinfo``'s ``model name``), else what :mod:`platform` knows."""
    return _cpuinfo_field(path, "model name") or platform.processor() or platform.machine() or "unknown CPU"


def has_int8_dot(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU has int8 dot products into int32 (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    return bool((cpu_flags() if flags is None else flags) & INT8_DOT_FLAGS)


def has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU computes in bf16 natively (AVX512-BF16 or AMX-BF16)."""
    return bool((cpu_flags() if flags is None else flags) & BF16_FLAGS)


def int8_engine(flags: frozenset[str] | None = None) -> str:
    """The backend ``precision="int8"`` runs on for this CPU: ``"openvino"`` (static int8) with int8 dot
    products, else ``"onnx"`` (ONNX Runtime dynamic int8; also where the flags cannot be read)."""
    return "openvino" if has_int8_dot(flags) else "onnx"


def instruction_set(flags: frozenset[str] | None = None) -> str:
    """A short name for the widest vector extension: ``amx``, ``avx512-vnni``, ``avx512``, ``avx-vnni``, ``avx2``
    or ``baseline`` (none of those, or flags unknown)."""
    flags = cpu_flags() if flags is None else flags
    for name, needed in (
        ("amx", "amx_int8"),
        ("avx512-vnni", "avx512_vnni"),
        ("avx512", "avx512f"),
        ("avx-vnni", "avx_vnni"),
        ("avx2", "avx2"),
    ):
        if needed in flags:
            return name
    return "baseline"


def describe_cpu(flags: frozenset[str] | None = None, model: str | None = None) -> str:
    """One line naming the CPU and the flags that matter, e.g. ``AMD EPYC 7B13 [avx2]: avx2 fma -avx512f ...``
    (``-flag``: the CPU lacks it)."""
    flags = cpu_flags() if flags is None else flags
    listed = " ".join(flag if flag in flags else f"-{flag}" for flag in INSTRUCTION_SET_FLAGS)
    return f"{model or cpu_model()} [{instruction_set(flags)}]: {listed}"
