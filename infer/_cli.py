"""Shared by the infer/ scripts: run a ``toushi`` command with ``--recipe FILE`` (the scripts' convention,
as in train/*.py) turned into the command's recipe argument, so script and CLI share one code path."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def run(command: str, argv: list[str] | None = None, recipe: bool = True) -> None:
    from toushi.cli import app

    argv = list(sys.argv[1:] if argv is None else argv)
    if recipe:
        p = argparse.ArgumentParser(add_help=False)  # --help falls through to the command's own help
        p.add_argument("--recipe")
        known, argv = p.parse_known_args(argv)
        argv = ([known.recipe] if known.recipe else []) + argv
    app([command, *argv], prog_name=f"python infer/{command}.py")
