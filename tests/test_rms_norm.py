"""RMSNorm ops: Triton kernels (CPU interpreter, and CUDA when present) and the reference path,
against an fp64 oracle written here, the Hugging Face LlamaRMSNorm module itself, gradcheck and
opcheck."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import apr_kernels
from apr_kernels import backend
from kernel_helpers import kernel_module, spy_launchers
from apr_kernels.nn import RMSNorm
from apr_kernels.ops import rms_norm as ops

# relative error bound: max|got - want| <= REL * max|want| (fp16: ~4 ulp at the largest value)
REL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
BACKENDS = ["triton", "reference"]
SHAPES = [(6, 896), (5, 1000), (2, 9, 123), (3, 64)]  # odd hidden sizes, 3-D, a multi-row tile


def _kernels():
    return kernel_module("rms_norm")


@pytest.fixture
def kernel_calls(monkeypatch):
    return spy_launchers(monkeypatch, "rms_norm", ('rms_norm_fwd', 'add_rms_norm_fwd', 'rms_norm_bwd'))


def oracle(x, w, eps, residual=None):
    """fp64 maths of the contract: s = dt(x + r) (fused add), y = w * s / sqrt(mean(s^2) + eps)."""
    s = x if residual is None else (x + residual)
    s64 = s.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y = w64 * s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + eps)
    return y, s64, w64


def assert_rel(got, want, rel, what):
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= rel * scale + 1e-12, f"{what}: max error {err:.3g} > {rel} * {scale:.3g}"


def _inputs(shape, dtype, wdtype=None, device="cpu"):
    x = torch.randn(shape, dtype=dtype, device=device) * 3 + 0.5  # not unit-RMS rows
    w = (torch.randn(shape[-1], device=device) * 0.5 + 1).to(wdtype or dtype)
    return x, w


# ------------------------------------------------------------------------- fwd + bwd, fp64 oracle


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_fwd_bwd_vs_fp64(be, dtype, shape, use_backend, kernel_calls):
    use_backend(be)
    x, w = _inputs(shape, dtype)
    x.requires_grad_()
    w.requires_grad_()
    y = apr_kernels.rms_norm(x, w, 1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)

    y64, x64, w64 = oracle(x, w, 1e-5)
    y64.backward(dy.double())
    assert y.dtype == dtype and y.shape == x.shape
    assert_rel(y, y64, REL[dtype], "y")
    assert_rel(x.grad, x64.grad, REL[dtype], "dx")
    assert_rel(w.grad, w64.grad, REL[dtype], "dweight")
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    assert kernel_calls == (["rms_norm_fwd", "rms_norm_bwd"] if be == "triton" else [])


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_rms_norm_fwd_bwd_vs_fp64(be, dtype, use_backend, kernel_calls):
    use_backend(be)
    shape = (3, 7, 1000)
    x, w = _inputs(shape, dtype)
    r = torch.randn(shape, dtype=dtype) * 2
    for t in (x, r, w):
        t.requires_grad_()
    y, s = apr_kernels.add_rms_norm(x, r, w, 1e-6)
    dy, ds = torch.randn_like(y), torch.randn_like(s)
    ((y * dy).sum() + (s * ds).sum()).backward()

    torch.testing.assert_close(s, x + r, rtol=0, atol=0)  # the sum, rounded to x's dtype
    y64, s64, w64 = oracle(x, w, 1e-6, residual=r)
    ((y64 * dy.double()).sum() + (s64 * ds.double()).sum()).backward()
    assert_rel(y, y64, REL[dtype], "y")
    assert_rel(x.grad, s64.grad, REL[dtype], "dx")
    assert_rel(r.grad, s64.grad, REL[dtype], "dresidual")
    assert_rel(w.grad, w64.grad, REL[dtype], "dweight")
    assert kernel_calls == (["add_rms_norm_fwd", "rms_norm_bwd"] if be == "triton" else [])


@pytest.mark.parametrize("be", BACKENDS)
def test_add_rms_norm_only_normed_output_used(be, use_backend):
    use_backend(be)
    x, w = _inputs((4, 96), torch.float32)
    r = torch.randn(4, 96).requires_grad_()
    x.requires_grad_()
    y, _s = apr_kernels.add_rms_norm(x, r, w, 1e-6)
    dy = torch.randn_like(y)
    y.backward(dy)
    y64, s64, _ = oracle(x, w, 1e-6, residual=r)
    y64.backward(dy.double())
    assert_rel(x.grad, s64.grad, REL[torch.float32], "dx")
    assert_rel(r.grad, s64.grad, REL[torch.float32], "dresidual")


# ---------------------------------------------------------------------- HF module, casting rule


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize(
    "xdtype,wdtype",
    [(torch.float16, torch.float16), (torch.float16, torch.float32), (torch.float32, torch.float16)],
)
def test_matches_hf_llama_rmsnorm(be, xdtype, wdtype, use_backend):
    """Same output dtype (promote(x, w)), values and gradients as transformers' LlamaRMSNorm."""
    use_backend(be)
    x, w = _inputs((5, 200), xdtype, wdtype)
    hf = LlamaRMSNorm(200, eps=1e-6).to(wdtype)
    ours = RMSNorm(200, eps=1e-6, dtype=wdtype)
    ours.load_state_dict(hf.state_dict())  # HF parameter name `weight`
    with torch.no_grad():
        hf.weight.copy_(w)
        ours.weight.copy_(w)
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = hf(x_hf), ours(x_ours)
    assert got.dtype == want.dtype == torch.promote_types(xdtype, wdtype)
    # the same roundings in the same order: at most one ulp apart (rsqrt and sum order differ)
    ulp = torch.finfo(want.dtype).eps
    torch.testing.assert_close(got, want, rtol=2 * ulp, atol=2 * ulp)
    dy = torch.randn_like(want)
    want.backward(dy)
    got.backward(dy)
    # HF rounds dy * w to x's dtype once more in its backward; ours stays in fp32 until the end
    assert_rel(x_ours.grad, x_hf.grad, 2 * torch.finfo(xdtype).eps, "dx vs HF")
    assert_rel(ours.weight.grad, hf.weight.grad, 2 * torch.finfo(wdtype).eps, "dweight vs HF")


@pytest.mark.parametrize("be", BACKENDS)
def test_cast_before_weight_multiply(be, use_backend):
    """x_hat is rounded to fp16 before the fp32 weight multiply (not rounded after it)."""
    use_backend(be)
    x = torch.randn(3, 64, dtype=torch.float16)
    w = torch.randn(64)
    h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    y = apr_kernels.rms_norm(x, w)
    torch.testing.assert_close(y, w * h.half().float(), rtol=0, atol=0)
    assert not torch.equal(y, w * h)


# --------------------------------------------------------------------- layouts and poisoned outputs


@pytest.mark.parametrize("be", BACKENDS)
def test_strided_rows_without_copy(be, use_backend):
    """Rows with a leading-dim stride (a slice of a wider buffer, 3-D) and a dy whose leading dims
    cannot be flattened give bit-identical results to the contiguous case."""
    use_backend(be)
    x = torch.randn(2, 7, 160)[..., 3:131]  # rows of 128, row stride 160
    w = torch.randn(128)
    dy = torch.randn(7, 2, 128).transpose(0, 1)
    grads = []
    for xi in (x, x.contiguous()):
        xi, wi = xi.detach().requires_grad_(), w.clone().requires_grad_()
        y = apr_kernels.rms_norm(xi, wi)
        y.backward(dy)
        grads.append((y, xi.grad, wi.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    if be == "triton":
        rows = _kernels()._rows(x, "x")
        assert rows.data_ptr() == x.data_ptr() and rows.stride() == (160, 1)  # a view, no copy


def test_launchers_write_every_output_and_nothing_else():
    """Outputs are NaN-poisoned row-strided views of wider buffers: the kernels must fill every
    element of the view and leave the padding columns alone."""
    k = _kernels()
    m, n, pad = 13, 100, 28
    x, w = _inputs((m, n), torch.float32)
    r = torch.randn(m, n)
    bufs = {name: torch.full((m, n + pad), float("nan")) for name in ("y", "s", "dx")}
    rstd = torch.full((m,), float("nan"))
    y, s, rstd = k.add_rms_norm_fwd(x, r, w, 1e-6, out=bufs["y"][:, :n], residual_out=bufs["s"][:, :n], rstd=rstd)
    dy = torch.randn(m, n)
    dx, dw = k.rms_norm_bwd(dy, s, w, rstd, dx=bufs["dx"][:, :n])
    y64, s64, w64 = oracle(x, w, 1e-6, residual=r)
    y64.backward(dy.double())
    assert_rel(bufs["y"][:, :n], y64, REL[torch.float32], "y (out=)")
    assert_rel(bufs["s"][:, :n], s64, 0, "s (residual_out=)")
    assert_rel(bufs["dx"][:, :n], s64.grad, REL[torch.float32], "dx (dx=)")
    assert_rel(rstd, torch.rsqrt(s64.pow(2).mean(-1) + 1e-6), 1e-6, "rstd")
    assert_rel(dw, w64.grad, REL[torch.float32], "dw")
    for name, b in bufs.items():
        assert b[:, n:].isnan().all(), f"{name}: kernel wrote outside its rows"
    with pytest.raises(ValueError, match="out must be"):
        k.rms_norm_fwd(x, w, out=torch.empty(m, n + 1))


def test_dweight_deterministic_and_fp32_accumulated(use_backend):
    use_backend("triton")
    x, w = _inputs((700, 48), torch.float16)  # many rows: fp16 accumulation would drift visibly
    x.requires_grad_()
    w.requires_grad_()
    grads = []
    for _ in range(2):
        apr_kernels.rms_norm(x, w).backward(torch.ones(700, 48, dtype=torch.float16))
        grads.append(w.grad.clone())
        w.grad = None
    assert torch.equal(grads[0], grads[1])
    y64, _, w64 = oracle(x, w, 1e-6)
    y64.sum().backward()
    assert_rel(grads[0], w64.grad, 2e-3, "dweight over 700 fp16 rows")


@pytest.mark.parametrize("block_m,programs_per_sm", [(1, 64), (4, 1), (16, 8)])
def test_dweight_any_program_split(block_m, programs_per_sm):
    """dw is right however rows are split into per-program partials (1 to 150 partial rows, so the
    reduction kernel runs several steps and masks a ragged last one)."""
    k = _kernels()
    m, n = 150, 40
    x, w = _inputs((m, n), torch.float32)
    dy = torch.randn(m, n)
    cfg = k.RowConfig(block_m=block_m, block_n=64, num_warps=2, programs_per_sm=programs_per_sm)
    rstd = k.rms_norm_fwd(x, w, config=cfg)[1]
    dx, dw = k.rms_norm_bwd(dy, x, w, rstd, config=cfg)
    y64, x64, w64 = oracle(x, w, 1e-6)
    y64.backward(dy.double())
    assert_rel(dx, x64.grad, REL[torch.float32], "dx")
    assert_rel(dw, w64.grad, REL[torch.float32], "dw")


@pytest.mark.parametrize("be", BACKENDS)
def test_zero_rows(be, use_backend):
    use_backend(be)
    x = torch.empty(0, 3, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    y = apr_kernels.rms_norm(x, w)
    assert y.shape == (0, 3, 16)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros(16))


def test_fp64_falls_back_to_reference(use_backend, kernel_calls):
    use_backend("triton")
    x, w = _inputs((3, 20), torch.float64)
    torch.testing.assert_close(apr_kernels.rms_norm(x, w), oracle(x, w, 1e-6)[0].detach())
    assert kernel_calls == []


# ------------------------------------------------------------------ autograd, opcheck, compile


def test_gradcheck_reference_fp64(use_backend):
    use_backend("reference")
    x = torch.randn(3, 2, 11, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 2, 11, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: apr_kernels.rms_norm(a, b, 1e-5), (x, w))
    assert torch.autograd.gradcheck(lambda a, b, c: apr_kernels.add_rms_norm(a, b, c, 1e-5), (x, r, w))


@pytest.mark.parametrize("be", BACKENDS)
def test_opcheck(be, use_backend):
    use_backend(be)
    x, w = _inputs((4, 40), torch.float32)
    r = torch.randn(4, 40)
    rstd = torch.rand(4) + 0.5
    dy = torch.randn(4, 40)
    samples = [
        (torch.ops.apr.rms_norm.default, (x.requires_grad_(), w.requires_grad_(), 1e-6)),
        (torch.ops.apr.add_rms_norm.default, (x, r.requires_grad_(), w, 1e-6)),
        (torch.ops.apr.rms_norm_backward.default, (dy, x.detach(), w.detach(), rstd, None)),
        (torch.ops.apr.rms_norm_backward.default, (dy, x.detach(), w.detach(), rstd, dy.clone())),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("be", BACKENDS)
def test_custom_op_autograd_matches_eager_path(be, use_backend):
    """The apr:: ops' registered autograd (used under torch.compile) gives bit-identical outputs and
    gradients to the eager autograd Functions."""
    use_backend(be)
    x, w = _inputs((5, 2, 72), torch.float16)
    r = torch.randn(5, 2, 72, dtype=torch.float16)
    dy, ds = torch.randn(5, 2, 72, dtype=torch.float16), torch.randn(5, 2, 72, dtype=torch.float16)
    results = []
    for via_op in (False, True):
        xi, ri, wi = (t.clone().requires_grad_() for t in (x, r, w))
        if via_op:
            y1 = torch.ops.apr.rms_norm(xi, wi, 1e-6)[0]
            y2, s, _ = torch.ops.apr.add_rms_norm(xi, ri, wi, 1e-6)
        else:
            y1 = apr_kernels.rms_norm(xi, wi, 1e-6)
            y2, s = apr_kernels.add_rms_norm(xi, ri, wi, 1e-6)
        ((y1 * dy).sum() + (y2 * dy).sum() + (s * ds).sum()).backward()
        results.append((y1, y2, s, xi.grad, ri.grad, wi.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_torch_compile_fullgraph(use_backend):
    use_backend("reference")
    mod = RMSNorm(24)

    def step(x, r):
        y, s = mod(x, r)
        return mod(y * 2 + s)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x, r = torch.randn(2, 5, 24, requires_grad=True), torch.randn(2, 5, 24)
    out = compiled(x, r)
    out.sum().backward()
    got_grad, x.grad = x.grad, None
    want = step(x, r)
    want.sum().backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(got_grad, x.grad)


# ------------------------------------------------------------------------ errors and the module


@pytest.mark.parametrize(
    "call,exc,pattern",
    [
        (lambda x, w: apr_kernels.rms_norm(x, torch.ones(17)), ValueError, r"weight must have shape \(16,\).*got \(17,\)"),
        (lambda x, w: apr_kernels.rms_norm(x, torch.ones(2, 16)), ValueError, r"weight.*\(16,\).*got \(2, 16\)"),
        (lambda x, w: apr_kernels.rms_norm(x.numpy(), w), TypeError, "x must be a torch.Tensor, got ndarray"),
        (lambda x, w: apr_kernels.rms_norm(x.int(), w), TypeError, "x must be .*float.*got torch.int32"),
        (lambda x, w: apr_kernels.rms_norm(x, w, eps=-1.0), ValueError, "eps must be finite and >= 0, got -1.0"),
        (lambda x, w: apr_kernels.rms_norm(x, w, eps="1e-6"), TypeError, "eps must be a real number, got str"),
        (lambda x, w: apr_kernels.add_rms_norm(x, x[:2], w), ValueError, r"residual must have x's shape \(3, 16\), got \(2, 16\)"),
        (lambda x, w: apr_kernels.add_rms_norm(x, x.half(), w), TypeError, "residual must have x's dtype torch.float32, got torch.float16"),
    ],
)
def test_argument_errors(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(torch.randn(3, 16), torch.ones(16))


def test_module_api():
    m = RMSNorm(896, eps=1e-5, dtype=torch.float16)
    assert apr_kernels.RMSNorm is RMSNorm
    assert [n for n, _ in m.named_parameters()] == ["weight"]
    assert m.weight.dtype == torch.float16 and torch.equal(m.weight, torch.ones(896, dtype=torch.float16))
    assert "896" in repr(m) and "eps=1e-05" in repr(m) and m.variance_epsilon == 1e-5
    x, r = torch.randn(2, 896, dtype=torch.float16), torch.randn(2, 896, dtype=torch.float16)
    y, s = m(x, r)
    torch.testing.assert_close(s, x + r, rtol=0, atol=0)
    torch.testing.assert_close(y, m(x + r), rtol=0, atol=0)


# ------------------------------------------------------------------------------------ GPU only


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(65536, 4096), (65536, 8192), (4097, 896), (1023, 1000), (8, 5120)], ids=str)
def test_cuda_bf16_large(shape):
    """bf16 on the GPU (the interpreter cannot do bf16 maths) against the fp32 reference."""
    assert backend.use_triton(torch.empty(1, device="cuda"))
    x, w = _inputs(shape, torch.bfloat16, device="cuda")
    r = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    x.requires_grad_()
    w.requires_grad_()
    r.requires_grad_()
    y, s = apr_kernels.add_rms_norm(x, r, w)
    dy, ds = torch.randn_like(y), torch.randn_like(s)
    ((y.float() * dy.float()).sum() + (s.float() * ds.float()).sum()).backward()
    from apr_kernels.ops import reference as ref

    s_ref = x.detach() + r.detach()
    y_ref, rstd = ref.rms_norm_forward_reference(s_ref, w.detach(), 1e-6)
    dx_ref, dw_ref = ref.rms_norm_backward_reference(dy.float(), s_ref.float(), w.detach().float(), rstd, ds.float())
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(y, y_ref, rtol=1.6e-2, atol=1e-2)  # at most ~1 bf16 ulp apart
    torch.testing.assert_close(x.grad, dx_ref.bfloat16(), rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(r.grad, x.grad, rtol=0, atol=0)
    rel = ((w.grad.float() - dw_ref).norm() / dw_ref.norm()).item()
    assert rel < 5e-3, f"dweight relative RMS error {rel:.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_strided_deterministic_compiled(dtype):
    big = torch.randn(3000, 1100, device="cuda", dtype=dtype)
    x, w = big[:, 50:1050], torch.randn(1000, device="cuda", dtype=dtype)
    grads = []
    for fn in (ops.rms_norm, torch.compile(ops.rms_norm, fullgraph=True), ops.rms_norm):
        xi, wi = x.detach().requires_grad_(), w.detach().requires_grad_()
        y = fn(xi, wi)
        y.backward(torch.ones_like(y))
        grads.append((y, xi.grad, wi.grad))
    for y, dx, dw in grads[1:]:
        assert torch.equal(y, grads[0][0]) and torch.equal(dx, grads[0][1]) and torch.equal(dw, grads[0][2])
    y64, x64, w64 = oracle(x, w, 1e-6)
    y64.sum().backward()
    assert_rel(grads[0][0], y64, REL[dtype], "y")
    assert_rel(grads[0][1], x64.grad, REL[dtype], "dx")
    assert_rel(grads[0][2], w64.grad, REL[dtype], "dweight")
