"""vLLM's OpenAI-compatible server as toushi starts it (toushi.engines.server): ``python -m
toushi.engines.api_server ARGS`` runs the ``main`` that ``python -m vllm.entrypoints.openai.api_server ARGS`` runs, with
the same arguments, after importing it with Python's collector off and then freezing what the imports built
(toushi/heap.py).

Why: with the collector on, the server's imports (vLLM, FastAPI, openai's and vLLM's pydantic models) ran a full
collection each time the heap grew by a quarter, each walking all of it again, and the engine core the server spawns
paid the same again: it imports the server's main module (``__mp_main__``) before its own work. A SmolLM2-135M server
(fp32, eager) answered /health after 17.1 s, with 18.6 s of CPU in its processes, against 11.1-12.1 s and 12.4-13.8 s
this way (2-core AMD EPYC, AVX512-BF16 kind). The engine core gets the same imports through this module, which only
starts a server when run as ``__main__``. The collector is back on before the server starts: a long-running server
must still free its cyclic garbage, and objects the imports built are freed by their reference counts as before.
"""

import gc
import runpy

from toushi.heap import imports_done

gc.disable()
try:  # vLLM 0.32 (the CPU pin): `python -m vllm.entrypoints.openai.api_server` warns it is deprecated, then calls this
    from vllm.entrypoints.launchers.api_server.entry import main
except ImportError:  # another vLLM (the GPU extra is not pinned): that module may be the server itself, run it as before
    import vllm.entrypoints.openai.api_server  # noqa: F401  (its imports, with the collector off)

    main = None

imports_done()

if __name__ == "__main__":
    if main is not None:
        main()
    else:
        runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
