"""GQA attention: the Triton kernels (CPU interpreter; CUDA when present) and the reference path,
against an fp64 oracle written here (explicit softmax over repeat_interleave'd K/V), SDPA on the GPU,
opcheck, poisoned outputs, determinism and the error messages."""

import math

import pytest
import torch

import apr_kernels
from kernel_helpers import kernel_module, spy_launchers
from apr_kernels.nn import Attention
from apr_kernels.ops import attention as ops

# ||got - want||_F <= REL * ||want||_F (+ a tiny floor for all-zero gradients, e.g. S = 1).
# fp32: exact fp32 dots (interpreter / "ieee"); fp16/bf16: P is rounded to the input dtype before
# P @ V and the outputs are rounded (METHOD.md: bf16 operands land between 1e-3 and 1e-2).
REL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _kernels():
    return kernel_module("attention")


@pytest.fixture
def kernel_calls(monkeypatch):
    return spy_launchers(monkeypatch, "attention", ('attention_fwd', 'attention_bwd'))


def oracle(q, k, v, causal, scale):
    """fp64 softmax attention with K/V repeated per group (the semantics of SDPA's enable_gqa)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    G = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    s = torch.einsum("bshd,bthd->bhst", q, kk) * scale
    if causal:
        S = q.shape[1]
        s = s.masked_fill(torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    o = torch.einsum("bhst,bthd->bshd", torch.softmax(s, -1), vv)
    return o, lse, (q, k, v)


def assert_close(got, want, rel, what):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got.double() - want.double()).norm().item()
    ref = want.double().norm().item()
    floor = 1e-5 * math.sqrt(want.numel())
    assert err <= rel * ref + floor, f"{what}: ||err|| {err:.3g} > {rel} * ||ref|| {ref:.3g}"


def make(B, S, HQ, HKV, D, dtype, layout="bshd", device="cpu"):
    """Fresh random q, k, v of shape [B, S, H, D]; layout 'bhsd' gives transposed views of
    [B, H, S, D] storage (the other supported layout)."""
    out = []
    for H in (HQ, HKV, HKV):
        if layout == "bhsd":
            t = torch.randn(B, H, S, D, device=device).to(dtype).transpose(1, 2)
        else:
            t = torch.randn(B, S, H, D, device=device).to(dtype)
        out.append(t.requires_grad_())
    return out


def run_case(B, S, HQ, HKV, D, causal, dtype, layout="bshd", device="cpu", scale=None):
    q, k, v = make(B, S, HQ, HKV, D, dtype, layout, device)
    o = apr_kernels.attention(q, k, v, causal=causal, scale=scale)
    do = torch.randn_like(o)
    o.backward(do)
    want, _, leaves = oracle(q, k, v, causal, D**-0.5 if scale is None else scale)
    want.backward(do.double())
    rel = REL[dtype]
    assert o.shape == (B, S, HQ, D) and o.dtype == dtype and o.is_contiguous()
    assert_close(o, want, rel, "o")
    for name, t, ref in zip("qkv", (q, k, v), leaves):
        assert t.grad.dtype == dtype
        assert_close(t.grad, ref.grad, 2 * rel, f"d{name}")


# (B, S, Hq, Hkv, D, causal, dtype, layout): GQA ratios 1, 2, 7, 8; ragged S 1, 17, 100; D 64 and
# 80 (padded to 128) and 32; mask-free (S a multiple of the tiles) and masked paths; both layouts.
CASES = [
    (1, 17, 2, 2, 64, True, torch.float32, "bshd"),
    (2, 100, 4, 2, 80, False, torch.float16, "bhsd"),
    (1, 100, 7, 1, 64, True, torch.float16, "bshd"),
    (1, 64, 8, 1, 32, False, torch.float32, "bhsd"),
    (1, 1, 4, 2, 64, True, torch.float16, "bshd"),
    (1, 100, 2, 1, 80, True, torch.float32, "bhsd"),
    (1, 128, 2, 2, 64, True, torch.float16, "bshd"),
    (1, 17, 8, 1, 64, False, torch.float16, "bshd"),
    (1, 40, 4, 1, 64, True, torch.bfloat16, "bshd"),  # interpreter: computed in fp32, rounded
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_triton_matches_fp64(use_backend, kernel_calls, case):
    use_backend("triton")
    run_case(*case)
    # (the interpreter's bf16 path re-enters each launcher once with fp32 copies)
    assert sorted(set(kernel_calls)) == ["attention_bwd", "attention_fwd"], kernel_calls


@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: "-".join(map(str, c)).replace("torch.", ""))
def test_reference_matches_fp64(use_backend, case):
    use_backend("reference")
    run_case(*case)


def test_reference_sdpa_oracle_agrees():
    q, k, v = make(2, 23, 6, 2, 16, torch.float64)
    for causal in (True, False):
        want, _, _ = oracle(q, k, v, causal, 0.3)
        assert_close(ops.ref.attention_reference(q, k, v, causal, 0.3), want, 1e-12, "sdpa reference")


@pytest.mark.parametrize("S,D,causal", [(37, 80, True), (64, 64, False)])
def test_poisoned_outputs_fully_written_and_in_bounds(S, D, causal):
    """Outputs are NaN-filled views into larger NaN buffers: every element of the view must be
    written, and nothing outside it (the extra rows/heads) may be touched."""
    k_mod = _kernels()
    B, HQ, HKV = 2, 4, 2
    q, k, v = (t.detach() for t in make(B, S, HQ, HKV, D, torch.float16))
    scale = 0.2
    nan = float("nan")
    o_buf = torch.full((B, S + 3, HQ + 1, D), nan, dtype=torch.float16)
    lse = torch.full((B, HQ, S), nan)
    o, lse = k_mod.attention_fwd(q, k, v, causal, scale, out=o_buf[:, :S, :HQ], lse=lse)
    want, want_lse, leaves = oracle(q, k, v, causal, scale)
    assert_close(o, want, REL[torch.float16], "o")
    assert_close(lse, want_lse, 1e-5, "lse")
    assert o_buf[:, S:].isnan().all() and o_buf[:, :, HQ:].isnan().all(), "forward wrote out of bounds"

    do = torch.randn_like(o)
    bufs = [torch.full((B, S + 3, H + 1, D), nan, dtype=torch.float16) for H in (HQ, HKV, HKV)]
    views = [b[:, :S, : b.shape[2] - 1] for b in bufs]
    dq, dk, dv = k_mod.attention_bwd(do, q, k, v, o, lse, causal, scale, dq=views[0], dk=views[1], dv=views[2])
    want.backward(do.double())
    for name, got, ref in zip("qkv", (dq, dk, dv), leaves):
        assert_close(got, ref.grad, 2 * REL[torch.float16], f"d{name}")
    for b in bufs:
        assert b[:, S:].isnan().all() and b[:, :, -1].isnan().all(), "backward wrote out of bounds"


def test_bhsd_layout_runs_without_copies(monkeypatch):
    """[B, H, S, D] storage passed as transposed views reaches the kernel as is (same pointers)."""
    k_mod = _kernels()
    seen = []

    class Spy:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(tuple(a.data_ptr() for a in args[:3]))
                return self.fn[grid](*args, **kw)

            return launch

    monkeypatch.setattr(k_mod, "_attn_fwd", Spy(k_mod._attn_fwd))
    q, k, v = (t.detach() for t in make(1, 20, 4, 2, 32, torch.float32, "bhsd"))
    o, _ = k_mod.attention_fwd(q, k, v, True, 0.25)
    assert seen == [(q.data_ptr(), k.data_ptr(), v.data_ptr())]
    assert_close(o, oracle(q, k, v, True, 0.25)[0], REL[torch.float32], "o")


def test_non_unit_last_stride_is_copied_and_correct(use_backend):
    use_backend("triton")
    q, k, v = make(1, 19, 2, 1, 32, torch.float32)
    q2 = torch.randn(1, 19, 2, 64)[..., ::2]  # head_dim stride 2
    o = apr_kernels.attention(q2, k, v, causal=True)
    assert_close(o, oracle(q2, k, v, True, 32**-0.5)[0], REL[torch.float32], "o")


def test_dkdv_deterministic_and_explicit_configs(use_backend):
    """Two backward runs give bitwise equal gradients; other tile shapes (GPU-like 128-row tiles
    narrowed to the sequence, and 16x16) give the same numbers within fp32 rounding."""
    k_mod = _kernels()
    q, k, v = (t.detach() for t in make(1, 50, 4, 1, 32, torch.float32))
    o, lse = k_mod.attention_fwd(q, k, v, True, 0.3)
    do = torch.randn_like(o)
    g1 = k_mod.attention_bwd(do, q, k, v, o, lse, True, 0.3)
    g2 = k_mod.attention_bwd(do, q, k, v, o, lse, True, 0.3)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    cfg = lambda bm, bn: {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": 4, "num_stages": 1}  # noqa: E731
    o16, lse16 = k_mod.attention_fwd(q, k, v, True, 0.3, config=cfg(16, 16))
    g16 = k_mod.attention_bwd(do, q, k, v, o, lse, True, 0.3, config={"dkdv": cfg(16, 16), "dq": cfg(16, 16)})
    assert_close(o16, o, 1e-6, "o (16x16 tiles)")
    assert_close(lse16, lse, 1e-6, "lse (16x16 tiles)")
    for a, b, n in zip(g16, g1, "qkv"):
        assert_close(a, b, 1e-6, f"d{n} (16x16 tiles)")


@pytest.mark.parametrize("name", ["triton", "reference"])
def test_lse_gradient(use_backend, name):
    """apr::attention_fwd's second output is differentiable too (dlse folds into delta)."""
    use_backend(name)
    q, k, v = make(1, 21, 4, 2, 16, torch.float32)
    o, lse = torch.ops.apr.attention_fwd(q, k, v, True, 0.5, 0)
    wo, wl = torch.randn_like(o), torch.randn_like(lse)
    ((o * wo).sum() + (lse * wl).sum()).backward()
    o64, lse64, leaves = oracle(q, k, v, True, 0.5)
    assert_close(lse, lse64, 1e-5, "lse")
    ((o64 * wo.double()).sum() + (lse64 * wl.double()).sum()).backward()
    for name_, t, ref in zip("qkv", (q, k, v), leaves):
        assert_close(t.grad, ref.grad, 1e-4, f"d{name_}")


@pytest.mark.parametrize("name", ["triton", "reference"])
def test_opcheck(use_backend, name):
    use_backend(name)
    q, k, v = make(1, 9, 2, 1, 16, torch.float32)
    torch.library.opcheck(torch.ops.apr.attention_fwd.default, (q, k, v, True, 0.25, 0))
    o, lse = torch.ops.apr.attention_fwd(q.detach(), k.detach(), v.detach(), False, 0.25, 0)
    args = (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, lse, None, False, 0.25, 0)
    torch.library.opcheck(torch.ops.apr.attention_bwd.default, args)


def test_gradcheck_reference_fp64(use_backend):
    use_backend("auto")  # fp64 always takes the reference
    q, k, v = make(1, 6, 4, 2, 8, torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: apr_kernels.attention(a, b, c, scale=0.7), (q, k, v))


def test_module_and_auto_backend_on_cpu(use_backend):
    use_backend("auto")  # CPU tensors: the reference; head_dim 20 is fine there
    q, k, v = make(2, 11, 6, 3, 20, torch.float32)
    layer = Attention(causal=False, scale=0.4)
    assert_close(layer(q, k, v), oracle(q, k, v, False, 0.4)[0], REL[torch.float32], "nn.Attention")
    assert "causal=False" in repr(layer)


def _bad(**over):
    q, k, v = (t.detach() for t in make(1, 8, 4, 2, 16, torch.float32))
    args = {"q": q, "k": k, "v": v}
    args.update(over)
    return args


@pytest.mark.parametrize("args,exc,match", [
    (lambda: _bad(k=torch.randn(1, 8, 3, 16), v=torch.randn(1, 8, 3, 16)), ValueError, r"multiple of k/v heads; got Hkv=3"),
    (lambda: _bad(k=torch.randn(1, 7, 2, 16), v=torch.randn(1, 7, 2, 16)), ValueError, r"at least as many keys as queries"),
    (lambda: _bad(k=torch.randn(2, 8, 2, 16), v=torch.randn(2, 8, 2, 16)), ValueError, r"batch size must equal q's \(1\)"),
    (lambda: _bad(k=torch.randn(1, 8, 2, 32), v=torch.randn(1, 8, 2, 32)), ValueError, r"head_dim must equal q's \(16\)"),
    (lambda: _bad(v=torch.randn(1, 8, 1, 16)), ValueError, r"v must have k's shape \[1, 8, 2, 16\]"),
    (lambda: _bad(v=torch.randn(1, 8, 2, 16, dtype=torch.float16)), TypeError, r"v.dtype must equal q.dtype"),
    (lambda: _bad(q=torch.randn(8, 4, 16)), ValueError, r"q must be 4-D \[B, S, H, D\].*got shape \[8, 4, 16\]"),
    (lambda: _bad(q=torch.zeros(1, 8, 4, 16, dtype=torch.int32)), TypeError, r"q must be float16.*int32"),
    (lambda: _bad(k=[1.0]), TypeError, r"k must be a torch.Tensor, got list"),
    (lambda: _bad(v=torch.randn(1, 8, 2, 16, device="meta")), ValueError, r"v must be on q's device \(cpu\)"),
])
def test_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        apr_kernels.attention(**args())


def test_scale_and_causal_type_errors():
    q, k, v = (t.detach() for t in make(1, 4, 2, 2, 16, torch.float32))
    with pytest.raises(TypeError, match="scale must be a finite real number or None; got nan"):
        apr_kernels.attention(q, k, v, scale=float("nan"))
    with pytest.raises(TypeError, match="causal must be a bool; got str"):
        apr_kernels.attention(q, k, v, causal="yes")


def test_triton_backend_rejects_uncovered_input(use_backend):
    use_backend("triton")
    q, k, v = (t.detach() for t in make(1, 4, 2, 2, 20, torch.float32))
    with pytest.raises(ValueError, match=r"head_dim 20 \(the Triton kernels take multiples of 8 in 16..128\)"):
        apr_kernels.attention(q, k, v)
    q, k, v = (t.detach() for t in make(1, 4, 2, 2, 16, torch.float64))
    with pytest.raises(ValueError, match=r"dtype torch.float64"):
        apr_kernels.attention(q, k, v)


# ----------------------------------------------------------------------------------- GPU only


def _sdpa_fp32(q, k, v, causal):
    qt, kt, vt = (t.detach().float().transpose(1, 2).requires_grad_() for t in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=True)
    return o.transpose(1, 2), (qt, kt, vt)


@pytest.mark.cuda
@pytest.mark.parametrize("B,S,HQ,HKV,D,causal,dtype", [
    (2, 1024, 14, 2, 64, True, torch.bfloat16),    # Qwen2-0.5B
    (1, 2048, 32, 8, 128, True, torch.bfloat16),   # Llama-3-8B
    (1, 4096, 14, 2, 64, True, torch.bfloat16),
    (2, 1000, 12, 4, 96, False, torch.bfloat16),   # ragged, padded head_dim
    (1, 777, 8, 1, 80, True, torch.float16),
    (1, 300, 4, 2, 128, True, torch.float32),
])
def test_gpu_vs_sdpa_fp32(use_backend, B, S, HQ, HKV, D, causal, dtype):
    use_backend("auto")
    q, k, v = make(B, S, HQ, HKV, D, dtype, device="cuda")
    o = apr_kernels.attention(q, k, v, causal=causal)
    do = torch.randn_like(o)
    o.backward(do)
    want, leaves = _sdpa_fp32(q, k, v, causal)
    want.backward(do.float())
    rel = REL[dtype] if dtype != torch.float32 else 1e-4  # SDPA fp32 on GPU may use TF32-free math
    assert_close(o, want, rel, "o")
    for name, t, ref in zip("qkv", (q, k, v), leaves):
        assert_close(t.grad, ref.grad.transpose(1, 2), 2 * rel, f"d{name}")


@pytest.mark.cuda
def test_gpu_deterministic_and_bhsd_layout(use_backend):
    use_backend("auto")
    q, k, v = make(2, 1536, 14, 2, 64, torch.bfloat16, "bhsd", device="cuda")
    grads = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        o = apr_kernels.attention(q, k, v, causal=True)
        o.backward(torch.ones_like(o) * 0.01 + o.detach())
        grads.append([t.grad.clone() for t in (q, k, v)])
    assert all(torch.equal(a, b) for a, b in zip(*grads)), "backward not bitwise deterministic"
    want, _ = _sdpa_fp32(q, k, v, True)
    assert_close(o, want, REL[torch.bfloat16], "o")
