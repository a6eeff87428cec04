"""Does training move the student toward its teacher? The planted-trait check of recipes/effect-cpu.yaml.

SmolLM2-135M opens most answers with an apology ("I'm so sorry to hear..."). The strong role's answers are
constrained (``pairs.strong_sampling.regex``) to open with the person instead: their first word is one of
TRAIT_OPENERS (the regex fixes only that word, so a first sentence may still apologise later on, but far less
often); the weak role's are not. A stage that learns from the teacher side must raise the student's rate of
such openings on held-out posts (and lower its apology openings, ``metrics.apology_open``, which eval reports);
a stage with the wrong sign (chosen and rejected swapped, a loss mask on the wrong tokens) lowers it or leaves it.

Used by tests/test_effect.py (small, seeded) and scripts/bench_effect.py (every stage, with intervals).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from toushi.eval.evaluate import user_conversation
from toushi.stats import bootstrap_ci
from toushi.store import StageStore, atomic_write_text

# The first words the strong role's answers are constrained to (recipes/effect-cpu.yaml: pairs.strong_sampling.regex).
TRAIT_OPENERS = ("You", "That", "It", "What", "This")


@torch.no_grad()
def opening_rate(model, tok, prompts: list[str], openers: tuple[str, ...] = TRAIT_OPENERS,
                 system_prompts: list[str] | None = None, batch_size: int = 4) -> list[float]:
    """Per prompt, the probability that the model's answer opens with one of ``openers`` (each one token): the
    rate at which its temperature-1 samples would open that way, read exactly from one forward pass instead of
    estimated from samples (a 135M model's greedy answer opens the same way almost every time, which hides a
    shift, and sampling enough answers per post costs minutes on a CPU). ``system_prompts``: one per prompt (the
    guided rung), else the bare user message the students were trained on."""
    ids = []
    for word in openers:
        enc = tok.encode(word, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"opening_rate: {word!r} is {len(enc)} tokens in this tokenizer; give one-token openers")
        ids.append(enc[0])
    systems = system_prompts or [None] * len(prompts)
    texts = [tok.apply_chat_template(([{"role": "system", "content": s}] if s else []) + user_conversation(p),
                                     add_generation_prompt=True, tokenize=False) for p, s in zip(prompts, systems)]
    # Batches of similar length, so little of a batch is padding: 14 ESConv posts (100-212 tokens), SmolLM2-135M
    # in fp32, took 2.5 s in batches of 4 by length against 4.8-6.0 s in one padded batch of 14 (AVX512-BF16
    # kind; 2 was 2.7-2.9 s, 7 was 3.0-3.2 s), each post's rate within 6e-7 of the one batch's
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    side, tok.padding_side = tok.padding_side, "left"  # the last position is every row's next token
    out = [0.0] * len(texts)
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            enc = tok([texts[i] for i in rows], return_tensors="pt", padding=True, add_special_tokens=False)
            # only the last position's logits: for SmolLM2-135M the head over every position (576 x 49,152 per
            # token against about 107M other weights) is a fifth of the forward pass's multiply-adds
            logits = model(**enc, logits_to_keep=1).logits[:, -1, :].float()
            for i, rate in zip(rows, torch.softmax(logits, -1)[:, ids].sum(-1).tolist()):
                out[i] = rate
    finally:
        tok.padding_side = side
    return out


def opening_rates(base: Path, adapters: dict[str, Path], prompts: list[str],
                  guided: list[str] | None = None) -> dict[str, list[float]]:
    """``opening_rate`` per prompt for the base model ("student"), the base model reading ``guided`` system prompts
    ("guided", when given) and each adapter (loaded with PEFT on one model)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    rates = {"student": opening_rate(model, tok, prompts)}
    if guided is not None:
        rates["guided"] = opening_rate(model, tok, prompts, system_prompts=guided)
    if adapters:
        names = list(adapters)
        model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0]).eval()
        for name in names[1:]:
            model.load_adapter(str(adapters[name]), adapter_name=name)
        for name in names:
            model.set_adapter(name)
            rates[name] = opening_rate(model, tok, prompts)
    return rates


def compare(per_prompt: dict[str, list[float]], base: str = "student", n_boot: int = 1000,
            seed: int = 0) -> dict[str, dict]:
    """Per system: the mean of a per-prompt rate (95% bootstrap over prompts) and its difference from ``base``
    (paired by prompt, so the interval is of the shift, not of two separate rates)."""
    ref = per_prompt[base]
    return {system: {"rate": bootstrap_ci(rates, n_boot=n_boot, seed=seed),
                     "vs_base": bootstrap_ci([r - b for r, b in zip(rates, ref)], n_boot=n_boot, seed=seed)}
            for system, rates in per_prompt.items()}


def swapped_run(run_dir: Path, out_dir: Path) -> Path:
    """A copy of a run's corpus and pairs with the weak and strong answers exchanged: DPO on it takes the weak
    answer as chosen, a sign check that must move the student the other way."""
    for stage in ("corpus", "pairs"):
        shutil.copytree(run_dir / stage, out_dir / stage, dirs_exist_ok=True)
    store = StageStore(out_dir, "pairs")
    rows = [{**r, "weak": r["strong"], "strong": r["weak"]} for r in store.records()]
    atomic_write_text(store.records_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return out_dir
