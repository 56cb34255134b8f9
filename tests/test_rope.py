"""rope (rotary embedding of q and k): the Triton kernel (interpreter on CPU) and the reference path
against the model's eager Hugging Face-form apply_rope in fp64 (values and autograd gradients),
gradcheck, opcheck, torch.compile and an sm_90 compile."""

import pytest
import torch

import apr_kernels
from apr_kernels.model.rope import apply_rope, rope_tables
from kernel_helpers import run_sm90_compile, spy_launchers

BACKENDS = ["triton", "reference"]
REL = {torch.float32: 2e-6, torch.float16: 1e-3}


@pytest.fixture
def kernel_calls(monkeypatch):
    return spy_launchers(monkeypatch, "rope", ("rope_fwd",))


def oracle(q, k, cos, sin, rope_type, dq, dk):
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    c, s = cos.double(), sin.double()
    qo, ko = apply_rope(q64, c, s, rope_type), apply_rope(k64, c, s, rope_type)
    torch.autograd.backward((qo, ko), (dq.double(), dk.double()))
    return qo.detach(), ko.detach(), q64.grad, k64.grad


def assert_rel(got, want, rel, what):
    err = (got.double() - want).abs().max().item()
    assert err <= rel * want.abs().max().item() + 1e-12, f"{what}: max error {err:.3g}"


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rope_type", [2, 0])
@pytest.mark.parametrize("shape", [(2, 17, 14, 2, 64), (1, 5, 4, 4, 80), (3, 1, 8, 1, 32)], ids=str)
def test_fwd_bwd_vs_fp64(be, dtype, rope_type, shape, use_backend, kernel_calls):
    use_backend(be)
    b, s, hq, hkv, d = shape
    q = torch.randn(b, s, hq, d).to(dtype).requires_grad_()
    k = torch.randn(b, s, hkv, d).to(dtype).requires_grad_()
    cos, sin = (t.to(dtype) for t in rope_tables(s, d, 1e4))
    qo, ko = apr_kernels.rope(q, k, cos, sin, rope_type)
    dq, dk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), (dq, dk))
    wq, wk, gq, gk = oracle(q, k, cos, sin, rope_type, dq, dk)
    assert qo.dtype == dtype and qo.shape == q.shape and ko.shape == k.shape
    for got, want, what in ((qo, wq, "q"), (ko, wk, "k"), (q.grad, gq, "dq"), (k.grad, gk, "dk")):
        assert_rel(got, want, REL[dtype], what)
    assert kernel_calls == (["rope_fwd", "rope_fwd"] if be == "triton" else [])


@pytest.mark.parametrize("be", BACKENDS)
def test_strided_views_without_copies(be, use_backend):
    """q and k as the model makes them: views of projection outputs, and the [B, H, S, D] layout."""
    use_backend(be)
    b, s, hq, hkv, d = 2, 6, 4, 2, 16
    fused = torch.randn(b, s, (hq + 2 * hkv) * d)  # a fused qkv projection output
    q = fused[..., : hq * d].view(b, s, hq, d)
    k = fused[..., hq * d: (hq + hkv) * d].view(b, s, hkv, d)
    cos, sin = rope_tables(s, d, 1e6)
    qo, ko = apr_kernels.rope(q, k, cos, sin)
    torch.testing.assert_close(qo, apply_rope(q, cos, sin, 2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ko, apply_rope(k, cos, sin, 2), rtol=1e-6, atol=1e-6)
    qt = torch.randn(b, hq, s, d).transpose(1, 2)  # [B, S, H, D] view of a [B, H, S, D] tensor
    qo, _ = apr_kernels.rope(qt, k, cos, sin)
    torch.testing.assert_close(qo, apply_rope(qt, cos, sin, 2), rtol=1e-6, atol=1e-6)


def test_inverse_undoes_the_rotation(use_backend):
    use_backend("triton")
    from apr_kernels.ops.rope import _rope_impl

    q, k = torch.randn(1, 9, 3, 24), torch.randn(1, 9, 1, 24)
    cos, sin = rope_tables(9, 24, 1e4)
    qo, ko = _rope_impl(q, k, cos, sin, 0, False)
    qb, kb = _rope_impl(qo, ko, cos, sin, 0, True)
    torch.testing.assert_close(qb, q, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kb, k, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=torch.randn(1, 5, 2, 16)), r"must share B, S and D"),
    (dict(cos=torch.randn(4, 7)), r"cos and sin must have shape \[S, D/2\] = \[4, 8\]"),
    (dict(rope_type=1), "rope_type must be 2"),
    (dict(q=torch.randn(1, 4, 2, 15), k=torch.randn(1, 4, 2, 15)), "head dim D = 15 must be even"),
])
def test_errors(kwargs, message):
    args = dict(q=torch.randn(1, 4, 2, 16), k=torch.randn(1, 4, 1, 16), cos=torch.randn(4, 8),
                sin=torch.randn(4, 8), rope_type=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        apr_kernels.rope(**args)


def test_gradcheck_reference_fp64(use_backend):
    use_backend("reference")
    q = torch.randn(1, 3, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 3, 1, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = (t.double() for t in rope_tables(3, 8, 1e4))
    for rt in (2, 0):
        assert torch.autograd.gradcheck(lambda a, b: apr_kernels.rope(a, b, cos, sin, rt), (q, k))


@pytest.mark.parametrize("be", BACKENDS)
def test_opcheck(be, use_backend):
    use_backend(be)
    q, k = torch.randn(2, 5, 4, 16, requires_grad=True), torch.randn(2, 5, 2, 16, requires_grad=True)
    cos, sin = rope_tables(5, 16, 1e4)
    torch.library.opcheck(torch.ops.apr.rope.default, (q, k, cos, sin, 2, False))


def test_torch_compile_fullgraph(use_backend):
    use_backend("reference")
    q, k = torch.randn(1, 4, 2, 8, requires_grad=True), torch.randn(1, 4, 1, 8, requires_grad=True)
    cos, sin = rope_tables(4, 8, 1e4)

    def f(a, b):
        qo, ko = apr_kernels.rope(a * 2, b, cos, sin)
        return (qo.sum(2, keepdim=True) * ko).sum()

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k)
    out.backward()
    dq = q.grad.clone()
    q.grad = k.grad = None
    f(q, k).backward()
    torch.testing.assert_close(dq, q.grad)


_AOT = r"""
import json, sys
import triton
from triton.compiler import ASTSource
from apr_kernels.kernels import rope as K
out = []
for hq, hkv, d, dt, neox in json.loads(sys.argv[1]):
    fn = K._rope_kernel
    sig = {a: "i32" for a in fn.arg_names}
    sig.update({p: "*" + dt for p in ("Q", "K", "QO", "KO", "COS", "SIN")}, SIGN="fp32")
    const = dict(NEOX=neox, BLOCK_HQ=triton.next_power_of_2(hq), BLOCK_HKV=triton.next_power_of_2(hkv),
                 BLOCK_HALF=triton.next_power_of_2(d // 2))
    for c in const:
        sig[c] = "constexpr"
    k, res = compile_sm90(ASTSource(fn=fn, signature=sig, constexprs=const), {"num_warps": K.launch_warps(hq, d // 2)})
    out.append(dict(case=[hq, hkv, d, dt, neox], rc=res.returncode, err=res.stderr[-400:]))
print(json.dumps(out))
"""


def test_kernel_compiles_for_sm90(tmp_path):
    cases = [[14, 2, 64, "bf16", True], [32, 8, 128, "bf16", False], [20, 4, 80, "fp16", True]]
    results = run_sm90_compile(_AOT, cases, tmp_path, timeout=300)
    assert len(results) == len(cases)
    for r in results:
        assert r["rc"] == 0, f"ptxas rejected {r['case']}: {r['err']}"


@pytest.mark.cuda
@pytest.mark.parametrize("rope_type", [2, 0])
def test_cuda_bf16_matches_eager(rope_type):
    q = torch.randn(4, 1024, 14, 64, device="cuda").bfloat16().requires_grad_()
    k = torch.randn(4, 1024, 2, 64, device="cuda").bfloat16().requires_grad_()
    cos, sin = (t.bfloat16() for t in rope_tables(1024, 64, 1e6, device="cuda"))
    qo, ko = apr_kernels.rope(q, k, cos, sin, rope_type)
    dq, dk = torch.randn_like(qo), torch.randn_like(ko)
    torch.autograd.backward((qo, ko), (dq, dk))
    wq, wk, gq, gk = oracle(q, k, cos, sin, rope_type, dq, dk)
    for got, want in ((qo, wq), (ko, wk), (q.grad, gq), (k.grad, gk)):
        assert_rel(got, want, 1e-2, "bf16")
