"""The ``corpus`` stage: load -> clean -> dedup -> sample per scene -> (rewrite) -> (personas) -> (tag) -> split
-> report.

Output: ``records.jsonl`` (the whole corpus, replaced atomically: it is small and must never hold posts of
an older recipe), ``diversity.json`` + ``diversity.md`` (with the tagger's agreement with dataset labels when
it ran on labelled posts), and ``calls/`` (the rewrite, persona and tagging model calls, toushi/calls.py)
so a rerun only generates what is missing.
"""

from __future__ import annotations

import json
from collections import Counter

from toushi.corpus.dedup import embedding_duplicates, exact_duplicates, near_duplicates
from toushi.corpus.loaders import DIALOGUE_FORMATS, CorpusError, Post, clean_posts, load_source
from toushi.corpus.personas import persona_posts
from toushi.corpus.report import diversity, diversity_markdown
from toushi.corpus.rewrite import rewrite_posts
from toushi.corpus.sampling import sample_per_scene, split_of
from toushi.corpus.tagging import KINDS, label_set, merge, tag_texts
from toushi.engines import cache_model
from toushi.runner import StageContext
from toushi.store import StageStore, atomic_write_text, stable_id

COUNT_KEYS = ("loaded", "skipped_errors", "dropped_empty", "truncated", "dropped_lang", "exact_dups", "near_dups",
              "embedding_dups", "sampled", "rewritten", "rewrite_failed", "rewrite_dropped", "personas",
              "persona_repaired", "persona_failures", "persona_posts", "tagged", "tag_invalid", "generated", "kept", "train",
              "heldout")


def dedup(posts: list[Post], threshold: float, embedding_threshold: float | None, counts: Counter) -> list[Post]:
    """Exact, then near (MinHash), then optional embedding duplicates removed; first occurrence kept."""
    texts = [p.text for p in posts]
    drop = set(exact_duplicates(texts))
    counts["exact_dups"] += len(drop)
    posts = [p for i, p in enumerate(posts) if i not in drop]
    drop = set(near_duplicates([p.text for p in posts], threshold))
    counts["near_dups"] += len(drop)
    posts = [p for i, p in enumerate(posts) if i not in drop]
    if embedding_threshold is not None:
        drop = set(embedding_duplicates([p.text for p in posts], embedding_threshold))
        counts["embedding_dups"] += len(drop)
        posts = [p for i, p in enumerate(posts) if i not in drop]
    return posts


def to_record(post: Post, heldout_fraction: float) -> dict:
    # The id covers the text, so a changed post (another rewrite, another max_chars) is a new prompt
    # downstream, while the same post keeps its id, and so its split, across reruns.
    pid = stable_id("corpus", post.source, post.source_id, post.text)
    return {"id": pid, "lang": post.lang, "scene": post.scene, "text": post.text, "source": post.source,
            "source_id": post.source_id, "split": split_of(pid, heldout_fraction), "flags": post.flags,
            "persona": post.persona, "emotion": post.emotion, "intent": post.intent,
            "label_source": {k: post.label_source.get(k) for k in KINDS}, "tags": post.tags}


def run_stage(ctx: StageContext) -> dict:
    recipe, store, console = ctx.recipe, ctx.store, ctx.console
    cfg = recipe.corpus
    lang = cfg.lang or recipe.run.lang
    if not cfg.sources:
        raise CorpusError("corpus.sources: no sources given; add at least one {path, format} or {hub, split, format}")
    counts: Counter = Counter()
    store.errors_path.unlink(missing_ok=True)  # the stage redoes all loading: old errors are stale

    # ---- load and clean, source by source (recipe order = preference order for dedup)
    pool: list[Post] = []
    for i, src in enumerate(cfg.sources):
        try:
            loaded = load_source(src.path, src.format, fields=src.fields, lang=src.lang, text_from=src.text_from,
                                 limit=src.limit, on_error=cfg.on_error, scene=src.scene, name=src.name,
                                 max_turns=src.max_turns, hub=src.hub, split=src.split, revision=src.revision,
                                 fallback=src.fallback, key=f"corpus.sources.{i}")
        except CorpusError as e:
            raise CorpusError(f"corpus.sources.{i}: {e}") from None
        if loaded.note:
            console.print(f"[yellow]warning:[/yellow] corpus.sources.{i}: {loaded.note}")
        for err in loaded.skipped:
            store.log_error({"source": str(src.path or src.hub), **err})
        if loaded.skipped:
            console.print(f"[yellow]warning:[/yellow] {src.path or src.hub}: {len(loaded.skipped)} records skipped "
                          f"(on_error: skip), e.g. {loaded.skipped[0]['error']}; all in {store.errors_path}")
        cleaned = clean_posts(loaded.posts, cfg.max_chars)
        if cleaned.truncated:
            console.print(f"[yellow]warning:[/yellow] {src.path or src.hub}: {cleaned.truncated} posts longer than "
                          f"corpus.max_chars={cfg.max_chars} were truncated (flag 'truncated')")
        counts.update(loaded=loaded.loaded, skipped_errors=len(loaded.skipped),
                      dropped_empty=cleaned.dropped_empty, truncated=cleaned.truncated)
        for post in cleaned.posts:
            wanted = src.rewrite if src.rewrite is not None else (src.format in DIALOGUE_FORMATS or post.lang != lang)
            post.rewrite = cfg.rewrite.enabled and wanted
            # A post in the other language is usable only if the rewrite step translates it.
            if post.lang != lang and not post.rewrite:
                counts["dropped_lang"] += 1
                continue
            pool.append(post)

    pool = dedup(pool, cfg.dedup_threshold, cfg.embedding_dedup, counts)
    picked = sample_per_scene(pool, key=lambda p: f"{p.source}\x1f{p.source_id}", scene=lambda p: p.scene,
                              per_scene=cfg.per_scene, max_posts=cfg.max_posts, seed=recipe.run.seed)
    counts["sampled"] = len(picked)

    # ---- model steps (engines start only when something is not cached)
    engines: dict[str, object] = {}
    specs = {"weak": recipe.models.weak, "strong": recipe.models.strong}

    def engine_for(role: str):
        def get():
            if role not in engines:
                if specs[role] is None:
                    raise CorpusError(f"corpus: the rewrite/persona/tagging steps use models.{role}, which is not set")
                engines[role] = ctx.engine(specs[role])  # the run's shared engine when run by `toushi run`
            return engines[role]

        return get

    calls_store = StageStore(store.dir, "calls")  # every model call of the corpus's steps (toushi/calls.py)

    def model_name(role: str) -> str:
        """The role's model as the cached calls key it (engines.cache_model, as every other stage's calls)."""
        spec = specs[role]
        if spec is None:
            raise CorpusError(f"corpus: the rewrite/persona/tagging steps use models.{role}, which is not set")
        return cache_model(spec)

    try:
        to_rewrite = [p for p in picked if p.rewrite]
        if to_rewrite:
            rw = cfg.rewrite
            res = rewrite_posts(to_rewrite, target_lang=lang, get_engine=engine_for(rw.role),
                                model=model_name(rw.role), sampling=rw.sampling,
                                cache=calls_store, template=rw.template)
            counts.update(rewritten=res.rewritten, rewrite_failed=res.failed, rewrite_dropped=res.dropped,
                          generated=res.generated)
            picked = [p for p in picked if not p.rewrite] + res.posts
        if cfg.personas.enabled and picked:
            ps = cfg.personas
            scenes = sorted({p.scene for p in picked})
            res = persona_posts(scenes, per_scene=ps.per_scene, lang=lang, get_engine=engine_for(ps.role),
                                model=model_name(ps.role), sampling=ps.sampling,
                                cache=calls_store, persona_template=ps.persona_template,
                                post_template=ps.post_template)
            counts.update(personas=res.personas, persona_repaired=res.repaired, persona_failures=res.failures,
                          persona_posts=len(res.posts), generated=res.generated)
            if res.failures:
                console.print(f"[yellow]warning:[/yellow] {res.failures}/{res.personas} persona outputs did not "
                              "parse; pool personas used instead (flag 'persona_fallback')")
            picked += res.posts
        # Model output can collapse onto near-identical posts: dedup the final set again.
        if to_rewrite or cfg.personas.enabled:
            picked = dedup(picked, cfg.dedup_threshold, None, counts)
        to_tag = [p for p in picked if not (p.emotion and p.intent)] if cfg.tagging.enabled else []
        if to_tag:
            tg = cfg.tagging
            res = tag_texts([p.text for p in to_tag], lang=lang, get_engine=engine_for(tg.role),
                            model=model_name(tg.role), sampling=tg.sampling, cache=calls_store,
                            template=tg.template, labels_file=tg.labels_file)
            for post, tag in zip(to_tag, res.tags, strict=True):
                labels, post.label_source = merge({"emotion": post.emotion, "intent": post.intent},
                                                  post.label_source, tag)
                post.emotion, post.intent, post.tags = labels["emotion"], labels["intent"], tag
            counts.update(tagged=len(to_tag), tag_invalid=res.invalid, generated=res.generated)
            if res.invalid:
                console.print(f"[yellow]warning:[/yellow] {res.invalid}/{len(to_tag)} tagger answers were not "
                              "labels of the set; those posts keep no tag for that label")
    finally:
        for engine in engines.values():
            engine.close()

    records = sorted((to_record(p, cfg.heldout_fraction) for p in picked), key=lambda r: (r["scene"], r["id"]))
    split = Counter(r["split"] for r in records)
    counts.update(kept=len(records), train=split["train"], heldout=split["heldout"])
    atomic_write_text(store.records_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    out = {k: counts[k] for k in COUNT_KEYS}
    tag_labels = [x["label"] for x in label_set(lang, cfg.tagging.labels_file)["emotion"]] if cfg.tagging.enabled else ()
    rep = diversity(records, tag_labels)
    atomic_write_text(store.path("diversity.json"), json.dumps({**rep, "counts": out}, indent=2,
                                                               ensure_ascii=False) + "\n")
    atomic_write_text(store.path("diversity.md"), diversity_markdown(rep, out))
    if not records:
        raise CorpusError(f"corpus: no posts left after loading and filtering ({dict(out)}); "
                          f"check corpus.sources and corpus.lang ({lang})")
    return out
