"""Parity of an exported student with the adapter it came from: the same greedy answers, up to dtype noise.

A merged LoRA can answer differently from base + adapter (a wrong scale, a dropped module, a tokenizer or
template that did not travel, an engine that loads the weights differently). The check asks every backend
for greedy answers to the same prompts and compares each with the reference (the base model with the
adapter, through PEFT). Identical answers pass. Where two answers part, the reference model scores the
first differing token of each: if it finds them within ``tolerance`` nats of each other the reference
itself was nearly undecided there, and the difference is dtype noise; otherwise it is a mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path

from toushi.engines import Engine, make_engine
from toushi.eval.evaluate import heldout_prompts, user_conversation
from toushi.recipe import ModelSpec, Sampling
from toushi.store import StageStore, atomic_write_text

BUILTIN_POSTS = Path(__file__).parent / "data" / "parity_posts.jsonl"
# Largest logprob gap (nats) between the two differing tokens that still counts as noise, by the least
# precise dtype involved: fp32 kernels differ in the last bits; 16-bit weights and activations round at ~3
# significant digits; 8-bit GGUF quantization moves logits further.
TOLERANCE = {"float32": 0.05, "float16": 0.5, "bfloat16": 0.5, "q8_0": 1.0}


def parity_prompts(run_dir: Path | None, n: int, lang: str = "en") -> tuple[list[str], str]:
    """Up to ``n`` held-out prompts of the run, asked as eval asks them; else the built-in posts in the
    run's language through the support-task template. Returns (prompts, where they came from)."""
    if run_dir is not None:
        held = heldout_prompts(StageStore(Path(run_dir), "pairs").records(), n)
        if held:
            return [r["prompt"] for r in held], "held-out prompts of the run"
    from toushi.pairs import task_prompt

    posts = [json.loads(line) for line in BUILTIN_POSTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    posts = [p for p in posts if p["lang"] == lang] or posts
    return [task_prompt(p["text"], p["lang"]) for p in posts[:n]], "built-in posts (the run has no held-out prompts)"


def tolerance(*dtypes: str) -> float:
    return max(TOLERANCE.get(d, TOLERANCE["bfloat16"]) for d in dtypes)


def greedy(engine: Engine, prompts: list[str], max_tokens: int, lora_name: str | None = None) -> list[dict]:
    outs = engine.generate([user_conversation(p) for p in prompts], Sampling(temperature=0.0, max_tokens=max_tokens),
                           lora_name=lora_name)
    return [{"text": o[0].text, "finish_reason": o[0].finish_reason} for o in outs]


def answers_of(spec: ModelSpec, prompts: list[str], max_tokens: int, lora_name: str | None = None) -> list[dict]:
    """Greedy answers of one backend; its engine is freed before the next loads."""
    with make_engine(spec) as engine:
        return greedy(engine, prompts, max_tokens, lora_name)


def _first_gap(model, tok, prompt: str, ref: dict, cand: dict) -> tuple[int | None, float]:
    """(index of the first differing answer token, the reference's logprob of its own token there minus
    that of the candidate's). (None, 0.0) when the answers agree up to where the shorter was cut off."""
    import torch

    a = tok(ref["text"], add_special_tokens=False)["input_ids"]
    b = tok(cand["text"], add_special_tokens=False)["input_ids"]
    k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    if len(a) == len(b) == k:
        return None, 0.0
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos if eos is not None else tok.eos_token_id
    nxt = []
    for seq, ans in ((a, ref), (b, cand)):
        if k < len(seq):
            nxt.append(seq[k])
        elif ans["finish_reason"] == "length":
            return None, 0.0  # one answer ran out of tokens where the other went on: no divergence seen
        else:
            nxt.append(eos)
    ids = tok.apply_chat_template(user_conversation(prompt), add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    ids = torch.tensor([list(ids) + a[:k]], device=model.device)
    with torch.inference_mode():
        logprobs = model(input_ids=ids).logits[0, -1].float().log_softmax(-1)
    return k, float(logprobs[nxt[0]] - logprobs[nxt[1]])


def compare(reference: Engine, prompts: list[str], ref: list[dict], candidates: dict[str, list[dict]],
            tol: float) -> dict:
    """The comparison of every candidate with the reference answers, prompt by prompt."""
    backends = {}
    for name, answers in candidates.items():
        items = []
        for prompt, r, c in zip(prompts, ref, answers):
            if r["text"] == c["text"]:
                items.append({"verdict": "same", "text": c["text"]})
                continue
            k, gap = _first_gap(reference.model, reference.tokenizer, prompt, r, c)
            verdict = "same" if k is None else "noise" if gap <= tol else "mismatch"
            items.append({"verdict": verdict, "first_diff_token": k, "gap_nats": round(gap, 4), "text": c["text"]})
        counts = {v: sum(1 for i in items if i["verdict"] == v) for v in ("same", "noise", "mismatch")}
        backends[name] = {**counts, "ok": counts["mismatch"] == 0, "items": items}
    return backends


def check(reference: ModelSpec, prompts: list[str], candidates: dict[str, list[dict]], tol: float, max_tokens: int,
          lora_name: str | None = None) -> dict:
    """The reference's greedy answers (``lora_name``: through its adapter) and each candidate compared with
    them; ``ok`` when no candidate has a mismatch."""
    with make_engine(reference) as engine:
        ref = greedy(engine, prompts, max_tokens, lora_name)
        backends = compare(engine, prompts, ref, candidates, tol)
    return {"tolerance_nats": tol, "max_tokens": max_tokens, "prompts": prompts,
            "reference_answers": [r["text"] for r in ref], "backends": backends,
            "ok": all(b["ok"] for b in backends.values())}


def check_parity(adapter_dir: Path, base: str, merged_dir: Path, prompts: list[str], *, dtype: str = "float32",
                 vllm_spec: ModelSpec | None = None, max_tokens: int = 48) -> dict:
    """Greedy answers of the merged model under transformers (and under vLLM when ``vllm_spec`` is given)
    against base + adapter through PEFT, all in ``dtype``."""
    candidates = {}
    if vllm_spec is not None:
        candidates["vllm"] = answers_of(vllm_spec.model_copy(update={"name": str(merged_dir), "dtype": dtype}),
                                        prompts, max_tokens)
    candidates["transformers"] = answers_of(ModelSpec(name=str(merged_dir), engine="hf", dtype=dtype, hf_batch_size=1),
                                            prompts, max_tokens)
    ref_spec = ModelSpec(name=base, engine="hf", dtype=dtype, hf_batch_size=1,
                         lora_adapters={"adapter": Path(adapter_dir)})
    result = check(ref_spec, prompts, candidates, tolerance(dtype), max_tokens, lora_name="adapter")
    return {"reference": f"{base} + {adapter_dir} (PEFT, transformers)", "dtype": dtype, **result}


def summary_line(result: dict) -> str:
    """One line: per backend, same / noise / mismatch counts."""
    parts = [f"{name}: {b['same']} same, {b['noise']} within noise, {b['mismatch']} mismatched"
             for name, b in result["backends"].items()]
    return "; ".join(parts)


def write_result(result: dict, path: Path) -> Path:
    atomic_write_text(path, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return path
