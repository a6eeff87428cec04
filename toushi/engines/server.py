"""vLLM's OpenAI-compatible server as a subprocess: ``python -m toushi.engines.api_server``, which runs what
``python -m vllm.entrypoints.openai.api_server`` runs, its imports made with the collector off (that module's doc).

Used by ``toushi serve`` / ``infer/serve.py`` and by the tests' ``vllm_server`` fixture. Every server
toushi starts runs toushi's deny-by-default middleware (:mod:`toushi.engines.guard`: the key on every route
but /health, Host check on loopback binds, per-request limits). The API key is passed through the
``VLLM_API_KEY`` environment variable, never on the command line (where ``ps`` shows it) and never in logs.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from toushi.engines.guard import GUARD_ENV, guard_env
from toushi.engines.vllm_engine import cpu_engine_env, cpu_thread_env, engine_kwargs
from toushi.errors import ToushiError
from toushi.recipe import ModelSpec, RequestLimits


class ServerError(ToushiError, RuntimeError):
    """The server could not be started or did not become healthy; the message says why."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# vLLM variables that open routes running code on the engine (/collective_rpc, /sleep, ...) or loading any
# path as an adapter (POST /v1/load_lora_adapter); a caller's environment passes them on unnoticed
UNSAFE_ENV = ("VLLM_SERVER_DEV_MODE", "VLLM_ALLOW_RUNTIME_LORA_UPDATING")


def check_env(allow_unsafe_env: bool) -> None:
    """Refuse to start a server with an UNSAFE_ENV variable on (as vLLM reads it) unless explicitly allowed."""
    unsafe = [k for k in UNSAFE_ENV if os.environ.get(k, "").strip().lower() not in ("", "0", "false")]
    if unsafe and not allow_unsafe_env:
        raise ServerError(
            f"refusing to start: {', '.join(unsafe)} is set in the environment, which opens vLLM routes that run "
            "code on the engine or load any path as an adapter; unset it, or pass --set serve.allow_unsafe_env=true "
            "(every route still needs the key)"
        )


def server_command(spec: ModelSpec, host: str, port: int, served_name: str | None = None,
                   limits: RequestLimits | None = None) -> list[str]:
    """The api_server command line for a spec (the same engine settings as the offline vLLM engine)."""
    kw = engine_kwargs(spec)  # also checks the LoRA adapters (rank, modules_to_save)
    limits = limits or RequestLimits()
    cmd = [sys.executable, "-m", "toushi.engines.api_server", "--model", kw["model"]]
    cmd += ["--served-model-name", served_name or spec.served_model or spec.name, "--host", host, "--port", str(port)]
    # the guard is the outermost layer (vLLM adds --middleware last); the engine enforces the logprobs cap too,
    # and a request that sets no max_tokens gets the cap instead of the whole context
    cmd += ["--middleware", "toushi.engines.guard.ServeGuard", "--max-logprobs", str(limits.logprobs),
            "--override-generation-config", json.dumps({"max_new_tokens": limits.max_tokens})]
    cmd += ["--dtype", kw["dtype"], "--tensor-parallel-size", str(kw["tensor_parallel_size"])]
    cmd += ["--gpu-memory-utilization", str(kw["gpu_memory_utilization"])]
    if "data_parallel_size" in kw:  # replicas behind this one server, each tensor_parallel_size GPUs
        cmd += ["--data-parallel-size", str(kw["data_parallel_size"])]
    if kw["max_model_len"] is not None:
        cmd += ["--max-model-len", str(kw["max_model_len"])]
    if "kv_cache_memory_bytes" in kw:
        cmd += ["--kv-cache-memory-bytes", str(kw["kv_cache_memory_bytes"])]
    if kw.get("enable_chunked_prefill") is False:
        cmd += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(kw["max_num_batched_tokens"])]
    if kw["enforce_eager"]:
        cmd.append("--enforce-eager")
    cmd += ["--structured-outputs-config", json.dumps(kw["structured_outputs_config"])]
    if "reasoning_parser" in kw:  # the server then returns the think block as reasoning_content
        cmd += ["--reasoning-parser", kw["reasoning_parser"]]
    if kw.get("enable_lora"):
        cmd += ["--enable-lora", "--max-lora-rank", str(kw["max_lora_rank"]), "--max-loras", str(kw["max_loras"])]
        if spec.lora_adapters:
            cmd += ["--lora-modules", *(f"{n}={Path(p).resolve()}" for n, p in spec.lora_adapters.items())]
    return cmd


def health_client() -> httpx.Client:
    """One client for every poll of a starting server's /health: each ``httpx.get`` builds a client and its TLS
    context (18 ms of CPU on a 2-core AMD EPYC of the AVX512-BF16 kind, 0.1 ms with one client), on the core the
    starting server needs."""
    return httpx.Client(timeout=2.0)


def answers_health(client: httpx.Client, base_url: str) -> bool:
    """Whether the server at ``base_url`` (its ``/v1`` URL) answers ``/health``; False while it cannot be reached."""
    try:
        return client.get(base_url.removesuffix("/v1") + "/health").status_code == 200
    except httpx.HTTPError:
        return False


class VLLMServer:
    """Start the server, wait until ``/health`` answers, stop it (SIGINT, then SIGKILL) on exit."""

    def __init__(
        self,
        spec: ModelSpec,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: str | None = None,
        served_name: str | None = None,
        log_path: Path | None = None,
        startup_timeout_s: float = 600.0,
        limits: RequestLimits | None = None,
        allow_unsafe_env: bool = False,
    ):
        if not is_loopback(host) and not api_key:
            raise ServerError(
                f"refusing to bind {host}: a non-loopback address needs an API key (set serve.api_key_env "
                "to the name of an environment variable holding one)"
            )
        self.limits = limits or RequestLimits()
        self.allow_unsafe_env = allow_unsafe_env
        self.cmd = server_command(spec, host, port, served_name, self.limits)
        self.data_parallel = spec.data_parallel_size > 1
        self.host, self.port, self.api_key = host, port, api_key
        self.served_name = served_name or spec.served_model or spec.name
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}/v1"

    def start(self) -> VLLMServer:
        """Start the server and wait until it answers."""
        self.launch()
        self.wait_healthy()
        return self

    def launch(self) -> VLLMServer:
        """Start the server process without waiting for it (most of a minute on a small CPU, mostly imports on
        one core): a caller with other work to do meanwhile calls :meth:`wait_healthy` when it needs it."""
        check_env(self.allow_unsafe_env)
        env = dict(os.environ)
        # one engine: on a CPU its worker runs in the engine core's process (cpu_engine_env); engines side by side
        # (--data-parallel-size) keep vLLM's own layout
        env.update(cpu_thread_env() if self.data_parallel else cpu_engine_env())
        env.pop("VLLM_API_KEY", None)
        if self.api_key:
            env["VLLM_API_KEY"] = self.api_key
        lim = self.limits
        env[GUARD_ENV] = guard_env(is_loopback(self.host), lim.n, lim.max_tokens, lim.logprobs)
        # the server imports the guard from this same toushi, installed or not
        here = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        from toushi.lifetime import ensure_watchdog, track

        ensure_watchdog()  # the server must not outlive this process, even on SIGKILL
        log = open(self.log_path, "ab") if self.log_path else None
        # Own process group, so stop() reaches the engine core (and any worker processes) too.
        self.proc = subprocess.Popen(
            self.cmd, env=env, stdout=log or None, stderr=subprocess.STDOUT if log else None, start_new_session=True
        )
        track(self.proc.pid)
        if log:
            log.close()
        return self

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        with health_client() as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    where = f" (log: {self.log_path})" if self.log_path else ""
                    raise ServerError(f"vLLM server exited with code {self.proc.returncode} while starting{where}")
                if answers_health(client, self.base_url):
                    return
                time.sleep(1.0)
        self.stop()
        raise ServerError(f"vLLM server not healthy at {self.base_url} after {self.startup_timeout_s:.0f}s")

    def kill(self) -> None:
        """Kill the server abruptly (what a crash looks like to clients)."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, grace_s: float = 30.0) -> None:
        if not self.proc or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGINT)  # vLLM shuts its engine core down on SIGINT
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
