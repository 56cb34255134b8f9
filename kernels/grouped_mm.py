"""Grouped GEMM for mixture-of-experts layers, forward and backward in Triton.

Rows of ``x`` are sorted by expert (group): group ``e`` owns rows ``offs[e-1] .. offs[e]`` (``offs``: the
cumulative ends, ``offs[-1]`` = the row count, as ``torch.nn.functional.grouped_mm``'s). Each group is
multiplied by its own weight::

    y[rows of e]  = x[rows of e] @ W_e.T            W_e: [out, in], nn.Linear's layout
    dx[rows of e] = dy[rows of e] @ W_e              (the same kernel, W_e read untransposed)
    dW_e          = dy[rows of e].T @ x[rows of e]   (zeros for an empty group)

The weights stay separate tensors (one ``nn.Linear`` per expert, Hugging Face's on-disk names): the
kernels read them through a table of their addresses, so nothing is stacked or copied per step. The
weights may be stored in a wider dtype than ``x`` (fp32 master weights under bf16 autocast): tiles are
cast to ``x``'s dtype as they are loaded, which is what autocast's per-call weight copy computes,
without the copy. Products accumulate in fp32; fp32 inputs multiply in full fp32 (no TF32), as
``torch.matmul``'s default.

Work split, with no host read of the group sizes (the grid depends only on the row count and the
number of groups, so a layer launches the same way every step and ``torch.compile`` sees no
data-dependent shape):

* ``y`` / ``dx``: a program per (row tile, column tile). The row tiles of all groups are numbered in
  order; a program finds its group from the prefix sum of the groups' tile counts (read in-kernel from
  ``offs``). At most ``cdiv(N, BLOCK_M) + E`` row tiles exist; the spare programs return at once.
* ``dW``: a program per (group, output tile), looping over its group's rows: each weight gradient is
  summed by one program, in row order, without atomics (deterministic run to run).

Launchers: ``grouped_mm_fwd(x, table, w0, offs, trans) -> y``, ``grouped_mm_dw(dy, x, offs, w0) -> dW``
(``[E, out, in]``, stacked: the op hands out its slices). Block sizes are fixed per dtype, not yet tuned on
a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _group_of_tile(OFFS, pid, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(group, first row, end row) of row tile ``pid``; group >= E when ``pid`` is past the last tile."""
    idx = tl.arange(0, BLOCK_E)
    ends = tl.load(OFFS + idx, mask=idx < E, other=0).to(tl.int64)
    starts = tl.load(OFFS + idx - 1, mask=(idx >= 1) & (idx < E), other=0).to(tl.int64)
    tiles = tl.where(idx < E, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    cum = tl.cumsum(tiles, 0)
    e = tl.sum((cum <= pid).to(tl.int32), 0)  # first group whose tiles reach past pid
    first_tile = tl.sum(tl.where(idx == e, cum - tiles, 0), 0)
    start = tl.sum(tl.where(idx == e, starts, 0), 0)
    end = tl.sum(tl.where(idx == e, ends, 0), 0)
    return e, start + (pid - first_tile) * BLOCK_M, end


@triton.jit
def _grouped_mm_kernel(X, TABLE, W0, OFFS, Y, E, R, C, W_IN, stride_xm, stride_ym,
                       TRANS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, PRECISION: tl.constexpr):
    """Y[rows of e, :C] = X[rows of e, :R] @ B_e: B_e = W_e.T (TRANS) or W_e, W_e [out, in] contiguous
    with W_IN = in. The layout is a compile-time flag so that the loads know which side is contiguous."""
    e, row0, row_end = _group_of_tile(OFFS, tl.program_id(0), E, BLOCK_M, BLOCK_E)
    if e < E:
        # 64-bit scalar bases, 32-bit offsets inside the tile; rows and columns past the ends are
        # clamped (read twice, never stored) rather than masked, and k is masked only when ragged:
        # unmasked tiles pipeline and vectorise
        w = tl.load(TABLE + e).to(tl.pointer_type(W0.dtype.element_ty))
        rs = tl.arange(0, BLOCK_M)
        n_rows = (row_end - row0).to(tl.int32)
        col0 = tl.program_id(1) * BLOCK_N
        cs = tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        rl = tl.minimum(rs, n_rows - 1)
        cl = tl.minimum(cs, C - col0 - 1)
        x_ptrs = X + row0 * stride_xm + (rl[:, None] * stride_xm + ks[None, :])
        if TRANS:  # B[r, c] = W[c, r]
            w_ptrs = w + col0.to(tl.int64) * W_IN + (ks[:, None] + cl[None, :] * W_IN)
        else:  # B[r, c] = W[r, c]
            w_ptrs = w + col0 + (ks[:, None] * W_IN + cl[None, :])
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, R, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_ptrs)
                b = tl.load(w_ptrs).to(X.dtype.element_ty)
            else:
                k_ok = ks < R - k0
                a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0).to(X.dtype.element_ty)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K if TRANS else BLOCK_K * W_IN
        row_ok, col_ok = rs < n_rows, cs < C - col0
        y_ptrs = Y + row0 * stride_ym + col0 + (rs[:, None] * stride_ym + cs[None, :])
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grouped_mm_dw_kernel(DY, X, OFFS, DW, OUT, IN, stride_dym, stride_xm,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          PRECISION: tl.constexpr):
    """DW[e, :OUT, :IN] = DY[rows of e, :OUT].T @ X[rows of e, :IN]; program (tile, e)."""
    e = tl.program_id(1)
    tiles_in = tl.cdiv(IN, BLOCK_K)
    out0 = (tl.program_id(0) // tiles_in) * BLOCK_N
    in0 = (tl.program_id(0) % tiles_in) * BLOCK_K
    os_, is_ = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_K)
    out_ok, in_ok = os_ < OUT - out0, is_ < IN - in0
    start = tl.load(OFFS + e - 1, mask=e > 0, other=0).to(tl.int64)
    end = tl.load(OFFS + e).to(tl.int64)
    rs = tl.arange(0, BLOCK_M)
    dy_ptrs = DY + start * stride_dym + out0 + (rs[:, None] * stride_dym + os_[None, :])
    x_ptrs = X + start * stride_xm + in0 + (rs[:, None] * stride_xm + is_[None, :])
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, end - start, BLOCK_M):
        row_ok = rs < end - start - r0
        dy = tl.load(dy_ptrs, mask=row_ok[:, None] & out_ok[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=row_ok[:, None] & in_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=PRECISION)
        dy_ptrs += BLOCK_M * stride_dym
        x_ptrs += BLOCK_M * stride_xm
    dw_ptrs = DW + (e.to(tl.int64) * OUT + out0) * IN + in0 + (os_[:, None] * IN + is_[None, :])
    tl.store(dw_ptrs, acc.to(DW.dtype.element_ty), mask=out_ok[:, None] & in_ok[None, :])


def launch_config(dtype: torch.dtype) -> dict:
    """Tile sizes and warps: 64 x 128 output tiles, 64-wide k steps, 8 warps (fp32: 32-wide k steps,
    whose tiles take twice the shared memory, and 4 warps). Chosen so that every variant compiles for
    sm_90a without spills (tests/test_grouped_mm.py); not yet timed on a GPU."""
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter is ignored for 16-bit inputs


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit column stride (row stride free): what the kernels address."""
    return t if t.stride(-1) == 1 else t.contiguous()


def grouped_mm_fwd(x: torch.Tensor, table: torch.Tensor, w0: torch.Tensor, offs: torch.Tensor,
                   trans: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    """``trans``: y = x @ W_e.T (forward, ``[N, out]``); else y = x @ W_e (``dx``, ``[N, in]``).
    ``table``: int64 addresses of the E contiguous weights shaped like ``w0``, on x's device.
    ``out``: where to write y (unit column stride, any row stride), else a new tensor."""
    x = _rows(x)
    out_f, in_f = w0.shape
    r, c = (in_f, out_f) if trans else (out_f, in_f)
    y = torch.empty(x.shape[0], c, dtype=x.dtype, device=x.device) if out is None else out
    assert y.shape == (x.shape[0], c) and y.stride(1) == 1, "out: [N, columns] with unit column stride"
    n, e = x.shape[0], offs.numel()
    if n == 0 or c == 0:
        return y
    cfg = launch_config(x.dtype)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]) + e, triton.cdiv(c, cfg["BLOCK_N"]))
    _grouped_mm_kernel[grid](x, table, w0, offs, y, e, r, c, in_f, x.stride(0), y.stride(0), TRANS=trans,
                             EVEN_K=r % cfg["BLOCK_K"] == 0,
                             BLOCK_E=triton.next_power_of_2(e), PRECISION=_precision(x.dtype), **cfg)
    return y


def grouped_mm_dw(dy: torch.Tensor, x: torch.Tensor, offs: torch.Tensor, w0: torch.Tensor,
                  dw: torch.Tensor | None = None) -> torch.Tensor:
    """The weights' gradients ``[E, out, in]`` in ``w0``'s dtype (every slice written; zeros for an
    empty group); ``dw``: a contiguous buffer to write them to, else a new one."""
    dy, x = _rows(dy), _rows(x)
    e = offs.numel()
    out_f, in_f = w0.shape
    if dw is None:
        dw = torch.empty(e, out_f, in_f, dtype=w0.dtype, device=x.device)
    assert dw.shape == (e, out_f, in_f) and dw.is_contiguous(), "dw: a contiguous [E, out, in] buffer"
    if dw.numel() == 0:
        return dw
    cfg = launch_config(x.dtype)
    cfg["BLOCK_N"] = 64  # 64 x BLOCK_K gradient tiles, E programs per tile
    grid = (triton.cdiv(out_f, cfg["BLOCK_N"]) * triton.cdiv(in_f, cfg["BLOCK_K"]), e)
    _grouped_mm_dw_kernel[grid](dy, x, offs, dw, out_f, in_f, dy.stride(0), x.stride(0),
                                PRECISION=_precision(x.dtype), **cfg)
    return dw
