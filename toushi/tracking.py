"""Experiment tracking for the training stages: TRL's ``report_to``, kept local by default.

``train.report_to`` names one tracker. Training scripts call :func:`start` before building their trainer:
it points the tracker at the run (the environment variables transformers' callbacks read), and for mlflow
opens the stage's run itself, so the resolved recipe is attached before the first step and the run id can
be recorded in the stage manifest. The callback then logs into that open run. After eval,
:func:`log_eval_summary` attaches ``eval/summary.json`` to every training stage's tracked run.

Local by default: mlflow writes a file store under the run directory unless MLFLOW_TRACKING_URI is set,
wandb runs offline unless WANDB_MODE is set, trackio uses its local store (no Space).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from toushi.errors import ToushiError
from toushi.recipe import Recipe

TRAINING_STAGES = ("sft", "dpo", "grpo", "distill", "selftrain")
PACKAGE = {"mlflow": "mlflow-skinny", "wandb": "wandb", "trackio": "trackio"}  # module -> what to install


class TrackingError(ToushiError, RuntimeError):
    """A tracker the recipe names but this environment cannot run; the message says what to install."""


def mlflow_uri(run_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or (Path(run_dir) / "mlruns").resolve().as_uri()


def start(recipe: Recipe, stage: str, stage_dir: Path, is_main: bool) -> dict:
    """Set the tracker up for one training stage; returns ``{"report_to", ...}`` for the manifest.

    ``trainer_kwargs(..., tracking=...)`` turns the result into TrainingArguments fields.
    """
    kind = recipe.train.report_to
    name = recipe.run.name
    if kind in PACKAGE and importlib.util.find_spec(kind) is None:
        raise TrackingError(f"train.report_to: {kind} needs the {kind} package: pip install {PACKAGE[kind]} "
                            "(or set train.report_to=tensorboard)")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(stage_dir / "tensorboard")  # transformers reads it here
    info: dict = {"report_to": kind, "project": name, "run_name": f"{name}/{stage}"}
    if kind == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")  # uploads only when the user asks for it
        os.environ.setdefault("WANDB_DIR", str(recipe.run_dir))
        os.environ.setdefault("WANDB_PROJECT", name)
        info["mode"] = os.environ["WANDB_MODE"]
    elif kind == "mlflow":
        uri = mlflow_uri(recipe.run_dir)
        if uri.startswith("file:"):
            # mlflow 3 refuses its file store unless asked; the alternative (sqlite) needs the full mlflow
            # package, and a file store beside the run needs no server and no database
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        os.environ["MLFLOW_TRACKING_URI"] = uri
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", name)
        info["tracking_uri"] = uri
        if is_main:
            import mlflow

            mlflow.set_tracking_uri(uri)
            mlflow.set_experiment(os.environ["MLFLOW_EXPERIMENT_NAME"])
            # mlflow ends the run when the process exits; the callback logs into this open run
            run = mlflow.active_run() or mlflow.start_run(run_name=info["run_name"])
            recipe_file = stage_dir / "recipe.yaml"
            if recipe_file.exists():
                mlflow.log_artifact(str(recipe_file))
            info["run_id"] = run.info.run_id
    return info


def end(info: dict) -> None:
    """Close the stage's mlflow run (training in toushi's own process, where no exit would close it)."""
    if info.get("report_to") == "mlflow" and info.get("run_id"):
        import mlflow

        if mlflow.active_run() and mlflow.active_run().info.run_id == info["run_id"]:
            mlflow.end_run()


def log_eval_summary(run_dir: Path, summary_path: Path) -> list[str]:
    """Attach the eval summary to each training stage's mlflow run; returns the stages it was attached to.

    Trackers without artifacts or resumable offline runs (tensorboard, trackio, wandb offline) are left alone:
    the summary stays in runs/<run>/eval/summary.json.
    """
    attached = []
    for stage in TRAINING_STAGES:
        manifest_path = Path(run_dir) / stage / "manifest.json"
        try:
            tracking = json.loads(manifest_path.read_text(encoding="utf-8")).get("tracking") or {}
        except (OSError, ValueError):
            continue
        if tracking.get("report_to") != "mlflow" or not tracking.get("run_id"):
            continue
        from mlflow import MlflowClient

        if tracking["tracking_uri"].startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # the client API: no active run to start or collide with in toushi's own process
        MlflowClient(tracking["tracking_uri"]).log_artifact(tracking["run_id"], str(summary_path), "eval")
        attached.append(stage)
    return attached
