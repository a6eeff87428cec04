"""Guidance stage: the strong model contrasts weak and strong answers to the same posts and writes, as
rules under named dimensions, what makes the strong answers better; the weak model later answers with
that guidance as its system prompt (``toushi.guided``).

Outputs in ``runs/<run>/guidance/``: guidance.md, guidance.json, system_prompt.txt, labels.json (the
A/B order of each pair when labels are blind), prompts/ and intermediate/ (every call's prompt, raw
output, operations and resulting memory), drift.json, history/ (every version with a diff from the one
before, and index.json with drift and gate results), gate/ (judge calls of the acceptance gate), and
records.jsonl (the call cache that makes a rerun after a crash repeat no finished call).
"""

from __future__ import annotations

import difflib
import json
import shutil
import time
from pathlib import Path

from toushi.calls import Calls
from toushi.engines import cache_model, is_truncated
from toushi.engines.pool import EnginePool
from toushi.eval.judge import rubric
from toushi.guidance.render import load_guidance, read_guidance_file, system_prompt, to_json, to_markdown
from toushi.store import StageStore, atomic_write_text, stable_id

__all__ = ["build_pairs", "load_guidance", "run_stage"]


def build_pairs(records: list[dict], blind: bool, seed: int) -> tuple[list[dict], int]:
    """Pairs records (train split) -> analysis pairs with short labels (p1, p2, ...) and the two answers
    in a stable random order (blind) or as weak then strong (named). Returns (pairs, skipped) where
    skipped counts records with an empty or truncated weak or strong answer (a cut-off answer is no worked
    example, and a contrast with one is about length, not skill)."""
    pairs, skipped = [], 0
    for rec in records:
        if rec.get("split", "train") != "train":
            continue
        first = [(rec.get(role) or [{}])[0] for role in ("weak", "strong")]
        weak, strong = ((c.get("text") or "").strip() for c in first)
        if not weak or not strong or any(is_truncated(c) for c in first):
            skipped += 1
            continue
        label = f"p{len(pairs) + 1}"
        if blind:
            strong_first = int(stable_id("blind", seed, rec["id"]), 16) % 2 == 0
            roles = ["strong", "weak"] if strong_first else ["weak", "strong"]
            answers = [{"label": ab, "role": role, "text": strong if role == "strong" else weak}
                       for ab, role in zip("AB", roles)]
        else:
            answers = [{"label": "weak", "role": "weak", "text": weak},
                       {"label": "strong", "role": "strong", "text": strong}]
        pairs.append({"id": rec["id"], "label": label, "lang": rec.get("lang"), "scene": rec.get("scene"),
                      "post": rec.get("post") or "", "prompt": rec.get("prompt") or "", "answers": answers,
                      "strong": strong, "weak": weak, "flags": []})
    return pairs, skipped


def _local_path(spec) -> str | None:
    """A local model directory for the tokenizer (None for a remote model we cannot load)."""
    from toushi.models import ModelError, resolve_model

    try:
        return resolve_model(spec.name)
    except ModelError:
        return None


def _make_gate(ctx, pool, dev: list[dict]):
    """gate(new_memory, old_memory | None) -> decision dict, using the weak role to answer the dev prompts
    and the judge role to compare (both cached)."""
    from toushi.guidance.gate import decide, judge_outcomes
    r = ctx.recipe
    weak, judge = r.models.weak, r.models.judge
    sampling = (r.guided.sampling or weak.sampling).model_copy(update={"n": 1})
    weak_calls = Calls(ctx.store, cache_model(weak), lambda: pool.get(weak), sampling, kind="gate-answer")
    gate_store = StageStore(ctx.store.dir, "gate")

    def answers(memory) -> list[str]:
        sp = system_prompt(memory, r.run.lang) if memory is not None else None
        convs = [([{"role": "system", "content": sp}] if sp else []) + [{"role": "user", "content": p["prompt"]}]
                 for p in dev]
        return weak_calls.texts(convs, meta=[{"step": f"gate-answer-{p['label']}"} for p in dev])

    def gate(new, old) -> dict:
        outcomes = judge_outcomes(lambda: pool.get(judge), gate_store, cache_model(judge), judge.sampling, r.run.lang, None,
                                  [p["id"] for p in dev], [p["post"] for p in dev], answers(new), answers(old),
                                  mode=r.eval.judge_mode)
        return decide(outcomes, margin=r.guidance.accept_margin, n_boot=r.eval.bootstrap, seed=r.run.seed)

    return gate


def run_stage(ctx) -> dict:
    r, cfg = ctx.recipe, ctx.recipe.guidance
    if cfg.edited_file:
        return _use_edited(ctx, Path(cfg.edited_file))
    from toushi.guidance.modes import MODES
    from toushi.guidance.packing import token_counter
    from toushi.guidance.session import Session

    if r.models.strong is None:
        raise ValueError("guidance: models.strong is not set (the strong role writes the analysis)")
    gate_on = cfg.accept_gate if cfg.accept_gate is not None else r.models.judge is not None
    if gate_on and (r.models.judge is None or r.models.weak is None):
        raise ValueError("guidance.accept_gate: true needs models.judge and models.weak")
    pairs_store = ctx.stage("pairs")
    records = pairs_store.records()
    if not records:
        raise ValueError(f"guidance: no pairs records in {pairs_store.records_path}; run the pairs stage first")
    pairs, skipped = build_pairs(records, cfg.blind_labels, r.run.seed)
    if not pairs:
        raise ValueError(f"guidance: no train pair with both answers complete in {pairs_store.records_path} "
                         f"({skipped} with an empty or truncated answer: raise the roles' sampling.max_tokens)")
    dev: list[dict] = []
    if gate_on:
        # dev prompts are set aside from the analysis so the gate does not reward memorised pairs
        from toushi.guidance.gate import draw_dev

        dev, pairs = draw_dev(pairs, cfg.dev_prompts, r.run.seed)
        if not pairs:
            raise ValueError(f"guidance: {len(dev)} train pairs, all taken as gate dev prompts; lower guidance.dev_prompts")
    if cfg.max_pairs:
        pairs = pairs[: cfg.max_pairs]

    spec = r.models.strong
    context = cfg.context_tokens or spec.max_model_len or 4096
    budget = context - cfg.sampling.max_tokens - 64  # 64: chat-template tokens around the prompt
    # one engine per model for the strong, weak and judge roles: the run's shared pool under `toushi run`
    own_pool = ctx.engines is None
    pool = EnginePool() if own_pool else ctx.engines
    store = ctx.store
    atomic_write_text(store.path("labels.json"), json.dumps(
        {p["id"]: {"label": p["label"], **{a["label"]: a["role"] for a in p["answers"]}} for p in pairs + dev},
        indent=2, ensure_ascii=False) + "\n")
    # a new extraction numbers its versions from 1; an earlier history is moved aside, never deleted
    if (store.dir / "history").exists():
        shutil.move(store.dir / "history", store.path("history_old", time.strftime("%Y%m%d-%H%M%S")))
    try:
        session = Session(
            store=store, lang=r.run.lang,
            calls=Calls(store, cache_model(spec), lambda: pool.get(spec), cfg.sampling.model_copy(update={"n": 1}),
                        kind="guidance"),
            pairs=pairs, blind=cfg.blind_labels, cap=cfg.max_rules_per_dimension,
            max_dimensions=cfg.max_dimensions, batch_size=cfg.batch_size,
            count_tokens=token_counter(_local_path(spec)), prompt_budget=budget,
            drift_threshold=cfg.drift_threshold, mode=cfg.mode,
            gate=_make_gate(ctx, pool, dev) if gate_on else None, console=ctx.console,
            seeds={d["name"]: d["definition"] for d in rubric(r.run.lang)[:cfg.seed_dimensions]},
        )
        ctx.console.print(f"guidance: {cfg.mode} over {len(pairs)} pairs (budget {budget} tokens/prompt)"
                          + (f", gate on {len(dev)} dev prompts" if dev else ""))
        MODES[cfg.mode](session, pairs)
    finally:
        if own_pool:
            pool.close()
    counts = finish(session, store, pairs, skipped, gate_on)
    return counts


def finish(session, store: StageStore, pairs: list[dict], skipped: int, gate_on: bool) -> dict:
    """Write the kept version as guidance.md / guidance.json / system_prompt.txt; return the counts."""
    from toushi.guidance.memory import Memory

    i = session.current_index()
    flags = []
    if i is None:
        memory = Memory(cap=session.cap, max_dimensions=session.max_dimensions)
        flags.append("every version was rejected by the acceptance gate: no guidance (weak model unchanged)")
        version = None
    else:
        memory = session.memories[i]
        version = session.versions[i]["version"]
        if session.versions[i]["drifted"]:
            flags.append(f"drift: every round scored above the threshold; kept the least drifted (v{version:03d})")
    if any("unstructured" in d.flags for d in memory.dimensions):
        flags.append("some model output did not follow the operation format and is kept raw under "
                     "'Unstructured notes' (not used in the system prompt)")
    meta = {"mode": session.mode, "version": version, "pairs": len(pairs), "flags": flags, "hand_edited": False,
            "labels": "blind" if session.blind else "named", "versions": len(session.versions),
            "stats": session.totals.to_dict(), "flag_counts": dict(session.flag_counts)}
    write_outputs(store, memory, meta, session.lang)
    accepted = sum(v["accepted"] for v in session.versions)
    store.write_manifest(hand_edited=False, edited_file=None)
    return {"pairs": len(pairs), "skipped_pairs": skipped, "versions": len(session.versions),
            "accepted": accepted, "rejected": len(session.versions) - accepted, "kept_version": version,
            "dimensions": len(memory.dimensions), "rules": memory.n_rules(),
            "calls": session.calls.stats.new, "cached_calls": session.calls.stats.cached,
            "malformed_ops": session.totals.malformed, "unknown_pair_ids": session.totals.unknown_pairs,
            "pruned_rules": session.totals.pruned, "unstructured": session.flag_counts.get("unstructured", 0),
            "repaired": session.flag_counts.get("repaired", 0), "gate": gate_on}


def write_outputs(store: StageStore, memory, meta: dict, lang: str, md: bool = True) -> None:
    if md:
        atomic_write_text(store.path("guidance.md"), to_markdown(memory, meta))
    data = to_json(memory, meta, lang)
    atomic_write_text(store.path("guidance.json"), json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(store.path("system_prompt.txt"), data["system_prompt"] + "\n")


def _use_edited(ctx, path: Path) -> dict:
    """A hand-edited guidance.md/.json replaces extraction; the manifest says so. The edit is recorded in
    history/ as a new version with a diff from the last one."""
    memory, meta = read_guidance_file(path)
    store = ctx.store
    lang = meta.get("lang") or ctx.recipe.run.lang
    hist = store.dir / "history"
    index = json.loads((hist / "index.json").read_text("utf-8")) if (hist / "index.json").exists() else []
    n = len(index) + 1
    meta = {**{k: v for k, v in meta.items() if k != "lang"}, "version": n, "hand_edited": True,
            "edited_file": str(path)}
    md = to_markdown(memory, meta)
    prev = hist / f"v{n - 1:03d}.md"
    prev_md = prev.read_text("utf-8") if prev.exists() else ""
    atomic_write_text(store.path("history", f"v{n:03d}.md"), md)
    atomic_write_text(store.path("history", f"v{n:03d}.diff"), "".join(
        difflib.unified_diff(prev_md.splitlines(True), md.splitlines(True), prev.name if prev_md else "/dev/null",
                             f"v{n:03d}.md")))
    index.append({"version": n, "label": "hand-edit", "accepted": True, "edited_file": str(path)})
    atomic_write_text(hist / "index.json", json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    # the user's own file is never overwritten, even when it is this stage's guidance.md
    same_md = path.resolve() == store.path("guidance.md").resolve()
    write_outputs(store, memory, meta, lang, md=not same_md)
    store.write_manifest(hand_edited=True, edited_file=str(path))
    return {"hand_edited": True, "dimensions": len(memory.dimensions), "rules": memory.n_rules()}
