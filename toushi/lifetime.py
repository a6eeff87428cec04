"""Nothing outlives toushi: a watchdog stops toushi's leftover subprocesses when toushi dies, however it dies.

vLLM starts its engine core (and, with tensor parallelism, workers) as subprocesses; ``toushi run`` launches
training with accelerate; ``toushi serve`` starts the API server. A SIGKILL (or an OOM kill) of toushi runs
none of its cleanup, and those processes would be re-parented to init and live on, holding RAM or VRAM
that the rerun then lacks. So before toushi starts such a process it starts this watchdog, once per
process: ``python -m toushi.lifetime PID START``. The watchdog runs in its own session (a Ctrl-C in the
terminal does not kill it before it has cleaned up), walks the process tree below PID every 0.25 s and
remembers every descendant by pid and start time (so a reused pid is never hit). When PID is gone, it
sends SIGTERM to each remembered process still alive, SIGKILL after a grace period, says on stderr what it
stopped, and exits. After a clean exit nothing is left to stop and it exits silently.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.25
GRACE_S = 5.0
_watchdog: tuple[int, subprocess.Popen] | None = None  # (the pid it watches, the watchdog process)


def proc_start(pid: int) -> int | None:
    """Start time (clock ticks since boot) of a running process; None when it is gone or a zombie.

    A zombie has exited; only its parent's wait() is pending, and that parent may be waiting for our end
    of its stderr pipe to close, so a zombie counts as gone.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
    return None if fields[0] in ("Z", "X") else int(fields[19])  # fields 3 (state) and 22 (start time)


def _parents() -> dict[int, int]:
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                out[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass  # exited while we looked
    return out


def descendants(root: int) -> set[int]:
    """Pids of every process below ``root`` in the process tree now."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _alive(known: dict[int, int]) -> dict[int, int]:
    return {pid: st for pid, st in known.items() if proc_start(pid) == st}


def watch(parent: int, parent_start: int) -> None:
    """Remember parent's descendants until parent is gone, then stop those still running."""
    me = os.getpid()
    known: dict[int, int] = {}
    while proc_start(parent) == parent_start:
        for pid in descendants(parent) - {me}:
            st = proc_start(pid)
            if st is not None:
                known[pid] = st
        time.sleep(POLL_S)
    # a descendant may have started children of its own since the last look
    for pid in list(known):
        for sub in descendants(pid) - {me}:
            st = proc_start(sub)
            if st is not None:
                known[sub] = st
    left = _alive(known)
    if not left:
        return
    names = ", ".join(f"{pid} ({_name(pid)})" for pid in sorted(left))
    for pid in left:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + GRACE_S
    while time.time() < deadline and _alive(left):
        time.sleep(0.1)
    for pid in _alive(left):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    print(f"[toushi] process {parent} ended; stopped what it left running: {names}", file=sys.stderr, flush=True)


def ensure_watchdog() -> None:
    """Start the watchdog for this process, once (call it before starting any engine or launcher)."""
    global _watchdog
    me = os.getpid()
    if _watchdog is not None and _watchdog[0] == me and _watchdog[1].poll() is None:
        return
    proc = subprocess.Popen(
        [sys.executable, "-m", "toushi.lifetime", str(me), str(proc_start(me))],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True, close_fds=True,
    )
    _watchdog = (me, proc)


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]))
