"""LoRA / QLoRA DPO of the student: strong answers preferred over weak ones (optionally guided answers between them).

    accelerate launch [--config_file recipes/accelerate/X.yaml] train/dpo.py --recipe recipes/X.yaml \
        [--set dpo.beta=0.2] [--resume]

recipe -> student (+ LoRA config, or the SFT adapter with `dpo.from_sft`) -> DPO pairs from
runs/<run>/pairs (+ guided) -> TRL DPOTrainer -> runs/<run>/dpo/adapter/ and the stage manifest.
The reference model is the policy with its adapter switched off (fresh LoRA) or a frozen copy of the SFT
adapter (from_sft): either way no second copy of the base weights is loaded.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from toushi.heap import imports_done  # noqa: E402
from toushi.training import leave_out_unused  # noqa: E402

if __name__ == "__main__":
    gc.disable()  # the imports' objects are not garbage: no collections while they grow (toushi/heap.py)
    leave_out_unused("dpo")  # before peft and TRL are imported: what this run cannot use, they do not load

from datasets import Dataset  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from toushi.datasets import load_dpo  # noqa: E402
from toushi.engines.adapters import complete_adapter  # noqa: E402
from toushi.models import resolve_model  # noqa: E402
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
    split_eval,
    train_or_reuse,
    train_summary,
    trainer_kwargs,
    use_bf16,
)


def to_preference(examples: list[dict]) -> Dataset:
    return Dataset.from_list(
        [{"prompt": e["prompt"], "chosen": e["chosen"], "rejected": e["rejected"]} for e in examples]
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args("dpo", argv)
    main_proc = is_main_process()

    # ---- recipe
    recipe = load_and_save_recipe(args, "dpo", main_proc)
    cfg, student = recipe.dpo, recipe.models.student
    store = StageStore(recipe.run_dir, "dpo")
    output_dir = store.dir / "checkpoints"
    tracking = start_tracking(recipe, "dpo", store.dir, main_proc)

    # ---- model
    model_path = resolve_model(student.name)
    tokenizer = load_tokenizer(model_path, student.name, cfg.train.chat_template, "dpo.train")
    bf16 = use_bf16(cfg.train.bf16)
    model = load_student(model_path, student.dtype, cfg.lora.qlora, bf16)
    peft_config = lora_config(cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules, "dpo.lora")
    sft_adapter = recipe.run_dir / "sft" / "adapter"
    if cfg.from_sft:
        from peft import PeftModel

        if not complete_adapter(sft_adapter):
            raise TrainError(f"dpo.from_sft: no complete SFT adapter at {sft_adapter}: run the sft stage first")
        # DPOTrainer freezes a copy of this adapter as the reference ("ref"); dpo.lora is not used
        model = PeftModel.from_pretrained(model, str(sft_adapter), is_trainable=True)
        peft_config = None

    # ---- data
    examples, counts = load_dpo(recipe.run_dir, guided_pairs=cfg.guided_pairs, drop_markdown=cfg.drop_markdown)
    train_examples, eval_examples = split_eval(examples, cfg.train.eval_fraction, recipe.run.seed)
    counts.update(train_examples=len(train_examples), eval_examples=len(eval_examples))
    print(f"[toushi] DPO data: {counts}", flush=True)

    # ---- train
    training_args = DPOConfig(
        **trainer_kwargs(cfg.train, output_dir, recipe.run.seed, bf16, has_eval=bool(eval_examples), tracking=tracking),
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
    )
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=training_args,
        train_dataset=to_preference(train_examples),
        eval_dataset=to_preference(eval_examples) if eval_examples else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    fingerprint = checkpoint_fingerprint(
        model_path, cfg.model_dump(mode="json"), recipe.run.seed, examples,
        start_adapter=sft_adapter if cfg.from_sft else None, extra={"chat_template": tokenizer.chat_template},
    )
    result, run_info = train_or_reuse(trainer, output_dir, args.resume, fingerprint, main_proc)
    eval_loss = trainer.evaluate()["eval_loss"] if eval_examples else None

    # ---- save
    state_dict = full_state_dict(trainer)  # every process: ZeRO-3 / FSDP gather the sharded weights here
    if trainer.accelerator.is_main_process:
        model = trainer.accelerator.unwrap_model(trainer.model)
        save_adapter(model, tokenizer, store.dir / "adapter", state_dict)
        summary = train_summary(trainer, result, eval_loss)
        rewards = [h for h in trainer.state.log_history if "rewards/margins" in h]
        if rewards:
            summary["final_reward_margin"] = rewards[-1]["rewards/margins"]
            summary["final_reward_accuracy"] = rewards[-1].get("rewards/accuracies")
        store.write_manifest(
            data=counts, training=summary, tracking=tracking, **run_info, adapter=str(store.dir / "adapter"),
            base_model=model_path, from_sft=cfg.from_sft,
        )
        print(f"[toushi] DPO done: {summary}", flush=True)
        end_tracking(tracking)


if __name__ == "__main__":
    imports_done()  # what the imports built frozen, the collector back on
    main()
