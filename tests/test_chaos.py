"""Chaos: SIGKILL a real `toushi run` at 5 seeded moments spread over its stages, rerun after each kill, and
the run ends as an uninterrupted one does: the same records (ids, counts, texts), the same adapter, the same
report; and nothing toushi started outlives a kill.

The recipe is sized to cross each kind of stage cheaply: corpus (6 team posts, 2 held out; no model),
pairs (generation in toushi's process, one prompt a call so that a kill lands between calls), sft (a
training subprocess through accelerate, a checkpoint each of its 2 steps), eval (student and sft answers,
held-out NLL; no judge) and report. Every model is the tests' tiny random one: it never ends a turn, so a
space ends each sampled answer (a cut-off answer is never a target). Sampling is seeded per call, one prompt
a call, so the texts are the same however the calls are split between runs.

A kill moment is a seeded point of progress on disk (a stage's n-th answer, a checkpoint, a stage begun),
killed as soon as it shows (the answers of a random model come faster than any delay would be safe); a
moment the run has already passed at its start moves to the next one. Each kill takes either the run's whole
process group or toushi's process alone (then toushi's watchdog, or the broken pipe to toushi, must stop
what it started).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from test_caching import alive, note_descendants, start_run

from toushi.lifetime import proc_start
from toushi.paths import repo_root
from toushi.recipe import load_recipe
from toushi.runner import run_stages
from toushi.stages import STAGES
from toushi.store import read_jsonl

SEED = 24
KILLS = 5
RESERVE = 2  # the last moments are never drawn: room for kills that land past their moment to move on to
STAGE_NAMES = ["corpus", "pairs", "sft", "eval", "report"]
POSTS, HELDOUT, SYSTEMS = 6, 2, ["student", "sft"]


def write_recipe(path: Path, runs: Path, name: str) -> Path:
    # a random model's sampled words, each answer ended at the first space: seeded, so a rerun says the same
    tiny = {"name": "tiny-random", "engine": "hf", "dtype": "float32", "hf_batch_size": 1,
            "sampling": {"temperature": 1.0, "max_tokens": 8, "stop": [" "], "seed": 0}}
    path.write_text(yaml.safe_dump({
        "run": {"name": name, "dir": str(runs), "lang": "en", "stages": STAGE_NAMES},
        "models": {"weak": tiny, "strong": tiny, "student": tiny},
        "corpus": {"sources": [{"path": str(repo_root() / "data" / "venting_en.jsonl"), "format": "openings"}],
                   "per_scene": None, "max_posts": POSTS, "heldout_fraction": HELDOUT / POSTS + 0.01},
        "pairs": {"batch_size": 1},
        "sft": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                "train": {"max_steps": 2, "save_steps": 1, "per_device_train_batch_size": 2, "max_length": 512,
                          "learning_rate": 1e-2, "eval_fraction": 0.0, "lr_scheduler_type": "constant"}},
        "eval": {"systems": SYSTEMS, "judge": False, "ladder": False, "bootstrap": 10, "batch_size": 1,
                 "sampling": tiny["sampling"]},
    }))
    return path


def lines(path: Path) -> int:
    """Whole lines in a JSONL file (a torn last line does not count)."""
    return path.read_bytes().count(b"\n") if path.exists() else 0


def moments(run: Path) -> list[tuple[str, str, Callable[[], bool]]]:
    """Points of progress on disk, in the order an uninterrupted run passes them: (stage, what, reached?)."""
    weak, strong = run / "pairs" / "weak_cache" / "records.jsonl", run / "pairs" / "strong_cache" / "records.jsonl"
    ckpt = run / "sft" / "checkpoints"
    students = run / "eval" / "students" / "records.jsonl"
    return [
        *[("pairs", f"weak answer {k}", lambda k=k: lines(weak) >= k) for k in range(1, POSTS + 1)],
        *[("pairs", f"strong answer {k}", lambda k=k: lines(strong) >= k) for k in range(1, POSTS + 1)],
        ("sft", "stage begun", lambda: (run / "sft" / "manifest.json").exists()),
        ("sft", "checkpoint 1", lambda: (ckpt / "checkpoint-1" / "trainer_state.json").exists()),
        *[("eval", f"answer {k}", lambda k=k: lines(students) >= k) for k in range(1, HELDOUT * len(SYSTEMS) + 1)],
        ("eval", "held-out NLL", lambda: lines(run / "eval" / "nll" / "records.jsonl") >= 1),
        ("report", "stage begun", lambda: (run / "report" / "manifest.json").exists()),
    ]


def running_stage(run: Path) -> str | None:
    """The stage whose manifest says it was running (where a kill landed)."""
    for name in STAGE_NAMES:
        path = run / name / "manifest.json"
        if path.exists() and json.loads(path.read_text()).get("status") == "running":
            return name
    return None


def leftovers(tmp_path: Path, seen: dict[int, int], killed: int) -> dict[int, str]:
    """Processes still running that toushi started: those seen below the killed run, and any whose command
    line names this test's files (the run, its training) or watches the killed pid (its watchdog)."""
    out = {pid: "seen below the run" for pid in alive(seen)}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(tmp_path) in cmd or f"toushi.lifetime {killed} " in cmd:
            out[int(d.name)] = cmd
    return {pid: why for pid, why in out.items() if proc_start(pid) is not None}  # zombies are gone


def run_until_killed(tmp_path: Path, recipe: Path, run: Path, i: int, target: int, group: bool) -> str:
    """One `toushi run`, SIGKILLed when moment ``target`` is reached; the stage it landed in."""
    stage, what, reached = moments(run)[target]
    proc = start_run(recipe, tmp_path / f"run{i}.log")
    seen: dict[int, int] = {}
    try:
        deadline, last_look = time.time() + 300, 0.0
        while time.time() < deadline and proc.poll() is None and not reached():
            if time.time() - last_look > 0.5:  # the whole process table: cheap only now and then
                note_descendants(proc.pid, seen)
                last_look = time.time()
            time.sleep(0.01)
        assert reached(), f"kill {i}: the run never reached {stage}: {what}\n" + (tmp_path / f"run{i}.log").read_text()[-3000:]
        assert proc.poll() is None, f"kill {i} ({stage}: {what}) came after the run had ended"
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:  # never leave a run behind, even when the test fails
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    landed = running_stage(run)
    # what the run started goes with it: with the group, or stopped by toushi's watchdog (SIGTERM, then
    # SIGKILL 5 s later) or by its own write to the pipe toushi no longer reads
    deadline = time.time() + 30
    while time.time() < deadline and leftovers(tmp_path, seen, proc.pid):
        time.sleep(0.25)
    left = leftovers(tmp_path, seen, proc.pid)
    for pid in left:  # do not leave them to the next test
        os.kill(pid, signal.SIGKILL)
    assert not left, f"kill {i} ({'group' if group else 'toushi only'}, in {landed}) left running: {left}"
    return landed


def outcome(run: Path) -> dict:
    """What a finished run holds, less what differs between two equal runs (run name, timings)."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in ("latency_s", "wall_s")}
        return [strip(v) for v in x] if isinstance(x, list) else x

    from safetensors.torch import load_file

    out = {rel: sorted((strip(r) for r in read_jsonl(run / rel)), key=lambda r: r["id"]) for rel in (
        "corpus/records.jsonl", "pairs/weak_cache/records.jsonl", "pairs/strong_cache/records.jsonl",
        "pairs/records.jsonl", "eval/students/records.jsonl", "eval/nll/records.jsonl", "eval/records.jsonl")}
    out["eval/summary.json"] = {k: v for k, v in json.loads((run / "eval" / "summary.json").read_text()).items()
                                if k != "run"}
    adapter = run / "sft" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    # PEFT writes target_modules from a set: its order is the process's string hashing, not the adapter's
    out["sft/adapter config"] = {**config, "target_modules": sorted(config["target_modules"])}
    out["sft/adapter weights"] = {k: v.tolist() for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
    for page in ("report.md", "index.html"):
        out[f"report/{page}"] = (run / "report" / page).read_text().replace(run.name, "<run>")
    return out


def test_random_kills_lose_nothing(tmp_path, tiny_model, capsys):
    calm = load_recipe(write_recipe(tmp_path / "calm.yaml", tmp_path / "runs", "calm"))
    assert run_stages(calm, STAGES) == dict.fromkeys(STAGE_NAMES, "ran")  # uninterrupted, in this process
    want = outcome(calm.run_dir)
    assert len(want["pairs/records.jsonl"]) == POSTS and len(want["eval/records.jsonl"]) == HELDOUT * len(SYSTEMS)
    assert all(c["finish_reason"] == "stop" for r in want["pairs/records.jsonl"] for c in r["strong"])

    recipe = write_recipe(tmp_path / "chaos.yaml", tmp_path / "runs", "chaos")
    run = tmp_path / "runs" / "chaos"
    rng = random.Random(SEED)
    points = moments(run)
    by_stage = {s: [i for i, (st, _, _) in enumerate(points[:-RESERVE]) if st == s] for s in ("pairs", "sft", "eval")}
    picked = {rng.choice(ix) for ix in by_stage.values()}  # one in each stage that has moments, then any
    picked |= set(rng.sample([i for i in range(len(points) - RESERVE) if i not in picked], KILLS - len(picked)))
    modes = [True, False] + [rng.random() < 0.5 for _ in range(KILLS - 2)]  # group kill or toushi's pid alone
    rng.shuffle(modes)
    landed = []
    for i, (target, group) in enumerate(zip(sorted(picked), modes)):
        # a moment this run starts past (the last kill landed beyond it) moves to the next one not reached
        target = next((t for t in range(target, len(points)) if not points[t][2]()), None)
        assert target is not None, f"kill {i}: the run is past every moment left: {landed}"
        landed.append((points[target][0], points[target][1], "group" if group else "toushi only",
                       run_until_killed(tmp_path, recipe, run, i, target, group)))
    assert len({stage for *_, stage in landed}) >= 3, landed  # the kills hit several kinds of stage

    capsys.readouterr()
    result = run_stages(load_recipe(recipe), STAGES)  # the last rerun, to the end, in this process
    assert result["report"] == "ran", (result, landed)
    # nothing redone: an answer generated twice would be a second line in its cache (compared below), and
    # training takes each step once, but for the one a kill cut short before its checkpoint was saved
    # (the steps: the training script's loss lines, in the stage's log for the killed `toushi run`s, which
    # append to it, and on this process's stderr for the last rerun, which is not quiet)
    logged = (run / "sft" / "engine.log").read_text(errors="replace").count("{'loss'")
    steps = logged + capsys.readouterr().err.count("{'loss'")
    assert 2 <= steps <= 2 + sum(stage == "sft" for *_, stage in landed), (steps, landed)
    # the killed runs showed each of theirs on the terminal, a resumed run's too (that loss line follows tqdm's
    # bar on one line)
    shown = "".join((tmp_path / f"run{i}.log").read_text(errors="replace") for i in range(KILLS)).count("{'loss'")
    assert shown == logged, (shown, logged, landed)
    got = outcome(run)
    for key, value in want.items():
        assert got[key] == value, f"{key} differs from the uninterrupted run's after kills at {landed}"
