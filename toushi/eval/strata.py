"""Results by emotion, intent and scene: every metric, judge win rate and seeker change, per label of a post.

A reply is judged against what the person feels and wants, so an overall mean can hide a system that helps
the angry and fails the anxious. Each facet (a post label) splits the held-out posts into cells; within a
cell every number is recomputed with its own 95% bootstrap interval and count. A cell with fewer posts than
``min_posts`` is marked ``few``: its interval is wide or meaningless, and the report says so. Posts without
the label form an ``(unlabelled)`` cell, so the cells of a facet always add up to every post.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from toushi.stats import bootstrap_ci

FACETS = ("emotion", "intent", "scene")
UNLABELLED = "(unlabelled)"


def cell_of(labels: dict, facet: str) -> str:
    value = labels.get(facet)
    return str(value) if value not in (None, "") else UNLABELLED


def stratify(
    answers: Sequence[dict],
    systems: Sequence[str],
    metric_names: Sequence[str],
    *,
    judge_pairs: Sequence[dict] | None = None,
    seeker_items: Sequence[dict] | None = None,
    facets: Sequence[str] = FACETS,
    min_posts: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """{"min_posts", "facets": {facet: [cell, ...]}} where a cell is {"value", "posts", "few", "metrics":
    {system: {metric: ci}}, "judge": {system: ci of the win rate vs the reference}, "seeker": {system: ci of
    the change in feeling}}; cells by size (largest first), then name.

    ``answers`` are eval records (``prompt_id``, ``system``, ``metrics`` and the post's labels); judge pairs
    (``toushi.eval.judge.aggregate``) and seeker items (``toushi.eval.simulate.run_seeker``) are matched by prompt id.
    """
    labels: dict[str, dict] = {}
    for a in answers:
        labels.setdefault(a["prompt_id"], a)
    out: dict[str, list[dict]] = {}
    for facet in facets:
        posts: dict[str, set[str]] = defaultdict(set)
        for pid, rec in labels.items():
            posts[cell_of(rec, facet)].add(pid)
        cells = []
        for value in sorted(posts, key=lambda v: (-len(posts[v]), v == UNLABELLED, v)):
            ids = posts[value]
            cell = {"value": value, "posts": len(ids), "few": len(ids) < min_posts, "metrics": {}, "judge": {},
                    "seeker": {}}
            for s in systems:
                rows = [a["metrics"] for a in answers if a["system"] == s and a["prompt_id"] in ids]
                if rows:
                    cell["metrics"][s] = {m: bootstrap_ci([r.get(m) for r in rows], n_boot=n_boot, seed=seed)
                                          for m in metric_names}
            for p in judge_pairs or []:
                if p["prompt_id"] in ids:
                    cell["judge"].setdefault(p["system"], []).append(p["outcome"] if p["valid"] else None)
            cell["judge"] = {s: bootstrap_ci(v, n_boot=n_boot, seed=seed) for s, v in cell["judge"].items()}
            for it in seeker_items or []:
                if it["prompt_id"] in ids:
                    cell["seeker"].setdefault(it["system"], []).append(it["delta"] if it["valid"] else None)
            cell["seeker"] = {s: bootstrap_ci(v, n_boot=n_boot, seed=seed) for s, v in cell["seeker"].items()}
            cells.append(cell)
        out[facet] = cells
    return {"min_posts": min_posts, "facets": out}


def small_cells(strata: dict) -> list[str]:
    """One line per facet that has cells below ``min_posts`` (for the summary's notes)."""
    lines = []
    for facet, cells in (strata or {}).get("facets", {}).items():
        few = [c for c in cells if c["few"]]
        if few:
            names = ", ".join(f"{c['value']} ({c['posts']})" for c in few[:8]) + (" ..." if len(few) > 8 else "")
            lines.append(f"by {facet}: {len(few)} of {len(cells)} cells have fewer than {strata['min_posts']} "
                         f"posts, too few to read: {names}")
    return lines
