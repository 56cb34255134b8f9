"""Cross entropy over a chunk of logits rows in Triton, gradient written in place (one row per program).

The kernel half of ``apr_kernels.linear_cross_entropy`` (the output projection fused with the loss,
``python/apr_kernels/ops/cross_entropy.py``): the host computes one chunk of logits ``[n, V]`` with a
GEMM, this kernel turns it into per-row losses and overwrites it with d loss / d logits, and the host
multiplies that gradient back through the projection. The full ``[tokens, vocab]`` logits (5 GB in
fp32 for Qwen2's 151,936-token vocabulary at 8k tokens) never exist at once.

Numerics (per row r with target t, logits x of dtype ``dt``; everything in fp32; label smoothing
``e`` and z-loss ``z`` 0 unless given)::

    lse      = max(x) + log(sum(exp(x - max(x))))     # online over V in blocks, exp2 domain
    loss[r]  = lse - (1 - e) x[t] - e mean(x) + z lse^2      # 0 when t == ignore_index
    x[:]     = dt((1 + 2 z lse) exp(x - lse) - (1 - e) onehot(t) - e / V)   # with WRITE_GRAD

The gradient is that of the *sum* of the row losses; the caller scales by 1/count for the mean (a
scale does not change bf16/fp16 relative rounding). A target outside ``[0, V)`` that is not
``ignore_index`` gives a NaN loss (and NaN gradients): the GPU cannot raise, and NaN stops training
loudly instead of reading out of bounds. The host checks targets on CPU tensors instead.

Launcher: ``cross_entropy_rows(logits, targets, loss, ignore_index, write_grad, label_smoothing, z_loss)``.

The vocabulary split over tensor-parallel ranks (``train/vocab_parallel.py``) takes the same row pass
in two halves, since the row's normaliser needs every rank's columns: ``split_vocab_stats`` writes
each row's maximum, exponential sum about it, target logit (where this rank holds the target column)
and logit sum for the group to all-reduce, and ``split_vocab_grad`` overwrites the logits with the
gradient of the row losses given the group's ``lse`` (``(1 + 2 z lse) exp(x - lse) - (1 - e) onehot -
e / V``, V the whole vocabulary), times a per-row scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _cross_entropy_kernel(
    LOGITS,  # [n, V] logits rows (overwritten with the gradient when WRITE_GRAD)
    stride_row,  # elements between rows (the last dim is contiguous)
    TARGETS,  # [n] int64 (any integer dtype) target ids
    LOSS,  # [n] fp32 per-row loss
    V,  # vocabulary size (row length)
    ignore_index,
    label_smoothing,  # e: the target's weight is 1 - e, every logit's e / V
    z_loss,  # z: z lse^2 added to the loss
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SMOOTH: tl.constexpr,  # label smoothing on: the row's sum of logits is kept too (one more accumulator)
):
    LOG2E: tl.constexpr = 1.4426950408889634
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_row
    t = tl.load(TARGETS + row).to(tl.int64)
    ignored = t == ignore_index
    in_range = (t >= 0) & (t < V)
    cols0 = tl.arange(0, BLOCK_V)

    # pass 1: running max m and running sum d of 2^((x - m) * log2 e), blockwise (x in log2 units)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    d = tl.zeros([BLOCK_V], tl.float32)
    sx = tl.zeros([BLOCK_V], tl.float32)  # the row's sum of logits (label smoothing's mean), log2 units
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        x = tl.load(ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * LOG2E
        if SMOOTH:
            sx += tl.where(cols < V, x, 0.0)
        m_new = tl.maximum(m, x)
        # lanes that have only seen -inf (past V) keep m_new = -inf; -inf - -inf would be NaN, so
        # subtract 0 there instead (their d stays 0)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp2(m - m_ref) + tl.exp2(x - m_ref)
        m = m_new
    m_row = tl.max(m, 0)
    d_row = tl.sum(d * tl.exp2(m - m_row), 0)  # lanes still at -inf contribute exp2(-inf) = 0
    lse2 = m_row + tl.log2(d_row)  # log2-sum-exp2 of x * log2 e = lse * log2 e

    x_t = tl.load(ptr + tl.where(in_range, t, 0)).to(tl.float32)
    lse = lse2 / LOG2E
    loss = lse - (1.0 - label_smoothing) * x_t + z_loss * lse * lse
    if SMOOTH:
        loss -= label_smoothing * (tl.sum(sx, 0) / LOG2E / V)
    loss = tl.where(in_range, loss, float("nan"))
    loss = tl.where(ignored, 0.0, loss)
    tl.store(LOSS + row, loss)

    if WRITE_GRAD:
        # pass 2: (1 + 2 z lse) softmax - (1 - e) onehot - e / V, in place (the row was read by pass 1
        # and the x_t load above)
        scale = tl.where(ignored, 0.0, tl.where(in_range, 1.0, float("nan")))
        p_scale = 1.0 + 2.0 * z_loss * lse
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            mask = cols < V
            x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
            g = p_scale * tl.exp2(x * LOG2E - lse2) - tl.where(cols == t, 1.0 - label_smoothing, 0.0) \
                - label_smoothing / V
            tl.store(ptr + cols, (g * scale).to(LOGITS.dtype.element_ty), mask=mask)


def launch_config(v: int, smooth: bool = False) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)`` for rows of ``v`` logits: wide blocks (few loop trips over a 150k
    vocabulary) with enough warps to keep 16-32 elements per thread; with label smoothing (a third
    accumulator per lane) at most 16 per thread, which compiles for sm_90 without spills. Not yet tuned
    on a GPU."""
    block = min(triton.next_power_of_2(max(v, 1)), 8192 if smooth else 16384)
    warps = 16 if block >= (8192 if smooth else 16384) else 8 if block >= 4096 else 4 if block >= 1024 \
        else 2 if block >= 256 else 1
    return block, warps


def cross_entropy_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss: torch.Tensor,
    ignore_index: int,
    write_grad: bool,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    *,
    block_v: int | None = None,
) -> torch.Tensor:
    """Per-row losses of ``logits [n, V]`` into ``loss [n]`` (fp32); with ``write_grad`` the logits
    are overwritten with d(sum of losses)/d logits. ``block_v`` overrides the block (tests)."""
    n, v = logits.shape
    if n == 0:
        return loss
    if logits.stride(1) != 1:
        raise ValueError(f"cross_entropy_rows: logits need a contiguous last dim, got strides {logits.stride()}")
    smooth = label_smoothing != 0
    block, warps = launch_config(v, smooth)
    if block_v is not None:
        block = block_v
    _cross_entropy_kernel[(n,)](logits, logits.stride(0), targets, loss, v, ignore_index, float(label_smoothing),
                                float(z_loss), WRITE_GRAD=write_grad, BLOCK_V=block, SMOOTH=smooth, num_warps=warps)
    return loss


# ---------------------------------------------------------------- the vocabulary split in two passes
@triton.jit
def _split_vocab_stats_kernel(
    LOGITS,  # [n, W] this rank's columns of the logits rows
    stride_row,
    LOCAL,  # [n] int64: the target's column among this rank's, -1 where another rank holds it (or none)
    STATS,  # [4, n] fp32: row max, sum of exp(x - max), target logit (0 if not here), sum of x
    n,
    W,
    BLOCK_V: tl.constexpr,
    SMOOTH: tl.constexpr,  # the logit sum too (label smoothing)
):
    LOG2E: tl.constexpr = 1.4426950408889634
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_row
    t = tl.load(LOCAL + row).to(tl.int64)
    cols0 = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    d = tl.zeros([BLOCK_V], tl.float32)
    sx = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, W, BLOCK_V):
        cols = start + cols0
        x = tl.load(ptr + cols, mask=cols < W, other=float("-inf")).to(tl.float32)
        if SMOOTH:
            sx += tl.where(cols < W, x, 0.0)
        x2 = x * LOG2E
        m_new = tl.maximum(m, x2)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        d = d * tl.exp2(m - m_ref) + tl.exp2(x2 - m_ref)
        m = m_new
    m_row = tl.max(m, 0)
    d_row = tl.sum(d * tl.exp2(m - m_row), 0)
    here = (t >= 0) & (t < W)
    x_t = tl.where(here, tl.load(ptr + tl.where(here, t, 0)).to(tl.float32), 0.0)
    tl.store(STATS + row, m_row / LOG2E)
    tl.store(STATS + n + row, d_row)
    tl.store(STATS + 2 * n + row, x_t)
    tl.store(STATS + 3 * n + row, tl.sum(sx, 0))


@triton.jit
def _split_vocab_grad_kernel(
    LOGITS,  # [n, W] overwritten with the gradient
    stride_row,
    LOCAL,  # [n] int64 as above
    LSE,  # [n] fp32: the whole row's logsumexp (all-reduced)
    SCALE,  # [n] fp32: each row's incoming gradient (0 for an ignored row)
    W,
    V,  # the whole vocabulary (label smoothing's e / V)
    label_smoothing,
    z_loss,
    BLOCK_V: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_row
    t = tl.load(LOCAL + row).to(tl.int64)
    lse = tl.load(LSE + row)
    scale = tl.load(SCALE + row)
    p_scale = 1.0 + 2.0 * z_loss * lse
    cols0 = tl.arange(0, BLOCK_V)
    for start in range(0, W, BLOCK_V):
        cols = start + cols0
        mask = cols < W
        x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
        g = p_scale * tl.exp2((x - lse) * LOG2E) - tl.where(cols == t, 1.0 - label_smoothing, 0.0) \
            - label_smoothing / V
        tl.store(ptr + cols, (g * scale).to(LOGITS.dtype.element_ty), mask=mask)


def split_vocab_stats(logits: torch.Tensor, local: torch.Tensor, stats: torch.Tensor, smooth: bool,
                      *, block_v: int | None = None) -> torch.Tensor:
    """Per-row statistics of this rank's logit columns ``[n, W]`` into ``stats [4, n]`` (fp32): max,
    exponential sum about it, target logit (``local`` its column here, -1 elsewhere), logit sum."""
    n, w = logits.shape
    if n == 0:
        return stats
    if logits.stride(1) != 1:
        raise ValueError(f"split_vocab_stats: logits need a contiguous last dim, got strides {logits.stride()}")
    block, warps = launch_config(w, smooth)
    _split_vocab_stats_kernel[(n,)](logits, logits.stride(0), local, stats, n, w, BLOCK_V=block_v or block,
                                    SMOOTH=smooth, num_warps=warps)
    return stats


def split_vocab_grad(logits: torch.Tensor, local: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor, vocab: int,
                     label_smoothing: float = 0.0, z_loss: float = 0.0, *, block_v: int | None = None) -> torch.Tensor:
    """Overwrite this rank's logit columns ``[n, W]`` with ``scale`` times the gradient of the row
    losses given the whole rows' ``lse`` (fp32 ``[n]`` each); returns ``logits``."""
    n, w = logits.shape
    if n == 0:
        return logits
    if logits.stride(1) != 1:
        raise ValueError(f"split_vocab_grad: logits need a contiguous last dim, got strides {logits.stride()}")
    block, warps = launch_config(w)
    _split_vocab_grad_kernel[(n,)](logits, logits.stride(0), local, lse, scale, w, vocab, float(label_smoothing),
                                   float(z_loss), BLOCK_V=block_v or block, num_warps=warps)
    return logits
