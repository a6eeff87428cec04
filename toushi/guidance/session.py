"""What every extraction mode shares: cached model calls, operation calls with one repair attempt,
packing into the context, and versions (drift score, acceptance gate, history with diffs).

Every model call goes through :class:`toushi.calls.Calls` (the guidance stage's records.jsonl holds them),
written as soon as its batch returns, so a run killed mid-mode repeats no finished call: the rerun replays the
cached outputs through the same deterministic operations and arrives at the same memory.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from rich.console import Console

from toushi.calls import Calls
from toushi.engines import Structured
from toushi.guidance import drift
from toushi.guidance.memory import ApplyStats, Memory, ParseResult, parse_ops
from toushi.guidance.packing import pack, shrink_pair
from toushi.guidance.render import to_json, to_markdown
from toushi.guidance.structured import ops_constraint, parse_json_ops
from toushi.store import StageStore, atomic_write_text
from toushi.templates import render


def parse_output(output: str, seeds: dict[str, str] | None = None) -> ParseResult:
    """The JSON answer when the output is one, else operation lines (a model that was not constrained)."""
    return parse_json_ops(output, seeds) or parse_ops(output)


@dataclass
class Step:
    """One operation call: a template rendered with ``variables``, applied to a copy of ``base``."""

    name: str
    template: str
    variables: dict
    base: Memory
    pair_ids: list[str] = field(default_factory=list)  # the pairs this call saw (for raw-kept output)


@dataclass
class StepResult:
    memory: Memory
    structured: bool
    repaired: bool
    stats: ApplyStats
    flags: list[str]


class Session:
    def __init__(self, *, store: StageStore, lang: str, calls: Calls, pairs: list[dict], blind: bool,
                 cap: int, max_dimensions: int, batch_size: int, count_tokens: Callable[[str], int],
                 prompt_budget: int, drift_threshold: float, mode: str,
                 gate: Callable[[Memory, Memory | None], dict] | None = None, console: Console | None = None,
                 seeds: dict[str, str] | None = None):
        if prompt_budget <= 0:
            raise ValueError(
                f"guidance: no room for a prompt (budget {prompt_budget} tokens): the context length minus "
                "guidance.sampling.max_tokens must be positive; raise guidance.context_tokens or lower max_tokens"
            )
        self.store, self.lang, self.calls, self.blind = store, lang, calls, blind
        self.cap, self.max_dimensions, self.batch_size = cap, max_dimensions, batch_size
        self.count_tokens, self.budget, self.drift_threshold, self.mode = count_tokens, prompt_budget, drift_threshold, mode
        self.gate, self.console = gate, console or Console(stderr=True)
        self.pairs = pairs
        # dimension name -> definition, filled by the first analysis (no more than the memory may hold)
        self.seeds = dict(list((seeds or {}).items())[:max_dimensions])
        self.aliases = {p["label"].lower(): p["id"] for p in pairs}
        self.versions: list[dict] = []  # history index entries
        self.memories: list[Memory] = []
        self.totals = ApplyStats()
        self.flag_counts: dict[str, int] = {}

    # ---- prompts
    def render(self, template: str, /, **variables) -> str:
        # the operations part lists the seeds only when it shows no memory (the schema's first_seeds rule)
        return render(template, self.lang, blind=self.blind, max_rules=self.cap,
                      max_dimensions=self.max_dimensions, seeds=self.seeds, **variables)

    def fits(self, template: str, /, **variables) -> bool:
        return self.count_tokens(self.render(template, **variables)) <= self.budget

    def batches(self, pairs: Sequence[dict], template: str, **variables) -> list[list[dict]]:
        """Pack pairs for ``template`` (rendered with ``variables``, e.g. the current memory)."""
        def fits(batch):
            return self.fits(template, pairs=batch, **variables)

        return pack([shrink_pair(p, fits) for p in pairs], self.batch_size, fits)

    def next_batch(self, pairs: Sequence[dict], template: str, **variables) -> list[dict]:
        """The first batch of ``pairs`` that fits with this memory (refine/deepen pass the memory on)."""
        return self.batches(pairs[: self.batch_size], template, **variables)[0]

    def memory_view(self, memory: Memory) -> str:
        return memory.render_for_prompt()

    # ---- calls
    def _save_prompt(self, name: str, prompt: str) -> None:
        atomic_write_text(self.store.path("prompts", f"{name}.txt"), prompt + "\n")

    def text_calls(self, names: list[str], prompts: list[str],
                   structured: Sequence[Structured | None] | None = None) -> list[str]:
        for n, p in zip(names, prompts):
            self._save_prompt(n, p)
        return self.calls.texts([[{"role": "user", "content": p}] for p in prompts], structured=structured,
                                meta=[{"step": n} for n in names])

    def ops_calls(self, steps: list[Step]) -> list[StepResult]:
        """Render, call (decoding under the call's operations schema), parse; outputs with no operation get
        one repair call; what still has none is kept raw in a flagged dimension. Pair labels count only
        when the call showed that pair. Intermediates go to intermediate/<step>.json."""
        prompts = [self.render(s.template, **s.variables) for s in steps]
        labels = [[p["label"] for p in s.variables.get("pairs", [])] for s in steps]
        constraints = [ops_constraint(s.base, lab, self.max_dimensions, self.cap, self.calls.sampling.max_tokens,
                                      self.seeds) for s, lab in zip(steps, labels)]
        outputs = self.text_calls([s.name for s in steps], prompts, constraints)
        parsed = [parse_output(o, self.seeds) for o in outputs]
        bad = [i for i, p in enumerate(parsed) if not p.structured]
        repaired_out: dict[int, str] = {}
        if bad:
            names = [f"{steps[i].name}.repair" for i in bad]
            repair_prompts = [self.render("guidance_repair", output=outputs[i][:4000]) for i in bad]
            for i, text in zip(bad, self.text_calls(names, repair_prompts, [constraints[i] for i in bad])):
                repaired_out[i] = text
                parsed[i] = parse_output(text, self.seeds)
        results = []
        for i, (s, p) in enumerate(zip(steps, parsed)):
            mem = s.base.copy()
            mem.cap, mem.max_dimensions = self.cap, self.max_dimensions
            flags = []
            stats = mem.apply(p.ops, {a.lower(): self.aliases[a.lower()] for a in labels[i]})
            stats.malformed += len(p.malformed)
            if i in repaired_out:
                flags.append("repaired" if p.structured else "unstructured")
            if not p.structured:
                mem.keep_raw(outputs[i], s.name, s.pair_ids)
            self.totals.add(stats)
            for f in flags:
                self.flag_counts[f] = self.flag_counts.get(f, 0) + 1
            res = StepResult(mem, p.structured, i in repaired_out and p.structured, stats, flags)
            results.append(res)
            atomic_write_text(self.store.path("intermediate", f"{s.name}.json"), json.dumps({
                "step": s.name, "template": s.template, "pair_ids": s.pair_ids, "output": outputs[i],
                "repair_output": repaired_out.get(i), "ops": [o.line for o in p.ops], "malformed": p.malformed,
                "schema": constraints[i].json_schema,
                "stats": stats.to_dict(), "flags": flags, "memory": mem.to_dict(),
            }, indent=2, ensure_ascii=False) + "\n")
        return results

    def pair_view(self, pairs: Sequence[dict]) -> list[dict]:
        return [{"label": p["label"], "post": p["post"], "answers": p["answers"]} for p in pairs]

    # ---- versions
    def propose(self, memory: Memory, label: str) -> bool:
        """Record a new version: drift score, gate verdict against the current version, history files."""
        n = len(self.versions) + 1
        meta = {"mode": self.mode, "version": n, "pairs": len(self.pairs)}
        md = to_markdown(memory, meta)
        d = drift.score(md)
        current = self.current_index()
        gate = None
        if self.gate is not None:
            gate = self.gate(memory, self.memories[current] if current is not None else None)
        accepted = gate["accepted"] if gate else True
        entry = {"version": n, "label": label, "score": d["score"], "drift": d,
                 "drifted": d["score"] > self.drift_threshold, "accepted": accepted, "gate": gate,
                 "rules": memory.n_rules(), "dimensions": len(memory.dimensions)}
        prev_md = ""
        if self.versions:
            prev_md = self.store.path("history", f"v{n - 1:03d}.md").read_text(encoding="utf-8")
        diff = "".join(difflib.unified_diff(prev_md.splitlines(True), md.splitlines(True),
                                            f"v{n - 1:03d}.md" if n > 1 else "/dev/null", f"v{n:03d}.md"))
        atomic_write_text(self.store.path("history", f"v{n:03d}.md"), md)
        atomic_write_text(self.store.path("history", f"v{n:03d}.json"),
                          json.dumps(to_json(memory, meta, self.lang), indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(self.store.path("history", f"v{n:03d}.diff"), diff)
        self.versions.append(entry)
        self.memories.append(memory.copy())
        atomic_write_text(self.store.path("history", "index.json"),
                          json.dumps(self.versions, indent=2, ensure_ascii=False) + "\n")
        best = self.current_index()
        atomic_write_text(self.store.path("drift.json"), json.dumps({
            "threshold": self.drift_threshold,
            "rounds": [{"round": v["version"], "version": v["version"], "label": v["label"], **v["drift"], "flagged": v["drifted"],
                        "accepted": v["accepted"]} for v in self.versions],
            "chosen": self.versions[best]["version"] if best is not None else None,
        }, indent=2, ensure_ascii=False) + "\n")
        status = "accepted" if accepted else "rejected by gate"
        self.console.print(f"  v{n:03d} {label}: {memory.n_rules()} rules, drift {d['score']:.3f}"
                           f"{' (flagged)' if entry['drifted'] else ''}, {status}")
        return accepted

    def current_index(self) -> int | None:
        return drift.best_round(self.versions, self.drift_threshold)

    def current(self) -> Memory:
        """The version to build on: best accepted, least drifted; empty before any."""
        i = self.current_index()
        if i is None:
            return Memory(cap=self.cap, max_dimensions=self.max_dimensions)
        return self.memories[i].copy()
