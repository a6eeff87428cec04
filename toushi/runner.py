"""Stage runner: ``toushi run RECIPE`` runs the recipe's stages in order, skipping finished ones.

A stage is skipped when its manifest says complete and its fingerprint is unchanged. The fingerprint
covers the recipe sections the stage reads, the *content* of every input file those sections name
(data files, templates, a hand-edited guidance file, LoRA adapters), and, for each stage it reads from,
that stage's fingerprint and the content of the outputs it reads (``records.jsonl``, ``guidance.json``,
``adapter/``). So an edited input reruns the stage, and the changed fingerprint reruns everything after
it. ``--force STAGE`` reruns STAGE and every stage downstream of it. Stages are resumable on their own
(records are a cache keyed by content), so a rerun after a crash only does what is missing.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from toushi.digests import path_digest
from toushi.engines.pool import EnginePool
from toushi.recipe import Recipe, iter_paths, save_recipe
from toushi.recipe_view import RecipeView
from toushi.runlock import run_lock
from toushi.store import StageStore, stable_id

console = Console(stderr=True)


@dataclass
class StageContext:
    """What a stage function gets: the recipe, its own store, and read access to other stages. The runner
    gives ``recipe`` as a RecipeView of the keys the stage declares; a caller may give the recipe itself."""

    recipe: Recipe | RecipeView
    store: StageStore
    console: Console = field(default_factory=lambda: console)
    quiet: bool = False  # library/engine output goes to the stage's engine.log, not the terminal
    engines: EnginePool | None = None  # shared by the stages of one `toushi run` (engines/pool.py)

    @property
    def run_dir(self) -> Path:
        return self.recipe.run_dir

    def stage(self, name: str) -> StageStore:
        return StageStore(self.run_dir, name)

    def engine(self, spec):
        """An engine for a role: the run's shared one (closing it frees nothing), or, for a stage run on its
        own, a new engine that the caller's ``with`` block closes."""
        if self.engines is not None:
            return self.engines.get(spec)
        from toushi.engines import make_engine

        return make_engine(spec)

    def calls(self, kind: str, spec, sampling, store: StageStore | None = None, **kw):
        """The stage's model calls of one kind by one role (toushi/calls.py): cached in ``store``, by default
        the stage's ``calls/`` store; the engine opens at the first call that is not cached."""
        from toushi.calls import Calls
        from toushi.engines import cache_model

        return Calls(store or StageStore(self.store.dir, "calls"), cache_model(spec), lambda: self.engine(spec),
                     sampling, kind=kind, console=self.console, **kw)

    def free_engines(self) -> None:
        """Free the run's engines (before training in this process or a launched one)."""
        if self.engines is not None:
            self.engines.close()


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageContext], dict]
    sections: tuple[str, ...]  # recipe keys (dotted) whose values change this stage's output
    inputs: tuple[str, ...] = ()  # stages it reads from, when they are part of the run
    outputs: tuple[str, ...] = ("records.jsonl",)  # files/dirs it makes in its stage dir (a dir: an adapter)


def input_files(recipe: Recipe, sections: tuple[str, ...]) -> dict[str, str]:
    """Dotted key -> content digest of every file or directory the given recipe sections name."""
    def covered(key: str) -> bool:
        return any(key == s or key.startswith(s + ".") for s in sections)

    return {key: path_digest(path) for key, path in iter_paths(recipe) if covered(key)}


def output_digest(run_dir: Path, stage: Stage) -> str:
    """Content digest of what a stage hands on (its `outputs`), as they are on disk now."""
    d = StageStore(run_dir, stage.name).dir
    return stable_id({out: path_digest(d / out) for out in stage.outputs})


def fingerprint(recipe: Recipe, stage: Stage, by_name: dict[str, Stage]) -> tuple[str, dict[str, dict]]:
    """(fingerprint, inputs) of a stage under this recipe, as it would run now.

    inputs = {"files": {key: digest}, "<upstream stage>": {"fingerprint": ..., "outputs": digest}}.
    """
    inputs: dict[str, dict] = {"files": input_files(recipe, stage.sections)}
    for name in stage.inputs:
        # an input stage made earlier (or by another recipe on this run dir) counts too, by its content
        if name in recipe.run.stages or StageStore(recipe.run_dir, name).dir.is_dir():
            m = StageStore(recipe.run_dir, name).manifest() or {}
            inputs[name] = {"fingerprint": m.get("fingerprint", "missing"),
                            "outputs": output_digest(recipe.run_dir, by_name[name])}
    own = recipe.section_hash(*stage.sections)
    return stable_id(stage.name, own, inputs), inputs


def downstream(recipe: Recipe, stages: dict[str, Stage], roots: set[str]) -> list[str]:
    """The recipe's stages that read (directly or through others) from any of ``roots``, roots included."""
    hit: list[str] = []
    for name in recipe.run.stages:  # recipe order is pipeline order: inputs come first
        if name in roots or any(i in hit for i in stages[name].inputs):
            hit.append(name)
    return hit


def present_outputs(run_dir: Path, stage: Stage) -> list[str]:
    """The stage's outputs that are there now: a file that exists, a directory output (an adapter) only
    when complete, so a half-written adapter never counts."""
    from toushi.engines.adapters import complete_adapter

    d = StageStore(run_dir, stage.name).dir
    return [out for out in stage.outputs if (complete_adapter(d / out) if (d / out).is_dir() else (d / out).is_file())]


def why_rerun(manifest: dict | None, fp: str, recipe_hash: str, inputs: dict[str, dict], present: list[str]) -> str | None:
    """None when the stage is up to date, else one line on why it runs: the one place that decides.

    Up to date = its last run completed, with this fingerprint, and every output that run left is still
    there (``present``: :func:`present_outputs`); an output it never made (selftrain that trained nothing)
    is not asked for.
    """
    if not manifest:
        return "not run yet"
    if manifest.get("status") != "complete":
        return f"last run {manifest.get('status', 'unfinished')}"
    lost = [out for out in manifest.get("outputs", []) if out not in present]
    if manifest.get("fingerprint") == fp:
        return f"output missing: {', '.join(lost)}" if lost else None
    changed = []
    if manifest.get("recipe_hash") != recipe_hash:
        changed.append("recipe settings")
    old = manifest.get("inputs") or {}
    files = inputs.get("files", {})
    changed += [f"file {k}" for k, v in files.items() if (old.get("files") or {}).get(k) != v]
    changed += [f"{k} output" for k, v in inputs.items() if k != "files" and old.get(k) != v]
    return "changed: " + ", ".join(changed) if changed else "fingerprint changed"


def run_stages(
    recipe: Recipe, stages: list[Stage], force: set[str] | None = None, quiet: bool = False
) -> dict[str, str]:
    """Run the recipe's stages (in the recipe's order). Returns stage -> 'ran' | 'skipped'.

    quiet: each stage's library and engine output (fds 1 and 2, subprocesses included) goes to
    ``runs/<run>/<stage>/engine.log``; the terminal shows toushi's lines, progress bars and errors.
    """
    from toushi.logs import terminal_console

    term = terminal_console() if quiet else console
    force = force or set()
    by_name = {s.name: s for s in stages}
    unknown = [n for n in recipe.run.stages if n not in by_name]
    if unknown:
        raise ValueError(f"run.stages: not available in this version of toushi: {', '.join(unknown)}")
    bad_force = force - set(recipe.run.stages)
    if bad_force:
        raise ValueError(f"--force: not a stage of this recipe: {', '.join(sorted(bad_force))}")
    with run_lock(recipe.run_dir):  # one run per directory, for the whole run
        return _run_all(recipe, by_name, force, quiet, term)


def _run_all(recipe: Recipe, by_name: dict[str, Stage], force: set[str], quiet: bool, term: Console) -> dict[str, str]:
    from toushi.logs import LOG_NAME, output_to

    save_recipe(recipe, recipe.run_dir)
    if force:
        forced = downstream(recipe, by_name, force)
        extra = [n for n in forced if n not in force]
        term.print(f"--force {', '.join(sorted(force))}: rerunning " + ", ".join(forced)
                      + (f" ({', '.join(extra)} read from it)" if extra else ""), highlight=False)
        force = set(forced)
    outcome: dict[str, str] = {}
    engines = EnginePool(console=term)
    try:
        for name in recipe.run.stages:
            outcome[name] = _run_one(recipe, by_name[name], by_name, name in force, quiet, term, engines)
    finally:
        with output_to(recipe.run_dir / LOG_NAME) if quiet else nullcontext():
            engines.close()  # nothing of the run stays loaded, whatever happened
    return outcome


def _run_one(recipe: Recipe, stage: Stage, by_name: dict[str, Stage], forced: bool, quiet: bool, term: Console,
             engines: EnginePool) -> str:
    from toushi.logs import LOG_NAME, output_to, tail

    name = stage.name
    store = StageStore(recipe.run_dir, name)
    fp, upstream = fingerprint(recipe, stage, by_name)
    own = recipe.section_hash(*stage.sections)
    reason = "--force" if forced else why_rerun(store.manifest(), fp, own, upstream,
                                               present_outputs(recipe.run_dir, stage))
    if reason is None:
        term.print(f"[dim]• {name}: up to date, skipped[/dim]")
        return "skipped"
    term.rule(f"[bold]{name}[/bold] [dim]({reason})[/dim]")
    save_recipe(recipe, store.dir)
    store.write_manifest(
        new_run=True,  # nothing of the last run (its error, counts, versions) may describe this one
        status="running",
        fingerprint=fp,
        recipe_hash=own,
        inputs=upstream,
        rerun_reason=reason,
        started_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    t0 = time.time()
    log = store.dir / LOG_NAME
    before = engines.stats()
    engines.dtypes.clear()  # what this stage's local models run in
    # the stage sees only what its entry declares (the keys its fingerprint covers): an undeclared read raises
    view = RecipeView(recipe, stage.sections, name)
    ctx = StageContext(recipe=view, store=store, console=term, quiet=quiet, engines=engines)
    try:
        with output_to(log) if quiet else nullcontext():
            counts = stage.run(ctx) or {}
    except BaseException as e:
        store.write_manifest(
            status="failed",
            error=f"{type(e).__name__}: {e}",
            traceback=traceback.format_exc(limit=8),
            wall_s=round(time.time() - t0, 2),
        )
        if quiet and log.exists():
            term.print(f"[red]✗ {name} failed[/red]; last lines of {log}:", highlight=False)
            term.print(tail(log), markup=False, highlight=False)
        raise
    used = {k: v - before[k] for k, v in engines.stats().items()}
    used["dtypes"] = dict(engines.dtypes)
    store.write_manifest(status="complete", counts=counts, engines=used, wall_s=round(time.time() - t0, 2),
                         outputs=present_outputs(recipe.run_dir, stage))
    term.print(f"[green]✓ {name}[/green] {counts}")
    return "ran"


def plan(recipe: Recipe, stages: list[Stage]) -> list[tuple[str, str | None]]:
    """(stage, why it would rerun | None when up to date) for each of the recipe's stages, as the next
    ``toushi run`` of this recipe would decide, without running anything. A stage downstream of one that
    reruns reruns too (its input changes), which this says without predicting the new fingerprint."""
    by_name = {s.name: s for s in stages}
    out: list[tuple[str, str | None]] = []
    rerun: set[str] = set()
    for name in recipe.run.stages:
        stage = by_name[name]
        store = StageStore(recipe.run_dir, name)
        fp, upstream = fingerprint(recipe, stage, by_name)
        reason = why_rerun(store.manifest(), fp, recipe.section_hash(*stage.sections), upstream,
                           present_outputs(recipe.run_dir, stage))
        if reason is None and (hit := [i for i in stage.inputs if i in rerun]):
            reason = f"reads {', '.join(hit)}, which reruns"
        if reason:
            rerun.add(name)
        out.append((name, reason))
    return out


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
