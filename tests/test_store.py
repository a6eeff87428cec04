"""Run store: kill-safety, torn-line repair, atomic manifests."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from toushi.store import RecordWriter, StageStore, StoreError, atomic_write_text, repair_jsonl

N = 3000

WRITER = textwrap.dedent(
    """
    import sys, time
    from toushi.store import StageStore
    store = StageStore(sys.argv[1], "stage")
    done = store.ids()
    with store.writer(batch_size=7) as w:
        for i in range({n}):
            rid = f"r{{i:05d}}"
            if rid in done:
                continue
            w.write({{"id": rid, "payload": "x" * (i % 50)}})
            if sys.argv[2] == "slow":
                time.sleep(0.0005)
    """
).format(n=N)


def test_sigkill_mid_write_then_rerun_has_every_id_once(tmp_path):
    script = tmp_path / "w.py"
    script.write_text(WRITER)
    records = tmp_path / "stage" / "records.jsonl"
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), "slow"])
    deadline = time.time() + 60
    while time.time() < deadline and (not records.exists() or records.stat().st_size < 2000):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = records.read_text().count("\n")
    assert 0 < before < N, "the kill should land mid-run"
    # Rerun to completion: only the missing ids are written.
    subprocess.run([sys.executable, str(script), str(tmp_path), "fast"], check=True)
    ids = [json.loads(line)["id"] for line in records.read_text().splitlines()]
    assert len(ids) == N and len(set(ids)) == N
    assert ids == sorted(ids)


def test_torn_last_line_is_dropped_not_duplicated(tmp_path):
    store = StageStore(tmp_path, "s")
    with store.writer(batch_size=2) as w:
        for i in range(5):
            w.write({"id": f"a{i}", "v": i})
    # Simulate a kill in the middle of writing the next line.
    with open(store.records_path, "a") as f:
        f.write('{"id": "a5", "v"')
    assert store.ids() == {f"a{i}" for i in range(5)}
    with store.writer() as w:
        w.write({"id": "a5", "v": 5})
    lines = store.records_path.read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == [f"a{i}" for i in range(6)]


def test_garbage_last_line_with_newline_is_dropped(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"id": "a"}\n{"id": \n')
    assert repair_jsonl(p) == 1
    assert p.read_text() == '{"id": "a"}\n'


def test_records_filter_and_order(tmp_path):
    store = StageStore(tmp_path, "s")
    with store.writer() as w:
        w.write_many({"id": k, "k": k} for k in "abc")
        w.write({"id": "a", "k": "dup"})  # first occurrence wins
    assert [r["id"] for r in store.records(ids=["c", "a", "zz"])] == ["c", "a"]
    assert store.records(ids=["a"])[0]["k"] == "a"


def test_record_without_id_is_refused(tmp_path):
    with pytest.raises(StoreError, match="without an 'id'"):
        with StageStore(tmp_path, "s").writer() as w:
            w.write({"x": 1})


def test_manifest_is_atomic_and_merges(tmp_path):
    store = StageStore(tmp_path, "s")
    store.write_manifest(status="running", fingerprint="f1")
    m = store.write_manifest(status="complete", counts={"n": 3})
    assert m["fingerprint"] == "f1" and m["status"] == "complete" and "torch" in m["versions"]
    again = store.write_manifest(new_run=True, status="running", fingerprint="f2")  # a new run starts clean
    assert "counts" not in again and again["fingerprint"] == "f2" and again == store.manifest()
    assert [p.name for p in store.dir.iterdir() if p.name.endswith(".tmp")] == []


def test_unwritable_location_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StoreError, match="cannot write"):
        atomic_write_text(tmp_path / "file" / "m.json", "{}")


def test_full_disk_keeps_what_was_written(tmp_path):
    """A write that fails (here: /dev/full, which always answers ENOSPC) is a clear error, and the
    records flushed before it are intact."""
    store = StageStore(tmp_path, "s")
    with store.writer(batch_size=1) as w:
        w.write({"id": "kept"})
    full = Path("/dev/full")
    if not full.exists():
        pytest.skip("/dev/full not available")
    w = RecordWriter(full, batch_size=1)
    with pytest.raises(StoreError, match="cannot append records"):
        w.write({"id": "lost"})
    assert store.ids() == {"kept"}
