"""The ``pairs`` stage: every corpus prompt answered ``n`` times by the weak role and by the strong role.

Generation goes through toushi/calls.py, cached per role in ``pairs/<role>_cache/``, keyed by the messages,
the model, the sampling (constraint included) and the sample index, so a rerun generates only what is missing (and a changed sampling setting only for the
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

from toushi.engines import Completion, Structured, flag_counts
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
    calls = {role: ctx.calls(role, spec, sampling, store=StageStore(ctx.store.dir, f"{role}_cache"),
                             batch_size=cfg.batch_size) for role, (spec, sampling, _) in setups.items()}
    # wanted[role][post id] = the n sample keys
    wanted: dict[str, dict[str, list[str]]] = {}
    convs: dict[str, dict[str, list[dict]]] = {}
    for role, (spec, sampling, system) in setups.items():
        convs[role] = {pid: conversation(p, system) for pid, p in prompts.items()}
        wanted[role] = {pid: [calls[role].key(convs[role][pid], structured=_constraint(sampling), k=k)
                              for k in range(sampling.n)] for pid in prompts}
    # the post's labels are part of the key: a relabelled corpus rewrites its records (from the caches)
    labels = {r["id"]: {k: r.get(k) for k in LABELS} for r in posts}
    pair_key = {pid: stable_id(wanted["weak"][pid], wanted["strong"][pid], labels[pid]) for pid in prompts}
    _drop_stale_records(ctx.store, pair_key)

    counts: dict[str, int] = {"prompts": len(prompts)}
    failed: set[str] = set()
    endpoints: dict[str, dict] = {}  # role -> per-endpoint requests/errors of this run (openai roles)
    for role, (spec, sampling, _) in setups.items():
        have = calls[role].records()
        todo = [pid for pid in prompts if not all(k in have for k in wanted[role][pid])]
        counts[f"{role}_generated"] = len(todo)
        if not todo:
            ctx.console.print(f"[dim]{role}: all {len(prompts)} prompts cached[/dim]")
            continue
        ctx.console.print(f"{role}: loading {spec.name} ({spec.engine}) for {len(todo)} prompts")

        def on_error(i: int, exc: BaseException, role=role, todo=todo, spec=spec) -> None:
            failed.add(todo[i])
            ctx.store.log_error({"role": role, "id": todo[i], "model": spec.name,
                                 "error": f"{type(exc).__name__}: {exc}"})

        with calls[role] as c:
            c.generate([convs[role][pid] for pid in todo], structured=_constraint(sampling),
                       meta=[{"post_id": pid} for pid in todo], on_error=on_error if spec.engine == "openai" else None)
            if spec.engine == "openai":
                endpoints[role] = c.engine.endpoint_stats()
    ctx.store.write_manifest(endpoints=endpoints)  # written before a PairsIncomplete is raised, too

    written = _write_records(ctx, posts, prompts, pair_key, wanted, {role: c.records() for role, c in calls.items()},
                             setups)
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


def _constraint(sampling: Sampling) -> Structured | None:
    return Structured(regex=sampling.regex) if sampling.regex else None


def _write_records(ctx, posts, prompts, pair_key, wanted, cached, setups) -> int:
    """Append a pair record for every prompt whose weak and strong samples are all cached (``cached``: role ->
    the role's calls by key)."""
    done = ctx.store.ids()
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
                rec[role] = [Completion.from_dict(cached[role][k]["completion"]).to_dict() for k in wanted[role][pid]]
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
