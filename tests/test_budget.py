"""scripts/test_budget.py: where the suite's time went, from the record tests/conftest.py writes."""

from __future__ import annotations

import importlib.util
import json

from tests.conftest import REPO


def budget():
    spec = importlib.util.spec_from_file_location("test_budget_script", REPO / "scripts" / "test_budget.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_budget_lists_tests_files_and_background_apart(tmp_path, capsys):
    record = tmp_path / "times.json"
    record.write_text(json.dumps({
        "tests/test_a.py::test_slow": {"wall_s": 120.0, "cpu_s": 100.0},
        "tests/test_a.py::test_fast": {"wall_s": 30.0, "cpu_s": 20.0},
        "tests/test_b.py::test_waits": {"wall_s": 60.0, "cpu_s": 1.0},
        "background::replicas": {"wall_s": 400.0},
    }))
    assert budget()([str(record), "--top", "2"]) == 0
    out = capsys.readouterr().out
    # the background job's wall time overlaps the tests': it is not added to the suite's wall time
    assert out.startswith("3 tests, 3.5 min wall, 2.0 min CPU")
    slowest = out.split("slowest 2 tests")[1].split("by file")[0]
    assert "test_slow" in slowest and "test_waits" in slowest and "test_fast" not in slowest
    assert "  150.0   120.0    2  tests/test_a.py" in out
    assert "overlapping the tests" in out and "  400.0  replicas" in out
    assert budget()([str(record), "--budget-min", "3"]) == 1  # 3.5 min is over a 3-minute budget
    assert budget()([str(record), "--budget-min", "4"]) == 0
    assert budget()([str(tmp_path / "missing.json")]) == 2


def test_budget_under_workers_checks_the_runs_own_wall_and_shows_each_worker(tmp_path, capsys):
    record = tmp_path / "times.json"
    record.write_text(json.dumps({
        "tests/test_a.py::test_slow": {"wall_s": 120.0, "cpu_s": 100.0, "worker": "gw0"},
        "tests/test_b.py::test_other": {"wall_s": 90.0, "cpu_s": 80.0, "worker": "gw1"},
        "tests/test_b.py::test_short": {"wall_s": 30.0, "cpu_s": 20.0, "worker": "gw1"},
        "session::pytest": {"wall_s": 150.0, "workers": 2},
    }))
    # the tests' walls sum to 4 minutes; the run took 2.5: the budget is checked against the run
    assert budget()([str(record), "--budget-min", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("3 tests, 4.0 min wall")
    assert "pytest ran 2.5 min on 2 xdist workers" in out
    assert "  120.0    1  gw0" in out and "  120.0    2  gw1" in out
    assert budget()([str(record), "--budget-min", "2"]) == 1


def test_budget_against_an_earlier_run_and_where_each_ran(tmp_path, capsys):
    old, new = tmp_path / "old.json", tmp_path / "new.json"
    old.write_text(json.dumps({
        "tests/test_a.py::test_slow": {"wall_s": 120.0, "cpu_s": 100.0},
        "tests/test_gone.py::test_x": {"wall_s": 5.0, "cpu_s": 5.0},
        "session::pytest": {"wall_s": 130.0, "workers": 2},  # a record from before it said where it ran
    }))
    new.write_text(json.dumps({
        "tests/test_a.py::test_slow": {"wall_s": 90.0, "cpu_s": 80.0},
        "tests/test_b.py::test_new": {"wall_s": 10.0, "cpu_s": 9.0},
        "session::pytest": {"wall_s": 100.0, "workers": 2, "cpu": "flags avx2", "commit": "abc1234"},
    }))
    assert budget()([str(new), "--against", str(old)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 tests, 1.7 min wall, 1.5 min CPU (flags avx2, commit abc1234)")
    against = out.split("against the earlier run")[1]
    assert "pytest ran 1.7 min (flags avx2, commit abc1234); the earlier run 2.2 min (its CPU kind not recorded)" \
        in against
    rows = [line.split() for line in against.splitlines() if line.strip().startswith(("9", "1", "0", "-"))]
    # the largest change first; a file only one run has counts 0 in the other
    assert rows[0] == ["90.0", "120.0", "-30.0", "80.0", "100.0", "tests/test_a.py"]
    assert ["10.0", "0.0", "+10.0", "9.0", "0.0", "tests/test_b.py"] in rows
    assert ["0.0", "5.0", "-5.0", "0.0", "5.0", "tests/test_gone.py"] in rows
    assert budget()([str(new), "--against", str(tmp_path / "missing.json")]) == 2


def test_a_run_records_its_cpu_kind_and_commit(tmp_path):
    """The record pytest writes (tests/conftest.py) says where and what ran, for the budget script to print."""
    import os
    import subprocess
    import sys

    from toushi.hardware import cpu_kind

    record = tmp_path / "times.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}  # a run of its own, no worker
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_think.py"],
                          cwd=REPO, env={**env, "TOUSHI_TEST_TIMES": str(record)}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:]
    session = json.loads(record.read_text())["session::pytest"]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert session["cpu"] == cpu_kind() and session["commit"] == (head.stdout.strip() or None)
    assert session["wall_s"] > 0 and session["workers"] == 0
