"""The guidance as files: guidance.md (for people, hand-editable), guidance.json (structured, with the
source pair ids of every rule and example), and the system-prompt text the weak model gets.

guidance.md round-trips: ``## `` starts a dimension, the paragraph under it is the definition, ``- ``
lines are rules (an optional trailing "(support N; pairs: ...)" is provenance), ``> `` lines are
examples. So a user can edit the Markdown and point ``guidance.edited_file`` at it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from toushi.guidance.memory import ADD_SUPPORT, Dimension, Memory, Rule
from toushi.metrics import detect_lang
from toushi.templates import render

EXCLUDED_FROM_PROMPT = "unstructured"  # raw, unreviewed model output is shown to people, not to the model


def to_markdown(memory: Memory, meta: dict) -> str:
    lines = [
        "# Guidance",
        "",
        f"<!-- toushi guidance · mode {meta.get('mode', '?')} · version {meta.get('version', '?')} · "
        f"{meta.get('pairs', '?')} pairs. Edit freely: '## ' starts a dimension, the paragraph under it is its "
        "definition, '- ' lines are rules, '> ' lines are examples; then set guidance.edited_file to this file. -->",
    ]
    for flag in meta.get("flags", []):
        lines += ["", f"Flagged: {flag}"]
    for d in memory.dimensions:
        head = f"## {d.name}"
        if d.flags:
            head += f" [flagged: {', '.join(d.flags)}]"
        lines += ["", head, ""]
        if d.definition:
            lines += [d.definition, ""]
        for r in d.rules:
            meta_bits = [f"support {r.support}"]
            if r.pair_ids:
                meta_bits.append("pairs: " + ", ".join(r.pair_ids))
            if r.flags:
                meta_bits.append("flags: " + ", ".join(r.flags))
            text = " ".join(r.text.split())  # one line per rule, so the file parses back
            lines.append(f"- {text} ({'; '.join(meta_bits)})")
        for e in d.examples:
            ids = f" ({', '.join(e.get('pair_ids', []))})" if e.get("pair_ids") else ""
            lines.append(f"> {e.get('kind', 'example')}{ids}: {' '.join(str(e.get('text', '')).split())}")
    return "\n".join(lines).rstrip() + "\n"


_RULE_META = re.compile(r"\s*\((support\s+(\d+)[^()]*)\)\s*$")
_HEAD_FLAGS = re.compile(r"\s*\[flagged:\s*([^\]]*)\]\s*$")
_EXAMPLE = re.compile(r"^>\s*(\w+)\s*(?:\(([^)]*)\))?\s*:\s*(.*)$")


def parse_markdown(text: str) -> Memory:
    """guidance.md (ours or hand-edited) back into a memory; text outside dimensions is ignored."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    mem = Memory(cap=10_000, max_dimensions=10_000)  # a human's edit is not pruned
    dim: Dimension | None = None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("## "):
            name = s[3:].strip()
            flags = []
            m = _HEAD_FLAGS.search(name)
            if m:
                flags = [f.strip() for f in m.group(1).split(",") if f.strip()]
                name = name[: m.start()].strip()
            dim = Dimension(name=name, flags=flags)
            mem.dimensions.append(dim)
        elif dim is None or not s or s.startswith("# "):
            continue
        elif s[:2] in ("- ", "* "):
            rule = s[2:].strip()
            support, ids, flags = ADD_SUPPORT, [], []
            m = _RULE_META.search(rule)
            if m:
                support = int(m.group(2))
                for part in m.group(1).split(";"):
                    key, _, val = part.partition(":")
                    vals = [v.strip() for v in val.split(",") if v.strip()]
                    if key.strip() == "pairs":
                        ids = vals
                    elif key.strip() == "flags":
                        flags = vals
                rule = rule[: m.start()].strip()
            if rule:
                dim.rules.append(Rule(rule, support, ids, flags))
        elif s.startswith(">"):
            m = _EXAMPLE.match(s)
            if m:
                ids = [v.strip() for v in (m.group(2) or "").split(",") if v.strip()]
                dim.examples.append({"kind": m.group(1), "text": m.group(3).strip(), "pair_ids": ids})
            else:
                dim.examples.append({"kind": "example", "text": s.lstrip("> ").strip(), "pair_ids": []})
        elif not dim.rules:
            dim.definition = f"{dim.definition} {s}".strip()
    return mem


def system_prompt(memory: Memory, lang: str) -> str:
    """The guidance as the weak model's system prompt (raw unstructured notes left out)."""
    dims = [
        {"name": d.name, "definition": d.definition, "rules": [" ".join(r.text.split()) for r in d.rules]}
        for d in memory.dimensions
        if EXCLUDED_FROM_PROMPT not in d.flags and (d.rules or d.definition)
    ]
    return render("guidance_system", lang, dimensions=dims)


def to_json(memory: Memory, meta: dict, lang: str) -> dict:
    return {**meta, "lang": lang, **memory.to_dict(), "system_prompt": system_prompt(memory, lang)}


def read_guidance_file(path: Path) -> tuple[Memory, dict]:
    """A guidance.json or guidance.md (ours or hand-edited) -> (memory, meta). Clear errors for bad input."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: guidance file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("dimensions"), list):
            raise ValueError(f"{path}: expected an object with a 'dimensions' list")
        for i, d in enumerate(data["dimensions"]):
            if not isinstance(d, dict) or not str(d.get("name", "")).strip():
                raise ValueError(f"{path}: dimensions[{i}] has no name")
        meta = {k: v for k, v in data.items() if k not in ("dimensions", "system_prompt")}
        return Memory.from_dict(data, cap=10_000, max_dimensions=10_000), meta
    if path.suffix in (".md", ".markdown", ".txt"):
        mem = parse_markdown(text)
        if not mem.dimensions:
            raise ValueError(f"{path}: no dimensions found (each starts with a '## ' heading line)")
        return mem, {"lang": detect_lang(text) or None}
    raise ValueError(f"{path}: a guidance file must be .json or .md")


def load_guidance(path_or_run_dir: str | Path) -> str:
    """The guidance text used as a system prompt, from a run directory, a guidance stage directory, or a
    guidance.json / guidance.md file."""
    p = Path(path_or_run_dir)
    if p.is_dir():
        for cand in (p / "guidance.json", p / "guidance" / "guidance.json"):
            if cand.is_file():
                p = cand
                break
        else:
            raise FileNotFoundError(f"{path_or_run_dir}: no guidance.json (run the guidance stage first)")
    if p.suffix == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get("system_prompt"), str) and data["system_prompt"]:
            return data["system_prompt"]
    mem, meta = read_guidance_file(p)
    lang = meta.get("lang") or detect_lang(p.read_text(encoding="utf-8")) or "en"
    return system_prompt(mem, lang)
