"""Training sets from a run's records: SFT ``messages`` and DPO ``prompt/chosen/rejected``.

Both are TRL's conversational formats, so the student's own chat template renders them at training
time. Held-out prompts never reach a training set (eval answers them). A target answer that is empty,
truncated (stopped at max_tokens, or reasoning that never closed: ``engines.is_truncated``) or markdown
(when the recipe forbids it) is dropped and counted, so the manifest says why a set is smaller than the
number of prompts. A truncated answer may still be a DPO rejected answer.

Context distillation: guided answers were written with the guidance as system prompt; the SFT example
keeps the answer but drops the guidance, so the student learns to answer that way without being told.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from toushi.engines import is_truncated
from toushi.errors import ToushiError
from toushi.store import StageStore, stable_id

THINK_RE = re.compile(r"<think>.*?</think>\s*", re.DOTALL)


class DatasetError(ToushiError, ValueError):
    """A training set that cannot be built (e.g. empty after filtering); the message has the counts."""


def _flag_reason(completion: dict, drop_markdown: bool) -> str | None:
    """Why a completion cannot be a target (None: usable)."""
    flags = set(completion.get("flags") or [])
    text = (completion.get("text") or "").strip()
    if "empty" in flags or not text:
        return "empty"
    if is_truncated(completion):
        return "truncated"
    if drop_markdown and "markdown" in flags:
        return "markdown"
    return None


def target_text(completion: dict, keep_think: bool = False) -> str:
    """The answer as a training target: reasoning only when asked for, never a stray <think> block."""
    text = THINK_RE.sub("", completion.get("text") or "").strip()
    if keep_think and completion.get("reasoning"):
        return f"<think>\n{completion['reasoning'].strip()}\n</think>\n\n{text}"
    return text


def pairs_reasoning(rec: dict) -> str | None:
    """The strong model's own reasoning for a pairs record, as distillation's strong teacher reads it before
    the answer (``distill.strong_reasoning: pairs``); None (an empty think block) when that answer was
    truncated: a thought cut off mid-way is no prompt to score an answer after."""
    first = (rec.get("strong") or [{}])[0]
    return None if is_truncated(first) else first.get("reasoning")


def _usable(completions: list[dict], drop_markdown: bool, dropped: Counter, role: str) -> list[dict]:
    keep = []
    for c in completions or []:
        reason = _flag_reason(c, drop_markdown)
        if reason:
            dropped[f"{role}_{reason}"] += 1
        else:
            keep.append(c)
    return keep


def build_sft(
    pairs: list[dict],
    guided: list[dict],
    *,
    target: str = "strong",
    context_distillation: bool = True,
    keep_think: bool = False,
    drop_markdown: bool = True,
) -> tuple[list[dict], dict]:
    """SFT examples ``{"id", "prompt_id", "source", "messages"}`` and counts (prompts, heldout_excluded, dropped)."""
    if target not in ("strong", "guided", "both"):
        raise DatasetError(f"sft.target: expected strong, guided or both, got {target!r}")
    dropped: Counter = Counter()
    examples: list[dict] = []
    heldout = 0
    if target in ("strong", "both"):
        for rec in pairs:
            if rec.get("split") != "train":
                heldout += 1
                continue
            for i, c in enumerate(_usable(rec.get("strong"), drop_markdown, dropped, "strong")):
                messages = [
                    {"role": "user", "content": rec["prompt"]},
                    {"role": "assistant", "content": target_text(c, keep_think)},
                ]
                examples.append({"id": stable_id(rec["id"], "strong", i), "prompt_id": rec["id"], "source": "strong",
                                 "messages": messages})
    if target in ("guided", "both"):
        for rec in guided:
            if rec.get("split") != "train":
                heldout += 1
                continue
            system = [] if context_distillation or not rec.get("system") else [
                {"role": "system", "content": rec["system"]}
            ]
            for i, c in enumerate(_usable(rec.get("guided"), drop_markdown, dropped, "guided")):
                messages = system + [
                    {"role": "user", "content": rec["prompt"]},
                    {"role": "assistant", "content": target_text(c, keep_think=False)},
                ]
                examples.append({"id": stable_id(rec["id"], "guided", i), "prompt_id": rec["id"], "source": "guided",
                                 "messages": messages})
    counts = {
        "prompts": len(pairs) if target != "guided" else len(guided),
        "heldout_excluded": heldout,
        "examples": len(examples),
        "dropped": dict(dropped),
    }
    return examples, counts


def _pair(rec_id: str, kind: str, i: int, prompt: str, chosen: str, rejected: str) -> dict:
    return {
        "id": stable_id(rec_id, kind, i),
        "prompt_id": rec_id,
        "kind": kind,
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def _pair_rung(rec_id, kind, prompt, better, worse, drop_markdown, dropped, better_role, worse_role):
    """Zip the i-th usable better answer with the i-th worse one (n answers per role give n pairs)."""
    good = _usable(better, drop_markdown, dropped, f"{kind}_chosen_{better_role}")
    # A rejected answer may be as bad as it likes, except empty: an empty rejected teaches only "say something".
    bad = [c for c in worse or [] if (c.get("text") or "").strip()]
    dropped[f"{kind}_rejected_empty"] += len(worse or []) - len(bad)
    out = []
    for i, (g, b) in enumerate(zip(good, bad)):
        chosen, rejected = target_text(g), target_text(b)
        if chosen == rejected:
            dropped[f"{kind}_identical"] += 1
            continue
        out.append(_pair(rec_id, kind, i, prompt, chosen, rejected))
    return out


def build_dpo(
    pairs: list[dict], guided: list[dict], *, guided_pairs: bool = False, drop_markdown: bool = True
) -> tuple[list[dict], dict]:
    """DPO pairs: strong > weak; with ``guided_pairs`` also strong > guided and guided > weak (same prompts)."""
    dropped: Counter = Counter()
    examples: list[dict] = []
    heldout = 0
    guided_by_id = {g["id"]: g for g in guided}
    for rec in pairs:
        if rec.get("split") != "train":
            heldout += 1
            continue
        args = (drop_markdown, dropped)
        examples += _pair_rung(rec["id"], "strong>weak", rec["prompt"], rec.get("strong"), rec.get("weak"), *args,
                               "strong", "weak")
        g = guided_by_id.get(rec["id"])
        if guided_pairs and g:
            examples += _pair_rung(rec["id"], "strong>guided", rec["prompt"], rec.get("strong"), g.get("guided"),
                                   *args, "strong", "guided")
            examples += _pair_rung(rec["id"], "guided>weak", rec["prompt"], g.get("guided"), rec.get("weak"),
                                   *args, "guided", "weak")
    counts = {
        "prompts": len(pairs),
        "heldout_excluded": heldout,
        "examples": len(examples),
        "by_kind": dict(Counter(e["kind"] for e in examples)),
        "dropped": {k: v for k, v in dropped.items() if v},
    }
    return examples, counts


def _read_stage(run_dir: Path, name: str) -> list[dict]:
    return StageStore(run_dir, name).records()


def _require(examples: list[dict], counts: dict, what: str, run_dir: Path) -> None:
    if not examples:
        raise DatasetError(
            f"{what} set for run {run_dir} is empty after filtering: {counts['prompts']} prompts, "
            f"{counts['heldout_excluded']} held out, dropped {counts['dropped'] or 'none'}"
        )


def load_sft(
    run_dir: Path,
    *,
    target: str = "strong",
    context_distillation: bool = True,
    keep_think: bool = False,
    drop_markdown: bool = True,
) -> tuple[list[dict], dict]:
    """Read pairs (+ guided) from the run and build the SFT set; raises DatasetError when empty."""
    run_dir = Path(run_dir)
    pairs = _read_stage(run_dir, "pairs") if target in ("strong", "both") else []
    guided = _read_stage(run_dir, "guided") if target in ("guided", "both") else []
    if target in ("guided", "both") and not guided:
        raise DatasetError(f"sft.target={target} needs the guided stage's records in {run_dir / 'guided'}: none")
    examples, counts = build_sft(
        pairs, guided, target=target, context_distillation=context_distillation, keep_think=keep_think,
        drop_markdown=drop_markdown,
    )
    _require(examples, counts, "SFT", run_dir)
    return examples, counts


def load_dpo(run_dir: Path, *, guided_pairs: bool = False, drop_markdown: bool = True) -> tuple[list[dict], dict]:
    """Read pairs (+ guided for the guided pairs) from the run and build the DPO set; raises DatasetError when
    empty."""
    run_dir = Path(run_dir)
    pairs = _read_stage(run_dir, "pairs")
    guided = _read_stage(run_dir, "guided") if guided_pairs else []
    examples, counts = build_dpo(pairs, guided, guided_pairs=guided_pairs, drop_markdown=drop_markdown)
    _require(examples, counts, "DPO", run_dir)
    return examples, counts


def load_grpo(run_dir: Path, *, template: Path | None = None, constraints: bool = True) -> tuple[list[dict], dict]:
    """GRPO prompts: the corpus's training split, asked exactly as the pairs stage asks (same template).

    Each example carries ``prompt`` (a conversation) and the raw ``post`` the rewards measure against.
    """
    from toushi.pairs import task_prompt

    run_dir = Path(run_dir)
    corpus = _read_stage(run_dir, "corpus")
    train = [r for r in corpus if r.get("split") != "heldout"]
    counts = {"prompts": len(corpus), "heldout_excluded": len(corpus) - len(train), "dropped": {}}
    examples = [
        {
            "id": r["id"],
            "prompt": [{"role": "user", "content": task_prompt(r["text"], r["lang"], template, constraints)}],
            "post": r["text"],
        }
        for r in train
    ]
    _require(examples, counts, "GRPO", run_dir)
    return examples, counts
