"""The ``eval`` stage: compare every system a run produced on the held-out prompts.

Systems: ``weak`` and ``strong`` (pairs stage), ``guided`` (guided stage), ``student`` (the base student,
no adapter) and one per trained adapter under ``runs/<run>/<sft|dpo|grpo|distill|selftrain>/adapter/``. For each:

1. rule metrics per answer (``toushi.metrics``), aggregated with bootstrap 95% CIs;
2. held-out NLL of the strong answers under the base student and each adapter (transformers + PEFT);
3. pairwise judge against ``eval.reference`` (``toushi.eval.judge``): both orders, raw and length-controlled
   win rates;
4. the simulated seeker (``eval.simulate``, ``toushi.eval.simulate``): the change in a role-played poster's feeling
   after reading each system's comment;
5. the ladder (``toushi.eval.ladder``): each rung of weak -> guided -> sft -> dpo -> distill -> grpo -> selftrain ->
   strong against the rung before it, by the judge and by the seeker;
6. all of it again by the posts' emotion, intent and scene (``toushi.eval.strata``), with counts and a flag on
   cells too small to read.

Outputs in ``runs/<run>/eval/``: ``records.jsonl`` (one record per system x prompt: answer, the post's labels
and metrics), ``summary.json`` (everything the report draws), and caches that make a rerun do only what is
missing: ``students/`` (student generations, saved batch by batch with their finish reasons), ``nll/`` (per-answer NLL), ``judge/`` (judge calls), ``seeker/``
(seeker calls and the systems' replies in later turns).
"""

from __future__ import annotations

import json
import math
from contextlib import ExitStack
from pathlib import Path

from rich.progress import Progress

from toushi import metrics as M
from toushi.engines import Completion, cache_model, is_truncated
from toushi.engines.adapters import ADAPTER_STAGES, adapter_fingerprint, run_adapters
from toushi.errors import ToushiError
from toushi.eval.ladder import compare as ladder_compare
from toushi.eval.ladder import steps as ladder_steps
from toushi.recipe import ModelSpec, Sampling
from toushi.runner import StageContext
from toushi.store import StageStore, atomic_write_text, stable_id

# Report order: baselines first, then the students, the teacher last.
SYSTEM_ORDER = ("weak", "guided", "student", "sft", "dpo", "grpo", "distill", "selftrain", "strong")
RATE_METRICS = ("markdown", "empty", "refusal", "lang_match", "apology_open")
LABELS = ("scene", "emotion", "intent")  # the post's labels, on every eval record (results by label)


class EvalError(ToushiError, RuntimeError):
    """Eval cannot run (e.g. no held-out prompts); the message says which stage output is missing."""


# --------------------------------------------------------------------------------------- inputs


def heldout_prompts(pairs: list[dict], max_prompts: int | None) -> list[dict]:
    """Held-out pairs records, in a stable order (by id), capped at max_prompts."""
    held = sorted((r for r in pairs if r.get("split") == "heldout"), key=lambda r: r["id"])
    return held[:max_prompts] if max_prompts else held


def first_text(completions: list[dict] | None) -> str | None:
    """The first completion's answer text (None when the record has none)."""
    return (completions[0].get("text") or "") if completions else None


def user_conversation(prompt: str) -> list[dict]:
    """The student sees the same user message the training set used (no system prompt)."""
    return [{"role": "user", "content": prompt}]


# --------------------------------------------------------------------------------------- students


def generate_students(ctx, spec: ModelSpec, adapters: dict[str, Path], todo: list[tuple[str, list[dict]]],
                      sampling: Sampling, store: StageStore, batch_size: int = 128, meta: list[dict] | None = None,
                      ) -> tuple[list[Completion], str]:
    """Answer each ``(system, conversation)`` of ``todo`` (system "student": the base, else an adapter's name)
    through the call layer (toushi/calls.py: cached in ``store`` by model, adapter content, sampling and
    conversation, each batch flushed, so a kill loses at most one batch). Returns the first completion of
    each and the engine used.

    One engine serves the base and every adapter (``lora_name`` per request, so the adapters share decode
    steps): the run's shared engine under `toushi run`, else a new one. If vLLM with LoRA fails (LoRA support
    varies on CPU builds), the transformers engine with PEFT answers instead (its own cache keys: another
    engine, other answers).
    """
    from toushi.calls import Calls
    from toushi.engines import make_engine

    lora = {"enable_lora": bool(adapters), "lora_adapters": {n: str(p) for n, p in adapters.items()}}
    fps = {n: adapter_fingerprint(p) for n, p in adapters.items()}
    convs = [c for _, c in todo]
    names = [None if n == "student" else n for n, _ in todo]

    def answer(calls: Calls) -> list[Completion]:
        with calls:
            return [c[0] for c in calls.generate(convs, lora=names, meta=meta)]

    served = spec.model_copy(update=lora)
    try:
        return answer(ctx.calls("student", served, sampling, store=store, adapters=fps,
                                        batch_size=batch_size, label="students")), spec.engine
    except Exception as e:  # noqa: BLE001 - any vLLM LoRA failure gets the fallback, with the reason shown
        if not adapters or spec.engine != "vllm":
            raise
        ctx.console.print(f"[yellow]eval: vLLM with LoRA failed ({type(e).__name__}: {e}); "
                          "falling back to the transformers engine with PEFT[/yellow]")
    hf = spec.model_copy(update={**lora, "engine": "hf"})
    calls = Calls(store, cache_model(hf), lambda: make_engine(hf), sampling, kind="student", adapters=fps,
                  batch_size=batch_size, console=ctx.console, label="students")
    return answer(calls), "hf+peft (vLLM LoRA failed)"


def _load_student(spec: ModelSpec, adapters: dict[str, Path]):
    """(model, tokenizer): the base student with every adapter loaded (PEFT), in eval mode."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toushi.models import resolve_model

    path = resolve_model(spec.name)
    dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}.get(spec.dtype, torch.float32)
    tok = AutoTokenizer.from_pretrained(path)
    if not tok.chat_template:  # training may have given the student a template; the adapter dir keeps it
        for d in adapters.values():
            if (d / "tokenizer_config.json").exists():
                tok = AutoTokenizer.from_pretrained(d)
                break
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    names = list(adapters)
    if names:
        model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(adapters[name]), adapter_name=name)
    model.eval()
    return model, tok


def _use(model, name: str | None):
    """Context manager selecting an adapter (None / "student": the base model with adapters off)."""
    import contextlib

    if name in (None, "student"):
        return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    model.set_adapter(name)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------- NLL


def answer_nll(model, tok, conv: list[dict], answer: str) -> tuple[float, int]:
    """(summed NLL, token count) of ``answer`` as the assistant turn after ``conv``, under the model's
    chat template; only the answer's tokens (and the template's end-of-turn) are scored."""
    import torch

    prompt = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template(conv + [{"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt):
        raise EvalError("the student's chat template renders the prompt differently with an answer appended; "
                        "cannot locate the answer tokens for NLL")
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    a_ids = tok(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + a_ids])
    labels = torch.tensor([[-100] * len(p_ids) + a_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )
    return float(loss), len(a_ids)


def heldout_nll(
    spec: ModelSpec, adapters: dict[str, Path], items: list[dict], store: StageStore, progress: Progress | None = None
) -> list[dict]:
    """Per-token NLL of each item's reference answer under the base student and each adapter.

    items: {"prompt_id", "prompt", "answer"}. Cached in ``store`` by (model, adapter weights, prompt,
    answer); returns records {"id", "system", "prompt_id", "nll_sum", "tokens", "nll"}.
    """
    fps = {name: adapter_fingerprint(p) for name, p in adapters.items()}
    fps["student"] = "base"
    wanted = []
    for name in ["student", *adapters]:
        for it in items:
            rid = stable_id("nll", cache_model(spec), fps[name], it["prompt"], it["answer"])
            wanted.append((rid, name, it))
    done = store.ids()
    todo = [w for w in wanted if w[0] not in done]
    if todo:
        model, tok = _load_student(spec, adapters)
        task = progress.add_task("held-out NLL", total=len(todo)) if progress else None
        with store.writer(batch_size=8) as w:
            for rid, name, it in todo:
                with _use(model, name):
                    s, n = answer_nll(model, tok, user_conversation(it["prompt"]), it["answer"])
                w.write({"id": rid, "system": name, "prompt_id": it["prompt_id"], "nll_sum": s, "tokens": n,
                         "nll": s / n if n else None})
                if progress:
                    progress.advance(task)
        del model
    by_id = {r["id"]: r for r in store.records()}
    # The same (prompt, answer) may be wanted under several systems' ids: relabel from `wanted`.
    return [{**by_id[rid], "system": name, "prompt_id": it["prompt_id"]} for rid, name, it in wanted]


# --------------------------------------------------------------------------------------- metrics


def answer_metrics(post: str, text: str) -> dict:
    """Rule metrics of one answer (per-answer values; rates are 0/1 here and averaged later)."""
    lm = M.lang_match(post, text)
    return {
        "chars": len(text),
        "tokens": len(M.tokens(text)),
        "markdown": float(M.has_markdown(text)),
        "markdown_count": M.markdown_count(text),
        "distinct_1": M.distinct_n(text, 1),
        "distinct_2": M.distinct_n(text, 2),
        "repetition_4": M.repetition_ratio(text, 4),
        "jargon": M.jargon_score(text)["score"],
        "lang_match": None if lm is None else float(lm),
        "empty": float(M.is_empty(text)),
        "refusal": float(M.is_refusal(text)),
        "apology_open": float(M.apology_open(text)),
    }


METRIC_NAMES = ("chars", "tokens", "markdown", "markdown_count", "distinct_1", "distinct_2", "repetition_4",
                "jargon", "lang_match", "empty", "refusal", "apology_open", "embed_sim")


def summarise(answers: list[dict], nll: list[dict], judge: dict | None, n_boot: int, seed: int,
              seeker: dict | None = None, facets: tuple[str, ...] | list[str] = ("emotion", "intent", "scene"),
              min_posts: int = 5, ladder: bool = True) -> dict:
    """Aggregate per-answer records into the summary the report draws (pure: no models, no files): metrics,
    NLL, the judge and seeker blocks as given, the ladder (rung-to-rung comparisons from the judge's
    ``ladder_pairs`` and the seeker's items) and the strata (all of it by each facet of the posts)."""
    from toushi.eval.strata import stratify
    from toushi.stats import bootstrap_ci

    systems = sorted({a["system"] for a in answers} | {r["system"] for r in nll},
                     key=lambda s: (SYSTEM_ORDER.index(s) if s in SYSTEM_ORDER else len(SYSTEM_ORDER), s))
    metrics = {}
    for s in systems:
        rows = [a["metrics"] for a in answers if a["system"] == s]
        if rows:
            metrics[s] = {m: bootstrap_ci([r.get(m) for r in rows], n_boot=n_boot, seed=seed) for m in METRIC_NAMES}
    nll_out = {}
    for s in systems:
        rows = [r for r in nll if r["system"] == s and r["tokens"]]
        if rows:
            ci = bootstrap_ci([r["nll"] for r in rows], n_boot=n_boot, seed=seed)
            tok_mean = sum(r["nll_sum"] for r in rows) / sum(r["tokens"] for r in rows)
            nll_out[s] = {**ci, "token_mean": tok_mean, "perplexity": math.exp(tok_mean),
                          "tokens": sum(r["tokens"] for r in rows)}
    seeker_items = (seeker or {}).get("items")
    strata = stratify(answers, systems, METRIC_NAMES, judge_pairs=(judge or {}).get("pairs"), seeker_items=seeker_items,
                      facets=facets, min_posts=min_posts, n_boot=n_boot, seed=seed)
    ladder_block = (ladder_compare(systems, (judge or {}).get("ladder_pairs"), seeker_items, n_boot=n_boot, seed=seed,
                                   min_posts=min_posts) if ladder else None)
    return {"systems": systems, "metric_names": list(METRIC_NAMES), "metrics": metrics, "nll": nll_out,
            "judge": judge, "seeker": seeker, "ladder": ladder_block, "strata": strata}


def truncation(records: list[dict]) -> dict:
    """Per system: answers, how many were truncated (stopped at max_tokens or inside their reasoning) and the
    rate. A truncated answer is judged as it is, so a system that runs out of tokens shows it here."""
    out: dict[str, dict] = {}
    for rec in records:
        v = out.setdefault(rec["system"], {"answers": 0, "truncated": 0})
        v["answers"] += 1
        v["truncated"] += bool(rec.get("truncated"))
    return {s: {**v, "rate": round(v["truncated"] / v["answers"], 4)} for s, v in out.items()}


# --------------------------------------------------------------------------------------- stage


def run_stage(ctx: StageContext) -> dict:
    r, cfg, console = ctx.recipe, ctx.recipe.eval, ctx.console
    run_dir = ctx.run_dir
    notes: list[str] = []
    prompts = heldout_prompts(ctx.stage("pairs").records(), cfg.max_prompts)
    if not prompts:
        raise EvalError(f"{ctx.stage('pairs').records_path}: no held-out prompts (split == 'heldout'); "
                        "run the pairs stage with pairs.include_heldout: true and corpus.heldout_fraction > 0")
    ids = [p["id"] for p in prompts]
    convs = [user_conversation(p["prompt"]) for p in prompts]
    answers: dict[str, list[str | None]] = {}
    completions: dict[str, list[dict | None]] = {}  # the answers' completion records: finish_reason, flags
    for role in ("weak", "strong"):
        if role in cfg.systems:
            answers[role] = [first_text(p.get(role)) for p in prompts]
            completions[role] = [(p.get(role) or [None])[0] for p in prompts]
    if "guided" in cfg.systems:
        guided = {g["id"]: g for g in ctx.stage("guided").records(ids)}
        if guided:
            answers["guided"] = [first_text(guided[i].get("guided")) if i in guided else None for i in ids]
            completions["guided"] = [((guided.get(i) or {}).get("guided") or [None])[0] for i in ids]
        else:
            notes.append("guided: no guided stage output, skipped")

    # ---- students: base + adapters, generated once and cached by (model, adapter weights, prompt, sampling)
    spec = r.models.student
    adapters = run_adapters(run_dir, cfg.systems)  # complete ones only: a half-written adapter never counts
    for name in ADAPTER_STAGES:
        if name in cfg.systems and name not in adapters:
            notes.append(f"{name}: no complete adapter at {run_dir / name / 'adapter'}, skipped")
    students = ([n for n in ("student",) if n in cfg.systems] + list(adapters)) if spec else []
    if spec is None and ("student" in cfg.systems or adapters):
        notes.append("students: models.student is not set, skipped")
    sstore = StageStore(ctx.store.dir, "students")
    sampling = cfg.sampling.model_copy(update={"n": 1})
    generated = 0
    if students:
        todo = [(n, i) for n in students for i in range(len(convs))]
        new = len(sstore.ids())
        comps, engine_used = generate_students(ctx, spec, adapters, [(n, convs[i]) for n, i in todo], sampling, sstore,
                                               cfg.batch_size, meta=[{"system": n, "prompt_id": ids[i]} for n, i in todo])
        generated = len(sstore.ids()) - new
        if generated and engine_used != spec.engine:
            notes.append(f"students generated with {engine_used}")
        for n in students:
            got = [c for (m, _), c in zip(todo, comps) if m == n]
            answers[n] = [c.text for c in got]
            completions[n] = [c.to_dict() for c in got]

    # ---- per-answer records with rule metrics (+ embedding similarity to the strong answer)
    strong = answers.get("strong") or [first_text(p.get("strong")) for p in prompts]
    sims: dict[str, list[float | None]] = {}
    if cfg.embeddings:
        try:
            embedder = M.load_embedder()
        except M.EmbeddingUnavailable as e:
            notes.append(str(e))
            console.print(f"[yellow]eval: {e}[/yellow]")
        else:
            for s, texts in answers.items():
                if s == "strong":
                    continue
                idx = [i for i, t in enumerate(texts) if t is not None and strong[i]]
                vals = M.embedding_similarity([texts[i] for i in idx], [strong[i] for i in idx], embedder)
                sims[s] = [None] * len(texts)
                for i, v in zip(idx, vals):
                    sims[s][i] = v
    records = []
    for s, texts in answers.items():
        for i, (p, t) in enumerate(zip(prompts, texts)):
            if t is None:
                continue
            m = answer_metrics(p["post"], t)
            m["embed_sim"] = sims[s][i] if s in sims else None
            comp = (completions.get(s) or [None] * len(prompts))[i] or {}
            records.append({"id": stable_id(s, p["id"]), "system": s, "prompt_id": p["id"], "lang": p.get("lang"),
                            **{k: p.get(k) for k in LABELS}, "post": p["post"], "text": t, "metrics": m,
                            "finish_reason": comp.get("finish_reason"), "truncated": is_truncated(comp)})
    # Per-answer metrics are cheap: rewrite the file whole, so it always matches this summary.
    atomic_write_text(ctx.store.records_path,
                      "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))

    # ---- held-out NLL of the strong answers under each student
    nll_records: list[dict] = []
    if spec is not None and students:
        items = [{"prompt_id": p["id"], "prompt": p["prompt"], "answer": t} for p, t in zip(prompts, strong) if t]
        with Progress(console=console, transient=True) as progress:
            nll_records = heldout_nll(spec, {n: adapters[n] for n in students if n in adapters}, items,
                                      StageStore(ctx.store.dir, "nll"), progress)
        if "student" not in students:
            nll_records = [x for x in nll_records if x["system"] != "student"]

    # ---- pairwise judge vs the reference system (its calls show their own progress, toushi/calls.py)
    judge_block = _judge(ctx, prompts, answers, notes) if cfg.judge else None

    # ---- the simulated seeker reads every system's comment
    seeker_block = _simulate(ctx, prompts, answers, adapters, notes) if cfg.simulate.enabled else None

    summary = summarise(records, nll_records, judge_block, cfg.bootstrap, r.run.seed, seeker=seeker_block,
                        facets=cfg.strata.facets, min_posts=cfg.strata.min_posts, ladder=cfg.ladder)
    from toushi.eval.strata import small_cells

    notes += small_cells(summary["strata"])
    summary.update(run=r.run.name, lang=r.run.lang, n_prompts=len(prompts), prompt_ids=ids, notes=notes,
                   student_model=spec.name if spec else None, truncation=truncation(records))
    atomic_write_text(ctx.store.path("summary.json"), json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    from toushi.tracking import log_eval_summary

    tracked = log_eval_summary(ctx.run_dir, ctx.store.path("summary.json"))
    if tracked:
        console.print(f"[dim]eval: summary attached to the mlflow runs of {', '.join(tracked)}[/dim]")
    for n in notes:
        console.print(f"[dim]eval: {n}[/dim]")
    counts = {"prompts": len(prompts), "systems": len(summary["systems"]), "answers": len(records),
              "nll": len(nll_records), "generated": generated,
              "truncated": {s: v["truncated"] for s, v in summary["truncation"].items()}}
    if judge_block:
        counts.update(judge_calls=judge_block["calls"], judge_invalid_calls=judge_block["invalid_calls"],
                      ladder_judge_calls=judge_block["ladder_calls"])
    if seeker_block:
        counts.update(seeker_calls=seeker_block["calls"], seeker_invalid_calls=seeker_block["invalid_calls"],
                      seeker_generated=seeker_block["generated"])
    return counts


def _judge(ctx: StageContext, prompts: list[dict], answers: dict, notes: list[str]) -> dict | None:
    from toushi.eval.judge import PairTask, aggregate, judge_dimensions, run_judge, win_rates

    r, cfg = ctx.recipe, ctx.recipe.eval
    spec = r.models.judge or r.models.strong
    if spec is None:
        notes.append("judge: neither models.judge nor models.strong is set, skipped")
        return None
    ref = cfg.reference
    if ref not in answers:
        notes.append(f"judge: reference system {ref!r} has no answers, skipped")
        return None
    dims = judge_dimensions(r.run.lang, ctx.run_dir)
    own = self_judged(r, spec, list(answers))
    if own:
        notes.append(f"judge: {spec.name} also wrote the answers of {', '.join(own)}: it judges its own answers"
                     + ("" if r.models.judge else " (models.judge is not set, so the strong model judges)"))

    def pair_tasks(system: str, reference: str, need_dims: bool = True) -> list[PairTask]:
        return [PairTask(prompt_id=p["id"], lang=r.run.lang, post=p["post"], system=system, text=answers[system][i],
                         reference=reference, ref_text=answers[reference][i], need_dims=need_dims)
                for i, p in enumerate(prompts) if answers[system][i] is not None and answers[reference][i] is not None]

    tasks = [t for s in answers if s != ref for t in pair_tasks(s, ref)]
    # the ladder: each rung against the rung before it. It reads only the overall outcome, so in logprob mode
    # its pairs get the one-token choice call and no per-dimension JSON (the costly part of a judge call).
    # In generate mode a step whose previous rung is the reference repeats a main pair: same calls, made once.
    ladder_tasks = ([t for prev, cur in ladder_steps(list(answers)) for t in pair_tasks(cur, prev, need_dims=False)]
                    if cfg.ladder else [])
    every = tasks + ladder_tasks
    sampling = (cfg.judge_sampling or spec.sampling).model_copy(update={"n": 1})
    store = StageStore(ctx.store.dir, "judge")
    mode = cfg.judge_mode
    with ExitStack() as stack:  # the engine opens only when some call is not cached (a vLLM start: a minute on CPU)
        calls = run_judge(lambda: stack.enter_context(ctx.engine(spec)), every, store, dims, sampling,
                          cache_model(spec), mode=mode)
    calls, ladder_calls = calls[: 2 * len(tasks)], calls[2 * len(tasks) :]  # two calls per task, in task order
    pairs = aggregate(tasks, calls, dims)
    return {
        "model": spec.name, "mode": mode, "reference": ref, "dimensions": [d["name"] for d in dims],
        "self_judged": own,
        "calls": len(calls), "invalid_calls": sum(1 for c in calls if not c["valid"]),
        "retried_calls": sum(1 for c in calls if c.get("retry_raw") is not None),
        "systems": win_rates(pairs, dims, n_boot=cfg.bootstrap, seed=r.run.seed),
        "pairs": pairs,
        "ladder_calls": len(ladder_calls), "ladder_invalid_calls": sum(1 for c in ladder_calls if not c["valid"]),
        "ladder_pairs": aggregate(ladder_tasks, ladder_calls, dims),
    }


def self_judged(recipe, judge: ModelSpec, systems: list[str]) -> list[str]:
    """The systems whose answers the judge's own model wrote (weak, guided: the weak model; strong; the base
    student): a judge that is also under test favours itself, and the report must say so."""
    m = recipe.models
    wrote = {"weak": m.weak, "guided": m.weak, "strong": m.strong, "student": m.student}
    return [s for s in systems if wrote.get(s) is not None and wrote[s].name == judge.name]


def _simulate(ctx: StageContext, prompts: list[dict], answers: dict, adapters: dict[str, Path],
              notes: list[str]) -> dict | None:
    """The simulated seeker over the first ``simulate.max_posts`` held-out prompts, every system with answers."""
    from toushi.corpus.tagging import label_set
    from toushi.eval.simulate import make_card, run_seeker, seeker_summary

    r, cfg = ctx.recipe, ctx.recipe.eval.simulate
    spec = r.models.strong if cfg.role == "strong" else (r.models.judge or r.models.strong)
    if spec is None:
        notes.append(f"simulate: models.{cfg.role} is not set (nor models.strong), skipped")
        return None
    chosen = prompts[: cfg.max_posts] if cfg.max_posts else prompts
    sets = {lang: label_set(lang, r.corpus.tagging.labels_file) for lang in {p.get("lang") or r.run.lang for p in chosen}}
    cards = [make_card(p, r.run.lang, sets[p.get("lang") or r.run.lang]) for p in chosen]
    shown = {s: list(texts[: len(chosen)]) for s, texts in answers.items()}
    store = StageStore(ctx.store.dir, "seeker")
    with ExitStack() as stack:
        opened: dict[str, object] = {}

        def engine_of(s: ModelSpec):
            key = stable_id(s.model_dump(mode="json"))
            if key not in opened:  # the run's shared engine (closing it frees nothing), else one for this stage
                opened[key] = stack.enter_context(ctx.engine(s))
            return opened[key]

        responders = None
        if cfg.turns > 1:
            responders = _responders(ctx, chosen, adapters, engine_of, store)
            for s in [s for s in shown if s not in responders]:
                notes.append(f"simulate: {s} has no model to answer the seeker with (turns > 1), skipped")
                del shown[s]
        res = run_seeker(lambda: engine_of(spec), cards, shown, store, model=cache_model(spec), sampling=cfg.sampling,
                         turns=cfg.turns, reply_sampling=cfg.reply_sampling, responders=responders,
                         feeling_template=cfg.feeling_template, reply_template=cfg.reply_template)
    if res["invalid_calls"]:
        notes.append(f"simulate: {res['invalid_calls']} of {res['calls']} seeker answers had no score in 0..100 "
                     "(those simulations are counted as invalid, not scored)")
    return {"model": spec.name, "role": cfg.role, "turns": cfg.turns, "posts": len(cards),
            "calls": res["calls"], "invalid_calls": res["invalid_calls"], "generated": res["generated"],
            "systems": seeker_summary(res["items"], n_boot=r.eval.bootstrap, seed=r.run.seed),
            "before": res["before"], "items": res["items"]}


def _responders(ctx: StageContext, prompts: list[dict], adapters: dict[str, Path], engine_of,
                store: StageStore) -> dict:
    """How each system answers the seeker in later turns: the model, adapter, system prompt and sampling it
    answered the post with (weak/strong: the pairs' roles; guided: the weak role with its guidance prompt;
    student and adapters: the student with eval's sampling)."""
    from toushi.calls import Calls
    from toushi.eval.simulate import Responder

    r = ctx.recipe
    by_id = {p["id"]: p for p in prompts}
    guided = {g["id"]: g for g in ctx.stage("guided").records(list(by_id))}

    def responder(spec: ModelSpec | None, sampling: Sampling, system_of, lora: str | None = None) -> Responder | None:
        if spec is None:
            return None
        calls = Calls(store, cache_model(spec), lambda: engine_of(spec), sampling.model_copy(update={"n": 1}),
                      kind="seeker-respond", adapters={n: adapter_fingerprint(p) for n, p in adapters.items()},
                      console=ctx.console, label="seeker's commenters")

        def conversation(pid: str, chat: list[dict]) -> list[dict]:
            system = system_of(pid)
            return ([{"role": "system", "content": system}] if system else []) + chat

        return Responder(calls, conversation, lora)

    weak, strong, student = r.models.weak, r.models.strong, r.models.student
    out = {
        "weak": responder(weak, r.pairs.weak_sampling or (weak.sampling if weak else Sampling()),
                          lambda pid: by_id[pid].get("weak_system")),
        "strong": responder(strong, r.pairs.strong_sampling or (strong.sampling if strong else Sampling()),
                            lambda pid: by_id[pid].get("strong_system")),
        "guided": responder(weak, r.guided.sampling or (weak.sampling if weak else Sampling()),
                            lambda pid: (guided.get(pid) or {}).get("system")),
    }
    if student is not None:
        with_lora = student.model_copy(update={"enable_lora": bool(adapters), "lora_adapters": dict(adapters)})
        out["student"] = responder(with_lora, r.eval.sampling, lambda pid: None)
        for name in adapters:
            out[name] = responder(with_lora, r.eval.sampling, lambda pid: None, lora=name)
    return {k: v for k, v in out.items() if v is not None}
