"""Content digests of input files and directories, for stage and checkpoint fingerprints.

Caches key on content, not names: a data file edited in place, an upstream ``records.jsonl`` that a
rerun rewrote, or a retrained adapter must change the fingerprint of whatever reads it. Hashing a large
dataset on every ``toushi run`` would be slow, so a file's sha256 is remembered against its size and
mtime (in-process and in ``$TOUSHI_HOME/digests.json``); a file whose size or mtime moved is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from toushi.paths import toushi_home

MISSING = "missing"
_lock = threading.Lock()
_memo: dict[str, tuple[int, int, str]] = {}
_loaded = False


def _cache_path() -> Path:
    return toushi_home() / "digests.json"


def _load_disk_cache() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    try:
        data = json.loads(_cache_path().read_text(encoding="utf-8"))
        _memo.update({k: tuple(v) for k, v in data.items() if isinstance(v, list) and len(v) == 3})
    except (OSError, ValueError):
        pass  # no cache yet, or a torn one: everything is simply hashed again


def _save_disk_cache() -> None:
    from toushi.store import atomic_write_text

    try:
        atomic_write_text(_cache_path(), json.dumps({k: list(v) for k, v in _memo.items()}))
    except Exception:  # a read-only home must not stop a run; the cache is only a speed-up
        pass


def file_digest(path: Path) -> str:
    """sha256 (16 hex) of a file's bytes, reusing the cached value while its size and mtime are unchanged."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        return MISSING
    key = str(path.resolve())
    with _lock:
        _load_disk_cache()
        hit = _memo.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()[:16]
    with _lock:
        _memo[key] = (st.st_size, st.st_mtime_ns, digest)
        _save_disk_cache()
    return digest


def path_digest(path: Path, skip: tuple[str, ...] = ()) -> str:
    """Digest of a file, or of a directory's files (relative names + contents, sorted), or MISSING.

    ``skip`` names top-level entries of a directory to leave out (e.g. checkpoints of a stage).
    """
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        return MISSING
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        rel_root = Path(root).relative_to(path)
        if rel_root == Path("."):
            dirs[:] = [d for d in dirs if d not in skip]
            files = [f for f in files if f not in skip]
        dirs.sort()
        for name in sorted(files):
            if name.startswith("."):
                continue  # temp files of atomic writes
            h.update(f"{rel_root / name}\0{file_digest(Path(root) / name)}\0".encode())
    return h.hexdigest()[:16]
