"""Python's cyclic garbage collector and the heap that torch, transformers, TRL and vLLM build when imported.

Those imports leave about 700,000 long-lived objects (modules, classes, functions: never garbage). While that
heap grows, Python runs a full collection each time it has grown by a quarter, each walking all of it again: 9
of them in a launched trainer's imports, about 1 s (the same CPU as below). vLLM also collects explicitly several times while an
engine starts and again when it stops, about 0.35-0.45 s each with that heap (2-core AMD EPYC, AVX512-BF16 kind).
Freezing the heap once the imports are done (gc.freeze, as vLLM does itself once its engine has started) takes
those objects out of every later collection's walk; objects that die later are still freed by their reference
counts, and an engine's close (toushi.engines.vllm_engine) unfreezes the heap and collects it whole.
"""

from __future__ import annotations

import gc


def imports_done(enable: bool = True) -> None:
    """After imports made with the collector off (``gc.disable()`` before them): freeze what they built and turn
    the collector back on (``enable=False``: leave it as the caller had it, off)."""
    gc.freeze()
    if enable:
        gc.enable()
