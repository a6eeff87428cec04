"""Dialogue -> monologue: a model rewrites seeker turns (or a situation line) as one first-person post.

The template of the *target* language is used; when the source is in the other language the prompt asks
for a translation. Failed rewrites keep the original text (flag ``rewrite_failed``) when it is already in
the target language, and are dropped otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from toushi.calls import Calls
from toushi.corpus.llm import strip_wrapping
from toushi.corpus.loaders import Post
from toushi.metrics import detect_lang
from toushi.recipe import Sampling
from toushi.store import StageStore
from toushi.templates import render_any

MIN_CHARS = 8  # shorter output is not a post (the tiny model sometimes answers "Sure!")


@dataclass
class Rewritten:
    posts: list[Post]
    generated: int  # model calls made now (the rest came from the cache)
    rewritten: int
    failed: int  # kept with the original text
    dropped: int  # failed and not in the target language


def rewrite_prompt(post: Post, target_lang: str, template: str | Path | None = None) -> str:
    return render_any("rewrite", target_lang, template, text=post.text, kind=post.kind, scene=post.scene,
                      source_lang=post.lang, target_lang=target_lang)


def accept(text: str, target_lang: str) -> bool:
    return len(text) >= MIN_CHARS and detect_lang(text) == target_lang


def rewrite_posts(posts: list[Post], *, target_lang: str, get_engine: Callable[[], object], model: str,
                  sampling: Sampling, cache: StageStore, template: str | Path | None = None) -> Rewritten:
    """Rewrite ``posts`` (those the caller chose) into first-person posts in ``target_lang``."""
    sampling = sampling.model_copy(update={"n": 1})
    calls = Calls(cache, model, get_engine, sampling, kind="rewrite", label="rewriting posts")
    outputs = calls.texts([[{"role": "user", "content": rewrite_prompt(p, target_lang, template)}] for p in posts])
    generated = calls.stats.new
    out, rewritten, failed, dropped = [], 0, 0, 0
    for post, output in zip(posts, outputs, strict=True):
        text = strip_wrapping(output)
        if accept(text, target_lang):
            if post.lang != target_lang:
                post.flags.append("translated")
            post.text, post.lang, post.kind = text, target_lang, "post"
            post.flags.append("rewritten")
            rewritten += 1
            out.append(post)
        elif post.lang == target_lang:
            post.flags.append("rewrite_failed")
            failed += 1
            out.append(post)
        else:
            dropped += 1
    return Rewritten(out, generated, rewritten, failed, dropped)
