"""`toushi run` training stages: launch ``accelerate launch train/<script>.py`` as a subprocess.

Training runs in its own process (or processes, under DDP/DeepSpeed/FSDP) exactly as a user would
launch it by hand, with the run's saved recipe. Its output streams through; a failure raises with the
exit code. The script writes its counts into the stage manifest, which this returns to the runner.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from toushi.errors import ToushiError
from toushi.lifetime import ensure_watchdog, track
from toushi.paths import repo_root
from toushi.runner import StageContext


class TrainingFailed(ToushiError, RuntimeError):
    """The training subprocess exited non-zero; the message has the command and exit code."""


def accelerate_command(script: str, recipe_path: Path, config_file: Path | None, resume: bool) -> list[str]:
    """The command line: `python -m accelerate.commands.launch` uses this interpreter's environment."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        cmd += ["--config_file", str(config_file)]
    else:
        # No config: one process, and accelerate stays quiet about defaults it would otherwise warn on.
        cmd += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        # accelerate otherwise sets OMP_NUM_THREADS=1 for the process (its CPU default only applies with --cpu),
        # which halves CPU training on a 2-core machine; one process may use every core it is allowed
        cmd += ["--num_cpu_threads_per_process", os.environ.get("OMP_NUM_THREADS") or str(len(os.sched_getaffinity(0)))]
    cmd += [str(repo_root() / "train" / f"{script}.py"), "--recipe", str(recipe_path)]
    if resume:
        cmd.append("--resume")
    return cmd


def run_training_stage(ctx: StageContext, script: str) -> dict:
    """Launch train/<script>.py on the run's saved recipe; return the data counts from its manifest."""
    section = getattr(ctx.recipe, script)  # the stage's own section: each has a train.accelerate_config
    recipe_path = ctx.store.dir / "recipe.yaml"  # the runner saved the resolved recipe here
    if not recipe_path.exists():
        from toushi.recipe import save_recipe
        from toushi.recipe_view import whole

        recipe_path = save_recipe(whole(ctx.recipe), ctx.store.dir)  # the trainer reads it in its own process
    # Always ask to resume: the script resumes only from checkpoints of this same recipe (fingerprint),
    # so a rerun after a crash continues and a changed recipe starts fresh.
    cmd = accelerate_command(script, recipe_path, section.train.accelerate_config, resume=True)
    ctx.console.print(f"[dim]$ {' '.join(cmd)}[/dim]", highlight=False)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ctx.free_engines()  # the trainer gets the memory the run's engines held
    ensure_watchdog()  # training processes must not outlive `toushi run`, even on SIGKILL
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    track(proc.pid)
    try:
        for line in proc.stdout:
            sys.stderr.write(line)  # the stage's engine.log when quiet, else the terminal
            # the trainer's loss dict often lands on the line tqdm's bar (or the spaces clearing it) began
            text = line.strip()
            loss = text.find("{'loss'")
            if ctx.quiet and (text.startswith("[toushi]") or loss >= 0):
                ctx.console.print(text[max(loss, 0):], markup=False, highlight=False)
        rc = proc.wait()
    except BaseException:
        proc.terminate()  # Ctrl-C: do not leave training processes behind
        proc.wait()
        raise
    if rc != 0:
        raise TrainingFailed(f"{script} training failed (exit {rc}): {' '.join(cmd)}")
    manifest = ctx.store.manifest() or {}
    if "data" not in manifest:
        raise TrainingFailed(f"{script} training exited 0 but wrote no data counts to {ctx.store.manifest_path}")
    training = manifest.get("training", {})
    return {
        **{k: v for k, v in manifest["data"].items() if k != "by_kind"},
        "steps": training.get("steps"),
        "final_loss": training.get("final_loss"),
        "eval_loss": training.get("eval_loss"),
    }
