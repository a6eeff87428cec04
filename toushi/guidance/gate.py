"""Acceptance gate: a new guidance version is kept only if the weak model answering with it beats the
weak model answering with the previous version on a small dev split of prompts.

The dev prompts are drawn across the train pairs' scenes in turn (``draw_dev``), so the gate does not
test one scene only. Each dev prompt is judged in both orders (new as A, then new as B); a prompt whose
two verdicts disagree counts as a tie. The version is accepted only when the lower end of the 95%
bootstrap interval of its win rate (ties count 0.5) is above 0.5 plus the recipe's margin
(``guidance.accept_margin``): one win and seven ties is no evidence. A version with no valid verdict at
all is rejected. The judging itself comes from the eval
engineer's ``toushi.eval.judge`` (fenced, position-swapped, cached); any ``compare(post, a, b)`` callable
can stand in for it.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from toushi.stats import bootstrap_ci

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


def draw_dev(pairs: Sequence[dict], n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(dev, rest): ``n`` pairs taken from each scene in turn (scenes in name order, a seeded shuffle within
    each), so the dev prompts span the scenes; rest keeps the others in their order."""
    by_scene: dict[str, list[dict]] = defaultdict(list)
    for p in pairs:
        by_scene[p.get("scene") or ""].append(p)
    rng = random.Random(seed)
    queues = [rng.sample(by_scene[s], len(by_scene[s])) for s in sorted(by_scene)]
    dev: list[dict] = []
    while len(dev) < n and any(queues):
        for q in queues:
            if q and len(dev) < n:
                dev.append(q.pop(0))
    taken = {id(p) for p in dev}
    return dev, [p for p in pairs if id(p) not in taken]


def decide(outcomes: Sequence[float | None], margin: float = 0.0, n_boot: int = 1000, seed: int = 0) -> dict:
    """Accept when the lower end of the 95% bootstrap interval of the win rate is above 0.5 + ``margin``."""
    valid = [o for o in outcomes if o is not None]
    wins = sum(1 for o in valid if o > 0.5)  # graded outcomes (logprob judge) count by their side
    losses = sum(1 for o in valid if o < 0.5)
    ci = bootstrap_ci(valid, n_boot=n_boot, seed=seed)
    return {
        "accepted": bool(valid) and ci["lo"] > 0.5 + margin,
        "win_rate": ci,
        "margin": margin,
        "wins": wins,
        "losses": losses,
        "ties": len(valid) - wins - losses,
        "invalid": len(outcomes) - len(valid),
        "prompts": len(outcomes),
    }


def judge_outcomes(open_engine, store, judge_model: str, sampling, lang: str, run_dir: Path | None,
                   prompt_ids: Sequence[str], posts: Sequence[str], new: Sequence[str],
                   old: Sequence[str], mode: str = "generate") -> list[float | None]:
    """The same outcomes from the project's pairwise judge (calls cached in ``store``; ``open_engine()`` runs
    only when one is not)."""
    from toushi.eval.judge import PairTask, aggregate, judge_dimensions, run_judge

    dims = judge_dimensions(lang, None)
    tasks = [PairTask(pid, lang, post, "new", a_new, "previous", a_old)
             for pid, post, a_new, a_old in zip(prompt_ids, posts, new, old, strict=True)]
    calls = run_judge(open_engine, tasks, store, dims, sampling, judge_model, mode=mode)
    return [p["outcome"] if p["valid"] else None for p in aggregate(tasks, calls, dims)]
