"""Engine reuse within one `toushi run`: a model is loaded once and serves every role and stage."""

from __future__ import annotations

import gc
import json
import sys

import pytest
import yaml

from toushi.engines.pool import EnginePool, engine_key, fits_together
from toushi.paths import repo_root
from toushi.recipe import ModelSpec, Sampling, load_recipe
from toushi.runner import run_stages
from toushi.stages import STAGES
from toushi.store import StageStore


def test_roles_of_one_model_share_an_engine(tiny_model):
    weak = ModelSpec(name=str(tiny_model), engine="hf", dtype="float32", sampling=Sampling(temperature=0.9))
    strong = weak.model_copy(update={"sampling": Sampling(temperature=0.0, max_tokens=4)})
    other = weak.model_copy(update={"dtype": "bfloat16"})
    assert engine_key(weak) == engine_key(strong) != engine_key(other)
    pool = EnginePool()
    try:
        a, b = pool.get(weak), pool.get(strong)
        assert a.engine is b.engine and pool.stats() == {"started": 1, "reused": 1}
        out = b.generate([[{"role": "user", "content": "I lost my job."}]], strong.sampling)
        assert out[0][0].completion_tokens > 0
        b.close()  # a role's view frees nothing
        assert pool.get(weak).engine is a.engine
        assert pool.get(other).engine is not a.engine and pool.stats()["started"] == 2
    finally:
        pool.close()


def test_memory_rule_for_two_models():
    gpu = dict(engine="vllm", gpu_memory_utilization=0.85)
    assert not fits_together([ModelSpec(name="a/weak", **gpu), ModelSpec(name="b/strong", **gpu)])
    assert fits_together([ModelSpec(name="a/weak", engine="vllm", gpu_memory_utilization=0.4),
                          ModelSpec(name="b/strong", engine="vllm", gpu_memory_utilization=0.45)])
    cpu = dict(engine="vllm", kv_cache_gb=0.5)
    assert fits_together([ModelSpec(name="a/weak", **cpu), ModelSpec(name="b/strong", **cpu)])


def test_one_engine_start_for_two_roles_and_two_stages(tmp_path, offline_model):
    """pairs (weak + strong) and guided (weak) on SmolLM2 through a real vLLM engine: one start in all."""
    stages = ["corpus", "pairs", "guided"]
    spec = {"name": "smollm2-135m-instruct", "engine": "vllm", "enforce_eager": True, "max_model_len": 1024,
            "kv_cache_gb": 0.25, "dtype": "auto", "sampling": {"temperature": 0.0, "max_tokens": 12}}
    strong = {**spec, "system_prompt_file": str(repo_root() / "toushi/templates/en/strong_system.j2"),
              "sampling": {"temperature": 0.3, "max_tokens": 16, "seed": 0}}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({
        "run": {"name": "pool", "dir": str(tmp_path / "runs"), "stages": stages},
        "models": {"weak": spec, "strong": strong},
        "corpus": {"sources": [{"path": str(repo_root() / "data" / "venting_en.jsonl")}], "per_scene": 1,
                   "max_posts": 6},
    }))
    recipe = load_recipe(p)
    from toushi.engines.vllm_engine import VLLMEngine

    closing = []  # the whole-heap collections run while an engine closes

    def inside_close(phase, info):
        frame = sys._getframe(1)
        while phase == "start" and info["generation"] == 2 and frame is not None:
            if frame.f_code is VLLMEngine.close.__code__:
                closing.append(frame)
                break
            frame = frame.f_back
    guidance = StageStore(recipe.run_dir, "guidance")
    guidance.dir.mkdir(parents=True)
    (guidance.dir / "guidance.json").write_text(json.dumps({"dimensions": [{
        "name": "Validation", "definition": "Name the feeling first.",
        "rules": [{"text": "Say what the person seems to feel", "support": 1, "pair_ids": []}]}]}))
    gc.callbacks.append(inside_close)
    try:
        assert run_stages(recipe, STAGES) == {s: "ran" for s in stages}
    finally:
        gc.callbacks.remove(inside_close)
    # dtype auto: the CPU decides (bf16 only where it computes it natively), and each manifest says what it chose
    # and why, beside the CPU's kind
    pairs = StageStore(recipe.run_dir, "pairs").manifest()
    native = "avx512_bf16" in pairs["cpu"]["flags"].split() or "amx_bf16" in pairs["cpu"]["flags"].split()
    chose = "bfloat16" if native else "float32"
    assert pairs["cpu"]["auto_precision"] == chose and pairs["cpu"]["why"]
    assert pairs["engines"] == {"started": 1, "reused": 1, "dtypes": {"smollm2-135m-instruct": chose}}
    guided = StageStore(recipe.run_dir, "guided").manifest()["engines"]
    assert guided == {"started": 0, "reused": 1, "dtypes": {"smollm2-135m-instruct": chose}}
    # the roles still differ per call: the strong role's system prompt reached the shared engine
    for rec in StageStore(recipe.run_dir, "pairs").records():
        assert rec["strong"][0]["prompt_tokens"] > rec["weak"][0]["prompt_tokens"] + 20
        assert rec["strong"][0]["completion_tokens"] <= 16 and rec["weak"][0]["completion_tokens"] <= 12
    # the engine froze the heap before it started (toushi/heap.py); closed, it leaves the collector on and nothing
    # frozen: a frozen object that died in a reference cycle later would never be freed
    assert gc.isenabled() and gc.get_freeze_count() == 0
    # and it collected the heap once, after dropping the engine, which freed all of it (vLLM's teardown would collect
    # it twice more while the engine still held the model: 0.5 s each, 2-core AMD EPYC of the AVX512-BF16 kind)
    assert len(closing) == 1, len(closing)
    del closing[:]
    from vllm import LLM

    assert not [o for o in gc.get_objects() if type(o) is LLM]  # type(): isinstance wakes deprecated proxies


def test_a_failed_engine_start_leaves_the_collector_as_it_was(tmp_path):
    """The engine froze the heap before vLLM failed to build it: with no engine to close, the heap is unfrozen
    at once (a frozen object that died in a reference cycle later would never be freed)."""
    from toushi.engines import GenerationError
    from toushi.engines.vllm_engine import VLLMEngine

    (tmp_path / "config.json").write_text("{}")  # a directory that is no model
    spec = ModelSpec(name=str(tmp_path), engine="vllm", enforce_eager=True, kv_cache_gb=0.25)  # valid: built outside
    with pytest.raises(Exception) as failed:  # noqa: B017  which error vLLM raises is its own; the heap is tested
        VLLMEngine(spec)
    assert not isinstance(failed.value, GenerationError), failed.value  # vLLM failed, past the heap's freeze
    assert gc.isenabled() and gc.get_freeze_count() == 0
