"""The ladder: the run's systems in the order the pipeline builds them, each rung compared with the one before.

weak -> guided -> sft -> dpo -> distill -> grpo -> selftrain -> strong, keeping the rungs the run has. For each
rung and the previous present rung:

* judge: the pairwise judge (``toushi.eval.judge``, both orders, same machinery as the main comparison) with the
  previous rung as the reference; the win rate's 95% bootstrap interval against 0.5;
* seeker: the paired change in the simulated seeker's feeling (this rung's Δ minus the previous rung's Δ on
  the same post; the shared "before" cancels, so this is the difference in "after"), its interval against 0.

A step "helped" when the interval lies above the no-change value, "hurt" when it lies below, and otherwise
made "no clear change"; with fewer posts than ``eval.strata.min_posts`` (and never under two) it says "too few
posts" instead, whatever the interval: two or three posts cannot tell helped from hurt.
"""

from __future__ import annotations

from collections.abc import Sequence

from toushi.stats import bootstrap_ci

LADDER = ("weak", "guided", "sft", "dpo", "distill", "grpo", "selftrain", "strong")
HELPED, HURT, UNCLEAR, TOO_FEW = "helped", "hurt", "no clear change", "too few posts"


def rungs(systems: Sequence[str]) -> list[str]:
    """The ladder's systems present in ``systems``, in ladder order."""
    return [s for s in LADDER if s in systems]


def steps(systems: Sequence[str]) -> list[tuple[str, str]]:
    """(previous rung, rung) for each rung after the first."""
    r = rungs(systems)
    return list(zip(r, r[1:]))


def verdict(ci: dict | None, null: float, min_posts: int = 2) -> str | None:
    """helped / hurt / no clear change from an interval against the no-change value (None: no data; too few
    posts under ``min_posts``)."""
    if not ci or ci.get("mean") is None:
        return None
    if ci["n"] < max(2, min_posts):
        return TOO_FEW
    if ci["lo"] > null:
        return HELPED
    if ci["hi"] < null:
        return HURT
    return UNCLEAR


def compare(
    systems: Sequence[str],
    judge_pairs: Sequence[dict] | None = None,
    seeker_items: Sequence[dict] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    min_posts: int = 5,
) -> dict:
    """{"rungs": [...], "steps": [{"from", "to", "judge", "seeker"}]}.

    ``judge_pairs`` are aggregated pairs (``toushi.eval.judge.aggregate``) whose ``reference`` is the previous rung;
    ``seeker_items`` are ``toushi.eval.simulate`` items of both rungs. Each side is None when it has no data, else
    {"ci", "verdict", "few"} (+ wins/ties/losses/invalid for the judge, posts for the seeker)."""
    out = []
    for prev, cur in steps(systems):
        judge = None
        ps = [p for p in judge_pairs or [] if p["system"] == cur and p["reference"] == prev]
        if ps:
            outcomes = [p["outcome"] for p in ps if p["valid"]]
            ci = bootstrap_ci(outcomes, n_boot=n_boot, seed=seed)
            judge = {"ci": ci, "verdict": verdict(ci, 0.5, min_posts), "few": len(outcomes) < min_posts,
                     "wins": sum(o > 0.5 for o in outcomes), "ties": sum(o == 0.5 for o in outcomes),
                     "losses": sum(o < 0.5 for o in outcomes), "invalid": len(ps) - len(outcomes)}
        seeker = None
        if seeker_items:
            delta = {(it["system"], it["prompt_id"]): it["delta"] for it in seeker_items if it["valid"]}
            posts = {it["prompt_id"] for it in seeker_items if it["system"] in (prev, cur)}
            diffs = [delta[(cur, p)] - delta[(prev, p)] for p in sorted(posts)
                     if (cur, p) in delta and (prev, p) in delta]
            if posts:
                ci = bootstrap_ci(diffs, n_boot=n_boot, seed=seed)
                seeker = {"ci": ci, "verdict": verdict(ci, 0.0, min_posts), "few": len(diffs) < min_posts, "posts": len(diffs),
                          "unpaired": len(posts) - len(diffs)}
        out.append({"from": prev, "to": cur, "judge": judge, "seeker": seeker})
    return {"rungs": rungs(systems), "steps": out}
