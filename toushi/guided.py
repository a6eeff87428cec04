"""The ``guided`` stage: the weak model answers the same prompts with the run's guidance as its system
prompt (optionally with the strong answers to the k most similar train posts as examples).

Records mirror the pairs stage's (same ids, prompts and completion shape) so eval and the training sets
can compare and combine them: ``{id, lang, scene, split, post, prompt, system, examples, guided: [...],
model, sampling, key}``. ``key`` hashes the keys of its model calls (toushi/calls.py, cached in ``calls/``), so
a rerun skips done prompts and a changed guidance or model regenerates everything.
"""

from __future__ import annotations

import numpy as np

from toushi.engines import flag_counts, is_truncated
from toushi.guidance import load_guidance
from toushi.runner import StageContext
from toushi.store import atomic_write_text, stable_id
from toushi.templates import render


def char_ngram_vectors(texts: list[str], n: int = 3) -> np.ndarray:
    """L2-normalised TF-IDF vectors of character n-grams: works for zh and en with nothing to download."""
    grams = [[t[i : i + n] for i in range(max(1, len(t) - n + 1))] for t in texts]
    vocab = {g: j for j, g in enumerate(sorted({g for gs in grams for g in gs}))}
    tf = np.zeros((len(texts), len(vocab)), dtype=np.float32)
    for i, gs in enumerate(grams):
        for g in gs:
            tf[i, vocab[g]] += 1
    idf = np.log((1 + len(texts)) / (1 + (tf > 0).sum(0))) + 1
    v = tf * idf
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9)


def embed(texts: list[str]) -> np.ndarray:
    """MiniLM sentence embeddings when the packaged model is installed, else character 3-gram TF-IDF."""
    from toushi.metrics import EmbeddingUnavailable, load_embedder

    try:
        model = load_embedder()
    except EmbeddingUnavailable:
        return char_ngram_vectors(texts)
    return model.encode(texts)


def retrieve(queries: list[str], pool_ids: list[str], pool_texts: list[str], k: int, exclude_self: bool = True
             ) -> list[list[str]]:
    """For each query, the ids of the k most similar pool texts (a query's own id is never its example)."""
    if k == 0 or not pool_ids:
        return [[] for _ in queries]
    vecs = embed(list(queries) + list(pool_texts))
    sims = vecs[: len(queries)] @ vecs[len(queries) :].T
    out = []
    for i, q in enumerate(queries):
        order = [int(j) for j in np.argsort(-sims[i], kind="stable")]
        picked = [pool_ids[j] for j in order if not (exclude_self and pool_texts[j] == q)]
        out.append(picked[:k])
    return out


def guided_systems(recs: list[dict], pairs: list[dict], guidance: str, k: int, lang: str
                   ) -> list[tuple[list[str], str]]:
    """(example ids, system prompt) for each pairs record in ``recs``: the guidance, plus the strong answers to
    the k most similar train posts of ``pairs`` (the distill stage's guided teacher reads the same prompt)."""
    # examples come only from train posts with a usable strong answer, so eval never sees its own answers
    pool = [p for p in pairs if p.get("split") == "train" and p["strong"] and p["strong"][0]["text"]
            and not p["strong"][0]["flags"] and not is_truncated(p["strong"][0])]
    picks = retrieve([p["post"] for p in recs], [p["id"] for p in pool], [p["post"] for p in pool], k)
    by_id = {p["id"]: p for p in pool}
    out = []
    for rec, ex_ids in zip(recs, picks):
        examples = [{"post": by_id[i]["post"], "reply": by_id[i]["strong"][0]["text"]} for i in ex_ids]
        out.append((ex_ids, render("guided_system", rec.get("lang") or lang, guidance=guidance,
                                   examples=examples).strip()))
    return out


def run_stage(ctx: StageContext) -> dict:
    r, cfg = ctx.recipe, ctx.recipe.guided
    spec = r.models.weak
    if spec is None:
        raise ValueError("guided: models.weak is not set in the recipe")
    guidance = load_guidance(ctx.stage("guidance").dir)
    pairs = ctx.stage("pairs").records()
    if not pairs:
        raise ValueError(f"guided: no pairs records in {ctx.stage('pairs').records_path}; run the pairs stage first")
    sampling = (cfg.sampling or spec.sampling)
    calls = ctx.calls("guided", spec, sampling, batch_size=r.pairs.batch_size)

    todo_recs = [p for p in pairs if cfg.include_heldout or p.get("split") != "heldout"]
    jobs = []
    for rec, (ex_ids, system) in zip(todo_recs, guided_systems(todo_recs, pairs, guidance, cfg.retrieved_examples,
                                                                r.run.lang)):
        conv = [{"role": "system", "content": system}, {"role": "user", "content": rec["prompt"]}]
        key = stable_id(*(calls.key(conv, k=k) for k in range(sampling.n)))
        jobs.append((rec, ex_ids, system, conv, key))

    done = {g["id"]: g.get("key") for g in ctx.store.records()}
    stale = [rec["id"] for rec, *_, key in jobs if rec["id"] in done and done[rec["id"]] != key]
    if stale:
        # the guidance or settings changed since those answers: start over rather than mix two guidances
        ctx.console.print(f"guided: {len(stale)} records were made with another guidance/settings; regenerating")
        atomic_write_text(ctx.store.records_path, "")
        done = {}
    todo = [j for j in jobs if j[0]["id"] not in done]
    counts = {"prompts": len(jobs), "generated": len(todo), "cached": len(jobs) - len(todo)}
    if todo:
        ctx.console.print(f"guided: {spec.name} answers {len(todo)} prompts with the guidance")
        with calls:
            outs = calls.generate([conv for *_, conv, _ in todo], meta=[{"prompt_id": j[0]["id"]} for j in todo])
        with ctx.store.writer() as w:
            for (rec, ex_ids, system, _, key), comps in zip(todo, outs):
                w.write({
                    "id": rec["id"], "lang": rec.get("lang"), "scene": rec.get("scene"), "split": rec.get("split"),
                    "post": rec["post"], "prompt": rec["prompt"], "system": system, "examples": ex_ids,
                    "guided": [c.to_dict() for c in comps], "model": spec.name,
                    "sampling": sampling.model_dump(mode="json"), "key": key,
                })
    flags = flag_counts((c for g in ctx.store.records() for c in g["guided"]), "guided")
    return {**counts, "records": len(ctx.store.ids()), **flags}
