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
``launch_config`` is the one launch heuristic (a table tuned on an H200, rules outside it). Host time
is most of a small call, so the launchers keep per-call Python short: no views of contiguous inputs,
None for unused pointers, no rstd without a backward (``need_rstd=False``), one program writing dw for
a few rows, and a cached direct launch of the compiled kernel (see ``_launch``).
"""

from __future__ import annotations

import contextlib
import functools
import os
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
    RSTD,  # [M] fp32 1/rms per row, saved for the backward (only when STORE_RSTD)
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
    STORE_RSTD: tl.constexpr,  # False without autograd (inference): RSTD may be None
):
    # Unused pointers (R and S without a residual, RSTD without STORE_RSTD) are passed as None:
    # Triton makes them constexprs, so they cost the launcher nothing, and their code is not built.
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
    if STORE_RSTD:
        tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(
    DY,  # [M, N] gradient of y
    X,  # [M, N] the normalised input (s for the fused add)
    W,  # [N] weight
    RSTD,  # [M] fp32 saved by the forward
    DS,  # [M, N] gradient of the new residual (only when HAS_DS, else None)
    DX,  # [M, N] output: gradient of x (and of the residual for the fused add)
    DW_PART,  # [num_programs, N] fp32 output: per-program partial sums of dw; with a single
    # program, dw itself (weight dtype): the sum is final, and no second kernel is launched
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

    dw = tl.sum(dw_acc, axis=0).to(DW_PART.dtype.element_ty)
    tl.store(DW_PART + pid.to(tl.int64) * N + cols, dw, mask=col_ok)


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


# Measured on an H200 (bench_rms_norm.py --tune, bf16, 16384 rows, Triton 3.6, 2026-11-28): per row
# width block_n, the fastest config, or one within ~2% of it with fewer elements per thread (those
# sizes were launch-bound, so the sweep could not tell them apart). {block_n: (block_m, num_warps)}
# forward, {block_n: (block_m, num_warps, programs_per_sm)} backward.
_FWD_TUNED = {1024: (4, 4), 2048: (8, 8), 4096: (2, 8), 8192: (2, 16)}
_BWD_TUNED = {1024: (4, 2, 2), 2048: (2, 8, 2), 4096: (1, 8, 2), 8192: (2, 16, 1)}


@functools.lru_cache(maxsize=512)
def launch_config(n_rows: int, n_cols: int, backward: bool = False) -> RowConfig:
    """The launch heuristic for every kernel here, from the row shape alone.

    * ``block_n`` = next power of two >= N: the whole row lives in registers.
    * Measured widths (1024..8192) take the tuned table above. Narrower rows take several rows per
      program so each program still moves a ~4K-element tile, at ~32 (forward) or ~64 (backward)
      elements per thread like the 1024 entry; wider rows one row per program at ~32 elements per
      thread like the 8192 entry, one persistent backward program per SM (as 8192's best).
    * ``block_m`` never exceeds the row count rounded up to a power of two.
    """
    if n_cols > MAX_HIDDEN:
        raise ValueError(
            f"apr rms_norm kernels: hidden size {n_cols} exceeds the largest supported row "
            f"({MAX_HIDDEN} columns kept in registers)"
        )
    block_n = _next_pow2(max(n_cols, 1))
    if backward and block_n in _BWD_TUNED:
        block_m, num_warps, pps = _BWD_TUNED[block_n]
    elif not backward and block_n in _FWD_TUNED:
        (block_m, num_warps), pps = _FWD_TUNED[block_n], 1
    elif block_n < 1024:
        block_m = min(16, 4096 // block_n)
        num_warps, pps = max(2, block_m * block_n // (2048 if backward else 1024)), 2
    else:
        block_m, num_warps, pps = 1, min(32, block_n // 1024), 1
    block_m = max(1, min(block_m, _next_pow2(max(n_rows, 1))))
    return RowConfig(block_m, block_n, num_warps, pps)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a constexpr_function: several microseconds per host call


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 2  # the interpreter runs programs one by one: a few programs exercise the loop


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# A backward over at most this many row blocks runs as one program that writes dw itself: no
# partial buffer, no second launch (each launch costs more host time than those few rows take).
SINGLE_PROGRAM_DW_BLOCKS = 4


# ------------------------------------------------------------------------------------ launching
# Triton's JITFunction launch path re-derives the specialisation of every argument, reads its
# knobs and checks globals on each call: tens of microseconds of host time, which is most of the
# cost of a small RMSNorm. The first launch of each specialisation goes through it and returns the
# CompiledKernel; later launches with the same key call that kernel's launcher directly (what
# CompiledKernel.__getitem__ does). The key holds everything Triton 3.6 specialises on: constexpr
# values, num_warps, the device, tensor dtypes and 16-byte alignment, and for ints == 1, % 16 == 0
# and the 32-bit range. Opt-in with APR_KERNELS_FAST_LAUNCH=1 (read at import): it reaches into
# Triton's CompiledKernel launcher, which has been checked against Triton 3.6's source and tested
# with a stand-in kernel, but not yet run on a GPU; the default is Triton's own launch path.

_FAST_LAUNCH = os.environ.get("APR_KERNELS_FAST_LAUNCH", "0").strip() == "1"
_compiled: dict = {}
_NULL = contextlib.nullcontext()


def _spec(a):
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if a is None or isinstance(a, float):
        return a is None
    return (a == 1, a % 16 == 0, -(2**31) <= a < 2**31)  # int


def _launch(fn, grid0: int, args: tuple, consts: tuple, num_warps: int, cuda: bool) -> None:
    """``fn[(grid0,)](*args, *consts, num_warps=num_warps)``; ``consts`` are fn's trailing
    constexpr parameters, ``args`` all the ones before them, in signature order."""
    full = args + consts
    if not (cuda and _FAST_LAUNCH):
        fn[(grid0,)](*full, num_warps=num_warps)
        return
    dev = torch.cuda.current_device()
    key = (id(fn), num_warps, dev, consts, *map(_spec, args))
    ck = _compiled.get(key)
    if ck is None:
        ck = fn[(grid0,)](*full, num_warps=num_warps)
        if getattr(ck, "function", None) is not None and getattr(ck, "packed_metadata", None) is not None:
            _compiled[key] = ck
        return
    from triton import knobs

    stream = _stream(dev)
    grid = (grid0, 1, 1)
    ck.run(grid0, 1, 1, stream, ck.function, ck.packed_metadata, ck.launch_metadata(grid, stream, *full),
           knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *full)  # fmt: skip


def _stream(dev: int):
    """The raw current CUDA stream, as Triton's own launch path gets it."""
    from triton.runtime import driver

    return driver.active.get_current_stream(dev)


@functools.lru_cache(maxsize=None)
def _multi_gpu() -> bool:
    return torch.cuda.device_count() > 1


def _on_device(t: torch.Tensor):
    """Triton launches on the *current* CUDA device: switch to t's when it is another one."""
    if t.is_cuda and _multi_gpu() and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return _NULL


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` as a 2-D [rows, hidden] view with a unit column stride (copies only if it must)."""
    if t.dim() == 0:
        raise ValueError(f"apr rms_norm kernels: {name} must have at least one dim, got a scalar")
    n = t.shape[-1]
    if t.stride(-1) != 1 and n > 1:
        t = t.contiguous()  # the kernels need unit column stride (vector loads)
    try:
        return t.view(-1, n)
    except RuntimeError:  # leading dims that cannot be flattened without a copy
        return t.reshape(-1, n)


def _row_args(t: torch.Tensor, name: str) -> tuple[torch.Tensor, int, int]:
    """(tensor to pass, rows, row stride): a contiguous t is passed as it is (no view to build)."""
    if t.is_contiguous() and t.dim() > 0 and t.shape[-1] > 0:
        n = t.shape[-1]
        return t, t.numel() // n, n
    t2 = _rows(t, name)
    return t2, t2.shape[0], t2.stride(0)


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


def _out_args(out, shape, dtype, device, name: str) -> tuple[torch.Tensor, int]:
    """(buffer to pass, row stride) of an output: a fresh contiguous one, or the given view."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device), shape[-1]
    v = _out_rows(_check_out(out, shape, dtype, device, name), name)
    return v, v.stride(0)


def _fwd(x, residual, weight, eps, out, residual_out, rstd, config, need_rstd=True):
    if x.dim() == 0:
        raise ValueError("apr rms_norm kernels: x must have at least one dim, got a scalar")
    shape = x.shape
    n = shape[-1]
    x2, m, sx = _row_args(x, "x")
    cfg = config or launch_config(m, n)
    dev = x.device
    y_dtype = x.dtype if weight.dtype == x.dtype else torch.promote_types(x.dtype, weight.dtype)
    y, sy = _out_args(out, shape, y_dtype, dev, "out")
    if rstd is not None or need_rstd:
        rstd = _check_out(rstd, shape[:-1], torch.float32, dev, "rstd")
        if not rstd.is_contiguous():
            raise ValueError(f"apr rms_norm kernels: rstd must be contiguous, got strides {rstd.stride()}")
    s = r2 = None  # no residual: None pointers (compiled out)
    sr = ss = 0
    if residual is not None:
        r2, _, sr = _row_args(residual, "residual")
        s, ss = _out_args(residual_out, shape, x.dtype, dev, "residual_out")
    if m > 0:
        w = weight if weight.is_contiguous() else weight.contiguous()
        with _on_device(x):
            _launch(
                _rms_norm_fwd_kernel, _cdiv(m, cfg.block_m),
                (x2, r2, y, s, w, rstd, sx, sr, sy, ss, m, n, float(eps)),
                (cfg.block_m, cfg.block_n, residual is not None, rstd is not None),
                cfg.num_warps, x.is_cuda,
            )  # fmt: skip
    if out is not None:
        y = out
    if residual_out is not None:
        s = residual_out
    return y, s, rstd


def rms_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    out: torch.Tensor | None = None,
    rstd: torch.Tensor | None = None,
    config: RowConfig | None = None,
    need_rstd: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(y, rstd)`` for x of shape (..., N): y like x with dtype promote(x, w), rstd (...) fp32.

    ``out``/``rstd`` may be given (written in place; ``out`` may be a row-strided view).
    ``need_rstd=False`` (no backward will run) skips rstd and returns None for it."""
    y, _, rstd = _fwd(x, None, weight, eps, out, None, rstd, config, need_rstd)
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
    need_rstd: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(y, s, rstd)`` with s = x + residual (in x's dtype) and y = rms_norm(s)."""
    return _fwd(x, residual, weight, eps, out, residual_out, rstd, config, need_rstd)


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
    if x.dim() == 0:
        raise ValueError("apr rms_norm kernels: x must have at least one dim, got a scalar")
    shape = x.shape
    n = shape[-1]
    x2, m, sx = _row_args(x, "x")
    dy2, _, sdy = _row_args(dy, "dy")
    cfg = config or launch_config(m, n, True)
    dev = x.device
    dx_out = dx
    dx, sdx = _out_args(dx, shape, x.dtype, dev, "dx")
    ds2, sds = None, 0  # no dresidual: a None pointer (compiled out)
    if dresidual is not None:
        ds2, _, sds = _row_args(dresidual, "dresidual")
    dw = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    if m == 0:
        return (dx_out if dx_out is not None else dx), dw.zero_()
    if not rstd.is_contiguous():
        rstd = rstd.contiguous()
    n_blocks = _cdiv(m, cfg.block_m)
    if n_blocks <= SINGLE_PROGRAM_DW_BLOCKS:
        per_prog, n_prog = _next_pow2(n_blocks), 1
        partial = dw  # the one program's sum is dw (cast to w's dtype on store)
    else:
        per_prog = _next_pow2(_cdiv(n_blocks, _sm_count(dev) * cfg.programs_per_sm))
        n_prog = _cdiv(n_blocks, per_prog)
        partial = torch.empty((n_prog, n), dtype=torch.float32, device=dev)
    w = weight if weight.is_contiguous() else weight.contiguous()
    cuda = x.is_cuda
    with _on_device(x):
        _launch(
            _rms_norm_bwd_kernel, n_prog,
            (dy2, x2, w, rstd, ds2, dx, partial, sdy, sx, sds, sdx, m, n),
            (cfg.block_m, cfg.block_n, per_prog, dresidual is not None),
            cfg.num_warps, cuda,
        )  # fmt: skip
        if n_prog > 1:
            # 32 fp32 columns (one 128-byte line per partial row) x 128 partial rows per step: many
            # programs and few dependent steps, since this tiny kernel is latency-bound
            block_n, block_p = min(32, cfg.block_n), 128
            steps = _next_pow2(_cdiv(n_prog, block_p))
            _launch(_rms_norm_bwd_dw_kernel, _cdiv(n, block_n), (partial, dw, n_prog, n),
                    (block_p, block_n, steps), 4, cuda)  # fmt: skip
    return (dx_out if dx_out is not None else dx), dw
