"""The ``pairs`` stage: every corpus prompt answered ``n`` times by the weak role and by the strong role.

Generation is cached per role in ``pairs/<role>_cache.jsonl``, keyed by hash(messages, model, sampling,
sample index), so a rerun generates only what is missing (and a changed sampling setting only for the
role it touches). The roles run one after the other, each engine freed before the next loads (one GPU).
``records.jsonl`` gets one record per prompt once both roles have all ``n`` samples, with the post's scene,
emotion and intent (eval reports by them). Requests that fail
for good are logged to ``errors.jsonl``; the stage still answers every other prompt and then fails with
a count, so the manifest never says complete while pairs are missing, and the rerun retries only those.
An openai role's requests and errors per endpoint (``base_url`` may list several) go into the manifest's
``endpoints``.
"""

from __future__ import annotations

import json
import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from toushi.engines import Completion, Structured, cache_model, flag_counts
from toushi.errors import ToushiError
from toushi.recipe import ModelSpec, Sampling
from toushi.runner import StageContext
from toushi.store import StageStore, atomic_write_text, stable_id
from toushi.templates import render_any, render_file

ROLES = ("weak", "strong")
LABELS = ("emotion", "intent")  # the corpus post's labels, carried on to eval (results by emotion and intent)


class PairsIncomplete(ToushiError, RuntimeError):
    """Some prompts have no complete pair after this run (see errors.jsonl); a rerun retries them."""


def task_prompt(post: str, lang: str, template=None, constraints: bool = True) -> str:
    """The user message both models get: the bare support task (or the recipe's template) for a post."""
    return render_any("support_task", lang, template, post=post, constraints=constraints)


def conversation(prompt: str, system: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return [*msgs, {"role": "user", "content": prompt}]


def sample_key(messages: list[dict], model: str, sampling: Sampling, k: int) -> str:
    """Cache key of sample k: the exact messages, the model and every sampling setting but n."""
    return stable_id(messages, model, sampling.model_dump(mode="json", exclude={"n"}), k)


def _role_setup(ctx: StageContext, role: str) -> tuple[ModelSpec, Sampling, str | None]:
    spec = ctx.recipe.models.weak if role == "weak" else ctx.recipe.models.strong
    if spec is None:
        raise ValueError(f"pairs: models.{role} is not set in the recipe")
    override = ctx.recipe.pairs.weak_sampling if role == "weak" else ctx.recipe.pairs.strong_sampling
    system = render_file(spec.system_prompt_file, lang=ctx.recipe.run.lang) if spec.system_prompt_file else None
    return spec, override or spec.sampling, system


def run_stage(ctx: StageContext) -> dict:
    cfg, lang = ctx.recipe.pairs, ctx.recipe.run.lang
    corpus = ctx.stage("corpus").records()
    if not corpus:
        raise ValueError(f"pairs: no corpus records in {ctx.stage('corpus').records_path} (run the corpus stage)")
    posts = [r for r in corpus if cfg.include_heldout or r.get("split") != "heldout"]
    prompts = {r["id"]: task_prompt(r["text"], r.get("lang") or lang, cfg.prompt_template, cfg.constraints) for r in posts}

    setups = {role: _role_setup(ctx, role) for role in ROLES}
    # wanted[role][post id] = the n sample keys
    wanted: dict[str, dict[str, list[str]]] = {}
    convs: dict[str, dict[str, list[dict]]] = {}
    for role, (spec, sampling, system) in setups.items():
        model = cache_model(spec)
        convs[role] = {pid: conversation(p, system) for pid, p in prompts.items()}
        wanted[role] = {
            pid: [sample_key(convs[role][pid], model, sampling, k) for k in range(sampling.n)] for pid in prompts
        }
    # the post's labels are part of the key: a relabelled corpus rewrites its records (from the caches)
    labels = {r["id"]: {k: r.get(k) for k in LABELS} for r in posts}
    pair_key = {pid: stable_id(wanted["weak"][pid], wanted["strong"][pid], labels[pid]) for pid in prompts}
    _drop_stale_records(ctx.store, pair_key)

    caches = {role: StageStore(ctx.store.dir, f"{role}_cache") for role in ROLES}
    counts: dict[str, int] = {"prompts": len(prompts)}
    failed: set[str] = set()
    endpoints: dict[str, dict] = {}  # role -> per-endpoint requests/errors of this run (openai roles)
    for role, (spec, sampling, system) in setups.items():
        have = caches[role].ids()
        todo = [pid for pid in prompts if not set(wanted[role][pid]) <= have]
        counts[f"{role}_generated"] = len(todo)
        if not todo:
            ctx.console.print(f"[dim]{role}: all {len(prompts)} prompts cached[/dim]")
            continue
        failed |= _generate_role(ctx, role, spec, sampling, todo, convs[role], wanted[role], caches[role],
                                 endpoints)
    ctx.store.write_manifest(endpoints=endpoints)  # written before a PairsIncomplete is raised, too

    written = _write_records(ctx, posts, prompts, pair_key, wanted, caches, setups)
    counts.update(pairs=len(ctx.store.ids()), written=written, failed=len(failed))
    records = ctx.store.records()
    for role in ROLES:
        counts.update(flag_counts((c for rec in records for c in rec[role]), role))
    if failed:
        raise PairsIncomplete(
            f"pairs: {len(failed)} of {len(prompts)} prompts failed (see {ctx.store.errors_path}); "
            "rerun to generate only those"
        )
    return counts


def _generate_role(ctx, role, spec, sampling, todo, convs, wanted, cache, endpoints) -> set[str]:
    """Generate every sample of the ``todo`` prompts for one role; returns the prompt ids that failed.
    An openai role's per-endpoint counts go into ``endpoints[role]``."""
    failed: set[str] = set()
    batch_size = ctx.recipe.pairs.batch_size
    constraint = Structured(regex=sampling.regex) if sampling.regex else None  # part of the cache key (sampling)
    ctx.console.print(f"{role}: loading {spec.name} ({spec.engine}) for {len(todo)} prompts")
    with ctx.engine(spec) as engine, Progress(
        TextColumn(f"[bold]{role}[/bold]"), BarColumn(), MofNCompleteColumn(), TextColumn("prompts"),
        TextColumn("{task.fields[tps]:.1f} out tok/s"), TimeElapsedColumn(), console=ctx.console,
    ) as bar:
        task = bar.add_task(role, total=len(todo), tps=0.0)
        t0, out_tokens = time.perf_counter(), 0
        with cache.writer(batch_size=max(1, batch_size)) as w:
            for start in range(0, len(todo), batch_size):
                ids = todo[start : start + batch_size]

                def on_error(i: int, exc: BaseException, ids=ids) -> None:
                    failed.add(ids[i])
                    ctx.store.log_error(
                        {"role": role, "id": ids[i], "model": spec.name, "error": f"{type(exc).__name__}: {exc}"}
                    )

                batch = [convs[pid] for pid in ids]
                if spec.engine == "openai":
                    results = engine.generate(batch, sampling, structured=constraint, on_error=on_error)
                    endpoints[role] = engine.endpoint_stats()
                else:
                    results = engine.generate(batch, sampling, structured=constraint)
                for pid, comps in zip(ids, results):
                    for key, c in zip(wanted[pid], comps):
                        w.write({"id": key, "post_id": pid, "completion": c.to_dict()})
                        out_tokens += c.completion_tokens
                w.flush()
                bar.update(task, advance=len(ids), tps=out_tokens / max(1e-9, time.perf_counter() - t0))
    return failed


def _cache_map(cache: StageStore) -> dict[str, dict]:
    return {r["id"]: r["completion"] for r in cache.records()}


def _write_records(ctx, posts, prompts, pair_key, wanted, caches, setups) -> int:
    """Append a pair record for every prompt whose weak and strong samples are all cached."""
    done = ctx.store.ids()
    cached = {role: _cache_map(caches[role]) for role in ROLES}
    written = 0
    with ctx.store.writer() as w:
        for r in posts:
            pid = r["id"]
            if pid in done or not all(k in cached[role] for role in ROLES for k in wanted[role][pid]):
                continue
            rec = {
                "id": pid,
                "lang": r.get("lang") or ctx.recipe.run.lang,
                "scene": r.get("scene"),
                **{k: r.get(k) for k in LABELS},
                "split": r.get("split"),
                "post": r["text"],
                "prompt": prompts[pid],
                "key": pair_key[pid],
            }
            for role in ROLES:
                rec[role] = [Completion.from_dict(cached[role][k]).to_dict() for k in wanted[role][pid]]
                rec[f"{role}_system"] = setups[role][2]
            rec["models"] = {role: setups[role][0].name for role in ROLES}
            rec["sampling"] = {role: setups[role][1].model_dump(mode="json") for role in ROLES}
            w.write(rec)
            written += 1
    return written


def _drop_stale_records(store: StageStore, pair_key: dict[str, str]) -> None:
    """Records made under other settings (or for prompts no longer wanted) are removed before resuming."""
    if not store.records_path.exists():
        return
    records = store.records()
    keep = [r for r in records if pair_key.get(r["id"]) == r.get("key")]
    if len(keep) != len(records) or len(records) != sum(1 for _ in open(store.records_path, encoding="utf-8")):
        atomic_write_text(store.records_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))
