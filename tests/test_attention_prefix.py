"""Attention of a chunk of queries against a longer run of keys (k/v ``[B, Sk, Hkv, D]`` with Sk > Sq;
causal is bottom-right aligned: the queries are the last Sq positions, as FlashAttention >= 2.1):
the Triton kernels in the interpreter and the reference path, forward and all three gradients,
against an fp64 oracle written here with an explicit position mask. Offsets aligned and not aligned
to the tiles, ragged lengths, GQA, sliding windows and poisoned outputs (nothing skipped, nothing
written out of bounds)."""

import pytest
import torch

import apr_kernels
from kernel_helpers import kernel_module
from test_attention import REL, assert_close


def oracle(q, k, v, causal, scale, window=0):
    """fp64 softmax over repeat_interleave'd K/V; query i stands at key position i + Sk - Sq."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    G = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    s = torch.einsum("bshd,bthd->bhst", q, kk) * scale
    if causal:
        pos = torch.arange(q.shape[1])[:, None] + (k.shape[1] - q.shape[1])
        j = torch.arange(k.shape[1])[None, :]
        visible = j <= pos
        if window:
            visible &= j > pos - window
        s = s.masked_fill(~visible, float("-inf"))
    o = torch.einsum("bhst,bthd->bshd", torch.softmax(s, -1), vv)
    return o, (q, k, v)


def make(B, SQ, SK, HQ, HKV, D, dtype=torch.float32):
    q = torch.randn(B, SQ, HQ, D).to(dtype).requires_grad_()
    k = torch.randn(B, SK, HKV, D).to(dtype).requires_grad_()
    v = torch.randn(B, SK, HKV, D).to(dtype).requires_grad_()
    return q, k, v


def check(q, k, v, o, grads, do, causal, scale, window=0, rel=REL[torch.float32]):
    want, leaves = oracle(q, k, v, causal, scale, window)
    want.backward(do.double())
    assert_close(o, want, rel, "o")
    for name, g, ref in zip("qkv", grads, leaves):
        assert_close(g, ref.grad, 2 * rel, f"d{name}")


CASES = [  # (Sq, Sk, BLOCK_M, BLOCK_N): forward/dq tiles; the dK/dV kernel runs BLOCK_N=16 x BLOCK_M tiles
    (16, 48, 16, 16),   # offset a multiple of the tiles
    (20, 57, 16, 16),   # ragged both, offset 37 not aligned
    (32, 40, 32, 16),   # offset smaller than a tile
    (7, 100, 16, 16),   # a few queries far down a long run of keys
    (33, 33, 16, 16),   # Sq == Sk: the usual self-attention
    (64, 130, 32, 16),  # several query blocks, diagonal band over three key blocks
]


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("sq, sk, bm, bn", CASES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq, hkv", [(2, 1), (3, 1)])  # (GQA groups of 2, 3; few heads: the interpreter is slow)
def test_prefix_matches_oracle(use_backend, backend_name, sq, sk, bm, bn, causal, hq, hkv):
    use_backend(backend_name)
    q, k, v = make(2, sq, sk, hq, hkv, 16)
    scale = 0.3
    if backend_name == "triton":
        kern = kernel_module("attention")
        nan = float("nan")  # poisoned outputs: an element the kernels skip stays NaN and fails the check
        cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": 4, "num_stages": 1}
        o, lse = kern.attention_fwd(q.detach(), k.detach(), v.detach(), causal, scale, config=cfg,
                                    out=torch.full(q.shape, nan), lse=torch.full((2, hq, sq), nan))
        assert torch.isfinite(lse).all()
        do = torch.randn_like(o)
        grads = kern.attention_bwd(do, q.detach(), k.detach(), v.detach(), o, lse, causal, scale,
                                   config={"dkdv": {**cfg, "BLOCK_M": 16, "BLOCK_N": bm}, "dq": cfg},
                                   dq=torch.full(q.shape, nan), dk=torch.full(k.shape, nan),
                                   dv=torch.full(v.shape, nan))
    else:
        o = apr_kernels.attention(q, k, v, causal=causal, scale=scale)
        do = torch.randn_like(o)
        o.backward(do)
        grads = (q.grad, k.grad, v.grad)
    check(q, k, v, o, grads, do, causal, scale)


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("sq, sk, window", [(16, 64, 8), (20, 57, 30), (24, 40, 100), (9, 70, 1)])
def test_prefix_with_window(use_backend, backend_name, sq, sk, window):
    use_backend(backend_name)
    q, k, v = make(1, sq, sk, 4, 2, 16)
    o = apr_kernels.attention(q, k, v, causal=True, scale=0.25, window=window)
    do = torch.randn_like(o)
    o.backward(do)
    check(q, k, v, o, (q.grad, k.grad, v.grad), do, True, 0.25, window)


def test_prefix_fp16_through_the_public_op(use_backend):
    use_backend("triton")
    q, k, v = make(1, 24, 56, 4, 1, 32, torch.float16)
    o = apr_kernels.attention(q, k, v)
    do = torch.randn_like(o)
    o.backward(do)
    check(q, k, v, o, (q.grad, k.grad, v.grad), do, True, 32 ** -0.5, rel=REL[torch.float16])


@pytest.mark.parametrize("causal", [True, False])
def test_prefix_head_dim_80_padded_inside_the_kernel(use_backend, causal):
    """A head_dim that is no power of two (padded to 128 with a d-mask) with an unaligned offset."""
    use_backend("triton")
    q, k, v = make(1, 19, 50, 2, 1, 80)
    o = apr_kernels.attention(q, k, v, causal=causal)
    do = torch.randn_like(o)
    o.backward(do)
    check(q, k, v, o, (q.grad, k.grad, v.grad), do, causal, 80 ** -0.5)


def test_chunks_against_their_prefixes_equal_whole_sequence_attention(use_backend):
    """The use it exists for: each chunk of a causal sequence against the keys up to its end gives
    that chunk's rows of whole-sequence attention (context parallelism, prefill after a cache)."""
    use_backend("triton")
    q, k, v = make(1, 64, 64, 4, 2, 16)
    whole = apr_kernels.attention(q, k, v)
    parts = [apr_kernels.attention(q[:, a:a + 16], k[:, :a + 16], v[:, :a + 16]) for a in range(0, 64, 16)]
    assert_close(torch.cat(parts, 1), whole, REL[torch.float32], "chunked")


def test_prefix_errors_name_the_shapes():
    q, k, v = make(1, 8, 4, 2, 2, 16)
    with pytest.raises(ValueError, match=r"at least as many keys as queries.*q shape \[1, 8, 2, 16\]"):
        apr_kernels.attention(q, k, v)
    q, k, v = make(1, 8, 0, 2, 2, 16)
    with pytest.raises(ValueError, match=r"k has no keys"):
        apr_kernels.attention(q, k, v, causal=False)
    t = torch.randn(10, 2, 16)
    with pytest.raises(ValueError, match=r"with cu_seqlens, k's token count must equal q's"):
        apr_kernels.attention(t, torch.randn(12, 2, 16), torch.randn(12, 2, 16),
                              cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))


# --------------------------------------------------------- packed queries with their own key spans
def packed_case(pairs, hq=4, hkv=2, D=16, dtype=torch.float32):
    """q ``[Tq, Hq, D]`` and k, v ``[Tk, Hkv, D]`` for sequences of (queries, keys) ``pairs``."""
    nq, nk = [a for a, _ in pairs], [b for _, b in pairs]
    cu_q = torch.tensor([0] + list(torch.tensor(nq).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(nk).cumsum(0)), dtype=torch.int32)
    q = torch.randn(sum(nq), hq, D).to(dtype).requires_grad_()
    k = torch.randn(sum(nk), hkv, D).to(dtype).requires_grad_()
    v = torch.randn(sum(nk), hkv, D).to(dtype).requires_grad_()
    return q, k, v, cu_q, cu_k


def packed_oracle(q, k, v, cu_q, cu_k, do, causal, scale, window=0):
    """Each sequence alone through the dense fp64 oracle above: (o, dq, dk, dv)."""
    o = torch.zeros(q.shape, dtype=torch.float64)
    grads = [torch.zeros(t.shape, dtype=torch.float64) for t in (q, k, v)]
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for a, b, c, d in zip(bq[:-1], bq[1:], bk[:-1], bk[1:]):
        if b == a:
            continue
        oi, leaves = oracle(q[None, a:b], k[None, c:d], v[None, c:d], causal, scale, window)
        oi.backward(do[None, a:b].double())
        o[a:b] = oi[0].detach()
        for g, leaf, (lo, hi) in zip(grads, leaves, ((a, b), (c, d), (c, d))):
            g[lo:hi] = leaf.grad[0]
    return o, grads


PACKED = [  # (queries, keys) per sequence: tile-unaligned offsets, a sequence without queries,
    [(5, 20), (16, 16), (0, 9), (23, 61), (1, 1)],  # one without extra keys, a single query
    [(40, 40), (3, 70)],
]


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("pairs", PACKED, ids=["mixed", "long-prefix"])
@pytest.mark.parametrize("causal, window", [(True, 0), (False, 0), (True, 9)])
def test_packed_keys_with_their_own_spans(use_backend, backend_name, pairs, causal, window):
    """cu_seqlens_k (flash_attn_varlen_func's cu_seqlens_q/cu_seqlens_k): each packed sequence's
    queries against its own run of keys, bottom-right aligned; = every sequence alone."""
    use_backend(backend_name)
    q, k, v, cu_q, cu_k = packed_case(pairs)
    o = apr_kernels.attention(q, k, v, causal=causal, scale=0.3, cu_seqlens=cu_q, cu_seqlens_k=cu_k,
                              window=window or None)
    do = torch.randn_like(o)
    o.backward(do)
    want, grads = packed_oracle(q, k, v, cu_q, cu_k, do, causal, 0.3, window)
    rel = REL[torch.float32]
    assert_close(o, want, rel, "o")
    for name, got, ref in zip("qkv", (q.grad, k.grad, v.grad), grads):
        assert_close(got, ref, 2 * rel, f"d{name}")


def test_packed_keys_kernels_write_everything_in_bounds(use_backend):
    """Poisoned outputs and small tiles: every element written, nothing past the spans touched."""
    kern = kernel_module("attention")
    q, k, v, cu_q, cu_k = packed_case(PACKED[0])
    nan = float("nan")
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    mq, mk = 23, 61
    o, lse = kern.attention_fwd(q.detach(), k.detach(), v.detach(), True, 0.3, config=cfg, cu_seqlens=cu_q,
                                max_seqlen=mq, cu_seqlens_k=cu_k, max_seqlen_k=mk,
                                out=torch.full(q.shape, nan), lse=torch.full((4, q.shape[0]), nan))
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    do = torch.randn_like(o)
    grads = kern.attention_bwd(do, q.detach(), k.detach(), v.detach(), o, lse, True, 0.3, config={"dkdv": cfg, "dq": cfg},
                               cu_seqlens=cu_q, max_seqlen=mq, cu_seqlens_k=cu_k, max_seqlen_k=mk,
                               dq=torch.full(q.shape, nan), dk=torch.full(k.shape, nan), dv=torch.full(v.shape, nan))
    want, ref = packed_oracle(q, k, v, cu_q, cu_k, do, True, 0.3)
    assert_close(o, want, REL[torch.float32], "o")
    for name, got, r in zip("qkv", grads, ref):
        assert_close(got, r, 2 * REL[torch.float32], f"d{name}")


def test_packed_keys_errors():
    q, k, v, cu_q, cu_k = packed_case([(5, 3), (4, 8)])
    with pytest.raises(ValueError, match=r"at least as many keys as queries in every sequence.*sequence 0 has 5 "
                                         r"queries and 3 keys"):
        apr_kernels.attention(q, k, v, cu_seqlens=cu_q, cu_seqlens_k=cu_k)
    with pytest.raises(ValueError, match=r"cu_seqlens_k must hold as many sequences as cu_seqlens \(2\); got 1"):
        apr_kernels.attention(q, k, v, cu_seqlens=cu_q, cu_seqlens_k=torch.tensor([0, 11], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens_k must rise from 0 to the key count 11"):
        apr_kernels.attention(q, k, v, cu_seqlens=cu_q, cu_seqlens_k=torch.tensor([0, 3, 10], dtype=torch.int32),
                              causal=False)
    with pytest.raises(ValueError, match=r"max_seqlen_k is only meaningful with cu_seqlens_k"):
        apr_kernels.attention(q, k[:9], v[:9], cu_seqlens=cu_q, max_seqlen_k=4)


# ------------------------------------------------------------------------------------------ GPU
def _sdpa_fp32(q, k, v, visible, do):
    """fp32 SDPA with an explicit mask on expanded K/V: (o, dq, dk, dv)."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    g = q.shape[2] // k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in leaves)
    o = torch.nn.functional.scaled_dot_product_attention(
        qt, kt.repeat_interleave(g, 1), vt.repeat_interleave(g, 1), attn_mask=visible).transpose(1, 2)
    o.backward(do.float())
    return o, [t.grad for t in leaves]


@pytest.mark.cuda
@pytest.mark.parametrize("hq, hkv, d, sq, sk, window", [(32, 8, 128, 1024, 4096, None), (14, 2, 64, 777, 2100, 500)])
def test_gpu_bf16_prefix_matches_fp32_sdpa(use_backend, hq, hkv, d, sq, sk, window):
    """bf16 at model shapes: a chunk of queries against its prefix (bottom-right), fp32 SDPA oracle."""
    use_backend("auto")
    q = torch.randn(2, sq, hq, d, device="cuda").bfloat16().requires_grad_()
    k, v = (torch.randn(2, sk, hkv, d, device="cuda").bfloat16().requires_grad_() for _ in range(2))
    o = apr_kernels.attention(q, k, v, window=window)
    do = torch.randn_like(o)
    o.backward(do)
    i = torch.arange(sq, device="cuda")[:, None] + (sk - sq)
    j = torch.arange(sk, device="cuda")[None, :]
    visible = (j <= i) & ((j > i - window) if window else True)
    want, grads = _sdpa_fp32(q, k, v, visible, do)
    assert_close(o, want, REL[torch.bfloat16], "o")
    for name, t, ref in zip("qkv", (q, k, v), grads):
        assert_close(t.grad, ref, 2 * REL[torch.bfloat16], f"d{name}")


@pytest.mark.cuda
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_bf16_packed_keys_match_per_sequence_sdpa(use_backend, d):
    """bf16 packed queries with their own key spans (the 8-warp dK/dV launch at D 128) against fp32
    SDPA per sequence."""
    use_backend("auto")
    pairs = [(100, 700), (0, 50), (333, 333), (64, 1000), (1, 9)]
    q, k, v, cu_q, cu_k = packed_case(pairs, 8, 2, d, torch.bfloat16)
    q, k, v = (t.detach().cuda().requires_grad_() for t in (q, k, v))
    o = apr_kernels.attention(q, k, v, cu_seqlens=cu_q.cuda(), cu_seqlens_k=cu_k.cuda(), max_seqlen=333,
                              max_seqlen_k=1000)
    do = torch.randn_like(o)
    o.backward(do)
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for a, b, c, e in zip(bq[:-1], bq[1:], bk[:-1], bk[1:]):
        if b == a:  # keys no query sees: zero gradients
            assert not k.grad[c:e].any() and not v.grad[c:e].any()
            continue
        i = torch.arange(b - a, device="cuda")[:, None] + (e - c) - (b - a)
        visible = torch.arange(e - c, device="cuda")[None, :] <= i
        want, grads = _sdpa_fp32(q[None, a:b], k[None, c:e], v[None, c:e], visible, do[None, a:b])
        assert_close(o[None, a:b], want, REL[torch.bfloat16], f"o of sequence {a}:{b}")
        for name, t, ref, (lo, hi) in zip("qkv", (q, k, v), grads, ((a, b), (c, e), (c, e))):
            assert_close(t.grad[None, lo:hi], ref, 2 * REL[torch.bfloat16], f"d{name} of sequence {a}:{b}")
