"""One model/engine argument definition shared by ``infer/*.py``, ``toushi generate|serve|chat`` and the
benchmark: pick a recipe role or name a model, then override any ModelSpec key with ``--set``.
Both paths end in a validated :class:`ModelSpec`, like vLLM's offline LLM and server share one args class.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import ValidationError

from toushi.recipe import ModelSpec, Recipe, RecipeError, apply_overrides, load_recipe

ROLES = ("weak", "strong", "student", "judge")


def add_spec_args(parser: argparse.ArgumentParser, default_role: str | None = None) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--recipe", type=Path, help="Recipe YAML whose models.<role> to use.")
    g.add_argument("--role", choices=ROLES, default=default_role, help="Recipe role (with --recipe).")
    g.add_argument("--model", help="Model reference instead of a recipe role (cached name, path or HF id).")
    g.add_argument("--engine", choices=("vllm", "openai", "hf"), help="Engine (overrides the spec's).")
    g.add_argument(
        "--set", dest="spec_set", action="append", default=[], metavar="KEY=VALUE",
        help="Override a ModelSpec key, e.g. --set sampling.temperature=0 --set kv_cache_gb=0.25.",
    )


def load_args_recipe(args: argparse.Namespace) -> Recipe | None:
    return load_recipe(args.recipe) if args.recipe else None


def spec_from_args(args: argparse.Namespace) -> ModelSpec:
    """The ModelSpec the arguments describe; RecipeError with the offending key when invalid."""
    if args.model and args.recipe:
        raise RecipeError("give either --model or --recipe/--role, not both")
    if args.recipe:
        recipe = load_recipe(args.recipe)
        role = args.role or "student"
        spec = getattr(recipe.models, role)  # role is one of ROLES (argparse choices)
        if spec is None:
            raise RecipeError(f"{args.recipe}: models.{role} is not set")
        data = spec.model_dump(mode="json")
    elif args.model:
        data = {"name": args.model}
    else:
        raise RecipeError("name a model: --model NAME, or --recipe FILE --role ROLE")
    if args.engine:
        data["engine"] = args.engine
    data = apply_overrides(data, args.spec_set)
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as e:
        keys = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise RecipeError(f"model spec: {keys}") from None
