"""Export a run's students and training sets for other tools.

- ``merge``: the LoRA adapter folded into the base weights, saved as a full safetensors model that
  transformers and vLLM load without PEFT; ``merge_checked`` then checks that it answers as the adapter does
  (``toushi.parity``) and writes ``parity.json`` and a model card (``toushi.cards``) beside it. GGUF lives in
  ``toushi.gguf_export``.
- ``export_data``: the SFT and DPO sets (exactly what training used: held-out excluded, flagged dropped)
  as ShareGPT (``from``/``value``), LLaMA-Factory (OpenAI-style ``messages``) or Alpaca JSONL, with the
  ``dataset_info.json`` LLaMA-Factory reads to find them; or in TRL's conversational formats (``messages``;
  ``prompt``/``chosen``/``rejected`` message lists), which ``trl sft`` / ``trl dpo`` train on as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

from toushi.datasets import DatasetError, load_dpo, load_sft
from toushi.errors import ToushiError
from toushi.recipe import load_recipe
from toushi.store import atomic_write_text

FORMATS = ("sharegpt", "llamafactory", "alpaca", "trl")
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}


class ExportError(ToushiError, RuntimeError):
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


def saved_dtype(model_dir: Path) -> str:
    """The dtype a saved checkpoint's weights are in (its config's ``dtype``/``torch_dtype``)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def parity_vllm_spec(recipe):
    """The vLLM settings the run's student uses (its context, KV cache, eager mode), without adapters."""
    from toushi.engines.vllm_engine import on_cpu
    from toushi.recipe import ModelSpec

    student = recipe.models.student if recipe is not None else None
    if student is not None and student.engine == "vllm":
        return student.model_copy(update={"enable_lora": False, "lora_adapters": {}, "system_prompt_file": None,
                                          "data_parallel_size": 1})
    cpu = on_cpu()
    return ModelSpec(name="merged", engine="vllm", enforce_eager=cpu, max_model_len=2048,
                     kv_cache_gb=1.0 if cpu else None)


def merge_checked(run_dir: Path, stage: str, out_dir: Path | None = None, *, base: str | None = None,
                  dtype: str = "auto", n_prompts: int = 8, max_tokens: int = 48, vllm: bool = True,
                  allow_mismatch: bool = False, console=None) -> dict:
    """``merge`` a stage's adapter, then check parity (adapter vs merged under transformers and vLLM) on the
    run's held-out prompts; write ``parity.json`` and the model card beside the model. A mismatch raises
    ExportError unless ``allow_mismatch`` (then the card says so)."""
    from peft import PeftConfig

    from toushi import parity
    from toushi.cards import write_model_card

    run_dir = Path(run_dir)
    adapter = run_dir / stage / "adapter"
    out = merge(adapter, out_dir or run_dir / stage / "merged", base=base, dtype=dtype)
    base = base or PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    recipe = run_recipe(run_dir)
    prompts, source = parity.parity_prompts(run_dir, n_prompts, recipe.run.lang)
    spec = None
    if vllm:
        try:
            import vllm as _  # noqa: F401
            spec = parity_vllm_spec(recipe)
        except ImportError:
            if console:
                console.print("[yellow]parity: vLLM is not installed; checking transformers only[/yellow]")
    if console:
        console.print(f"parity: {len(prompts)} {source}, answered by the adapter (PEFT), the merged model "
                      f"(transformers{', vLLM' if spec else ''})")
    result = parity.check_parity(adapter, base, out, prompts, dtype=saved_dtype(out), vllm_spec=spec,
                                 max_tokens=max_tokens)
    result["prompt_source"] = source
    parity.write_result(result, out / "parity.json")
    line = parity.summary_line(result)
    if not result["ok"] and not allow_mismatch:
        raise ExportError(f"{out}: the merged model answers differently from its adapter ({line}); "
                          f"see {out / 'parity.json'} (--allow-mismatch to keep it anyway)")
    card = write_model_card(out, run_dir, stage, base, merged=True, artifact="merged safetensors model",
                            parity={"prompts": len(prompts), "summary": line})
    return {"dir": str(out), "ok": result["ok"], "parity": line, "card": str(card)}


# ----------------------------------------------------------------------------------- data


def _sharegpt_turns(messages: list[dict]) -> tuple[str | None, list[dict]]:
    system = next((m["content"] for m in messages if m["role"] == "system"), None)
    turns = [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in messages if m["role"] != "system"]
    return system, turns


def _sft_row(e: dict, fmt: str) -> dict:
    msgs = e["messages"]
    if fmt in ("llamafactory", "trl"):
        return {"messages": msgs}
    if fmt == "sharegpt":
        system, turns = _sharegpt_turns(msgs)
        return {"conversations": turns, **({"system": system} if system else {})}
    system = next((m["content"] for m in msgs if m["role"] == "system"), "")
    user = [m["content"] for m in msgs if m["role"] == "user"]
    return {"instruction": user[-1], "input": "", "output": msgs[-1]["content"], "system": system}


def _dpo_row(e: dict, fmt: str) -> dict:
    if fmt == "trl":  # the training set's own shape: TRL's conversational preference format
        return {"prompt": e["prompt"], "chosen": e["chosen"], "rejected": e["rejected"]}
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
        "dpo": lambda: load_dpo(run_dir, guided_pairs=recipe.dpo.guided_pairs, drop_markdown=recipe.dpo.drop_markdown),
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
    if fmt != "trl":  # LLaMA-Factory's index; TRL reads the card's configs instead
        atomic_write_text(out_dir / "dataset_info.json", json.dumps(_dataset_info(fmt, files), indent=2) + "\n")
    from toushi.cards import write_dataset_card

    write_dataset_card(out_dir, run_dir, fmt, files, counts)
    return {"dir": str(out_dir), **counts}
