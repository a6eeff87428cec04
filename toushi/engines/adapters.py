"""LoRA adapter checks shared by the vLLM engine and ``toushi serve``.

vLLM rejects adapters whose rank exceeds ``max_lora_rank`` (default 16) and cannot serve adapters that
save whole modules (``modules_to_save``, e.g. a retrained lm_head); both are caught here with a message
that names the adapter instead of failing deep inside the engine.
"""

from __future__ import annotations

import json
from pathlib import Path

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's max_lora_rank accepts


class AdapterError(ValueError):
    """An adapter directory vLLM cannot serve; the message names it and says why."""


def adapter_config(path: str | Path) -> dict:
    cfg = Path(path) / "adapter_config.json"
    if not cfg.is_file():
        raise AdapterError(f"LoRA adapter {path}: no adapter_config.json (not a PEFT adapter directory)")
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except ValueError as e:
        raise AdapterError(f"{cfg}: unreadable: {e}") from None


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
