"""``toushi generate``: batch generation from a file of prompts (or a run's held-out prompts).

Input records (JSONL, JSON, CSV/TSV, or a ``datasets`` directory) have an optional ``id`` and one of
``messages`` (a chat conversation), ``prompt`` (the user message as is) or ``text`` (a venting post: it
gets the same support-task prompt as the pairs stage). Output lines are ``{id, messages, completions,
model, model_key, lora, lora_digest, system, sampling}``. Records are flushed after every batch; a rerun skips
ids already in the output file (a torn last line left by a kill is dropped first), so an interrupted run
resumes where it stopped; the model calls go through toushi/calls.py, cached in ``<out>.calls/``. An output file written with another model (or dtype), adapter (or the same adapter
retrained: its weights' digest), system prompt or sampling is never topped up with this run's answers: that is
an error naming both settings, so one file always holds one system's answers.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from toushi.calls import Calls
from toushi.engines import Conversation, cache_model, make_engine
from toushi.engines.adapters import adapter_fingerprint
from toushi.pairs import conversation, task_prompt
from toushi.recipe import ModelSpec, Recipe, RecipeError, Sampling
from toushi.serve import adapters_for, role_spec
from toushi.store import RecordWriter, StageStore, read_jsonl, repair_jsonl, stable_id
from toushi.templates import render_file


def read_items(path: Path, lang: str) -> list[dict]:
    """{id, messages} for each input record (first occurrence of an id wins). The file is JSONL, JSON, CSV
    or TSV (by extension) or a ``datasets`` directory saved with ``save_to_disk``; in CSV a ``messages``
    cell holds the conversation as JSON."""
    from toushi.corpus.loaders import container_of, read_records

    if not path.exists():
        raise FileNotFoundError(f"{path}: prompts file not found")
    items: dict[str, dict] = {}
    for where, rec in read_records(path, container_of(path, "auto")):
        if rec.get("messages"):
            messages = rec["messages"]
            if isinstance(messages, str):
                try:
                    messages = json.loads(messages)
                except ValueError as e:
                    raise ValueError(f"{where}: 'messages' is not a JSON list of messages: {e}") from None
        elif rec.get("prompt"):
            messages = [{"role": "user", "content": rec["prompt"]}]
        elif rec.get("text"):
            messages = [{"role": "user", "content": task_prompt(rec["text"], rec.get("lang") or lang)}]
        else:
            raise ValueError(f"{where}: needs one of 'messages', 'prompt' or 'text'")
        if not (isinstance(messages, list) and all(isinstance(m, dict) and "role" in m and "content" in m
                                                    for m in messages)):
            raise ValueError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        pid = str(rec.get("id") or stable_id(messages))
        items.setdefault(pid, {"id": pid, "messages": messages})
    return list(items.values())


def heldout_items(recipe: Recipe) -> list[dict]:
    """The run's held-out prompts: from the pairs records, else from the corpus split."""
    pairs = [r for r in StageStore(recipe.run_dir, "pairs").records() if r.get("split") == "heldout"]
    if pairs:
        return [{"id": r["id"], "messages": conversation(r["prompt"], None)} for r in pairs]
    corpus = [r for r in StageStore(recipe.run_dir, "corpus").records() if r.get("split") == "heldout"]
    if not corpus:
        raise ValueError(f"{recipe.run_dir}: no held-out prompts (run the corpus stage, or pass a prompts file)")
    return [
        {"id": r["id"], "messages": conversation(task_prompt(r["text"], r.get("lang") or recipe.run.lang), None)}
        for r in corpus
    ]


def with_system(messages: Conversation, system: str | None) -> Conversation:
    """Prepend the role's system prompt unless the conversation brings its own."""
    if system is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system}, *messages]


def generation_spec(recipe: Recipe, role: str, lora: str | None) -> tuple[ModelSpec, str | None]:
    """(spec, lora_name for engine.generate). An openai endpoint serves an adapter under its own name,
    so the adapter becomes the requested model; local engines load just that adapter."""
    spec = role_spec(recipe, role)
    if lora is None:
        return spec, None
    if spec.engine == "openai":
        return spec.model_copy(update={"served_model": lora}), None
    adapters = adapters_for(recipe, role)
    if lora not in adapters:
        known = ", ".join(adapters) or "none"
        raise RecipeError(f"no LoRA adapter {lora!r} for models.{role} (known: {known}; trained adapters are "
                          f"looked up in {recipe.run_dir}/{{sft,dpo,grpo}}/adapter)")
    return spec.model_copy(update={"lora_adapters": {lora: adapters[lora]}, "enable_lora": True}), lora


def done_ids(out: Path, meta: dict) -> set[str]:
    """Ids already answered in ``out`` with these settings (``meta``); other settings: error."""
    if not out.exists():
        return set()
    repair_jsonl(out)
    ids = set()
    for n, rec in enumerate(read_jsonl(out), 1):
        theirs = {k: rec.get(k) for k in meta}
        if theirs != meta:
            raise ValueError(f"{out}:{n}: written with other settings ({json.dumps(theirs)}) than this run's "
                             f"({json.dumps(meta)}); pass another --out, or delete the file to start over")
        ids.add(rec["id"])
    return ids


def generate_file(
    spec: ModelSpec,
    items: list[dict],
    out: Path,
    sampling: Sampling,
    lora_name: str | None = None,
    system: str | None = None,
    batch_size: int = 32,
    console: Console | None = None,
) -> dict:
    """Generate every item not yet in ``out`` and append the results. Returns counts
    {prompts, skipped, generated, failed}; failed requests (openai engine) are left for a rerun."""
    console = console or Console(stderr=True)
    # what the answers depend on: the model as caches key it (name and dtype), the adapter's content (a retrained
    # adapter under the same name is another system), the system prompt and the sampling
    model = spec.served_model or spec.name
    adapter = spec.lora_adapters.get(lora_name) if lora_name else None
    meta = {"model": model, "model_key": cache_model(spec), "lora": lora_name,
            "lora_digest": adapter_fingerprint(adapter) if adapter else None,
            "system": system, "sampling": sampling.model_dump(mode="json")}
    have = done_ids(out, meta)
    todo = [it for it in items if it["id"] not in have]
    counts = {"prompts": len(items), "skipped": len(items) - len(todo), "generated": 0, "failed": 0}
    if not todo:
        console.print(f"all {len(items)} prompts already in {out}")
        return counts
    console.print(f"generating {len(todo)} of {len(items)} prompts with {model} ({spec.engine}) -> {out}")
    failed: set[str] = set()
    # the calls themselves go through the call layer, cached beside the output (``<out>.calls/``)
    calls = Calls(StageStore(out.parent, out.name + ".calls"), meta["model_key"], lambda: make_engine(spec), sampling,
                  kind="generate", adapters={lora_name: meta["lora_digest"]} if adapter else None,
                  batch_size=batch_size, console=console, label="generate")
    lora = lora_name if spec.engine != "openai" else None  # an endpoint serves the adapter under its own name
    with calls, RecordWriter(out, batch_size=max(1, batch_size)) as w:
        for start in range(0, len(todo), batch_size):  # the output grows batch by batch, as the calls do
            batch = todo[start : start + batch_size]
            convs = [with_system(it["messages"], system) for it in batch]

            def on_error(i: int, exc: BaseException, batch=batch) -> None:
                failed.add(batch[i]["id"])
                console.print(f"[red]{batch[i]['id']}: {type(exc).__name__}: {exc}[/red]", highlight=False)

            # an endpoint's per-request failures are reported, the rest of the batch kept
            results = calls.generate(convs, lora=lora, on_error=on_error if spec.engine == "openai" else None)
            for it, conv, comps in zip(batch, convs, results):
                if comps:
                    w.write({"id": it["id"], "messages": conv, "completions": [c.to_dict() for c in comps], **meta})
                    counts["generated"] += 1
            w.flush()
    counts["failed"] = len(failed)
    return counts


def generate_from_recipe(
    recipe: Recipe,
    role: str = "student",
    prompts: Path | None = None,
    out: Path | None = None,
    lora: str | None = None,
    batch_size: int = 32,
    console: Console | None = None,
) -> tuple[dict, Path]:
    """``toushi generate``: prompts from a file (or the run's held-out prompts) through a recipe role."""
    spec, lora_name = generation_spec(recipe, role, lora)
    items = read_items(prompts, recipe.run.lang) if prompts else heldout_items(recipe)
    system = render_file(spec.system_prompt_file, lang=recipe.run.lang) if spec.system_prompt_file else None
    out = out or recipe.run_dir / "generate" / f"{lora or role}.jsonl"
    counts = generate_file(spec, items, out, spec.sampling, lora_name, system, batch_size, console)
    return counts, out
