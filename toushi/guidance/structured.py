"""The JSON form of an analysis call's operations, decoded under a schema built for that call.

The schema is what keeps a small model's answer usable: pair labels are an enum of the pairs the prompt
showed, rule ids an enum of the rules it showed, a new dimension comes with at least one rule, and a
first analysis (empty memory) must name at least three dimensions. The answer maps onto the memory's
operations (``toushi.guidance.memory``)::

    {"rubric_rules": {<seed name>: [{"rule", "pairs": ["p3"]}]},                       DIM + ADD
     "new_dimensions": [{"name", "definition", "rules": [{"rule", "pairs": ["p3"]}]}],   DIM + ADD
     "add_rules": [{"dimension": <existing name>, "rule", "pairs"}],                  ADD
     "agree": [{"rule": "R1.2", "pairs"}], "edit": [{"rule", "text", "pairs"}],        AGREE, EDIT
     "remove": ["R2.1"]}                                                               REMOVE

Keys that cannot apply to a call (no dimension or rule to refer to, no pair shown) are left out.

Seeds: on an empty memory the first analysis writes rules for a few given dimensions (the judge rubric's,
names and definitions fixed) under ``rubric_rules``, an object with one required key per seed. A small
model asked for three dimensions of its own names the same one three times; keyed seeds make three
distinct dimensions with rules a property of the schema, and the model may still add its own.
"""

from __future__ import annotations

import json
import re

from toushi.engines import Structured
from toushi.guidance.memory import Memory, Op, ParseResult

MIN_FIRST_DIMENSIONS = 3
# Bounds on every string: each one ends, so a constrained answer cannot run on until max_tokens.
NAME_CHARS, DEFINITION_CHARS, RULE_CHARS = 32, 100, 120


# Characters per token of a worst-case answer: a small model's degenerate text ("R.D.E.D.E...") takes a
# token a character, and an answer cut off at max_tokens is unusable, so the lists are sized for that.
CHARS_PER_TOKEN = 1


# Text a reader can use: no digits, underscores, brackets, braces, quotes or backslashes. A small model under
# a schema otherwise fills strings with "p1_2_3_4_5..." (one token a digit: a 120-character string then
# takes 120 tokens and the answer is cut off) or with copied JSON. Length goes into the pattern itself:
# xgrammar cannot take a pattern together with minLength/maxLength (vLLM then leaves the schema to
# another backend), and xgrammar 0.2.8 fails to compile a bounded repeat above 128 (grammar_functor.cc
# per_rule_fsm_hashes check), so no string here is longer than that.
MAX_TEXT = 128
TEXT_CHARS = r"[^0-9_\[\]{}<>\\\"]"
_BOUNDS = re.compile(r"\{(\d+),(\d+)\}\$$")


def _text(lo: int, hi: int) -> dict:
    assert hi <= MAX_TEXT, hi
    return {"type": "string", "pattern": f"^{TEXT_CHARS}{{{lo},{hi}}}$"}


def max_chars(schema: dict) -> int:
    """Characters of the longest answer the schema allows (compact JSON)."""
    if schema.get("type") == "object":
        return 2 + sum(len(k) + 4 + max_chars(v) for k, v in schema["properties"].items())
    if schema.get("type") == "array":
        return 2 + schema["maxItems"] * (max_chars(schema["items"]) + 1)
    if "enum" in schema:
        return 2 + max(len(str(v)) for v in schema["enum"])
    return 2 + int(_BOUNDS.search(schema["pattern"]).group(2))


def _obj(props: dict) -> dict:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def _array(item: dict, hi: int, lo: int = 0) -> dict:
    return {"type": "array", "items": item, "minItems": lo, "maxItems": hi}


# List sizes of an answer, largest first; ops_schema takes the first that fits the call's max_tokens (a
# truncated answer is unusable): new dimensions, rules per new dimension, add_rules, agree, edit, remove.
_SIZES = ((3, 2, 3, 4, 2, 2), (3, 1, 3, 3, 2, 2), (2, 1, 2, 2, 1, 1), (1, 1, 1, 1, 1, 1), (0, 1, 1, 1, 1, 0))


def ops_schema(memory: Memory, labels: list[str], max_dimensions: int, cap: int, max_tokens: int = 1024,
               seeds: dict[str, str] | None = None) -> dict:
    """The schema of one call's answer, given the memory it shows and the pair labels it shows, with lists
    short enough that the longest allowed answer fits ``max_tokens``. ``seeds`` (name -> definition) are
    the dimensions an empty memory's first analysis must write rules for."""
    for sizes in _SIZES:
        schema = _ops_schema(memory, labels, max_dimensions, cap, *sizes, seeds=seeds or {})
        if max_chars(schema) <= max_tokens * CHARS_PER_TOKEN:
            break
    return schema


def first_seeds(memory: Memory, seeds: dict[str, str], max_dimensions: int) -> dict[str, str]:
    """The seeds a call on ``memory`` must fill: only on an empty memory, at most max_dimensions."""
    if memory.dimensions:
        return {}
    return dict(list(seeds.items())[:max_dimensions])


def _ops_schema(memory: Memory, labels: list[str], max_dimensions: int, cap: int,
                n_new: int, n_rules: int, n_add: int, n_agree: int, n_edit: int, n_remove: int,
                seeds: dict[str, str]) -> dict:
    pairs = {"pairs": _array({"type": "string", "enum": labels}, min(3, len(labels)), 1)} if labels else {}
    rule = _obj({"rule": _text(15, RULE_CHARS), **pairs})
    n_dims = len(memory.dimensions)
    seeded = first_seeds(memory, seeds, max_dimensions)
    room = max(0, max_dimensions - n_dims - len(seeded))
    # without seeds an empty memory's first answer must name MIN_FIRST_DIMENSIONS of its own
    need = 0 if n_dims or seeded else min(room, MIN_FIRST_DIMENSIONS)
    props = {}
    if seeded:
        props["rubric_rules"] = _obj({name: _array(rule, min(n_rules, cap), 1) for name in seeded})
    props["new_dimensions"] = _array(
        _obj({"name": _text(3, NAME_CHARS), "definition": _text(10, DEFINITION_CHARS),
              "rules": _array(rule, min(n_rules, cap), 1)}),
        max(need, min(room, n_new, 1 if seeded else MIN_FIRST_DIMENSIONS)), need)
    names = [d.name for d in memory.dimensions]
    if names:
        props["add_rules"] = _array(_obj({"dimension": {"type": "string", "enum": names},
                                          "rule": _text(15, RULE_CHARS), **pairs}), n_add)
    ids = [f"R{di}.{ri}" for di, d in enumerate(memory.dimensions, 1) for ri in range(1, len(d.rules) + 1)]
    if ids:
        rule_id = {"type": "string", "enum": ids}
        props["agree"] = _array(_obj({"rule": rule_id, **pairs}), n_agree)
        props["edit"] = _array(_obj({"rule": rule_id, "text": _text(15, RULE_CHARS), **pairs}), n_edit)
        props["remove"] = _array(rule_id, n_remove)
    return _obj(props)


def ops_constraint(memory: Memory, labels: list[str], max_dimensions: int, cap: int,
                   max_tokens: int = 1024, seeds: dict[str, str] | None = None) -> Structured:
    return Structured(json_schema=ops_schema(memory, labels, max_dimensions, cap, max_tokens, seeds))


def parse_json_ops(output: str, seeds: dict[str, str] | None = None) -> ParseResult | None:
    """Operations from a JSON answer, or None when the output is not a JSON object (then it is read as
    operation lines). Entries that lack a field (an endpoint that could not constrain) are malformed;
    ``rubric_rules`` keys become dimensions with their seed's definition (an unknown key is malformed)."""
    try:
        data = json.loads(output)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    ops: list[Op] = []
    malformed: list[str] = []

    def text(entry, key: str) -> str:
        value = entry.get(key) if isinstance(entry, dict) else None
        return " ".join(value.split()) if isinstance(value, str) else ""

    def pairs(entry) -> list[str]:
        value = entry.get("pairs") if isinstance(entry, dict) else None
        return [str(p) for p in value] if isinstance(value, list) else []

    def add(op: Op | None, entry) -> None:
        if op is None:
            malformed.append(json.dumps(entry, ensure_ascii=False))
        else:
            ops.append(op)

    # References to shown rules first: they mean the numbering the prompt showed (apply resolves them
    # against a snapshot, so the order only matters for readability of the intermediate files).
    for e in data.get("agree") or []:
        add(Op("AGREE", text(e, "rule"), "", pairs(e), json.dumps(e, ensure_ascii=False)) if text(e, "rule") else None, e)
    for e in data.get("edit") or []:
        ok = text(e, "rule") and text(e, "text")
        add(Op("EDIT", text(e, "rule"), text(e, "text"), pairs(e), json.dumps(e, ensure_ascii=False)) if ok else None, e)
    for e in data.get("remove") or []:
        add(Op("REMOVE", e, "", [], f"REMOVE {e}") if isinstance(e, str) and e else None, e)
    for e in data.get("add_rules") or []:
        ok = text(e, "dimension") and text(e, "rule")
        add(Op("ADD", text(e, "dimension"), text(e, "rule"), pairs(e), json.dumps(e, ensure_ascii=False))
            if ok else None, e)
    seeds = seeds or {}
    seeded = data.get("rubric_rules")
    for name, rules in (seeded.items() if isinstance(seeded, dict) else []):
        if name not in seeds:
            malformed.append(json.dumps({name: rules}, ensure_ascii=False))
            continue
        ops.append(Op("DIM", name, seeds[name], [], f"DIM {name}: {seeds[name]}"))
        for r in rules if isinstance(rules, list) else []:
            add(Op("ADD", name, text(r, "rule"), pairs(r), json.dumps(r, ensure_ascii=False)) if text(r, "rule")
                else None, r)
    for e in data.get("new_dimensions") or []:
        name = text(e, "name")
        if not name:
            add(None, e)
            continue
        ops.append(Op("DIM", name, text(e, "definition"), [], f"DIM {name}: {text(e, 'definition')}"))
        for r in (e.get("rules") or []) if isinstance(e, dict) else []:
            add(Op("ADD", name, text(r, "rule"), pairs(r), json.dumps(r, ensure_ascii=False)) if text(r, "rule")
                else None, r)
    return ParseResult(ops, malformed, json=True)


# ---- worked examples: a quote from the strong reply, why it helps, how a weaker reply could do it

EXAMPLE_SCHEMA = _obj({"quote": _text(5, MAX_TEXT), "why": _text(10, MAX_TEXT), "rewrite": _text(10, MAX_TEXT)})


def example_text(output: str) -> str | None:
    """The worked example as one paragraph, or None when the output is not the JSON answer."""
    try:
        data = json.loads(output)
    except ValueError:
        return None
    parts = [data.get(k) for k in ("quote", "why", "rewrite")] if isinstance(data, dict) else []
    if not all(isinstance(p, str) and p.strip() for p in parts):
        return None
    quote, why, rewrite = (" ".join(p.split()) for p in parts)
    return f"“{quote}” {why} {rewrite}"
