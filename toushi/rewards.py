"""Rule rewards for GRPO: cheap, deterministic, hard to game. Each is a plain function of an answer and
its post, usable alone; ``trl_reward`` adapts one to TRL's reward-function signature.

After the bilateral-reward idea of Psy-Interpreter ("From Stimuli to Minds"): format and repetition
guard the surface, and the length reward is two-sided, punishing both the curt reply to a long, tangled
post and the essay under a one-line post.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from toushi.calls import Calls
from toushi.engines import Structured, cache_model
from toushi.metrics import apology_open, detect_lang, markdown_count, repetition_ratio, sentences, tokens
from toushi.recipe import Sampling
from toushi.store import StageStore
from toushi.templates import render

THINK_MARKERS = ("<think>", "</think>")


def format_reward(answer: str, post: str) -> float:
    """1.0 for a clean plain-text reply in the post's language; each fault subtracts:
    Markdown/HTML 0.5, wrong language 0.5, leaked ``<think>`` text 1.0; empty answer -1. Range [-1, 1]."""
    if not answer.strip():
        return -1.0
    score = 1.0
    if markdown_count(answer):
        score -= 0.5
    post_lang, answer_lang = detect_lang(post), detect_lang(answer)
    if post_lang and answer_lang != post_lang:
        score -= 0.5
    if any(m in answer for m in THINK_MARKERS):
        score -= 1.0
    return max(-1.0, score)


def repetition_reward(answer: str, n: int = 4) -> float:
    """1 - 4 x (share of n-grams repeating an earlier one), floored at -1: fresh text scores 1, a quarter
    repeated 0, half or more (a loop) -1."""
    return max(-1.0, 1.0 - 4.0 * repetition_ratio(answer, n))


def post_complexity(post: str) -> float:
    """How much a post asks of a reply, in [0, 1].

    Two observable signals, averaged: its length (tokens: zh characters or en words, saturating at 300 zh
    characters / 150 en words) and how many separate things it says (sentences, saturating at 8). A
    one-line "I failed my exam" scores near 0; a long post about a lost job, debt and a breakup near 1.
    """
    toks = tokens(post)
    cap = 300 if detect_lang(post) == "zh" else 150
    length = min(1.0, len(toks) / cap)
    parts = min(1.0, len(sentences(post)) / 8)
    return round((length + parts) / 2, 4)


def target_length(post: str) -> tuple[int, int]:
    """Comfortable reply length (tokens, as ``metrics.tokens`` counts them) for a post: grows with its
    complexity from 30-70 en words (60-140 zh characters) to 90-180 words (180-360 characters)."""
    c = post_complexity(post)
    if detect_lang(post) == "zh":
        return int(60 + 120 * c), int(140 + 220 * c)
    return int(30 + 60 * c), int(70 + 110 * c)


def length_reward(answer: str, post: str) -> float:
    """Two-sided: 1 inside the target band, falling linearly to 0 at half the lower bound and at twice
    the upper bound, and to -1 beyond (empty answers and rambles both lose)."""
    n = len(tokens(answer))
    lo, hi = target_length(post)
    if lo <= n <= hi:
        return 1.0
    if n < lo:
        return max(-1.0, (n - lo / 2) / (lo / 2))
    return max(-1.0, 1.0 - (n - hi) / hi)


def opening_reward(answer: str) -> float:
    """1 when the first sentence does not apologise (``metrics.apology_open``), -1 when it does, 0 for an empty
    answer (format_reward punishes that). The planted trait of the effect benchmark as a rule reward."""
    if not answer.strip():
        return 0.0
    return -1.0 if apology_open(answer) else 1.0


def completion_text(completion) -> str:
    """TRL passes conversational completions as message lists and standard ones as strings."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if m.get("role", "assistant") == "assistant")
    return completion


def trl_reward(fn: Callable[..., float], name: str, uses_post: bool = True) -> Callable[..., list[float]]:
    """Adapt ``fn(answer, post)`` (or ``fn(answer)``) to TRL: ``f(prompts, completions, post=[...], **kw)``.
    The dataset must carry the raw post in a ``post`` column."""

    def reward(prompts, completions, post=None, **kwargs) -> list[float]:
        answers = [completion_text(c) for c in completions]
        if uses_post:
            if post is None:
                raise ValueError(f"reward {name!r} needs a 'post' column in the GRPO dataset")
            return [fn(a, p) for a, p in zip(answers, post)]
        return [fn(a) for a in answers]

    reward.__name__ = name  # TRL logs rewards under the function's name
    return reward


RULE_REWARDS: dict[str, Callable[..., list[float]]] = {
    "format": trl_reward(format_reward, "format"),
    "repetition": trl_reward(repetition_reward, "repetition", uses_post=False),
    "length": trl_reward(length_reward, "length"),
    "opening": trl_reward(opening_reward, "opening", uses_post=False),
}


def calls_judge(weights: dict[str, float]) -> bool:
    """Whether these GRPO reward weights turn on a reward that asks the judge (every one but the rule rewards): the
    trainer then opens models.judge in its own process."""
    return any(weight and name not in RULE_REWARDS for name, weight in weights.items())


_SCORE = re.compile(r"score\s*[:：]\s*(10|[1-9])(?!\d)", re.IGNORECASE)
# The verdict line the judge_score template asks for, enforced while decoding where the engine can.
SCORE_FORMAT = Structured(regex=r"Score: (10|[1-9])")


def parse_score(output: str) -> int | None:
    """The judge's ``Score: N`` (the last one, so an echoed example line does not win), or None."""
    found = _SCORE.findall(output)
    return int(found[-1]) if found else None


def unit_score(score: int) -> float:
    """A 1-10 judge score on [-1, 1] (5.5, the scale's middle, maps to 0)."""
    return (score - 5.5) / 4.5


class JudgeScorer:
    """Rubric score (1-10, mapped to [-1, 1]) of an answer by a judge engine, its calls cached on disk.

    With ``guidance`` it becomes the adherence reward: the judge also checks the run's guidance. The calls go
    through :class:`toushi.calls.Calls` (keyed by the prompt, which holds post, answer and guidance, the judge
    model and its sampling), so repeated completions cost nothing and a resumed run reuses every earlier
    verdict; the raw verdict is stored and parsed on read. The verdict is decoded under ``SCORE_FORMAT``; one
    that cannot be read is asked once more, and if it still cannot it is counted (``invalid``) and has no score
    (None), never a made-up 0.
    """

    def __init__(self, engine, sampling, cache: StageStore, model_name: str, guidance: str | None = None):
        self.guidance = guidance
        self.calls = Calls(cache, model_name, lambda: engine, sampling.model_copy(update={"n": 1}),
                           kind="judge-score", label="judge scores")
        self.invalid = 0

    def scores(self, posts: list[str], answers: list[str]) -> list[float | None]:
        """Scores in [-1, 1]; None for an unparseable verdict (TRL then leaves this reward out of that
        completion's total instead of counting it as 0)."""
        return [None if s is None else unit_score(s) for s in self.raw_scores(posts, answers)]

    def raw_scores(self, posts: list[str], answers: list[str]) -> list[int | None]:
        """The judge's 1-10 score of each answer, None where its verdict could not be parsed."""
        convs = [[{"role": "user", "content": render("judge_score", detect_lang(p) or "en", post=p, answer=a,
                                                     guidance=self.guidance)}] for p, a in zip(posts, answers)]
        verdicts = self.calls.texts(convs, structured=SCORE_FORMAT, valid=lambda c: parse_score(c.text) is not None)
        scores = [parse_score(v) for v in verdicts]
        self.invalid += sum(s is None for s in scores)  # unreadable after the retry: scores this scorer gave as None
        return scores

    def as_reward(self, name: str) -> Callable[..., list[float | None]]:
        def reward(prompts, completions, post=None, **kwargs) -> list[float | None]:
            if post is None:
                raise ValueError(f"reward {name!r} needs a 'post' column in the GRPO dataset")
            return self.scores(list(post), [completion_text(c) for c in completions])

        reward.__name__ = name
        return reward


# The judge reward's decoding: greedy, and room for "Score: 10" plus a stray token. Part of every verdict's cache
# key, so changing it asks the judge anew.
JUDGE_SAMPLING = Sampling(temperature=0.0, max_tokens=16)


def build_rewards(weights: dict[str, float], judge=None, run_dir: Path | None = None,
                  cache_dir: Path | None = None) -> tuple[list[Callable], list[float]]:
    """Reward functions and their weights for TRL, from the recipe's ``grpo.reward_weights``.

    ``judge`` (a ModelSpec) is needed only for the judge and adherence rewards; adherence reads the run's
    guidance (``runs/<run>/guidance``).
    """
    funcs, ws = [], []
    engine = None
    for name, weight in weights.items():
        if weight == 0:
            continue
        if name in RULE_REWARDS:
            funcs.append(RULE_REWARDS[name])
        else:
            if judge is None:
                raise ValueError(f"grpo.reward_weights.{name}: needs models.judge in the recipe")
            if engine is None:
                from toushi.engines import make_engine

                engine = make_engine(judge)
            guidance = None
            if name == "adherence":
                from toushi.guidance import load_guidance

                guidance = load_guidance(run_dir)
            cache = StageStore(cache_dir, f"{name}_cache")
            scorer = JudgeScorer(engine, JUDGE_SAMPLING, cache, cache_model(judge), guidance)
            funcs.append(scorer.as_reward(name))
        ws.append(weight)
    if not funcs:
        raise ValueError("grpo.reward_weights: every weight is 0; GRPO needs at least one reward")
    return funcs, ws
