"""Acceptance gate: a new guidance version is kept only if the weak model answering with it beats the
weak model answering with the previous version on a small dev split of prompts.

Each dev prompt is judged in both orders (new as A, then new as B); a prompt whose two verdicts
disagree counts as a tie. The version is accepted when its wins outnumber its losses; a version with
no valid verdict at all is rejected (no evidence it helps). The judging itself comes from the eval
engineer's ``toushi.judge`` (fenced, position-swapped, cached); any ``compare(post, a, b)`` callable
can stand in for it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

Compare = Callable[[str, str, str], str]  # (post, answer_a, answer_b) -> "A" | "B" | "tie"


def _outcome(verdict: str | None, new_is: str) -> float | None:
    if verdict not in ("A", "B", "tie"):
        return None
    if verdict == "tie":
        return 0.5
    return 1.0 if verdict == new_is else 0.0


def both_orders(compare: Compare, posts: Sequence[str], new: Sequence[str], old: Sequence[str]) -> list[float | None]:
    """Outcome of the new answer per prompt (1 win, 0.5 tie, 0 loss, None invalid), judged both ways."""
    out = []
    for post, a_new, a_old in zip(posts, new, old, strict=True):
        first = _outcome(compare(post, a_new, a_old), "A")
        second = _outcome(compare(post, a_old, a_new), "B")
        if first is None or second is None:
            out.append(None)
        else:
            out.append(first if first == second else 0.5)
    return out


def decide(outcomes: Sequence[float | None]) -> dict:
    """Accept when the new version wins more dev prompts than it loses."""
    valid = [o for o in outcomes if o is not None]
    wins = sum(1 for o in valid if o > 0.5)  # graded outcomes (logprob judge) count by their side
    losses = sum(1 for o in valid if o < 0.5)
    return {
        "accepted": bool(valid) and wins > losses,
        "wins": wins,
        "losses": losses,
        "ties": len(valid) - wins - losses,
        "invalid": len(outcomes) - len(valid),
        "prompts": len(outcomes),
    }


def judge_outcomes(engine, store, judge_model: str, sampling, lang: str, run_dir: Path | None,
                   prompt_ids: Sequence[str], posts: Sequence[str], new: Sequence[str],
                   old: Sequence[str], mode: str = "generate") -> list[float | None]:
    """The same outcomes from the project's pairwise judge (calls cached in ``store``)."""
    from toushi.judge import PairTask, aggregate, judge_dimensions, run_judge

    dims = judge_dimensions(lang, None)
    tasks = [PairTask(pid, lang, post, "new", a_new, "previous", a_old)
             for pid, post, a_new, a_old in zip(prompt_ids, posts, new, old, strict=True)]
    calls = run_judge(engine, tasks, store, dims, sampling, judge_model, mode=mode)
    return [p["outcome"] if p["valid"] else None for p in aggregate(tasks, calls, dims)]
