"""Knowledge-distillation rows in Triton: the student's cross entropy, the KL from the teacher, and the
gradient written over the student's logits (one row per program).

The kernel half of ``apr_kernels.linear_distillation`` (``python/apr_kernels/ops/distillation.py``):
the host computes one chunk of student logits ``s [n, V]`` and teacher logits ``t [n, Vt]`` with two
GEMMs, this kernel reads each row twice (instead of the dozen passes of the PyTorch row maths) and
the host multiplies the gradient back through the student's projection.

Numerics (per row with target y; ``Vs = min(V, Vt)`` shared columns; all in fp32, exp2 domain)::

    ce    = lse(s) - s[y]
    kl    = T^2 * (sum_j p_j (t_j - s_j) / T - lse(t / T) + lse(s / T))    # p = softmax(t / T) on Vs
    s[:]  = (1 - r) (softmax(s) - onehot(y)) + r T (softmax(s / T) - p)     # with WRITE_GRAD (r = kd_ratio)

Pass 1 keeps, per lane and online over the blocks, the running max and scaled sum of the three
softmaxes and ``sum exp(t/T - m) * (t - s) / T`` (rescaled with the teacher's running max), so the KL
needs no second pass; pass 2 writes the gradient. Ignored rows give zeros; a target outside ``[0, V)``
gives NaN (as ``kernels/cross_entropy.py``; the host checks targets on CPU tensors).

Launcher: ``distillation_rows(student, teacher, targets, ce, kl, ignore_index, kd_ratio, temperature,
write_grad)``, the contract of ``reference.distillation_rows_reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _online(m, d, x):
    """One block of an online log-sum-exp2 per lane: (new max, new scaled sum, the reference max the
    block was scaled by: 0 where a lane has seen only -inf, so no -inf - -inf)."""
    m_new = tl.maximum(m, x)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, d * tl.exp2(m - m_ref) + tl.exp2(x - m_ref), m_ref


@triton.jit
def _lse2(m, d):
    """log2-sum-exp2 of a row from its lanes' (max, scaled sum)."""
    m_row = tl.max(m, 0)
    return m_row + tl.log2(tl.sum(d * tl.exp2(m - m_row), 0))


@triton.jit
def _distillation_kernel(
    STUDENT,  # [n, V] student logits (overwritten with the gradient when WRITE_GRAD)
    stride_s,
    TEACHER,  # [n, Vt] teacher logits
    stride_t,
    TARGETS,  # [n] integer target ids
    CE,  # [n] fp32
    KL,  # [n] fp32
    V,
    VS,  # min(V, Vt): the columns both heads share
    ignore_index,
    kd_ratio,
    inv_temp,
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    row = tl.program_id(0).to(tl.int64)
    sp = STUDENT + row * stride_s
    tp = TEACHER + row * stride_t
    y = tl.load(TARGETS + row).to(tl.int64)
    ignored = y == ignore_index
    in_range = (y >= 0) & (y < V)
    cols0 = tl.arange(0, BLOCK_V)

    m1 = tl.full([BLOCK_V], float("-inf"), tl.float32)  # softmax(s)
    d1 = tl.zeros([BLOCK_V], tl.float32)
    m2 = tl.full([BLOCK_V], float("-inf"), tl.float32)  # softmax(s / T)
    d2 = tl.zeros([BLOCK_V], tl.float32)
    m3 = tl.full([BLOCK_V], float("-inf"), tl.float32)  # softmax(t / T)
    d3 = tl.zeros([BLOCK_V], tl.float32)
    a3 = tl.zeros([BLOCK_V], tl.float32)  # sum 2^(z - m3) (z - u): the KL's cross term, log2 units
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        x = tl.load(sp + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m1, d1, _ = _online(m1, d1, x * LOG2E)
        shared = cols < VS
        u = tl.where(shared, x * (inv_temp * LOG2E), float("-inf"))
        z = tl.load(tp + cols, mask=shared, other=float("-inf")).to(tl.float32) * (inv_temp * LOG2E)
        m2, d2, _ = _online(m2, d2, u)
        m3_old = m3
        m3, d3, ref3 = _online(m3, d3, z)
        gap = tl.where(shared, z, 0.0) - tl.where(shared, u, 0.0)  # (no -inf - -inf past the shared columns)
        a3 = a3 * tl.exp2(m3_old - ref3) + tl.where(shared, tl.exp2(z - ref3) * gap, 0.0)
    lse1 = _lse2(m1, d1)
    lse2 = _lse2(m2, d2)
    lse3 = _lse2(m3, d3)
    m_row = tl.max(m3, 0)
    cross = tl.sum(a3 * tl.exp2(m3 - m_row), 0) / tl.sum(d3 * tl.exp2(m3 - m_row), 0)  # E_p[z - u]
    temp = 1.0 / inv_temp
    kl = (cross - lse3 + lse2) / LOG2E * temp * temp

    x_y = tl.load(sp + tl.where(in_range, y, 0)).to(tl.float32)
    ce = lse1 / LOG2E - x_y
    bad = tl.where(in_range, 0.0, float("nan"))
    tl.store(CE + row, tl.where(ignored, 0.0, ce + bad))
    tl.store(KL + row, tl.where(ignored, 0.0, kl + bad))

    if WRITE_GRAD:
        scale = tl.where(ignored, 0.0, tl.where(in_range, 1.0, float("nan")))
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            mask = cols < V
            shared = cols < VS
            x = tl.load(sp + cols, mask=mask, other=0.0).to(tl.float32)
            z = tl.load(tp + cols, mask=shared, other=0.0).to(tl.float32) * (inv_temp * LOG2E)
            g = (1.0 - kd_ratio) * (tl.exp2(x * LOG2E - lse1) - tl.where(cols == y, 1.0, 0.0))
            soft = tl.exp2(x * (inv_temp * LOG2E) - lse2) - tl.exp2(z - lse3)
            g += tl.where(shared, (kd_ratio * temp) * soft, 0.0)
            tl.store(sp + cols, (g * scale).to(STUDENT.dtype.element_ty), mask=mask)


def launch_config(v: int) -> tuple[int, int]:
    """``(BLOCK_V, num_warps)``: at most 8 elements per thread (seven running accumulators per lane
    instead of cross entropy's two: wider blocks spill on sm_90). Not yet tuned on a GPU."""
    block = min(triton.next_power_of_2(max(v, 1)), 4096)
    warps = max(1, min(16, block // 256))
    return block, warps


def distillation_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    ce: torch.Tensor,
    kl: torch.Tensor,
    ignore_index: int,
    kd_ratio: float,
    temperature: float,
    write_grad: bool,
    *,
    block_v: int | None = None,
) -> None:
    """Per-row ``ce`` and ``kl`` (fp32 ``[n]``) of ``student [n, V]`` against ``teacher [n, Vt]``; with
    ``write_grad`` the student's logits are overwritten with the gradient of ``(1 - kd_ratio) ce +
    kd_ratio kl``. ``block_v`` overrides the block (tests)."""
    n, v = student.shape
    if n == 0:
        return
    if student.stride(1) != 1 or teacher.stride(1) != 1:
        raise ValueError(f"distillation_rows: logits need a contiguous last dim, got strides {student.stride()} "
                         f"and {teacher.stride()}")
    block, warps = launch_config(v)
    if block_v is not None:
        block = block_v
    _distillation_kernel[(n,)](student, student.stride(0), teacher, teacher.stride(0), targets, ce, kl, v,
                               min(v, teacher.shape[1]), ignore_index, float(kd_ratio), 1.0 / float(temperature),
                               WRITE_GRAD=write_grad, BLOCK_V=block, num_warps=warps)
