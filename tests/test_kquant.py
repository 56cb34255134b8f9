"""The k-quant searches in Triton (kernels/kquant.py) against the torch searches of quant.py, which
tests/test_quant_recipe.py checks byte for byte against llama.cpp: bit for bit under the interpreter,
the same blocks through ``quantize`` with either backend, and, compiled for sm_90 without a GPU, PTX
with only correctly rounded divisions and square roots and no fused multiply-add (the float32
operations llama.cpp's C does, one rounding each)."""

from __future__ import annotations

import re

import pytest
import torch

from apr_kernels import quant
from kernel_helpers import kernel_module, run_sm90_compile, spy_launchers


def weights(n_values: int, *, device="cpu") -> torch.Tensor:
    """Weight-like rows (a few large values) led by the rows a quantiser's corner cases meet."""
    x = torch.randn(n_values // 512, 512) * 0.02
    x *= 1 + 4 * (torch.rand_like(x) < 0.01)
    x[0] = 0.0  # all zero
    x[1] = 0.25  # constant
    x[2] = -(x[2].abs() + 0.05)  # all negative
    x[3] *= 1e-18  # below llama.cpp's GROUP_MAX_EPS once squared
    x[4, 7] = 100.0  # one outlier
    x[5] = torch.linspace(-1.0, 1.0, 512)
    x[6, :32] = 0.0  # a zero sub-block and 16-value group
    x[7] = torch.where(torch.arange(512) % 2 == 0, 1e-3, -1e-3)
    return x.to(device)


@pytest.mark.parametrize("cut", [0, 37])
def test_kernels_match_the_torch_searches_bit_for_bit(cut):
    """Whole programs of sub-blocks, and (cut) a last program only partly filled: its masked lanes."""
    k = kernel_module("kquant")
    x = weights(16 * 512)
    q4 = x.reshape(-1, 32)[: x.numel() // 32 - cut]
    scale, mins, levels = k.q4_k_fit(q4)
    want = quant._fit_q4_sub_blocks(q4[:, None])
    for got, ref in zip((scale, mins, levels), want):
        assert torch.equal(got.view(-1), ref.reshape(-1))
    scale, mins, levels = k.q5_k_fit(q4)  # (Q5_K: the same search with 5-bit levels and its own grids)
    want = quant._fit_q4_sub_blocks(q4[:, None], 31.0, quant.Q5_K_STEPS)
    for got, ref in zip((scale, mins, levels), want):
        assert torch.equal(got.view(-1), ref.reshape(-1))
    q6 = x.reshape(-1, 16)[: x.numel() // 16 - cut]
    scale, levels = k.q6_k_fit(q6)
    want = quant._fit_q6_sub_blocks(q6[:, None])
    for got, ref in zip((scale, levels), want):
        assert torch.equal(got.view(-1), ref.reshape(-1))


def _blocks(dtype: str, x: torch.Tensor) -> torch.Tensor:
    from apr_kernels import ggml_quant

    return ggml_quant.q5_k_blocks(x.reshape(-1, 256)) if dtype == "Q5_K" else quant.quantize(dtype, x).data


@pytest.mark.parametrize("dtype", ["Q4_K", "Q6_K", "Q5_K"])
def test_quantize_through_the_kernels_writes_the_same_blocks(dtype, use_backend, monkeypatch):
    x = weights(8 * 512)
    use_backend("reference")
    want = _blocks(dtype, x)
    use_backend("triton")
    calls = spy_launchers(monkeypatch, "kquant", ["q4_k_fit", "q5_k_fit", "q6_k_fit"])
    assert torch.equal(_blocks(dtype, x), want)
    assert calls == [{"Q4_K": "q4_k_fit", "Q6_K": "q6_k_fit", "Q5_K": "q5_k_fit"}[dtype]]


_AOT = r"""
import json, sys
import triton
from triton.compiler import ASTSource
from apr_kernels.kernels import kquant as K
out = []
for name in json.loads(sys.argv[1]):
    if name in ("q4", "q5"):
        fn, sig = K._q4_k_fit_kernel, dict(x_ptr="*fp32", steps_ptr="*fp32", scale_ptr="*fp32", min_ptr="*fp32",
                                            levels_ptr="*fp32", n_sub="i32", NMAX="constexpr", N_STEPS="constexpr",
                                            BLOCK="constexpr")
        const = dict(NMAX=15.0 if name == "q4" else 31.0, N_STEPS=21 if name == "q4" else 16, BLOCK=K.BLOCK)
    else:
        fn, sig = K._q6_k_fit_kernel, dict(x_ptr="*fp32", numerators_ptr="*fp32", scale_ptr="*fp32",
                                            levels_ptr="*fp32", n_sub="i32", EPS="constexpr", BLOCK="constexpr")
        const = dict(EPS=K.GROUP_MAX_EPS, BLOCK=K.BLOCK)
    k, res = compile_sm90(ASTSource(fn=fn, signature=sig, constexprs=const),
                          {"num_warps": 4, "enable_fp_fusion": False})
    ptx = k.asm["ptx"]
    ops = sorted(set(__import__("re").findall(r"\b((?:fma|div|sqrt|rcp|add|sub|mul)\.[a-z0-9.]+)", ptx)))
    out.append(dict(case=name, rc=res.returncode, err=res.stderr[-400:], ops=ops))
print(json.dumps(out))
"""


def test_kernels_compile_for_sm90_with_only_correctly_rounded_float32_operations(tmp_path):
    """The GPU build does llama.cpp's operations: float32 adds, multiplies, divisions and square roots
    each rounded once to nearest (``.rn``), no fused multiply-add, no approximate division."""
    for r in run_sm90_compile(_AOT, ["q4", "q5", "q6"], tmp_path, timeout=600):
        assert r["rc"] == 0, f"ptxas rejected {r['case']}: {r['err']}"
        floats = [op for op in r["ops"] if op.endswith("f32")]
        assert not [op for op in floats if op.startswith(("fma", "rcp")) or ".approx" in op or ".full" in op], r
        assert {"div.rn.f32"} <= set(floats), r
        assert all(re.match(r"(add|sub|mul|div|sqrt)\.rn\.f32$", op) for op in floats), r


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["Q4_K", "Q6_K", "Q5_K"])
def test_cuda_kernels_write_the_hosts_blocks(dtype):
    x = weights(4096 * 512)
    assert torch.equal(_blocks(dtype, x.cuda()).cpu(), _blocks(dtype, x))
