"""LoRA adapter checks shared by the vLLM engine, eval and ``toushi serve``.

An adapter directory counts only when it is complete (:func:`complete_adapter`): training writes it to a
temporary directory and renames it into place, but an older toushi or a copy cut short can leave a
directory with a config and torn or missing weights, which must never be served or evaluated. vLLM rejects adapters whose rank exceeds ``max_lora_rank`` (default 16) and cannot serve adapters that
save whole modules (``modules_to_save``, e.g. a retrained lm_head); both are caught here with a message
that names the adapter instead of failing deep inside the engine.
"""

from __future__ import annotations

import json
from pathlib import Path

from toushi.errors import ToushiError

ADAPTER_STAGES = ("sft", "dpo", "grpo", "distill", "selftrain")  # run stages that save <stage>/adapter
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's max_lora_rank accepts


class AdapterError(ToushiError, ValueError):
    """An adapter directory vLLM cannot serve; the message names it and says why."""


def adapter_fingerprint(path: str | Path) -> str:
    """Content hash of an adapter's weights: a retrained adapter (same name, same path) invalidates what was
    generated with the old one."""
    from toushi.store import file_hash, stable_id

    weights = sorted(Path(path).glob("adapter_model.*"))
    return stable_id(*(file_hash(w) for w in weights)) if weights else stable_id(str(path))


def adapter_config(path: str | Path) -> dict:
    cfg = Path(path) / "adapter_config.json"
    if not cfg.is_file():
        raise AdapterError(f"LoRA adapter {path}: no adapter_config.json (not a PEFT adapter directory)")
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except ValueError as e:
        raise AdapterError(f"{cfg}: unreadable: {e}") from None


def _complete_safetensors(path: Path) -> bool:
    """The file holds its whole header and every tensor the header lists (a torn write is shorter)."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size >= 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def complete_adapter(path: str | Path) -> bool:
    """A PEFT adapter directory with a readable config and whole weights (safetensors checked in full)."""
    path = Path(path)
    try:
        json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if (path / "adapter_model.safetensors").is_file():
        return _complete_safetensors(path / "adapter_model.safetensors")
    return (path / "adapter_model.bin").is_file()


def run_adapters(run_dir: str | Path, stages=ADAPTER_STAGES) -> dict[str, Path]:
    """Stage name -> adapter directory for each of ``stages`` whose complete adapter is in the run."""
    found = {}
    for name in ADAPTER_STAGES:
        d = Path(run_dir) / name / "adapter"
        if name in stages and complete_adapter(d):
            found[name] = d
    return found


def check_servable(name: str, path: str | Path) -> int:
    """Raise AdapterError when vLLM cannot serve the adapter; return its largest rank."""
    cfg = adapter_config(path)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"LoRA adapter {name!r} ({path}): peft_type {cfg.get('peft_type')} is not LoRA")
    if cfg.get("modules_to_save"):
        raise AdapterError(
            f"LoRA adapter {name!r} ({path}) saves whole modules {cfg['modules_to_save']} (modules_to_save); "
            "vLLM cannot serve that. Merge it into the base model (PeftModel.merge_and_unload) and serve the "
            "merged model instead."
        )
    ranks = [int(cfg.get("r", 8)), *(int(r) for r in (cfg.get("rank_pattern") or {}).values())]
    return max(ranks)


def max_lora_rank(adapters: dict[str, str | Path]) -> int:
    """The smallest rank vLLM accepts that fits every adapter (after checking each is servable)."""
    need = max((check_servable(n, p) for n, p in adapters.items()), default=8)
    for r in VLLM_LORA_RANKS:
        if r >= need:
            return r
    raise AdapterError(f"LoRA rank {need} exceeds the largest rank vLLM serves ({VLLM_LORA_RANKS[-1]})")
