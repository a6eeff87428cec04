"""Engines shared by the stages and roles of one ``toushi run``: a model is loaded once, not once per use.

Roles of the same model differ only per call (system prompt, sampling, thinking budget, LoRA adapter), so
one engine serves them all: ``pool.get(spec)`` returns a view that runs the shared engine with that
role's spec. A vLLM engine serves any LoRA adapter by path (``enable_lora``); if a role needs LoRA, or a
higher rank, than the loaded engine was started with, the engine is restarted once with it. Two
different models stay loaded together only when both fit (with explicit ``kv_cache_gb`` budgets, their weights
and caches by toushi/plan.py's arithmetic; else their GPU memory fractions) within ``GPU_BUDGET``; otherwise the
older is freed before the new one loads. Training stages call ``close()`` first, so the trainer gets the memory.
"""

from __future__ import annotations

from toushi import engines
from toushi.engines import Engine
from toushi.recipe import ModelSpec
from toushi.store import stable_id

GPU_BUDGET = 0.9  # the share of one device's memory that co-resident vLLM engines may claim together

# Fields a role's view applies per call, not when the engine is built. The vLLM engine reads these at call
# time and loads adapters by path; the hf engine loads its adapters at start and the openai engine fixes its
# model name, so for them only the prompt, sampling and thinking budget are per call.
# ``reasoning`` is not: the engine's reasoning parser (structured outputs after </think>, thinking budgets) is
# built in, and would hold back a plain model's constraint waiting for a </think> that never comes.
_PER_CALL_VLLM = {"sampling", "system_prompt_file", "thinking_budget", "served_model", "lora_adapters", "enable_lora"}
_PER_CALL_OTHER = {"sampling", "system_prompt_file", "thinking_budget"}


def engine_key(spec: ModelSpec) -> str:
    """What identifies a loaded engine: the model and how it was built."""
    per_call = _PER_CALL_VLLM if spec.engine == "vllm" else _PER_CALL_OTHER
    return stable_id(spec.engine, spec.model_dump(mode="json", exclude=per_call))


def _needs_lora(spec: ModelSpec) -> bool:
    return spec.engine == "vllm" and (spec.enable_lora or bool(spec.lora_adapters))


def fits_together(specs: list[ModelSpec]) -> bool:
    """Whether these engines can be loaded at once: vLLM engines with explicit KV-cache sizes when their weights
    and caches (toushi/plan.py's arithmetic) add up to at most GPU_BUDGET of the card (on a CPU, of the RAM),
    otherwise when their memory fractions do. An engine whose shape cannot be read counts by its cache alone."""
    vllm = [s for s in specs if s.engine == "vllm"]
    if len(vllm) <= 1:
        return True
    if all(s.kv_cache_gb is not None for s in vllm):
        from toushi.plan import GIB, card_memory, engine_bytes

        card, _, _ = card_memory()
        return sum(engine_bytes(s, None) or s.kv_cache_gb * GIB for s in vllm) <= GPU_BUDGET * card
    return sum(s.gpu_memory_utilization for s in vllm) <= GPU_BUDGET


class RoleEngine(Engine):
    """One role's view of a shared engine: calls run with this role's spec; closing it frees nothing."""

    def __init__(self, engine: Engine, spec: ModelSpec):
        self.engine, self.spec = engine, spec

    def generate(self, *args, **kwargs):
        self.engine.spec = self.spec  # reasoning split, adapter names and model name are per role
        return self.engine.generate(*args, **kwargs)

    def __getattr__(self, name):  # engine-specific extras (tokenizer, stats, ...) of the shared engine
        return getattr(self.engine, name)

    def close(self) -> None:
        pass


class EnginePool:
    def __init__(self, console=None):
        self._engines: dict[str, tuple[Engine, ModelSpec]] = {}  # key -> (engine, spec it was built with)
        self.started = 0
        self.reused = 0
        self.dtypes: dict[str, str] = {}  # model -> the dtype it runs in, of the engines handed out (the manifest's)
        self.console = console

    def _say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(f"[dim]{text}[/dim]", highlight=False)

    def _fits(self, spec: ModelSpec) -> bool:
        return spec.engine != "vllm" or fits_together([s for _, s in self._engines.values()] + [spec])

    def get(self, spec: ModelSpec) -> RoleEngine:
        key = engine_key(spec)
        held = self._engines.get(key)
        if held is not None and _needs_lora(spec):
            built = held[1]
            from toushi.engines.adapters import max_lora_rank

            if not built.enable_lora or max_lora_rank(spec.lora_adapters) > max_lora_rank(built.lora_adapters):
                self._say(f"engines: restarting {spec.name} with LoRA support")
                held[0].close()
                del self._engines[key]
                held = None
        if spec.engine != "openai":
            self.dtypes[spec.name] = engines.run_dtype(spec)
        if held is not None:
            self.reused += 1
            return RoleEngine(held[0], spec)
        if not self._fits(spec):
            self._say(f"engines: freeing {len(self._engines)} engine(s) before loading {spec.name}")
            self.close()
        build = spec.model_copy(update={"enable_lora": True}) if _needs_lora(spec) else spec
        engine = engines.make_engine(build)  # looked up per call, so a wrapper around it (tests) sees it
        self._engines[key] = (engine, build)
        self.started += 1
        return RoleEngine(engine, spec)

    def close(self) -> None:
        """Free every engine (before training, and at the end of the run)."""
        held = [e for e, _ in self._engines.values()]
        self._engines.clear()
        for e in held:
            e.close()

    def stats(self) -> dict[str, int]:
        return {"started": self.started, "reused": self.reused}
