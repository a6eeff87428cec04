"""Personas per scene (age, occupation, life situation, MBTI, writing style), then one post per persona.

The persona is decoded under a JSON schema (``PERSONA_SCHEMA``) wherever the engine can constrain it.
Unconstrained small models often wrap the JSON in chatter, use single quotes, trailing commas or
``key: value`` lines; ``parse_persona`` recovers what it can, fills the rest from a seeded pool (flag ``persona_repaired``), and
falls back to a pool persona when nothing parses (flag ``persona_fallback``). It never raises.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from toushi.calls import Calls
from toushi.corpus.llm import dumps, strip_wrapping
from toushi.corpus.loaders import Post
from toushi.engines import Structured
from toushi.recipe import Sampling
from toushi.store import StageStore, stable_id
from toushi.templates import TEMPLATE_DIR, render_any

KEYS = ("age", "occupation", "life_situation", "mbti", "writing_style")
_MBTI = re.compile(r"\b([EI][NS][TF][JP])(?:-[AT])?\b", re.IGNORECASE)
# Key spellings models use, folded to ours (lower-cased, spaces/dashes as underscores).
_ALIASES = {
    "age": "age", "年龄": "age",
    "occupation": "occupation", "job": "occupation", "profession": "occupation", "work": "occupation",
    "职业": "occupation", "工作": "occupation",
    "life_situation": "life_situation", "situation": "life_situation", "life": "life_situation",
    "background": "life_situation", "生活状况": "life_situation", "生活处境": "life_situation",
    "处境": "life_situation",
    "mbti": "mbti", "mbti_type": "mbti", "personality": "mbti", "personality_type": "mbti",
    "writing_style": "writing_style", "style": "writing_style", "写作风格": "writing_style", "文风": "writing_style",
}
MBTI_TYPES = [a + b + c + d for a in "EI" for b in "NS" for c in "TF" for d in "JP"]
PERSONA_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": list(KEYS),
    "properties": {
        "age": {"type": "integer", "minimum": 13, "maximum": 95},
        "occupation": {"type": "string", "minLength": 2, "maxLength": 60},
        "life_situation": {"type": "string", "minLength": 8, "maxLength": 160},
        "mbti": {"type": "string", "enum": MBTI_TYPES},
        "writing_style": {"type": "string", "minLength": 3, "maxLength": 80},
    },
}
_LINE = re.compile(r"^[\s\-*\"'{]*([A-Za-z _\-\u4e00-\u9fff]{2,20}?)[\"']?\s*[:：]\s*(.+?)[\s,，\"'}]*$")


def _pool(lang: str) -> dict[str, list[str]]:
    return json.loads((TEMPLATE_DIR / lang / "persona_pool.json").read_text(encoding="utf-8"))


def _canon(key: str) -> str | None:
    return _ALIASES.get(re.sub(r"[\s\-]+", "_", key.strip().lower()))


def _from_json(text: str) -> dict | None:
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    blob = text[start : end + 1]
    for attempt in (blob, re.sub(r",\s*([}\]])", r"\1", blob.replace("'", '"'))):
        try:
            data = json.loads(attempt)
        except ValueError:
            continue
        if isinstance(data, dict):
            return data
    return None


def _from_lines(text: str) -> dict:
    found = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m and _canon(m.group(1)):
            found.setdefault(_canon(m.group(1)), m.group(2).strip())
    return found


def parse_persona(text: str, *, lang: str, seed_parts: tuple) -> tuple[dict, list[str]]:
    """Model output -> (persona with all KEYS, flags). Flags: [] | ['persona_repaired'] | ['persona_fallback']."""
    raw = _from_json(text) or _from_lines(text)
    persona: dict = {}
    for key, value in raw.items():
        canon = _canon(str(key))
        if canon and canon not in persona and value not in (None, "", [], {}):
            persona[canon] = value if isinstance(value, (int, float)) else " ".join(str(value).split())
    # Validate what the model gave: age a plausible number, MBTI one of the 16 types.
    if "age" in persona:
        m = re.search(r"\d{1,3}", str(persona["age"]))
        persona["age"] = int(m.group()) if m and 13 <= int(m.group()) <= 95 else None
    if "mbti" in persona:
        m = _MBTI.search(str(persona["mbti"]))
        persona["mbti"] = m.group(1).upper() if m else None
    persona = {k: v for k, v in persona.items() if v not in (None, "")}
    missing = [k for k in KEYS if k not in persona]
    flags = [] if not missing else ["persona_fallback"] if len(missing) == len(KEYS) else ["persona_repaired"]
    rng = random.Random(stable_id("persona-fallback", *seed_parts))
    pool = _pool(lang)
    for key in missing:
        if key == "age":
            persona[key] = rng.randint(18, 70)
        elif key == "mbti":
            persona[key] = "".join(rng.choice(pair) for pair in ("EI", "NS", "TF", "JP"))
        else:
            persona[key] = rng.choice(pool[key])
    return {k: persona[k] for k in KEYS}, flags


@dataclass
class PersonaPosts:
    posts: list[Post]
    generated: int  # model calls made now
    personas: int
    repaired: int
    failures: int  # persona output unusable: a pool persona was used instead
    empty_posts: int  # persona posts dropped because the model wrote nothing usable


def persona_posts(scenes: list[str], *, per_scene: int, lang: str, get_engine: Callable[[], object], model: str,
                  sampling: Sampling, cache: StageStore, persona_template: str | Path | None = None,
                  post_template: str | Path | None = None, min_chars: int = 8) -> PersonaPosts:
    """``per_scene`` personas for each scene (one prompt, n samples), then one post written as each."""
    calls = Calls(cache, model, get_engine, sampling.model_copy(update={"n": per_scene}), kind="persona",
                  label="writing personas")
    asked = [[{"role": "user", "content": render_any("persona", lang, persona_template, scene=s)}] for s in scenes]
    outputs = calls.generate(asked, structured=Structured(json_schema=PERSONA_SCHEMA))
    generated = calls.stats.new
    personas: list[tuple[str, int, dict, list[str]]] = []
    repaired = failures = 0
    for s, completions in zip(scenes, outputs, strict=True):
        texts = ([c.text for c in completions] + [""] * per_scene)[:per_scene]
        for i, text in enumerate(texts):
            persona, flags = parse_persona(text, lang=lang, seed_parts=(s, i, lang))
            repaired += "persona_repaired" in flags
            failures += "persona_fallback" in flags
            personas.append((s, i, persona, flags))

    calls = Calls(cache, model, get_engine, sampling.model_copy(update={"n": 1}), kind="persona_post",
                  label="writing persona posts")
    outputs = calls.texts([[{"role": "user", "content": render_any("persona_post", lang, post_template, scene=s,
                                                                   persona=p)}] for s, _, p, _ in personas])
    generated += calls.stats.new
    posts, empty = [], 0
    for (s, i, persona, flags), output in zip(personas, outputs, strict=True):
        text = strip_wrapping(output)
        if len(text) < min_chars:
            empty += 1
            continue
        post = Post(text=text, lang=lang, scene=s, source=f"persona:{model}",
                    source_id=f"persona-{stable_id(s, i, dumps(persona))[:10]}", flags=["persona", *flags], persona=persona)
        posts.append(post)
    return PersonaPosts(posts, generated, len(personas), repaired, failures, empty)
