"""Small helpers the training scripts share (train/sft.py, train/dpo.py).

The scripts stay readable top to bottom; what lives here is what both need done the same way:
recipe parsing, loading the student (LoRA or 4-bit QLoRA), the chat-template check, trainer
arguments common to SFT and DPO, and the manifest written at the end.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import warnings
from pathlib import Path

from toushi.errors import ToushiError
from toushi.recipe import TrainSpec, load_recipe, save_recipe
from toushi.recipe_view import RecipeView

# vLLM serves LoRA adapters up to --max-lora-rank, 16 by default; a larger rank needs that flag raised.
VLLM_MAX_LORA_RANK = 16


class TrainError(ToushiError, RuntimeError):
    """A training run that cannot start; the message names the model or recipe key to fix."""


def parse_args(stage: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=f"toushi {stage} training (run it with `accelerate launch`).")
    p.add_argument("--recipe", type=Path, required=True, help="Recipe YAML.")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="Override: key.sub=value.")
    p.add_argument("--resume", action="store_true", help="Continue from the last checkpoint in the output dir.")
    return p.parse_args(argv)


def leave_out_unused(stage: str, argv: list[str] | None = None) -> None:
    """A trainer run as a script calls this before it imports peft or TRL. Those import some packages whenever they
    are installed, at a cost on every launch; where the stage's recipe says it cannot use one, this process gets
    none. None in sys.modules is Python's own "cannot be imported": `import` raises ImportError and find_spec
    answers None, so the libraries take the paths they take where the package is not installed.
    - bitsandbytes, imported by peft: only QLoRA uses it (lora.qlora true, or auto on a CUDA device). Its
      CPU backend wraps kernels in torch.compile at import, which loads torch's inductor: about 1.2 s of each launch
      of the rehearsal's sft trainer on the AVX512-BF16 CPU (10.4 s with it, 9.2 without).
    - vllm, imported by TRL's GRPO and distillation trainers: only their colocated generation uses it (use_vllm
      true, or unset on a CUDA device), and GRPO's judge and adherence rewards when models.judge runs on vLLM in
      this process. `from trl import GRPOTrainer` took 9.1 s with it, 5.8 without.
    The other trainers' TRL classes do not import vLLM, and selftrain's judge may need it: those keep it.
    - mlflow, imported by TRL's profiling (GRPO's and distillation's trainers) whenever it is installed, to log
      timings where report_to names it: where train.report_to is not mlflow, DISABLE_MLFLOW_INTEGRATION (the
      switch transformers reads) tells both it is not there. `from trl import GRPOTrainer` took 2.23-2.27 s with
      it, 1.87-1.91 without (vLLM and bitsandbytes already left out; one core, AVX512-BF16 kind).
    "A CUDA device" is asked of torch, as the trainer asks it later (resolve_auto's card, use_vllm's default): torch
    is imported next anyway, and no other answer can disagree with the trainer's."""
    import torch

    from toushi.rewards import calls_judge

    args = parse_args(stage, argv)
    recipe = load_recipe(args.recipe, args.overrides)
    section, cuda = getattr(recipe, stage), torch.cuda.is_available()
    if not (section.lora.qlora is True or (section.lora.qlora == "auto" and cuda)):  # auto: QLoRA on CUDA cards only
        sys.modules.setdefault("bitsandbytes", None)
    if recipe.train.report_to != "mlflow":
        os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")
    if hasattr(section, "use_vllm"):  # grpo, distill: the trainers whose TRL class imports vLLM
        judge = recipe.models.judge
        judged = calls_judge(getattr(section, "reward_weights", {}))  # distill has no rewards
        if not (section.use_vllm is True or (section.use_vllm is None and cuda)
                or (judged and judge is not None and judge.engine == "vllm")):
            sys.modules.setdefault("vllm", None)


def load_and_save_recipe(args: argparse.Namespace, stage: str, is_main: bool) -> RecipeView:
    """Load the recipe, print it resolved, and save it beside the stage's output. The trainer gets the recipe
    as the runner shows its stage (toushi/recipe_view.py): only the keys the stage declares in toushi/stages.py,
    the keys its fingerprint covers, so a trainer cannot read a setting whose change would not retrain."""
    from toushi.stages import declared_view

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.models.student is None:
        raise TrainError(f"{args.recipe}: models.student: {stage} needs a student model")
    section = getattr(recipe, stage)
    train = section.train
    if "auto" in (section.lora.qlora, train.gradient_checkpointing) or train.largest_micro_batch:  # on this card
        from toushi.plan import card_memory, resolve_auto

        card, on_gpu, _ = card_memory()
        for line in resolve_auto(recipe, stage, card, on_gpu):
            if is_main:
                print(f"[toushi] {stage}: {line} (toushi plan)", flush=True)
    if is_main:
        print(recipe.to_yaml(), flush=True)
        save_recipe(recipe, recipe.run_dir / stage)
    return declared_view(recipe, stage)


def is_main_process() -> bool:
    """Rank 0 under torchrun/accelerate (read from the env: no process group exists yet)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def use_bf16(setting: bool | None) -> bool:
    """bf16 mixed precision: as set, else where the device computes in bf16 natively (CUDA with bf16, or a
    CPU with AVX512-BF16/AMX; an emulated bf16 would be slower than fp32)."""
    import torch

    from toushi.hardware import cpu_native_bf16

    if setting is not None:
        return setting
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_native_bf16()


def lora_config(r: int, alpha: int, dropout: float, target_modules, recipe_key: str):
    """A plain PEFT LoRA (no modules_to_save), so vLLM can serve the adapter as is."""
    from peft import LoraConfig

    if r > VLLM_MAX_LORA_RANK:
        warnings.warn(
            f"{recipe_key}.r={r} is above vLLM's default max_lora_rank ({VLLM_MAX_LORA_RANK}): serve the adapter "
            f"with --max-lora-rank {r} (vllm.LLM(max_lora_rank={r})) or lower the rank",
            stacklevel=2,
        )
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none", task_type="CAUSAL_LM"
    )


def quantization_config(bf16: bool):
    """4-bit nf4 with double quantization (QLoRA); bitsandbytes >= 0.45 also runs it on CPU."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32,
    )


def load_tokenizer(model_path: str, model_name: str, chat_template: Path | None, recipe_key: str):
    """The student's tokenizer, with a chat template (its own, or the recipe's file) and a pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    if chat_template is not None:
        tok.chat_template = Path(chat_template).read_text(encoding="utf-8")
    if not tok.chat_template:
        raise TrainError(
            f"student model {model_name!r} has no chat template: set {recipe_key}.chat_template to a Jinja "
            "template file (e.g. one from trl/chat_templates/)"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_student(model_path: str, dtype: str, qlora: bool, bf16: bool):
    """The base student for LoRA (weights as the recipe says) or QLoRA (4-bit, prepared for k-bit training)."""
    import torch
    from transformers import AutoModelForCausalLM

    if qlora:
        from peft import prepare_model_for_kbit_training

        model = AutoModelForCausalLM.from_pretrained(
            model_path,
            quantization_config=quantization_config(bf16),
            dtype=torch.bfloat16 if bf16 else torch.float32,
            # each DDP process owns one device; LOCAL_RANK picks it (CPU: the only one)
            device_map={"": int(os.environ.get("LOCAL_RANK", 0))} if torch.cuda.is_available() else {"": "cpu"},
        )
        # casts norms to fp32 and enables input grads; checkpointing is left to the trainer's argument
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    # "auto" under bf16 training: bf16 weights (a checkpoint saved in fp32 would otherwise load in fp32 and
    # every autocast op would convert it)
    torch_dtype = (torch.bfloat16 if bf16 else "auto") if dtype == "auto" else getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)


def check_packing_keeps_apart(model, recipe_key: str) -> None:
    """Packing (TRL's ``packing``, best-fit decreasing) trains padding-free: several examples share one row with no
    attention mask, told apart only by position ids that restart at 0. transformers builds a block-diagonal mask
    from them for sdpa, eager and flex attention, and flash-attention reads them as sequence boundaries; a model
    or attention implementation that does neither lets each example attend to the ones packed before it, and
    nothing else would say so. So the trainer asks the model itself: a short sequence's logits alone and packed
    after another must agree (a leak moves them by far more than bf16 rounding); else refuse, naming it."""
    import torch

    device = next(model.parameters()).device
    first, second = torch.arange(11, 19, device=device), torch.arange(31, 37, device=device)
    # no KV cache, as TRL trains: transformers reads packing from the position ids only when there is none
    with torch.no_grad():
        alone = model(input_ids=second[None], position_ids=torch.arange(6, device=device)[None],
                      use_cache=False).logits[0].float()
        packed = model(input_ids=torch.cat([first, second])[None], use_cache=False,
                       position_ids=torch.cat([torch.arange(8), torch.arange(6)]).to(device)[None]).logits[0, 8:].float()
    gap = (alone - packed).abs().max().item()
    # SmolLM2 in bf16: 0.4 apart when kept apart (rounding), 25 when not, for logits up to 34
    if gap > 0.05 * alone.abs().max().item() + 1e-3:
        impl = getattr(model.config, "_attn_implementation", None) or "its"
        raise TrainError(f"{recipe_key}: packing needs attention that keeps packed examples apart by position ids, "
                         f"and this model's {impl} attention does not (a packed example's logits moved by {gap:.3g}); "
                         "set it to false")


def trainer_kwargs(
    train: TrainSpec, output_dir: Path, seed: int, bf16: bool, has_eval: bool, tracking: dict | None = None
) -> dict:
    """TrainingArguments fields SFTConfig and DPOConfig share, from the recipe's `train` section.

    tracking: what :func:`toushi.tracking.start` returned (None: tensorboard, as a script run by hand gets).
    """
    import torch

    tracking = tracking or {"report_to": "tensorboard"}
    track = {k: tracking[k] for k in ("project", "run_name") if k in tracking}

    return dict(
        output_dir=str(output_dir),
        learning_rate=train.learning_rate,
        num_train_epochs=train.num_train_epochs,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.per_device_train_batch_size,
        per_device_eval_batch_size=train.per_device_train_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        max_length=train.max_length,
        gradient_checkpointing=train.gradient_checkpointing,
        bf16=bf16,
        logging_steps=train.logging_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        eval_strategy="no",  # one eval at the end (manifest), not a slowdown every N steps
        warmup_steps=train.warmup_ratio,  # a float below 1 is a share of the total steps
        lr_scheduler_type=train.lr_scheduler_type,
        use_liger_kernel=train.use_liger_kernel,
        seed=seed,
        data_seed=seed,
        report_to=[] if tracking["report_to"] == "none" else [tracking["report_to"]],
        **track,
        include_num_input_tokens_seen="non_padding",
        # no CUDA: each process joins a gloo group (cpu_ddp.yaml) instead of looking for GPUs
        use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        do_eval=has_eval,
    )


def split_eval(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) split by post: every example of one post (``prompt_id``; its own ``id`` when it has
    none) goes to the same side, so the eval loss never scores a post the model trained on. A seeded
    shuffle of the posts; at least one eval post when fraction > 0 and there are >= 2 posts."""
    import random

    posts = list(dict.fromkeys(e.get("prompt_id", e["id"]) for e in examples))
    if fraction <= 0 or len(posts) < 2:
        return examples, []
    random.Random(seed).shuffle(posts)
    held = set(posts[: max(1, round(len(posts) * fraction))])
    return ([e for e in examples if e.get("prompt_id", e["id"]) not in held],
            [e for e in examples if e.get("prompt_id", e["id"]) in held])


# Settings that change how often a run logs or saves, not what it learns: a resume may change them.
NOT_SHAPING = ("logging_steps", "save_steps", "save_total_limit")
STAMP = "fingerprint.json"


def base_model_digest(model_path: str) -> str:
    """The base weights by path and the content of every file of the model directory (a hub id: the id).

    Content, as every cache keys a local model (engines.cache_model, stage fingerprints): a teacher or student
    merged again into the same directory has the same config and file sizes but other weights, and a checkpoint
    trained on the old ones must not be resumed or reused. Each file's sha256 is remembered against its size and
    mtime (toushi.digests), so a 7B checkpoint is read once per machine, not on every launch.
    """
    from toushi.digests import path_digest
    from toushi.store import stable_id

    p = Path(model_path)
    if not p.is_dir():
        return stable_id(model_path)
    return stable_id(str(p.resolve()), path_digest(p))


def checkpoint_fingerprint(
    model_path: str, section: dict, seed: int, examples: list[dict], start_adapter: Path | None = None,
    extra: dict | None = None,
) -> dict:
    """Everything that shapes the trained weights, part by part (so a mismatch can say which part moved).

    section: the stage's recipe section (model_dump(mode="json")); every field counts except NOT_SHAPING
    ones in its ``train``. examples: the training examples themselves (content, not ids). start_adapter:
    the adapter training continues from (from_sft). extra: anything else the script reads (e.g. a judge).
    """
    from toushi.digests import path_digest
    from toushi.store import stable_id

    settings = {k: v for k, v in section.items() if k != "train"}
    settings["train"] = {k: v for k, v in section.get("train", {}).items() if k not in NOT_SHAPING}
    settings["seed"] = seed
    settings.update(extra or {})
    return {
        "base_model": base_model_digest(model_path),
        "settings": settings,  # kept verbatim: a mismatch names the keys that changed
        "examples": stable_id(examples),
        "start_adapter": path_digest(start_adapter) if start_adapter else None,
    }


def _flat(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def fingerprint_mismatch(old: dict, new: dict) -> str:
    """What differs between two checkpoint fingerprints, in a few words."""
    parts = []
    if old.get("base_model") != new.get("base_model"):
        parts.append("base model")
    if old.get("examples") != new.get("examples"):
        parts.append("training examples")
    if old.get("start_adapter") != new.get("start_adapter"):
        parts.append("start adapter")
    a, b = _flat(old.get("settings")), _flat(new.get("settings"))
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if keys:
        parts.append("settings (" + ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "") + ")")
    return ", ".join(parts) or "fingerprint format"


def trainer_state(checkpoint: Path) -> dict | None:
    """A checkpoint's trainer_state.json, or None when it is missing or unreadable."""
    import json

    try:
        return json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def finished(checkpoint: Path) -> str | None:
    """What says a checkpoint's run already ended (its last step is saved), or None.

    Such a checkpoint is reused as it is, never resumed: resuming it would still train one more step
    (transformers skips the seen batches, then steps before it checks max_steps).
    """
    state = trainer_state(checkpoint) or {}
    step, total = state.get("global_step", 0), state.get("max_steps", 0)
    return f"{checkpoint.name} finished training (step {step} of {total})" if step >= total > 0 else None


def resume_checkpoint(
    output_dir: Path, resume: bool, fingerprint: dict, is_main: bool
) -> tuple[str | None, str | None, bool]:
    """(checkpoint to resume or reuse, None, whether its run finished) or (None, why training starts fresh, False).

    A checkpoint is used only when its stamp (fingerprint.json beside the checkpoints) equals this run's
    fingerprint; anything else (other data, settings, base or start adapter; no stamp) is deleted, not
    resumed. Only rank 0 deletes, before it writes the new stamp, so another rank that already sees the
    new stamp also sees no stale checkpoint.
    """
    import json

    from transformers.trainer_utils import get_last_checkpoint

    stamp = output_dir / STAMP
    try:
        old = json.loads(stamp.read_text(encoding="utf-8")) if stamp.exists() else None
    except ValueError:
        old = None
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if last is None:
        reason = "no checkpoint to resume" if resume else "--resume not given"
    elif not resume:
        reason = "--resume not given"
    elif old is None:
        reason = "checkpoints carry no fingerprint (made by an older toushi)"
    elif old != fingerprint:
        reason = "checkpoints were made with other " + fingerprint_mismatch(old, fingerprint)
    elif trainer_state(Path(last)) is None:
        reason = f"{Path(last).name} has no readable trainer_state.json"
    else:
        reason = None
    done = reason is None and finished(Path(last)) is not None

    if reason is not None:
        last = None
    if is_main:
        if reason is not None and output_dir.is_dir():
            shutil.rmtree(output_dir)  # never mix a fresh run's checkpoints with another run's
        output_dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(fingerprint, indent=2, sort_keys=True), encoding="utf-8")
        print(f"[toushi] reusing {last}: {finished(Path(last))}, nothing to train" if done
              else f"[toushi] resuming from {last}" if last else f"[toushi] training from scratch: {reason}",
              flush=True)
    return last, reason, done


def train_or_reuse(trainer, output_dir: Path, resume: bool, fingerprint: dict, is_main: bool):
    """Train (continuing a checkpoint of this same fingerprint), or take the weights of one whose run already
    finished, so a kill during the final eval or adapter save costs no training.

    Returns (the train() result, or None when reused; the manifest's resumed_from / reused / fresh).
    """
    from transformers.trainer_callback import TrainerState

    last, fresh, done = resume_checkpoint(output_dir, resume, fingerprint, is_main)
    if not done:
        return trainer.train(resume_from_checkpoint=last), {"resumed_from": last, "reused": None, "fresh": fresh}
    # the Trainer's own checkpoint loader (full weights, PEFT adapters, FSDP) without taking a step
    trainer._load_from_checkpoint(last)
    trainer.state = TrainerState.load_from_json(str(Path(last) / "trainer_state.json"))
    return None, {"resumed_from": None, "reused": last, "fresh": None}


def peak_memory_gib() -> float:
    """Peak accelerator memory (CUDA) or peak resident memory of this process (CPU), GiB."""
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # KiB on Linux


def train_summary(trainer, train_result, eval_loss: float | None) -> dict:
    """Losses, throughput and memory for the manifest, from the trainer's own log history.

    train_result None: a finished checkpoint was reused; its log history has the losses, not the runtime.
    """
    import torch

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics = train_result.metrics if train_result is not None else {}
    runtime = metrics.get("train_runtime") or 0.0
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    return {
        "steps": trainer.state.global_step,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "train_loss": metrics.get("train_loss"),
        "eval_loss": eval_loss,
        "train_runtime_s": round(runtime, 2) if train_result is not None else None,
        "tokens_seen": tokens,
        "tokens_per_s": round(tokens / runtime, 1) if runtime else None,
        "peak_memory_gib": peak_memory_gib(),
        "torch_threads": torch.get_num_threads(),  # CPU: accelerate launch leaves 1 unless told otherwise
        "bf16": bool(trainer.args.bf16),  # use_bf16's choice where the recipe left it to the device
        # the split the trainer ran (largest_micro_batch may have changed the recipe's)
        "micro_batch": trainer.args.per_device_train_batch_size,
        "accumulation": trainer.args.gradient_accumulation_steps,
        "num_processes": trainer.accelerator.num_processes,
        # NO, MULTI_CPU, MULTI_GPU, FSDP or DEEPSPEED: what the launcher's config turned into
        "distributed_type": trainer.accelerator.distributed_type.value,
    }


def full_state_dict(trainer) -> dict:
    """The model's whole state dict, gathered when ZeRO-3 or FSDP shard it (accelerate's get_state_dict, as
    Trainer.save_model does). Collective: every process must call it; under FSDP only rank 0 gets the tensors.
    ZeRO-3 needs zero3_save_16bit_model: true in the accelerate config (deepspeed_zero3.yaml sets it)."""
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)


def save_adapter(model, tokenizer, adapter_dir: Path, state_dict: dict | None = None) -> None:
    """Only the trained adapter ("default"): DPO from an SFT adapter also holds a frozen "ref" copy.

    ``state_dict``: the gathered weights (:func:`full_state_dict`) when training was sharded; the model's own
    parameters are then only this process's shards, and saving them would write a wrong adapter.
    Written to a temporary directory and renamed into place: a kill mid-save leaves the old adapter or
    none, never a half-written one.
    """
    from toushi.store import staged_dir

    with staged_dir(adapter_dir) as tmp:
        model.save_pretrained(str(tmp), selected_adapters=["default"], state_dict=state_dict)
        tokenizer.save_pretrained(str(tmp))
