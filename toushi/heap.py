"""The two heaps a toushi process builds: Python's objects (its cyclic garbage collector) and the C heap that
torch's CPU tensors come from (glibc's malloc).

Python's collector. The imports of torch, transformers, TRL and vLLM leave about 700,000 long-lived objects
(modules, classes, functions: never garbage). While that heap grows, Python runs a full collection each time it
has grown by a quarter, each walking all of it again: 9 of them in a launched trainer's imports, about 1 s (the
same CPU as below). vLLM also collects explicitly several times while an engine starts and again when it stops,
about 0.35-0.45 s each with that heap (2-core AMD EPYC, AVX512-BF16 kind). Freezing the heap once the imports
are done (gc.freeze, as vLLM does itself once its engine has started) takes those objects out of every later
collection's walk; objects that die later are still freed by their reference counts, and an engine's close
(toushi.engines.vllm_engine) unfreezes the heap and collects it whole.

The C heap. glibc serves an allocation above its mmap threshold (32 MB at most) with a fresh mmap and unmaps it
when freed. Training and generation on a CPU allocate and free tensors that large at every step (a batch's
logits over a 49k or 152k vocabulary, their log-softmax, the embedding's gradient), so each step asked the kernel
for new pages and the kernel zeroed every one: clear_page was a fifth of all CPU samples in a rehearsal run, more
than any kernel of the model's (2-core AMD EPYC, AVX512-BF16 kind). Huge pages (toushi/__init__.py) make those
faults fewer, not the zeroing. On a machine without a GPU, toushi therefore keeps freed memory in the process (no
mmap for large blocks, no trimming of the heap's top below 2 GiB) and hands it back where a whole model's worth is
freed at once: when an engine closes (``release_freed_memory``). A GPU machine's tensors live on the card; its
processes keep glibc's defaults.

What that buys: `python scripts/bench_train.py --steps 6 --seq 256 --batch 4` (LoRA SFT of SmolLM2-135M through
TRL, pinned to one core, two runs each, alternated) ran 175 and 183 tokens/s with 41,000 and 16,000 page faults a
step, against 134 and 130 tokens/s and 742,000 with glibc's defaults (GLIBC_TUNABLES=glibc.malloc.perturb=0;
2-core AMD EPYC, AVX512-BF16 kind). It is not certain for every tensor: torch asks for a large block page-aligned
(posix_memalign), and glibc 2.36 serves that only from a free block at least a page larger than the request. A
tensor that fits in a larger freed block always reuses it; one the same size as the block freed just before
reuses it only where that block has joined the free memory beside it, which depends on where small allocations
landed meanwhile (five 256 MB tensors in a row: new pages again in 1 of 24 to 33 of 40 processes, by batch of
runs). Turning glibc's fastbins off made that reliable but did not help training (the same benchmark: 177 and
145 tokens/s against 183 and 174) or the effect test's fixture, so it was left out.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform

# glibc's mallopt parameters (malloc.h) and the values toushi sets; GLIBC_TUNABLES says the same to the processes
# toushi starts, which read it when they start (a trainer, a vLLM server). mallopt takes a C int: 2 GiB - 1 is the
# highest trim threshold it can be given (the small models a CPU runs free far less than that in a step).
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
TRIM_THRESHOLD = 2**31 - 1
MALLOC_TUNABLES = f"glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={TRIM_THRESHOLD}"


def imports_done(enable: bool = True) -> None:
    """After imports made with the collector off (``gc.disable()`` before them): freeze what they built and turn
    the collector back on (``enable=False``: leave it as the caller had it, off)."""
    gc.freeze()
    if enable:
        gc.enable()


@contextlib.contextmanager
def collections_deferred():
    """Inside: ``gc.collect()`` collects nothing. For a library's teardown that collects the whole heap itself while
    the caller still holds what it tears down, when the caller collects once right after dropping it (vLLM's
    in-process engine: toushi.engines.vllm_engine). Automatic collections still run."""
    collect = gc.collect
    gc.collect = lambda generation=2: 0
    try:
        yield
    finally:
        gc.collect = collect


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(None)


def keep_freed_memory() -> bool:
    """On a machine without a GPU: this process and those it starts keep the memory they free for their next
    tensors instead of giving it back to the kernel (module doc). Left alone where GLIBC_TUNABLES already sets a
    malloc tunable (someone chose) and where libc is not glibc. Returns whether it took effect."""
    from toushi.hardware import cuda_possible

    libc = _glibc()
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if libc is None or cuda_possible() or "glibc.malloc." in tunables:
        return False
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{MALLOC_TUNABLES}" if tunables else MALLOC_TUNABLES
    return True


def release_freed_memory() -> None:
    """Give the kernel back the free memory the C heap holds (glibc's malloc_trim): after a model and its cache
    are freed, so that memory counts as available again for the next engine's own sizing, another process or
    a trainer, rather than as this process's."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
