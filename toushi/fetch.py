"""Files toushi takes from package registries at run time (never committed): a package's tarball, downloaded once
by the registry's own client (npm, pip), checked against a pinned sha256 and kept under
``$TOUSHI_HOME/downloads``. The twins' tokenizer and template sources and llama.cpp's GGUF converter both come
out of the same llama-cpp-python sdist: one download serves both.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from toushi.errors import ToushiError
from toushi.paths import cache_lock, toushi_home


class FetchError(ToushiError, RuntimeError):
    """A package could not be fetched, or its bytes are not the pinned ones; the message says which."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(client: str, package: str, dest: Path) -> Path:
    if client == "npm":
        cmd = ["npm", "pack", package, "--silent", "--pack-destination", str(dest)]
    else:  # the sdist: pip prepares its metadata (about a minute, once), then leaves the tarball
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               "-d", str(dest), package]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise FetchError(f"{client} is not installed: it is needed once to fetch {package}") from None
    tarballs = [p for p in dest.iterdir() if p.name.endswith((".tgz", ".tar.gz"))]
    if proc.returncode != 0 or not tarballs:
        raise FetchError(f"{client} could not fetch {package}: {(proc.stderr or proc.stdout).strip()[-400:]}")
    return tarballs[0]


def package_tarball(client: str, package: str, pinned_sha256: str | None = None) -> Path:
    """The package's tarball (``client`` is "npm" or "pip"; ``package`` as that client names it, with its
    version), fetched on first use. With ``pinned_sha256`` the bytes must match it, or nothing is kept."""
    key = re.sub(r"[^A-Za-z0-9.-]+", "_", package).strip("_")
    home = toushi_home() / "downloads" / key
    cached = next(iter(sorted(home.glob("*.t*gz"))), None) if home.is_dir() else None
    if cached is not None:
        return cached
    with cache_lock(f"download-{key}"):  # another process may be fetching it: wait, then look again
        cached = next(iter(sorted(home.glob("*.t*gz"))), None) if home.is_dir() else None
        return cached if cached is not None else _fetch_tarball(client, package, pinned_sha256, home)


def _fetch_tarball(client: str, package: str, pinned_sha256: str | None, home: Path) -> Path:
    home.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home.parent, prefix=".fetch.") as work:
        tarball = _download(client, package, Path(work))
        if pinned_sha256 and (digest := sha256(tarball)) != pinned_sha256:
            raise FetchError(f"{tarball.name}: sha256 {digest} does not match the pinned {pinned_sha256}")
        home.mkdir(exist_ok=True)
        return tarball.replace(home / tarball.name)  # only checked bytes reach the cache
