"""What the rewrite and persona steps share: a JSONL cache of model outputs and batched generation.

Model outputs are the only expensive part of the corpus stage; they are cached by a hash of everything that
shapes them (prompt, model, sampling), so a rerun (or a crash and rerun) only generates what is missing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from rich.progress import Progress

from toushi.recipe import Sampling
from toushi.store import RecordWriter, read_jsonl, repair_jsonl, stable_id


class OutputCache:
    """id -> list of completion texts, appended to a JSONL file in fsynced batches."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, list[str]] = {}
        if path.exists():
            repair_jsonl(path)
            for rec in read_jsonl(path):
                self.data.setdefault(rec["id"], rec["texts"])

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def __getitem__(self, key: str) -> list[str]:
        return self.data[key]


def cache_key(kind: str, prompt: str, model: str, sampling: Sampling, structured=None) -> str:
    parts = [kind, prompt, model, sampling.model_dump(mode="json")]
    if structured is not None:  # a constrained output is another output
        parts.append(structured.key())
    return stable_id(*parts)


def generate_cached(cache: OutputCache, jobs: dict[str, str], get_engine: Callable[[], object],
                    sampling: Sampling, label: str, batch_size: int = 8, structured=None) -> int:
    """Generate the jobs (key -> user prompt) missing from the cache; returns how many were generated.

    The engine is only started (``get_engine()``) when something is missing. ``structured`` (an
    ``engines.Structured``) constrains every output.
    """
    missing = [(k, p) for k, p in jobs.items() if k not in cache]
    if not missing:
        return 0
    engine = get_engine()
    with RecordWriter(cache.path, batch_size=1) as writer, Progress(transient=True) as progress:
        task = progress.add_task(label, total=len(missing))
        for start in range(0, len(missing), batch_size):
            batch = missing[start : start + batch_size]
            outputs = engine.generate([[{"role": "user", "content": p}] for _, p in batch], sampling,
                                      structured=structured)
            for (key, _), completions in zip(batch, outputs, strict=True):
                texts = [c.text for c in completions]
                writer.write({"id": key, "texts": texts})
                cache.data[key] = texts
            writer.flush()
            progress.advance(task, len(batch))
    return len(missing)


def strip_wrapping(text: str) -> str:
    """Model output -> the post: no surrounding quotes, no 'Here is the post:' lead-in line."""
    text = text.strip()
    lines = text.split("\n")
    if len(lines) > 1 and lines[0].rstrip().endswith((":", "：")) and len(lines[0]) < 80:
        text = "\n".join(lines[1:]).strip()
    pairs = [('"', '"'), ("“", "”"), ("'", "'"), ("「", "」")]
    for a, b in pairs:
        if len(text) > 2 and text.startswith(a) and text.endswith(b):
            text = text[1:-1].strip()
    return text


def dumps(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True)
