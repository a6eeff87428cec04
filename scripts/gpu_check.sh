#!/usr/bin/env bash
# GPU checks in one run, for a CUDA machine with torch/transformers/peft/accelerate but no network
# (how this project is lent one): the other wheels travel in .whl/, SmolLM2's config + tokenizer in
# .gpu/smollm2 (no weights: these checks need CUDA kernels and shapes, not trained weights, so the model
# is initialised at random from its real config). Results go to $OUT (default /tmp/gpu_check).
#   bash scripts/gpu_check.sh            # gpu tests + training throughput/memory rows for docs/benchmarks.md
#                                        # + the dress rehearsal of the GPU recipe at the models' real width
#   bash scripts/gpu_check.sh rehearse   # only the rehearsal (its own device call: about 10 minutes)
#   bash scripts/gpu_check.sh levers     # only the training levers, alone and together, on the 1.5B/7B shapes
#                                        # (issue #28: Liger's fused cross-entropy, gradient checkpointing's cost,
#                                        # a smaller micro-batch against checkpointing a larger one, torch.compile;
#                                        # AdamW is transformers' fused one by default: each row records its optim)
# Preparing the two folders (both git-ignored through .git/info/exclude), on the CPU machine:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d .whl trl==1.16.0 pydantic==2.14.4 \
#     pydantic_core==2.50.5 typing-inspection annotated-types datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
#     bitsandbytes==0.50.2 jsonschema referencing rpds-py jsonschema-specifications gguf datasketch openai jiter \
#     distro sniffio liger-kernel==0.8.5               # 49 MB: what the lent machine's image lacks
#   pip download (same flags) -d .whl typer==0.29.2 annotated-doc shellingham xgrammar==0.2.8 apache-tvm-ffi
#                                                    # the rehearsal: toushi's CLI, the hf engine's structured outputs
#   mkdir -p .gpu/smollm2 && cp $TOUSHI_HOME/models/smollm2-135m-instruct/{*.json,*.jinja} .gpu/smollm2/
#   mkdir -p .gpu/sources && cp -r $TOUSHI_HOME/sources/. .gpu/sources/   # the twins' tokenizer sources (12 MB)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TOUSHI_HOME=${TOUSHI_HOME:-/tmp/toushi_home}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, transformers, peft, trl, bitsandbytes as b; print(torch.__version__, torch.version.cuda, \
transformers.__version__, peft.__version__, trl.__version__, b.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"
M=$TOUSHI_HOME/models/smollm2-135m-instruct
if [ ! -e "$M/toushi_model.json" ] && [ -d .gpu/smollm2 ]; then
  mkdir -p "$M" && cp .gpu/smollm2/* "$M"/ && python3 - "$M" <<'PY'
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1]), dtype=torch.float32)
m.save_pretrained(sys.argv[1])
PY
fi
if [ "${1:-all}" = all ]; then
# QLoRA (4-bit CUDA kernels, bf16 compute) through the real SFT path; the vLLM test needs the CUDA vLLM build
timeout 240 python3 -m pytest tests/test_gpu.py --run-gpu -q -k qlora -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
bench() { timeout 150 python3 scripts/bench_train.py "$@" --json "$OUT/bench_train.jsonl" 2>&1 | tail -2 | tee -a "$OUT/bench.log"; }
bench --model-config qwen2.5-1.5b --random-weights --seq 2048 --batch 8 --steps 5
bench --model-config qwen2.5-1.5b --random-weights --seq 2048 --batch 8 --steps 5 --packing
bench --model-config qwen2.5-7b --random-weights --seq 2048 --batch 4 --steps 4 --qlora
bench --model-config qwen2.5-7b --random-weights --seq 2048 --batch 4 --steps 4
fi
if [ "${1:-all}" = levers ]; then
# One lever at a time and together, the same shapes as the rows above (packed 1.5B: its tokens are the plan's
# exactly). Liger drops the 152k-vocabulary logits; checkpointing is what `gradient_checkpointing: auto` leaves
# off where the plan says the card holds the batch, so its row is the step time that saves.
lever() { timeout 150 python3 scripts/bench_train.py "$@" --json "$OUT/bench_levers.jsonl" 2>&1 | tail -2 | tee -a "$OUT/levers.log"; }
Q15=(--model-config qwen2.5-1.5b --random-weights --seq 2048 --batch 8 --steps 5 --packing)
lever "${Q15[@]}"
lever "${Q15[@]}" --liger
lever "${Q15[@]}" --gradient-checkpointing
lever "${Q15[@]}" --liger --gradient-checkpointing
lever "${Q15[@]}" --liger --batch 16
lever --model-config qwen2.5-7b --random-weights --seq 2048 --batch 4 --steps 4 --liger
# last, so a call that runs out of time loses only these: largest_micro_batch's choice on an 80 GiB card (a smaller
# micro-batch, no recompute), then torch.compile (the warm-up steps hold the compilation)
lever "${Q15[@]}" --batch 4
lever "${Q15[@]}" --liger --torch-compile
exit 0
fi
# Dress rehearsal of recipes/r1-qwen-gpu.yaml with the twins at the hub models' real width and depth (random bf16
# weights: R1-Distill-Qwen-7B and Qwen2.5-1.5B as shaped, built on the card from the cached tokenizer sources):
# every stage through the hf engine and TRL (CUDA vLLM cannot travel here, so grpo and distill sample with
# generate()), the recipe's batch sizes, precision and accelerate config, few posts, steps and tokens. Measures
# what one card holds (distill: the 7B teacher beside the 1.5B student) and each training stage's step time, for
# the rehearsal's short sequences (random answers stop early): not the memory of full-length answers.
if [ -d .gpu/sources ]; then mkdir -p "$TOUSHI_HOME/sources" && cp -rn .gpu/sources/. "$TOUSHI_HOME/sources/"; fi
HF=(--set models.weak.engine=hf --set models.strong.engine=hf --set models.student.engine=hf)
timeout 540 python3 -m toushi.cli run recipes/r1-qwen-gpu.yaml --rehearse --rehearse-width real \
  --set run.dir="$OUT/runs" "${HF[@]}" > "$OUT/rehearsal.out" 2> "$OUT/rehearsal.err"
echo "rehearsal exit $?" | tee -a "$OUT/rehearsal.out"
python3 - "$OUT/runs/r1-qwen-rehearsal" <<'PY' | tee "$OUT/rehearsal_summary.txt"
import json, sys
from pathlib import Path
from toushi.stages import STAGE_NAMES
run = Path(sys.argv[1])
for stage in STAGE_NAMES:
    p = run / stage / "manifest.json"
    m = json.loads(p.read_text()) if p.exists() else {}
    t = m.get("training") or {}
    steps, runtime = t.get("steps"), t.get("train_runtime_s")
    step_s = round(runtime / steps, 2) if steps and runtime else None  # the mean, the first (warm-up) step included
    print(stage, m.get("status", "not run"), f"wall_s={m.get('wall_s')}", f"steps={steps}", f"s_per_step={step_s}",
          f"peak_memory_gib={t.get('peak_memory_gib')}", f"tokens_per_s={t.get('tokens_per_s')}",
          (m.get("error") or "")[:300])
PY
