"""The AVX2 kind's code paths on an AVX512 host: torch's and oneDNN's kernels capped at AVX2, MKL too, torch.cpu
reporting no AVX512 (so vLLM loads its _C_AVX2 build) and toushi.hardware seeing no avx512 flags (so `auto` picks
fp32). Every Python process that has this folder first on PYTHONPATH gets it, the trainers and servers toushi
starts included:

    PYTHONPATH=scripts/avx2_emulation:. pytest tests/test_engine_pool.py   # the fp32 path, here

It runs the same code as that kind, not at its speed: on the AVX512-BF16 host the transformers engine made 70.1
out tok/s in fp32 under it against 64.7 without (64 prompts), while the AVX2 host made 38.4 against this host's 82.3
(128 prompts): that host is slower in itself (docs/benchmarks.md). Test the paths with it; never time that kind."""
import importlib.abc
import importlib.util
import os
import sys

os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
os.environ.setdefault("DNNL_MAX_CPU_ISA", "AVX2")
os.environ.setdefault("MKL_ENABLE_INSTRUCTIONS", "AVX2")


def _patch_torch_cpu(mod):
    real = mod.get_capabilities

    def get_capabilities():
        caps = dict(real())
        for k in list(caps):
            if k.startswith("avx512") or k.startswith("amx"):
                caps[k] = False
        return caps

    mod.get_capabilities = get_capabilities


def _patch_hardware(mod):
    real = mod.cpu_flags

    def cpu_flags():
        return frozenset(f for f in real() if not (f.startswith("avx512") or f.startswith("amx")))

    mod.cpu_flags = cpu_flags


PATCHES = {"torch.cpu": _patch_torch_cpu, "toushi.hardware": _patch_hardware}


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader, patch = spec.loader, PATCHES[name]
        real_exec = loader.exec_module

        def exec_module(module):
            real_exec(module)
            patch(module)

        loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Finder())
