"""Where toushi keeps things that are not part of a run: the model cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def toushi_home() -> Path:
    """``$TOUSHI_HOME`` or ``~/.cache/toushi`` (the Makefile points it at the project's .cache/)."""
    return Path(os.environ.get("TOUSHI_HOME") or Path.home() / ".cache" / "toushi").expanduser()


def repo_root() -> Path:
    """The checkout this package runs from (train/ and infer/ scripts live here, not in the wheel)."""
    return Path(__file__).resolve().parent.parent


@contextmanager
def cache_lock(name: str) -> Iterator[None]:
    """Hold ``$TOUSHI_HOME/locks/<name>.lock`` (a blocking ``flock``) while one cache entry is built.

    Two processes that find an entry missing at once (two `toushi` commands, or the test suite's workers)
    would otherwise both build it, and the second's swap into place would remove the directory the first
    is already reading. Callers check the cache again once they hold the lock. The kernel drops the lock
    with its process, so a killed build never leaves a stale one.
    """
    import fcntl

    path = toushi_home() / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fd:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
