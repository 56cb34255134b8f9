"""RMSNorm forward, backward and fused residual add in Triton (one row of the hidden size per row).

Numerics (Hugging Face ``LlamaRMSNorm`` / ``Qwen2RMSNorm`` form, x of dtype ``dt``, weight w)::

    h    = float32(x)
    rstd = 1 / sqrt(mean(h * h) + eps)          # per row, fp32, saved for the backward
    y    = w * dt(h * rstd)                     # x_hat is rounded to dt *before* the weight multiply;
                                                # y has dtype promote(dt, w.dtype) and the product
                                                # is formed in fp32 and rounded once, like torch

Fused residual add (the pre-norm transformer step ``residual = x + residual; y = norm(residual)``)::

    s = dt(float32(x) + float32(r))             # the sum rounded to dt, as HF's `residual + hidden`
    y = w * dt(norm(s))                         # s is returned as the new residual

Backward (all in fp32; the cast to dt is treated as the identity, as autograd does)::

    g    = dy * w
    dx   = rstd * (g - x_hat * mean(g * x_hat))  (+ ds, the gradient of the new residual s)
    dw   = sum over rows of dy * dt(x_hat)       # fp32 partial sums per program, then a second
                                                 # kernel sums the partials in a fixed order:
                                                 # no atomics, deterministic run to run

Layout: the last dim must be contiguous (the launchers make it so with ``.contiguous()`` otherwise,
e.g. for an expanded dy). The leading dims are flattened to rows read through a row stride, so rows of
a wider buffer (a slice of the hidden dim, a 3-D view) need no copy; only leading dims that no single
row stride can describe (e.g. transposed batch/sequence dims) are copied once. Hidden sizes up to
``MAX_HIDDEN`` fit one row in registers.

Launchers (plain functions, no autograd): ``rms_norm_fwd``, ``add_rms_norm_fwd``, ``rms_norm_bwd``;
``launch_config`` is the one launch heuristic.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# One row must fit in registers; wider rows would spill (a looped kernel would be needed).
MAX_HIDDEN = 65536
# Dtypes the kernels compute (the fp32 internal math makes fp64 pointless; the reference takes it).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def _rms_norm_fwd_kernel(
    X,  # [M, N] input rows (or the first addend of the fused add)
    R,  # [M, N] residual rows (only when HAS_RESIDUAL)
    Y,  # [M, N] normalised output, dtype promote(x, w)
    S,  # [M, N] new residual x + r in x's dtype (only when HAS_RESIDUAL)
    W,  # [N] weight
    RSTD,  # [M] fp32 1/rms per row, saved for the backward
    stride_x,  # elements between rows of X (and likewise below)
    stride_r,
    stride_y,
    stride_s,
    M,  # number of rows
    N,  # hidden size
    eps,  # fp32
    BLOCK_M: tl.constexpr,  # rows per program (several for narrow rows: launch overhead)
    BLOCK_N: tl.constexpr,  # next power of two >= N
    HAS_RESIDUAL: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < N)[None, :]
    rows = rows.to(tl.int64)  # M * stride may exceed 2**31
    cols2 = cols[None, :]

    x = tl.load(X + rows[:, None] * stride_x + cols2, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols2, mask=mask, other=0.0)
        # sum in fp32, rounded once to x's dtype (what torch does for `x + r` in that dtype)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(S + rows[:, None] * stride_s + cols2, x, mask=mask)
    h = x.to(tl.float32)

    # mean of squares over the real N columns (masked lanes are 0)
    rstd = tl.rsqrt(tl.sum(h * h, axis=1) / N + eps)
    # HF casting: x_hat rounded to the input dtype before the weight multiply
    x_hat = (h * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    y = x_hat * w[None, :]
    tl.store(Y + rows[:, None] * stride_y + cols2, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,  # [M, N] gradient of y
    X,  # [M, N] the normalised input (s for the fused add)
    W,  # [N] weight
    RSTD,  # [M] fp32 saved by the forward
    DS,  # [M, N] gradient of the new residual (only when HAS_DS)
    DX,  # [M, N] output: gradient of x (and of the residual for the fused add)
    DW_PART,  # [num_programs, N] fp32 output: per-program partial sums of dw
    stride_dy,  # elements between rows (and likewise below)
    stride_x,
    stride_ds,
    stride_dx,
    M,
    N,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCKS_PER_PROG: tl.constexpr,  # row blocks per program (a power of two: few compiles)
    HAS_DS: tl.constexpr,
):
    # Each program handles BLOCKS_PER_PROG consecutive row blocks and keeps its dw partial in
    # registers, so partial traffic is num_programs * N floats, about (SMs * k) * N, whatever M is.
    # (The trip count is a constexpr: Triton 3.6's interpreter cannot loop to a runtime bound with
    # NumPy >= 2.4, and a power of two keeps the number of compiled variants small.)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    cols2 = cols[None, :]
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    for i in range(BLOCKS_PER_PROG):
        rows = (pid * BLOCKS_PER_PROG + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        rows = rows.to(tl.int64)
        x = tl.load(X + rows[:, None] * stride_x + cols2, mask=mask, other=0.0)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols2, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)

        x_hat = x.to(tl.float32) * rstd[:, None]
        # dw uses x_hat as the forward rounded it (the tensor the weight multiplied)
        dw_acc += dy * x_hat.to(X.dtype.element_ty).to(tl.float32)
        g = dy * w[None, :]
        c = tl.sum(g * x_hat, axis=1) / N
        dx = (g - x_hat * c[:, None]) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + rows[:, None] * stride_ds + cols2, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols2, dx.to(DX.dtype.element_ty), mask=mask)

    tl.store(DW_PART + pid.to(tl.int64) * N + cols, tl.sum(dw_acc, axis=0), mask=col_ok)


@triton.jit
def _rms_norm_bwd_dw_kernel(
    DW_PART,  # [P, N] fp32 partial sums, contiguous
    DW,  # [N] output in the weight's dtype
    P,  # number of partial rows
    N,
    BLOCK_P: tl.constexpr,  # partial rows summed per step
    BLOCK_N: tl.constexpr,  # columns per program
    STEPS: tl.constexpr,  # >= cdiv(P, BLOCK_P), a power of two (constexpr trip count, see above)
):
    # Fixed summation order (rows in steps of BLOCK_P, then a tree in tl.sum): deterministic.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for step in range(STEPS):
        rows = step * BLOCK_P + tl.arange(0, BLOCK_P)
        mask = (rows < P)[:, None] & col_ok[None, :]
        acc += tl.load(DW_PART + rows.to(tl.int64)[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(DW + cols, tl.sum(acc, axis=0).to(DW.dtype.element_ty), mask=col_ok)


# ------------------------------------------------------------------------------------ launch config


@dataclass(frozen=True)
class RowConfig:
    """How a row kernel is launched: ``block_m`` rows of ``block_n`` columns per program,
    ``num_warps`` warps, and (backward) ``programs_per_sm`` persistent programs per SM."""

    block_m: int
    block_n: int
    num_warps: int
    programs_per_sm: int


@functools.lru_cache(maxsize=256)
def launch_config(n_rows: int, n_cols: int) -> RowConfig:
    """The launch heuristic for every kernel here, from the row shape alone.

    * ``block_n`` = next power of two >= N: the whole row lives in registers.
    * Narrow rows take several rows per program so each program still moves a ~4K-element tile
      (for N = 896: 4 rows); otherwise launch overhead and tiny reductions dominate.
    * Warps by tile size, about 16 elements per thread (two 16-byte vectors of bf16), 2..32 warps.
    * Backward: enough persistent programs for ~32 resident warps per SM to hide memory latency.
    """
    if n_cols > MAX_HIDDEN:
        raise ValueError(
            f"apr rms_norm kernels: hidden size {n_cols} exceeds the largest supported row "
            f"({MAX_HIDDEN} columns kept in registers)"
        )
    block_n = triton.next_power_of_2(max(n_cols, 1))
    block_m = max(1, min(16, 4096 // block_n, triton.next_power_of_2(max(n_rows, 1))))
    tile = block_m * block_n
    num_warps = max(2, min(32 if tile >= 32768 else 16, tile // 512))
    programs_per_sm = max(1, 32 // num_warps)
    return RowConfig(block_m, block_n, num_warps, programs_per_sm)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 2  # the interpreter runs programs one by one: a few programs exercise the loop


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# ------------------------------------------------------------------------------------ launchers


def _on_device(t: torch.Tensor):
    """Triton launches on the *current* CUDA device: switch to t's when it is another one."""
    if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` as a 2-D [rows, hidden] view with a unit column stride (copies only if it must)."""
    n = t.shape[-1]
    if t.dim() == 0:
        raise ValueError(f"apr rms_norm kernels: {name} must have at least one dim, got a scalar")
    if t.stride(-1) != 1 and n > 1:
        t = t.contiguous()  # the kernels need unit column stride (vector loads)
    try:
        return t.view(-1, n)
    except RuntimeError:  # leading dims that cannot be flattened without a copy
        return t.reshape(-1, n)


def _check_out(out: torch.Tensor | None, shape, dtype, device, name: str) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if out.shape != shape or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"apr rms_norm kernels: {name} must be {tuple(shape)} {dtype} on {device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    return out


def _out_rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """A 2-D row view of an output buffer; never a copy (the kernel must write ``t`` itself)."""
    n = t.shape[-1]
    try:
        v = t.view(-1, n)
    except RuntimeError:
        v = None
    if v is None or (v.stride(-1) != 1 and n > 1):
        raise ValueError(
            f"apr rms_norm kernels: {name} must be viewable as [rows, {n}] with unit column "
            f"stride (row-strided is fine), got shape {tuple(t.shape)} strides {t.stride()}"
        )
    return v


def _fwd(x, residual, weight, eps, out, residual_out, rstd, config):
    shape = x.shape
    n = shape[-1]
    x2 = _rows(x, "x")
    m = x2.shape[0]
    cfg = config or launch_config(m, n)
    y = _check_out(out, shape, torch.promote_types(x.dtype, weight.dtype), x.device, "out")
    y2 = _out_rows(y, "out")
    rstd = _check_out(rstd, shape[:-1], torch.float32, x.device, "rstd")
    if not rstd.is_contiguous():
        raise ValueError(f"apr rms_norm kernels: rstd must be contiguous, got strides {rstd.stride()}")
    s = None
    r2 = s2 = x2  # unused pointers without a residual (HAS_RESIDUAL=False compiles them out)
    if residual is not None:
        r2 = _rows(residual, "residual")
        s = _check_out(residual_out, shape, x.dtype, x.device, "residual_out")
        s2 = _out_rows(s, "residual_out")
    if m > 0:
        grid = (triton.cdiv(m, cfg.block_m),)
        with _on_device(x):
            _rms_norm_fwd_kernel[grid](
                x2, r2, y2, s2, weight.contiguous(), rstd.view(-1),
                x2.stride(0), r2.stride(0), y2.stride(0), s2.stride(0),
                m, n, float(eps),
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_RESIDUAL=residual is not None,
                num_warps=cfg.num_warps,
            )  # fmt: skip
    return y, s, rstd


def rms_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    out: torch.Tensor | None = None,
    rstd: torch.Tensor | None = None,
    config: RowConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, rstd)`` for x of shape (..., N): y like x with dtype promote(x, w), rstd (...) fp32.

    ``out``/``rstd`` may be given (written in place; ``out`` may be a row-strided view)."""
    y, _, rstd = _fwd(x, None, weight, eps, out, None, rstd, config)
    return y, rstd


def add_rms_norm_fwd(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    rstd: torch.Tensor | None = None,
    config: RowConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, s, rstd)`` with s = x + residual (in x's dtype) and y = rms_norm(s)."""
    return _fwd(x, residual, weight, eps, out, residual_out, rstd, config)


def rms_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dresidual: torch.Tensor | None = None,
    *,
    dx: torch.Tensor | None = None,
    config: RowConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dw)`` for y = rms_norm(x); ``x`` is the normalised input (s for the fused add), and
    ``dresidual`` (the gradient of s, if any) is added into dx. dx has x's dtype, dw w's dtype."""
    shape = x.shape
    n = shape[-1]
    x2 = _rows(x, "x")
    dy2 = _rows(dy, "dy")
    m = x2.shape[0]
    cfg = config or launch_config(m, n)
    dx = _check_out(dx, shape, x.dtype, x.device, "dx")
    dx2 = _out_rows(dx, "dx")
    ds2 = _rows(dresidual, "dresidual") if dresidual is not None else dy2
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    if m == 0:
        return dx, dw.zero_()
    n_blocks = triton.cdiv(m, cfg.block_m)
    per_prog = triton.next_power_of_2(triton.cdiv(n_blocks, _sm_count(x.device) * cfg.programs_per_sm))
    n_prog = triton.cdiv(n_blocks, per_prog)
    partial = torch.empty((n_prog, n), dtype=torch.float32, device=x.device)
    with _on_device(x):
        _rms_norm_bwd_kernel[(n_prog,)](
            dy2, x2, weight.contiguous(), rstd.reshape(-1), ds2, dx2, partial,
            dy2.stride(0), x2.stride(0), ds2.stride(0), dx2.stride(0),
            m, n,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCKS_PER_PROG=per_prog,
            HAS_DS=dresidual is not None, num_warps=cfg.num_warps,
        )  # fmt: skip
        # 32 fp32 columns (one 128-byte line per partial row) x 128 partial rows per step: many
        # programs and few dependent steps, since this tiny kernel is latency-bound
        block_n, block_p = min(32, cfg.block_n), 128
        steps = triton.next_power_of_2(triton.cdiv(n_prog, block_p))
        _rms_norm_bwd_dw_kernel[(triton.cdiv(n, block_n),)](
            partial, dw, n_prog, n, BLOCK_P=block_p, BLOCK_N=block_n, STEPS=steps, num_warps=4
        )
    return dx, dw
