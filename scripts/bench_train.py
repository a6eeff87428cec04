"""Benchmark LoRA / QLoRA SFT throughput: tokens/s, MFU and peak memory (not a test).

CPU (this machine), the offline SmolLM2-135M:
    python scripts/bench_train.py --steps 6 --seq 256 --batch 4
GPU, random weights with a real model's shape (no hub access; tokenizer: the offline SmolLM2 one):
    python scripts/bench_train.py --model-config qwen2.5-1.5b --random-weights --seq 2048 [--qlora] [--packing] [--liger]
    python scripts/bench_train.py --model-config qwen2.5-7b --random-weights --seq 2048 --qlora --batch 4

The training path is the one train/sft.py uses (toushi.training helpers + TRL SFTTrainer). Examples
have random lengths between seq/8 and seq tokens, so packing has padding to remove. Throughput counts
non-padding tokens after the warm-up steps. MFU = 6 * params * tokens/s / the device's peak dense bf16
FLOP/s (the usual model-FLOPs convention; LoRA skips weight gradients, so this slightly overstates the
work actually needed). Prints one Markdown table row for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Shapes from the public config.json of each model (https://huggingface.co/Qwen/...).
MODEL_CONFIGS = {
    "qwen2.5-1.5b": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=1536, intermediate_size=8960,
        num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        hidden_act="silu", bos_token_id=151643, eos_token_id=151645,
    ),
    "qwen2.5-7b": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=3584, intermediate_size=18944,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
        max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        hidden_act="silu", bos_token_id=151643, eos_token_id=151645,
    ),
}

# Peak dense bf16 tensor FLOP/s (vendor datasheets, no sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}

WORDS = ("feel alone today work stress sleep friend family exam failed hurt tired anxious hope better talk "
         "listen sorry hard week month year school job money partner parents sister brother dog cat night "
         "morning cry laugh worry scared angry calm breathe rest help understand care").split()


def build_random_model(name: str, out: Path) -> Path:
    """A random-weight model with the named shape, saved so from_pretrained (and bitsandbytes) can load it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from toushi.models import resolve_model

    cfg = dict(MODEL_CONFIGS[name])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    # any tokenizer will do for throughput: ids stay below the model's vocab size
    AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct")).save_pretrained(out)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def make_dataset(n: int, seq: int, seed: int):
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.randint(max(8, seq // 8), seq) * 3 // 4  # ~1.3 tokens per word
        text = " ".join(rng.choice(WORDS) for _ in range(words))
        half = len(text) // 3
        rows.append({"prompt": [{"role": "user", "content": text[:half]}],
                     "completion": [{"role": "assistant", "content": text[half:]}]})
    return Dataset.from_list(rows)


def peak_flops(override_tflops: float | None) -> tuple[str, float | None]:

    import torch

    if not torch.cuda.is_available():
        from toushi.hardware import cpu_kind, cpu_model

        return f"CPU ({cpu_model()}, {cpu_kind()}, {torch.get_num_threads()} threads)", None
    name = torch.cuda.get_device_name()
    if override_tflops:
        return name, override_tflops * 1e12
    return name, next((v for k, v in PEAK_BF16.items() if k in name), None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="Model reference (without --random-weights).")
    p.add_argument("--model-config", choices=sorted(MODEL_CONFIGS), help="Shape of a random-weight model.")
    p.add_argument("--random-weights", action="store_true", help="Build the --model-config model with random weights.")
    p.add_argument("--seq", type=int, default=256, help="Max sequence length (packing block size).")
    p.add_argument("--batch", type=int, default=4, help="Per-device micro batch.")
    p.add_argument("--steps", type=int, default=8, help="Optimizer steps measured (after warm-up).")
    p.add_argument("--warmup", type=int, default=2, help="Steps excluded from the timing.")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank.")
    p.add_argument("--qlora", action="store_true", help="4-bit nf4 base (bitsandbytes).")
    p.add_argument("--packing", action="store_true", help="Pack examples into full sequences.")
    p.add_argument("--liger", action="store_true", help="Liger fused kernels (GPU, pip install liger-kernel).")
    p.add_argument("--gradient-checkpointing", action="store_true", help="Recompute activations.")
    p.add_argument("--torch-compile", action="store_true", help="torch.compile the model (TrainingArguments' "
                   "torch_compile); the warm-up steps hold the compilation.")
    p.add_argument("--bf16", action="store_true", help="bf16 base weights and autocast also without CUDA "
                   "(CPUs with AVX512-BF16 or AMX); default: only where CUDA supports it.")
    p.add_argument("--peak-tflops", type=float, help="Device peak bf16 TFLOP/s when not in the built-in table.")
    p.add_argument("--json", type=Path, help="Append the result as a JSON line to this file.")
    args = p.parse_args()

    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from toushi.models import resolve_model
    from toushi.recipe import TrainSpec
    from toushi.training import (
        load_student,
        load_tokenizer,
        lora_config,
        peak_memory_gib,
        trainer_kwargs,
        use_bf16,
    )

    if args.random_weights != bool(args.model_config):
        p.error("--random-weights and --model-config go together")
    tmp = tempfile.TemporaryDirectory(prefix="bench_train_")
    if args.random_weights:
        model_path, label = str(build_random_model(args.model_config, Path(tmp.name) / "model")), args.model_config
    else:
        model_path, label = resolve_model(args.model), args.model
    bf16 = use_bf16(True if args.bf16 else None)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    tokenizer = load_tokenizer(model_path, label, None, "bench")
    model = load_student(model_path, "bfloat16" if bf16 else "float32", args.qlora, bf16)
    # 4-bit weights are stored packed (uint8): count their logical size from the layer shapes instead
    n_params = sum(p.numel() for p in model.parameters() if p.dtype != torch.uint8) + sum(
        m.in_features * m.out_features for m in model.modules() if type(m).__name__ == "Linear4bit"
    )
    total_steps = args.steps + args.warmup
    train = TrainSpec(
        learning_rate=1e-4, max_steps=total_steps, per_device_train_batch_size=args.batch, max_length=args.seq,
        gradient_checkpointing=args.gradient_checkpointing, save_steps=10**9, logging_steps=1,
        lr_scheduler_type="constant", use_liger_kernel=args.liger, eval_fraction=0.0,
    )
    kwargs = trainer_kwargs(train, Path(tmp.name) / "out", 0, bf16, has_eval=False)
    kwargs.update(report_to=[], save_strategy="no", torch_compile=args.torch_compile)
    config = SFTConfig(**kwargs, packing=args.packing, completion_only_loss=True)

    # (step, time, tokens seen, page faults) at the end of each step. The faults are this process's minor ones:
    # on a CPU each is a fresh page the kernel zeroes, which is what toushi/heap.py's settings are for
    # (GLIBC_TUNABLES=glibc.malloc.perturb=0 gives glibc's defaults: toushi leaves a malloc tunable already set).
    marks: list[tuple[int, float, int, int]] = []

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            marks.append((0, time.perf_counter(), 0, faults()))

        def on_step_end(self, a, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            marks.append((state.global_step, time.perf_counter(), int(state.num_input_tokens_seen or 0), faults()))

    data = make_dataset(args.batch * total_steps * 4, args.seq, 0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         peft_config=lora_config(args.rank, 2 * args.rank, 0.0, "all-linear", "bench"),
                         callbacks=[Clock()])
    trainer.train()

    (_, t0, k0, f0), (_, t1, k1, f1) = marks[args.warmup], marks[-1]
    tokens_per_s = (k1 - k0) / (t1 - t0)
    device, peak = peak_flops(args.peak_tflops)
    mfu = 6 * n_params * tokens_per_s / peak if peak else None
    result = {
        "device": device, "model": label, "params_b": round(n_params / 1e9, 3), "method": "QLoRA" if args.qlora else "LoRA",
        "rank": args.rank, "seq": args.seq, "batch": args.batch, "packing": args.packing, "liger": args.liger,
        "gradient_checkpointing": args.gradient_checkpointing, "torch_compile": args.torch_compile,
        "optim": str(trainer.args.optim), "bf16": bf16, "steps": args.steps,
        "tokens_per_s": round(tokens_per_s, 1), "mfu": round(mfu, 4) if mfu else None,
        "s_per_step": round((t1 - t0) / args.steps, 2), "page_faults_per_step": round((f1 - f0) / args.steps),
        "peak_memory_gib": peak_memory_gib(),
        "peak_memory_kind": "GPU allocated" if torch.cuda.is_available() else "process max RSS",
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    mfu_s = f"{100 * mfu:.1f}%" if mfu else "n/a"
    ckpt = (" + checkpointing" if args.gradient_checkpointing else "") + (" + compile" if args.torch_compile else "")
    print(f"| {device} | {label} | {result['method']} r{args.rank}{ckpt} | {args.seq} | {args.batch} | "
          f"{'yes' if args.packing else 'no'} | {'yes' if args.liger else 'no'} | {tokens_per_s:,.0f} | {mfu_s} | "
          f"{result['peak_memory_gib']:.2f} GiB ({result['peak_memory_kind']}) |")


if __name__ == "__main__":
    main()
