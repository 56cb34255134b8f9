"""apr_kernels.grouped_mm (the mixture-of-experts grouped GEMM): the Triton kernels in the interpreter
against an fp64 oracle (y, dx, every weight's gradient; empty, tiny and multi-tile groups; fp32,
fp16 and fp16 rows with fp32 weights), poisoned outputs, gradcheck and opcheck of the op, autocast,
torch.compile without graph breaks, the error messages, an sm_90 compile, and bf16 on a GPU."""

import pytest
import torch

import apr_kernels
from kernel_helpers import kernel_module, run_sm90_compile, spy_launchers

REL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make(sizes, n_in, n_out, dtype, wdtype=None, device="cpu"):
    offs = torch.tensor(sizes, device=device).cumsum(0)
    x = torch.randn(int(sum(sizes)), n_in, device=device).to(dtype).requires_grad_()
    ws = [(torch.randn(n_out, n_in, device=device) / n_in ** 0.5).to(wdtype or dtype).requires_grad_()
          for _ in sizes]
    return x, ws, offs


def oracle(x, ws, offs, dy):
    """fp64 y, dx and dW of each group, computed group by group from the rounded inputs."""
    bounds = [0] + offs.tolist()
    x64, dy64 = x.detach().double(), dy.double()
    w64 = [w.detach().to(x.dtype).double() for w in ws]  # the product runs in x's dtype
    spans = list(zip(bounds, bounds[1:]))
    y = torch.cat([x64[a:b] @ w.T for (a, b), w in zip(spans, w64)])
    dx = torch.cat([dy64[a:b] @ w for (a, b), w in zip(spans, w64)])
    dws = [dy64[a:b].T @ x64[a:b] for a, b in spans]
    return y, dx, dws


def assert_rel(got, want, tol, what):
    err = (got.double() - want).norm() / want.norm().clamp_min(1e-30)
    assert err < tol or (want.norm() == 0 and got.abs().max() == 0), f"{what}: relative error {err:.3g}"


CASES = [
    ([3, 0, 70, 1, 9], 40, 150),          # an empty group, a group over one row tile, two column tiles
    ([0, 0, 5], 24, 16),                  # leading empty groups
    ([33], 17, 9),                        # one group, odd widths
    ([4, 130, 0, 2, 0, 1, 6, 0, 0], 64, 48),  # nine groups, trailing empties, one over two row tiles
]


@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, None), (torch.float16, None),
                                          (torch.float16, torch.float32)])
@pytest.mark.parametrize("sizes,n_in,n_out", CASES)
def test_triton_kernels_match_fp64(sizes, n_in, n_out, dtype, wdtype, use_backend, monkeypatch):
    use_backend("triton")
    calls = spy_launchers(monkeypatch, "grouped_mm", ["grouped_mm_fwd", "grouped_mm_dw"])
    x, ws, offs = make(sizes, n_in, n_out, dtype, wdtype)
    y = apr_kernels.grouped_mm(x, ws, offs)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert calls == ["grouped_mm_fwd", "grouped_mm_fwd", "grouped_mm_dw"]
    want_y, want_dx, want_dws = oracle(x, ws, offs, dy)
    tol = REL[dtype]
    assert y.dtype == dtype and x.grad.dtype == dtype
    assert_rel(y, want_y, tol, "y")
    assert_rel(x.grad, want_dx, tol, "dx")
    for e, (w, want) in enumerate(zip(ws, want_dws)):
        assert w.grad.dtype == w.dtype
        if sizes[e] == 0:
            assert torch.equal(w.grad, torch.zeros_like(w)), f"dW[{e}] of an empty group must be zeros"
        else:
            assert_rel(w.grad, want, tol, f"dW[{e}]")


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_stacked_weight_matches_fp64(backend, dtype, use_backend, monkeypatch):
    """One stacked [E, out, in] weight (transformers' experts): the same products, its gradient stacked
    (the empty group's zeros included), the kernels addressing each matrix inside it."""
    use_backend(backend)
    if backend == "triton":
        calls = spy_launchers(monkeypatch, "grouped_mm", ["grouped_mm_fwd", "grouped_mm_dw"])
    x, ws, offs = make([3, 0, 70, 1, 9], 40, 150, dtype)
    w = torch.stack([v.detach() for v in ws]).requires_grad_()
    y = apr_kernels.grouped_mm(x, w, offs)
    dy = torch.randn_like(y)
    y.backward(dy)
    want_y, want_dx, want_dws = oracle(x, list(w.detach()), offs, dy)
    assert_rel(y, want_y, REL[dtype], "y")
    assert_rel(x.grad, want_dx, REL[dtype], "dx")
    assert w.grad.shape == w.shape and torch.equal(w.grad[1], torch.zeros_like(w[1]))
    for e in (0, 2, 3, 4):
        assert_rel(w.grad[e], want_dws[e], REL[dtype], f"dW[{e}]")
    if backend == "triton":
        assert calls == ["grouped_mm_fwd", "grouped_mm_fwd", "grouped_mm_dw"]


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_no_rows_gives_empty_outputs_and_zero_weight_gradients(backend, use_backend):
    """Every group empty (a layer that saw no tokens): y is [0, out] and every weight gets zeros."""
    use_backend(backend)
    x, ws, offs = make([0, 0, 0], 16, 8, torch.float32)
    y = apr_kernels.grouped_mm(x, ws, offs)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 16) and all(torch.equal(w.grad, torch.zeros_like(w)) for w in ws)


def test_poisoned_outputs_every_element_written_and_nothing_outside(use_backend):
    """Outputs are NaN-filled views into larger NaN buffers: every element of the view is written (the
    empty group's gradient too: zeros), and the extra rows and columns are left alone."""
    use_backend("triton")
    k = kernel_module("grouped_mm")
    from apr_kernels.ops.grouped_mm import _address_table

    x, ws, offs = make([5, 0, 70, 2], 24, 130, torch.float32)
    x, ws = x.detach(), [w.detach() for w in ws]
    nan = float("nan")
    n = x.shape[0]
    buf = torch.full((n + 3, 140), nan)
    y = k.grouped_mm_fwd(x, _address_table(ws, x.device), ws[0], offs, out=buf[:n, :130])
    dy = torch.randn(n, 130)
    want_y, want_dx, want_dws = oracle(x, ws, offs, dy)
    assert_rel(y, want_y, 1e-5, "y")
    assert buf[n:].isnan().all() and buf[:, 130:].isnan().all(), "forward wrote out of bounds"
    dbuf = torch.full((n + 1, 30), nan)
    dx = k.grouped_mm_fwd(dy, _address_table(ws, x.device), ws[0], offs, trans=False, out=dbuf[:n, :24])
    assert_rel(dx, want_dx, 1e-5, "dx")
    assert dbuf[n:].isnan().all() and dbuf[:, 24:].isnan().all(), "dx wrote out of bounds"
    dw = k.grouped_mm_dw(dy, x, offs, ws[0], dw=torch.full((4, 130, 24), nan))
    assert not dw.isnan().any() and torch.equal(dw[1], torch.zeros(130, 24))
    for e in (0, 2, 3):
        assert_rel(dw[e], want_dws[e], 1e-5, f"dW[{e}]")


def test_reference_gradcheck_opcheck_and_fp64_oracle(use_backend):
    use_backend("reference")
    x, ws, offs = make([3, 0, 6, 2], 8, 5, torch.float64)
    assert torch.autograd.gradcheck(lambda x, *w: apr_kernels.grouped_mm(x, w, offs), (x, *ws))
    assert torch.autograd.gradcheck(lambda x, *w: torch.ops.apr.grouped_mm(x, list(w), offs), (x, *ws))
    torch.library.opcheck(torch.ops.apr.grouped_mm.default, (x, ws, offs))
    dy = torch.randn(11, 5, dtype=torch.float64)
    plain = [x.detach()] + [w.detach() for w in ws]  # the backward op is not differentiated
    torch.library.opcheck(torch.ops.apr.grouped_mm_backward.default, (dy, plain[0], plain[1:], offs, True, True))
    y = apr_kernels.grouped_mm(x, ws, offs)
    assert_rel(y, oracle(x, ws, offs, dy)[0], 1e-12, "y")
    w = torch.stack([v.detach() for v in ws]).requires_grad_()  # the stacked op
    assert torch.autograd.gradcheck(lambda x, w: apr_kernels.grouped_mm(x, w, offs), (x, w))
    torch.library.opcheck(torch.ops.apr.grouped_mm_stacked.default, (x, w, offs))
    torch.library.opcheck(torch.ops.apr.grouped_mm_stacked_backward.default,
                          (dy, plain[0], w.detach(), offs, True, True))


def test_frozen_weights_get_no_gradient_and_frozen_rows_none(use_backend):
    use_backend("reference")
    x, ws, offs = make([2, 3], 8, 4, torch.float32)
    for w in ws:
        w.requires_grad_(False)
    apr_kernels.grouped_mm(x, ws, offs).sum().backward()
    assert x.grad is not None and all(w.grad is None for w in ws)
    x2, ws2, _ = make([2, 3], 8, 4, torch.float32)
    apr_kernels.grouped_mm(x2.detach(), ws2, offs).sum().backward()
    assert all(w.grad is not None for w in ws2)


def test_autocast_computes_in_the_autocast_dtype_as_linear_does(use_backend):
    """Under CPU bf16 autocast, fp32 rows and weights multiply in bf16 (y bf16) as ``F.linear`` there;
    the weights' gradients stay fp32."""
    use_backend("reference")
    x, ws, offs = make([4, 6], 32, 16, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = apr_kernels.grouped_mm(x, ws, offs)
        want = torch.cat([torch.nn.functional.linear(x[:4], ws[0]), torch.nn.functional.linear(x[4:], ws[1])])
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, want, rtol=1e-2, atol=1e-2)
    y.float().sum().backward()
    assert ws[0].grad.dtype == torch.float32 and x.grad.dtype == torch.float32


def test_compiles_without_graph_breaks(use_backend):
    use_backend("reference")
    x, ws, offs = make([3, 0, 5], 16, 8, torch.float32)
    f = torch.compile(lambda x, ws, offs: apr_kernels.grouped_mm(x, ws, offs).square().sum(), fullgraph=True)
    f(x, ws, offs).backward()
    got = [x.grad.clone()] + [w.grad.clone() for w in ws]
    x.grad = None
    for w in ws:
        w.grad = None
    apr_kernels.grouped_mm(x, ws, offs).square().sum().backward()
    for g, p in zip(got, [x, *ws]):
        torch.testing.assert_close(g, p.grad)


def test_errors_name_the_argument_and_the_expectation():
    x, ws, offs = make([2, 3], 8, 4, torch.float32)
    cases = [
        ((x[0], ws, offs), "x must be a 2-D floating-point tensor"),
        ((x, [], offs), "weights is empty"),
        ((x, [ws[0], ws[1][:, :7]], offs), "weights[1] is (4, 7)"),
        ((x, [ws[0], ws[1].double()], offs), "weights[1] is (4, 8) torch.float64"),
        ((x[:, :6], ws, offs), "x has 6 columns but the weights are (4, 8)"),
        ((x, ws, offs.float()), "offs must be a 1-D int32/int64 tensor of the 2 groups' cumulative row ends"),
        ((x, torch.zeros(2, 4), offs), "a stacked weight must be a floating-point [groups, out, in] tensor"),
        ((x, torch.zeros(3, 4, 8), offs), "offs must be a 1-D int32/int64 tensor of the 3 groups"),
        ((x, ws, offs[:1]), "offs must be a 1-D int32/int64 tensor of the 2 groups"),
        ((x, ws, torch.tensor([3, 2])), "must be non-decreasing cumulative row ends from 0 ending at x's 5 rows"),
        ((x, ws, torch.tensor([2, 4])), "ending at x's 5 rows"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError) as err:
            apr_kernels.grouped_mm(*args)
        assert message in str(err.value) and "apr_kernels.grouped_mm" in str(err.value)


_AOT = r"""
import json, sys
import triton
from triton.compiler import ASTSource
from apr_kernels.kernels import grouped_mm as K
import torch
names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
out = []
for dt, wdt in json.loads(sys.argv[1]):
    cfg = K.launch_config(names[dt])
    opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    prec = K._precision(names[dt])
    fwd = dict(X="*" + dt, TABLE="*i64", W0="*" + wdt, OFFS="*i64", Y="*" + dt, E="i32", R="i32", C="i32",
               W_IN="i32", stride_xm="i32", stride_ym="i32", TRANS="constexpr", EVEN_K="constexpr", BLOCK_M="constexpr",
               BLOCK_N="constexpr", BLOCK_K="constexpr", BLOCK_E="constexpr", PRECISION="constexpr")
    dw = dict(DY="*" + dt, X="*" + dt, OFFS="*i64", DW="*" + wdt, OUT="i32", IN="i32", stride_dym="i32",
              stride_xm="i32", BLOCK_M="constexpr", BLOCK_N="constexpr", BLOCK_K="constexpr", PRECISION="constexpr")
    for fn, sig, const in ((K._grouped_mm_kernel, fwd, dict(cfg, TRANS=True, EVEN_K=True, BLOCK_E=128, PRECISION=prec)),
                           (K._grouped_mm_kernel, fwd, dict(cfg, TRANS=False, EVEN_K=False, BLOCK_E=128, PRECISION=prec)),
                           (K._grouped_mm_dw_kernel, dw, dict(cfg, BLOCK_N=64, PRECISION=prec))):
        # what the JIT knows at a real launch (aligned pointers, row lengths and strides divisible by
        # 16, as every model's hidden and expert sizes are): without it loads are not vectorised and
        # ptxas reports misleading registers
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if sig[n].startswith("*") or n in ("W_IN", "IN", "stride_xm", "stride_ym", "stride_dym")}
        k, res = compile_sm90(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs), opts)
        out.append(dict(case=[fn.__name__, const.get("TRANS"), dt, wdt], rc=res.returncode, err=res.stderr[-400:]))
print(json.dumps(out))
"""


def test_kernels_compile_for_sm90_without_spills(tmp_path):
    """What the interpreter accepts and a GPU compiler may not (the address table cast to a pointer,
    the in-kernel tile search): both kernels compiled ahead of time for sm_90a and assembled by ptxas,
    bf16/fp16/fp32 rows, bf16 rows with fp32 master weights."""
    cases = [["bf16", "bf16"], ["bf16", "fp32"], ["fp16", "fp16"], ["fp32", "fp32"]]
    results = run_sm90_compile(_AOT, cases, tmp_path, timeout=600)
    assert len(results) == 3 * len(cases)
    for r in results:
        assert r["rc"] == 0, f"ptxas rejected {r['case']}: {r['err']}"
        assert "spill" not in r["err"] or "0 bytes spill stores" in r["err"], r


@pytest.mark.cuda
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
def test_cuda_bf16_matches_fp64_at_qwen3_moe_shapes(wdtype):
    """Qwen3-30B-A3B's expert shapes (128 experts, hidden 2048, moe intermediate 768), 2048 tokens x 8
    choices routed unevenly (some experts idle), bf16 rows; fp32 master weights too."""
    torch.manual_seed(0)
    counts = torch.bincount(torch.randint(0, 100, (2048 * 8,)) ** 2 // 80, minlength=128)[:128]
    counts[-1] += 2048 * 8 - counts.sum()
    x, ws, offs = make(counts.tolist(), 2048, 768, torch.bfloat16, wdtype, device="cuda")
    y = apr_kernels.grouped_mm(x, ws, offs)
    dy = torch.randn_like(y)
    y.backward(dy)
    want_y, want_dx, want_dws = oracle(x, ws, offs, dy)
    assert_rel(y, want_y, REL[torch.bfloat16], "y")
    assert_rel(x.grad, want_dx, REL[torch.bfloat16], "dx")
    for e in range(0, 128, 7):
        if counts[e]:
            assert_rel(ws[e].grad, want_dws[e], REL[torch.bfloat16], f"dW[{e}]")
        else:
            assert torch.equal(ws[e].grad, torch.zeros_like(ws[e]))
