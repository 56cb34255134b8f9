"""pytest-benchmark view of the CPU-side loader costs (issue 8), next to bench_load.py's sweep.

    python3 -m pytest bench/pytest_load.py --benchmark-json bench/results/<folder>/load-pytest-benchmark.json
    python3 -m pytest bench/pytest_load.py --benchmark-disable    # run each once (what CI does)

The same tensors (Qwen2-0.5B names and shapes, bf16; APR_BENCH_SCALE=full for the ~1 GB model, default
a 1/8-width variant so the file stays ~20 MB) are saved once as APR and as safetensors; each benchmark
opens the file and builds every tensor (warm page cache). bench/report.py reads the JSON this writes.
Not collected by the test suite (testpaths = tests/): timings are never assertions.
"""

from __future__ import annotations

import os
import sys
import zlib
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import make_tensors, qwen2_shapes, st_safe_open  # noqa: E402

import apr_kernels  # noqa: E402
from apr_kernels import _apr_ext  # noqa: E402

safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    if os.environ.get("APR_BENCH_SCALE") == "full":
        shapes = qwen2_shapes()
    else:  # same 290 names, narrower: the per-tensor cost dominates, as in a warm load
        shapes = qwen2_shapes(vocab=151936 // 8, hidden=112, inter=608, heads=14, kv=2)
    tensors = make_tensors(shapes)
    folder = tmp_path_factory.mktemp("pytest_load")
    apr, st = folder / "model.apr", folder / "model.safetensors"
    apr_kernels.save(tensors, apr)
    safetensors_torch.save_file(tensors, str(st))
    return apr, st, len(tensors)


LOADERS = {
    "apr": lambda apr, st: apr_kernels.load(apr),
    "safetensors_load_file": lambda apr, st: safetensors_torch.load_file(str(st)),
    "safetensors_safe_open": lambda apr, st: st_safe_open(st),
}


@pytest.mark.parametrize("provider", list(LOADERS))
def test_load_warm(benchmark, files, provider):
    """Open the file and build every tensor (report.py: op load_warm, ours = apr)."""
    apr, st, n = files
    benchmark.group = "load_warm"
    benchmark.extra_info["provider"] = provider
    out = benchmark(LOADERS[provider], apr, st)
    assert len(out) == n


@pytest.mark.parametrize("provider", ["apr_verify", "apr_crc32", "zlib"])
def test_crc32(benchmark, files, provider):
    """Footer CRC of the whole file: apr's verify (pread + CRC), apr's CRC kernel, zlib.crc32."""
    apr = files[0]
    benchmark.group = "crc32"
    benchmark.extra_info["provider"] = provider
    if provider == "apr_verify":
        with apr_kernels.open(apr) as f:
            benchmark(f.verify)
        return
    data = apr.read_bytes()
    fn = _apr_ext.crc32 if provider == "apr_crc32" else zlib.crc32
    assert benchmark(fn, data) == zlib.crc32(data)
