"""Shared test setup: seeded RNG per test, a `cuda` marker that skips without a GPU."""

import atexit
import os
import random
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

import pytest
import torch

# `python -m pytest` puts the working directory first on sys.path; from the repository root its
# kernels/ folder (the Triton sources, installed as apr_kernels.kernels) would shadow the PyPI package
# `kernels` that transformers >= 5.25 imports. The tests use the installed package, not the tree.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _ROOT]

HAS_CUDA = torch.cuda.is_available()
# The trainer's token cache goes to a folder of this test session, never to ~/.cache (subprocesses
# inherit the variable), removed when the session ends.
if "APR_KERNELS_CACHE" not in os.environ:
    os.environ["APR_KERNELS_CACHE"] = tempfile.mkdtemp(prefix="apr_kernels_test_cache_")
    atexit.register(shutil.rmtree, os.environ["APR_KERNELS_CACHE"], ignore_errors=True)
if not HAS_CUDA:
    # Triton reads TRITON_INTERPRET when `triton` is first imported (its own tl.sum etc. are jitted
    # then), and some test imports (transformers) pull Triton in: set it before any of them.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run bench/gpu_check.sh on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    # A different but reproducible seed per test: fresh random inputs, same on every run.
    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    torch.manual_seed(seed)
    yield


@pytest.fixture
def use_backend(monkeypatch):
    """use_backend("triton" | "reference" | "auto"): set APR_KERNELS_BACKEND for this test."""

    def set_backend(name):
        monkeypatch.setenv("APR_KERNELS_BACKEND", name)

    return set_backend


@pytest.fixture
def tmp_apr(tmp_path):
    """A path for an APR file inside the test's temp folder."""
    return tmp_path / "model.apr"
