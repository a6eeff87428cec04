"""LoRA / QLoRA supervised fine-tuning of the student on the run's answers.

    accelerate launch [--config_file recipes/accelerate/X.yaml] train/sft.py --recipe recipes/X.yaml \
        [--set sft.train.max_steps=20] [--resume]

recipe -> student (+ LoRA config) -> SFT set from runs/<run>/pairs (+ guided) -> TRL SFTTrainer ->
runs/<run>/sft/adapter/ (PEFT adapter + tokenizer) and the stage manifest (counts, losses, tokens/s, memory).
Loss is on the assistant answer only: each `messages` example is split into a conversational prompt and
completion, which TRL masks with any chat template (no `{% generation %}` markers needed).
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
    leave_out_unused("sft")  # before peft and TRL are imported: what this run cannot use, they do not load

from datasets import Dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from toushi.datasets import load_sft  # noqa: E402
from toushi.models import resolve_model  # noqa: E402
from toushi.store import StageStore  # noqa: E402
from toushi.tracking import end as end_tracking  # noqa: E402
from toushi.tracking import start as start_tracking  # noqa: E402
from toushi.training import (  # noqa: E402
    check_packing_keeps_apart,
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


def to_prompt_completion(examples: list[dict]) -> Dataset:
    return Dataset.from_list(
        [{"prompt": e["messages"][:-1], "completion": e["messages"][-1:]} for e in examples]
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args("sft", argv)
    main_proc = is_main_process()

    # ---- recipe
    recipe = load_and_save_recipe(args, "sft", main_proc)
    cfg, student = recipe.sft, recipe.models.student
    store = StageStore(recipe.run_dir, "sft")
    output_dir = store.dir / "checkpoints"
    tracking = start_tracking(recipe, "sft", store.dir, main_proc)

    # ---- model
    model_path = resolve_model(student.name)
    tokenizer = load_tokenizer(model_path, student.name, cfg.train.chat_template, "sft.train")
    bf16 = use_bf16(cfg.train.bf16)
    model = load_student(model_path, student.dtype, cfg.lora.qlora, bf16)
    peft_config = lora_config(cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules, "sft.lora")
    if cfg.packing:  # padding-free: examples in one row are told apart by position ids alone
        check_packing_keeps_apart(model, "sft.packing")

    # ---- data
    examples, counts = load_sft(
        recipe.run_dir,
        target=cfg.target,
        context_distillation=cfg.context_distillation,
        keep_think=cfg.keep_think,
        drop_markdown=cfg.drop_markdown,
    )
    train_examples, eval_examples = split_eval(examples, cfg.train.eval_fraction, recipe.run.seed)
    counts.update(train_examples=len(train_examples), eval_examples=len(eval_examples))
    print(f"[toushi] SFT data: {counts}", flush=True)

    # ---- train
    training_args = SFTConfig(
        **trainer_kwargs(cfg.train, output_dir, recipe.run.seed, bf16, has_eval=bool(eval_examples), tracking=tracking),
        packing=cfg.packing,
        completion_only_loss=True,
        dataset_num_proc=None,
    )
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=to_prompt_completion(train_examples),
        eval_dataset=to_prompt_completion(eval_examples) if eval_examples else None,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    fingerprint = checkpoint_fingerprint(model_path, cfg.model_dump(mode="json"), recipe.run.seed, examples,
                                         extra={"chat_template": tokenizer.chat_template})
    counts["train_rows"] = len(trainer.train_dataset)  # packing: fewer rows than examples
    result, run_info = train_or_reuse(trainer, output_dir, args.resume, fingerprint, main_proc)
    eval_loss = trainer.evaluate()["eval_loss"] if eval_examples else None

    # ---- save
    state_dict = full_state_dict(trainer)  # every process: ZeRO-3 / FSDP gather the sharded weights here
    if trainer.accelerator.is_main_process:
        model = trainer.accelerator.unwrap_model(trainer.model)
        save_adapter(model, tokenizer, store.dir / "adapter", state_dict)
        summary = train_summary(trainer, result, eval_loss)
        store.write_manifest(
            data=counts, training=summary, tracking=tracking, **run_info, adapter=str(store.dir / "adapter"),
            base_model=model_path,
        )
        print(f"[toushi] SFT done: {summary}", flush=True)
        end_tracking(tracking)


if __name__ == "__main__":
    imports_done()  # what the imports built frozen, the collector back on
    main()
