"""Pack (post, weak answer, strong answer) pairs into analysis batches that fit the strong model's context.

Batches start as runs of ``batch_size`` pairs; a batch whose rendered prompt does not fit the token
budget is split in half, recursively, until each part fits. A single pair too long on its own has its
texts shortened (flagged "truncated") rather than dropped. Token counts come from the strong model's
own tokenizer, applied to the exact prompt that will be sent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def token_counter(model_path: str | None) -> Callable[[str], int]:
    """Count tokens with the model's tokenizer. A remote model (openai engine) may have no local
    tokenizer: then a conservative estimate (one token per 2 characters) stands in."""
    if model_path:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model_path)
        except (OSError, ValueError):
            tok = None
        if tok is not None:
            return lambda text: len(tok(text, add_special_tokens=False)["input_ids"])
    return lambda text: len(text) // 2 + 1


def split_to_fit(items: Sequence[T], fits: Callable[[Sequence[T]], bool]) -> list[list[T]]:
    """Halve a batch until every part fits; a single item that does not fit comes back alone."""
    items = list(items)
    if len(items) <= 1 or fits(items):
        return [items] if items else []
    mid = len(items) // 2
    return split_to_fit(items[:mid], fits) + split_to_fit(items[mid:], fits)


def pack(items: Sequence[T], batch_size: int, fits: Callable[[Sequence[T]], bool]) -> list[list[T]]:
    """Runs of ``batch_size`` items, each split further until it fits."""
    out: list[list[T]] = []
    for start in range(0, len(items), batch_size):
        out.extend(split_to_fit(items[start : start + batch_size], fits))
    return out


def shrink_pair(pair: dict, fits: Callable[[Sequence[dict]], bool], min_chars: int = 80) -> dict:
    """Shorten a pair's post and answers (keeping their starts) until a batch of just this pair fits.
    The returned copy carries "truncated" in its flags; raises ValueError when even ``min_chars`` per
    text does not fit (the context is too small for any analysis prompt)."""
    if fits([pair]):
        return pair
    ratio = 0.8
    while True:
        p = {**pair, "post": _cut(pair["post"], ratio, min_chars),
             "answers": [{**a, "text": _cut(a["text"], ratio, min_chars)} for a in pair["answers"]],
             "flags": sorted(set(pair.get("flags", [])) | {"truncated"})}
        if fits([p]):
            return p
        longest = max(len(t) for t in [pair["post"]] + [a["text"] for a in pair["answers"]])
        if longest * ratio <= min_chars:  # every text is already at its floor: shrinking further changes nothing
            raise ValueError(
                f"pair {pair.get('id')}: even shortened to {min_chars} characters per text, the analysis prompt "
                "does not fit the token budget; raise guidance.context_tokens (or the strong model's "
                "max_model_len) or lower guidance.sampling.max_tokens"
            )
        ratio *= 0.7


def _cut(text: str, ratio: float, min_chars: int) -> str:
    n = max(min_chars, int(len(text) * ratio))
    return text if len(text) <= n else text[:n].rstrip() + " …"
