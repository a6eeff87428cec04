"""The pairs stage: real engines, resume from the caches, and faults from a real loopback HTTP server."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from toushi.pairs import PairsIncomplete
from toushi.recipe import Recipe
from toushi.runner import StageContext
from toushi.stages import declared_view
from toushi.store import StageStore

POSTS = [
    ("p1", "train", "I failed my exam and my parents will be so disappointed."),
    ("p2", "train", "My best friend moved away and I feel so alone."),
    ("p3", "heldout", "I got laid off today after eight years."),
    ("p4", "train", "PERMANENT My dog is sick and I can't afford the vet."),
]


def write_corpus(run_dir, posts=POSTS) -> None:
    """A corpus records.jsonl in the corpus stage's contract shape."""
    with StageStore(run_dir, "corpus").writer() as w:
        for pid, split, text in posts:
            w.write({"id": pid, "lang": "en", "scene": "test", "text": text, "source": "test", "source_id": pid,
                     "split": split, "flags": [], "persona": None})


def make_ctx(tmp_path, weak: dict, strong: dict, **pairs) -> StageContext:
    recipe = Recipe.model_validate({
        "run": {"name": "t", "dir": str(tmp_path), "stages": ["corpus", "pairs"]},
        "models": {"weak": weak, "strong": strong},
        "pairs": {"batch_size": 2, **pairs},
    })
    return StageContext(recipe=declared_view(recipe, "pairs"), store=StageStore(recipe.run_dir, "pairs"))


def test_pairs_stage_hf_resumes_and_regenerates_only_what_changed(tmp_path, tiny_model):
    base = {"name": "tiny-random", "engine": "hf", "dtype": "float32"}
    weak = {**base, "sampling": {"temperature": 0.9, "max_tokens": 8, "n": 2, "seed": 0}}
    strong = {**base, "system_prompt_file": "toushi/templates/en/strong_system.j2",
              "sampling": {"temperature": 0.0, "max_tokens": 10, "n": 1}}
    ctx = make_ctx(tmp_path, weak, strong)
    write_corpus(ctx.run_dir)
    counts = pairs_run(ctx)
    assert counts["weak_generated"] == 4 and counts["strong_generated"] == 4 and counts["pairs"] == 4
    recs = {r["id"]: r for r in ctx.store.records()}
    assert set(recs) == {"p1", "p2", "p3", "p4"}
    r = recs["p3"]
    assert r["split"] == "heldout" and r["post"] in r["prompt"] and "plain text" in r["prompt"]
    assert len(r["weak"]) == 2 and len(r["strong"]) == 1
    assert r["strong_system"].startswith("You are a warm") and r["weak_system"] is None
    assert set(r["weak"][0]) >= {"text", "reasoning", "finish_reason", "prompt_tokens", "completion_tokens",
                                 "latency_s", "model", "flags"}
    assert r["sampling"]["weak"]["temperature"] == 0.9

    # rerun: nothing generated, nothing duplicated
    again = pairs_run(ctx)
    assert again["weak_generated"] == 0 and again["strong_generated"] == 0
    assert Counter(json.loads(x)["id"] for x in ctx.store.records_path.read_text().splitlines()) == Counter(list(recs))

    # a changed strong setting regenerates only the strong role, and replaces the stale records
    ctx2 = make_ctx(tmp_path, weak, {**strong, "sampling": {"temperature": 0.0, "max_tokens": 6, "n": 1}})
    third = pairs_run(ctx2)
    assert third["weak_generated"] == 0 and third["strong_generated"] == 4 and third["pairs"] == 4
    lines = ctx.store.records_path.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(x)["sampling"]["strong"]["max_tokens"] == 6 for x in lines)
    assert [c["text"] for c in json.loads(lines[0])["weak"]] == [c["text"] for c in recs[json.loads(lines[0])["id"]]["weak"]]

    # a regex on the strong role's sampling constrains its answers (the random tiny model obeys only because it
    # must) and, being part of the sampling, reruns only that role
    regex = "(You|That) [a-z ]{2,12}[.]"
    ctx3 = make_ctx(tmp_path, weak, {**strong, "sampling": {"temperature": 0.0, "max_tokens": 12, "n": 1,
                                                            "regex": regex}})
    fourth = pairs_run(ctx3)
    assert fourth["weak_generated"] == 0 and fourth["strong_generated"] == 4
    strong_texts = [r["strong"][0]["text"] for r in ctx3.store.records()]
    assert len(strong_texts) == 4 and all(re.fullmatch(regex, t) for t in strong_texts), strong_texts


def pairs_run(ctx):
    from toushi.pairs import run_stage

    return run_stage(ctx)


class FaultyOpenAI(BaseHTTPRequestHandler):
    """A minimal OpenAI chat endpoint that fails on purpose: each new request first gets a 500, then (for
    some) a response slower than the client's timeout, then an answer; posts containing PERMANENT always 500."""

    seen: Counter = Counter()
    healthy = False

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = body["messages"][-1]["content"]
        key = (user, body.get("seed"), body["model"])
        FaultyOpenAI.seen[key] += 1
        attempt = FaultyOpenAI.seen[key]
        if not FaultyOpenAI.healthy:
            if "PERMANENT" in user or attempt == 1:
                return self._send(500, {"error": {"message": "injected failure"}})
            if attempt == 2 and "alone" in user:
                time.sleep(1.5)  # past the 0.5 s client timeout
        text = f"<think>they need comfort</think>I'm sorry, that sounds hard. ({body['model']} #{body.get('seed')})"
        self._send(200, {
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
        })

    def _send(self, code, payload):
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except OSError:  # the client gave up (timeout)
            pass


@pytest.fixture
def faulty_server():
    FaultyOpenAI.seen.clear()
    FaultyOpenAI.healthy = False
    server = ThreadingHTTPServer(("127.0.0.1", 0), FaultyOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_pairs_openai_retries_logs_permanent_failures_and_resumes(tmp_path, faulty_server, monkeypatch):
    monkeypatch.setenv("TOUSHI_TEST_KEY", "sk-secret-value")
    spec = {"engine": "openai", "base_url": faulty_server, "api_key_env": "TOUSHI_TEST_KEY", "timeout_s": 0.5,
            "max_retries": 3, "concurrency": 4, "sampling": {"temperature": 0.0, "max_tokens": 20, "n": 2}}
    ctx = make_ctx(tmp_path, {**spec, "name": "weak-m"}, {**spec, "name": "strong-m", "reasoning": True})
    write_corpus(ctx.run_dir)
    with pytest.raises(PairsIncomplete, match="1 of 4 prompts failed"):
        pairs_run(ctx)
    recs = {r["id"]: r for r in ctx.store.records()}
    assert set(recs) == {"p1", "p2", "p3"}  # retried 500s and timeouts succeeded
    assert recs["p2"]["strong"][0]["text"].startswith("I'm sorry") and recs["p2"]["strong"][0]["reasoning"] == "they need comfort"
    assert recs["p1"]["weak"][1]["text"].endswith("#1)")  # sample k=1 sent seed+1
    errors = ctx.store.errors()
    assert {e["id"] for e in errors} == {"p4"} and {e["role"] for e in errors} == {"weak", "strong"}
    assert "InternalServerError" in errors[0]["error"]
    assert "sk-secret-value" not in ctx.store.errors_path.read_text()
    assert "sk-secret-value" not in "".join(p.read_text() for p in ctx.store.dir.rglob("*.jsonl"))

    FaultyOpenAI.healthy = True
    before = sum(FaultyOpenAI.seen.values())
    counts = pairs_run(ctx)
    assert counts["weak_generated"] == 1 and counts["strong_generated"] == 1 and counts["pairs"] == 4
    assert sum(FaultyOpenAI.seen.values()) - before == 4  # only p4's 2 samples x 2 roles were requested
    ids = [json.loads(x)["id"] for x in ctx.store.records_path.read_text().splitlines()]
    assert sorted(ids) == ["p1", "p2", "p3", "p4"]
