"""Generation over several endpoints: the pool's choice and back-off, then two real vLLM servers on loopback
with one killed mid pairs-stage (every record written once, the dead endpoint counted in the manifest).

The live server is the session's (the offline model; what it says does not matter here, only where it was
asked); the one killed is a second server of the same model, started for that test alone.
"""

from __future__ import annotations

import json
import threading
import time

import openai
import pytest

from tests.conftest import cpu_vllm_spec, free_port, write_corpus
from toushi.engines.endpoints import BACKOFF_BASE_S, EndpointPool
from toushi.engines.server import VLLMServer
from toushi.pairs import run_stage
from toushi.recipe import ModelSpec, Recipe
from toushi.runner import StageContext
from toushi.store import StageStore

A, B = "http://a/v1", "http://b/v1"


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_pool_least_outstanding_backoff_probe_and_all_down():
    clock = Clock()
    pool = EndpointPool([A, B, A], per_endpoint=2, clock=clock)
    assert pool.urls == [A, B] and pool.total_capacity == 4
    picks = []
    for _ in range(4):
        ep = pool.choose()
        pool.start(ep)
        picks.append(ep.url)
    assert sorted(picks) == [A, A, B, B]  # least outstanding alternates
    assert pool.choose() is None  # both at capacity: the caller waits

    a, b = pool.endpoints
    pool.failed(b, openai.APIConnectionError(request=None), take_out=True)
    pool.failed(b, openai.APIConnectionError(request=None), take_out=True)  # same outage: one time out
    assert not b.up(clock.t) and pool.other_up({B}) and not pool.other_up({A, B})
    assert pool.choose() is None  # b has room but is out; a is full
    pool.succeeded(a)
    assert pool.choose({A}).url == A  # a request that failed on a still goes to a rather than to a dead b

    clock.t += BACKOFF_BASE_S * 2 + 0.1  # b's back-off (doubled by the second failure) is over
    assert b.up(clock.t)
    ep = pool.choose()
    assert ep is b
    pool.start(b)
    assert pool.choose() is a  # b is on probation: one request at a time until it succeeds
    pool.succeeded(b)
    assert b.failures_in_row == 0 and b.capacity(2, probe=True) == 2

    # every endpoint out: requests still go to the one back soonest (the engine sleeps its retry delay first)
    pool.failed(a, openai.APITimeoutError(request=None), take_out=True)
    pool.start(b)
    pool.start(b)
    pool.failed(b, openai.APIConnectionError(request=None), take_out=True)
    pool.failed(b, openai.APIConnectionError(request=None), take_out=True)
    assert not pool.other_up(set())
    assert pool.choose() is a  # a's back-off ends first (one failure in a row against b's two)
    stats = pool.stats()
    assert stats[B]["requests"] == 5 and stats[B]["ok"] == 1 and stats[B]["errors"] == 4
    assert stats[B]["error_types"] == {"APIConnectionError": 4} and stats[B]["times_taken_out"] == 2
    assert stats[A]["errors"] == 1 and "APITimeoutError" in stats[A]["last_error"]


def test_single_endpoint_keeps_full_concurrency_while_failing():
    pool = EndpointPool([A], per_endpoint=3, clock=Clock())
    (a,) = pool.endpoints
    pool.start(a)
    pool.failed(a, openai.InternalServerError("boom", response=_response(500), body=None), take_out=True)
    assert [pool.choose() for _ in range(1)] == [a]
    for _ in range(3):
        pool.start(a)
    assert pool.choose() is None  # the plain concurrency limit, no probation with one endpoint


def _response(code: int):
    import httpx

    return httpx.Response(code, request=httpx.Request("POST", "http://a/v1/chat/completions"))


# ------------------------------------------------------------------------ two real servers, one killed


POSTS = [f"Post {i}: I lost my job and I feel like I let everyone down." for i in range(8)]


@pytest.fixture
def doomed_server(vllm_server, tmp_path):
    """A second server of the session server's model (same name, same settings), for this test to kill; a
    server start costs most of a minute here, so the live one is the session's."""
    with VLLMServer(cpu_vllm_spec("smollm2-135m-instruct"), port=free_port(), log_path=tmp_path / "doomed.log") as s:
        yield s


def test_pairs_over_two_servers_one_killed_mid_stage(vllm_server, doomed_server, tmp_path):
    urls = [vllm_server, doomed_server.base_url]
    client = {"name": "smollm2-135m-instruct", "engine": "openai", "base_url": urls, "concurrency": 1, "max_retries": 2,
              "timeout_s": 60, "sampling": {"temperature": 0.0, "max_tokens": 8, "seed": 0}}
    recipe = Recipe.model_validate({
        "run": {"name": "dp", "dir": str(tmp_path / "runs"), "stages": ["corpus", "pairs"]},
        "models": {"weak": client, "strong": {**client, "sampling": {"temperature": 0.7, "max_tokens": 8}}},
        "pairs": {"batch_size": 2},
    })
    ctx = StageContext(recipe=recipe, store=StageStore(recipe.run_dir, "pairs"))
    write_corpus(recipe.run_dir, POSTS)
    weak_cache = StageStore(ctx.store.dir, "weak_cache").records_path
    dead = doomed_server
    done = threading.Event()

    def kill_after_first_batch() -> None:
        while not done.is_set():
            if weak_cache.exists() and weak_cache.read_text(encoding="utf-8").count("\n") >= 2:
                dead.kill()  # SIGKILL, what a crashed node looks like
                return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_after_first_batch, daemon=True)
    killer.start()
    try:
        counts = run_stage(ctx)  # no PairsIncomplete: the live server took the dead one's requests
    finally:
        done.set()
        killer.join()
    assert dead.proc.poll() is not None, "the server was never killed"
    assert counts["pairs"] == len(POSTS) and counts["failed"] == 0 and not ctx.store.errors()
    ids = [json.loads(line)["id"] for line in ctx.store.records_path.read_text().splitlines()]
    assert sorted(ids) == sorted(f"p{i}" for i in range(len(POSTS)))  # every prompt exactly once
    for role in ("weak", "strong"):
        keys = [json.loads(line)["id"] for line in StageStore(ctx.store.dir, f"{role}_cache").records_path
                .read_text().splitlines()]
        assert len(keys) == len(set(keys)) == len(POSTS)

    endpoints = ctx.store.manifest()["endpoints"]
    live_url, dead_url = urls
    for role in ("weak", "strong"):
        stats = endpoints[role]
        assert sum(s["ok"] for s in stats.values()) == len(POSTS)  # one success per sample, no double answers
        assert stats[live_url]["errors"] == 0
    weak = endpoints["weak"]
    assert weak[dead_url]["ok"] >= 1  # it answered its share of the first batch before it died
    assert weak[dead_url]["errors"] >= 1 and weak[dead_url]["times_taken_out"] >= 1
    assert set(weak[dead_url]["error_types"]) <= {"APIConnectionError", "InternalServerError"}
    assert endpoints["strong"][dead_url]["ok"] == 0  # dead from the start of the strong role

    # a rerun generates nothing and writes nothing twice
    before = ctx.store.records_path.read_text()
    again = run_stage(ctx)
    assert again["weak_generated"] == 0 and again["strong_generated"] == 0 and again["written"] == 0
    assert ctx.store.records_path.read_text() == before


def test_recipe_accepts_a_list_of_urls_and_rejects_an_empty_one():
    spec = ModelSpec(name="m", engine="openai", base_url=[A, B])
    assert spec.base_url == [A, B]
    with pytest.raises(ValueError, match="at least one URL"):
        ModelSpec(name="m", engine="openai", base_url=[])
