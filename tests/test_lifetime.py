"""The watchdog stops only what toushi started: a host process's own children (a notebook kernel's) live on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from toushi.lifetime import proc_start

# A "notebook kernel": the user's own child first, then toushi's watchdog, a process toushi starts and tracks
# (which starts a grandchild of its own), and one a library starts while toushi calls it.
KERNEL = """
import subprocess, sys, time
user = subprocess.Popen(["sleep", "300"])
from toushi.lifetime import ensure_watchdog, track, tracking_new_children
ensure_watchdog()
server = subprocess.Popen(["sh", "-c", "sleep 300 & wait"])
track(server.pid)
with tracking_new_children():
    engine = subprocess.Popen(["sleep", "301"])  # as vLLM starts its engine core: toushi holds no handle
time.sleep(1.0)  # the watchdog looks every 0.25 s
print(user.pid, server.pid, engine.pid, flush=True)
time.sleep(300)
"""


def _children(pid: int) -> list[int]:
    from toushi.lifetime import descendants

    return sorted(descendants(pid))


def test_watchdog_stops_only_what_toushi_started():
    kernel = subprocess.Popen([sys.executable, "-c", KERNEL], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    user = None
    try:
        user, server, engine = (int(x) for x in kernel.stdout.readline().split())
        grandchild = next(p for p in _children(server))
        started = {p: proc_start(p) for p in (user, server, engine, grandchild)}
        assert all(started.values())
        kernel.send_signal(signal.SIGKILL)  # no cleanup of its own runs
        kernel.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(proc_start(p) == started[p] for p in (server, engine, grandchild)):
            time.sleep(0.1)
        assert [p for p in (server, engine, grandchild) if proc_start(p) == started[p]] == []
        assert proc_start(user) == started[user], "the watchdog killed a process toushi did not start"
    finally:
        kernel.kill()
        if user is not None and proc_start(user) is not None:
            os.kill(user, signal.SIGKILL)
