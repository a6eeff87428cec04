"""Read venting posts from files: a file reader (JSONL, JSON, CSV, `datasets` on disk) + an adapter per format.

Every reader yields ``(where, record)`` where ``where`` names the file and line (or record/row), so a bad
record's error says exactly where it is. Adapters turn one source record into zero or more ``Post``s.
"""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from toushi.errors import ToushiError
from toushi.metrics import detect_lang

DIALOGUE_FORMATS = ("esconv", "extes")

# What each adapter reads, toushi field -> default source field. A field the user maps explicitly must be
# present in every record; a defaulted optional one may be missing.
# emotion and intent are the dataset's own labels, kept through pairs and eval (stratified results); posts
# without them can be tagged by a model (toushi.corpus.tagging).
DEFAULT_FIELDS = {
    "openings": {"id": "id", "text": "text", "scene": "scene", "lang": "lang", "source": "source",
                 "emotion": "emotion", "intent": "intent"},
    "esconv": {"id": "id", "situation": "situation", "dialog": "dialog", "scene": "problem_type",
               "emotion": "emotion_type", "intent": "intent"},
    "extes": {"id": "id", "scene": "scene", "description": "description", "content": "content",
              "emotion": "emotion", "intent": "intent"},
}
REQUIRED = {
    "openings": ("text",),
    "esconv": ("dialog",),  # situation is required only when text_from = situation (checked below)
    "extes": ("content",),
}

# ESConv seekers often open with a greeting turn; it says nothing about the trouble.
_GREETING = re.compile(
    r"^\s*(hi+|hello+|hey+|good (morning|afternoon|evening)|how are you( doing)?( today)?|"
    r"hi,? how are you( doing)?( today)?|i'?m (good|fine|ok|okay),?( thanks?( you)?)?|not (too )?(good|great))"
    r"[\s!.,?]*(how are you( doing)?( today)?)?[\s!.,?]*$",
    re.IGNORECASE,
)


class CorpusError(ToushiError, ValueError):
    """Input the corpus stage cannot use; the message names the file and the line (or record) and field."""


@dataclass
class Post:
    """One venting post before sampling; ``source_id`` is the record's id in its source (provenance)."""

    text: str
    lang: str
    scene: str
    source: str
    source_id: str
    flags: list[str] = field(default_factory=list)
    emotion: str | None = None  # the dataset's label (ESConv emotion_type), else the tagger's
    intent: str | None = None  # what the writer wants from a reply (be heard, comfort, advice, vent anger)
    label_source: dict[str, str | None] = field(default_factory=dict)  # emotion/intent -> "dataset" | "tagger"
    tags: dict | None = None  # the tagger's own answer {"model", "emotion", "intent"} (kept to check it)
    kind: str = "post"  # post | situation | seeker_turns: what the text is (the rewrite prompt says so)
    rewrite: bool = False  # chosen for the rewrite step
    persona: dict | None = None  # the persona a persona-conditioned post was written as


@dataclass
class Loaded:
    posts: list[Post]
    skipped: list[dict]  # {"where", "error"} for records skipped under on_error=skip
    loaded: int  # source records read
    note: str | None = None  # e.g. the Hub could not be reached and the fallback copy was read


# ------------------------------------------------------------------------------------------ readers


def decode_utf8(data: bytes, path: Path) -> str:
    """Strict UTF-8 decoding; a bad byte is an error naming its offset and line, not a silent U+FFFD."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        bad = data[e.start : e.start + 4]
        raise CorpusError(
            f"{path}: not valid UTF-8 at byte offset {e.start} (line {line}): {bad!r}; "
            "convert the file to UTF-8 (e.g. iconv -f GB18030 -t UTF-8)"
        ) from None


def container_of(path: Path, fmt: str) -> str:
    """Which reader a source needs: explicit for generic formats, else from the path."""
    if fmt in ("jsonl", "json", "csv", "hf_disk"):
        return fmt
    if path.is_dir():
        return "hf_disk"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix in (".csv", ".tsv"):
        return "csv"
    raise CorpusError(f"{path}: cannot tell the file type from the extension; use .jsonl, .json or .csv")


def read_records(path: Path, container: str) -> Iterator[tuple[str, dict]]:
    """Yield (where, record) from one file; ``where`` is 'file:line' (or 'file: record N' / 'row N')."""
    if container == "hf_disk":
        yield from _read_hf_disk(path)
        return
    if not path.is_file():
        raise CorpusError(f"{path}: file not found")
    text = decode_utf8(path.read_bytes(), path)
    if container == "jsonl":
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise CorpusError(f"{path}:{lineno}: not valid JSON: {e}") from None
            if not isinstance(rec, dict):
                raise CorpusError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield f"{path}:{lineno}", rec
    elif container == "json":
        try:
            data = json.loads(text)
        except ValueError as e:
            raise CorpusError(f"{path}: not valid JSON: {e}") from None
        if isinstance(data, dict):  # {"data": [...]} and similar wrappers: the one list inside
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise CorpusError(f"{path}: expected a JSON list of records (or an object holding one list)")
            data = lists[0]
        if not isinstance(data, list):
            raise CorpusError(f"{path}: expected a JSON list of records")
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise CorpusError(f"{path}: record {i}: expected an object, got {type(rec).__name__}")
            yield f"{path}: record {i}", rec
    elif container == "csv":
        dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
        reader = csv.DictReader(io.StringIO(text, newline=""), dialect=dialect)
        for row in reader:
            if None in row:  # more cells than header columns
                raise CorpusError(f"{path}:{reader.line_num}: more cells than the header has columns")
            yield f"{path}:{reader.line_num}", {k: v for k, v in row.items() if v is not None}
    else:
        raise CorpusError(f"{path}: unknown file type {container!r}")


def _read_hf_disk(path: Path) -> Iterator[tuple[str, dict]]:
    import datasets  # heavy import, only for this file type

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise CorpusError(f"{path}: not a `datasets` directory saved with save_to_disk: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        for split, part in ds.items():
            for i, rec in enumerate(part):
                yield f"{path}[{split}]: row {i}", rec
    else:
        for i, rec in enumerate(ds):
            yield f"{path}: row {i}", rec


def hub_records(hub: str, split: str, revision: str | None, fallback: Path | None, fmt: str,
                key: str = "corpus.sources.N") -> tuple[Iterator[tuple[str, dict]], str | None]:
    """(records, note) of one split of a Hub dataset, downloaded once into $TOUSHI_HOME/datasets.

    When the Hub cannot be reached (offline, no network) the ``fallback`` copy is read instead, and the note
    says so; without one, the error says how to point at a local copy.
    """
    import datasets  # heavy import, only for Hub sources

    from toushi.paths import toushi_home

    try:
        ds = datasets.load_dataset(hub, split=split, revision=revision, cache_dir=str(toushi_home() / "datasets"))
    except OSError as e:  # ConnectionError offline, DatasetNotFoundError (a FileNotFoundError) for a wrong id
        reason = " ".join(str(e).split())[:160]
        if fallback is None:
            raise CorpusError(
                f"{hub} (split {split}): cannot load it from the Hugging Face Hub ({reason}); point at a local "
                f"copy of the split with --set {key}.fallback=/path/to/{split}.jsonl"
            ) from None
        return read_records(fallback, container_of(fallback, fmt)), f"{hub}: Hub not reachable ({reason}); read {fallback}"
    return ((f"{hub}[{split}]: row {i}", rec) for i, rec in enumerate(ds)), None


# ------------------------------------------------------------------------------------------ adapters


def normalise_scene(scene: object, default: str | None = None) -> str:
    """Lower-case, single-spaced scene label; missing scenes get the source default or 'unspecified'."""
    text = " ".join(str(scene).split()).lower() if scene is not None else ""
    text = text.replace("_", " ")
    if not text:
        text = " ".join((default or "unspecified").split()).lower()
    return text


def normalise_label(value: object) -> str | None:
    """A dataset's emotion/intent label, lower-case and single-spaced ("Anxiety " -> "anxiety"); None when empty."""
    text = " ".join(str(value).split()).lower() if value is not None else ""
    return text or None


def _get(rec: dict, fields: dict[str, str], name: str, where: str, required: bool) -> object:
    # Absent is an error; present but null is not (a null scene is 'unspecified', a null text is empty).
    key = fields.get(name, name)
    if key not in rec and required:
        mapped = f" (mapped to toushi field {name!r})" if key != name else ""
        raise CorpusError(f"{where}: missing field {key!r}{mapped}")
    return rec.get(key)


def _unpack_text(rec: dict, where: str) -> dict:
    try:
        inner = json.loads(rec["text"])
    except ValueError as e:
        raise CorpusError(f"{where}: field 'text' is not a JSON conversation: {e}") from None
    if not isinstance(inner, dict):
        raise CorpusError(f"{where}: field 'text' holds {type(inner).__name__}, not a JSON conversation")
    return {**{k: v for k, v in rec.items() if k != "text"}, **inner}


def _str(value: object) -> str:
    return "" if value is None else str(value)


def adapt(fmt: str, rec: dict, where: str, index: int, *, fields: dict[str, str], explicit: set[str],
          text_from: str, file_stem: str, default_lang: str | None, default_scene: str | None,
          name: str | None, max_turns: int | None = None) -> list[Post]:
    """One source record -> posts. Raises CorpusError naming ``where`` and the field when one is missing."""
    adapter = fmt if fmt in DIALOGUE_FORMATS else "openings"
    if adapter == "esconv" and "dialog" not in rec and isinstance(rec.get("text"), str):
        rec = _unpack_text(rec, where)  # the Hub's thu-coai/esconv: each conversation as JSON in `text`
    required = set(REQUIRED[adapter]) | explicit
    if adapter in DIALOGUE_FORMATS and text_from == "situation":
        required.add("situation" if adapter == "esconv" else "description")

    def get(field_name: str):
        return _get(rec, fields, field_name, where, field_name in required)

    rid = get("id")
    scene = normalise_scene(get("scene"), default_scene)
    emotion, intent = normalise_label(get("emotion")), normalise_label(get("intent"))
    labels = {"emotion": "dataset" if emotion else None, "intent": "dataset" if intent else None}
    if adapter == "openings":
        text = _str(get("text"))
        lang = _str(get("lang")) or default_lang or detect_lang(text) or "en"
        source = name or _str(get("source")) or file_stem
        source_id = _str(rid) if rid is not None else f"{file_stem}-{index:05d}"
        return [Post(text=text, lang=lang, scene=scene, source=source, source_id=source_id, emotion=emotion,
                     intent=intent, label_source=labels)]

    if adapter == "esconv":
        dialog = get("dialog")
        if not isinstance(dialog, list):
            raise CorpusError(f"{where}: field {fields.get('dialog', 'dialog')!r} must be a list of turns")
        turns = [_str(t.get("text")) for t in dialog if isinstance(t, dict) and t.get("speaker") in ("usr", "seeker")]
        situation = _str(get("situation"))
        source, source_id = name or "ESConv", _str(rid) if rid is not None else f"esconv-{file_stem}-{index:04d}"
    else:  # extes: content = [{"User": ...}, {"AI Strategy": ..., "AI": ...}, ...]
        content = get("content")
        if not isinstance(content, list):
            raise CorpusError(f"{where}: field {fields.get('content', 'content')!r} must be a list of turns")
        turns = [_str(t.get("User")) for t in content if isinstance(t, dict) and "User" in t]
        situation = _str(get("description"))
        source, source_id = name or "ExTES", _str(rid) if rid is not None else f"extes-{file_stem}-{index:05d}"

    if text_from == "situation":
        text, kind = situation, "situation"
    else:
        # Leading greetings ("hi, how are you?") carry nothing; drop them, keep the rest in order.
        while turns and _GREETING.match(turns[0]):
            turns.pop(0)
        turns = [t.strip() for t in turns if t.strip()][:max_turns]
        text, kind = "\n".join(turns), "seeker_turns"
    return [Post(text=text, lang=default_lang or detect_lang(text) or "en", scene=scene, source=source,
                 source_id=source_id, emotion=emotion, intent=intent, label_source=labels, kind=kind)]


def load_source(path: str | Path | None, fmt: str = "openings", *, fields: dict[str, str] | None = None,
                lang: str | None = None, text_from: str = "text", limit: int | None = None,
                on_error: str = "raise", scene: str | None = None, name: str | None = None,
                max_turns: int | None = 5, hub: str | None = None, split: str = "train",
                revision: str | None = None, fallback: Path | None = None, key: str = "corpus.sources.N") -> Loaded:
    """Read one source (a local ``path``, or a ``hub`` dataset's ``split``) into posts (not yet cleaned,
    deduplicated or sampled).

    A record missing a field raises ``CorpusError`` naming file, line and field; with ``on_error='skip'``
    it is skipped and listed in ``Loaded.skipped`` instead. Bad files (not UTF-8, not JSON) always raise.
    """
    note = None
    if hub is not None:
        # the split names the records as a local file of it would (train.jsonl -> "train"): same ids either way
        path, (records, note) = Path(hub), hub_records(hub, split, revision, fallback, fmt, key)
        stem = split
    else:
        path = Path(path)
        records, stem = read_records(path, container_of(path, fmt)), path.stem
    adapter = fmt if fmt in DIALOGUE_FORMATS else "openings"
    explicit = set(fields or {})
    mapping = {**DEFAULT_FIELDS[adapter], **(fields or {})}
    unknown = explicit - set(DEFAULT_FIELDS[adapter])
    if unknown:
        raise CorpusError(f"{path}: fields: not a {adapter} field: {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(DEFAULT_FIELDS[adapter])})")
    posts: list[Post] = []
    skipped: list[dict] = []
    n = 0
    for index, (where, rec) in enumerate(records):
        if limit is not None and n >= limit:
            break
        n += 1
        try:
            posts.extend(adapt(fmt, rec, where, index, fields=mapping, explicit=explicit, text_from=text_from,
                               file_stem=stem, default_lang=lang, default_scene=scene, name=name,
                               max_turns=max_turns))
        except CorpusError as e:
            if on_error != "skip":
                raise
            skipped.append({"where": where, "error": str(e)})
    return Loaded(posts=posts, skipped=skipped, loaded=n, note=note)


# ------------------------------------------------------------------------------------------ cleaning


@dataclass
class Cleaned:
    posts: list[Post]
    dropped_empty: int
    truncated: int


def clean_text(text: str) -> str:
    """NFC, no control characters, trimmed lines; paragraph breaks kept."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c) != "Cc")
    lines = [" ".join(line.split()) for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def clean_posts(posts: list[Post], max_chars: int) -> Cleaned:
    """Drop empty/whitespace posts; cut posts over ``max_chars`` (at a sentence end when one is near)."""
    kept, empty, truncated = [], 0, 0
    for p in posts:
        p.text = clean_text(p.text)
        if not p.text:
            empty += 1
            continue
        if len(p.text) > max_chars:
            cut = p.text[:max_chars]
            # Prefer ending at the last sentence end in the final fifth, so the post still reads whole.
            ends = [m.end() for m in re.finditer(r"[.!?。！？…]", cut)]
            if ends and ends[-1] >= max_chars * 0.8:
                cut = cut[: ends[-1]]
            p.text = cut.rstrip()
            p.flags.append("truncated")
            truncated += 1
        kept.append(p)
    return Cleaned(posts=kept, dropped_empty=empty, truncated=truncated)
