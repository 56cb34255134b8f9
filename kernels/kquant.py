"""The k-quant searches of Q4_K, Q5_K and Q6_K in Triton: llama.cpp's reference arithmetic on a GPU.

``quant.py``'s torch searches repeat llama.cpp's ``make_qkx2_quants`` (Q4_K; Q5_K, GGUF export only,
the same with 5-bit levels) and ``make_qx_quants`` (Q6_K) operation for operation in float32, so the blocks are llama-quantize's byte for byte; on a GPU
their hundreds of small steps per chunk each cost a kernel launch (``train --qat`` quantises every
weight each step). Here one program fits ``BLOCK`` sub-blocks, one a lane, with the same loops in
registers and the same float32 operations in the same order:

* values read column by column (``x[i]`` of every lane), every sum accumulated left to right;
* divisions and square roots correctly rounded (``div_rn``, ``sqrt_rn``), round-half-to-even by
  llama.cpp's own trick (``(v + 1.5 * 2**23) - 1.5 * 2**23``, exact for |v| < 2**22);
* no fused multiply-adds: launched with ``enable_fp_fusion=False``.

Outputs per sub-block are what the torch searches return: scale, offset (Q4_K) and the levels of
the grid kept. ``tests/test_quant.py`` checks them equal, bit for bit, under the interpreter.

Launchers: ``q4_k_fit(sub)`` (``q5_k_fit(sub)``) for ``sub`` [N, 32] -> (scale [N], min [N], levels [N, 32]);
``q6_k_fit(sub)`` for ``sub`` [N, 16] -> (scale [N], levels + 32 [N, 16]); float32 in and out.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32,)
BLOCK = 128  # sub-blocks a program (one a lane)
GROUP_MAX_EPS = 1e-15  # llama.cpp's: a sub-block of smaller magnitudes is all zero


@triton.jit
def _rint(v):  # 1.5 * 2**23 added and taken away: v rounded to an integer, half to even
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _q4_levels(x_ptr, i, iscale, lo, mask, NMAX: tl.constexpr):
    x = tl.load(x_ptr + i, mask=mask, other=0.0)
    return x, tl.minimum(tl.maximum(_rint(iscale * (x - lo)), 0.0), NMAX)


@triton.jit
def _q4_k_fit_kernel(x_ptr, steps_ptr, scale_ptr, min_ptr, levels_ptr, n_sub, NMAX: tl.constexpr,
                     N_STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """Q4_K's search (NMAX 15, 21 grids); Q5_K's with NMAX 31 and its 16 grids."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_sub
    row = x_ptr + offs.to(tl.int64) * 32
    x0 = tl.load(row, mask=mask, other=0.0)
    lo = x0
    hi = x0
    sum_x2 = tl.zeros([BLOCK], tl.float32)
    for i in range(32):
        x = tl.load(row + i, mask=mask, other=0.0)
        sum_x2 += x * x
        lo = tl.where(x < lo, x, lo)
        hi = tl.where(x > hi, x, hi)
    av = tl.sqrt_rn(tl.div_rn(sum_x2, 32.0))  # weights av + |x|: the large values count more
    lo = tl.where(lo > 0.0, 0.0, lo)
    flat = hi == lo
    sum_w = tl.zeros([BLOCK], tl.float32)
    sum_x = tl.zeros([BLOCK], tl.float32)
    for i in range(32):
        x = tl.load(row + i, mask=mask, other=0.0)
        w = av + tl.abs(x)
        sum_w += w
        sum_x += w * x
    # the min/max grid
    iscale = tl.div_rn(tl.full([BLOCK], NMAX, tl.float32), tl.where(flat, 1.0, hi - lo))
    scale = tl.div_rn(tl.full([BLOCK], 1.0, tl.float32), iscale)
    best = tl.zeros([BLOCK], tl.float32)
    for i in range(32):
        x, lv = _q4_levels(row, i, iscale, lo, mask, NMAX)
        diff = (scale * lv + lo) - x
        best += (av + tl.abs(x)) * (diff * diff)
    keep_iscale = iscale
    keep_lo = lo
    offset = lo
    for k in range(N_STEPS):  # grids of NMAX - 1 + k/10 levels (Q5_K: - 0.5) from the offset to the maximum
        step = tl.load(steps_ptr + k)
        rng = hi - offset
        iscale = tl.div_rn(tl.zeros([BLOCK], tl.float32) + step, tl.where(flat | (rng == 0.0), 1.0, rng))
        sum_l = tl.zeros([BLOCK], tl.float32)
        sum_l2 = tl.zeros([BLOCK], tl.float32)
        sum_xl = tl.zeros([BLOCK], tl.float32)
        for i in range(32):
            x, lv = _q4_levels(row, i, iscale, offset, mask, NMAX)
            wl = (av + tl.abs(x)) * lv
            sum_l += wl
            sum_l2 += wl * lv
            sum_xl += wl * x
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0.0
        det = tl.where(ok, det, 1.0)
        a = tl.div_rn(sum_w * sum_xl - sum_x * sum_l, det)
        b = tl.div_rn(sum_l2 * sum_x - sum_l * sum_xl, det)
        clamp = b > 0.0  # a positive offset is not representable: refit the scale alone
        a = tl.where(clamp, tl.div_rn(sum_xl, tl.where(sum_l2 != 0.0, sum_l2, 1.0)), a)
        b = tl.where(clamp, 0.0, b)
        err = tl.zeros([BLOCK], tl.float32)
        for i in range(32):
            x, lv = _q4_levels(row, i, iscale, offset, mask, NMAX)
            diff = (a * lv + b) - x
            err += (av + tl.abs(x)) * (diff * diff)
        take = ok & (err < best) & (flat == 0)
        best = tl.where(take, err, best)
        scale = tl.where(take, a, scale)
        keep_iscale = tl.where(take, iscale, keep_iscale)
        keep_lo = tl.where(take, offset, keep_lo)
        offset = tl.where(take, b, offset)
    tl.store(scale_ptr + offs, tl.where(flat, 0.0, scale), mask=mask)
    tl.store(min_ptr + offs, tl.where(flat, -lo, -offset), mask=mask)
    for i in range(32):
        x, lv = _q4_levels(row, i, keep_iscale, keep_lo, mask, NMAX)
        tl.store(levels_ptr + offs.to(tl.int64) * 32 + i, tl.where(flat, 0.0, lv), mask=mask)


@triton.jit
def _q6_grid(row, numerator, peak, mask, BLOCK: tl.constexpr):
    iscale = tl.div_rn(tl.zeros([BLOCK], tl.float32) + numerator, peak)
    sumlx = tl.zeros([BLOCK], tl.float32)
    suml2 = tl.zeros([BLOCK], tl.float32)
    for i in range(16):
        x = tl.load(row + i, mask=mask, other=0.0)
        lv = tl.minimum(tl.maximum(_rint(iscale * x), -32.0), 31.0)
        w = x * x
        sumlx += (w * x) * lv
        suml2 += (w * lv) * lv
    return iscale, sumlx, suml2


@triton.jit
def _q6_k_fit_kernel(x_ptr, numerators_ptr, scale_ptr, levels_ptr, n_sub, EPS: tl.constexpr,
                     BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_sub
    row = x_ptr + offs.to(tl.int64) * 16
    amax = tl.zeros([BLOCK], tl.float32)
    peak = tl.zeros([BLOCK], tl.float32)
    for i in range(16):  # the value of largest magnitude, the first of equals
        x = tl.load(row + i, mask=mask, other=0.0)
        larger = tl.abs(x) > amax
        amax = tl.where(larger, tl.abs(x), amax)
        peak = tl.where(larger, x, peak)
    zero = amax < EPS
    peak = tl.where(zero, 1.0, peak)
    iscale, sumlx, suml2 = _q6_grid(row, tl.load(numerators_ptr), peak, mask, BLOCK)  # 32 levels first
    scale = tl.where(suml2 != 0.0, tl.div_rn(sumlx, tl.where(suml2 != 0.0, suml2, 1.0)), 0.0)
    best = scale * sumlx
    keep = iscale
    for j in range(1, 19):  # then 32 + k/10 levels, k = -9..-1, 1..9
        iscale, sumlx, suml2 = _q6_grid(row, tl.load(numerators_ptr + j), peak, mask, BLOCK)
        better = (suml2 > 0.0) & (sumlx * sumlx > best * suml2)
        scale = tl.where(better, tl.div_rn(sumlx, tl.where(suml2 > 0.0, suml2, 1.0)), scale)
        best = tl.where(better, scale * sumlx, best)
        keep = tl.where(better, iscale, keep)
    tl.store(scale_ptr + offs, tl.where(zero, 0.0, scale), mask=mask)
    for i in range(16):
        x = tl.load(row + i, mask=mask, other=0.0)
        lv = tl.minimum(tl.maximum(_rint(keep * x), -32.0), 31.0) + 32.0
        tl.store(levels_ptr + offs.to(tl.int64) * 16 + i, tl.where(zero, 0.0, lv), mask=mask)


def q4_k_fit(sub: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, min, levels) of each 32-value row of ``sub`` (float32 [N, 32]): quant._fit_q4_sub_blocks."""
    from apr_kernels.quant import Q4_K_STEPS

    return _qkx2_fit(sub, 15.0, Q4_K_STEPS)


def q5_k_fit(sub: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q5_K's (5-bit levels): quant._fit_q4_sub_blocks(sub, 31, Q5_K_STEPS)."""
    from apr_kernels.quant import Q5_K_STEPS

    return _qkx2_fit(sub, 31.0, Q5_K_STEPS)


def _qkx2_fit(sub: torch.Tensor, nmax: float, grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sub = sub.contiguous()
    n = sub.shape[0]
    steps = torch.stack(grid).to(sub.device)
    scale, mins = torch.empty(n, device=sub.device), torch.empty(n, device=sub.device)
    levels = torch.empty(n, 32, device=sub.device)
    if n:
        _q4_k_fit_kernel[(triton.cdiv(n, BLOCK),)](sub, steps, scale, mins, levels, n, NMAX=nmax, N_STEPS=len(grid),
                                                   BLOCK=BLOCK, num_warps=4, enable_fp_fusion=False)
    return scale, mins, levels


def q6_k_fit(sub: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, levels + 32) of each 16-value row of ``sub`` (float32 [N, 16]): quant._fit_q6_sub_blocks."""
    sub = sub.contiguous()
    n = sub.shape[0]
    from apr_kernels.quant import Q6_K_NUMERATORS

    numerators = torch.stack(Q6_K_NUMERATORS).to(sub.device)
    scale, levels = torch.empty(n, device=sub.device), torch.empty(n, 16, device=sub.device)
    if n:
        _q6_k_fit_kernel[(triton.cdiv(n, BLOCK),)](sub, numerators, scale, levels, n, EPS=GROUP_MAX_EPS,
                                                   BLOCK=BLOCK, num_warps=4, enable_fp_fusion=False)
    return scale, levels
