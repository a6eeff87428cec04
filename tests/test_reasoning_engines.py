"""A reasoning model's thinking budget and structured answers after </think>, on R1-Distill-Qwen-7B's twin (its
real tokenizer and template, random weights: the model never closes its think block by itself, so every closed
block here was closed by the budget) through the offline vLLM engine, a vLLM server and the hf engine's two steps."""

from __future__ import annotations

import contextlib
import json

import jsonschema
import pytest
from conftest import R1_TWIN, cpu_vllm_spec

from toushi.engines import Structured, make_engine
from toushi.engines.pool import RoleEngine
from toushi.recipe import ModelSpec, Sampling

R1 = R1_TWIN
BUDGET = 8
SAMPLING = Sampling(temperature=0.8, top_p=0.95, max_tokens=40, seed=0)
CONVS = [[{"role": "user", "content": "I failed my driving test today."}],
         [{"role": "user", "content": "我今天考试没过，很难过。"}]]
FEELING = {"type": "object", "properties": {"feeling": {"type": "integer", "minimum": 0, "maximum": 100},
                                            "mood": {"enum": ["better", "same", "worse"]}},
           "required": ["feeling", "mood"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engines(twins, r1_server):
    """The three paths to the same twin, each shared by the tests: offline vLLM, the openai engine on the
    session's R1 twin server (started in the background, tests/conftest.py), the hf engine."""
    built: dict[str, tuple] = {}

    def get(path: str, budget: int | None = BUDGET) -> RoleEngine:
        """A role's view of the shared engine (as the engine pool gives one), with this thinking budget."""
        if path not in built:
            if path == "server":
                spec = ModelSpec(name=R1, engine="openai", base_url=r1_server.get().base_url, reasoning=True)
            elif path == "vllm":
                spec = cpu_vllm_spec(R1, reasoning=True)
            else:
                spec = ModelSpec(name=R1, engine="hf", dtype="float32", reasoning=True)
            built[path] = (stack.enter_context(make_engine(spec)), spec)
        engine, spec = built[path]
        return RoleEngine(engine, spec.model_copy(update={"thinking_budget": budget}))

    with contextlib.ExitStack() as stack:
        yield get


@pytest.mark.parametrize("path", ["vllm", "server", "hf"])
def test_thinking_budget_closes_think_and_answers(engines, path):
    for (c,) in engines(path).generate(CONVS, SAMPLING):
        assert "think_budget_hit" in c.flags and "unterminated_think" not in c.flags, c
        assert c.reasoning and c.text and "</think>" not in c.text  # the reasoning was cut, then an answer came
        assert c.completion_tokens > BUDGET
    if path != "server":  # the same sample with no budget thinks to max_tokens and has no answer
        (c,) = engines(path, None).generate(CONVS[:1], SAMPLING)[0]
        assert c.flags == ["empty", "unterminated_think", "truncated"] and c.text == "" and c.finish_reason == "length"


@pytest.mark.parametrize("path", ["vllm", "server", "hf"])
def test_json_constrained_after_think(engines, path):
    sampling = SAMPLING.model_copy(update={"max_tokens": 60})
    for (c,) in engines(path).generate(CONVS, sampling, structured=Structured(json_schema=FEELING)):
        # the reasoning is free text, the JSON starts after </think> and satisfies the schema
        assert c.reasoning and not c.reasoning.lstrip().startswith("{"), c
        jsonschema.validate(json.loads(c.text), FEELING)
        assert "think_budget_hit" in c.flags and "unstructured" not in c.flags
    if path != "server":  # without a budget the block never closes: no JSON, counted as unstructured
        (c,) = engines(path, None).generate(CONVS[:1], sampling, structured=Structured(json_schema=FEELING))[0]
        assert "unterminated_think" in c.flags and "unstructured" in c.flags


@pytest.mark.parametrize("path", ["vllm", "server", "hf"])
def test_stop_string_ends_the_answer_after_think(engines, path):
    """The rehearsal's samplings: a budget of one token (the prompt's own "<think>\\n": R1 answers at once, with no
    reasoning) and a stop string ("e", which random text holds every few tokens). Each answer ends at the stop as a
    stop, not cut at max_tokens, so it can be a training target; on every path alike."""
    sampling = SAMPLING.model_copy(update={"stop": ["e"]})
    done = [c for (c,) in engines(path, 1).generate(CONVS, sampling)]
    for c in done:
        assert c.finish_reason == "stop" and "truncated" not in c.flags and "think_budget_hit" in c.flags, c
        assert not c.reasoning and "e" not in c.text and "</think>" not in c.text, c
        assert c.completion_tokens < SAMPLING.max_tokens, c
    assert any(c.text for c in done), done
