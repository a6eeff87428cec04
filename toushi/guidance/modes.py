"""The four extraction modes. Each takes a Session (cached calls, packing, versions) and the analysis
pairs, proposes one or more guidance versions, and returns nothing: the session holds the versions
and picks the one to keep (gate-accepted, least drifted).

* map-reduce: batch -> partial analysis (operations on an empty memory); partials merged and
  consolidated (hierarchically when they do not fit one prompt); then a worked example per dimension.
* refine: the memory is passed from group to group, each group's operations make a new round; the
  drift guard scores every round and later rounds build on the best one.
* broad-to-deep: one broad pass over a diverse sample, then each group adds only what is missing.
* per-example: each pair analysed alone, then all analyses synthesised (hierarchically if needed).
"""

from __future__ import annotations

from toushi.engines import Structured
from toushi.guidance.memory import Memory
from toushi.guidance.render import EXCLUDED_FROM_PROMPT
from toushi.guidance.session import Session, Step
from toushi.guidance.structured import EXAMPLE_SCHEMA, example_text


def _ids(batch: list[dict]) -> list[str]:
    return [p["id"] for p in batch]


def _empty(s: Session) -> Memory:
    return Memory(cap=s.cap, max_dimensions=s.max_dimensions)


def consolidate(s: Session, partials: list[Memory], template: str, prefix: str) -> Memory:
    """Merge partial memories and let the model consolidate them (operations on the merged memory).
    Groups of partials that fit one prompt are consolidated separately, then their results again, level by
    level; when no two partials fit together any more, the rest is merged without a model call."""
    level = 0
    while True:
        groups: list[Memory] = []
        sizes: list[int] = []
        for part in partials:
            if groups:
                trial = groups[-1].copy()
                trial.merge(part)
                if s.fits(template, memory=s.memory_view(trial)):
                    groups[-1] = trial
                    sizes[-1] += 1
                    continue
            g = _empty(s)
            g.merge(part)
            groups.append(g)
            sizes.append(1)
        if len(groups) > 1 and max(sizes) == 1:  # nothing combines within the budget any more
            merged = _empty(s)
            for g in groups:
                merged.merge(g)
            merged.prune()
            return merged
        steps = [Step(f"{prefix}-L{level}-{i:03d}", template, {"memory": s.memory_view(g)}, g, sorted(g.pair_ids()))
                 for i, g in enumerate(groups)
                 if s.fits(template, memory=s.memory_view(g))]
        # a group too long even alone is passed on as is (pruned to the cap) instead of overflowing the context
        results = iter(s.ops_calls(steps))
        fitted = {st.name for st in steps}
        partials = []
        for i, g in enumerate(groups):
            if f"{prefix}-L{level}-{i:03d}" in fitted:
                partials.append(next(results).memory)
            else:
                g.prune()
                partials.append(g)
        if len(partials) == 1:
            return partials[0]
        level += 1


def add_examples(s: Session, memory: Memory, pairs: list[dict]) -> Memory:
    """One worked example per dimension, on a pair that supports one of its rules (else the first pair)."""
    by_id = {p["id"]: p for p in pairs}
    memory = memory.copy()
    dims = [d for d in memory.dimensions if EXCLUDED_FROM_PROMPT not in d.flags and d.rules]
    if not dims or not pairs:
        return memory
    names, prompts, chosen = [], [], []
    for i, d in enumerate(dims):
        pid = next((x for r in d.rules for x in r.pair_ids if x in by_id), pairs[i % len(pairs)]["id"])
        p = by_id[pid]
        names.append(f"examples-{i:03d}")
        chosen.append(p)
        prompts.append(s.render("guidance_examples", name=d.name, definition=d.definition,
                                rules=[r.text for r in d.rules],
                                pair={"label": p["label"], "post": p["post"], "reply": p["strong"]}))
    outs = s.text_calls(names, prompts, [Structured(json_schema=EXAMPLE_SCHEMA)] * len(prompts))
    for d, p, out in zip(dims, chosen, outs):
        text = example_text(out)
        if text:
            d.examples.append({"kind": "worked", "text": text, "pair_ids": [p["id"]]})
        else:
            d.flags.append("empty_example")
            s.flag_counts["empty_example"] = s.flag_counts.get("empty_example", 0) + 1
    return memory


def map_reduce(s: Session, pairs: list[dict]) -> None:
    batches = s.batches(pairs, "guidance_map")
    s.console.print(f"  map: {len(pairs)} pairs in {len(batches)} batches")
    steps = [Step(f"map-{i:03d}", "guidance_map", {"pairs": s.pair_view(b)}, _empty(s), _ids(b))
             for i, b in enumerate(batches)]
    partials = [r.memory for r in s.ops_calls(steps)]
    reduced = consolidate(s, partials, "guidance_reduce", "reduce")
    s.propose(reduced, "reduce")
    s.propose(add_examples(s, s.current(), pairs), "examples")


def _rounds(s: Session, pairs: list[dict], template: str, prefix: str, start: int = 0) -> None:
    """Pass the current best memory from group to group; each group's result is a new round."""
    rest = list(pairs)
    i = start
    while rest:
        base = s.current()
        batch = s.next_batch(rest, template, memory=s.memory_view(base))
        rest = rest[len(batch):]
        step = Step(f"{prefix}-{i:03d}", template, {"pairs": s.pair_view(batch), "memory": s.memory_view(base)},
                    base, _ids(batch))
        s.propose(s.ops_calls([step])[0].memory, f"{prefix}-{i:03d}")
        i += 1


def refine(s: Session, pairs: list[dict]) -> None:
    _rounds(s, pairs, "guidance_refine", "refine")


def _diverse_order(pairs: list[dict]) -> list[dict]:
    """Round-robin over scenes, so a prefix of the list covers as many scenes as possible."""
    by_scene: dict[str, list[dict]] = {}
    for p in pairs:
        by_scene.setdefault(p.get("scene") or "", []).append(p)
    out, queues = [], list(by_scene.values())
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def broad_to_deep(s: Session, pairs: list[dict]) -> None:
    ordered = _diverse_order(pairs)
    first = s.batches(ordered[: s.batch_size], "guidance_broad")[0]
    step = Step("broad-000", "guidance_broad", {"pairs": s.pair_view(first)}, _empty(s), _ids(first))
    s.propose(s.ops_calls([step])[0].memory, "broad")
    seen = set(_ids(first))
    _rounds(s, [p for p in ordered if p["id"] not in seen], "guidance_deepen", "deepen")


def per_example(s: Session, pairs: list[dict]) -> None:
    full = pairs
    steps = []
    for i, p in enumerate(full):
        p = s.batches([p], "guidance_per_example")[0][0]  # shortened if it does not fit alone
        steps.append(Step(f"example-{i:03d}", "guidance_per_example", {"pairs": s.pair_view([p])}, _empty(s), [p["id"]]))
    s.console.print(f"  per-example: {len(steps)} analyses")
    partials = [r.memory for r in s.ops_calls(steps)]
    s.propose(consolidate(s, partials, "guidance_synthesize", "synthesize"), "synthesize")


MODES = {"map-reduce": map_reduce, "refine": refine, "broad-to-deep": broad_to_deep, "per-example": per_example}
