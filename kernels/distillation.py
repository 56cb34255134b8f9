"""Knowledge-distillation rows in Triton: the student's cross entropy, the KL from the teacher, and the
gradient written over the student's logits (one row per program).

The kernel half of ``apr_kernels.linear_distillation`` (``python/apr_kernels/ops/distillation.py``):
the host computes one chunk of student logits ``s [n, V]`` and teacher logits ``t [n, Vt]`` with two
GEMMs, this kernel reads each row twice (instead of the dozen passes of the PyTorch row maths) and
the host multiplies the gradient back through the student's projection.

Numerics (per row with target y; ``Vs = min(V, Vt)`` shared columns; all in fp32, exp2 domain;
``q = softmax(s / T)``, ``p = softmax(t / T)`` on Vs; ``r = kd_ratio``)::

    ce    = lse(s) - s[y]
    kl    = T^2 * D(p, q)                                # the divergence of MODE (beta)
    s[:]  = (1 - r) (softmax(s) - onehot(y)) + r T dD/d(s / T)                # with WRITE_GRAD

MODE 0 (beta 0), the forward KL(p || q) = ``sum_j p_j (t_j - s_j) / T - lse(t / T) + lse(s / T)``,
gradient ``q - p``; MODE 1 (beta 1), the reverse KL(q || p), the same with the roles swapped,
gradient ``q (log q - log p - KL)``; MODE 2, TRL's generalized JSD ``beta KL(p || m) + (1 - beta)
KL(q || m)``, ``m = beta p + (1 - beta) q``, gradient ``(1 - beta) q (l - sum q l)``, ``l = log q - log m``.

Pass 1 keeps, per lane and online over the blocks, the running max and scaled sum of the three
softmaxes and, for a KL, its cross term ``sum exp(t/T - m) * (t - s) / T`` (rescaled with the running
max of the distribution it averages over), so a KL needs no second pass; the JSD's ``log m`` needs
both normalisers, so MODE 2 reads the shared columns once more. The last pass writes the gradient.
Ignored rows give zeros; a target outside ``[0, V)`` gives NaN (as ``kernels/cross_entropy.py``; the
host checks targets on CPU tensors).

Launcher: ``distillation_rows(student, teacher, targets, ce, kl, ignore_index, kd_ratio, temperature,
write_grad, beta)``, the contract of ``reference.distillation_rows_reference``.
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
def _mixture_terms(u, z, lse2, lse3, beta, shared):
    """Per column of the shared vocabulary (log2 units in, nats out): ``(q, q (log q - log m),
    beta p (log p - log m) + (1 - beta) q (log q - log m))`` with ``m = beta p + (1 - beta) q``; zeros
    past the shared columns. ``log m`` as a log-add of two finite terms: no 0 * -inf."""
    LOG2E: tl.constexpr = 1.4426950408889634
    lq = tl.where(shared, u - lse2, 0.0)
    lp = tl.where(shared, z - lse3, 0.0)
    hi = tl.maximum(lq, lp)
    lm = hi + tl.log2((1.0 - beta) * tl.exp2(lq - hi) + beta * tl.exp2(lp - hi))
    q = tl.where(shared, tl.exp2(lq), 0.0)
    p = tl.where(shared, tl.exp2(lp), 0.0)
    ql = q * (lq - lm) / LOG2E
    return q, ql, beta * p * (lp - lm) / LOG2E + (1.0 - beta) * ql


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
    beta,  # the mixture weight of MODE 2
    WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    MODE: tl.constexpr,  # 0: forward KL(p || q); 1: reverse KL(q || p); 2: generalized JSD
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
    # a KL's cross term in log2 units: forward sum 2^(z - m3) (z - u), reverse sum 2^(u - m2) (u - z)
    a = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        x = tl.load(sp + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m1, d1, _ = _online(m1, d1, x * LOG2E)
        shared = cols < VS
        u = tl.where(shared, x * (inv_temp * LOG2E), float("-inf"))
        z = tl.load(tp + cols, mask=shared, other=float("-inf")).to(tl.float32) * (inv_temp * LOG2E)
        m2_old = m2
        m2, d2, ref2 = _online(m2, d2, u)
        m3_old = m3
        m3, d3, ref3 = _online(m3, d3, z)
        gap = tl.where(shared, z, 0.0) - tl.where(shared, u, 0.0)  # (no -inf - -inf past the shared columns)
        if MODE == 0:
            a = a * tl.exp2(m3_old - ref3) + tl.where(shared, tl.exp2(z - ref3) * gap, 0.0)
        elif MODE == 1:
            a = a * tl.exp2(m2_old - ref2) - tl.where(shared, tl.exp2(u - ref2) * gap, 0.0)
    lse1 = _lse2(m1, d1)
    lse2 = _lse2(m2, d2)
    lse3 = _lse2(m3, d3)
    temp = 1.0 / inv_temp
    s_q = 0.0  # MODE 2: sum q (log q - log m), for the gradient
    if MODE == 0:
        m_row = tl.max(m3, 0)
        cross = tl.sum(a * tl.exp2(m3 - m_row), 0) / tl.sum(d3 * tl.exp2(m3 - m_row), 0)  # E_p[z - u]
        div = (cross - lse3 + lse2) / LOG2E
    elif MODE == 1:
        m_row = tl.max(m2, 0)
        cross = tl.sum(a * tl.exp2(m2 - m_row), 0) / tl.sum(d2 * tl.exp2(m2 - m_row), 0)  # E_q[u - z]
        div = (cross - lse2 + lse3) / LOG2E
    else:  # the mixture needs both normalisers first: a second read
        acc_s = tl.zeros([BLOCK_V], tl.float32)
        acc_d = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, VS, BLOCK_V):
            cols = start + cols0
            shared = cols < VS
            u = tl.load(sp + cols, mask=shared, other=0.0).to(tl.float32) * (inv_temp * LOG2E)
            z = tl.load(tp + cols, mask=shared, other=0.0).to(tl.float32) * (inv_temp * LOG2E)
            _q, ql, term = _mixture_terms(u, z, lse2, lse3, beta, shared)
            acc_s += ql
            acc_d += term
        s_q = tl.sum(acc_s, 0)
        div = tl.sum(acc_d, 0)
    kl = div * temp * temp

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
            u = x * (inv_temp * LOG2E)
            if MODE == 0:  # q - p
                soft = tl.exp2(u - lse2) - tl.exp2(z - lse3)
            elif MODE == 1:  # q (log q - log p - KL)
                soft = tl.exp2(u - lse2) * ((u - lse2 - z + lse3) / LOG2E - div)
            else:  # (1 - beta) q (log q - log m - sum q (log q - log m))
                q, ql, _term = _mixture_terms(u, z, lse2, lse3, beta, shared)
                soft = (1.0 - beta) * (ql - q * s_q)
            g += tl.where(shared, (kd_ratio * temp) * soft, 0.0)
            tl.store(sp + cols, (g * scale).to(STUDENT.dtype.element_ty), mask=mask)


def mode_of(beta: float) -> int:
    """The kernel's MODE for the divergence ``beta`` names (TRL's generalized JSD endpoints)."""
    return 0 if beta == 0 else 1 if beta == 1 else 2


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
    beta: float = 0.0,
    *,
    block_v: int | None = None,
) -> None:
    """Per-row ``ce`` and ``kl`` (fp32 ``[n]``: the divergence ``beta`` names) of ``student [n, V]``
    against ``teacher [n, Vt]``; with ``write_grad`` the student's logits are overwritten with the
    gradient of ``(1 - kd_ratio) ce + kd_ratio kl``. ``block_v`` overrides the block (tests)."""
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
                               float(beta), WRITE_GRAD=write_grad, BLOCK_V=block, MODE=mode_of(beta),
                               num_warps=warps)
