"""Stage runner: ``toushi run RECIPE`` runs the recipe's stages in order, skipping finished ones.

A stage is skipped when its manifest says complete and its fingerprint (the recipe sections it reads
plus the fingerprints of the stages it reads from) is unchanged; ``--force STAGE`` reruns it. Stages
are resumable on their own (records are a cache keyed by content), so a rerun after a crash only does
what is missing.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from toushi.recipe import Recipe, save_recipe
from toushi.store import StageStore, stable_id

console = Console(stderr=True)


@dataclass
class StageContext:
    """What a stage function gets: the recipe, its own store, and read access to other stages."""

    recipe: Recipe
    store: StageStore
    console: Console = field(default_factory=lambda: console)

    @property
    def run_dir(self) -> Path:
        return self.recipe.run_dir

    def stage(self, name: str) -> StageStore:
        return StageStore(self.run_dir, name)


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext], dict]
    sections: tuple[str, ...]  # recipe keys (dotted) whose values change this stage's output
    inputs: tuple[str, ...] = ()  # stages it reads from, when they are part of the run


def fingerprint(recipe: Recipe, stage: Stage) -> tuple[str, dict[str, str]]:
    """(fingerprint, upstream fingerprints) for a stage under this recipe."""
    upstream = {}
    for name in stage.inputs:
        if name in recipe.run.stages:
            m = StageStore(recipe.run_dir, name).manifest() or {}
            upstream[name] = m.get("fingerprint", "missing")
    own = recipe.section_hash(*stage.sections)
    return stable_id(stage.name, own, upstream), upstream


def run_stages(recipe: Recipe, stages: list[Stage], force: set[str] | None = None) -> dict[str, str]:
    """Run the recipe's stages (in the recipe's order). Returns stage -> 'ran' | 'skipped'."""
    force = force or set()
    by_name = {s.name: s for s in stages}
    unknown = [n for n in recipe.run.stages if n not in by_name]
    if unknown:
        raise ValueError(f"run.stages: not available in this version of toushi: {', '.join(unknown)}")
    bad_force = force - set(recipe.run.stages)
    if bad_force:
        raise ValueError(f"--force: not a stage of this recipe: {', '.join(sorted(bad_force))}")
    save_recipe(recipe, recipe.run_dir)
    outcome: dict[str, str] = {}
    for name in recipe.run.stages:
        stage = by_name[name]
        store = StageStore(recipe.run_dir, name)
        fp, upstream = fingerprint(recipe, stage)
        if name not in force and store.is_complete(fp):
            console.print(f"[dim]• {name}: up to date, skipped[/dim]")
            outcome[name] = "skipped"
            continue
        console.rule(f"[bold]{name}")
        save_recipe(recipe, store.dir)
        store.write_manifest(
            status="running",
            fingerprint=fp,
            recipe_hash=recipe.section_hash(*stage.sections),
            inputs=upstream,
            started_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )
        t0 = time.time()
        try:
            counts = stage.run(StageContext(recipe=recipe, store=store)) or {}
        except BaseException as e:
            store.write_manifest(
                status="failed",
                error=f"{type(e).__name__}: {e}",
                traceback=traceback.format_exc(limit=8),
                wall_s=round(time.time() - t0, 2),
            )
            raise
        store.write_manifest(status="complete", counts=counts, wall_s=round(time.time() - t0, 2))
        console.print(f"[green]✓ {name}[/green] {counts}")
        outcome[name] = "ran"
    return outcome


def stage_status(run_dir: Path, names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        m = StageStore(run_dir, name).manifest()
        rows.append(
            {
                "stage": name,
                "status": (m or {}).get("status", "not run"),
                "counts": (m or {}).get("counts", {}),
                "wall_s": (m or {}).get("wall_s"),
            }
        )
    return rows
