"""Engines on the real offline model: vLLM offline (batch, n, seed, LoRA), transformers, OpenAI client."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import REPO, SERVER_KEY_ENV, SERVER_MODEL, cpu_vllm_spec
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


def test_cpu_engine_runs_in_this_process_on_every_core(vllm_engine):
    """On a CPU the offline engine runs in this process: no engine-core or worker process to start (12 s
    instead of 31 s measured here) or to outlive toushi. On a few cores its model threads use them all (vLLM
    would keep one for a scheduler: 1.75x the output tok/s measured on 2 cores)."""
    import os

    import psutil
    import torch

    # an engine of this process would spawn its engine core as a child of this process; the session's background
    # servers (processes of their own by design) have theirs further down, under their API server processes
    vllm_procs = [c for c in psutil.Process().children() if c.name().startswith("VLLM")]
    assert not vllm_procs, "vLLM started engine processes"
    cores = len(os.sched_getaffinity(0))
    if cores <= 4 and "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ:
        assert torch.get_num_threads() == cores  # vLLM bound this process's OpenMP threads: every core


def test_on_cpu_agrees_with_vllms_platform(monkeypatch):
    """toushi reads from the package's metadata what vLLM's platform detection decides (without importing vLLM,
    for processes that only build a server's command line): both agree here, and VLLM_TARGET_DEVICE=cpu is
    honoured as vLLM honours it."""
    from vllm.platforms import current_platform

    from toushi.engines.vllm_engine import on_cpu

    assert on_cpu() is current_platform.is_cpu() is True  # this machine has the vllm-cpu build
    monkeypatch.setattr("importlib.metadata.version", lambda name: "0.32.0")  # an accelerator build's version
    assert on_cpu() is False
    monkeypatch.setenv("VLLM_TARGET_DEVICE", "CPU")
    assert on_cpu() is True


def test_auto_dtype_on_cpu_is_bf16_only_where_native(monkeypatch):
    import toushi.hardware
    from toushi.engines.vllm_engine import resolve_dtype
    from toushi.training import use_bf16

    monkeypatch.setattr(toushi.hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    assert resolve_dtype("auto") == "bfloat16" and use_bf16(None)
    monkeypatch.setattr(toushi.hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert resolve_dtype("auto") == "float32" and not use_bf16(None)
    assert resolve_dtype("bfloat16") == "bfloat16" and use_bf16(True)  # what is set stands


def test_call_caches_key_on_the_dtype_the_weights_run_in(monkeypatch):
    """A changed dtype, or `auto` resolving otherwise on another CPU, must not reuse cached answers."""
    import toushi.hardware
    from toushi.calls import Calls
    from toushi.engines import cache_model

    def key(spec) -> str:
        return Calls(None, cache_model(spec), lambda: None, GREEDY, kind="weak").key(CONVS[0])

    fp32, bf16 = cpu_vllm_spec("m", dtype="float32"), cpu_vllm_spec("m", dtype="bfloat16")
    assert key(fp32) != key(bf16)
    auto = cpu_vllm_spec("m", dtype="auto")
    monkeypatch.setattr(toushi.hardware, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    on_bf16_cpu = cache_model(auto)
    monkeypatch.setattr(toushi.hardware, "cpu_flags", lambda: frozenset())
    assert on_bf16_cpu == cache_model(bf16) and cache_model(auto) == cache_model(fp32)
    # an endpoint's dtype is its own business: its served name is the key
    assert cache_model(ModelSpec(name="m", engine="openai", base_url="http://x/v1", served_model="s")) == "s"


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
    """A seeded batch whose prompts exceed one scheduler step's token budget (4,096 here; ~4.8k prompt tokens): on
    vllm-cpu a split prefill of a seeded request crashed the engine core, so toushi turns it off there."""
    long_post = " ".join(["I keep replaying the argument with my sister and I cannot sleep."] * 30)
    convs = [[{"role": "user", "content": f"({i}) {long_post}"}] for i in range(10)]
    out = vllm_engine.generate(convs, Sampling(temperature=0.8, max_tokens=2, n=1, seed=3))
    assert len(out) == 10 and all(c[0].prompt_tokens > 400 and c[0].completion_tokens >= 1 for c in out)
    assert sum(c[0].prompt_tokens for c in out) > vllm_engine.kwargs["max_num_batched_tokens"]  # split across steps


def test_vllm_lora_adapter_changes_output(vllm_engine, vllm_greedy):
    adapted = vllm_engine.generate(CONVS, GREEDY, lora_name="tiny")
    assert adapted[0][0].model == "tiny"
    assert [c[0].text for c in adapted] != [c[0].text for c in vllm_greedy]
    with pytest.raises(ValueError, match="no LoRA adapter named 'nope'"):
        vllm_engine.generate(CONVS, GREEDY, lora_name="nope")
    # the base and the adapter in one call (an adapter per request), as eval generates every student at once:
    # the same greedy answers as the separate calls (vllm-cpu gave the base rows an adapter in a mixed batch)
    for names in ([None] * len(CONVS) + ["tiny"] * len(CONVS), ["tiny"] * len(CONVS) + [None] * len(CONVS)):
        mixed = vllm_engine.generate(CONVS + CONVS, GREEDY, lora_name=names)
        want = vllm_greedy + adapted if names[0] is None else adapted + vllm_greedy
        assert [c[0].text for c in mixed] == [c[0].text for c in want]
        assert [c[0].model for c in mixed] == [n or "smollm2-135m-instruct" for n in names]
    with pytest.raises(ValueError, match="2 adapter names for 3 conversations"):
        vllm_engine.generate(CONVS, GREEDY, lora_name=["tiny", None])


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


# ---- structured outputs: every engine returns parseable, schema-valid JSON for a constrained request

FEELING = {"type": "object", "additionalProperties": False, "required": ["feeling", "intensity"],
           "properties": {"feeling": {"type": "string", "maxLength": 40},
                          "intensity": {"type": "integer", "minimum": 1, "maximum": 10}}}
ASK_JSON = [[{"role": "user", "content": "I failed my driving test again. As JSON: my feeling and its intensity."}],
            [{"role": "user", "content": "My cat died today. Name the feeling and how strong it is, in JSON."}]]
ASK_CHOICE = [{"role": "user", "content": "Which reply is kinder to a grieving friend: A) 'I'm so sorry, that hurts' "
                                          "or B) 'It was just a cat'? Answer A, B or tie."}]


def check_structured(engine):
    """A JSON-schema request and a choices request with logprobs, in one batch."""
    from toushi.engines import Structured

    schema, choice = Structured(json_schema=FEELING), Structured(choices=("A", "B", "tie"))
    out = engine.generate(ASK_JSON + [ASK_CHOICE], Sampling(temperature=0.0, max_tokens=48),
                          structured=[schema, schema, choice], logprobs=5)
    for cs in out[:2]:
        value = json.loads(cs[0].text)  # parseable, and valid under the schema
        assert set(value) == {"feeling", "intensity"} and 1 <= value["intensity"] <= 10, cs[0].text
        assert "unstructured" not in cs[0].flags
    choice_out = out[2][0]
    assert choice_out.text in ("A", "B", "tie")
    first = choice_out.logprobs[0]  # reported after the constraint's mask: only choice tokens carry mass
    assert first and all(t.strip() and "tie".startswith(t.strip().lower()) or t.strip() in "AB" for t in first)
    assert 0.99 < sum(math.exp(v) for v in first.values()) < 1.01
    free = engine.generate(ASK_JSON[:1], Sampling(temperature=0.0, max_tokens=48))
    assert free[0][0].logprobs is None
    return [cs[0].text for cs in out]


def test_logprobs_on_an_eager_cpu_engine_compile_nothing(vllm_engine):
    """vLLM compiles its logprob rank count with torch.compile at the first request that asks for logprobs (1.7 s
    of a process that judges by logprob); an eager engine in this process generates with Dynamo off, so nothing
    is compiled (the same ops run as written)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    ask = ([[{"role": "user", "content": "Say yes or no."}]], Sampling(temperature=0.0, max_tokens=2))
    torch._dynamo.reset()  # forget what an earlier test of this process compiled or skipped
    (answer,), = vllm_engine.generate(*ask, logprobs=5)
    # without the engine's Dynamo switch this call compiled a frame (frames: total 1, ok 1) and took 1.7 s, not 0.14
    assert answer.logprobs and counters["frames"]["ok"] == 0, dict(counters["frames"])


def test_vllm_structured_outputs(vllm_engine):
    check_structured(vllm_engine)


def test_hf_structured_outputs(offline_model):
    with make_engine(ModelSpec(name="smollm2-135m-instruct", engine="hf", dtype="float32")) as hf:
        check_structured(hf)


def test_openai_structured_outputs_on_vllm_server(vllm_server):
    engine = make_engine(ModelSpec(name=SERVER_MODEL, engine="openai", base_url=vllm_server, api_key_env=SERVER_KEY_ENV))
    check_structured(engine)
    assert engine.structured_refused == {}  # vLLM's server takes response_format and structured_outputs


def test_openai_falls_back_when_an_endpoint_refuses_the_constraint():
    """An endpoint that rejects response_format with a 400 (as some hosted APIs do; a stand-in, since a
    remote API cannot run here): the engine drops the constraint for good, then parses and retries until
    the plain answer satisfies the schema."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from toushi.engines import Structured

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            if "response_format" in body:
                status, reply = 400, {"error": {"message": "response_format json_schema is not supported"}}
            else:
                text = "Sure! You feel sad." if len(body["messages"]) == 1 else '{"feeling": "sad", "intensity": 6}'
                status, reply = 200, {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                      "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant", "content": text}}],
                                      "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}}
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        engine = make_engine(ModelSpec(name="m", engine="openai", base_url=f"http://127.0.0.1:{server.server_port}/v1",
                                       max_retries=0))
        out = engine.generate(ASK_JSON[:1], Sampling(temperature=0.0, max_tokens=32),
                              structured=Structured(json_schema=FEELING))
        # the endpoint refused a JSON schema, not constraints as such: a regex still goes to it as one
        regex = engine.generate(ASK_JSON[:1], Sampling(temperature=0.0, max_tokens=32),
                                structured=Structured(regex="Sure! .*"))
    finally:
        server.shutdown()
    assert json.loads(out[0][0].text) == {"feeling": "sad", "intensity": 6} and "unstructured" not in out[0][0].flags
    url = f"http://127.0.0.1:{server.server_port}/v1"
    assert list(engine.structured_refused) == [(url, "json_schema")]
    assert "not supported" in engine.endpoint_stats()[url]["constraints_refused"]["json_schema"]
    # refused once, then plain requests: the second one spells out the schema after the unusable answer
    assert ["response_format" in b for b in seen] == [True, False, False, False]
    assert '"intensity"' in seen[2]["messages"][-1]["content"] and seen[2]["messages"][-2]["role"] == "assistant"
    assert seen[3]["structured_outputs"] == {"regex": "Sure! .*"} and regex[0][0].text == "Sure! You feel sad."


def test_hf_engine_adapters_per_conversation(offline_model, lora_adapter, monkeypatch):
    """The transformers engine (eval's fallback when vLLM's LoRA fails) takes an adapter per conversation:
    each group runs under its adapter, and the answers equal those of separate calls. Closed, it frees the model
    and its adapters by their reference counts, without a full collection."""
    import gc
    import weakref

    spec = ModelSpec(name="smollm2-135m-instruct", engine="hf", dtype="float32", hf_batch_size=8,
                     lora_adapters={"tiny": lora_adapter})
    short = GREEDY.model_copy(update={"max_tokens": 8})  # PEFT's generate is slow on a CPU: 8 tokens tell
    collections = []
    with make_engine(spec) as hf:
        base = hf.generate(CONVS[:2], short)
        adapted = hf.generate(CONVS[:2], short, lora_name="tiny")
        mixed = hf.generate([CONVS[0], CONVS[1], CONVS[0]], short, lora_name=["tiny", None, None])
        model, weight = weakref.ref(hf.model), weakref.ref(next(hf.model.parameters()))
        monkeypatch.setattr(gc, "collect", lambda generation=2: collections.append(generation) or 0)
    assert model() is None and weight() is None and collections == []
    assert [c[0].text for c in adapted] != [c[0].text for c in base]
    assert [c[0].text for c in mixed] == [adapted[0][0].text, base[1][0].text, base[0][0].text]
    assert [c[0].model for c in mixed] == ["tiny", "smollm2-135m-instruct", "smollm2-135m-instruct"]


def test_hf_engine_stops_at_a_stop_string(tiny_model):
    """A stop string ends generation there (not only the text after it): the random model's sampled words
    end at the first space, in the tokens generated, and the matcher is built once for every call."""
    spec = ModelSpec(name=str(tiny_model), engine="hf", dtype="float32")
    free = Sampling(temperature=1.0, max_tokens=12, seed=0)
    with make_engine(spec) as hf:
        (long,), = hf.generate(CONVS[:1], free)
        stopped = [hf.generate(CONVS[:1], free.model_copy(update={"stop": [" "]}))[0][0] for _ in range(2)]
        assert len(hf._stoppers) == 1
    assert long.finish_reason == "length" and long.completion_tokens == 12 and " " in long.text.strip()
    for c in stopped:  # same seed: the same words, up to the first space
        assert c.finish_reason == "stop" and c.completion_tokens < 12 and " " not in c.text
        assert long.text.startswith(c.text)


def test_a_local_model_directory_is_keyed_by_its_content(tmp_path):
    """A model named by its directory and updated in place (a teacher merged again into the same path: same
    config, same file sizes, other weights) is another model: to every call cache (cache_model), to the
    fingerprint of each stage that reads the role, and to a training checkpoint's fingerprint."""
    from toushi.engines import cache_model
    from toushi.recipe import load_recipe
    from toushi.runner import fingerprint
    from toushi.stages import STAGES
    from toushi.training import checkpoint_fingerprint

    model = tmp_path / "teacher"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    (model / "model.safetensors").write_bytes(b"weights one")
    spec = cpu_vllm_spec(str(model), dtype="float32")
    by_name = {s.name: s for s in STAGES}
    recipe = load_recipe(REPO / "recipes" / "tiny-cpu.yaml", [f"run.dir={tmp_path / 'runs'}",
                                                             f"models.strong.name={model}"])
    def keys():
        ckpt = checkpoint_fingerprint(str(model), {"lora": {"r": 8}}, 0, [{"messages": []}])["base_model"]
        return cache_model(spec), fingerprint(recipe, by_name["pairs"], by_name)[0], ckpt

    before = keys()
    assert before[0].startswith(f"{model}|w=") and before[0].endswith("|float32")
    (model / "model.safetensors").write_bytes(b"weights two")  # same size, other bytes
    after = keys()
    assert after[0] != before[0] and after[1] != before[1] and after[2] != before[2]
    # names that are no directory key as before: a cached toushi name, an endpoint's served model
    assert cache_model(cpu_vllm_spec("m", dtype="float32")) == "m|float32"
