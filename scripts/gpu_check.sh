#!/usr/bin/env bash
# GPU checks in one run, for a CUDA machine with torch/transformers/peft/accelerate but no network
# (how this project is lent one): the other wheels travel in .whl/, SmolLM2's config + tokenizer in
# .gpu/smollm2 (no weights: these checks need CUDA kernels and shapes, not trained weights, so the model
# is initialised at random from its real config). Results go to $OUT (default /tmp/gpu_check).
#   bash scripts/gpu_check.sh            # gpu tests + training throughput/memory rows for docs/benchmarks.md
# Preparing the two folders (both git-ignored through .git/info/exclude), on the CPU machine:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d .whl trl==1.16.0 pydantic==2.14.4 \
#     pydantic_core==2.50.5 typing-inspection annotated-types datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
#     bitsandbytes==0.50.2 jsonschema referencing rpds-py jsonschema-specifications gguf datasketch openai jiter \
#     distro sniffio                                   # 49 MB: what the lent machine's image lacks
#   mkdir -p .gpu/smollm2 && cp $TOUSHI_HOME/models/smollm2-135m-instruct/{*.json,*.jinja} .gpu/smollm2/
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
# QLoRA (4-bit CUDA kernels, bf16 compute) through the real SFT path; the vLLM test needs the CUDA vLLM build
timeout 240 python3 -m pytest tests/test_gpu.py --run-gpu -q -k qlora -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
bench() { timeout 150 python3 scripts/bench_train.py "$@" --json "$OUT/bench_train.jsonl" 2>&1 | tail -2 | tee -a "$OUT/bench.log"; }
bench --model-config qwen2.5-1.5b --random-weights --seq 2048 --batch 8 --steps 5
bench --model-config qwen2.5-1.5b --random-weights --seq 2048 --batch 8 --steps 5 --packing
bench --model-config qwen2.5-7b --random-weights --seq 2048 --batch 4 --steps 4 --qlora
bench --model-config qwen2.5-7b --random-weights --seq 2048 --batch 4 --steps 4
