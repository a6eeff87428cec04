"""Where the test suite's time goes: the slowest tests and each file's total, from the record every pytest run
writes (tests/conftest.py: wall and CPU seconds per test, setup and teardown included).

    python scripts/test_budget.py                      # the last run's record (.pytest_cache/test-times.json)
    python scripts/test_budget.py other.json --top 30
    python scripts/test_budget.py --budget-min 25      # say how far the last run is from a budget

Not a timed test: it prints, and exits 1 only when --budget-min is given and the run's wall time is over it, so a
change that makes the suite slower is seen by whoever runs it (`make test` prints it after every run). The CPU
column barely moves when the machine is busy; wall time is what CI waits for. State the CPU kind with any number
you record (`lscpu`): the AVX2-only kind takes about 2.5x the AVX512-BF16 kind's time.

The servers the suite starts in its background thread (tests/conftest.py) are listed apart, with their start's
wall time only: it overlaps the tests'. Under pytest-xdist (`make test` runs two workers) the tests' times add up
to more than the run took; the record's ``session::pytest`` entry holds the run's own wall time, which is what a
budget is checked against, and each worker's share is listed, so an unbalanced split shows.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from toushi.hardware import cpu_kind  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("record", nargs="?", type=Path, default=REPO / ".pytest_cache" / "test-times.json")
    ap.add_argument("--top", type=int, default=15, help="how many of the slowest tests to list")
    ap.add_argument("--budget-min", type=float, default=None, help="the suite's wall-time budget in minutes")
    args = ap.parse_args(argv)
    if not args.record.is_file():
        print(f"no test-time record at {args.record}: run pytest first", file=sys.stderr)
        return 2
    times: dict[str, dict[str, float]] = json.loads(args.record.read_text())
    background = {k.split("::", 1)[1]: times.pop(k)["wall_s"] for k in list(times) if k.startswith("background::")}
    session = times.pop("session::pytest", None)
    files: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for nodeid, t in times.items():
        f = files[nodeid.split("::", 1)[0]]
        f[0] += t["wall_s"]
        f[1] += t["cpu_s"]
        f[2] += 1
    wall = sum(t["wall_s"] for t in times.values())
    cpu = sum(t["cpu_s"] for t in times.values())
    print(f"{len(times)} tests, {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU ({cpu_kind()})")
    if session is not None:
        workers = session.get("workers") or 0
        on = f"on {workers} xdist workers" if workers else "without workers"
        print(f"pytest ran {session['wall_s'] / 60:.1f} min {on} (the tests' wall times above are summed)")
        wall = session["wall_s"]
    print(f"\nslowest {args.top} tests (wall s / CPU s):")
    for nodeid, t in sorted(times.items(), key=lambda kv: -kv[1]["wall_s"])[: args.top]:
        print(f"  {t['wall_s']:7.1f} {t['cpu_s']:7.1f}  {nodeid}")
    print("\nby file (wall s / CPU s / tests):")
    for name, (w, c, n) in sorted(files.items(), key=lambda kv: -kv[1][0]):
        print(f"  {w:7.1f} {c:7.1f} {n:4d}  {name}")
    by_worker: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for t in times.values():
        if "worker" in t:
            by_worker[t["worker"]][0] += t["wall_s"]
            by_worker[t["worker"]][1] += 1
    if by_worker:
        print("\nby worker (wall s summed / tests):")
        for name, (w, n) in sorted(by_worker.items()):
            print(f"  {w:7.1f} {n:4d}  {name}")
    if background:
        print("\nin the background thread, overlapping the tests (wall s):")
        for name, w in sorted(background.items(), key=lambda kv: -kv[1]):
            print(f"  {w:7.1f}  {name}")
    if args.budget_min is not None and wall > args.budget_min * 60:
        print(f"\nover budget: {wall / 60:.1f} min > {args.budget_min:g} min", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
