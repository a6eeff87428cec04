"""Export a run's students and training sets for other tools.

- ``merge``: the LoRA adapter folded into the base weights, saved as a full safetensors model that
  transformers and vLLM load without PEFT.
- ``export_data``: the SFT and DPO sets (exactly what training used: held-out excluded, flagged dropped)
  as ShareGPT (``from``/``value``), LLaMA-Factory (OpenAI-style ``messages``) or Alpaca JSONL, with the
  ``dataset_info.json`` LLaMA-Factory reads to find them.
"""

from __future__ import annotations

import json
from pathlib import Path

from toushi.datasets import DatasetError, load_dpo, load_sft
from toushi.recipe import load_recipe
from toushi.store import atomic_write_text

FORMATS = ("sharegpt", "llamafactory", "alpaca")
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


class ExportError(RuntimeError):
    """Nothing to export or a bad target; the message names the path."""


# ----------------------------------------------------------------------------------- merge


def merge(adapter_dir: Path, out_dir: Path, base: str | None = None, dtype: str = "auto") -> Path:
    """Fold a LoRA adapter into its base model and save model + tokenizer as safetensors."""
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise ExportError(f"{adapter_dir}: no adapter_config.json (train the stage first)")
    base = base or PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    if not base:
        raise ExportError(f"{adapter_dir}: the adapter names no base model; pass --base")
    # Full precision weights, never 4-bit: a QLoRA adapter merges into the unquantized base.
    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto" if dtype == "auto" else getattr(torch, dtype))
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(out_dir))
    return out_dir


# ----------------------------------------------------------------------------------- data


def _sharegpt_turns(messages: list[dict]) -> tuple[str | None, list[dict]]:
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    turns = [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in messages if m["role"] != "system"]
    return system, turns


def _sft_row(e: dict, fmt: str) -> dict:
    msgs = e["messages"]
    if fmt == "llamafactory":
        return {"messages": msgs}
    if fmt == "sharegpt":
        system, turns = _sharegpt_turns(msgs)
        return {"conversations": turns, **({"system": system} if system else {})}
    system = next((m["content"] for m in msgs if m["role"] == "system"), "")
    user = [m["content"] for m in msgs if m["role"] == "user"]
    return {"instruction": user[-1], "input": "", "output": msgs[-1]["content"], "system": system}


def _dpo_row(e: dict, fmt: str) -> dict:
    chosen, rejected = e["chosen"][0]["content"], e["rejected"][0]["content"]
    if fmt == "llamafactory":
        return {"messages": e["prompt"], "chosen": {"role": "assistant", "content": chosen},
                "rejected": {"role": "assistant", "content": rejected}}
    if fmt == "sharegpt":
        _, turns = _sharegpt_turns(e["prompt"])
        return {"conversations": turns, "chosen": {"from": "gpt", "value": chosen},
                "rejected": {"from": "gpt", "value": rejected}}
    return {"instruction": e["prompt"][-1]["content"], "input": "", "chosen": chosen, "rejected": rejected}


def _dataset_info(fmt: str, files: dict[str, str]) -> dict:
    """LLaMA-Factory's dataset_info.json entries for the files written."""
    info = {}
    for kind, file in files.items():
        ranking = kind == "dpo"
        if fmt == "alpaca":
            columns = {"prompt": "instruction", "query": "input"}
            columns.update({"chosen": "chosen", "rejected": "rejected"} if ranking else
                           {"response": "output", "system": "system"})
            entry = {"file_name": file, "columns": columns}
        elif fmt == "sharegpt":
            columns = {"messages": "conversations"}
            columns.update({"chosen": "chosen", "rejected": "rejected"} if ranking else {"system": "system"})
            entry = {"file_name": file, "formatting": "sharegpt", "columns": columns}
        else:
            columns = {"messages": "messages"}
            if ranking:
                columns.update({"chosen": "chosen", "rejected": "rejected"})
            entry = {"file_name": file, "formatting": "sharegpt", "columns": columns,
                     "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                              "assistant_tag": "assistant", "system_tag": "system"}}
        if ranking:
            entry["ranking"] = True
        info[f"toushi_{kind}"] = entry
    return info


def run_recipe(run_dir: Path):
    """The recipe a run was made with (saved by `toushi run`, or by a training script beside its output)."""
    for path in (run_dir / "recipe.yaml", run_dir / "sft" / "recipe.yaml", run_dir / "dpo" / "recipe.yaml"):
        if path.exists():
            return load_recipe(path, check_files=False)
    raise ExportError(f"{run_dir}: no recipe.yaml (not a toushi run directory)")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def export_data(run_dir: Path, fmt: str, out_dir: Path | None = None) -> dict:
    """Write sft.jsonl / dpo.jsonl (those the run's records can build) + dataset_info.json; returns counts."""
    if fmt not in FORMATS:
        raise ExportError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    run_dir = Path(run_dir)
    recipe = run_recipe(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "export" / fmt
    counts, files = {}, {}
    builders = {
        "sft": lambda: load_sft(run_dir, target=recipe.sft.target, context_distillation=recipe.sft.context_distillation,
                                keep_think=recipe.sft.keep_think, drop_markdown=recipe.sft.drop_markdown),
        "dpo": lambda: load_dpo(run_dir, ladder=recipe.dpo.ladder, drop_markdown=recipe.dpo.drop_markdown),
    }
    errors = []
    for kind, build in builders.items():
        try:
            examples, _ = build()
        except DatasetError as e:
            errors.append(str(e))
            continue
        row = _sft_row if kind == "sft" else _dpo_row
        files[kind] = f"{kind}.jsonl"
        _write_jsonl(out_dir / files[kind], [row(e, fmt) for e in examples])
        counts[kind] = len(examples)
    if not files:
        raise ExportError("nothing to export:\n" + "\n".join(errors))
    atomic_write_text(out_dir / "dataset_info.json", json.dumps(_dataset_info(fmt, files), indent=2) + "\n")
    return {"dir": str(out_dir), **counts}
