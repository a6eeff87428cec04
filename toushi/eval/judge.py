"""Pairwise LLM judge with the usual biases controlled.

* Position: every pair is judged in both orders (A/B, then B/A); a pair whose two verdicts disagree
  counts as a tie.
* Length: besides the raw win rate we report a length-controlled one (``toushi.stats``).
* Injection: the post and both replies are fenced between per-prompt markers and every quoted line is
  prefixed with "│", so a reply cannot close its fence or start a line the parser would read; the judge
  is told that quoted text is material, not instructions; the parser skips quoted lines and fenced
  blocks in the judge's output, and takes the judge's *last* verdict line.
* Format: the judge answers one JSON object (a verdict per dimension and an overall one), decoded under
  that JSON schema wherever the engine can constrain it; the line format ("verdict: A") is still read
  from judges that cannot be constrained.
* Parse failures: one retry asking for the bare answer, with a fresh seed, then the call is recorded as
  invalid (never silently turned into a tie) and counted. Every call's raw output is cached and its verdict
  is parsed again on every read (``settle``), so a parser fix re-reads earlier calls without asking again.
* Modes: ``generate`` reads the overall verdict from the JSON; ``logprob`` (AlpacaEval 2's weighted
  preference) also asks for the overall verdict as one constrained choice token and reads the graded
  preference P(A) + P(tie)/2 from the probabilities of A, B and tie; the two orders are then averaged.
  A pair that needs only the overall outcome (the ladder's rung-to-rung pairs) gets the choice call alone.

Any engine can judge: it only needs ``generate(conversations, sampling, structured=..., logprobs=...)
-> [[completion with .text and .logprobs]]``.
Calls go through toushi/calls.py (keyed by judge model, sampling, constraint and prompt), so a rerun makes no
call it already made and a crash loses at most one batch.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from toushi.engines import Structured
from toushi.recipe import Sampling
from toushi.store import StageStore, stable_id
from toushi.templates import TEMPLATE_DIR, render

QUOTE = "│ "
Verdict = str  # "A" | "B" | "tie"
CHOICES = ("A", "B", "tie")
MODES = ("generate", "logprob")
TOP_LOGPROBS = 20  # vLLM's default cap on logprobs per position

# ------------------------------------------------------------------------------------ dimensions


def rubric(lang: str) -> list[dict]:
    """The standard emotional-support rubric for a language: [{"name", "definition"}]."""
    path = TEMPLATE_DIR / lang / "judge_rubric.yaml"
    return [{"name": d["name"], "definition": d["definition"]} for d in yaml.safe_load(path.read_text("utf-8"))]


def guidance_dimensions(run_dir: Path) -> list[dict]:
    """The run's guidance dimensions (runs/<run>/guidance/guidance.json), [] when there is none."""
    path = Path(run_dir) / "guidance" / "guidance.json"
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    dims = []
    for i, d in enumerate(data.get("dimensions") or []):
        if not isinstance(d, dict) or not str(d.get("name", "")).strip():
            raise ValueError(f"{path}: dimensions[{i}] has no name")
        rules = [r for r in d.get("rules") or [] if "unstructured" not in (r.get("flags") or [])]
        if "unstructured" in (d.get("flags") or []) or not rules:
            continue  # raw model output kept for review, and dimensions without a rule, are not criteria
        # One line per dimension in the answer format, so names and definitions must be single-line.
        name = " ".join(str(d["name"]).split())
        definition = " ".join(str(d.get("definition") or "").split())
        dims.append({"name": name, "definition": definition})
    return dims


def judge_dimensions(lang: str, run_dir: Path | None = None) -> list[dict]:
    """Rubric dimensions plus the run's guidance dimensions (deduplicated by name)."""
    dims = rubric(lang)
    seen = {d["name"].lower() for d in dims}
    for d in guidance_dimensions(run_dir) if run_dir else []:
        if d["name"].lower() not in seen and d["name"].lower() != "verdict":
            dims.append(d)
            seen.add(d["name"].lower())
    return dims


# ------------------------------------------------------------------------------------ prompt


_MARKER = re.compile(r"\[\[\s*(?:END\s+)?(?:POST|REPLY)\b[^\]]*\]\]", re.I)


def quote(text: str) -> str:
    """Neutralise a post or reply for fencing: defuse anything that looks like one of our markers and
    prefix every line with "│", so the text can neither close its fence nor begin a line the
    parser reads as a verdict."""
    text = _MARKER.sub(lambda m: m.group(0).replace("[[", "[ [").replace("]]", "] ]"), text)
    return "\n".join(QUOTE + line for line in (text.strip() or "(empty reply)").split("\n"))


def build_prompt(lang: str, post: str, response_a: str, response_b: str, dimensions: list[dict],
                 answer: str = "json") -> str:
    """The judge prompt; ``answer`` is "json" (a verdict per dimension and overall) or "choice" (the
    overall verdict alone, one token: the logprob judge's question)."""
    # The fence tag is a hash of the content, so a reply cannot contain its own fence's tag.
    tag = stable_id("fence", post, response_a, response_b)[:8]
    return render(
        "judge_pairwise", lang, tag=tag, post=quote(post), response_a=quote(response_a),
        response_b=quote(response_b), dimensions=dimensions, answer=answer,
    )


def verdict_schema(dimensions: Sequence[dict]) -> dict:
    """JSON schema of the judge's answer: {"<dimension name>": "A"|"B"|"tie", ..., "verdict": ...}."""
    choice = {"type": "string", "enum": list(CHOICES)}
    names = [d["name"] for d in dimensions] + ["verdict"]
    return {"type": "object", "properties": {n: choice for n in names}, "required": names,
            "additionalProperties": False}


def json_budget(dimensions: Sequence[dict]) -> int:
    """Enough new tokens for the longest valid answer (a truncated JSON is invalid): its characters / 2
    (English and Chinese both take more than 2 characters per token on average) plus room for spacing."""
    longest = json.dumps({**{d["name"]: "tie" for d in dimensions}, "verdict": "tie"}, ensure_ascii=False)
    return len(longest) // 2 + 32


def build_retry(lang: str, dimensions: list[dict]) -> str:
    return render("judge_pairwise_retry", lang, dimensions=dimensions)


def choice_probabilities(logprobs: list[dict[str, float]] | None) -> dict[str, float] | None:
    """P(A), P(B), P(tie) (normalised) from the first generated token's top logprobs: the tokens that
    read "A", "B" or begin "tie". None when none of them is there."""
    if not logprobs:
        return None
    mass = dict.fromkeys(CHOICES, 0.0)
    for token, lp in logprobs[0].items():
        t = token.strip()
        if t in ("A", "B"):
            mass[t] += math.exp(lp)
        elif t and "tie".startswith(t.lower()):
            mass["tie"] += math.exp(lp)
    total = sum(mass.values())
    if total <= 0:
        return None
    return {k: round(v / total, 6) for k, v in mass.items()}


# ------------------------------------------------------------------------------------ parsing

# A, B are case-sensitive (so "verdict: a tie" is not A); "tie" and the key names are not.
_CHOICE = r"[\s*_\"'`\[(<]*(?:(?i:response|reply|answer|回复|回答)\s*)?(A|B|(?i:tie|draw)|平局|平手)(?![A-Za-z])"
_LEAD = r"^[ \t]*(?:[-*#>]+\s*|\d+[.)]\s*)?[*_]*"
_VERDICT_LINE = re.compile(_LEAD + r"(?i:verdict|overall verdict|final verdict|裁决|总体裁决|结论)[*_]*\s*[:：]" + _CHOICE,
                           re.M)
# "Verdict: A/B", "A or B", "A 或 B": the judge offers both; such a line is no verdict (not the first letter's).
_BOTH = re.compile(r"[ \t]*(?:/|\||(?i:or|and)\b|或|和|与)[ \t]*[*_\"'`\[(<]*(?:A|B)(?![A-Za-z])")
_FENCED = re.compile(r"\[\[\s*(POST|REPLY\s+[AB])\b[^\]]*\]\].*?\[\[\s*END\s+\1\b[^\]]*\]\]", re.S | re.I)


def _norm(choice: str) -> Verdict:
    return choice if choice in ("A", "B") else "tie"


def _judge_text(output: str) -> str:
    """The judge's own words: fenced blocks it copied and quoted ("│") lines removed."""
    output = _FENCED.sub("", output)
    return "\n".join(line for line in output.split("\n") if not line.lstrip().startswith("│"))


_JSON_OBJECT = re.compile(r"\{[^{}]*\}")


def _from_json(data, dimensions: Sequence[dict]) -> dict | None:
    if not isinstance(data, dict) or data.get("verdict") not in CHOICES:
        return None
    return {"verdict": data["verdict"],
            "dims": {d["name"]: data.get(d["name"]) if data.get(d["name"]) in CHOICES else None for d in dimensions}}


def parse_verdict(output: str, dimensions: Sequence[dict]) -> dict | None:
    """{"verdict": "A"|"B"|"tie", "dims": {name: "A"|"B"|"tie"|None}} or None when there is no verdict.

    A constrained judge's output is one JSON object. Otherwise (a judge that could not be constrained) the
    judge's own words are searched for JSON objects and "verdict: X" lines, and the last one counts;
    dimension lines are optional (a missing one is None).
    """
    try:
        whole = _from_json(json.loads(output), dimensions)
    except ValueError:
        whole = None
    if whole is not None:
        return whole
    text = _judge_text(output)
    last_json, at = None, -1
    for m in _JSON_OBJECT.finditer(text):
        try:
            got = _from_json(json.loads(m.group(0)), dimensions)
        except ValueError:
            continue
        if got is not None:
            last_json, at = got, m.start()
    lines = [m for m in _VERDICT_LINE.finditer(text) if not _BOTH.match(text, m.end())]
    if last_json is not None and (not lines or lines[-1].start() < at):
        return last_json
    found = [m.group(1) for m in lines]
    if not found:
        return None
    dims = {}
    for d in dimensions:
        pat = re.compile(_LEAD + r"(?i:" + re.escape(d["name"]) + r")[*_]*\s*[:：]" + _CHOICE, re.M)
        hits = [m.group(1) for m in pat.finditer(text) if not _BOTH.match(text, m.end())]
        dims[d["name"]] = _norm(hits[-1]) if hits else None
    return {"verdict": _norm(found[-1]), "dims": dims}


# ------------------------------------------------------------------------------------ running


@dataclass(frozen=True)
class PairTask:
    """One comparison: `system`'s answer vs `reference`'s answer to the same post."""

    prompt_id: str
    lang: str
    post: str
    system: str
    text: str
    reference: str
    ref_text: str
    # False: only the overall outcome is wanted (the ladder). In logprob mode such a pair skips the JSON
    # call with its per-dimension verdicts and is judged by the one-token choice call alone.
    need_dims: bool = True

    @property
    def pair_id(self) -> str:
        return stable_id("pair", self.prompt_id, self.system, self.reference, self.text, self.ref_text)


def _calls(task: PairTask, dimensions: list[dict], mode: str) -> list[dict]:
    """The two orders of a pair: "sr" (system is A) and "rs" (reference is A). ``prompt`` is None for a pair
    judged by the choice call alone (logprob mode, no dimensions wanted)."""
    out = []
    for order, (a, b) in (("sr", (task.text, task.ref_text)), ("rs", (task.ref_text, task.text))):
        choice_only = mode == "logprob" and not task.need_dims
        call = {"pair_id": task.pair_id, "order": order, "lang": task.lang,
                "prompt": None if choice_only else build_prompt(task.lang, task.post, a, b, dimensions)}
        if mode == "logprob":
            call["choice_prompt"] = build_prompt(task.lang, task.post, a, b, dimensions, answer="choice")
        out.append(call)
    return out


RETRY_SEED_OFFSET = 7919  # the retry's seed: the call's own plus this (any other number than the call's)


def settle(call: dict, dimensions: Sequence[dict]) -> dict:
    """A call record with its verdict read from its raw outputs: ``raw`` (the JSON answer), else
    ``retry_raw`` (the one retry), and ``probs`` (the choice token's, logprob mode). ``valid``, ``verdict``,
    ``dims`` and ``preference`` are derived on every read, never stored."""
    parsed = None
    for text in (call.get("raw"), call.get("retry_raw")):
        if text is not None and parsed is None:
            parsed = parse_verdict(text, dimensions)
    pr = call.get("probs")
    valid = (parsed is not None or call.get("prompt") is None) and (call.get("mode") != "logprob" or pr is not None)
    verdict = max(CHOICES, key=lambda k: pr[k]) if pr is not None else parsed["verdict"] if parsed else None
    return {**call, "valid": valid, "verdict": verdict if valid else None, "dims": parsed["dims"] if parsed else None,
            "preference": round(pr["A"] + pr["tie"] / 2, 6) if pr and valid else None}


def run_judge(
    open_engine,
    tasks: Sequence[PairTask],
    store: StageStore,
    dimensions: list[dict],
    sampling: Sampling,
    judge_model: str,
    batch_size: int = 32,
    mode: str = "generate",
) -> list[dict]:
    """Judge every task in both orders; returns one call record per (task, order).

    The model calls go through toushi/calls.py, cached in ``store`` (``open_engine()`` runs only when one is
    missing; identical prompts share one call): the JSON answer, the one retry of an unreadable answer (the
    question, the answer and a request for the bare format, with a fresh seed) and, in logprob mode, the
    one-token choice. Each record has the raw outputs and what ``settle`` reads from them: the per-dimension
    verdicts and an overall ``verdict``; in logprob mode also ``probs`` (P(A), P(B), P(tie) of the choice token)
    and ``preference`` (P(A) + P(tie)/2), and the verdict is the most probable choice. A logprob-mode pair that
    needs no dimensions (``need_dims=False``) has only the choice call: ``raw`` and ``dims`` are None."""
    from toushi.calls import Calls, once

    if mode not in MODES:
        raise ValueError(f"judge mode {mode!r}: expected one of {', '.join(MODES)}")
    sampling = sampling.model_copy(update={"n": 1})
    json_sampling = sampling.model_copy(update={"max_tokens": max(sampling.max_tokens, json_budget(dimensions))})
    # an unreadable verdict is asked again once, with a fresh seed (a sampled judge does not repeat itself)
    retry_sampling = json_sampling.model_copy(update={"seed": (sampling.seed or 0) + RETRY_SEED_OFFSET})
    # one token decides; a second lets "tie" finish where it takes two
    choice_sampling = sampling.model_copy(update={"max_tokens": 2})
    opened = once(open_engine)  # one engine for the three kinds of call

    def calls_of(kind: str, s: Sampling, **kw) -> Calls:
        return Calls(store, judge_model, opened, s, kind=kind, batch_size=batch_size, label=kind, **kw)

    schema = Structured(json_schema=verdict_schema(dimensions))
    records = [{**c, "judge_model": judge_model, "mode": mode, "raw": None, "retry_raw": None, "probs": None}
               for t in tasks for c in _calls(t, dimensions, mode)]
    asked = [r for r in records if r["prompt"] is not None]  # choice-only calls have no JSON question
    def who(rs: list[dict]) -> list[dict]:  # which pair and order asked a call first (for people reading the store)
        return [{"pair_id": r["pair_id"], "order": r["order"]} for r in rs]

    for r, text in zip(asked, calls_of("judge", json_sampling).texts(
            [[{"role": "user", "content": r["prompt"]}] for r in asked], structured=schema, meta=who(asked))):
        r["raw"] = text
    again = [r for r in asked if parse_verdict(r["raw"], dimensions) is None]
    retry_convs = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["raw"]},
                    {"role": "user", "content": build_retry(r["lang"], dimensions)}] for r in again]
    for r, text in zip(again, calls_of("judge-retry", retry_sampling).texts(retry_convs, structured=schema,
                                                                             meta=who(again))):
        r["retry_raw"] = text
    if mode == "logprob":
        outs = calls_of("judge-choice", choice_sampling, logprobs=TOP_LOGPROBS).generate(
            [[{"role": "user", "content": r["choice_prompt"]}] for r in records], structured=Structured(choices=CHOICES),
            meta=who(records))
        for r, o in zip(records, outs):
            r["probs"] = choice_probabilities(o[0].logprobs)
    return [settle(r, dimensions) for r in records]


# ------------------------------------------------------------------------------------ aggregation


def _outcome_for_system(order: str, verdict: Verdict | None, preference: float | None = None) -> float | None:
    """1 win, 0.5 tie, 0 loss for the evaluated system, given the order it was shown in; with a graded
    ``preference`` (P(A is better)), the system's share of it."""
    if preference is not None:
        return preference if order == "sr" else 1.0 - preference
    if verdict is None:
        return None
    if verdict == "tie":
        return 0.5
    system_is = "A" if order == "sr" else "B"
    return 1.0 if verdict == system_is else 0.0


def _combine(a: float | None, b: float | None, graded: bool = False) -> float | None:
    """Both orders agree: that outcome. They disagree: a tie. Either missing: None. Graded outcomes
    (logprob mode) are averaged, which cancels a constant position bias."""
    if a is None or b is None:
        return None
    if graded:
        return (a + b) / 2
    return a if a == b else 0.5


def _side(x: float) -> int:
    return (x > 0.5) - (x < 0.5)


def aggregate(tasks: Sequence[PairTask], calls: Sequence[dict], dimensions: Sequence[dict]) -> list[dict]:
    """One outcome per task from its two calls. A pair with an invalid call is marked invalid and gets
    no outcome (it is counted, not scored as a tie)."""
    by_pair: dict[str, dict[str, dict]] = defaultdict(dict)
    for c in calls:
        by_pair[c["pair_id"]][c["order"]] = c
    out = []
    for t in tasks:
        got = by_pair.get(t.pair_id, {})
        sr, rs = got.get("sr"), got.get("rs")
        valid = bool(sr and rs and sr["valid"] and rs["valid"])
        o_sr = _outcome_for_system("sr", sr["verdict"], sr.get("preference")) if sr and sr["valid"] else None
        o_rs = _outcome_for_system("rs", rs["verdict"], rs.get("preference")) if rs and rs["valid"] else None
        graded = valid and sr.get("preference") is not None
        dims = {}
        for d in dimensions:
            name = d["name"]
            a = _outcome_for_system("sr", (sr.get("dims") or {}).get(name)) if valid else None
            b = _outcome_for_system("rs", (rs.get("dims") or {}).get(name)) if valid else None
            dims[name] = _combine(a, b)
        out.append({
            "pair_id": t.pair_id, "prompt_id": t.prompt_id, "system": t.system, "reference": t.reference,
            "valid": valid, "outcome": _combine(o_sr, o_rs, graded),
            "consistent": valid and _side(o_sr) == _side(o_rs),
            "len_system": len(t.text), "len_reference": len(t.ref_text), "dims": dims,
            "invalid_calls": sum(1 for c in (sr, rs) if c is not None and not c["valid"]),
        })
    return out


def win_rates(pairs: Sequence[dict], dimensions: Sequence[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """Per system: raw and length-controlled win rate vs the reference (95% bootstrap CIs), per-dimension
    win rates, position consistency and invalid counts."""
    from toushi.stats import bootstrap_ci, length_controlled_ci

    by_system: dict[str, list[dict]] = defaultdict(list)
    for p in pairs:
        by_system[p["system"]].append(p)
    out = {}
    for system, ps in by_system.items():
        valid = [p for p in ps if p["valid"]]
        outcomes = [p["outcome"] for p in valid]
        out[system] = {
            "reference": ps[0]["reference"],
            "pairs": len(ps),
            "valid": len(valid),
            "invalid": len(ps) - len(valid),
            "invalid_calls": sum(p["invalid_calls"] for p in ps),
            "wins": sum(1 for o in outcomes if o > 0.5),
            "ties": sum(1 for o in outcomes if o == 0.5),
            "losses": sum(1 for o in outcomes if o < 0.5),
            "consistency": (sum(p["consistent"] for p in valid) / len(valid)) if valid else None,
            "win_rate": bootstrap_ci(outcomes, n_boot=n_boot, seed=seed),
            "lc_win_rate": length_controlled_ci(
                outcomes, [p["len_system"] for p in valid], [p["len_reference"] for p in valid],
                n_boot=n_boot, seed=seed,
            ),
            "dims": {
                d["name"]: bootstrap_ci([p["dims"].get(d["name"]) for p in valid], n_boot=n_boot, seed=seed)
                for d in dimensions
            },
        }
    return out
