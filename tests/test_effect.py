"""Training moves the student toward its teacher: the planted trait of recipes/effect-cpu.yaml, small and seeded.

The strong role's answers are constrained to open with the person (first word You, That, It, What or This), where
SmolLM2 opens most answers with "I'm so sorry..."; the weak role's are not. On held-out ESConv posts (none trained
on), the rate at which the student's answers open that way (toushi.effect.opening_rate, read exactly from the
first-token distribution):
- rises after SFT on the strong answers and after DPO with strong = chosen;
- falls after DPO with chosen and rejected swapped (a sign check: a swapped pair builder fails here);
- rises after on-policy distillation from a teacher that learned the trait (the SFT student, merged, as
  models.strong), whose reverse KL to that teacher on the teacher's own held-out answers is below the base's.
Sized to show the effect on 3 seeds (run.seed 0, 1, 2 measured before settling, on the AVX2 kind: see
docs/benchmarks.md); the seed here is 0 (TOUSHI_EFFECT_SEED picks another, to check a new size on all three). Every stage runs its real code: pairs through the runner on vLLM (the
constraint through its structured outputs), the training scripts' main().
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_train import train_in_process

from toushi.recipe import load_recipe, save_recipe
from toushi.store import StageStore

# the size below was checked on run.seed 0, 1 and 2: TOUSHI_EFFECT_SEED=1 pytest tests/test_effect.py reruns that
SEED = int(os.environ.get("TOUSHI_EFFECT_SEED", "0"))
STEPS = 4
# 40 posts (about 28 to learn from, 12 held out); each training stage 4 steps. max_length 128 keeps each example's
# prompt and the opening of its answer, where the trait lives, so a step costs seconds on a CPU. Each answer is one
# sentence (it ends at the first full stop, at most 48 tokens): the opening is all a step sees of it, and whole
# paragraphs cost most of the pairs stage's time.
ONE_SENTENCE = ['stop=[".", "!", "?", "\\n\\n"]', "max_tokens=48"]
SIZES = [
    "corpus.max_posts=40", "corpus.heldout_fraction=0.3",
    *(f"models.weak.sampling.{s}" for s in ONE_SENTENCE), *(f"pairs.strong_sampling.{s}" for s in ONE_SENTENCE),
    f"sft.train.max_steps={STEPS}", f"sft.train.save_steps={STEPS}", "sft.train.per_device_train_batch_size=4",
    "sft.train.max_length=128", "sft.train.learning_rate=1e-3",
    f"dpo.train.max_steps={STEPS}", f"dpo.train.save_steps={STEPS}", "dpo.train.per_device_train_batch_size=2",
    "dpo.train.max_length=128", "dpo.train.learning_rate=5e-4",
    f"distill.train.max_steps={STEPS}", f"distill.train.save_steps={STEPS}", "distill.train.per_device_train_batch_size=4",
    "distill.max_completion_length=16", "distill.train.learning_rate=5e-4", "distill.teacher=strong",
]


def _recipe(root: Path, name: str, shared: Path, *extra: str):
    sets = [f"run.name={name}", f"run.dir={root}", f"run.seed={SEED}", "run.stages=[corpus,pairs]",
            f"corpus.sources.0.fallback={shared / 'esconv' / 'train.jsonl'}", *SIZES, *extra]
    return load_recipe("recipes/effect-cpu.yaml", sets)


@pytest.fixture(scope="module")
def effect(tmp_path_factory, shared_data, offline_model):
    from toushi.effect import compare, opening_rates, swapped_run
    from toushi.export import merge
    from toushi.runner import run_stages
    from toushi.stages import STAGES

    # the Hub is not reachable (conftest sets HF_HUB_OFFLINE): the corpus reads the split's fallback copy
    root = tmp_path_factory.mktemp("effect")
    recipe = _recipe(root, "fx", shared_data)
    assert run_stages(recipe, STAGES) == {"corpus": "ran", "pairs": "ran"}
    run_dir = recipe.run_dir
    path = save_recipe(recipe, root / "fx-recipe")
    train_in_process("sft", path)
    train_in_process("dpo", path)

    swapped = _recipe(root, "fx-swapped", shared_data)
    swapped_run(run_dir, swapped.run_dir)
    train_in_process("dpo", save_recipe(swapped, root / "swapped-recipe"))

    teacher = merge(run_dir / "sft" / "adapter", root / "sft-merged", base=str(offline_model))
    distill = _recipe(root, "fx", shared_data, f"models.strong.name={teacher}", "models.strong.system_prompt_file=null")
    train_in_process("distill", save_recipe(distill, root / "distill-recipe"))

    held = [p for p in StageStore(run_dir, "pairs").records() if p["split"] == "heldout"]
    adapters = {"sft": run_dir / "sft" / "adapter", "dpo": run_dir / "dpo" / "adapter",
                "dpo_swapped": swapped.run_dir / "dpo" / "adapter", "distill": run_dir / "distill" / "adapter"}
    rates = opening_rates(offline_model, adapters, [p["prompt"] for p in held])
    result = compare(rates, n_boot=1000, seed=SEED)
    print("opening rates:", {s: {k: round(v[k]["mean"], 3) for k in ("rate", "vs_base")} for s, v in result.items()})
    return {"run_dir": run_dir, "held": held, "teacher": teacher, "base": offline_model,
            "result": result}


def test_opening_rate_batches_by_length_and_keeps_each_posts_rate(tiny_model):
    """opening_rate runs its forward passes in batches of similar length: each post's rate comes back in its
    place, as it is when read alone (the paired differences of compare() rely on it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toushi.effect import opening_rate

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    posts = ["My exam went badly and I keep thinking about what my parents will say. " * 3, "I lost my job.",
             "My cat is sick and the vet is expensive; I do not know what to do.", "Nobody came.",
             "I moved to a new city and the evenings are long without friends. " * 2, "I failed."]
    batched = opening_rate(model, tok, posts, batch_size=4)  # lengths out of order: the batches regroup them
    alone = [opening_rate(model, tok, [p])[0] for p in posts]
    assert batched == pytest.approx(alone, rel=1e-5)
    assert max(alone) - min(alone) > 100 * 1e-5 * max(alone)  # the posts' rates differ: a mix-up would show


def test_the_trait_is_planted_in_the_teacher_side_only(effect):
    from toushi.effect import TRAIT_OPENERS
    from toushi.metrics import apology_open

    pairs = StageStore(effect["run_dir"], "pairs").records()
    strong = [p["strong"][0]["text"] for p in pairs]
    weak = [p["weak"][0]["text"] for p in pairs]
    assert len(pairs) == 40 and len(effect["held"]) >= 6  # the split is per scene: 8 to 14 here, by seed
    # the constraint held on every strong answer: its first word is one of the openers; the weak side shows the
    # base model's habit. The regex fixes only the first word ("It is ..., and I'm sorry to hear" still happens),
    # so the apology rate of the strong side drops a lot but not always to 0 (one-sentence answers: 0, 0 and 3
    # of 40 at seeds 0, 1, 2; weak 34, 37 and 38)
    assert all(t.split(" ", 1)[0] in TRAIT_OPENERS for t in strong), strong
    assert sum(t.split(" ", 1)[0] in TRAIT_OPENERS for t in weak) <= len(weak) // 4, weak
    assert sum(map(apology_open, weak)) >= len(weak) // 3, weak
    assert 4 * sum(map(apology_open, strong)) <= sum(map(apology_open, weak)), strong


def test_training_stages_move_the_planted_trait(effect):
    """The rate at which the student's answers open as the teacher's do, on held-out posts: up after SFT, DPO
    and distillation from the trained teacher; down after DPO with chosen and rejected swapped."""
    r = effect["result"]
    rates = {s: round(v["rate"]["mean"], 3) for s, v in r.items()}
    assert 0.01 <= r["student"]["rate"]["mean"] <= 0.5, rates  # room to move either way
    assert r["student"]["rate"]["n"] == len(effect["held"])
    for system in ("sft", "dpo", "distill"):
        assert r[system]["vs_base"]["lo"] > 0, (system, rates, r[system]["vs_base"])
    assert r["dpo_swapped"]["vs_base"]["hi"] < 0, (rates, r["dpo_swapped"]["vs_base"])


def test_distill_from_a_trained_teacher_lowers_reverse_kl_to_it(effect):
    """Held-out prompts: the teacher (the SFT student, merged) writes greedy answers; the distilled student's
    reverse KL to the teacher over them is below the base student's."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toushi.engines import make_engine
    from toushi.pairs import conversation
    from toushi.recipe import ModelSpec, Sampling
    from toushi.teacher import answer_divergence, teacher_prompt_ids

    teacher_path, held = effect["teacher"], effect["held"][:8]
    convs = [conversation(p["prompt"], None) for p in held]
    # the teacher's greedy answers through toushi's hf engine (batches of similar length). Their first 24 tokens
    # are a fixed text to measure the KL over, not a target: an answer cut there is fine for that
    with make_engine(ModelSpec(name=str(teacher_path), engine="hf", dtype="float32")) as engine:
        answers = [c[0].text.strip() for c in engine.generate(convs, Sampling(temperature=0.0, max_tokens=24))]
    assert all(answers)
    tok = AutoTokenizer.from_pretrained(teacher_path)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    prompts = [teacher_prompt_ids(tok, c) for c in convs]
    student = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(effect["base"], dtype=torch.float32),
                                        str(effect["run_dir"] / "distill" / "adapter")).eval()

    memo: dict = {}  # the teacher's logits over each answer, read once for both students

    def kl(model) -> float:
        rows = [answer_divergence(model, tok, [{"role": "user", "content": p["prompt"]}], teacher, ids, a, memo)
                for p, ids, a in zip(held, prompts, answers)]
        return sum(r["kl"] * r["tokens"] for r in rows) / sum(r["tokens"] for r in rows)

    trained = kl(student)
    assert len(memo) == len(held)
    with student.disable_adapter():
        base = kl(student)
    assert len(memo) == len(held)  # the second student's rows reused the teacher's logits
    assert trained < base, (trained, base)
