"""One rank of test_sharded_save's FSDP2 check.

    torchrun --nproc_per_node 2 tests/fsdp_save_worker.py BASE_MODEL_DIR OUT_DIR


accelerate 1.15 never selects FSDP on CPU (its FSDP branch is reached only from the accelerator process
types), so the trainer cannot run FSDP here. This worker shards a LoRA model with torch's FSDP2 itself (gloo,
two CPU processes), trains two steps, and saves the adapter twice from rank 0:
- ``OUT/naive``: ``save_pretrained`` on the sharded model, what the training scripts did before (each
  parameter is then only this rank's shard);
- ``OUT/adapter``: ``toushi.training.save_adapter`` given the full state dict gathered the way accelerate's
  ``get_state_dict`` gathers an FSDP2 model (``get_model_state_dict``, full_state_dict, broadcast from rank 0,
  offloaded to CPU) - the path ``train/*.py`` take through ``full_state_dict(trainer)``.
``OUT/result.json`` says what the naive save did.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

gc.disable()  # as the trainers do (train/*.py, toushi/heap.py): no collections while the imports' heap grows

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from peft import get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from toushi.heap import imports_done  # noqa: E402
from toushi.training import lora_config, save_adapter  # noqa: E402

imports_done()

TEXTS = ["I failed my exam and I feel awful about it.", "My dog is sick and I can't afford the vet."]


def main(base: str, out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, lora_config(4, 8, 0.0, "all-linear", "sft.lora"))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    tok = AutoTokenizer.from_pretrained(base)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = tok(TEXTS[rank % len(TEXTS)], return_tensors="pt")["input_ids"]
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optim.step()
        optim.zero_grad()
    sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())

    result: dict = {"world_size": world, "params_are_dtensors": sharded}
    if rank == 0:
        try:
            model.save_pretrained(str(out / "naive"), selected_adapters=["default"])
            result["naive"] = "saved"
        except Exception as e:  # noqa: BLE001 - recorded for the test to see
            result["naive"] = f"{type(e).__name__}: {e}"[:300]
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=True)
    full = get_model_state_dict(model, options=options)  # collective: every rank
    if rank == 0:
        save_adapter(model, tok, out / "adapter", full)
        (out / "result.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
