"""Where the test suite's time goes: the slowest tests and each file's total, from the record every pytest run
writes (tests/conftest.py: wall and CPU seconds per test, setup and teardown included).

    python scripts/test_budget.py                      # the last run's record (.pytest_cache/test-times.json)
    python scripts/test_budget.py other.json --top 30
    python scripts/test_budget.py --budget-min 25      # say how far the last run is from a budget
    python scripts/test_budget.py --against old.json   # each file's time beside an earlier run's

Not a timed test: it prints, and exits 1 only when --budget-min is given and the run's wall time is over it, so a
change that makes the suite slower is seen by whoever runs it (`make test` prints it after every run). The CPU
column barely moves when the machine is busy; wall time is what CI waits for. State the CPU kind with any number
you record (`lscpu`): the record says the kind it ran on (and its commit), and this prints it. The AVX2-only kind
took 1.19x the AVX512-BF16 kind's time for the suite, about 2x for compute-bound tests (README, "Suite time").
Compare runs of one host only: hosts of one kind differ by more than most changes save.

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
    ap.add_argument("--against", type=Path, default=None, help="an earlier run's record: each file's time beside it")
    args = ap.parse_args(argv)
    for record in (args.record, args.against):
        if record is not None and not record.is_file():
            print(f"no test-time record at {record}: run pytest first", file=sys.stderr)
            return 2
    times, background, session = read(args.record)
    files = by_file(times)
    wall = sum(t["wall_s"] for t in times.values())
    cpu = sum(t["cpu_s"] for t in times.values())
    where = f"{session['cpu']}" + (f", commit {session['commit']}" if session.get("commit") else "") \
        if session and "cpu" in session else f"{cpu_kind()} here; the record does not say where it ran"
    print(f"{len(times)} tests, {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU ({where})")
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
    if args.against is not None:
        compare(files, session, *read(args.against))
    if args.budget_min is not None and wall > args.budget_min * 60:
        print(f"\nover budget: {wall / 60:.1f} min > {args.budget_min:g} min", file=sys.stderr)
        return 1
    return 0


def read(record: Path) -> tuple[dict, dict, dict | None]:
    """The tests' times, the background servers' start times, and the run's own entry (None before workers)."""
    times: dict[str, dict] = json.loads(record.read_text())
    background = {k.split("::", 1)[1]: times.pop(k)["wall_s"] for k in list(times) if k.startswith("background::")}
    return times, background, times.pop("session::pytest", None)


def by_file(times: dict) -> dict[str, list[float]]:
    """Each test file's [wall s, CPU s, tests]."""
    files: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for nodeid, t in times.items():
        f = files[nodeid.split("::", 1)[0]]
        f[0] += t["wall_s"]
        f[1] += t["cpu_s"]
        f[2] += 1
    return files


def compare(files: dict, session: dict | None, old_times: dict, _background: dict, old_session: dict | None) -> None:
    """Each file's wall and CPU seconds beside the earlier run's, the largest changes first, and both runs' walls."""
    old = by_file(old_times)

    def said(s: dict | None) -> str:
        if s is None:
            return "not recorded"
        commit = f", commit {s['commit']}" if s.get("commit") else ""
        return f"{s['wall_s'] / 60:.1f} min ({s.get('cpu', 'its CPU kind not recorded')}{commit})"

    print(f"\nagainst the earlier run: pytest ran {said(session)}; the earlier run {said(old_session)}")
    print("by file (wall s now / before / change; CPU s now / before):")
    names = sorted(set(files) | set(old), key=lambda n: -abs(files.get(n, [0.0])[0] - old.get(n, [0.0])[0]))
    for name in names:
        (w, c, _), (ow, oc, _) = files.get(name, (0.0, 0.0, 0)), old.get(name, (0.0, 0.0, 0))
        print(f"  {w:7.1f} {ow:7.1f} {w - ow:+7.1f}   {c:7.1f} {oc:7.1f}  {name}")
    now_cpu, old_cpu = sum(f[1] for f in files.values()), sum(f[1] for f in old.values())
    print(f"  tests' CPU in all: {now_cpu / 60:.1f} min now, {old_cpu / 60:.1f} min before")


if __name__ == "__main__":
    raise SystemExit(main())
