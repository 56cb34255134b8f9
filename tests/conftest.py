"""Shared test setup: seeded RNG per test, a `cuda` marker that skips without a GPU, the suite on two
pytest-xdist workers on a CPU machine (``pytest_cmdline_main``)."""

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
    # `train --compile` (and rank processes, which inherit it) traces, decomposes and partitions as
    # inductor does, without inductor's C++ build (13 s of CPU a process on this machine)
    os.environ.setdefault("APR_KERNELS_COMPILE_BACKEND", "aot_eager_decomp_partition")


# The test modules that launch several rank processes (each launch keeps both cores busy). On two
# pytest-xdist workers they form one group, run by one worker in turn while the other takes the rest.
RANK_MODULES = {"test_context_parallel", "test_distributed", "test_expert_parallel", "test_float8", "test_hsdp",
                "test_pipeline_parallel", "test_qat", "test_sharded_base", "test_tensor_parallel"}
# test_bench_smoke's benches run once per test process (a session fixture starts them all): its tests
# form a group of their own, so that one worker runs them.
GROUPS = {**dict.fromkeys(RANK_MODULES, "ranks"), "test_bench_smoke": "bench"}
WORKERS = 2


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """The whole suite (``python -m pytest``: its testpaths, no -n given) on a CPU machine runs on
    ``WORKERS`` pytest-xdist workers, the rank-launching modules as one group (``--dist loadgroup``),
    and every process with one OpenMP thread: on 2 cores this took 735 s against ~930 s serially,
    while two workers with torch's default two threads each took 1109 s (their threads competing
    with the rank processes). Named tests, ``-n``, ``--pdb`` or a GPU: as asked (serial)."""
    suite = getattr(config, "args_source", None) == pytest.Config.ArgsSource.TESTPATHS
    worker = "PYTEST_XDIST_WORKER" in os.environ  # (a worker parses the same command line: no workers of its own)
    xdist = config.pluginmanager.hasplugin("xdist")
    if (suite and xdist and not worker and not HAS_CUDA and config.option.numprocesses is None
            and (os.cpu_count() or 1) >= WORKERS and not config.option.collectonly and not config.option.usepdb):
        config.option.numprocesses, config.option.dist = WORKERS, "loadgroup"
        os.environ["OMP_NUM_THREADS"] = "1"  # (the workers, started after this, load torch with it)
    if (worker or getattr(config.option, "numprocesses", None)) and hasattr(config.option, "benchmark_disable"):
        # (no test here times with pytest-benchmark; bench/pytest_load.py runs in its own pytest)
        config.option.benchmark_disable = True  # (instead of its warning that xdist switched it off)


@pytest.hookimpl(optionalhook=True)  # (pytest-xdist's hook: no error where it is not installed)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadgroup``'s scheduler with the group taken from the test's module (``GROUPS``)
    rather than an ``xdist_group`` mark: pytest-xdist 3.8 marks a test's group by renaming
    ``item._nodeid``, which pytest 9.2 no longer reads (its tests were spread over both workers,
    launches on both at once: 1330 s)."""
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0].rpartition("/")[2].removesuffix(".py")
            return GROUPS.get(module, nodeid)

    return ByGroup(config, log)


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
