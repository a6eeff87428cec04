"""One ``toushi run`` per run directory: an exclusive ``flock`` on ``runs/<run>/run.lock``.

Two runs on one directory would corrupt it: a whole-file rewrite in one replaces the file the other is
appending to, ``repair_jsonl`` may cut a line the other is still writing, and both mark a stage complete.
The lock is held for the whole run and dies with its process (the kernel drops a flock when the last
descriptor closes, however the process ends), so a killed run never leaves a stale lock; the file stays
and only says who held it last. The descriptor is not inherited by the training and server processes a
run starts (Python opens files close-on-exec), so the lock never outlives toushi through them.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from toushi.errors import ToushiError

LOCK_NAME = "run.lock"


class RunLocked(ToushiError, RuntimeError):
    """Another live process holds the run directory; the message names its pid and command."""


def _holder(fd: int) -> dict:
    """What the holder wrote into the lock file (it writes right after locking: wait a moment for it)."""
    for _ in range(20):
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 1 << 16)
        try:
            return json.loads(raw)
        except ValueError:
            time.sleep(0.05)
    return {}


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock for the block, or raise RunLocked at once when another run holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _holder(fd)
            raise RunLocked(f"{run_dir} is in use by another toushi run (pid {who.get('pid', '?')}: "
                            f"{who.get('command', '?')}); wait for it to end or stop it") from None
        me = {"pid": os.getpid(), "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield
    finally:
        os.close(fd)
