"""Nothing outlives toushi: a watchdog stops toushi's leftover subprocesses when toushi dies, however it dies.

vLLM starts its engine core (and, with tensor parallelism, workers) as subprocesses; ``toushi run`` launches
training with accelerate; ``toushi serve`` starts the API server. A SIGKILL (or an OOM kill) of toushi runs
none of its cleanup, and those processes would be re-parented to init and live on, holding RAM or VRAM
that the rerun then lacks. So before toushi starts such a process it starts this watchdog, once per
process: ``python -m toushi.lifetime PID START``. The watchdog runs in its own session (a Ctrl-C in the
terminal does not kill it before it has cleaned up).

It stops only what toushi started, never every child of PID: in a notebook or another program that
imports toushi, PID's other children are the user's. toushi tells it each process it starts
(:func:`track`, a line on the watchdog's stdin); for a library that starts processes itself (vLLM's
engine core on a GPU) the children that appear while toushi calls it are told (:func:`tracking_new_children`).
Every 0.25 s the watchdog walks the tree below each tracked process and remembers them all by pid and
start time (so a reused pid is never hit). When PID is gone, it sends SIGTERM to each remembered process
still alive, SIGKILL after a grace period, says on stderr what it stopped, and exits. After a clean exit
nothing is left to stop and it exits silently.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


def _tree() -> dict[int, list[int]]:
    """The process tree now: parent pid -> its children's pids (one walk of /proc)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _parents().items():
        children.setdefault(ppid, []).append(pid)
    return children


def descendants(root: int, tree: dict[int, list[int]] | None = None) -> set[int]:
    """Pids of every process below ``root`` in the process tree now (or in ``tree``, a :func:`_tree`)."""
    children = _tree() if tree is None else tree
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


def _read_tracked(stream, roots: dict[int, int], timeout: float) -> bool:
    """Wait up to ``timeout`` for "PID START" lines from toushi and add them to ``roots``; False at EOF."""
    if not select.select([stream], [], [], timeout)[0]:
        return True
    data = os.read(stream.fileno(), 1 << 16)
    for line in data.decode(errors="replace").splitlines():
        try:
            pid, start = (int(x) for x in line.split())
        except ValueError:
            continue
        roots[pid] = start
    return bool(data)


def watch(parent: int, parent_start: int, stream=None) -> None:
    """Remember the processes toushi tracked and their descendants until parent is gone, then stop those
    still running. ``stream``: where the tracked pids arrive (the watchdog's stdin)."""
    me = os.getpid()
    stream = stream or sys.stdin
    roots: dict[int, int] = {}
    known: dict[int, int] = {}
    open_ = True
    while proc_start(parent) == parent_start:
        live = {pid: st for pid, st in roots.items() if proc_start(pid) == st}
        # one walk of /proc a look, however many processes are tracked: the watchdog of a long session (the
        # test suite's, with its servers) otherwise took a few percent of a core doing nothing
        tree = _tree() if live else {}
        for pid, st in live.items():
            known[pid] = st
            for sub in descendants(pid, tree) - {me}:
                sst = proc_start(sub)
                if sst is not None:
                    known[sub] = sst
        if open_:
            open_ = _read_tracked(stream, roots, POLL_S)
        else:
            time.sleep(POLL_S)
    # a tracked process may have started children of its own since the last look
    tree = _tree()
    for pid in list(known):
        for sub in descendants(pid, tree) - {me}:
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
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True, close_fds=True,
    )
    _watchdog = (me, proc)


def track(pid: int) -> None:
    """Have the watchdog stop ``pid`` (and what it starts) if this process dies without stopping it."""
    ensure_watchdog()
    st = proc_start(pid)
    if st is None:
        return  # already gone
    try:
        _watchdog[1].stdin.write(f"{pid} {st}\n".encode())
        _watchdog[1].stdin.flush()
    except BrokenPipeError:
        pass  # the watchdog is gone (killed by hand): nothing to tell


def _children() -> set[int]:
    me = os.getpid()
    return {pid for pid, ppid in _parents().items() if ppid == me}


@contextmanager
def tracking_new_children() -> Iterator[None]:
    """Track the processes this process starts inside the block through a library (vLLM's engine core):
    toushi holds no Popen for them, but they are the children that were not there before."""
    ensure_watchdog()
    before = _children()
    try:
        yield
    finally:
        for pid in _children() - before:
            track(pid)


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]))
