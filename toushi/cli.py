"""``toushi`` command line. Each command parses its arguments and calls one library function."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="toushi (偷师): distil a strong model's emotional-support skill into a small student.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
models_app = typer.Typer(help="Offline model cache.", no_args_is_help=True)
recipe_app = typer.Typer(help="Recipes.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(recipe_app, name="recipe")

out = Console()
err = Console(stderr=True, soft_wrap=True)

SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a recipe key: key.sub=value.")]


def _fail(msg: str) -> None:
    err.print(f"[red]error:[/red] {msg}", highlight=False)
    raise typer.Exit(2)


def load(recipe: Path, overrides: list[str] | None):
    from toushi.recipe import RecipeError, load_recipe

    try:
        return load_recipe(recipe, overrides or [])
    except RecipeError as e:
        _fail(str(e))


def run_path(run: str) -> Path:
    """A run given as a directory or as a name under ./runs."""
    p = Path(run)
    if p.is_dir():
        return p
    if (Path("runs") / run).is_dir():
        return Path("runs") / run
    _fail(f"no run directory {run!r} (looked in . and ./runs)")


# ----------------------------------------------------------------------------------- pipeline


@app.command()
def run(
    recipe: Path,
    set_: SetOpt = None,
    force: Annotated[list[str] | None, typer.Option("--force", help="Rerun this stage even if complete.")] = None,
):
    """Run the recipe's stages in order (finished, unchanged stages are skipped)."""
    from toushi.runner import run_stages
    from toushi.stages import STAGES
    from toushi.store import StoreError

    r = load(recipe, set_)
    err.print(f"[bold]recipe[/bold] {recipe} → {r.run_dir}")
    err.print(r.to_yaml(), markup=False, highlight=False)
    try:
        run_stages(r, STAGES, set(force or []))
    except (ValueError, StoreError, OSError) as e:
        _fail(str(e))
    out.print(f"run complete: {r.run_dir}")


@app.command()
def status(run: str):
    """Print each stage's state and counts for a run."""
    from toushi.runner import stage_status
    from toushi.stages import STAGE_NAMES

    rd = run_path(run)
    table = Table("stage", "status", "counts", "wall s")
    for row in stage_status(rd, STAGE_NAMES):
        colour = {"complete": "green", "failed": "red", "running": "yellow"}.get(row["status"], "dim")
        counts = ", ".join(f"{k}={v}" for k, v in row["counts"].items() if not isinstance(v, dict))
        table.add_row(row["stage"], f"[{colour}]{row['status']}[/{colour}]", counts, str(row["wall_s"] or ""))
    out.print(table)


@recipe_app.command("show")
def recipe_show(recipe: Path, set_: SetOpt = None):
    """Print the resolved recipe (defaults + YAML + --set)."""
    out.print(load(recipe, set_).to_yaml(), markup=False, highlight=False)


# ----------------------------------------------------------------------------------- models


@models_app.command("fetch")
def models_fetch(name: str, force: bool = False):
    """Download and convert an offline model into the cache (instant when cached)."""
    from toushi.models import ModelError, fetch

    try:
        path = fetch(name, force=force)
    except ModelError as e:
        _fail(str(e))
    out.print(str(path))


@models_app.command("make-tiny")
def models_make_tiny(force: bool = False):
    """Write a random-weight 2-layer model with SmolLM2's tokenizer (for fast tests)."""
    from toushi.models import ModelError, make_tiny

    try:
        out.print(str(make_tiny(force=force)))
    except ModelError as e:
        _fail(str(e))


@models_app.command("list")
def models_list():
    """Show cached models."""
    from toushi.models import ModelError, list_cached

    try:
        rows = list_cached()
    except ModelError as e:
        _fail(str(e))
    table = Table("name", "size MB", "source", "path")
    for r in rows:
        table.add_row(r["name"], str(r["size_mb"]), r.get("source", ""), r["path"])
    out.print(table)


@app.command()
def report(
    run: str,
    open_: Annotated[bool, typer.Option("--open", help="Also open the report in a web browser.")] = False,
):
    """Build (or rebuild) a run's HTML + Markdown report from what is on disk and print its path."""
    from toushi.report import ReportError, build_report

    try:
        index = build_report(run_path(run))
    except ReportError as e:
        _fail(str(e))
    out.print(str(index.resolve()), soft_wrap=True, highlight=False)  # one unwrapped line, for scripts
    if open_:
        import webbrowser

        webbrowser.open(index.resolve().as_uri())


# ----------------------------------------------------------------------------------- data / export

data_app = typer.Typer(help="Training data.", no_args_is_help=True)
export_app = typer.Typer(help="Export students and training sets for other tools.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(export_app, name="export")


@data_app.command("inspect")
def data_inspect(
    run: str,
    stage: Annotated[str, typer.Option(help="sft or dpo.")] = "sft",
    n: Annotated[int, typer.Option(help="Samples to show.")] = 3,
):
    """Render training samples through the student's chat template; highlight the tokens with loss."""
    from toushi.datasets import DatasetError
    from toushi.export import ExportError
    from toushi.inspect_data import inspect_run
    from toushi.models import ModelError
    from toushi.training import TrainError

    try:
        warnings = inspect_run(run_path(run), stage, n, out)
    except (DatasetError, ExportError, ModelError, TrainError, ValueError) as e:
        _fail(str(e))
    err.print(f"{len(warnings)} warning(s)" if warnings else "[green]no warnings[/green]")


@export_app.command("merge")
def export_merge(
    run: str,
    stage: Annotated[str, typer.Option(help="Which adapter: sft, dpo or grpo.")] = "sft",
    out_dir: Annotated[Path | None, typer.Option("--out", help="Default: runs/<run>/<stage>/merged.")] = None,
    base: Annotated[str | None, typer.Option(help="Base model (default: the adapter's own).")] = None,
    dtype: Annotated[str, typer.Option(help="auto, bfloat16, float16 or float32.")] = "auto",
):
    """Fold a stage's LoRA adapter into the base model: a full safetensors model for vLLM/transformers."""
    from toushi.export import ExportError, merge

    rd = run_path(run)
    try:
        path = merge(rd / stage / "adapter", out_dir or rd / stage / "merged", base=base, dtype=dtype)
    except ExportError as e:
        _fail(str(e))
    out.print(str(path))


@export_app.command("data")
def export_data_cmd(
    run: str,
    format: Annotated[str, typer.Option("--format", help="sharegpt, llamafactory or alpaca.")] = "sharegpt",
    out_dir: Annotated[Path | None, typer.Option("--out", help="Default: runs/<run>/export/<format>.")] = None,
):
    """Write the SFT and DPO sets (as training uses them) with LLaMA-Factory's dataset_info.json."""
    from toushi.export import ExportError, export_data

    try:
        result = export_data(run_path(run), format, out_dir)
    except ExportError as e:
        _fail(str(e))
    out.print(result)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
