"""Sliding-window attention (``window=W``: query i sees keys i - W + 1 .. i, Mistral's
``sliding_window``): the Triton kernels in the interpreter and the reference path, forward and all
three gradients, dense and packed, against an fp64 oracle written here; the block skipping is
checked by windows smaller than, equal to and larger than the tiles, ragged lengths and GQA."""

import pytest
import torch

import apr_kernels
from test_attention import REL, assert_close, make
from kernel_helpers import kernel_module


def oracle(q, k, v, window, scale):
    """fp64 softmax attention over repeat_interleave'd K/V with an explicit band mask."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    G = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    S = q.shape[1]
    i = torch.arange(S)[:, None]
    j = torch.arange(S)[None, :]
    visible = (j <= i) & (j > i - window)
    s = torch.einsum("bshd,bthd->bhst", q, kk) * scale
    s = s.masked_fill(~visible, float("-inf"))
    o = torch.einsum("bhst,bthd->bshd", torch.softmax(s, -1), vv)
    return o, (q, k, v)


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
@pytest.mark.parametrize("S, window, tile, hq, hkv", [
    (100, 1, 16, 2, 2),     # only the diagonal
    (100, 7, 16, 2, 2),     # window inside one tile
    (100, 16, 16, 2, 2),    # window == tile
    (100, 40, 16, 2, 2),    # window spans several tiles: skipped, edge-masked and full blocks
    (77, 33, 32, 2, 2),     # ragged length, window not a multiple of the tile
    (64, 64, 16, 2, 2),     # window == S: plain causal
    (50, 500, 16, 2, 2),    # window past S: plain causal
    # GQA (3 query heads a K/V head) where the window's blocks are of every kind: the block skipping
    # does not depend on the heads (few heads and cases: the interpreter is slow)
    (100, 40, 16, 3, 1),
    (77, 33, 32, 3, 1),
    (100, 1, 16, 3, 1),
])
def test_window_matches_oracle(use_backend, backend_name, S, window, tile, hq, hkv):
    use_backend(backend_name)
    q, k, v = make(1, S, hq, hkv, 16, torch.float32)
    cfg = {"BLOCK_M": tile, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    if backend_name == "triton":
        kern = kernel_module("attention")
        nan = float("nan")  # poisoned outputs: an element the kernels skip stays NaN and fails the check
        poison = [torch.full(t.shape, nan) for t in (q, q, k, v)] + [torch.full((1, hq, S), nan)]
        o, lse = kern.attention_fwd(q.detach(), k.detach(), v.detach(), True, 0.25, config=cfg, window=window,
                                    out=poison[0], lse=poison[4])
        do = torch.randn_like(o)
        grads = kern.attention_bwd(do, q.detach(), k.detach(), v.detach(), o, lse, True, 0.25, window=window,
                                   config={"dkdv": {**cfg, "BLOCK_M": 16, "BLOCK_N": tile}, "dq": cfg},
                                   dq=poison[1], dk=poison[2], dv=poison[3])
        assert torch.isfinite(lse).all()
    else:
        o = apr_kernels.attention(q, k, v, scale=0.25, window=window)
        do = torch.randn_like(o)
        o.backward(do)
        grads = (q.grad, k.grad, v.grad)
    want, leaves = oracle(q, k, v, window, 0.25)
    want.backward(do.double())
    assert_close(o, want, REL[torch.float32], f"o (S={S}, window={window})")
    for name, g, ref in zip("qkv", grads, leaves):
        assert_close(g, ref.grad, 2 * REL[torch.float32], f"d{name} (S={S}, window={window})")


def test_window_through_the_public_op_fp16_and_layouts(use_backend):
    """fp16 in the interpreter, the [B, H, S, D] layout through strides, autograd through the op."""
    use_backend("triton")
    q, k, v = make(1, 45, 6, 2, 32, torch.float16, layout="bhsd")
    o = apr_kernels.attention(q, k, v, window=9)
    do = torch.randn_like(o)
    o.backward(do)
    want, leaves = oracle(q, k, v, 9, 32 ** -0.5)
    want.backward(do.double())
    assert_close(o, want, REL[torch.float16], "o")
    for name, t, ref in zip("qkv", (q, k, v), leaves):
        assert_close(t.grad, ref.grad, 2 * REL[torch.float16], f"d{name}")


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
def test_window_with_packed_sequences(use_backend, backend_name):
    """Each packed sequence gets its own window from its own first row: the same as alone."""
    use_backend(backend_name)
    lengths = (13, 1, 40, 0, 27)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    T = int(cu[-1])
    q, k, v = (torch.randn(T, h, 16, requires_grad=True) for h in (4, 2, 2))
    o = apr_kernels.attention(q, k, v, cu_seqlens=cu, window=6)
    do = torch.randn_like(o)
    o.backward(do)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if a == b:
            continue
        want, leaves = oracle(q[None, a:b], k[None, a:b], v[None, a:b], 6, 0.25)
        want.backward(do[None, a:b].double())
        assert_close(o[None, a:b], want, REL[torch.float32], f"o of sequence {a}:{b}")
        assert_close(q.grad[None, a:b], leaves[0].grad, 2 * REL[torch.float32], f"dq of {a}:{b}")
        assert_close(k.grad[None, a:b], leaves[1].grad, 2 * REL[torch.float32], f"dk of {a}:{b}")


def test_window_errors_name_the_constraint():
    q, k, v = make(1, 8, 2, 1, 16, torch.float32)
    with pytest.raises(ValueError, match="needs causal=True"):
        apr_kernels.attention(q, k, v, causal=False, window=4)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(TypeError, match="window must be a positive int"):
            apr_kernels.attention(q, k, v, window=bad)


@pytest.mark.parametrize("name", ["triton", "reference"])
def test_opcheck_with_window(use_backend, name):
    use_backend(name)
    q, k, v = make(1, 19, 2, 1, 16, torch.float32)
    torch.library.opcheck(torch.ops.apr.attention_fwd.default, (q, k, v, True, 0.25, 5))
    o, lse = torch.ops.apr.attention_fwd(q.detach(), k.detach(), v.detach(), True, 0.25, 5)
    args = (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, lse, None, True, 0.25, 5)
    torch.library.opcheck(torch.ops.apr.attention_bwd.default, args)


@pytest.mark.cuda
@pytest.mark.parametrize("hq, hkv, d, S, window", [(32, 8, 128, 2048, 512), (14, 2, 64, 1500, 333)])
def test_gpu_bf16_window_matches_fp32_sdpa(use_backend, hq, hkv, d, S, window):
    """bf16 on the GPU at model shapes against fp32 SDPA with the band mask (expanded K/V)."""
    use_backend("auto")
    q, k, v = make(2, S, hq, hkv, d, torch.bfloat16, device="cuda")
    o = apr_kernels.attention(q, k, v, window=window)
    do = torch.randn_like(o)
    o.backward(do)
    i = torch.arange(S, device="cuda")[:, None]
    j = torch.arange(S, device="cuda")[None, :]
    band = (j <= i) & (j > i - window)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    g = hq // hkv
    qt, kt, vt = (t.transpose(1, 2) for t in leaves)
    want = torch.nn.functional.scaled_dot_product_attention(
        qt, kt.repeat_interleave(g, 1), vt.repeat_interleave(g, 1), attn_mask=band).transpose(1, 2)
    want.backward(do.float())
    assert_close(o, want, REL[torch.bfloat16], "o")
    for name, t, ref in zip("qkv", (q, k, v), leaves):
        assert_close(t.grad, ref.grad, 2 * REL[torch.bfloat16], f"d{name}")
