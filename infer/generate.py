"""Batch generation with a recipe role, resumable. Same as ``toushi generate RECIPE``.

    python infer/generate.py --recipe recipes/X.yaml [--prompts prompts.jsonl] [--role student]
        [--lora dpo] [--out out.jsonl] [--batch-size 32] [--set models.student.sampling.max_tokens=256]

Prompts: JSONL, JSON, CSV/TSV or a `datasets` directory of {id, messages | prompt | text} (default: the run's held-out prompts). Output: JSONL of
{id, messages, completions, model, lora, sampling}; ids already in the output are skipped.
"""

from __future__ import annotations

from _cli import run

if __name__ == "__main__":  # vLLM re-imports the main module in its spawned processes
    run("generate")
