"""``toushi serve``: a recipe role behind vLLM's OpenAI-compatible server, with the run's LoRA adapters.

The run's trained adapters (``runs/<run>/{sft,dpo,grpo}/adapter``) are registered by stage name, so a
client asks for ``model="dpo"`` to get the DPO student and for the base model's name to get the base.
They are attached only when the served model is the student's base (they were trained on it). The API
key is read from the environment variable ``serve.api_key_env`` names and then needed on every route but
/health (:mod:`toushi.engines.guard`); binding a non-loopback address without one is refused (by
:class:`VLLMServer`), and so is a start with vLLM's dev-mode or runtime-LoRA variables set.
"""

from __future__ import annotations

import os
from pathlib import Path

from rich.console import Console

from toushi.engines.adapters import run_adapters
from toushi.engines.server import ServerError, VLLMServer
from toushi.recipe import ModelSpec, Recipe, RecipeError


def role_spec(recipe: Recipe, role: str) -> ModelSpec:
    spec = getattr(recipe.models, role, None)
    if spec is None:
        set_ = [r for r in ("student", "weak", "strong", "judge") if getattr(recipe.models, r) is not None]
        hint = f" (set roles: {', '.join(set_)})" if set_ else ""
        raise RecipeError(f"models.{role} is not set in the recipe{hint}")
    return spec


def adapters_for(recipe: Recipe, role: str) -> dict[str, Path]:
    """The role's own adapters, plus the run's when the role's model is the student's base model."""
    spec = role_spec(recipe, role)
    student = recipe.models.student
    trained = run_adapters(recipe.run_dir) if student is not None and spec.name == student.name else {}
    return {**spec.lora_adapters, **trained}


def serve_spec(recipe: Recipe) -> ModelSpec:
    """The served role's spec with every adapter it should carry."""
    spec = role_spec(recipe, recipe.serve.role)
    adapters = adapters_for(recipe, recipe.serve.role)
    return spec.model_copy(update={"lora_adapters": adapters, "enable_lora": spec.enable_lora or bool(adapters)})


def server_api_key(recipe: Recipe) -> str | None:
    env = recipe.serve.api_key_env
    if env is None:
        return None
    key = os.environ.get(env)
    if not key:
        raise ServerError(f"serve.api_key_env names {env}, but that environment variable is not set")
    return key


def make_server(recipe: Recipe, log_path: Path | None = None) -> VLLMServer:
    """The (not yet started) server for the recipe's serve section."""
    cfg = recipe.serve
    return VLLMServer(serve_spec(recipe), host=cfg.host, port=cfg.port, api_key=server_api_key(recipe),
                      log_path=log_path, limits=cfg.limits, allow_unsafe_env=cfg.allow_unsafe_env)


def describe(server: VLLMServer, spec: ModelSpec, api_key_env: str | None) -> list[str]:
    """What a client needs: the base URL, the model names, and how to authenticate."""
    lines = [f"base URL: {server.base_url}", f"model:    {server.served_name}  (base, no adapter)"]
    lines += [f"adapter:  {name}  ({path})" for name, path in spec.lora_adapters.items()]
    lines.append(f"API key:  from ${api_key_env} (Authorization: Bearer ...)" if api_key_env else "API key:  none")
    key_opt = f" --api-key-env {api_key_env}" if api_key_env else ""
    first = next(iter(spec.lora_adapters), server.served_name)
    lines.append(f"try:      toushi chat --base-url {server.base_url} --model {first}{key_opt}")
    return lines


def serve_forever(recipe: Recipe, console: Console) -> int:
    """Start the server in the foreground, print how to reach it, and keep it up until Ctrl-C."""
    spec = serve_spec(recipe)
    server = make_server(recipe)
    console.print(f"starting vLLM server for {recipe.serve.role} ({spec.name}) on {recipe.serve.host}:"
                  f"{recipe.serve.port} ...", highlight=False)
    try:
        server.start()  # not `with server:` - a Ctrl-C during start-up must still stop the process
        for line in describe(server, spec, recipe.serve.api_key_env):
            console.print(line, highlight=False, soft_wrap=True)
        return server.proc.wait()  # the server's own exit code if it stops by itself
    except KeyboardInterrupt:
        console.print("stopping the server ...")
        return 0
    finally:
        server.stop()
