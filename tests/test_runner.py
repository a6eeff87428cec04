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
