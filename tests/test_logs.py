"""Quiet terminal: while a stage runs, output on fds 1 and 2 (this process and its subprocesses) goes to
the stage's engine.log; toushi's own lines stay on the terminal; a failure shows the log's tail."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from toushi.recipe import load_recipe
from toushi.runner import Stage, run_stages


def noisy(ctx):
    print("NOISE from print")
    print("NOISE from stderr", file=sys.stderr)
    subprocess.run([sys.executable, "-c", "import sys; print('NOISE from a subprocess', file=sys.stderr)"],
                   check=True)
    ctx.console.print("toushi says hello")
    with ctx.store.writer() as w:
        w.write({"id": "a"})
    return {"records": 1}


def failing(ctx):
    print("the cause, in the log", file=sys.stderr)
    raise RuntimeError("stage broke")


@pytest.fixture
def recipe(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"run": {"name": "t", "dir": str(tmp_path / "runs"), "stages": ["corpus"]}}))
    return load_recipe(p)


def test_quiet_run_sends_library_output_to_engine_log(recipe, capfd):
    assert run_stages(recipe, [Stage("corpus", noisy, ())], quiet=True) == {"corpus": "ran"}
    out, err = capfd.readouterr()
    assert "NOISE" not in out + err
    assert "toushi says hello" in err and "✓ corpus" in err
    log = (recipe.run_dir / "corpus" / "engine.log").read_text()
    for what in ("print", "stderr", "a subprocess"):
        assert f"NOISE from {what}" in log
    # output after the stage is back on the terminal
    print("after the stage", file=sys.stderr)
    assert "after the stage" in capfd.readouterr().err


def test_verbose_run_leaves_output_on_terminal(recipe, capfd):
    run_stages(recipe, [Stage("corpus", noisy, ())], quiet=False)
    out, err = capfd.readouterr()
    assert "NOISE from a subprocess" in err and "NOISE from print" in out
    assert not (recipe.run_dir / "corpus" / "engine.log").exists()


def test_quiet_failure_shows_log_tail(recipe, capfd):
    with pytest.raises(RuntimeError, match="stage broke"):
        run_stages(recipe, [Stage("corpus", failing, ())], quiet=True)
    err = capfd.readouterr().err
    assert "corpus failed" in err and "the cause, in the log" in err


def test_logger_set_up_in_one_stage_writes_into_the_next_stages_log(tmp_path, capfd):
    """vLLM's engine runs in toushi's process on a CPU and makes its log handler (on sys.stdout/err) when first
    imported, during some stage: in later stages that handler must still write, into their logs."""
    import logging

    from toushi.logs import output_to

    logger = logging.getLogger("toushi.test.engine")
    logger.propagate = False
    with output_to(tmp_path / "corpus.log"):
        handler = logging.StreamHandler(sys.stderr)
        logger.addHandler(handler)
        logger.warning("made in corpus")
    try:
        with output_to(tmp_path / "eval.log"):
            logger.warning("logged in eval")
    finally:
        logger.removeHandler(handler)
    first, second = (tmp_path / "corpus.log").read_text(), (tmp_path / "eval.log").read_text()
    assert "made in corpus" in first and "logged in eval" in second
    assert "Logging error" not in first + second + capfd.readouterr().err
