"""Rule memory: the guidance held as named dimensions, each a short list of rules with support counts.

Analysis calls do not rewrite the guidance as free text (which drifts); they return *operations* on
this memory, as ExpeL does with its insight list. Models answer them as JSON under a per-call schema
(``toushi.guidance.structured``); the line form below is what that JSON maps to, and what is still read
from a model that could not be constrained:

    DIM <name>: <definition>                   new dimension (or a definition for an existing one)
    ADD <D# or dimension name>: <rule> [p3, p7]   new rule, supported by pairs p3 and p7
    EDIT R<d>.<r>: <new rule text> [p5]        reword a rule (raises its support)
    AGREE R<d>.<r> [p2]                        the pairs confirm a rule (raises its support)
    REMOVE R<d>.<r>                            the rule is wrong or useless (lowers its support)
    GOOD <D#>: "<excerpt>" [p4]                an excerpt of a strong answer that shows the dimension
    BAD <D#>: "<excerpt>" [p4]                 an excerpt of a weak answer that misses it

Support follows ExpeL: ADD sets 2, AGREE and EDIT add 1, REMOVE subtracts 1, and a rule at 0 is gone;
so one dissenting batch cannot erase a rule two others agreed on. Pair labels (p1, p2, ...) are short
aliases the prompt shows; they map back to corpus ids, and a label the prompt never showed is dropped
and counted (provenance stays real). A line that starts with an operation keyword but does not parse
is dropped and counted; other lines are commentary and ignored.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

ADD_SUPPORT = 2
OPS = ("DIM", "ADD", "EDIT", "AGREE", "REMOVE", "GOOD", "BAD")

# An operation line may carry list/number decoration a model adds ("1. ADD ...", "- **ADD** ...").
_LEAD = r"^[\s>*\-•]*(?:\d+[.)]\s*)?[*_`]*"
_OP_START = re.compile(_LEAD + r"(" + "|".join(OPS) + r")\b[*_`]*\s*", re.I)
_RULE_REF = re.compile(r"^R?\s*(\d+)\s*[.\-_:]\s*(\d+)\b", re.I)
_DIM_REF = re.compile(r"D\s*(\d+)", re.I)
_PAIR = re.compile(r"\b[pP]\s?(\d{1,4})\b")
# A trailing "[p3, p7]" / "(pairs: p3, p7)" group: the provenance, not part of the rule text.
_TRAILING_IDS = re.compile(r"[\[(]\s*(?:pairs?\s*[:：]?\s*)?(?:[pP]\s?\d{1,4}[\s,;、，]*)+[\])]\s*\.?\s*$")


@dataclass
class Rule:
    text: str
    support: int = ADD_SUPPORT
    pair_ids: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"text": self.text, "support": self.support, "pair_ids": list(self.pair_ids),
                "flags": list(self.flags)}


@dataclass
class Dimension:
    name: str
    definition: str = ""
    rules: list[Rule] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)  # {"kind": good|bad|worked, "text", "pair_ids"}
    flags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "definition": self.definition, "rules": [r.to_dict() for r in self.rules],
                "examples": [dict(e) for e in self.examples], "flags": list(self.flags)}


@dataclass
class Op:
    kind: str  # one of OPS
    target: str = ""  # dimension name / "D2" / "R2.1"
    text: str = ""
    pairs: list[str] = field(default_factory=list)  # aliases as written (p3)
    line: str = ""


@dataclass
class ParseResult:
    ops: list[Op]
    malformed: list[str]  # op-looking lines (or JSON entries) that did not parse
    json: bool = False  # the JSON answer: structured even when it changes nothing

    @property
    def structured(self) -> bool:
        return bool(self.ops) or self.json


def _strip_ids(text: str) -> tuple[str, list[str]]:
    """Rule text without its trailing id group, and every pair alias the text mentions."""
    aliases = [f"p{int(m)}" for m in _PAIR.findall(text)]
    text = _TRAILING_IDS.sub("", text).strip()
    return text.strip(" \"'“”「」").strip(), list(dict.fromkeys(aliases))


def parse_ops(output: str) -> ParseResult:
    """Operations in a model's output, in order; malformed operation lines are returned separately."""
    ops: list[Op] = []
    malformed: list[str] = []
    for raw in output.splitlines():
        m = _OP_START.match(raw)
        if not m:
            continue
        kind = m.group(1).upper()
        rest = raw[m.end():].strip().rstrip("*_` ")
        op = _parse_one(kind, rest, raw.strip())
        if op is None:
            malformed.append(raw.strip())
        else:
            ops.append(op)
    return ParseResult(ops, malformed)


def _split_target(rest: str) -> tuple[str, str] | None:
    """'<target>: <text>' -> (target, text); the colon may be full-width."""
    m = re.match(r"^(.+?)\s*[:：]\s*(.*)$", rest, re.S)
    if not m:
        return None
    return m.group(1).strip().strip("*_`[]"), m.group(2).strip()


# A template placeholder such as <rule, one sentence> or <维度名>: small models often copy the format
# example verbatim, and a rule that says "<rule, one sentence>" must never reach the weak model's prompt.
_PLACEHOLDER = re.compile(r"<[^<>]{1,40}>")


def _parse_one(kind: str, rest: str, line: str) -> Op | None:
    if _PLACEHOLDER.search(rest):
        return None
    if kind in ("AGREE", "REMOVE"):
        m = _RULE_REF.match(rest)
        if not m:
            return None
        _, aliases = _strip_ids(rest[m.end():])
        return Op(kind, f"R{int(m.group(1))}.{int(m.group(2))}", "", aliases, line)
    parts = _split_target(rest)
    if parts is None:
        return None
    target, body = parts
    text, aliases = _strip_ids(body)
    if kind == "DIM":
        if not target:
            return None
        return Op(kind, target, text, [], line)
    if not text:
        return None
    if kind == "EDIT":
        m = _RULE_REF.match(target)
        if not m:
            return None
        return Op(kind, f"R{int(m.group(1))}.{int(m.group(2))}", text, aliases, line)
    # ADD / GOOD / BAD: the target is a dimension ("D2" or its name)
    if not target or _RULE_REF.match(target):
        return None
    return Op(kind, target, text, aliases, line)


@dataclass
class ApplyStats:
    applied: int = 0
    malformed: int = 0  # unparsable op lines (counted by the caller from ParseResult) + ops that point nowhere
    unknown_pairs: int = 0
    pruned: int = 0
    removed: int = 0
    duplicates: int = 0  # an ADD repeating one made earlier in the same call

    def add(self, other: ApplyStats) -> None:
        for k in vars(self):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def to_dict(self) -> dict:
        return dict(vars(self))


class Memory:
    """Dimensions with capped rule lists; ``apply`` runs operations and prunes to the cap."""

    def __init__(self, dimensions: list[Dimension] | None = None, cap: int = 6, max_dimensions: int = 8):
        self.dimensions = dimensions or []
        self.cap = cap
        self.max_dimensions = max_dimensions

    # ---- lookup
    def find(self, target: str, create: bool = False) -> Dimension | None:
        """A dimension by "D<n>" (1-based, as rendered) or by name (case-insensitive)."""
        m = _DIM_REF.fullmatch(target.strip())
        if m:
            i = int(m.group(1)) - 1
            return self.dimensions[i] if 0 <= i < len(self.dimensions) else None
        key = " ".join(target.split()).lower()
        for d in self.dimensions:
            if d.name.lower() == key:
                return d
        if create and key:
            d = Dimension(name=" ".join(target.split()))
            self.dimensions.append(d)
            return d
        return None

    def rule(self, ref: str) -> tuple[Dimension, Rule] | None:
        m = _RULE_REF.match(ref)
        if not m:
            return None
        di, ri = int(m.group(1)) - 1, int(m.group(2)) - 1
        if not (0 <= di < len(self.dimensions)) or not (0 <= ri < len(self.dimensions[di].rules)):
            return None
        return self.dimensions[di], self.dimensions[di].rules[ri]

    # ---- operations
    def apply(self, ops: list[Op], aliases: dict[str, str]) -> ApplyStats:
        """Apply operations in order. Rule references (R<d>.<r>) mean the numbering the model was shown,
        so they are resolved against a snapshot taken before any operation of this call (an ADD earlier in
        the call does not renumber them); removals and pruning happen after all operations."""
        stats = ApplyStats()
        shown = {f"R{di + 1}.{ri + 1}": r for di, d in enumerate(self.dimensions) for ri, r in enumerate(d.rules)}
        added: set[tuple[int, str]] = set()  # (dimension, rule text) ADDed by this call
        for op in ops:
            ids = []
            for a in op.pairs:
                if a.lower() in aliases:
                    ids.append(aliases[a.lower()])
                else:
                    stats.unknown_pairs += 1
            ids = list(dict.fromkeys(ids))  # a label listed twice is one pair
            if op.kind == "DIM":
                d = self._dim(op.target, create=True)
                if d is None:
                    stats.malformed += 1
                    continue
                if op.text and not d.definition:
                    d.definition = op.text
                stats.applied += 1
            elif op.kind in ("ADD", "GOOD", "BAD"):
                d = self._dim(op.target, create=True)
                if d is None:
                    stats.malformed += 1
                    continue
                if op.kind == "ADD":
                    key = (id(d), " ".join(op.text.lower().split()))
                    if key in added:  # one lesson is one ADD: a call repeating itself is not more support
                        stats.duplicates += 1
                        continue
                    added.add(key)
                    same = next((r for r in d.rules if r.text.lower() == op.text.lower()), None)
                    if same:  # an earlier call's rule ADDed again is agreement, not a duplicate rule
                        same.support += 1
                        _merge(same.pair_ids, ids)
                    else:
                        d.rules.append(Rule(op.text, ADD_SUPPORT, ids))
                else:
                    d.examples.append({"kind": op.kind.lower(), "text": op.text, "pair_ids": ids})
                stats.applied += 1
            else:  # EDIT / AGREE / REMOVE on a shown rule
                r = shown.get(op.target)
                if r is None:
                    stats.malformed += 1
                    continue
                if op.kind == "EDIT":
                    r.text = op.text
                    r.support += 1
                elif op.kind == "AGREE":
                    r.support += 1
                else:
                    r.support -= 1
                _merge(r.pair_ids, ids)
                stats.applied += 1
        for d in self.dimensions:
            before = len(d.rules)
            d.rules = [r for r in d.rules if r.support > 0]
            stats.removed += before - len(d.rules)
        stats.pruned += self.prune()
        return stats

    def _dim(self, target: str, create: bool) -> Dimension | None:
        # Dimensions are only appended during a call, so "D<n>" means the same one before and after a DIM.
        if _DIM_REF.fullmatch(target.strip()):
            return self.find(target)
        if create and len(self.dimensions) >= self.max_dimensions and self.find(target) is None:
            return None
        return self.find(target, create=create)

    def prune(self) -> int:
        """Enforce the caps: drop the lowest-support rules of a dimension beyond ``cap``, and the
        lowest-support dimensions beyond ``max_dimensions`` (merged partial analyses can bring more); among
        equals the newest goes first, so an established rule or dimension is not displaced by an untested
        one. Returns the number of rules dropped."""
        pruned = 0
        for d in self.dimensions:
            # raw notes are a review log kept out of the prompt: the cap must not throw away the evidence
            if len(d.rules) > self.cap and "unstructured" not in d.flags:
                order = sorted(range(len(d.rules)), key=lambda i: (-d.rules[i].support, i))
                keep = set(order[: self.cap])
                pruned += len(d.rules) - self.cap
                d.rules = [r for i, r in enumerate(d.rules) if i in keep]
        counted = [i for i, d in enumerate(self.dimensions) if "unstructured" not in d.flags]
        if len(counted) > self.max_dimensions:
            support = {i: sum(r.support for r in self.dimensions[i].rules) for i in counted}
            drop = set(sorted(counted, key=lambda i: (-support[i], i))[self.max_dimensions:])
            pruned += sum(len(self.dimensions[i].rules) for i in drop)
            self.dimensions = [d for i, d in enumerate(self.dimensions) if i not in drop]
        return pruned

    # ---- copies, merges, serialisation
    def copy(self) -> Memory:
        return Memory(copy.deepcopy(self.dimensions), self.cap, self.max_dimensions)

    def merge(self, other: Memory) -> None:
        """Fold another memory in (same-named dimensions join; identical rules add their support)."""
        for od in other.dimensions:
            d = self.find(od.name, create=True)
            if od.definition and not d.definition:
                d.definition = od.definition
            for r in od.rules:
                same = next((x for x in d.rules if x.text.lower() == r.text.lower()), None)
                if same:
                    same.support += r.support
                    _merge(same.pair_ids, r.pair_ids)
                    _merge(same.flags, r.flags)
                else:
                    d.rules.append(copy.deepcopy(r))
            d.examples.extend(copy.deepcopy(od.examples))
            _merge(d.flags, od.flags)

    def keep_raw(self, text: str, label: str, pair_ids: list[str], limit: int = 1500) -> None:
        """Output that never followed the operation format: kept verbatim (trimmed) as a flagged rule of a
        flagged dimension, so it is visible and reviewable instead of silently lost."""
        d = self.find("Unstructured notes", create=True)
        _merge(d.flags, ["unstructured"])
        if not d.definition:
            d.definition = "Model output that did not follow the operation format, kept raw for review."
        text = text.strip() or "(empty output)"
        d.rules.append(Rule(text[:limit], 1, list(pair_ids), ["unstructured", label]))
        self.prune()

    def pair_ids(self) -> set[str]:
        out: set[str] = set()
        for d in self.dimensions:
            for r in d.rules:
                out.update(r.pair_ids)
            for e in d.examples:
                out.update(e.get("pair_ids", []))
        return out

    def n_rules(self) -> int:
        return sum(len(d.rules) for d in self.dimensions)

    def to_dict(self) -> dict:
        return {"dimensions": [d.to_dict() for d in self.dimensions]}

    @classmethod
    def from_dict(cls, data: dict, cap: int = 6, max_dimensions: int = 8) -> Memory:
        dims = []
        for d in data.get("dimensions") or []:
            rules = [Rule(str(r.get("text", "")), int(r.get("support", ADD_SUPPORT)), list(r.get("pair_ids") or []),
                          list(r.get("flags") or []))
                     for r in d.get("rules") or [] if str(r.get("text", "")).strip()]
            dims.append(Dimension(str(d.get("name", "")).strip(), str(d.get("definition") or ""), rules,
                                  [dict(e) for e in d.get("examples") or []], list(d.get("flags") or [])))
        return cls(dims, cap, max_dimensions)

    def render_for_prompt(self) -> str:
        """The numbered view the model edits (D<n>, R<d>.<r>, support counts)."""
        if not self.dimensions:
            return "(empty)"
        lines = []
        for di, d in enumerate(self.dimensions, 1):
            lines.append(f"D{di} {d.name}: {d.definition}".rstrip(": "))
            for ri, r in enumerate(d.rules, 1):
                lines.append(f"  R{di}.{ri} (support {r.support}) {r.text}")
        return "\n".join(lines)


def _merge(into: list, new: list) -> None:
    for x in new:
        if x not in into:
            into.append(x)
