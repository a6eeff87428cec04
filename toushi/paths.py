"""Where toushi keeps things that are not part of a run: the model cache."""

from __future__ import annotations

import os
from pathlib import Path


def toushi_home() -> Path:
    """``$TOUSHI_HOME`` or ``~/.cache/toushi`` (the Makefile points it at the project's .cache/)."""
    return Path(os.environ.get("TOUSHI_HOME") or Path.home() / ".cache" / "toushi").expanduser()


def repo_root() -> Path:
    """The checkout this package runs from (train/ and infer/ scripts live here, not in the wheel)."""
    return Path(__file__).resolve().parent.parent
