"""GPU-only checks (``pytest --run-gpu`` on a CUDA machine; skipped elsewhere, see conftest.py).

Everything around these paths is tested on CPU; what only a GPU shows is here: QLoRA's 4-bit CUDA kernels
with bf16 compute, and the CUDA vLLM build agreeing with transformers on greedy decoding.
"""

from __future__ import annotations

import json
import math

import pytest
from test_datasets import write_run
from test_train import adapter_weights, train_in_process, write_recipe

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _cuda():
    import torch

    if not torch.cuda.is_available():
        pytest.fail("a gpu test ran without CUDA: run it on a GPU machine (pytest --run-gpu)")


def test_qlora_sft_bf16_on_cuda(tmp_path, offline_model):
    run_dir = write_run(tmp_path / "runs" / "g")
    recipe = write_recipe(
        tmp_path / "q.yaml", run_dir, "smollm2-135m-instruct",
        sft={"lora": {"r": 8, "alpha": 16, "qlora": True},
             "train": {"max_steps": 8, "per_device_train_batch_size": 4, "max_length": 256, "learning_rate": 1e-3,
                       "bf16": True, "eval_fraction": 0.0, "lr_scheduler_type": "constant"}},
    )
    train_in_process("sft", recipe)
    t = json.loads((run_dir / "sft" / "manifest.json").read_text())["training"]
    assert t["steps"] == 8 and math.isfinite(t["final_loss"]) and t["final_loss"] < t["first_loss"]
    assert 0 < t["peak_memory_gib"] < 4  # CUDA peak: a 135M model in 4 bit needs far less
    assert any(v.abs().sum() > 0 for k, v in adapter_weights(run_dir / "sft" / "adapter").items() if "lora_B" in k)


def test_cuda_vllm_greedy_matches_transformers(offline_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toushi.engines import make_engine
    from toushi.recipe import ModelSpec, Sampling

    conv = [{"role": "user", "content": "I failed my driving test again and I feel stupid."}]
    spec = ModelSpec(name="smollm2-135m-instruct", dtype="float32", gpu_memory_utilization=0.3, max_model_len=1024)
    with make_engine(spec) as engine:
        got = engine.generate([conv], Sampling(temperature=0.0, max_tokens=24))[0][0]
    tok = AutoTokenizer.from_pretrained(offline_model)
    model = AutoModelForCausalLM.from_pretrained(offline_model, dtype=torch.float32).cuda()
    ids = tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**{k: v.cuda() for k, v in ids.items()}, max_new_tokens=24, do_sample=False)
    want = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert got.text.strip() == want.strip()
