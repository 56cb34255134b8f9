"""swiglu (silu(gate) * up): the Triton kernels (interpreter on CPU) and the reference path against
an fp64 oracle, eager PyTorch's own autograd (HF's MLP expression), gradcheck, opcheck, compile."""

import pytest
import torch
import torch.nn.functional as F

import apr_kernels
from kernel_helpers import kernel_module, run_sm90_compile, spy_launchers

BACKENDS = ["triton", "reference"]
REL = {torch.float32: 1e-6, torch.float16: 2e-3}


@pytest.fixture
def kernel_calls(monkeypatch):
    return spy_launchers(monkeypatch, "swiglu", ("swiglu_fwd", "swiglu_bwd"))


def _inputs(shape, dtype):
    g = (torch.randn(shape) * 3).to(dtype).requires_grad_()  # both tails of silu
    u = torch.randn(shape).to(dtype).requires_grad_()
    return g, u


def assert_rel(got, want, rel, what):
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rel * scale + 1e-12, f"{what}: max error {err:.3g} > {rel} * {scale:.3g}"


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(7, 300), (2, 5, 1000), (1,), (4099,)], ids=str)
def test_fwd_bwd_vs_fp64(be, dtype, shape, use_backend, kernel_calls):
    use_backend(be)
    g, u = _inputs(shape, dtype)
    y = apr_kernels.swiglu(g, u)
    dy = torch.randn(shape).to(dtype)
    y.backward(dy)
    g64, u64 = g.detach().double().requires_grad_(), u.detach().double().requires_grad_()
    y64 = F.silu(g64) * u64
    y64.backward(dy.double())
    assert y.dtype == dtype and y.shape == g.shape
    assert_rel(y, y64, REL[dtype], "y")
    assert_rel(g.grad, g64.grad, REL[dtype] * 2, "dgate")
    assert_rel(u.grad, u64.grad, REL[dtype], "dup")
    assert kernel_calls == (["swiglu_fwd", "swiglu_bwd"] if be == "triton" else [])


@pytest.mark.parametrize("be", BACKENDS)
def test_matches_eager_hf_expression_in_fp16(be, use_backend):
    """Same rounding points as F.silu(g) * u and its autograd: equal to eager up to one fp16 ulp."""
    use_backend(be)
    g, u = _inputs((33, 129), torch.float16)
    dy = torch.randn(33, 129, dtype=torch.float16)
    y = apr_kernels.swiglu(g, u)
    y.backward(dy)
    g2, u2 = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    y2 = F.silu(g2) * u2
    y2.backward(dy)
    for a, b, what in ((y, y2, "y"), (g.grad, g2.grad, "dgate"), (u.grad, u2.grad, "dup")):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=what)
    if be == "reference":
        assert torch.equal(y, y2) and torch.equal(u.grad, u2.grad)


def test_launchers_write_every_element():
    k = kernel_module("swiglu")
    g, u = torch.randn(5000), torch.randn(5000)
    y = k.swiglu_fwd(g, u, block=256)  # 20 programs, the last partly masked
    torch.testing.assert_close(y, F.silu(g) * u, rtol=1e-6, atol=1e-6)
    dg, du = k.swiglu_bwd(torch.ones(5000), g, u, block=256)
    assert not dg.isnan().any() and not du.isnan().any()
    torch.testing.assert_close(du, F.silu(g), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("be", BACKENDS)
def test_non_contiguous_and_empty(be, use_backend):
    use_backend(be)
    base = torch.randn(6, 20)
    g, u = base[:, ::2], torch.randn(10, 6).t()
    torch.testing.assert_close(apr_kernels.swiglu(g, u), F.silu(g) * u, rtol=1e-6, atol=1e-6)
    assert apr_kernels.swiglu(torch.randn(0, 4), torch.randn(0, 4)).shape == (0, 4)


def test_no_grad_path_and_errors(use_backend):
    use_backend("reference")
    g, u = _inputs((3, 4), torch.float32)
    with torch.no_grad():
        y = apr_kernels.swiglu(g, u)
    assert y.grad_fn is None
    with pytest.raises(ValueError, match="gate and up must have one shape, dtype and device"):
        apr_kernels.swiglu(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(TypeError, match="up must be a floating-point torch.Tensor"):
        apr_kernels.swiglu(torch.randn(3), torch.arange(3))


def test_gradcheck_reference_fp64(use_backend):
    use_backend("reference")
    g = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    u = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(apr_kernels.swiglu, (g, u))


@pytest.mark.parametrize("be", BACKENDS)
def test_opcheck(be, use_backend):
    use_backend(be)
    g, u = _inputs((4, 40), torch.float32)
    torch.library.opcheck(torch.ops.apr.swiglu.default, (g, u))
    torch.library.opcheck(torch.ops.apr.swiglu_backward.default, (torch.randn(4, 40), g.detach(), u.detach()))


def test_torch_compile_fullgraph(use_backend):
    use_backend("reference")
    g, u = _inputs((3, 16), torch.float32)
    compiled = torch.compile(lambda a, b: apr_kernels.swiglu(a * 2, b), fullgraph=True, backend="aot_eager")
    out = compiled(g, u)
    out.sum().backward()
    dg = g.grad.clone()
    g.grad = u.grad = None
    want = apr_kernels.swiglu(g * 2, u)
    want.sum().backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(dg, g.grad)


_AOT = r"""
import json, sys
import triton
from triton.compiler import ASTSource
from apr_kernels.kernels import swiglu as K
out = []
for n, dt in json.loads(sys.argv[1]):
    block, warps = K.launch_config(n)
    for fn, ptrs in ((K._swiglu_fwd_kernel, ("G", "U", "Y")), (K._swiglu_bwd_kernel, ("DY", "G", "U", "DG", "DU"))):
        sig = {a: "*" + dt for a in ptrs}
        sig.update(n_elements="i64", BLOCK="constexpr")
        k, res = compile_sm90(ASTSource(fn=fn, signature=sig, constexprs=dict(BLOCK=block)), {"num_warps": warps})
        out.append(dict(case=[n, dt, fn.__name__], rc=res.returncode, err=res.stderr[-400:]))
print(json.dumps(out))
"""


def test_kernels_compile_for_sm90(tmp_path):
    results = run_sm90_compile(_AOT, [[8192 * 4864, "bf16"], [100, "fp16"]], tmp_path, timeout=300)
    assert len(results) == 4
    for r in results:
        assert r["rc"] == 0, f"ptxas rejected {r['case']}: {r['err']}"


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(8192, 4864), (3, 1001)])
def test_cuda_bf16_matches_eager(shape):
    g = (torch.randn(shape, device="cuda") * 3).bfloat16().requires_grad_()
    u = torch.randn(shape, device="cuda").bfloat16().requires_grad_()
    dy = torch.randn(shape, device="cuda").bfloat16()
    y = apr_kernels.swiglu(g, u)
    y.backward(dy)
    g2, u2 = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    y2 = F.silu(g2) * u2
    y2.backward(dy)
    for a, b in ((y, y2), (g.grad, g2.grad), (u.grad, u2.grad)):
        torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1e-3)


def test_swiglu_mlp_is_a_drop_in_for_hf_llama_mlp(use_backend):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    use_backend("triton")
    hf = LlamaMLP(LlamaConfig(hidden_size=24, intermediate_size=56, num_attention_heads=4, hidden_act="silu"))
    ours = apr_kernels.SwiGLUMLP(24, 56)
    ours.load_state_dict(hf.state_dict())  # same parameter names and shapes
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(ours(x), hf(x), rtol=1e-5, atol=1e-6)
