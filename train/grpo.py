"""GRPO of the student with rule rewards (and, optionally, a judge), over TRL's GRPOTrainer.

    accelerate launch [--config_file recipes/accelerate/X.yaml] train/grpo.py --recipe recipes/X.yaml \
        [--set grpo.train.max_steps=20] [--resume]

recipe -> student (+ LoRA, or the SFT adapter to continue from) -> prompts from the run's training split
-> rewards from toushi.rewards, weighted as grpo.reward_weights says -> TRL GRPOTrainer ->
runs/<run>/grpo/adapter/ (PEFT adapter + tokenizer) and the stage manifest (reward curves, tokens/s).
Generation: plain `generate` on CPU; TRL's colocated vLLM on GPU (grpo.use_vllm, by default on when CUDA
and vLLM are available).
"""

from __future__ import annotations

import gc
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from toushi.heap import imports_done  # noqa: E402
from toushi.training import leave_out_unused  # noqa: E402

if __name__ == "__main__":
    gc.disable()  # the imports' objects are not garbage: no collections while they grow (toushi/heap.py)
    leave_out_unused("grpo")  # before peft and TRL are imported: what this run cannot use, they do not load

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from toushi.datasets import load_grpo  # noqa: E402
from toushi.digests import path_digest  # noqa: E402
from toushi.engines.adapters import complete_adapter  # noqa: E402
from toushi.models import resolve_model  # noqa: E402
from toushi.rewards import build_rewards, calls_judge  # noqa: E402
from toushi.store import StageStore  # noqa: E402
from toushi.tracking import end as end_tracking  # noqa: E402
from toushi.tracking import start as start_tracking  # noqa: E402
from toushi.training import (  # noqa: E402
    TrainError,
    checkpoint_fingerprint,
    full_state_dict,
    is_main_process,
    load_and_save_recipe,
    load_student,
    load_tokenizer,
    lora_config,
    parse_args,
    save_adapter,
    train_or_reuse,
    train_summary,
    trainer_kwargs,
    use_bf16,
)


def main(argv: list[str] | None = None) -> None:
    args = parse_args("grpo", argv)
    main_proc = is_main_process()

    # ---- recipe
    recipe = load_and_save_recipe(args, "grpo", main_proc)
    cfg, student = recipe.grpo, recipe.models.student
    store = StageStore(recipe.run_dir, "grpo")
    output_dir = store.dir / "checkpoints"
    tracking = start_tracking(recipe, "grpo", store.dir, main_proc)

    # ---- model
    model_path = resolve_model(student.name)
    tokenizer = load_tokenizer(model_path, student.name, cfg.train.chat_template, "grpo.train")
    tokenizer.padding_side = "left"  # generation pads on the left
    bf16 = use_bf16(cfg.train.bf16)
    model = load_student(model_path, student.dtype, cfg.lora.qlora, bf16)
    peft_config = lora_config(cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules, "grpo.lora")
    sft_adapter = recipe.run_dir / "sft" / "adapter"
    if cfg.from_sft:
        from peft import PeftModel

        if not complete_adapter(sft_adapter):
            raise TrainError(f"grpo.from_sft: no complete SFT adapter at {sft_adapter}: run the sft stage first")
        model = PeftModel.from_pretrained(model, str(sft_adapter), is_trainable=True)
        peft_config = None

    # ---- data and rewards
    examples, counts = load_grpo(recipe.run_dir, template=recipe.pairs.prompt_template,
                                 constraints=recipe.pairs.constraints)
    counts["train_examples"] = len(examples)
    print(f"[toushi] GRPO data: {counts}", flush=True)
    reward_funcs, weights = build_rewards(
        cfg.reward_weights, judge=recipe.models.judge, run_dir=recipe.run_dir, cache_dir=store.dir
    )

    # ---- train
    # vLLM generates the groups where it can (a CUDA device and vLLM installed); CPU generates with generate()
    use_vllm = cfg.use_vllm if cfg.use_vllm is not None else (
        torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None)
    kwargs = trainer_kwargs(cfg.train, output_dir, recipe.run.seed, bf16, has_eval=False, tracking=tracking)
    kwargs.pop("max_length")  # GRPO bounds the completion instead (max_completion_length)
    training_args = GRPOConfig(
        **kwargs,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        beta=cfg.beta,
        reward_weights=weights,
        use_vllm=use_vllm,
        vllm_mode="colocate",
        log_completions=False,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    judged = calls_judge(cfg.reward_weights)
    fingerprint = checkpoint_fingerprint(
        model_path, cfg.model_dump(mode="json"), recipe.run.seed, examples,
        start_adapter=sft_adapter if cfg.from_sft else None,
        extra={"chat_template": tokenizer.chat_template,
               "judge": recipe.models.judge.model_dump(mode="json") if judged and recipe.models.judge else None,
               "guidance": path_digest(recipe.run_dir / "guidance" / "guidance.json")
               if cfg.reward_weights.get("adherence") else None},
    )
    result, run_info = train_or_reuse(trainer, output_dir, args.resume, fingerprint, main_proc)

    # ---- save
    state_dict = full_state_dict(trainer)  # every process: ZeRO-3 / FSDP gather the sharded weights here
    if trainer.accelerator.is_main_process:
        model = trainer.accelerator.unwrap_model(trainer.model)
        save_adapter(model, tokenizer, store.dir / "adapter", state_dict)
        summary = train_summary(trainer, result, None)
        logged = [h for h in trainer.state.log_history if "reward" in h]
        summary["rewards"] = {
            key: [h[key] for h in logged if key in h]
            for key in ["reward", *(f"rewards/{f.__name__}/mean" for f in reward_funcs)]
        }
        store.write_manifest(
            data=counts, training=summary, tracking=tracking, **run_info, adapter=str(store.dir / "adapter"),
            base_model=model_path, from_sft=cfg.from_sft, use_vllm=use_vllm,
        )
        print(f"[toushi] GRPO done: {summary}", flush=True)
        end_tracking(tracking)


if __name__ == "__main__":
    imports_done()  # what the imports built frozen, the collector back on
    main()
