"""Knowledge distillation fused with both output projections, as a torch custom op with autograd.

Public function (also ``apr_kernels.linear_distillation``)::

    linear_distillation(hidden, weight, teacher_hidden, teacher_weight, targets, *, kd_ratio=0.5,
                        temperature=1.0, beta=0.0, ignore_index=-100, reduction="mean", chunk_rows=None)
        -> (loss, ce, kl)                                              # fp32 scalars

For every position whose target is not ignored, with student logits ``s = hidden @ weight.T`` and
teacher logits ``t = teacher_hidden @ teacher_weight.T``::

    ce   = cross_entropy(s, target)
    kl   = T^2 * KL(softmax(t / T) || softmax(s / T))       # forward KL, over the shared vocabulary
    loss = (1 - kd_ratio) * ce + kd_ratio * kl

``beta`` picks the divergence as TRL's generalized JSD (GKD, Agarwal et al.) and Liger's JSD do:
0 the forward KL above (the default), 1 the reverse KL(softmax(s / T) || softmax(t / T)), mode-seeking,
and between them ``beta KL(p || m) + (1 - beta) KL(q || m)`` with ``m = beta p + (1 - beta) q``
(``p``, ``q`` the teacher's and student's softened distributions); ``kl`` is that divergence.

summed (``reduction="sum"``) or averaged over those positions. This is the objective of Hinton et
al.'s distillation (the ``T^2`` keeps the soft term's gradient scale as ``T`` grows) and, at ``T = 1``,
torchtune's knowledge-distillation recipe (its forward KL drops the teacher's entropy, a constant:
the same gradients). Only ``loss`` has gradients, for ``hidden`` and ``weight``; the teacher is a
constant. ``ce`` and ``kl`` are its parts, for the logs.

Vocabulary: the KL runs over the ``min(V, V_teacher)`` leading columns, the rows both heads share
(the same tokenizer padded differently: Qwen2.5-0.5B has 151,936 output rows, Qwen2.5-7B 152,064).

As ``linear_cross_entropy`` does, rows are processed ``chunk_rows`` at a time and the two
``[tokens, vocab]`` logit blocks are never held whole: per chunk one GEMM for each head in the
compute dtype (the autocast dtype under ``torch.autocast``), the row losses and the gradient with
respect to the student's logits in fp32, written over the student's logits (the Triton kernel of
``kernels/distillation.py`` on CUDA, two reads of each row; ``reference.distillation_rows_reference``
elsewhere), then two GEMMs for the chunk's share of d hidden and d weight. The gradients are formed
in the forward; the backward scales them.

Op (opaque to torch.compile)::

    apr::linear_distillation(hidden [N, H], weight [V, H], teacher_hidden [N, Ht], teacher_weight [Vt, Ht],
                             targets [N], ignore_index, compute_dtype, with_grad, chunk_rows, kd_ratio,
                             temperature, beta) -> (sums [3]: loss, ce, kl; count; d_hidden; d_weight)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from apr_kernels import backend
from apr_kernels.ops import reference as ref
from apr_kernels.ops.cross_entropy import check_targets

# Logit elements per chunk: the fp32 row maths holds about four [rows, V] blocks (2^26: 256 MiB each).
CHUNK_ELEMENTS = 1 << 26


def default_chunk_rows(n_rows: int, vocab: int) -> int:
    return max(1, min(n_rows, CHUNK_ELEMENTS // max(vocab, 1)))


def _rows_reference(student: Tensor, teacher: Tensor, targets: Tensor, ce: Tensor, kl: Tensor, ignore_index: int,
                    kd_ratio: float, temperature: float, write_grad: bool, beta: float = 0.0) -> None:
    """``reference.distillation_rows_reference`` with the Triton launcher's in-place contract."""
    c, k, grad = ref.distillation_rows_reference(student, teacher, targets, ignore_index, kd_ratio, temperature,
                                                 write_grad, beta)
    ce.copy_(c)
    kl.copy_(k)
    if write_grad:
        student.copy_(grad)


def _row_kernel(student: Tensor, teacher: Tensor, targets: Tensor):
    """The Triton launcher when this call should (and can) run it, else the reference."""
    if teacher.dtype != student.dtype:
        return _rows_reference
    kern = backend.kernels_for("distillation", student, teacher, targets)
    return _rows_reference if kern is None else kern.distillation_rows


def _impl(hidden: Tensor, weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor, targets: Tensor,
          ignore_index: int, compute_dtype: Optional[torch.dtype], with_grad: bool, chunk_rows: int,
          kd_ratio: float, temperature: float, beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n, h = hidden.shape
    cdt = compute_dtype or torch.promote_types(hidden.dtype, weight.dtype)
    hc, wc = hidden.to(cdt), weight.to(cdt)
    thc, twc = teacher_hidden.to(cdt), teacher_weight.to(cdt)
    acc = torch.promote_types(cdt, torch.float32)
    sums = torch.zeros(3, dtype=torch.promote_types(acc, torch.float32), device=hidden.device)
    dh = torch.empty((n, h) if with_grad else (0,), dtype=cdt, device=hidden.device)
    dw_dtype = torch.promote_types(weight.dtype, torch.float32)
    dw = torch.zeros(weight.shape if with_grad else (0,), dtype=dw_dtype, device=weight.device)
    rows_fn = None
    for s in range(0, n, max(1, int(chunk_rows))):
        e = min(n, s + max(1, int(chunk_rows)))
        with torch.no_grad():
            student = hc[s:e] @ wc.t()  # [rows, V] in cdt, contiguous
            teacher = thc[s:e] @ twc.t()
            if rows_fn is None:
                rows_fn = _row_kernel(student, teacher, targets)
            ce = torch.empty(e - s, dtype=sums.dtype, device=hidden.device)
            kl = torch.empty_like(ce)
            rows_fn(student, teacher, targets[s:e], ce, kl, ignore_index, kd_ratio, temperature, with_grad, beta)
            del teacher
            sums += torch.stack([((1 - kd_ratio) * ce + kd_ratio * kl).sum(), ce.sum(), kl.sum()])
            if with_grad:  # the student's logits now hold d loss / d logits
                torch.mm(student, wc, out=dh[s:e])
                dw.add_((student.t() @ hc[s:e]).to(dw_dtype))
            del student
    count = (targets != ignore_index).sum()
    return sums, count, dh.to(hidden.dtype), dw.to(weight.dtype)


_op = torch.library.custom_op("apr::linear_distillation", mutates_args=())(_impl)


@_op.register_fake
def _(hidden, weight, teacher_hidden, teacher_weight, targets, ignore_index, compute_dtype, with_grad, chunk_rows,
      kd_ratio, temperature, beta):
    cdt = compute_dtype or torch.promote_types(hidden.dtype, weight.dtype)
    sums = torch.empty(3, dtype=torch.promote_types(cdt, torch.float32), device=hidden.device)
    count = torch.empty((), dtype=torch.int64, device=hidden.device)
    dh = torch.empty(hidden.shape if with_grad else (0,), dtype=hidden.dtype, device=hidden.device)
    dw = torch.empty(weight.shape if with_grad else (0,), dtype=weight.dtype, device=weight.device)
    return sums, count, dh, dw


def _setup(ctx, inputs, output):
    ctx.with_grad = inputs[7]
    _sums, _count, dh, dw = output
    ctx.save_for_backward(dh, dw)


def _backward(ctx, g_sums, _g_count, _g_dh, _g_dw):
    if not ctx.with_grad:
        raise RuntimeError("apr::linear_distillation was called with with_grad=False; call "
                           "apr_kernels.linear_distillation, which sets it when autograd needs it")
    dh, dw = ctx.saved_tensors
    g = g_sums[0]  # (the public function detaches the ce and kl parts)
    return dh * g.to(dh.dtype), dw * g.to(dw.dtype), None, None, None, None, None, None, None, None, None, None


_op.register_autograd(_backward, setup_context=_setup)


def linear_distillation(
    hidden: Tensor, weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor, targets: Tensor, *,
    kd_ratio: float = 0.5, temperature: float = 1.0, beta: float = 0.0, ignore_index: int = -100,
    reduction: str = "mean", chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, ce, kl)`` of the student head ``hidden [..., H] @ weight.T`` distilled from the teacher
    head ``teacher_hidden [..., Ht] @ teacher_weight.T`` (module docstring); ``reduction`` "mean" (over
    non-ignored targets) or "sum". Gradients flow from ``loss`` to ``hidden`` and ``weight``."""
    where = "linear_distillation"
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{where}: reduction must be 'mean' or 'sum', got {reduction!r}")
    if not 0.0 <= kd_ratio <= 1.0 or not temperature > 0 or not 0.0 <= beta <= 1.0:
        raise ValueError(f"{where}: kd_ratio={kd_ratio}, temperature={temperature}, beta={beta}; expected "
                         f"0 <= kd_ratio <= 1, temperature > 0 and 0 <= beta <= 1")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{where}: hidden [..., H] and weight [V, H] must share H; got hidden "
                         f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    if teacher_weight.dim() != 2 or teacher_hidden.shape[-1] != teacher_weight.shape[1]:
        raise ValueError(f"{where}: teacher_hidden [..., Ht] and teacher_weight [Vt, Ht] must share Ht; got "
                         f"{tuple(teacher_hidden.shape)} and {tuple(teacher_weight.shape)}")
    if tuple(teacher_hidden.shape[:-1]) != tuple(hidden.shape[:-1]) or tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{where}: teacher_hidden and targets must cover the student's positions "
                         f"{tuple(hidden.shape[:-1])}; got {tuple(teacher_hidden.shape[:-1])} and "
                         f"{tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"{where}: targets must be integer token ids, got {targets.dtype}")
    h2, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    th2 = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    vocab = weight.shape[0]
    check_targets(t, vocab, ignore_index, where)
    dev = hidden.device.type
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    rows = chunk_rows if chunk_rows is not None else default_chunk_rows(h2.shape[0], max(vocab, teacher_weight.shape[0]))
    sums, count, _, _ = _op(h2, weight, th2, teacher_weight.detach(), t, int(ignore_index), cdt, with_grad, int(rows),
                            float(kd_ratio), float(temperature), float(beta))
    if reduction == "mean":
        sums = sums / count
    return sums[0], sums[1].detach(), sums[2].detach()
