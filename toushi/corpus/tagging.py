"""Emotion and intent tags for posts that carry none: a model picks one label of each from a closed set.

The sets are per language (``toushi/templates/<lang>/tag_labels.yaml``, or a recipe's own file): each label
has a ``label`` (stored; the same across languages, so ESConv's ``emotion_type`` compares directly), a
``name`` (what the model picks, in the prompt's language) and a ``definition`` (in the prompt). The answer
is decoded under a JSON schema whose values are enums of the names, so an engine that constrains decoding
can only answer labels of the set; from one that cannot, a name found in the text is taken, else the tag
is invalid (None, counted), never a guess.

Where a post has a dataset label and the tagger ran on it anyway (it lacked the other label), the two are
compared: ``agreement`` gives accuracy and a confusion matrix, so a user sees how far to trust the tags on
posts that have no dataset label.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from toushi.calls import Calls
from toushi.engines import Structured
from toushi.errors import ToushiError
from toushi.recipe import Sampling
from toushi.store import StageStore
from toushi.templates import TEMPLATE_DIR, render_any

KINDS = ("emotion", "intent")
INVALID = "(invalid)"  # a tagger answer outside the set, in the confusion matrix


class TaggingError(ToushiError, ValueError):
    """A label file or an input file the tagger cannot use; the message names the file."""


def label_set(lang: str, path: str | Path | None = None) -> dict[str, list[dict]]:
    """{"emotion": [{"label", "name", "definition"}], "intent": [...]} from the recipe's file or the built-in one."""
    path = Path(path) if path else TEMPLATE_DIR / lang / "tag_labels.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise TaggingError(f"{path}: cannot read the label set: {e}") from None
    out = {}
    for kind in KINDS:
        items = (data or {}).get(kind) if isinstance(data, dict) else None
        if not isinstance(items, list) or not items:
            raise TaggingError(f"{path}: expected a non-empty list under {kind!r}")
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not all(str(item.get(k) or "").strip() for k in ("label", "name")):
                raise TaggingError(f"{path}: {kind}[{i}] needs a label and a name")
        out[kind] = [{"label": str(x["label"]).strip(), "name": str(x["name"]).strip(),
                      "definition": str(x.get("definition") or "").strip()} for x in items]
        if len({x["name"] for x in out[kind]}) != len(out[kind]):
            raise TaggingError(f"{path}: two {kind} labels share a name")
    return out


def tag_schema(labels: dict[str, list[dict]]) -> dict:
    """JSON schema of the answer: {"emotion": one of the emotion names, "intent": one of the intent names}."""
    props = {k: {"type": "string", "enum": [x["name"] for x in labels[k]]} for k in KINDS}
    return {"type": "object", "properties": props, "required": list(KINDS), "additionalProperties": False}


def tag_prompt(text: str, lang: str, labels: dict[str, list[dict]], template: str | Path | None = None) -> str:
    return render_any("tag", lang, template, text=text, emotions=labels["emotion"], intents=labels["intent"])


def parse_tags(output: str, labels: dict[str, list[dict]]) -> dict[str, str | None]:
    """{"emotion": label | None, "intent": label | None} from the tagger's output.

    A constrained answer is one JSON object with names from the set. Otherwise the first JSON object in the
    text is read, and failing that the one name of a kind that occurs in the text (none or several: None).
    """
    by_name = {k: {x["name"].lower(): x["label"] for x in labels[k]} for k in KINDS}
    data = None
    start, end = output.find("{"), output.rfind("}")
    if 0 <= start < end:
        try:
            data = json.loads(output[start : end + 1])
        except ValueError:
            data = None
    out: dict[str, str | None] = {}
    for kind in KINDS:
        value = data.get(kind) if isinstance(data, dict) else None
        if isinstance(value, str) and value.strip().lower() in by_name[kind]:
            out[kind] = by_name[kind][value.strip().lower()]
            continue
        low = output.lower()
        found = {label for name, label in by_name[kind].items() if name in low}
        out[kind] = found.pop() if len(found) == 1 else None
    return out


@dataclass
class Tagged:
    tags: list[dict]  # per text: {"model", "emotion", "intent"} (labels, None where the answer was unusable)
    generated: int  # model calls made now (the rest came from the cache)
    invalid: int  # texts with at least one unusable label


def tag_texts(texts: Sequence[str], *, lang: str, get_engine: Callable[[], object], model: str, sampling: Sampling,
              cache: StageStore, template: str | Path | None = None, labels_file: str | Path | None = None,
              batch_size: int = 32) -> Tagged:
    """Tag every text; model calls are cached in ``cache`` (toushi/calls.py: by prompt, model, sampling and the
    label set's schema), so a rerun only tags what is new. The engine is started (``get_engine()``) only when
    something is missing."""
    labels = label_set(lang, labels_file)
    sampling = sampling.model_copy(update={"n": 1})
    schema = Structured(json_schema=tag_schema(labels))
    calls = Calls(cache, model, get_engine, sampling, kind="tag", label="tagging posts", batch_size=batch_size)
    outputs = calls.texts([[{"role": "user", "content": tag_prompt(t, lang, labels, template)}] for t in texts],
                          structured=schema)
    generated = calls.stats.new
    tags, invalid = [], 0
    for output in outputs:
        parsed = parse_tags(output, labels)
        invalid += any(v is None for v in parsed.values())
        tags.append({"model": model, **parsed})
    return Tagged(tags, generated, invalid)


def merge(labels: dict[str, str | None], sources: dict[str, str | None], tag: dict | None
          ) -> tuple[dict[str, str | None], dict[str, str | None]]:
    """(labels, label sources) after tagging: a dataset label is kept, a missing one is the tagger's."""
    labels, sources = dict(labels), dict(sources)
    for kind in KINDS:
        if not labels.get(kind) and tag and tag.get(kind):
            labels[kind], sources[kind] = tag[kind], "tagger"
        elif labels.get(kind):
            sources[kind] = sources.get(kind) or "dataset"
        else:
            labels[kind], sources[kind] = None, None
    return labels, sources


# ------------------------------------------------------------------------------------------ agreement


def agreement(gold: Sequence[str | None], predicted: Sequence[str | None], labels: Sequence[str] = ()) -> dict:
    """The tagger against known labels, over the pairs whose gold label is known.

    ``predicted`` None is an invalid answer (wrong, shown as "(invalid)"). ``labels`` is the tagger's set:
    a gold label outside it can never be matched, so accuracy is also given on the gold labels in the set.
    Returns {"n", "correct", "accuracy", "in_set_n", "in_set_accuracy", "invalid", "gold_labels",
    "predicted_labels", "confusion"} with confusion[i][j] = posts of gold_labels[i] tagged predicted_labels[j].
    """
    pairs = [(g, p if p else INVALID) for g, p in zip(gold, predicted, strict=True) if g]
    n = len(pairs)
    correct = sum(g == p for g, p in pairs)
    in_set = [(g, p) for g, p in pairs if g in set(labels)]
    gold_count = Counter(g for g, _ in pairs)
    # rows: the gold labels, most frequent first; columns: the tagger's set in its order, then anything else
    gold_labels = sorted(gold_count, key=lambda g: (-gold_count[g], g))
    seen = {p for _, p in pairs}
    predicted_labels = [x for x in labels if x in seen or x in gold_count] + sorted(seen - set(labels) - {INVALID})
    if INVALID in seen:
        predicted_labels.append(INVALID)
    cells = Counter(pairs)
    return {
        "n": n, "correct": correct, "accuracy": correct / n if n else None,
        "in_set_n": len(in_set),
        "in_set_accuracy": sum(g == p for g, p in in_set) / len(in_set) if in_set else None,
        "invalid": sum(p == INVALID for _, p in pairs),
        "gold_labels": gold_labels, "predicted_labels": predicted_labels,
        "confusion": [[cells[(g, p)] for p in predicted_labels] for g in gold_labels],
    }


def agreement_markdown(rep: dict, title: str = "Emotion tagger vs dataset labels") -> str:
    """The agreement as Markdown: a summary line and the confusion matrix (rows gold, columns tagger)."""
    if not rep or not rep.get("n"):
        return ""
    acc = f"{rep['accuracy']:.0%}"
    in_set = f"{rep['in_set_accuracy']:.0%}" if rep.get("in_set_accuracy") is not None else "–"
    lines = [f"## {title}", "",
             f"{rep['n']} posts with a dataset label: accuracy {acc} ({rep['correct']}/{rep['n']}); on the "
             f"{rep['in_set_n']} whose label is in the tagger's set {in_set}; {rep['invalid']} unusable answers.",
             "", "| dataset \\ tagger | " + " | ".join(rep["predicted_labels"]) + " |",
             "|---|" + "---:|" * len(rep["predicted_labels"])]
    lines += [f"| {g} | " + " | ".join(str(c) for c in row) + " |"
              for g, row in zip(rep["gold_labels"], rep["confusion"])]
    return "\n".join(lines) + "\n"


def record_agreement(records: Sequence[dict], labels: Sequence[str] = ()) -> dict | None:
    """Agreement over records that have a dataset emotion and a tagger answer (None when there are none)."""
    checked = [r for r in records if (r.get("label_source") or {}).get("emotion") == "dataset" and r.get("tags")]
    if not checked:
        return None
    model = checked[0]["tags"].get("model")
    return {"model": model, **agreement([r["emotion"] for r in checked], [r["tags"].get("emotion") for r in checked],
                                        labels)}


# ------------------------------------------------------------------------------------------ any file

TEXT_FIELDS = ("text", "post", "prompt", "situation")
GOLD_FIELDS = ("emotion", "emotion_type")


def tag_file(path: Path, out: Path, *, lang: str, get_engine: Callable[[], object], model: str, sampling: Sampling,
             field: str | None = None, gold_field: str | None = None, limit: int | None = None,
             template: str | Path | None = None, labels_file: str | Path | None = None) -> dict:
    """Tag every record of a prompt file (JSONL, JSON, CSV or a `datasets` dir) and write ``out`` (JSONL).

    Each output record is the input record plus ``emotion``, ``intent`` (the file's own label where it has one,
    else the tagger's), ``label_source`` and ``tags`` (the tagger's answer and model). Where the file has an
    emotion label (``gold_field``, default: emotion or emotion_type) the tagger is measured against it;
    the agreement goes to ``<out stem>.agreement.json`` and ``.md``. Model calls are cached beside ``out``
    (``<out stem>.cache/records.jsonl``), so a rerun tags only new records. Returns the counts and the agreement.
    """
    from toushi.corpus.loaders import CorpusError, container_of, normalise_label, read_records

    try:
        records = [rec for _, rec in read_records(path, container_of(path, "openings"))]
    except CorpusError as e:
        raise TaggingError(str(e)) from None
    records = records[:limit] if limit else records
    if not records:
        raise TaggingError(f"{path}: no records")
    text_field = field or next((f for f in TEXT_FIELDS if f in records[0]), None)
    if text_field is None:
        raise TaggingError(f"{path}: no text field ({', '.join(TEXT_FIELDS)}); name it with --field")
    missing = [i for i, r in enumerate(records) if not str(r.get(text_field) or "").strip()]
    if missing:
        raise TaggingError(f"{path}: record {missing[0]} has no {text_field!r} text ({len(missing)} such records)")
    gold = gold_field or next((f for f in GOLD_FIELDS if any(r.get(f) for r in records)), None)
    out = Path(out)
    tagged = tag_texts([str(r[text_field]) for r in records], lang=lang, get_engine=get_engine, model=model,
                       sampling=sampling, cache=StageStore(out.parent, out.stem + ".cache"), template=template, labels_file=labels_file)
    rows = []
    for rec, tag in zip(records, tagged.tags):
        own = {"emotion": normalise_label(rec.get(gold)) if gold else None, "intent": normalise_label(rec.get("intent"))}
        labels, sources = merge(own, {k: "dataset" if v else None for k, v in own.items()}, tag)
        rows.append({**rec, **labels, "label_source": sources, "tags": tag})
    from toushi.store import atomic_write_text

    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    rep = record_agreement(rows, [x["label"] for x in label_set(lang, labels_file)["emotion"]])
    if rep is not None:
        rep["gold_field"] = gold
        atomic_write_text(out.with_name(out.stem + ".agreement.json"), json.dumps(rep, indent=2, ensure_ascii=False) + "\n")
        atomic_write_text(out.with_name(out.stem + ".agreement.md"), agreement_markdown(rep))
    return {"records": len(rows), "generated": tagged.generated, "invalid": tagged.invalid,
            "text_field": text_field, "gold_field": gold, "agreement": rep}
