"""On-policy distillation of the student over TRL's DistillationTrainer: the student samples answers to the run's
training prompts, the teacher scores every sampled token, and the loss is the generalised JSD between their
next-token distributions (reverse KL by default) over the answer tokens only.

    accelerate launch [--config_file recipes/accelerate/X.yaml] train/distill.py --recipe recipes/X.yaml \
        [--set distill.teacher=strong] [--resume]

recipe -> pre-flight teacher/student check (configs and tokenizers: vocabulary, embedding rows, end tokens,
chat templates) -> student (+ LoRA, or the SFT adapter) and teacher -> the train prompts of runs/<run>/pairs, each
with the teacher's own prompt -> toushi.teacher.TeacherPromptDistillationTrainer (TRL's trainer; the teacher reads
its own prompt before the student's answer) -> runs/<run>/distill/adapter/ and the stage manifest (divergence
curve, tokens/s, teacher calls, what the pre-flight check found).

Teachers (distill.teacher):
- guided: the student's base model with the run's guidance (+ retrieved strong examples, exactly as the guided
  stage builds its system prompt) as system prompt; the student sees the bare prompt. The guidance moves into
  the weights (on-policy context distillation). Runs on CPU with the offline model.
- strong: models.strong (e.g. DeepSeek-R1-Distill-Qwen) scoring the answer in its own chat template; a reasoning
  model's <think> block is closed before the answer (empty, or its own reasoning from the pairs stage).
The teacher runs in-process (a second model in memory). On GPU the student's rollouts come from TRL's colocated
vLLM (distill.use_vllm); the teacher's log-probs do not: trl 1.16 has no vLLM teacher for a prompt other than
the student's (trl.experimental's server distillation sends the student's own ids, top-1 only).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from toushi.heap import imports_done  # noqa: E402
from toushi.training import leave_out_unused  # noqa: E402

if __name__ == "__main__":
    gc.disable()  # the imports' objects are not garbage: no collections while they grow (toushi/heap.py)
    leave_out_unused("distill")  # before peft and TRL are imported: what this run cannot use, they do not load

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoConfig, AutoTokenizer  # noqa: E402
from trl import DistillationConfig  # noqa: E402

from toushi.datasets import pairs_reasoning  # noqa: E402
from toushi.engines import is_truncated  # noqa: E402
from toushi.engines.adapters import complete_adapter  # noqa: E402
from toushi.models import resolve_model  # noqa: E402
from toushi.pairs import conversation  # noqa: E402
from toushi.preflight import check_teacher, end_ids  # noqa: E402
from toushi.store import StageStore  # noqa: E402
from toushi.teacher import TeacherPromptDistillationTrainer, slice_rows, teacher_prompt_ids  # noqa: E402
from toushi.templates import render_file  # noqa: E402
from toushi.tracking import end as end_tracking  # noqa: E402
from toushi.tracking import start as start_tracking  # noqa: E402
from toushi.training import (  # noqa: E402
    TrainError,
    base_model_digest,
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
    args = parse_args("distill", argv)
    main_proc = is_main_process()

    # ---- recipe
    recipe = load_and_save_recipe(args, "distill", main_proc)
    cfg, student = recipe.distill, recipe.models.student
    store = StageStore(recipe.run_dir, "distill")
    output_dir = store.dir / "checkpoints"
    tracking = start_tracking(recipe, "distill", store.dir, main_proc)
    if cfg.teacher == "strong" and recipe.models.strong is None:
        raise TrainError("distill.teacher=strong: models.strong is not set in the recipe")
    teacher_spec = student if cfg.teacher == "guided" else recipe.models.strong

    # ---- pre-flight: can the teacher score the student's tokens? (configs and tokenizers only, no weights)
    model_path, teacher_path = resolve_model(student.name), resolve_model(teacher_spec.name)
    tokenizer = load_tokenizer(model_path, student.name, cfg.train.chat_template, "distill.train")
    tokenizer.padding_side = "left"  # generation pads on the left
    teacher_tok = tokenizer if cfg.teacher == "guided" else AutoTokenizer.from_pretrained(teacher_path)
    fit = check_teacher(AutoConfig.from_pretrained(model_path), tokenizer, AutoConfig.from_pretrained(teacher_path),
                        teacher_tok, end_ids(model_path, tokenizer))
    for note in fit.notes:
        print(f"[toushi] distill pre-flight: {note}", flush=True)

    # ---- models
    bf16 = use_bf16(cfg.train.bf16)
    model = load_student(model_path, student.dtype, cfg.lora.qlora, bf16)
    teacher = load_student(teacher_path, teacher_spec.dtype, False, bf16).eval()
    slice_rows(model, fit.rows)  # no-op unless the check found padding-only extra rows
    slice_rows(teacher, fit.rows)
    peft_config = lora_config(cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules, "distill.lora")
    sft_adapter = recipe.run_dir / "sft" / "adapter"
    if cfg.from_sft:
        from peft import PeftModel

        if not complete_adapter(sft_adapter):
            raise TrainError(f"distill.from_sft: no complete SFT adapter at {sft_adapter}: run the sft stage first")
        model = PeftModel.from_pretrained(model, str(sft_adapter), is_trainable=True)
        peft_config = None

    # ---- data: the train prompts; the student sees the bare prompt, the teacher its own
    pairs = StageStore(recipe.run_dir, "pairs").records()
    train = [p for p in pairs if p.get("split") == "train"]
    if not train:
        raise TrainError(f"distill: no train prompts in {recipe.run_dir / 'pairs'}: run the pairs stage first")
    if cfg.teacher == "guided":
        from toushi.guidance import load_guidance
        from toushi.guided import guided_systems

        guidance_dir = recipe.run_dir / "guidance"
        try:
            guidance = load_guidance(guidance_dir)
        except FileNotFoundError:
            raise TrainError(f"distill.teacher=guided: no guidance in {guidance_dir}: run the guidance stage first")
        systems = guided_systems(train, pairs, guidance, recipe.guided.retrieved_examples, recipe.run.lang)
        teacher_ids = [teacher_prompt_ids(teacher_tok, conversation(p["prompt"], system))
                       for p, (_, system) in zip(train, systems)]
    else:
        # the strong model reads the prompt as the pairs stage asked it (its system prompt file, if any)
        system = (render_file(teacher_spec.system_prompt_file, lang=recipe.run.lang)
                  if teacher_spec.system_prompt_file else None)
        thought = {p["id"]: pairs_reasoning(p) for p in train}
        teacher_ids = [
            teacher_prompt_ids(teacher_tok, conversation(p["prompt"], system), think=teacher_spec.reasoning,
                               reasoning=thought[p["id"]] if cfg.strong_reasoning == "pairs" else None)
            for p in train
        ]
    examples = [{"id": p["id"], "prompt": [{"role": "user", "content": p["prompt"]}], "teacher_prompt_ids": ids}
                for p, ids in zip(train, teacher_ids)]
    counts = {"prompts": len(pairs), "heldout_excluded": len(pairs) - len(train), "train_examples": len(examples),
              "strong_truncated": sum(is_truncated((p.get("strong") or [{}])[0]) for p in train),
              "teacher": cfg.teacher, "teacher_model": teacher_spec.name,
              "teacher_prompt_tokens_mean": round(sum(map(len, teacher_ids)) / len(teacher_ids), 1)}
    print(f"[toushi] distill data: {counts}", flush=True)

    # ---- train
    use_vllm = cfg.use_vllm if cfg.use_vllm is not None else (
        torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None)
    kwargs = trainer_kwargs(cfg.train, output_dir, recipe.run.seed, bf16, has_eval=False, tracking=tracking)
    kwargs.pop("max_length")  # answers are bounded by max_completion_length instead
    training_args = DistillationConfig(
        **kwargs,
        beta=cfg.beta,
        temperature=cfg.temperature,
        max_completion_length=cfg.max_completion_length,
        use_vllm=use_vllm,
        vllm_mode="colocate",
    )
    trainer = TeacherPromptDistillationTrainer(
        model=model,
        teacher_model=teacher,
        args=training_args,
        train_dataset=Dataset.from_list(examples),
        processing_class=tokenizer,
        peft_config=peft_config,
        unscored_ids=fit.unscored_ids,
    )
    fingerprint = checkpoint_fingerprint(
        model_path, cfg.model_dump(mode="json"), recipe.run.seed, examples,
        start_adapter=sft_adapter if cfg.from_sft else None,
        extra={"chat_template": tokenizer.chat_template, "teacher": base_model_digest(teacher_path)},
    )  # examples carry the teacher's prompt ids: a new guidance or strong system prompt retrains
    result, run_info = train_or_reuse(trainer, output_dir, args.resume, fingerprint, main_proc)

    # ---- save
    state_dict = full_state_dict(trainer)  # every process: ZeRO-3 / FSDP gather the sharded weights here
    if trainer.accelerator.is_main_process:
        save_adapter(trainer.accelerator.unwrap_model(trainer.model), tokenizer, store.dir / "adapter", state_dict)
        summary = train_summary(trainer, result, None)
        logged = [h for h in trainer.state.log_history if "loss" in h]
        divergence = {1.0: "reverse_kl", 0.0: "forward_kl"}.get(cfg.beta, f"jsd_beta_{cfg.beta}")
        summary.update(
            divergence=divergence,
            kl=[h["loss"] for h in logged],  # per answer token, one value per logged step
            completion_mean_length=[h.get("completions/mean_length") for h in logged],
            teacher_calls=trainer.teacher_calls,
            teacher_tokens_scored=trainer.teacher_tokens,
        )
        store.write_manifest(
            data=counts, training=summary, tracking=tracking, **run_info, adapter=str(store.dir / "adapter"),
            base_model=model_path, teacher_model=teacher_path, from_sft=cfg.from_sft, use_vllm=use_vllm,
            preflight=dataclasses.asdict(fit),
        )
        print(f"[toushi] distill done: {summary}", flush=True)
        end_tracking(tracking)


if __name__ == "__main__":
    imports_done()  # what the imports built frozen, the collector back on
    main()
