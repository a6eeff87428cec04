"""toushi (偷师): distil a strong reasoning model's emotional-support skill into a small student."""

import os

# CPU tensors of 2 MB and more on transparent huge pages. Training and vLLM on a CPU allocate and free tensors of
# hundreds of MB at every step; on 4 KB pages each comes back as page faults the kernel must fill with zeroed
# pages: 2.8 million of them in one DPO step of the rehearsal, 0.26 million on huge pages. Once a run's vLLM
# engines had freed their memory, those faults cost 3x the system time, and that step took 9-14 s instead of 4.9
# (the rehearsal 1 min 47 s instead of 2 min 05 s, its engines faster too; AVX512-BF16 kind). PyTorch reads the
# variable once, when torch is imported, so it is set here, before any toushi module imports torch, and every
# process toushi starts (trainers, servers) inherits it; a value already set stands (0 turns it off).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# Freed memory stays in the process on a CPU-only machine, for the next step's tensors (toushi/heap.py): set
# here for the same reason, and for every process toushi starts.
from toushi.heap import keep_freed_memory  # noqa: E402

keep_freed_memory()

__version__ = "0.1.0"
