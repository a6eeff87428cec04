"""Serve a recipe role (default: the student) with vLLM's OpenAI-compatible server and the run's LoRA
adapters (sft, dpo, grpo) registered by name. Same as ``toushi serve RECIPE``.

    python infer/serve.py --recipe recipes/X.yaml [--set serve.port=8001 --set serve.role=weak]

Binding a non-loopback host (--set serve.host=0.0.0.0) needs serve.api_key_env set to the name of an
environment variable that holds the key clients must send.
"""

from __future__ import annotations

from _cli import run

if __name__ == "__main__":  # vLLM re-imports the main module in its spawned processes
    run("serve")
