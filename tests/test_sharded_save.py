"""Sharded training saves the same adapter as one process.

- DDP: SFT on the tiny model through accelerate (cpu_ddp.yaml, two processes over gloo).
- FSDP2: accelerate 1.15 never selects FSDP on CPU, so tests/fsdp_save_worker.py shards a LoRA model with
  torch's FSDP2 itself (two processes, gloo), trains two steps and saves with toushi.training.save_adapter
  from the gathered full state dict (what full_state_dict(trainer) returns under FSDP2); the old save from
  the sharded model fails there.
Each adapter must have the single-process adapter's tensors and shapes, load with PEFT on the base model
and give finite outputs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from test_datasets import write_run
from test_train import adapter_weights, launch, manifest, train_in_process, write_recipe

from tests.conftest import REPO

SFT = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0},
       "train": {"max_steps": 2, "per_device_train_batch_size": 2, "max_length": 128, "eval_fraction": 0.0,
                 "learning_rate": 1e-2, "save_steps": 100}}


@pytest.fixture(scope="module")
def single_process_adapter(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("single")
    run_dir = write_run(root / "runs" / "one")
    train_in_process("sft", write_recipe(root / "one.yaml", run_dir, "tiny-random", sft=SFT))
    assert manifest(run_dir, "sft")["training"]["distributed_type"] == "NO"
    return adapter_weights(run_dir / "sft" / "adapter")


def check_loads_and_runs(adapter_dir, base_path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter_dir)
    messages = [{"role": "user", "content": "I failed my exam."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(ids).logits
        tuned_logits = PeftModel.from_pretrained(base, str(adapter_dir))(ids).logits
    assert torch.isfinite(tuned_logits).all()
    assert (tuned_logits - base_logits).abs().max() > 0  # the trained adapter is applied, not a zero one


def check_adapter(adapter, single_process_adapter, base_path) -> None:
    import torch

    weights = adapter_weights(adapter)
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        k: tuple(v.shape) for k, v in single_process_adapter.items()}  # full tensors, not one rank's shard
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert all(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)  # every lora_B trained
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    check_loads_and_runs(adapter, base_path)


def test_ddp_two_process_adapter_matches_single_process(single_process_adapter, tmp_path, tiny_model):
    run_dir = write_run(tmp_path / "runs" / "two")
    launch("sft", write_recipe(tmp_path / "two.yaml", run_dir, "tiny-random", sft=SFT), config="cpu_ddp.yaml")
    t = manifest(run_dir, "sft")["training"]
    assert t["num_processes"] == 2 and t["distributed_type"] == "MULTI_CPU" and t["steps"] == 2
    assert math.isfinite(t["final_loss"])
    check_adapter(run_dir / "sft" / "adapter", single_process_adapter, tiny_model)


def test_fsdp2_sharded_model_saves_the_full_adapter(single_process_adapter, tmp_path, tiny_model):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(REPO / "tests" / "fsdp_save_worker.py"), str(tiny_model), str(tmp_path)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["params_are_dtensors"]  # the model really was sharded
    if result["naive"] == "saved":  # the old save: at best one rank's shards, never the full adapter
        naive = adapter_weights(tmp_path / "naive")
        assert {k: v.shape for k, v in naive.items()} != {
            k: v.shape for k, v in single_process_adapter.items()}
    check_adapter(tmp_path / "adapter", single_process_adapter, tiny_model)
