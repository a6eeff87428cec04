"""The memory planner's arithmetic (toushi/plan.py): parameter counts against the real models' published sizes and
against a loaded model and a PEFT adapter, refusals that say why, the pool asking it, and `toushi plan`."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from toushi.cli import app
from toushi.engines.pool import fits_together
from toushi.paths import repo_root
from toushi.plan import (
    GIB,
    PlanError,
    checkpointing_needed,
    plan,
    resolve_auto,
    shape_of,
    stage_item,
    training_item,
)
from toushi.recipe import ModelSpec, load_recipe

GPU_RECIPE = repo_root() / "recipes" / "r1-qwen-gpu.yaml"


def test_shapes_count_the_published_parameters():
    # the hub models' own counts (model cards / safetensors metadata): Qwen2.5-1.5B ties its embeddings, the
    # R1 distills do not (R1-1.5B: the same decoder plus a head of its own)
    assert shape_of("Qwen/Qwen2.5-1.5B-Instruct").params == 1_543_714_304
    assert shape_of("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B").params == 7_615_616_512
    assert shape_of("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B").params == 1_543_714_304 + 151_936 * 1536
    # LoRA r16 on every linear layer of Qwen2.5-1.5B: PEFT's trainable-parameter count for it
    assert shape_of("Qwen/Qwen2.5-1.5B-Instruct").lora_params(16, "all-linear") == 18_464_768
    with pytest.raises(PlanError, match="no config.json|not in the cache"):
        shape_of("someone/not-a-model-here")


def test_a_config_of_another_layout_is_refused_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "t5", "d_model": 512, "vocab_size": 32128}')
    with pytest.raises(PlanError, match="no hidden_size: the plan reads decoder-only models"):
        shape_of(str(tmp_path))


def test_shape_matches_a_loaded_model_and_its_adapter(offline_model):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    shape = shape_of(str(offline_model))
    model = AutoModelForCausalLM.from_pretrained(offline_model, dtype=torch.float32)
    assert shape.params == sum(p.numel() for p in model.parameters())
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert shape.lora_params(8, "all-linear") == trainable
    assert shape.lora_params(8, ["q_proj", "v_proj"]) < trainable


def test_levers_move_the_estimate_the_way_they_should():
    recipe = load_recipe(GPU_RECIPE)
    student = shape_of(recipe.models.student.name)
    base = recipe.sft.model_copy(deep=True)
    base.train.gradient_checkpointing = False
    full = training_item("sft", base, student, "bfloat16")
    ckpt = training_item("sft", recipe.sft, student, "bfloat16")
    assert ckpt.parts["activations"] < full.parts["activations"] / 5  # only each layer's input is kept
    liger = base.model_copy(deep=True)
    liger.train.use_liger_kernel = True
    assert training_item("sft", liger, student, "bfloat16").parts["logits"] == 0
    qlora = base.model_copy(deep=True)
    qlora.lora.qlora = True
    q = training_item("sft", qlora, student, "bfloat16")
    assert q.parts["weights"] < full.parts["weights"] / 2 and q.parts["adapter+adamw"] == full.parts["adapter+adamw"]
    assert q.parts["dequantised"] == 2 * shape_of(recipe.models.student.name).linear_params
    dpo = training_item("dpo", recipe.dpo, student, "bfloat16")
    assert dpo.notes[0].startswith(f"{2 * recipe.dpo.train.per_device_train_batch_size} rows")  # chosen + rejected
    assert full.parts["adapter+adamw"] == 16 * 18_464_768
    assert full.parts["weights"] == 2 * 1_543_714_304


def test_gpu_recipe_fits_an_h200_and_is_refused_on_a_small_card():
    recipe = load_recipe(GPU_RECIPE)
    items, problems = plan(recipe, 141 * GIB)
    assert not problems, problems
    names = {it.name for it in items}
    assert {"weak engine", "strong engine", "student engine", "sft", "dpo", "grpo", "distill", "selftrain"} <= names
    distill = next(it for it in items if it.name == "distill")
    assert distill.parts["teacher"] > 7_615_616_512 * 2  # R1-7B in bf16 sits in the trainer's process
    strong = next(it for it in items if it.name == "strong engine")
    assert strong.parts["weights"] + strong.parts["kv cache"] == pytest.approx(0.85 * 141 * GIB)
    # a 24 GiB card: distill's teacher and student do not fit, and neither does the 7B engine at 0.1 of it
    small = recipe.model_copy(deep=True)
    small.models.strong.gpu_memory_utilization = 0.1
    _, problems = plan(small, 24 * GIB)
    assert any(p.startswith("distill:") for p in problems), problems
    assert any(p.startswith("models.strong:") and "no room for a KV cache" in p for p in problems), problems


def test_pool_counts_weights_beside_explicit_kv_budgets(monkeypatch):
    import toushi.plan

    pair = [ModelSpec(name="Qwen/Qwen2.5-1.5B-Instruct", engine="vllm", dtype="bfloat16", kv_cache_gb=2.0),
            ModelSpec(name="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", engine="vllm", dtype="bfloat16",
                      kv_cache_gb=2.0)]
    # weights 2.9 + 14.2 GiB and 4 GiB of caches: they fit a 24 GiB card, not a 20 GiB one (0.9 of it)
    monkeypatch.setattr(toushi.plan, "card_memory", lambda: (24 * GIB, True, "a 24 GiB card"))
    assert fits_together(pair)
    monkeypatch.setattr(toushi.plan, "card_memory", lambda: (20 * GIB, True, "a 20 GiB card"))
    assert not fits_together(pair)


def test_plan_cli_prints_every_item_and_refuses_what_cannot_fit():
    ok = CliRunner().invoke(app, ["plan", str(GPU_RECIPE), "--card-gib", "141"])
    assert ok.exit_code == 0, ok.output
    assert "distill" in ok.output and "strong engine" in ok.output and "141 GiB" in ok.output
    bad = CliRunner().invoke(app, ["plan", str(GPU_RECIPE), "--card-gib", "24"])
    assert bad.exit_code == 2 and "does not fit: distill" in bad.output, bad.output


def test_gradient_checkpointing_auto_is_on_only_when_memory_needs_it():
    """The GPU recipe's sft (Qwen2.5-1.5B, 8 rows x 2,048 tokens) without checkpointing: activations and the 152k
    logits of a full micro-batch fit an H200 but not a 48 GiB card; the plan shows what the trainer will choose."""
    recipe = load_recipe(GPU_RECIPE, ["sft.train.gradient_checkpointing=auto", "sft.train.largest_micro_batch=false"])
    on, why = checkpointing_needed(recipe, "sft", 141 * GIB, on_gpu=True)
    without = stage_item(recipe, "sft", 141 * GIB, True, checkpointing=False).total
    assert not on and why.startswith(f"off: {without / GIB:.1f} GiB without it") and 60 * GIB < without < 0.9 * 141 * GIB
    on, why = checkpointing_needed(recipe, "sft", 48 * GIB, on_gpu=True)
    assert on and why.startswith(f"on: {without / GIB:.1f} GiB without it is over 90% of the 48 GiB card")
    items, problems = plan(recipe, 141 * GIB)
    sft = next(it for it in items if it.name == "sft")
    assert sft.total == pytest.approx(without) and any(n.startswith("gradient checkpointing (auto) off") for n in sft.notes)
    small, _ = plan(recipe, 48 * GIB)
    assert next(it for it in small if it.name == "sft").total == pytest.approx(
        stage_item(recipe, "sft", 48 * GIB, True, checkpointing=True).total)
    unreadable = recipe.model_copy(deep=True)
    unreadable.models.student.name = "someone/not-a-model-here"
    on, why = checkpointing_needed(unreadable, "sft", 141 * GIB, on_gpu=True)
    assert on and why.startswith("on: the plan cannot read")


def test_qlora_auto_only_where_the_bf16_base_does_not_fit():
    """QLoRA is chosen before checkpointing: at 141 GiB the GPU recipe's sft stays bf16 (29.6 GiB even with
    checkpointing); at 24 GiB it does not fit in bf16, so the base goes 4-bit and checkpointing is decided on that."""
    recipe = load_recipe(GPU_RECIPE, ["sft.lora.qlora=auto", "sft.train.gradient_checkpointing=auto",
                                      "sft.train.largest_micro_batch=false"])
    big = recipe.model_copy(deep=True)
    assert resolve_auto(big, "sft", 141 * GIB, on_gpu=True) == [
        "qlora (auto) off: 29.6 GiB in bf16 fits 90% of the 141 GiB card (126.9)",
        "gradient checkpointing (auto) off: 82.1 GiB without it fits 90% of the 141 GiB card (126.9)"]
    assert (big.sft.lora.qlora, big.sft.train.gradient_checkpointing) == (False, False)
    small = recipe.model_copy(deep=True)
    notes = resolve_auto(small, "sft", 24 * GIB, on_gpu=True)
    assert notes[0] == "qlora (auto) on: 29.6 GiB in bf16 is over 90% of the 24 GiB card (21.6)"
    assert small.sft.lora.qlora is True and small.sft.train.gradient_checkpointing is True
    items, _ = plan(recipe, 24 * GIB)
    sft = next(it for it in items if it.name == "sft")
    assert "dequantised" in sft.parts and sft.notes[1].startswith("qlora (auto) on")
    assert recipe.sft.lora.qlora == "auto"  # the plan decides on its own copy
    cpu = recipe.model_copy(deep=True)
    assert resolve_auto(cpu, "sft", 24 * GIB, on_gpu=False)[0] == "qlora (auto) off: no CUDA device"


def test_largest_micro_batch_keeps_the_step_and_fits_the_card():
    """largest_micro_batch re-splits a step's examples: on an H200 the GPU recipe's own splits are already the
    largest that fit without checkpointing; on an 80 GiB card smaller micro-batches replace checkpointing; at 24 GiB
    dpo needs checkpointing for any split, and distill fits none. Each chosen split fits, the next larger does not."""
    stages = ("sft", "dpo", "grpo", "distill", "selftrain")
    sets = [f"{s}.train.largest_micro_batch=true" for s in stages]
    recipe = load_recipe(GPU_RECIPE, sets)
    asked = {s: getattr(recipe, s).train for s in stages}
    chosen = {}
    for card in (141, 80, 24):
        r = recipe.model_copy(deep=True)
        notes = {s: resolve_auto(r, s, card * GIB, on_gpu=True) for s in stages}
        for s in stages:
            t = getattr(r, s).train
            assert t.per_device_train_batch_size * t.gradient_accumulation_steps == (
                asked[s].per_device_train_batch_size * asked[s].gradient_accumulation_steps)
            chosen[card, s] = (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.gradient_checkpointing)
            if (card, s) == (24, "distill"):
                continue
            assert stage_item(r, s, card * GIB, True).total <= 0.9 * card * GIB
            larger = [d for d in range(t.per_device_train_batch_size + 1, 65)
                      if (t.per_device_train_batch_size * t.gradient_accumulation_steps) % d == 0]
            if larger:
                bigger = r.model_copy(deep=True)
                getattr(bigger, s).train.per_device_train_batch_size = larger[0]
                assert stage_item(bigger, s, card * GIB, True).total > 0.9 * card * GIB, (card, s)
    assert chosen[141, "sft"] == (8, 2, False) and chosen[141, "distill"] == (8, 2, False)
    assert chosen[80, "sft"] == (4, 4, False) and chosen[80, "dpo"] == (2, 8, False)
    assert chosen[24, "dpo"] == (2, 8, True)  # one pair without checkpointing is over 21.6 GiB
    assert chosen[24, "distill"] == (1, 16, True)
    r = recipe.model_copy(deep=True)
    assert resolve_auto(r, "distill", 24 * GIB, on_gpu=True) == [
        "micro-batch (largest) 1 x 16 accumulated, gradient checkpointing (auto) on: not even one row fits 90% of "
        "the 24 GiB card (21.6)"]
    assert resolve_auto(r, "sft", 80 * GIB, on_gpu=True) == [
        "micro-batch (largest) 4 x 4 accumulated: 42.6 GiB without gradient checkpointing fits 90% of the 80 GiB "
        "card (72.0)", "gradient checkpointing (auto) off: a micro-batch fits without it"]
    _, problems = plan(recipe, 24 * GIB)  # the plan shows the same decisions and still refuses distill there
    assert any(p.startswith("distill: ") and "1 rows x" in p for p in problems), problems
    # checkpointing fixed on: the split is searched with it
    fixed = load_recipe(GPU_RECIPE, [*sets, "sft.train.gradient_checkpointing=true"])
    notes = resolve_auto(fixed, "sft", 80 * GIB, on_gpu=True)
    assert fixed.sft.train.per_device_train_batch_size == 16 and len(notes) == 1 and "with gradient" in notes[0]
    unreadable = recipe.model_copy(deep=True)
    unreadable.models.student.name = "someone/not-a-model-here"
    notes = resolve_auto(unreadable, "sft", 141 * GIB, on_gpu=True)
    assert notes[0].startswith("micro-batch (largest) kept at 8 x 2, gradient checkpointing (auto) on: the plan "
                               "cannot read") and unreadable.sft.train.gradient_checkpointing is True
    # QLoRA is weighed at the smallest split: one row of Qwen2.5-1.5B in bf16 fits 24 GiB, so no 4-bit base
    q = load_recipe(GPU_RECIPE, [*sets, "sft.lora.qlora=auto"])
    notes = resolve_auto(q, "sft", 24 * GIB, on_gpu=True)
    assert notes[0].startswith("qlora (auto) off:") and q.sft.lora.qlora is False
    assert (q.sft.train.per_device_train_batch_size, q.sft.train.gradient_checkpointing) == (1, False)


def test_run_refuses_on_a_gpu_what_cannot_fit_before_any_stage(tmp_path, monkeypatch):
    """`toushi run` on a 24 GiB card: distill (teacher and student in one process) is refused by the plan before
    the first stage, naming it; on a CPU the run is not checked; on an H200 the recipe passes."""
    import toushi.hardware
    import toushi.plan
    from toushi.cli import refuse_what_cannot_fit

    monkeypatch.setattr(toushi.hardware, "cuda_possible", lambda: True)  # this machine has no driver files
    monkeypatch.setattr(toushi.plan, "card_memory", lambda: (24 * GIB, True, "NVIDIA L4"))
    bad = CliRunner().invoke(app, ["run", str(GPU_RECIPE), "--set", f"run.dir={tmp_path}"])
    assert bad.exit_code == 2, bad.output
    assert "does not fit: distill" in bad.output and "NVIDIA L4 (24 GiB) cannot hold" in bad.output
    assert not (tmp_path / "r1-qwen").exists()  # no stage started
    monkeypatch.setattr(toushi.plan, "card_memory", lambda: (141 * GIB, True, "NVIDIA H200"))
    refuse_what_cannot_fit(load_recipe(GPU_RECIPE))  # no exit
    monkeypatch.setattr(toushi.plan, "card_memory", lambda: (24 * GIB, False, "this machine's RAM"))
    refuse_what_cannot_fit(load_recipe(GPU_RECIPE))
    # no driver files: torch is not even asked (a CPU `toushi run` does not pay its import for this)
    monkeypatch.setattr(toushi.hardware, "cuda_possible", lambda: False)
    monkeypatch.setattr(toushi.plan, "card_memory", lambda: pytest.fail("card_memory asked without a GPU driver"))
    refuse_what_cannot_fit(load_recipe(GPU_RECIPE))
