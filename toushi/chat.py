"""``toushi chat``: a streaming terminal chat against any OpenAI-compatible endpoint.

:class:`ChatSession` holds the history and streams one reply; :func:`chat_loop` reads lines, handles
``/reset`` and ``/exit``, and writes the reply as it arrives. Both take plain callables for input and
output, so the loop runs the same in a terminal and under a test's scripted input. Reasoning models'
``<think>`` blocks are shown but not kept in the history (the next turn sends answers only, as
R1-style models expect).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import openai

from toushi.think import split_think

COMMANDS = "/reset clears the history, /exit (or Ctrl-D) quits"


class ChatSession:
    def __init__(
        self,
        client: openai.OpenAI,
        model: str,
        system: str | None = None,
        temperature: float = 0.7,
        max_tokens: int = 512,
    ):
        self.client, self.model, self.system = client, model, system
        self.temperature, self.max_tokens = temperature, max_tokens
        self.history: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def send(self, text: str, on_delta: Callable[[str], None]) -> str:
        """Stream the reply to ``text`` through ``on_delta``; add both turns to the history and return the
        answer. A failed or interrupted request leaves the history as it was."""
        messages = [*self.history, {"role": "user", "content": text}]
        stream = self.client.chat.completions.create(
            model=self.model, messages=messages, temperature=self.temperature, max_tokens=self.max_tokens,
            stream=True,
        )
        parts: list[str] = []
        try:
            for chunk in stream:
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta
                piece = delta.content or ""
                if piece:
                    parts.append(piece)
                    on_delta(piece)
        finally:
            stream.close()
        answer = split_think("".join(parts)).answer
        self.history = [*messages, {"role": "assistant", "content": answer}]
        return answer


def chat_loop(
    session: ChatSession, read_line: Callable[[], str], write: Callable[[str], None], reply_prefix: str = ""
) -> None:
    """Read a line, answer it, repeat; ``read_line`` raising EOFError ends the chat like /exit."""
    while True:
        try:
            line = read_line().strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            session.reset()
            write("(history cleared)\n")
            continue
        write(reply_prefix)
        try:
            session.send(line, write)
        except KeyboardInterrupt:
            write(" [interrupted; turn dropped]")
        except openai.APIError as e:
            write(f"[error: {type(e).__name__}: {e}]")
        write("\n")


def make_client(base_url: str, api_key_env: str | None) -> openai.OpenAI:
    key = "EMPTY"  # local servers without auth still need a non-empty key in the client
    if api_key_env:
        key = os.environ.get(api_key_env) or ""
        if not key:
            raise ValueError(f"--api-key-env {api_key_env}: that environment variable is not set")
    return openai.OpenAI(base_url=base_url, api_key=key)


def default_model(client: openai.OpenAI) -> str:
    """The first model the endpoint lists (vLLM lists the base model first, then its adapters)."""
    models = [m.id for m in client.models.list()]
    if not models:
        raise ValueError("the endpoint lists no models; pass --model")
    return models[0]


def read_system(path: Path | None) -> str | None:
    return Path(path).read_text(encoding="utf-8").strip() if path else None


def run_terminal(
    base_url: str,
    model: str | None,
    api_key_env: str | None,
    system_file: Path | None,
    temperature: float,
    max_tokens: int,
) -> None:
    """The interactive chat: prompt on stdin, reply streamed to stdout."""
    client = make_client(base_url, api_key_env)
    model = model or default_model(client)
    session = ChatSession(client, model, read_system(system_file), temperature, max_tokens)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    print(f"chatting with {model} at {base_url} ({COMMANDS})")
    chat_loop(session, lambda: input("\nyou> "), write, reply_prefix=f"{model}> ")
