"""What the CPU can do, where it changes a default: bf16 is worth using on a CPU only when the CPU computes
in it natively (AVX512-BF16 or AMX). Elsewhere bf16 is emulated and slower than fp32."""

from __future__ import annotations

import functools
from pathlib import Path

BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


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


def cpu_native_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic in hardware. Measured on a 2-core EPYC with AVX512-BF16
    (SmolLM2-135M): vLLM generation 225 -> 352 tok/s, LoRA SFT 81 -> 122 tok/s against fp32."""
    return bool(BF16_FLAGS & cpu_flags())
