"""Diversity report of the final corpus: per-scene counts, labels, length distribution, distinct-n, and how well
the tagger agrees with the dataset's own emotion labels where it ran on labelled posts."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np

from toushi.corpus.tagging import agreement_markdown, record_agreement
from toushi.metrics import ngrams, tokens


def corpus_distinct(texts: list[str], n: int) -> float:
    """Unique n-grams / all n-grams pooled over the corpus (zh: characters, en: words)."""
    grams = [g for t in texts for g in ngrams(tokens(t), n)]
    return round(len(set(grams)) / len(grams), 4) if grams else 0.0


def _dist(values: list[int]) -> dict:
    if not values:
        return {"count": 0}
    a = np.asarray(values)
    q = np.percentile(a, [10, 50, 90])
    return {"count": len(values), "min": int(a.min()), "p10": round(float(q[0]), 1), "median": round(float(q[1]), 1),
            "mean": round(float(a.mean()), 1), "p90": round(float(q[2]), 1), "max": int(a.max())}


def _labels(records: list[dict], key: str) -> dict[str, int]:
    counts = Counter(r.get(key) or "(unlabelled)" for r in records)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def diversity(records: list[dict], tag_labels: list[str] | tuple = ()) -> dict:
    """The report as a JSON-able dict (``records`` in the corpus record shape; ``tag_labels``: the tagger's
    emotion set, for its accuracy on labels inside the set)."""
    scenes: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        scenes[r["scene"]][r["split"]] += 1
    texts = [r["text"] for r in records]
    return {
        "posts": len(records),
        "scenes": len(scenes),
        "per_scene": {s: {"total": sum(c.values()), "train": c["train"], "heldout": c["heldout"]}
                      for s, c in sorted(scenes.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))},
        "splits": dict(Counter(r["split"] for r in records)),
        "langs": dict(Counter(r["lang"] for r in records)),
        "sources": dict(Counter(r["source"] for r in records)),
        "flags": dict(Counter(f for r in records for f in r.get("flags", []))),
        "personas": sum(1 for r in records if r.get("persona")),
        "emotions": _labels(records, "emotion"),
        "intents": _labels(records, "intent"),
        "label_sources": {k: dict(Counter(str((r.get("label_source") or {}).get(k)) for r in records))
                          for k in ("emotion", "intent")},
        "tagger_check": record_agreement(records, tag_labels),
        "length_chars": _dist([len(t) for t in texts]),
        "length_tokens": _dist([len(tokens(t)) for t in texts]),  # zh: characters, en: words
        "distinct_1": corpus_distinct(texts, 1),
        "distinct_2": corpus_distinct(texts, 2),
    }


def diversity_markdown(rep: dict, counts: dict) -> str:
    """A short human summary (the JSON has everything)."""
    lc, lt = rep["length_chars"], rep["length_tokens"]
    lines = [
        "# Corpus diversity",
        "",
        f"{rep['posts']} posts over {rep['scenes']} scenes; splits {rep['splits']}; languages {rep['langs']}.",
        f"Sources: {rep['sources']}. Flags: {rep['flags'] or 'none'}. Persona posts: {rep['personas']}.",
        "",
        (f"Length (chars): median {lc.get('median', 0)}, p10 {lc.get('p10', 0)}, p90 {lc.get('p90', 0)}, "
         f"max {lc.get('max', 0)}. Length (words for en, characters for zh): median {lt.get('median', 0)}."),
        f"Corpus distinct-1 {rep['distinct_1']}, distinct-2 {rep['distinct_2']}.",
        f"Emotions: {rep.get('emotions') or 'none'}. Intents: {rep.get('intents') or 'none'}. "
        f"Label sources: {rep.get('label_sources') or 'none'}.",
        "",
        "Pipeline counts: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ".",
        "",
        "| scene | total | train | heldout |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {s} | {c['total']} | {c['train']} | {c['heldout']} |" for s, c in rep["per_scene"].items()]
    check = rep.get("tagger_check")
    if check:
        lines += ["", agreement_markdown(check, f"Emotion tagger ({check['model']}) vs dataset labels").rstrip()]
    return "\n".join(lines) + "\n"
