"""The simulated seeker: a model role-plays a post's writer and says how each system's comment left it feeling.

A single comment judged once says nothing about how the person would feel after reading it, which is what
simulated-user benchmarks measure (SAGE "Sentient Agent as a Judge", ESC-Eval's role cards). Here the seeker
(the strong model by default) gets a card per held-out post: the post, its emotion and its hidden need (the
intent's definition from the label set; both left out when the post has no such label). Then:

1. **before**: having just posted, with no reply yet, it states its feeling (one call per post, shared by every
   system, so the systems are compared against the same starting point);
2. **after**: it reads a system's comment and states its feeling again;
3. with ``turns`` > 1 it writes back to the commenter, the system replies (its own model, adapter and system
   prompt: a ``Responder``), and it states its feeling after each reply, ``turns`` - 1 times.

A feeling is an integer on a fixed 0-100 scale (0 the worst it could feel, 100 completely fine) plus one
sentence of why, decoded under ``FEELING_SCHEMA``. The change Δ = last feeling - before. A call with no score
in 0..100 is invalid: that (system, post) gets no Δ and is counted as invalid, never scored as 0. Calls (and
the systems' replies in later turns) are cached in a StageStore by content, so a rerun makes none it made.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from toushi.calls import Calls, once
from toushi.engines import Structured
from toushi.recipe import Sampling
from toushi.store import StageStore
from toushi.templates import render_any

WHY_CHARS = 160  # the one sentence of why; the schema ends the string here, so the JSON always closes
FEELING_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["feeling", "why"],
    "properties": {"feeling": {"type": "integer", "minimum": 0, "maximum": 100},
                   "why": {"type": "string", "minLength": 1, "maxLength": WHY_CHARS}},
}
# the score comes first in the constrained answer: it survives a "why" cut off at max_tokens
_SCORE = re.compile(r'"feeling"\s*:\s*"?(\d{1,3})(?![\d.])')
Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class Card:
    """What the seeker knows about itself: its post, its emotion and its hidden need (None: not given)."""

    prompt_id: str
    lang: str
    post: str
    prompt: str  # the task prompt the systems answered (their conversation starts with it)
    emotion: str | None = None
    need: str | None = None


def make_card(rec: dict, lang: str, labels: dict[str, list[dict]] | None) -> Card:
    """A card from an eval prompt record (pairs shape): label names and need definitions in the card's
    language when the label is in the set, the raw label otherwise."""
    lang = rec.get("lang") or lang
    names = {x["label"]: x for x in (labels or {}).get("emotion", [])}
    needs = {x["label"]: x for x in (labels or {}).get("intent", [])}
    emotion, intent = rec.get("emotion"), rec.get("intent")
    return Card(prompt_id=rec["id"], lang=lang, post=rec["post"], prompt=rec["prompt"],
                emotion=names[emotion]["name"] if emotion in names else emotion,
                need=(needs[intent]["definition"] or needs[intent]["name"]) if intent in needs else intent)


def feeling_prompt(card: Card, transcript: Sequence[dict], template: str | Path | None = None) -> str:
    return render_any("seeker_feeling", card.lang, template, post=card.post, emotion=card.emotion, need=card.need,
                      transcript=list(transcript))


def reply_prompt(card: Card, transcript: Sequence[dict], template: str | Path | None = None) -> str:
    return render_any("seeker_reply", card.lang, template, post=card.post, emotion=card.emotion, need=card.need,
                      transcript=list(transcript))


def parse_feeling(output: str) -> dict | None:
    """{"feeling": 0..100, "why": str | None, "complete": bool} or None when there is no score in range.

    A constrained answer is the JSON object; "complete" is False when it was cut off after the score (the
    score stands, the why is lost). An unconstrained answer is searched for a "feeling": N pair."""
    try:
        data = json.loads(output)
    except ValueError:
        data = None
    if isinstance(data, dict):
        value = data.get("feeling")
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 100:
            why = " ".join(str(data.get("why") or "").split()) or None
            return {"feeling": value, "why": why, "complete": True}
        return None
    m = _SCORE.search(output)
    if m and 0 <= int(m.group(1)) <= 100:
        return {"feeling": int(m.group(1)), "why": None, "complete": False}
    return None


@dataclass
class Responder:
    """How a system answers the seeker in later turns. ``conversation(prompt_id, turns)`` is the whole
    conversation the system sees (its own system prompt, the task prompt, its comment, the seeker's message,
    ...); ``calls`` are its model calls (toushi/calls.py: keyed by its model, adapter content and sampling, so
    cached replies are never another system's); ``lora`` its adapter, if any."""

    calls: Calls
    conversation: Callable[[str, Conversation], Conversation]
    lora: str | None = None


@dataclass
class _Dialogue:
    system: str
    card: int  # index into cards
    transcript: list[dict] = field(default_factory=list)  # [{who: commenter | you, text}]
    chat: Conversation = field(default_factory=list)  # the same turns as the system's chat (user/assistant)
    feelings: list[dict | None] = field(default_factory=list)


def run_seeker(
    get_engine: Callable[[], object],
    cards: Sequence[Card],
    answers: dict[str, Sequence[str | None]],
    store: StageStore,
    *,
    model: str,
    sampling: Sampling,
    turns: int = 1,
    reply_sampling: Sampling | None = None,
    responders: dict[str, Responder] | None = None,
    feeling_template: str | Path | None = None,
    reply_template: str | Path | None = None,
    batch_size: int = 32,
) -> dict:
    """Simulate every (system, card) whose answer exists. ``answers[system][i]`` is the system's comment on
    ``cards[i]``. Returns {"before": [feeling per card], "items": [per (system, post)], "calls",
    "invalid_calls", "generated"}; an item is {"system", "prompt_id", "before", "feelings", "whys", "after",
    "delta", "valid", "transcript"}. ``get_engine()`` is called only when some call is not cached."""
    if turns > 1 and not responders:
        raise ValueError("simulate: turns > 1 needs a responder per system (how it answers the seeker)")
    engine = once(get_engine)  # one engine for the seeker's feeling and reply calls

    feeling_calls = Calls(store, model, engine, sampling.model_copy(update={"n": 1}), kind="seeker-feeling",
                          batch_size=batch_size, label="seeker")
    reply_calls = Calls(store, model, engine, (reply_sampling or sampling).model_copy(update={"n": 1}),
                        kind="seeker-reply", batch_size=batch_size, label="seeker replies")
    stats = {"calls": 0, "invalid_calls": 0}
    schema = Structured(json_schema=FEELING_SCHEMA)

    def user(prompts: list[str]) -> list[list[dict]]:
        return [[{"role": "user", "content": p}] for p in prompts]

    def feelings(prompts: list[str]) -> list[dict | None]:
        texts = feeling_calls.texts(user(prompts), structured=schema, valid=lambda c: parse_feeling(c.text) is not None)
        parsed = [parse_feeling(t) for t in texts]
        stats["calls"] += len(prompts)
        stats["invalid_calls"] += sum(p is None for p in parsed)
        return parsed

    before = feelings([feeling_prompt(c, [], feeling_template) for c in cards])
    dialogues = [
        _Dialogue(system=s, card=i, transcript=[{"who": "commenter", "text": text}],
                  chat=[{"role": "user", "content": cards[i].prompt}, {"role": "assistant", "content": text}])
        for s, texts in answers.items() for i, text in enumerate(texts) if text is not None
    ]
    for turn in range(turns):
        if turn > 0:
            said = reply_calls.texts(user([reply_prompt(cards[d.card], d.transcript, reply_template)
                                          for d in dialogues]))
            for d, text in zip(dialogues, said):
                text = text.strip()
                d.transcript.append({"who": "you", "text": text})
                d.chat.append({"role": "user", "content": text})
            by_system: dict[str, list[_Dialogue]] = defaultdict(list)
            for d in dialogues:
                by_system[d.system].append(d)
            for system, group in by_system.items():
                responder = responders[system]
                convs = [responder.conversation(cards[d.card].prompt_id, d.chat) for d in group]
                outs = responder.calls.texts(convs, lora=responder.lora)
                for d, text in zip(group, outs):
                    d.transcript.append({"who": "commenter", "text": text})
                    d.chat.append({"role": "assistant", "content": text})
        for d, f in zip(dialogues, feelings([feeling_prompt(cards[d.card], d.transcript, feeling_template)
                                               for d in dialogues])):
            d.feelings.append(f)

    items = []
    for d in dialogues:
        b, last = before[d.card], d.feelings[-1]
        valid = b is not None and last is not None
        items.append({
            "system": d.system, "prompt_id": cards[d.card].prompt_id,
            "before": b["feeling"] if b else None,
            "feelings": [f["feeling"] if f else None for f in d.feelings],
            "whys": [f["why"] if f else None for f in d.feelings],
            "after": last["feeling"] if last else None,
            "delta": last["feeling"] - b["feeling"] if valid else None,
            "valid": valid,
            "transcript": d.transcript if turns > 1 else None,
        })
    generated = feeling_calls.stats.new + reply_calls.stats.new + sum(r.calls.stats.new
                                                                      for r in (responders or {}).values())
    return {"before": [b["feeling"] if b else None for b in before], "items": items, **stats, "generated": generated}


def seeker_summary(items: Sequence[dict], n_boot: int = 1000, seed: int = 0) -> dict:
    """Per system: mean feeling before and after and the mean change, each with a 95% bootstrap interval,
    and how many (system, post) simulations were valid / invalid."""
    from toushi.stats import bootstrap_ci

    by_system: dict[str, list[dict]] = defaultdict(list)
    for it in items:
        by_system[it["system"]].append(it)
    out = {}
    for system, its in by_system.items():
        valid = [it for it in its if it["valid"]]
        out[system] = {
            "posts": len(its), "valid": len(valid), "invalid": len(its) - len(valid),
            "before": bootstrap_ci([it["before"] for it in valid], n_boot=n_boot, seed=seed),
            "after": bootstrap_ci([it["after"] for it in valid], n_boot=n_boot, seed=seed),
            "delta": bootstrap_ci([it["delta"] for it in valid], n_boot=n_boot, seed=seed),
        }
    return out
