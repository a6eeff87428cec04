"""Quiet terminal: a stage's library and engine output goes to ``runs/<run>/<stage>/engine.log``.

vLLM's engine core, transformers/TRL warnings, tqdm bars and accelerate write thousands of lines to file
descriptors 1 and 2, from this process and from subprocesses that inherit them. While a stage runs,
``output_to`` points both descriptors at the stage's log, so all of that lands there whoever wrote it.
toushi's own lines and progress bars use ``terminal_console()``, a console on a copy of the terminal's
stderr taken before the redirection. ``toushi run -v`` leaves everything on the terminal.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console

LOG_NAME = "engine.log"


def terminal_console() -> Console:
    """A console on a duplicate of the current stderr: it still reaches the terminal while fd 2 is redirected."""
    stream = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    return Console(file=stream, soft_wrap=True)


_fd2_stream = None


def _writes_to(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        return False


def _fd2() -> object:
    """One text stream over file descriptor 2 for the process's life, never closed: a logging handler made
    during a stage (vLLM's engine runs in this process on a CPU and sets up its logger when first imported)
    keeps a stream that is still open in later stages, where fd 2 then points at their logs."""
    global _fd2_stream
    if _fd2_stream is None:
        _fd2_stream = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    return _fd2_stream


@contextlib.contextmanager
def output_to(log_path: Path) -> Iterator[Path]:
    """Send file descriptors 1 and 2 (and so every subprocess started meanwhile) to ``log_path`` (appended)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    saved_streams = sys.stdout, sys.stderr
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        # sys.stdout/err normally write to fds 1/2 and follow them; where a test harness or notebook replaced
        # them, they are pointed at fd 2 for the stage
        if not (_writes_to(sys.stdout, 1) and _writes_to(sys.stderr, 2)):
            sys.stdout = sys.stderr = _fd2()
        yield log_path
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = saved_streams
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


def tail(path: Path, lines: int = 25) -> str:
    """The last lines of a log (for the terminal when a stage fails)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
