"""Streaming terminal chat against any OpenAI-compatible endpoint. Same as ``toushi chat``.

    python infer/chat.py --base-url http://127.0.0.1:8000/v1 [--model dpo] [--api-key-env KEY_VAR]
        [--system-file guidance.md] [--temperature 0.7] [--max-tokens 512]

Multi-turn; /reset clears the history, /exit or Ctrl-D quits.
"""

from __future__ import annotations

from _cli import run

if __name__ == "__main__":
    run("chat", recipe=False)
