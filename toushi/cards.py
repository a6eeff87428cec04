"""Model and dataset cards (``README.md`` with the Hub's metadata header) for exported students and training
sets, and the upload of an export folder to the Hub.

The cards are rendered from ``toushi/templates/export/*.md.j2`` through huggingface_hub's card classes, so
the YAML header is the Hub's own. They say what a user must know before using the artifact: base model,
method, recipe, the eval table (from the run's ``eval/summary.json`` when there is one), truncation and
refusal rates where known, each corpus source with its licence (``licences.yaml``), and the limits (not a
therapist; crisis posts).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from toushi.export import ExportError, run_recipe
from toushi.store import StageStore
from toushi.templates import TEMPLATE_DIR

CARD_DIR = TEMPLATE_DIR / "export"
UNKNOWN_LICENCE = {"spdx": "unknown", "note": "licence unknown to toushi: check the source's licence before use"}


def source_licences(recipe) -> list[dict]:
    """Each corpus source of the recipe with its licence: by file name, then by format, else unknown."""
    known = yaml.safe_load((CARD_DIR / "licences.yaml").read_text(encoding="utf-8"))
    out = []
    for s in recipe.corpus.sources:
        entry = known["by_stem"].get(Path(s.path).stem) or known["by_format"].get(s.format) or UNKNOWN_LICENCE
        out.append({"name": entry.get("name") or s.name or Path(s.path).name, "path": str(s.path),
                    "format": s.format, "spdx": entry["spdx"], "note": entry["note"],
                    "noncommercial": bool(entry.get("noncommercial"))})
    return out


def _pct(ci: dict | None) -> str:
    return "-" if not ci or ci.get("mean") is None else f"{100 * ci['mean']:.0f}%"


def eval_table(run_dir: Path) -> tuple[list[dict], int | None, str | None]:
    """Rows of the eval table (one per system), the number of held-out posts and the judge's reference."""
    path = Path(run_dir) / "eval" / "summary.json"
    if not path.exists():
        return [], None, None
    summary = json.loads(path.read_text(encoding="utf-8"))
    judge = (summary.get("judge") or {}).get("systems") or {}
    rows, posts = [], 0
    for system in summary.get("systems", []):
        m = summary.get("metrics", {}).get(system, {})
        posts = max(posts, (m.get("refusal") or {}).get("n") or 0)
        ppl = (summary.get("nll") or {}).get(system, {}).get("perplexity")
        rows.append({"system": system, **{k: _pct(m.get(k)) for k in ("refusal", "empty", "markdown", "lang_match")},
                     "win_rate": _pct((judge.get(system) or {}).get("win_rate")),
                     "perplexity": f"{ppl:.1f}" if ppl else "-"})
    reference = next((j.get("reference") for j in judge.values() if j.get("reference")), None)
    return rows, posts or None, reference


def truncation_rates(run_dir: Path) -> dict[str, str]:
    """Share of the pairs' weak and strong answers that stopped at the token limit (finish_reason length)."""
    records = StageStore(Path(run_dir), "pairs").records()
    rates = {}
    for role in ("strong", "weak"):
        done = [c for r in records for c in r.get(role) or []]
        if done:
            cut = sum(1 for c in done if c.get("finish_reason") == "length")
            rates[role] = f"{100 * cut / len(done):.0f}% ({cut}/{len(done)})"
    return rates


def _facts(run_dir: Path) -> dict:
    recipe = run_recipe(run_dir)
    sources = source_licences(recipe)
    models = {role: (getattr(recipe.models, role).name if getattr(recipe.models, role) else None)
              for role in ("weak", "strong", "student")}
    return {"recipe": recipe, "sources": sources, "noncommercial": sorted({s["name"] for s in sources if s["noncommercial"]}),
            "models": models, "lang": recipe.run.lang, "truncation": truncation_rates(run_dir),
            "licences": sorted({s["spdx"] for s in sources})}


def write_model_card(out_dir: Path, run_dir: Path, stage: str, base: str, *, merged: bool = True,
                     artifact: str | None = None, parity: dict | None = None) -> Path:
    """README.md in ``out_dir``: the student's model card (LoRA settings from the adapter, the number of
    training examples from the stage's manifest)."""
    from huggingface_hub import ModelCard, ModelCardData

    f = _facts(run_dir)
    rows, posts, reference = eval_table(run_dir)
    adapter_cfg = Path(run_dir) / stage / "adapter" / "adapter_config.json"
    lora = json.loads(adapter_cfg.read_text()) if adapter_cfg.exists() else {}
    manifest_path = Path(run_dir) / stage / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    train_examples = (manifest.get("data") or {}).get("train_examples")
    base_name = Path(base).name if Path(base).exists() else base
    data = ModelCardData(
        language=f["lang"], base_model=None if Path(base).exists() else base,
        library_name="transformers" if merged else "peft", pipeline_tag="text-generation",
        tags=["toushi", "emotional-support", stage, "lora"],
        # a model trained on non-commercial data is released under that data's terms
        license="cc-by-nc-4.0" if f["noncommercial"] else _model_licence(base),
    )
    card = ModelCard.from_template(
        data, template_path=str(CARD_DIR / "model_card.md.j2"),
        title=f"{f['recipe'].run.name}: {stage} student of {base_name}", base=base_name, stage=stage,
        lora={"r": lora.get("r", "?"), "alpha": lora.get("lora_alpha", "?")}, merged=merged,
        models=f["models"], lang=f["lang"], train_examples=train_examples, artifact=artifact,
        eval_rows=rows, eval_prompts=posts, judge_reference=reference or "the reference", truncation=f["truncation"],
        parity=parity, sources=f["sources"], noncommercial=f["noncommercial"],
        recipe_yaml=f["recipe"].to_yaml().strip(),
    )
    path = Path(out_dir) / "README.md"
    card.save(str(path))
    return path


def _model_licence(base: str) -> str | None:
    """The base model's licence when toushi knows it (the offline model's cache marker says it)."""
    marker = Path(base) / "toushi_model.json"
    if marker.exists():
        licence = json.loads(marker.read_text()).get("licence")
        return licence.lower() if licence else None
    return None


def write_dataset_card(out_dir: Path, run_dir: Path, fmt: str, files: dict[str, str], counts: dict) -> Path:
    """README.md in ``out_dir``: the dataset card, whose header names one config per file (``sft``, ``dpo``)
    so ``load_dataset(dir_or_repo, "sft")`` and ``trl sft --dataset_config sft`` find them."""
    from huggingface_hub import DatasetCard, DatasetCardData

    f = _facts(run_dir)
    what = {"sft": "prompt and target answer (`messages`)",
            "dpo": "prompt with a preferred and a rejected answer (`prompt`/`chosen`/`rejected`)"}
    formats = {"trl": "TRL's conversational formats", "llamafactory": "LLaMA-Factory's OpenAI-style messages",
               "sharegpt": "ShareGPT conversations", "alpaca": "Alpaca instruction records"}
    licences = f["licences"]
    data = DatasetCardData(
        language=f["lang"], license=licences[0] if len(licences) == 1 else licences,
        task_categories=["text-generation"], tags=["toushi", "emotional-support", fmt],
        pretty_name=f"{f['recipe'].run.name} training sets ({fmt})",
        configs=[{"config_name": kind, "data_files": [{"split": "train", "path": file}]} for kind, file in files.items()],
    )
    card = DatasetCard.from_template(
        data, template_path=str(CARD_DIR / "dataset_card.md.j2"),
        title=f"{f['recipe'].run.name}: training sets", models=f["models"], format_text=formats[fmt],
        files=[{"config": k, "file": v, "rows": counts.get(k, "?"), "what": what[k]} for k, v in files.items()],
        truncation=f["truncation"], sources=f["sources"], noncommercial=f["noncommercial"],
    )
    path = Path(out_dir) / "README.md"
    card.save(str(path))
    return path


def push_to_hub(folder: Path, repo: str, repo_type: str = "model", private: bool = True) -> str:
    """Upload an export folder (card included) to the Hub repo ``repo``; private unless asked otherwise.
    Needs a token (``HF_TOKEN`` or a saved login); ``HF_ENDPOINT`` points at another Hub."""
    from huggingface_hub import HfApi, get_token, is_offline_mode

    if is_offline_mode():
        raise ExportError(f"--push-to-hub {repo}: HF_HUB_OFFLINE is set; unset it to upload")
    if not get_token():
        raise ExportError(f"--push-to-hub {repo}: no Hugging Face token (set HF_TOKEN or run `hf auth login`)")
    if not (Path(folder) / "README.md").exists():
        raise ExportError(f"{folder}: no README.md card to upload with it")
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
    api.create_repo(repo, repo_type=repo_type, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type=repo_type,
                             commit_message="toushi export", ignore_patterns=["*.log"])
    return info.commit_url
