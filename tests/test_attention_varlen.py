"""Packed-sequence (varlen) attention: ``attention(q, k, v, cu_seqlens=..., max_seqlen=...)`` through
the Triton kernels (CPU interpreter; CUDA when present) and the reference path, against the fp64
oracle of test_attention.py run on each sequence alone; the dense kernels as a second oracle; poisoned
outputs, clamped malformed bounds, opcheck and the error messages."""

import pytest
import torch

import apr_kernels
from kernel_helpers import kernel_module, spy_launchers
from test_attention import REL, assert_close, oracle


def packed(lengths, HQ, HKV, D, dtype, device="cpu", fused=False):
    """Fresh q [T, Hq, D], k/v [T, Hkv, D] (leaves) and int32 cu_seqlens. ``fused``: q, k, v are
    strided views of one [T, (Hq + 2 Hkv) * D] buffer, as the model's fused q/k/v projection gives."""
    T = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    if fused:
        buf = torch.randn(T, (HQ + 2 * HKV) * D, device=device).to(dtype).requires_grad_()
        q, k, v = buf.split([HQ * D, HKV * D, HKV * D], dim=-1)
        return (q.view(T, HQ, D), k.view(T, HKV, D), v.view(T, HKV, D)), cu, buf
    qkv = [torch.randn(T, H, D, device=device).to(dtype).requires_grad_() for H in (HQ, HKV, HKV)]
    return qkv, cu, None


def per_sequence_oracle(q, k, v, cu, causal, scale, do):
    """fp64 output, lse [Hq, T] and gradients, each sequence computed alone."""
    T = q.shape[0]
    o = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.zeros(q.shape[1], T, dtype=torch.float64)
    grads = [torch.zeros(t.shape, dtype=torch.float64) for t in (q, k, v)]
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b == a:
            continue
        oi, li, leaves = oracle(q[None, a:b].cpu(), k[None, a:b].cpu(), v[None, a:b].cpu(), causal, scale)
        oi.backward(do[None, a:b].cpu().double())
        o[a:b], lse[:, a:b] = oi[0].detach(), li[0].detach()
        for g, leaf in zip(grads, leaves):
            g[a:b] = leaf.grad[0]
    return o, lse, grads


# (lengths, Hq, Hkv, D, causal, dtype): GQA 1, 2, 7; empty and 1-row sequences; ragged lengths that
# cross the interpreter's 64/32-row tiles; a padded head_dim (80).
CASES = [
    ((5, 17, 1, 40, 0, 33), 4, 2, 32, True, torch.float32),
    ((100, 17, 1), 7, 1, 64, True, torch.float16),
    ((64, 64), 2, 2, 80, False, torch.float32),
    ((0, 9, 70, 0), 8, 1, 16, False, torch.float16),
    ((31, 2, 45), 4, 1, 32, True, torch.bfloat16),  # interpreter: computed in fp32, rounded
]


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace("torch.", "").replace(" ", ""))
def test_varlen_matches_each_sequence_alone(use_backend, monkeypatch, backend_name, case):
    lengths, HQ, HKV, D, causal, dtype = case
    use_backend(backend_name)
    calls = spy_launchers(monkeypatch, "attention", ("attention_fwd", "attention_bwd"))
    (q, k, v), cu, _ = packed(lengths, HQ, HKV, D, dtype)
    o = apr_kernels.attention(q, k, v, causal=causal, cu_seqlens=cu)
    do = torch.randn_like(o)
    o.backward(do)
    want, _, grads = per_sequence_oracle(q, k, v, cu, causal, D**-0.5, do)
    assert o.shape == q.shape and o.dtype == dtype and o.is_contiguous()
    assert_close(o, want, REL[dtype], "o")
    for name, t, ref in zip("qkv", (q, k, v), grads):
        assert t.grad.dtype == dtype
        assert_close(t.grad, ref, 2 * REL[dtype], f"d{name}")
    assert bool(calls) == (backend_name == "triton"), calls


def test_fused_qkv_views_read_in_place(use_backend, monkeypatch):
    """q, k, v as strided views of one fused projection buffer: the kernels get the buffer's pointers
    (no copies) and the gradient lands in the buffer."""
    use_backend("triton")
    k_mod = kernel_module("attention")
    seen = []
    real = k_mod.attention_fwd
    monkeypatch.setattr(k_mod, "attention_fwd", lambda q, k, v, *a, **kw: seen.append(
        (q.data_ptr(), k.data_ptr(), v.data_ptr())) or real(q, k, v, *a, **kw))
    (q, k, v), cu, buf = packed((23, 41), 4, 2, 16, torch.float32, fused=True)
    o = apr_kernels.attention(q, k, v, cu_seqlens=cu, max_seqlen=41)
    do = torch.randn_like(o)
    o.backward(do)
    assert seen == [(q.data_ptr(), k.data_ptr(), v.data_ptr())]
    want, _, grads = per_sequence_oracle(q.detach(), k.detach(), v.detach(), cu, True, 0.25, do)
    assert_close(o, want, REL[torch.float32], "o")
    got = buf.grad.split([4 * 16, 2 * 16, 2 * 16], dim=-1)
    for name, g, ref in zip("qkv", got, grads):
        assert_close(g.reshape(ref.shape), ref, 2 * REL[torch.float32], f"d{name}")


def test_equal_lengths_equal_the_dense_kernels_bitwise():
    """Sequences of one length S packed back to back run the same tiles as the dense [B, S] launch:
    the results are bitwise equal (a second, independent oracle: the dense kernels)."""
    k_mod = kernel_module("attention")
    B, S, HQ, HKV, D = 3, 37, 4, 2, 32
    q, k, v = (torch.randn(B, S, H, D) for H in (HQ, HKV, HKV))
    cu = torch.arange(0, B * S + 1, S, dtype=torch.int32)
    flat = [t.reshape(B * S, *t.shape[2:]) for t in (q, k, v)]
    o, lse = k_mod.attention_fwd(q, k, v, True, 0.3)
    ov, lsev = k_mod.attention_fwd(*flat, True, 0.3, cu_seqlens=cu, max_seqlen=S)
    assert torch.equal(ov, o.reshape(B * S, HQ, D))
    assert torch.equal(lsev, lse.permute(1, 0, 2).reshape(HQ, B * S))
    do = torch.randn_like(o)
    g = k_mod.attention_bwd(do, q, k, v, o, lse, True, 0.3)
    gv = k_mod.attention_bwd(do.reshape(B * S, HQ, D), *flat, ov, lsev, True, 0.3, cu_seqlens=cu, max_seqlen=S)
    for a, b in zip(gv, g):
        assert torch.equal(a, b.reshape(a.shape))


def test_poisoned_outputs_every_row_written():
    """NaN-filled outputs: every row of every sequence (a 0-length one included) is written, the
    grid's spare programs (past a short sequence) write nothing, and lse rows of all heads are set."""
    k_mod = kernel_module("attention")
    lengths = (3, 0, 50, 1, 20)
    (q, k, v), cu, _ = packed(lengths, 4, 2, 32, torch.float16)
    q, k, v = (t.detach() for t in (q, k, v))
    nan = float("nan")
    o_buf = torch.full((q.shape[0], 5, 32), nan, dtype=torch.float16)
    lse = torch.full((4, q.shape[0]), nan)
    o, lse = k_mod.attention_fwd(q, k, v, True, 0.2, out=o_buf[:, :4], lse=lse, cu_seqlens=cu, max_seqlen=50)
    do = torch.randn_like(o)
    want, want_lse, grads = per_sequence_oracle(q, k, v, cu, True, 0.2, do)
    assert_close(o, want, REL[torch.float16], "o")
    assert_close(lse, want_lse, 1e-5, "lse")
    assert o_buf[:, 4].isnan().all(), "forward wrote into the spare head"
    bufs = [torch.full((t.shape[0], t.shape[1] + 1, 32), nan, dtype=torch.float16) for t in (q, k, v)]
    dq, dk, dv = k_mod.attention_bwd(do, q, k, v, o, lse, True, 0.2, dq=bufs[0][:, :-1], dk=bufs[1][:, :-1],
                                     dv=bufs[2][:, :-1], cu_seqlens=cu, max_seqlen=50)
    for name, got, ref in zip("qkv", (dq, dk, dv), grads):
        assert_close(got, ref, 2 * REL[torch.float16], f"d{name}")
    assert all(b[:, -1].isnan().all() for b in bufs), "backward wrote into the spare head"


def test_malformed_bounds_are_clamped_by_the_kernels():
    """The launchers trust cu_seqlens (the public function checks it): the kernels clamp each
    sequence into [0, T], so garbage bounds read and write only inside the tensors. Here the clamped
    bounds are [0, T], [T, T] and [0, T] again: the result is one sequence of all T rows."""
    k_mod = kernel_module("attention")
    T = 45
    q, k, v = (torch.randn(T, H, 16) for H in (2, 1, 1))
    bad = torch.tensor([0, 1000, -5, T + 50], dtype=torch.int32)
    o, _ = k_mod.attention_fwd(q, k, v, True, 0.25, cu_seqlens=bad, max_seqlen=T)
    want, _, _ = oracle(q[None], k[None], v[None], True, 0.25)
    assert_close(o, want[0], REL[torch.float32], "o")


@pytest.mark.parametrize("name", ["triton", "reference"])
def test_opcheck(use_backend, name):
    use_backend(name)
    (q, k, v), cu, _ = packed((4, 0, 7), 2, 1, 16, torch.float32)
    torch.library.opcheck(torch.ops.apr.attention_varlen_fwd.default, (q, k, v, cu, 7, True, 0.25, 0, None, 7))
    o, lse = torch.ops.apr.attention_varlen_fwd(q.detach(), k.detach(), v.detach(), cu, 7, False, 0.25, 0, None, 7)
    args = (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, lse, torch.randn_like(lse), cu, 7,
            False, 0.25, 0, None, 7)
    torch.library.opcheck(torch.ops.apr.attention_varlen_bwd.default, args)
    # keys packed with their own spans (cu_seqlens_k): 2, 0 and 9 keys for 1, 0 and 7 queries (causal)
    cu_k = torch.tensor([0, 2, 2, 11], dtype=torch.int32)
    kk, vv = (torch.randn(11, 1, 16, requires_grad=True) for _ in range(2))
    qq = torch.randn(8, 2, 16, requires_grad=True)
    cu_q = torch.tensor([0, 1, 1, 8], dtype=torch.int32)
    torch.library.opcheck(torch.ops.apr.attention_varlen_fwd.default, (qq, kk, vv, cu_q, 7, True, 0.25, 0, cu_k, 9))


def test_gradcheck_reference_fp64(use_backend):
    use_backend("auto")
    (q, k, v), cu, _ = packed((3, 5), 4, 2, 8, torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: apr_kernels.attention(a, b, c, cu_seqlens=cu), (q, k, v))


def test_compile_fullgraph(use_backend):
    use_backend("reference")
    (q, k, v), cu, _ = packed((6, 11), 4, 2, 16, torch.float32)
    f = torch.compile(lambda a, b, c, cu: apr_kernels.attention(a, b, c, cu_seqlens=cu, max_seqlen=11),
                      fullgraph=True, backend="aot_eager")
    o = f(q, k, v, cu)
    o.sum().backward()
    want, _, grads = per_sequence_oracle(q.detach(), k.detach(), v.detach(), cu, True, 0.25, torch.ones_like(o))
    assert_close(o, want, REL[torch.float32], "o")
    assert_close(q.grad, grads[0], 2 * REL[torch.float32], "dq")


def _args(**over):
    (q, k, v), cu, _ = packed((3, 5), 4, 2, 16, torch.float32)
    args = {"q": q.detach(), "k": k.detach(), "v": v.detach(), "cu_seqlens": cu}
    args.update(over)
    return args


@pytest.mark.parametrize("args,exc,match", [
    (lambda: _args(cu_seqlens=torch.tensor([0, 3, 8])), ValueError, r"cu_seqlens must be a 1-D int32 tensor.*int64"),
    (lambda: _args(cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32)), ValueError,
     r"cu_seqlens must rise from 0 to the token count 8 without decreasing; got \[0, 5, 3, 8\]"),
    (lambda: _args(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)), ValueError, r"token count 8 .*ending at 7"),
    (lambda: _args(cu_seqlens=torch.tensor([1, 3, 8], dtype=torch.int32)), ValueError, r"rise from 0"),
    (lambda: _args(max_seqlen=4), ValueError, r"max_seqlen 4 is shorter than the longest sequence in cu_seqlens \(5\)"),
    (lambda: _args(max_seqlen=2.5), TypeError, r"max_seqlen must be a non-negative int or None; got 2.5"),
    (lambda: _args(cu_seqlens=[0, 3, 8]), TypeError, r"cu_seqlens must be a torch.Tensor; got list"),
    (lambda: _args(q=torch.randn(1, 8, 4, 16)), ValueError, r"with cu_seqlens, q must be 3-D \[T, H, D\].*\[1, 8, 4, 16\]"),
    (lambda: _args(k=torch.randn(9, 2, 16), v=torch.randn(9, 2, 16)), ValueError, r"k's token count must equal q's \(8\)"),
    (lambda: _args(cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32, device="meta")), ValueError,
     r"cu_seqlens must be on q's device \(cpu\)"),
])
def test_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        apr_kernels.attention(**args())


def test_max_seqlen_without_cu_seqlens_is_an_error():
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError, match="max_seqlen, cu_seqlens_k and max_seqlen_k are only meaningful with cu_seqlens"):
        apr_kernels.attention(q, q, q, max_seqlen=4)


# ----------------------------------------------------------------------------------- GPU only


@pytest.mark.cuda
@pytest.mark.parametrize("lengths,HQ,HKV,D,dtype", [
    ((1024, 333, 1, 2048, 700, 0, 4), 14, 2, 64, torch.bfloat16),   # Qwen2-0.5B heads
    ((4096, 17, 2000), 32, 8, 128, torch.bfloat16),                # Llama-3-8B heads
    ((513, 129, 80), 12, 4, 96, torch.float16),
])
def test_gpu_varlen_vs_sdpa_per_sequence(use_backend, lengths, HQ, HKV, D, dtype):
    use_backend("auto")
    (q, k, v), cu, _ = packed(lengths, HQ, HKV, D, dtype, device="cuda")
    o = apr_kernels.attention(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths))
    do = torch.randn_like(o)
    o.backward(do)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a == b:
            continue
        qs, ks, vs = (t.detach()[a:b].float().transpose(0, 1).requires_grad_() for t in (q, k, v))
        want = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
        want.backward(do[a:b].float().transpose(0, 1))
        assert_close(o[a:b], want.transpose(0, 1), REL[dtype], f"o[{a}:{b}]")
        for name, t, ref in zip("qkv", (q, k, v), (qs, ks, vs)):
            assert_close(t.grad[a:b], ref.grad.transpose(0, 1), 2 * REL[dtype], f"d{name}[{a}:{b}]")


def test_module_takes_packed_sequences(use_backend):
    from apr_kernels.nn import Attention

    use_backend("auto")
    (q, k, v), cu, _ = packed((7, 12), 6, 3, 20, torch.float32)
    layer = Attention(causal=False, scale=0.4)
    got = layer(q, k, v, cu_seqlens=cu, max_seqlen=12)
    want, _, _ = per_sequence_oracle(q.detach(), k.detach(), v.detach(), cu, False, 0.4, torch.zeros_like(q))
    assert_close(got, want, REL[torch.float32], "nn.Attention packed")
