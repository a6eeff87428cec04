"""Serving and inference on real vLLM servers: the openai engine against offline vLLM, the API-keyed server
with the run's LoRA adapter (every route behind the key), resumable ``toushi generate``, and chat.

All of them use the session server (tests/conftest.py: ``toushi serve``'s code path with a key, the sft adapter
and request limits): a server start costs most of a minute here. Servers killed mid-stage are in
tests/test_replicas.py, over the two replicas of ``toushi serve --replicas 2``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from tests.conftest import REPO, SERVER_KEY, SERVER_KEY_ENV, SERVER_MODEL, cpu_vllm_spec
from toushi.chat import ChatSession, chat_loop, default_model, make_client
from toushi.cli import app
from toushi.engines import GenerationError, make_engine
from toushi.generate import generate_from_recipe
from toushi.recipe import ModelSpec, Recipe, Sampling
from toushi.serve import describe, make_server, serve_spec
from toushi.store import read_jsonl

MODEL = SERVER_MODEL
CONVS = [
    [{"role": "user", "content": "I failed my driving test again and I feel stupid."}],
    [{"role": "system", "content": "You are a kind friend."}, {"role": "user", "content": "My cat died today."}],
    [{"role": "user", "content": "Nobody came to my birthday party."}],
]
GREEDY = Sampling(temperature=0.0, max_tokens=24, n=1, seed=0)
KEY_ENV, KEY = SERVER_KEY_ENV, SERVER_KEY


def texts(results) -> list[str]:
    return [cs[0].text for cs in results]


# ------------------------------------------------------------------------- (1) openai engine == offline


def test_openai_engine_on_vllm_server_matches_offline_vllm(vllm_server, vllm_engine):
    spec = ModelSpec(name=MODEL, engine="openai", base_url=vllm_server, api_key_env=KEY_ENV, concurrency=3)
    with make_engine(spec) as engine:
        served = engine.generate(CONVS, GREEDY)
    offline = vllm_engine.generate(CONVS, GREEDY)  # the same server settings (tests/conftest.cpu_vllm_spec)
    assert all(t for t in texts(served))
    assert texts(served) == texts(offline)
    assert [c[0].prompt_tokens for c in served] == [c[0].prompt_tokens for c in offline]
    assert [c[0].completion_tokens for c in served] == [c[0].completion_tokens for c in offline]
    assert [c[0].finish_reason for c in served] == [c[0].finish_reason for c in offline]


# ------------------------------------------------------------------------- serve plan (no server start)


def write_recipe(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def test_serve_registers_run_adapters_for_the_student_only_and_guards_public_binds(tmp_path, lora_adapter):
    runs = tmp_path / "runs"
    shutil.copytree(lora_adapter, runs / "r" / "dpo" / "adapter")
    (runs / "r" / "sft").mkdir()  # a stage directory without an adapter is not registered
    student = cpu_vllm_spec(MODEL).model_dump(mode="json")
    data = {"run": {"name": "r", "dir": str(runs)},
            "models": {"student": student, "weak": {"name": "tiny-random", "engine": "hf"}}}
    recipe = Recipe.model_validate(data)
    spec = serve_spec(recipe)
    assert spec.enable_lora and spec.lora_adapters == {"dpo": runs / "r" / "dpo" / "adapter"}
    cmd = make_server(recipe).cmd
    assert cmd[cmd.index("--lora-modules") + 1] == f"dpo={(runs / 'r' / 'dpo' / 'adapter').resolve()}"
    assert cmd[cmd.index("--max-lora-rank") + 1] == "32"  # the adapter's rank, above vLLM's default 16
    weak = serve_spec(Recipe.model_validate({**data, "serve": {"role": "weak"}}))
    assert weak.lora_adapters == {} and not weak.enable_lora  # trained on the student, not on this model

    file = write_recipe(tmp_path / "r.yaml", data)
    runner = CliRunner()
    res = runner.invoke(app, ["serve", str(file), "--set", "serve.host=0.0.0.0"])
    assert res.exit_code == 2 and "needs an API key" in res.output
    res = runner.invoke(app, ["serve", str(file), "--set", "serve.host=0.0.0.0", "--set",
                              "serve.api_key_env=TOUSHI_TEST_UNSET_KEY"])
    assert res.exit_code == 2 and "TOUSHI_TEST_UNSET_KEY" in res.output and "not set" in res.output
    res = runner.invoke(app, ["serve", str(file), "--set", "serve.role=judge"])
    assert res.exit_code == 2 and "models.judge is not set" in res.output

    # vLLM's dev-mode and runtime-LoRA variables open routes: refused, with --replicas too, unless allowed
    from toushi.engines.server import ServerError, check_env

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_SERVER_DEV_MODE", "1")
        for extra in ([], ["--replicas", "2"]):
            res = runner.invoke(app, ["serve", str(file), *extra])
            assert res.exit_code == 2 and "VLLM_SERVER_DEV_MODE is set" in res.output, res.output
        check_env(allow_unsafe_env=True)
        mp.setenv("VLLM_SERVER_DEV_MODE", "0")
        mp.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
        with pytest.raises(ServerError, match="^refusing to start: VLLM_ALLOW_RUNTIME_LORA_UPDATING is set"):
            check_env(allow_unsafe_env=False)
    assert "--middleware" in cmd and cmd[cmd.index("--middleware") + 1] == "toushi.engines.guard.ServeGuard"


# ------------------------------------------------------------------------- (2) API key + LoRA by name


def test_keyed_server_rejects_missing_key_and_routes_the_adapter_by_name(served, lora_adapter):
    recipe, server = served
    url = server.base_url
    assert httpx.get(f"{url}/models").status_code == 401
    assert httpx.get(f"{url}/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200
    assert {m["id"] for m in ok.json()["data"]} == {MODEL, "sft"}
    info = "\n".join(describe(server, serve_spec(recipe), KEY_ENV))
    assert url in info and "sft" in info and KEY_ENV in info and KEY not in info

    with pytest.raises(GenerationError, match="AuthenticationError"):  # 401 is not retried
        make_engine(ModelSpec(name=MODEL, engine="openai", base_url=url, max_retries=3)).generate(CONVS[:1], GREEDY)
    spec = ModelSpec(name=MODEL, engine="openai", base_url=url, api_key_env=KEY_ENV,
                     lora_adapters={"sft": lora_adapter})
    with make_engine(spec) as engine:
        base = engine.generate(CONVS, GREEDY)
        adapted = engine.generate(CONVS, GREEDY, lora_name="sft")
    assert adapted[0][0].model == "sft" and base[0][0].model == MODEL
    assert all(texts(adapted)) and texts(adapted) != texts(base)

    # `toushi generate --lora sft` through an openai role asks the server for the adapter by name
    prompts = recipe.run_dir.parent / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"c{i}", "messages": c}) + "\n" for i, c in enumerate(CONVS)))
    greedy_weak = recipe.model_copy(deep=True)
    greedy_weak.models.weak.sampling = GREEDY
    counts, out = generate_from_recipe(greedy_weak, "weak", prompts, lora="sft")
    assert counts["generated"] == 3 and out == recipe.run_dir / "generate" / "sft.jsonl"
    recs = list(read_jsonl(out))
    assert [r["completions"][0]["text"] for r in recs] == texts(adapted)
    assert {r["model"] for r in recs} == {"sft"}


def test_serve_every_route_needs_the_key(served):
    """Deny by default on a real `toushi serve` server: every route it has (its OpenAPI table, FastAPI's doc
    routes outside it, and paths it does not have) x {no key, wrong key, right key}; only GET /health is open.
    Then a foreign Host header (DNS rebinding) and requests over the recipe's serve.limits."""
    from fastapi import FastAPI

    _, server = served
    root = server.base_url.removesuffix("/v1")
    right, wrong = {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {KEY}x"}
    schema = httpx.get(f"{root}/openapi.json", headers=right)
    assert schema.status_code == 200
    routes = {(m.upper(), p) for p, ops in schema.json()["paths"].items() for m in ops}
    routes |= {(m, r.path) for r in FastAPI().routes for m in r.methods}  # /docs, /redoc, /openapi.json, ...
    routes |= {("GET", "/no/such/route"), ("POST", "/v1/no_such_route"), ("OPTIONS", "/v1/chat/completions")}
    assert {("POST", "/invocations"), ("POST", "/tokenize"), ("GET", "/metrics"), ("GET", "/health"),
            ("POST", "/v1/chat/completions")} <= routes and len(routes) > 25, sorted(routes)
    seen = {}
    with httpx.Client(timeout=60) as client:
        for method, path in sorted(routes):
            url = root + path.replace("{", "").replace("}", "")  # a path parameter gets its own name as value
            body = {} if method in ("POST", "PUT", "PATCH") else None
            seen[method, path] = tuple(client.request(method, url, headers=h, json=body).status_code
                                       for h in ({}, wrong, right))
    opened = {r: codes for r, codes in seen.items() if codes[0] != 401 or codes[1] != 401}
    assert set(opened) <= {("GET", "/health"), ("HEAD", "/health")} and seen["GET", "/health"][:2] == (200, 200), opened
    refused_with_key = {r: codes for r, codes in seen.items() if codes[2] in (401, 403)}
    assert not refused_with_key, refused_with_key

    # DNS rebinding: a page's own name as Host never reaches the server, key or not; loopback names do
    assert httpx.get(f"{root}/v1/models", headers={**right, "Host": f"evil.example:{server.port}"}).status_code == 403
    assert httpx.get(f"{root}/health", headers={"Host": "evil.example"}).status_code == 403
    assert httpx.get(f"{root}/v1/models", headers={**right, "Host": f"localhost:{server.port}"}).status_code == 200

    chat = {"model": MODEL, "messages": CONVS[0], "temperature": 0.0}
    for over, field in (({"max_tokens": 65}, "max_tokens=65"), ({"n": 3}, "n=3"),
                        ({"logprobs": True, "top_logprobs": 6}, "top_logprobs=6")):
        res = httpx.post(f"{root}/v1/chat/completions", headers=right, json={**chat, **over}, timeout=60)
        assert res.status_code == 400 and field in res.json()["error"]["message"], res.text
    nested = {"token_ids": [1, 2], "sampling_params": {"max_tokens": 65}}
    res = httpx.post(f"{root}/inference/v1/generate", headers=right, json=nested, timeout=60)
    assert res.status_code == 400 and "max_tokens=65" in res.text
    ok = httpx.post(f"{root}/v1/chat/completions", headers=right, timeout=120,
                    json={**chat, "temperature": 0.7, "seed": 0, "n": 2, "max_tokens": 8, "logprobs": True,
                          "top_logprobs": 5})  # at the limits: answered
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2, ok.text
    uncapped = httpx.post(f"{root}/v1/chat/completions", headers=right, json=chat, timeout=120)
    assert uncapped.status_code == 200 and uncapped.json()["usage"]["completion_tokens"] <= 64


def test_cpu_server_runs_the_model_in_its_engine_core(served):
    """On a CPU a one-engine server is two processes, the API server and its engine core holding the model
    worker, not vLLM's three (toushi.engines.vllm_engine.cpu_engine_env: healthy about 10 s sooner on the AVX512-BF16
    kind, one vLLM import fewer); the engine core may use every core this process may (a pinned xdist worker: its one).
    That it answers as offline vLLM does is test_openai_engine_on_vllm_server_matches_offline_vllm."""
    import psutil

    _, server = served
    assert psutil.Process(server.proc.pid).cmdline()[1:3] == ["-m", "toushi.engines.api_server"]  # see the next test
    names = {p.pid: p.name() for p in psutil.Process(server.proc.pid).children(recursive=True)}
    engine_cores = [pid for pid, name in names.items() if name.startswith("VLLM::EngineCor")]  # comm: 15 chars
    assert len(engine_cores) == 1 and not [n for n in names.values() if n.startswith("VLLM::Work")], names
    assert set(psutil.Process(engine_cores[0]).cpu_affinity()) == os.sched_getaffinity(0)


def test_server_entry_imports_vllm_frozen_and_collects_again():
    """The module toushi starts its servers with (toushi/engines/api_server.py) imports vLLM's server with the
    collector off, freezes what that built, and turns the collector back on: a server left with it off would never
    free its cyclic garbage. Imported, as a spawned engine core imports it (__mp_main__), it starts no server."""
    code = ("import gc, toushi.engines.api_server as m; "
            "print(gc.isenabled(), gc.get_freeze_count(), m.main.__module__, len(gc.get_objects()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    enabled, frozen, module, tracked = done.stdout.split()
    assert enabled == "True" and module == "vllm.entrypoints.launchers.api_server.entry"
    assert int(frozen) > 100_000 and int(tracked) < int(frozen) // 10, done.stdout  # the imports' objects, frozen


# ------------------------------------------------------------------------- (4) toushi generate resumes


def test_generate_is_resumable_from_the_cli_and_the_script(tmp_path, offline_model):
    recipe = write_recipe(tmp_path / "gen.yaml", {
        "run": {"name": "gen", "dir": str(tmp_path / "runs")},
        "models": {"student": {"name": MODEL, "engine": "hf", "dtype": "float32", "hf_batch_size": 2,
                               "sampling": {"temperature": 0.0, "max_tokens": 8}}},
    })
    prompts = tmp_path / "prompts.jsonl"
    post = "My landlord is evicting me and I have nowhere to go."
    rows = [
        {"id": "a", "prompt": "I feel lonely."},
        {"id": "b", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        {"id": "c", "text": post, "lang": "en"},
        {"id": "a", "prompt": "a duplicate id is ignored"},
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    args = [str(recipe), "--prompts", str(prompts), "--out", str(out), "--batch-size", "2"]
    runner = CliRunner()

    res = runner.invoke(app, ["generate", *args])
    assert res.exit_code == 0, res.output
    first = {r["id"]: r for r in read_jsonl(out)}
    assert list(first) == ["a", "b", "c"]
    assert first["a"]["messages"] == [{"role": "user", "content": "I feel lonely."}]
    assert first["b"]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert post in first["c"]["messages"][-1]["content"] and "plain text" in first["c"]["messages"][-1]["content"]
    c = first["c"]["completions"][0]
    assert first["c"]["model"] == MODEL and c["text"] and 0 < c["completion_tokens"] <= 8

    # a kill mid-write: the last record is torn. The script drops it and generates only that one.
    lines = out.read_text().splitlines()
    out.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:25])
    proc = subprocess.run([sys.executable, "infer/generate.py", "--recipe", *args], check=False, cwd=REPO,
                          capture_output=True, text=True, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    assert "generated=1" in proc.stderr and "skipped=2" in proc.stderr
    again = list(read_jsonl(out))
    assert [r["id"] for r in again] == ["a", "b", "c"] and again[:2] == [first["a"], first["b"]]
    regenerated = again[2]["completions"][0]
    assert (regenerated["text"], regenerated["completion_tokens"]) == (c["text"], c["completion_tokens"])

    before = out.read_text()
    res = runner.invoke(app, ["generate", *args])  # the second full run generates nothing
    assert res.exit_code == 0 and "generated=0" in res.output
    assert out.read_text() == before

    # other sampling into the same file: refused, nothing appended (one file = one system's answers)
    res = runner.invoke(app, ["generate", *args, "--set", "models.student.sampling.max_tokens=16"])
    assert res.exit_code != 0 and "other settings" in res.output and '"max_tokens": 8' in res.output
    assert out.read_text() == before


def test_generate_never_mixes_systems(tmp_path, offline_model):
    """An adapter retrained under the same name (same path, other weights) is another system: `toushi generate`
    refuses to top up a file written with the old one, as it does for another model or sampling."""
    from tests.conftest import make_lora_adapter

    recipe = write_recipe(tmp_path / "gen.yaml", {
        "run": {"name": "gen", "dir": str(tmp_path / "runs")},
        "models": {"student": {"name": str(offline_model), "engine": "hf", "dtype": "float32",
                               "sampling": {"temperature": 0.0, "max_tokens": 4}}},
    })
    adapter = tmp_path / "runs" / "gen" / "sft" / "adapter"
    make_lora_adapter(offline_model, adapter, std=0.02, seed=0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "I feel lonely."}) + "\n")
    out = tmp_path / "out.jsonl"
    args = ["generate", str(recipe), "--prompts", str(prompts), "--out", str(out), "--lora", "sft"]
    runner = CliRunner()
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    (first,) = read_jsonl(out)
    assert first["lora"] == "sft" and first["lora_digest"] and first["model_key"].endswith("float32")

    prompts.write_text(prompts.read_text() + json.dumps({"id": "b", "prompt": "Nobody called."}) + "\n")
    shutil.rmtree(adapter)
    make_lora_adapter(offline_model, adapter, std=0.02, seed=1)  # retrained: same name and path, other weights
    before = out.read_text()
    res = runner.invoke(app, args)
    assert res.exit_code != 0 and "other settings" in res.output and first["lora_digest"] in res.output
    assert out.read_text() == before  # nothing of the new adapter appended to the old one's answers


def test_generate_reads_csv_json_and_datasets_dirs(tmp_path):
    from datasets import Dataset

    from toushi.generate import read_items

    post = "I lost my job today and I do not know how to tell my family."
    csv_path = tmp_path / "prompts.csv"
    csv_path.write_text('id,prompt,text,messages,lang\n'
                        'a,I feel lonely.,,,\n'
                        'b,,' + post + ',,en\n'
                        'c,,,"[{""role"": ""user"", ""content"": ""Hi""}]",\n', encoding="utf-8")
    items = {it["id"]: it["messages"] for it in read_items(csv_path, "en")}
    assert items["a"] == [{"role": "user", "content": "I feel lonely."}]
    assert post in items["b"][-1]["content"] and items["c"] == [{"role": "user", "content": "Hi"}]

    ds_dir = tmp_path / "prompts_ds"
    Dataset.from_list([{"id": "x", "prompt": "Hello"}, {"id": "y", "prompt": "Again"}]).save_to_disk(str(ds_dir))
    assert [it["id"] for it in read_items(ds_dir, "en")] == ["x", "y"]
    json_path = tmp_path / "prompts.json"
    json_path.write_text(json.dumps([{"text": post, "lang": "en"}]))
    (only,) = read_items(json_path, "en")
    assert len(only["id"]) > 8 and post in only["messages"][-1]["content"]  # id from the content when absent

    bad = tmp_path / "bad.csv"
    bad.write_text("id,prompt\na,\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: needs one of"):
        read_items(bad, "en")
    bad.write_text('id,messages\na,"not json"\n')
    with pytest.raises(ValueError, match="not a JSON list"):
        read_items(bad, "en")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_items(tmp_path / "missing.jsonl", "en")


# ------------------------------------------------------------------------- (5) chat


def test_chat_streams_keeps_history_and_resets(vllm_server):
    client = make_client(vllm_server, KEY_ENV)
    session = ChatSession(client, default_model(client), system="You are a kind friend.", temperature=0.0,
                          max_tokens=16)
    assert session.model == MODEL
    script = iter(["I failed my driving test again.", "", "What should I do now?", "/reset", "Thanks anyway.",
                   "/exit", "never read"])
    history_at_read: list[list[dict]] = []
    written: list[str] = []

    def read() -> str:
        history_at_read.append(list(session.history))
        written.append("<read>")
        return next(script)

    chat_loop(session, read, written.append)
    assert next(script) == "never read"  # /exit stopped the loop
    assert [len(h) for h in history_at_read] == [1, 3, 3, 5, 1, 3]  # grows per turn; /reset keeps the system
    first_reply = history_at_read[1][2]
    assert first_reply["role"] == "assistant" and first_reply["content"]
    assert history_at_read[3][3] == {"role": "user", "content": "What should I do now?"}
    assert session.history[1] == {"role": "user", "content": "Thanks anyway."}
    # the first reply arrived in several streamed pieces that add up to the stored answer
    turns = "\x00".join(written).split("<read>")
    pieces = [p for p in turns[1].split("\x00") if p]
    assert pieces[-1] == "\n" and len(pieces[:-1]) >= 3
    assert "".join(pieces[:-1]).strip() == first_reply["content"]
    assert "(history cleared)\n" in written
