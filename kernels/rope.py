"""Rotary position embedding of q and k in one Triton pass (forward, and backward as the inverse).

For a token at position p and a pair (x1, x2) of its head vector with frequency index j::

    out1 = x1 * cos[p, j] - x2 * sin[p, j]
    out2 = x2 * cos[p, j] + x1 * sin[p, j]

rope_type 2 (NEOX / Hugging Face ``rotate_half``) pairs dimension j with j + D/2; rope_type 0
(llama.cpp order) pairs 2j with 2j + 1. The rotation is orthogonal, so the backward is the same
kernel with sin negated (``inverse=True``): nothing but the [S, D/2] tables is kept for it, where
eager autograd keeps the tables expanded to D and several intermediate [B, S, H, D] tensors.

Numerics: cos/sin as given (the model passes them rounded to q's dtype, as Hugging Face does), the
products and sums in fp32, rounded once to q's dtype (eager rounds after each of its ops).

Layout: q ``[B, S, Hq, D]``, k ``[B, S, Hkv, D]`` with any strides for B, S and H and a contiguous
last dim (the projections' views); cos/sin ``[S, D/2]`` contiguous. One program per token rotates all
of its q and k heads (a [heads, D/2] tile each); outputs are new contiguous tensors.

Launcher: ``rope_fwd(q, k, cos, sin, rope_type, inverse=False) -> (q_out, k_out)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _rotate_heads(X, OUT, x_off, o_off, stride_h, stride_oh, H, c, s, j, d1, d2, jmask,
                  BLOCK_H: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    mask = (heads < H)[:, None] & jmask[None, :]
    rows = x_off + heads[:, None].to(tl.int64) * stride_h
    x1 = tl.load(X + rows + d1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + rows + d2[None, :], mask=mask, other=0.0).to(tl.float32)
    out_rows = o_off + heads[:, None].to(tl.int64) * stride_oh
    tl.store(OUT + out_rows + d1[None, :], (x1 * c - x2 * s).to(OUT.dtype.element_ty), mask=mask)
    tl.store(OUT + out_rows + d2[None, :], (x2 * c + x1 * s).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q, K, QO, KO, COS, SIN,
    stride_qb, stride_qs, stride_qh,  # q strides (elements) for B, S, H; D is contiguous
    stride_kb, stride_ks, stride_kh,
    S, HQ, HKV, HALF,  # HALF = D / 2
    SIGN,  # +1.0 forward, -1.0 inverse (the backward)
    NEOX: tl.constexpr,  # rope_type 2 (pairs j, j + D/2) else rope_type 0 (pairs 2j, 2j + 1)
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    tok = tl.program_id(0)
    b = tok // S
    p = tok % S
    j = tl.arange(0, BLOCK_HALF)
    jmask = j < HALF
    c = tl.load(COS + p * HALF + j, mask=jmask, other=0.0).to(tl.float32)[None, :]
    s = tl.load(SIN + p * HALF + j, mask=jmask, other=0.0).to(tl.float32)[None, :] * SIGN
    if NEOX:
        d1, d2 = j, j + HALF
    else:
        d1, d2 = 2 * j, 2 * j + 1
    b64, p64 = b.to(tl.int64), p.to(tl.int64)
    # outputs are contiguous [B, S, H, D]: token `tok` starts at tok * H * D
    _rotate_heads(Q, QO, b64 * stride_qb + p64 * stride_qs, tok.to(tl.int64) * HQ * 2 * HALF, stride_qh,
                  2 * HALF, HQ, c, s, j, d1, d2, jmask, BLOCK_HQ)
    _rotate_heads(K, KO, b64 * stride_kb + p64 * stride_ks, tok.to(tl.int64) * HKV * 2 * HALF, stride_kh,
                  2 * HALF, HKV, c, s, j, d1, d2, jmask, BLOCK_HKV)


def launch_warps(hq: int, half: int) -> int:
    """Warps per token: about 8 pairs per thread of the larger (q) tile. Not yet tuned on a GPU."""
    pairs = triton.next_power_of_2(hq) * triton.next_power_of_2(half)
    return max(1, min(8, pairs // 256))


def rope_fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_type: int,
             inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    B, S, HQ, D = q.shape
    HKV = k.shape[2]
    if q.stride(3) != 1:
        q = q.contiguous()
    if k.stride(3) != 1:
        k = k.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    qo = torch.empty((B, S, HQ, D), dtype=q.dtype, device=q.device)
    ko = torch.empty((B, S, HKV, D), dtype=k.dtype, device=k.device)
    if B * S == 0:
        return qo, ko
    half = D // 2
    _rope_kernel[(B * S,)](
        q, k, qo, ko, cos, sin,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        S, HQ, HKV, half, -1.0 if inverse else 1.0,
        NEOX=rope_type == 2, BLOCK_HQ=triton.next_power_of_2(HQ), BLOCK_HKV=triton.next_power_of_2(HKV),
        BLOCK_HALF=triton.next_power_of_2(half), num_warps=launch_warps(HQ, half),
    )
    return qo, ko
