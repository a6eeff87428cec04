"""Stage runner: complete unchanged stages are skipped, --force and recipe changes rerun them,
failures are recorded in the manifest, and the resolved recipe is saved beside every output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from toushi.recipe import load_recipe
from toushi.runner import Stage, run_stages, stage_status
from toushi.store import StageStore

CALLS: list[str] = []


def numbers(ctx):
    """A real stage: writes one record per number, resumably."""
    CALLS.append("numbers")
    have = ctx.store.ids()
    with ctx.store.writer() as w:
        for i in range(ctx.recipe.run.seed + 3):
            if f"n{i}" not in have:
                w.write({"id": f"n{i}", "value": i})
    return {"records": len(ctx.store.records())}


def squares(ctx):
    CALLS.append("squares")
    src = ctx.stage("corpus").records()
    with ctx.store.writer() as w:
        for r in src:
            w.write({"id": r["id"], "value": r["value"] ** 2})
    return {"records": len(src)}


def broken(ctx):
    raise RuntimeError("boom")


STAGES = [
    Stage("corpus", numbers, ("run.seed",)),
    Stage("pairs", squares, ("pairs",), ("corpus",)),
    Stage("guidance", broken, ()),
]


@pytest.fixture
def recipe_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"run": {"name": "t", "dir": str(tmp_path / "runs"), "stages": ["corpus", "pairs"]}}))
    return p


def test_skip_force_and_invalidation(recipe_file):
    CALLS.clear()
    r = load_recipe(recipe_file)
    assert run_stages(r, STAGES) == {"corpus": "ran", "pairs": "ran"}
    assert run_stages(r, STAGES) == {"corpus": "skipped", "pairs": "skipped"}
    assert run_stages(r, STAGES, force={"pairs"}) == {"corpus": "skipped", "pairs": "ran"}
    # A change in a section the first stage reads reruns it, and the change flows downstream.
    r2 = load_recipe(recipe_file, ["run.seed=2"])
    assert run_stages(r2, STAGES) == {"corpus": "ran", "pairs": "ran"}
    assert CALLS == ["numbers", "squares", "squares", "numbers", "squares"]
    assert len(StageStore(r2.run_dir, "corpus").records()) == 5
    m = StageStore(r2.run_dir, "pairs").manifest()
    assert m["status"] == "complete" and m["counts"] == {"records": 5} and "corpus" in m["inputs"]
    saved = load_recipe(r2.run_dir / "pairs" / "recipe.yaml")
    assert saved.run.seed == 2


def test_failure_is_recorded(recipe_file):
    r = load_recipe(recipe_file, ["run.stages=[guidance]"])
    with pytest.raises(RuntimeError, match="boom"):
        run_stages(r, STAGES)
    m = StageStore(r.run_dir, "guidance").manifest()
    assert m["status"] == "failed" and "boom" in m["error"]
    assert [row["status"] for row in stage_status(r.run_dir, ["corpus", "guidance"])] == ["not run", "failed"]


FLAKY = {"fail": True}


def flaky(ctx):
    if FLAKY["fail"]:
        raise RuntimeError("boom once")
    return numbers(ctx)


def test_success_clears_the_failure_and_a_deleted_output_reruns(recipe_file):
    """A stage that failed and then succeeded keeps no error or traceback, and its versions are this run's; a
    stage whose own output was deleted reruns (alone: what reads it is unchanged once it is remade)."""
    stages = [Stage("corpus", flaky, ("run.seed",)), *STAGES[1:]]
    r = load_recipe(recipe_file)
    FLAKY["fail"] = True
    with pytest.raises(RuntimeError, match="boom once"):
        run_stages(r, stages)
    store = StageStore(r.run_dir, "corpus")
    assert "boom once" in store.manifest()["error"] and store.manifest()["traceback"]
    store.write_manifest(versions={"torch": "0.0-old"})  # as if the failed run had other packages
    FLAKY["fail"] = False
    assert run_stages(r, stages) == {"corpus": "ran", "pairs": "ran"}
    m = store.manifest()
    assert m["status"] == "complete" and m["rerun_reason"] == "last run failed"
    assert "error" not in m and "traceback" not in m and m["versions"]["torch"] != "0.0-old"
    assert m["outputs"] == ["records.jsonl"]

    store.records_path.unlink()
    CALLS.clear()
    assert run_stages(r, stages) == {"corpus": "ran", "pairs": "skipped"}  # the same records are made again
    assert store.manifest()["rerun_reason"] == "output missing: records.jsonl" and CALLS == ["numbers"]
    assert run_stages(r, stages) == {"corpus": "skipped", "pairs": "skipped"}


def test_bad_stage_names(recipe_file):
    r = load_recipe(recipe_file, ["run.stages=[corpus, eval]"])
    with pytest.raises(ValueError, match="not available.*eval"):
        run_stages(r, STAGES)
    with pytest.raises(ValueError, match="--force: not a stage of this recipe: dpo"):
        run_stages(load_recipe(recipe_file), STAGES, force={"dpo"})


def test_cli_lists_verbs_and_reports_bad_recipe(tmp_path):
    toushi = Path(sys.executable).parent / "toushi"
    out = subprocess.run([str(toushi), "--help"], capture_output=True, text=True, check=True).stdout
    for verb in ("run", "status", "models", "recipe"):
        assert verb in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {name: t, stagez: []}\n")
    res = subprocess.run([str(toushi), "run", str(bad)], capture_output=True, text=True)
    assert res.returncode == 2 and "run.stagez" in res.stderr and str(bad) in res.stderr


def test_every_toushi_error_is_one_line_for_the_user(tmp_path):
    """Every error class toushi defines derives from ToushiError, which `toushi run` (and the `toushi` entry point
    for any other command) prints as one line: a stage's own error, here eval's EvalError (a RuntimeError,
    once a traceback), says what is missing and what to run."""
    import ast

    from toushi.paths import repo_root

    builtin = {"Exception", "RuntimeError", "ValueError", "OSError", "KeyError", "TypeError", "LookupError"}
    errors = {}  # class name -> its bases, for every exception class defined in toushi/
    for path in (repo_root() / "toushi").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            bases = [b.id for b in getattr(node, "bases", []) if isinstance(b, ast.Name)]
            if isinstance(node, ast.ClassDef) and builtin & set(bases):
                errors[node.name] = bases
    assert len(errors) >= 20 and {n: b for n, b in errors.items() if "ToushiError" not in b} == {"ToushiError": ["Exception"]}

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"run": {"name": "t", "dir": str(tmp_path / "runs"), "stages": ["eval"]}}))
    res = subprocess.run([str(Path(sys.executable).parent / "toushi"), "run", str(recipe)], capture_output=True,
                         text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "no held-out prompts" in lines[0] and "run the pairs stage" in lines[0], res.stderr


def test_second_run_on_same_dir_refused(tmp_path):
    """Real `toushi run` processes: while one holds the run directory (stopped mid-run, still alive), a second
    exits at once naming the holder's pid and command; once the holder is SIGKILLed the lock is gone with it."""
    import json
    import os
    import signal
    import time

    from toushi.runlock import LOCK_NAME, RunLocked, run_lock

    toushi = Path(sys.executable).parent / "toushi"
    data = Path(__file__).resolve().parent.parent / "data" / "venting_en.jsonl"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"run": {"name": "t", "dir": str(tmp_path / "runs"), "stages": ["corpus"]},
                                      "corpus": {"sources": [{"path": str(data), "format": "openings"}],
                                                 "per_scene": 1}}))
    lock = tmp_path / "runs" / "t" / LOCK_NAME
    first = subprocess.Popen([str(toushi), "run", str(recipe)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if lock.exists() and f'"pid": {first.pid}' in lock.read_text():
                break
            assert first.poll() is None, "the first run ended before it was seen holding the lock"
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGSTOP)  # holds the lock, does nothing: the second run meets a live holder
        t0 = time.monotonic()
        second = subprocess.run([str(toushi), "run", str(recipe)], capture_output=True, text=True, timeout=120)
        waited = time.monotonic() - t0
        assert second.returncode == 2, second.stderr[-2000:]
        line = next(ln for ln in second.stderr.splitlines() if ln.startswith("error:"))
        assert f"in use by another toushi run (pid {first.pid}: toushi run {recipe})" in line, line
        assert "Traceback" not in second.stderr and not (tmp_path / "runs" / "t" / "corpus" / "records.jsonl").exists()
        assert json.loads(lock.read_text())["pid"] == first.pid  # the refused run did not touch the lock file
        with pytest.raises(RunLocked, match=f"pid {first.pid}"):  # the library refuses too
            with run_lock(tmp_path / "runs" / "t"):
                pass
        print(f"second run refused after {waited:.1f}s (CLI start-up included)")
    finally:
        first.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
        first.wait()
    with run_lock(tmp_path / "runs" / "t"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_guidance_fingerprint_covers_what_its_gate_reads(tmp_path, monkeypatch):
    """The guidance gate answers with the guided sampling and judges in eval's mode with eval's bootstrap: a change
    to any of them makes guidance stale; a change to an eval setting it does not read does not."""
    from toushi.paths import repo_root
    from toushi.runner import fingerprint
    from toushi.stages import STAGES as REAL

    monkeypatch.chdir(repo_root())
    by_name = {s.name: s for s in REAL}

    def fp(*sets: str) -> str:
        r = load_recipe("recipes/tiny-cpu.yaml", [f"run.dir={tmp_path}", *sets])
        return fingerprint(r, by_name["guidance"], by_name)[0]

    base = fp()
    assert fp("eval.judge_mode=generate") != base
    assert fp("eval.bootstrap=500") != base
    assert fp("guided.sampling.temperature=0.5") != base
    assert fp("eval.max_prompts=5") == base


def test_undeclared_recipe_read_raises(tmp_path):
    """The runner shows a stage only the recipe keys its entry declares (the keys its fingerprint covers): a
    declared section whole, the parts of a section it names, the run's own keys; any other read, and any write,
    raises UndeclaredRead naming the stage and the key, and the stage is recorded as failed with that message."""
    from toushi.recipe import Recipe
    from toushi.recipe_view import UndeclaredRead, whole

    seen: dict = {}

    def reader(ctx):
        r = ctx.recipe
        seen.update(weak=r.models.weak.name, pairs=r.pairs.batch_size, lang=r.run.lang, run_dir=r.run_dir,
                    name=r.run.name, tracker=r.train.report_to, whole=whole(r))
        with pytest.raises(UndeclaredRead, match="stage pairs reads recipe key models.strong"):
            r.models.strong
        with pytest.raises(UndeclaredRead, match="read-only"):
            r.models.weak = None
        return {"seed": r.run.seed}  # undeclared: fails the stage

    recipe = Recipe.model_validate({
        "run": {"name": "t", "dir": str(tmp_path / "runs"), "stages": ["pairs"]},
        "models": {"weak": {"name": "w", "engine": "hf"}, "strong": {"name": "s", "engine": "hf"}},
    })
    stage = Stage("pairs", reader, ("run.lang", "pairs", "models.weak"))
    with pytest.raises(UndeclaredRead, match="stage pairs reads recipe key run.seed, which its entry in "
                                             "toushi/stages.py does not declare"):
        run_stages(recipe, [stage])
    assert seen == {"weak": "w", "pairs": recipe.pairs.batch_size, "lang": "en", "run_dir": recipe.run_dir,
                    "name": "t", "tracker": recipe.train.report_to, "whole": recipe}
    manifest = StageStore(recipe.run_dir, "pairs").manifest()
    assert manifest["status"] == "failed" and "run.seed" in manifest["error"]
