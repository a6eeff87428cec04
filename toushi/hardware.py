"""What the machine can do, where it changes a default: bf16 is worth using on a CPU only when the CPU computes
in it natively (AVX512-BF16 or AMX), elsewhere it is emulated and slower than fp32; and whether a GPU may be there
at all, read from its driver's files without importing torch."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

BF16_FLAGS = {"avx512_bf16", "amx_bf16"}
KIND_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what tells this project's CPU kinds apart
# why `auto` picks a CPU's precision, as the manifests say it (the numbers: SmolLM2-135M on 2-core EPYCs)
WHY_BF16 = ("the CPU computes bf16 natively: vLLM 352 vs 225 out tok/s and LoRA SFT 122 vs 81 tok/s against "
            "fp32 (AVX512-BF16 kind)")
WHY_FP32 = ("no AVX512-BF16 or AMX: bf16 would be emulated, slower than fp32 (transformers on the AVX2 kind: "
            "fp32 38.4 out tok/s, bf16 slower still)")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.cache
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform says."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    return next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")),
                platform.processor() or platform.machine())


def cpu_kind() -> str:
    """The flags that tell the CPU kinds apart, as every recorded time states them: "flags avx2 avx512f ..."."""
    have = [f for f in KIND_FLAGS if f in cpu_flags()]
    return "flags " + " ".join(have or ["(no avx2)"])


def cpu_record() -> dict:
    """What a manifest says of the CPU it ran on: model, cores this process may use, the kind's flags, and the
    precision `auto` picks on it (vLLM's dtype, training's bf16; a GPU decides by its own support) with why."""
    native = cpu_native_bf16()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": cpu_model(), "cores": cores, "flags": cpu_kind().removeprefix("flags "),
            "auto_precision": "bfloat16" if native else "float32", "why": WHY_BF16 if native else WHY_FP32}


def cpu_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware. Measured on a 2-core EPYC with AVX512-BF16
    (SmolLM2-135M): vLLM generation 225 -> 352 tok/s, LoRA SFT 81 -> 122 tok/s against fp32."""
    return bool(BF16_FLAGS & cpu_flags())


def cuda_possible() -> bool:
    """Whether this machine may have a CUDA (or ROCm) device, from its driver's files: asking torch costs its
    import (1-2 s), which a CPU-only `toushi run` of light stages would otherwise pay for nothing."""
    return any(Path(p).exists() for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd"))
