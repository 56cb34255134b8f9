"""Helpers shared by the kernel tests (attention, rms_norm)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from apr_kernels import backend


def kernel_module(name: str):
    """``apr_kernels.kernels.<name>``, imported under Triton's interpreter on CPU."""
    if not torch.cuda.is_available():
        backend._require_interpreter()
    return backend.kernels(name)


def spy_launchers(monkeypatch, name: str, launchers) -> list[str]:
    """Record the names of the launchers of kernel module ``name`` that get called: proves the
    Triton path (not the reference) ran."""
    k = kernel_module(name)
    calls = []
    for launcher in launchers:
        fn = getattr(k, launcher)
        monkeypatch.setattr(k, launcher, lambda *a, _fn=fn, _n=launcher, **kw: calls.append(_n) or _fn(*a, **kw))
    return calls


def run_sm90_compile(script: str, cases, tmp_path, timeout: int) -> list[dict]:
    """Run an ahead-of-time sm_90 compile ``script`` (it reads JSON ``cases`` from argv and prints one
    JSON list of results last) in a clean process without the interpreter; skip when this Triton has
    no bundled ptxas."""
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton install has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
