"""Helpers shared by the kernel tests (attention, rms_norm)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from apr_kernels import backend


def assert_grads_near(reference, model, tol: float = 0.1, what: str = "") -> None:
    """Every parameter gradient of ``model`` (the fast path, bf16 on a GPU) within relative error
    ``tol`` (in norm) of ``reference``'s (the eager path), parameters paired in order."""
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        err = (q.grad - p.grad).norm() / p.grad.norm().clamp_min(1e-12)
        assert err < tol, f"{name}: relative gradient error {err:.3g}{what}"


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


# Put before every ahead-of-time compile script by ``run_sm90_compile``. ``compile_sm90`` returns the
# report of the ptxas run that assembled the kernel (-v: registers, spill stores), which Triton prints
# where TRITON_DUMP_PTXAS_LOG is set, rather than running ptxas on the PTX a second time (a fifth of
# these compiles' CPU; the two reports agree: the attention kernels' registers and spills, checked).
_SM90_PRELUDE = r"""
def compile_sm90(src, options):
    # (kernel, ptxas) for triton.compile(src) on sm_90 with options: ptxas's returncode (0: Triton
    # raises on a kernel ptxas rejects) and stderr (its report)
    import contextlib, io, os, subprocess, tempfile, types
    import triton
    from triton.backends.compiler import GPUTarget

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    if "Compiling entry function" in printed.getvalue():
        return k, types.SimpleNamespace(returncode=0, stderr=printed.getvalue())
    # (no report: a kernel from Triton's cache, or a Triton that prints none)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(k.asm["ptx"])
    res = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    return k, res
"""


def run_sm90_compile(script: str, cases, tmp_path, timeout: int) -> list[dict]:
    """Run an ahead-of-time sm_90 compile ``script`` (it reads JSON ``cases``, a list or a dict with a
    ``"cases"`` list, from argv and prints one JSON list of results last, one per case in order; it may
    call ``compile_sm90``) in clean processes without the interpreter; skip when this Triton has no
    bundled ptxas."""
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton install has no bundled ptxas")
    # two processes, each compiling half of the cases (the compiles are single-threaded: 2 cores); one
    # under pytest-xdist, whose other worker keeps the second core busy (each process imports torch
    # and Triton again: 3 to 4 s of CPU on this project's machine)
    items = cases["cases"] if isinstance(cases, dict) else cases
    half = -(-len(items) // 2)
    alone = "PYTEST_XDIST_WORKER" not in os.environ
    parts = [items[:half], items[half:]] if len(items) > 1 and alone else [items]
    procs = []
    for i, part in enumerate(parts):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = str(tmp_path / f"triton{i}")
        env["TRITON_DUMP_PTXAS_LOG"] = "1"  # (compile_sm90's report)
        arg = {**cases, "cases": part} if isinstance(cases, dict) else part
        procs.append(subprocess.Popen([sys.executable, "-c", _SM90_PRELUDE + script, json.dumps(arg)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, stderr[-3000:]
            out += json.loads(stdout.strip().splitlines()[-1])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return out


# An ahead-of-time sm_90a compile of a row kernel whose launch config comes from its module's
# ``launch_config(V)``: argv[1] is JSON {"module", "kernel", "signature" (with "DT" for the logits'
# dtype), "cases": [[V, dtype, WRITE_GRAD(, more constexprs)], ...]}; prints ptxas's verdict per case.
_ROW_KERNEL_AOT = r"""
import importlib, json, sys
import triton
from triton.compiler import ASTSource
spec = json.loads(sys.argv[1])
K = importlib.import_module("apr_kernels.kernels." + spec["module"])
out = []
for v, dt, grad, *more in spec["cases"]:
    block, warps = K.launch_config(v, **spec["config"])
    sig = {name: kind.replace("DT", dt) for name, kind in spec["signature"].items()}
    fn = getattr(K, spec["kernel"])
    extra = dict(spec["constexprs"], **(more[0] if more else {}))
    const = dict(BLOCK_V=block, **extra, **({"WRITE_GRAD": grad} if "WRITE_GRAD" in fn.arg_names else {}))
    k, res = compile_sm90(ASTSource(fn=fn, signature=sig, constexprs=const), {"num_warps": warps})
    out.append(dict(case=[v, dt, grad, extra], rc=res.returncode, err=res.stderr[-400:]))
print(json.dumps(out))
"""

# the vocabularies that matter (Qwen2, Llama 3) in the dtypes that run, with and without the gradient
ROW_KERNEL_CASES = [[151936, "bf16", True], [151936, "bf16", False], [128256, "fp16", True], [1000, "fp32", True]]


def assert_row_kernel_compiles_for_sm90(module: str, kernel: str, signature: dict, tmp_path,
                                        constexprs: dict | None = None, config: dict | None = None,
                                        cases: list | None = None) -> None:
    """``kernel`` of ``kernels/<module>.py`` compiles for sm_90a with ptxas, without spills, for every
    ``ROW_KERNEL_CASES`` entry, or ``cases`` (``signature``: Triton's, "DT" standing for the logits'
    dtype; ``constexprs``: more compile-time arguments than BLOCK_V and, where the kernel has it,
    WRITE_GRAD, a case's optional fourth item more of them for that case (one launch of compiles for
    several variants); ``config``: keywords of the module's ``launch_config``)."""
    cases = cases or ROW_KERNEL_CASES
    spec = {"module": module, "kernel": kernel, "signature": signature, "cases": cases,
            "constexprs": constexprs or {}, "config": config or {}}
    results = run_sm90_compile(_ROW_KERNEL_AOT, spec, tmp_path, timeout=300)
    assert len(results) == len(cases)
    for r in results:
        assert r["rc"] == 0, f"ptxas rejected {r['case']}: {r['err']}"
        assert "spill" not in r["err"] or "0 bytes spill stores" in r["err"], r["err"]
