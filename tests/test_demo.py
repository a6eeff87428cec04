"""The whole tiny recipe end to end, as `make demo` runs it (``pytest --run-slow``: ~10 minutes on 2 cores).

The stages are tested one by one elsewhere; this proves they chain: every stage completes from an empty
run directory, a second `toushi run` skips them all, and the report exists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from toushi.paths import repo_root
from toushi.recipe import load_recipe

pytestmark = pytest.mark.slow


def test_tiny_cpu_recipe_end_to_end(tmp_path, offline_model):
    recipe = repo_root() / "recipes" / "tiny-cpu.yaml"
    stages = load_recipe(recipe).run.stages
    cmd = [sys.executable, "-m", "toushi.cli", "run", str(recipe), "--set", f"run.dir={tmp_path}"]
    first = subprocess.run(cmd, cwd=repo_root(), env=os.environ, capture_output=True, text=True, timeout=3600)
    assert first.returncode == 0, first.stderr[-4000:]
    for stage in stages:
        m = json.loads((tmp_path / "tiny-cpu" / stage / "manifest.json").read_text())
        assert m["status"] == "complete", (stage, m.get("error"))
    assert (tmp_path / "tiny-cpu" / "report" / "index.html").stat().st_size > 0
    again = subprocess.run(cmd, cwd=repo_root(), env=os.environ, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stderr.count("up to date, skipped") == len(stages), again.stderr[-2000:]
