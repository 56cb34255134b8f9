"""The embedding, output head and losses split by vocabulary range over a tensor-parallel group
(``train/tensor_parallel.py``; Megatron-LM's vocab-parallel embedding and cross entropy).

When N divides the vocabulary, rank t of the group holds the rows of token ids ``t * V/N ..`` of the
embedding and of the output head:

* ``VocabParallelEmbedding``: a masked lookup of the ids in this rank's range, summed over the group
  (by ``TensorParallel.leave``);
* ``vocab_parallel_losses``: the cross entropy of ``h @ W.T`` with each rank computing its columns of
  the logits, a chunk of rows at a time, only per-row maxima, exponential sums and target logits (and
  label smoothing's logit sums) all-reduced; the backward makes each chunk's logits again, so no
  ``[tokens, V/N]`` tensor outlives its chunk. The row passes over a chunk (its statistics; the
  gradient written over its logits) are Triton kernels on the GPU (``kernels/cross_entropy.py``'s
  ``split_vocab_stats`` / ``split_vocab_grad``: one read, one read and write, in the logits' dtype);
* ``vocab_parallel_distillation``: knowledge distillation's loss (``ops/distillation.py``'s objective:
  cross entropy plus the temperature-scaled forward KL, reverse KL or generalized JSD from a whole
  teacher) the same way: each rank takes the teacher's logits of its own columns too, and the
  divergence's normalisers and sums are all-reduced per row (two exchanges per chunk, three for the
  generalized JSD, whose mixture needs both normalisers first);
* ``vocab_parallel_logits``: whole logits (generation, a forward without targets), the columns
  all-gathered.

Under sequence parallelism each rank computes the losses of the whole rows (the positions gathered)
for its columns and keeps its own positions'; the incoming gradients then differ between the ranks
and are summed over the group first.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import _functional_collectives as funcol

from .distributed import all_gather

if TYPE_CHECKING:
    from .tensor_parallel import TensorParallel


def gather_positions(t: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """The whole rows of the group's chunks ``t`` ``[B, T/N, ...]`` (token ids, targets: no gradient)."""
    return all_gather(t, 1, tp.group)


class VocabParallelEmbedding(nn.Embedding):
    """``embed_tokens`` holding this rank's ``vocab / N`` rows (ids ``rank * vocab/N ..``): each rank
    looks up the ids in its range (zeros elsewhere) and ``leave`` sums the group's parts (sequence
    parallelism: the whole rows' ids gathered first, each rank keeping its chunk of the sum)."""

    tensor_parallel: TensorParallel

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tp = self.tensor_parallel
        if tp.sequence_parallel:
            ids = gather_positions(ids, tp)
        local = ids - tp.rank * self.num_embeddings
        inside = (local >= 0) & (local < self.num_embeddings)
        e = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight)
        return tp.leave(e * inside.unsqueeze(-1).to(e.dtype))


def _dtypes(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(the GEMMs' dtype: autocast's, else the inputs'; the row maths' dtype: fp32, fp64 for fp64)."""
    dev = hidden.device.type
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else \
        torch.promote_types(hidden.dtype, weight.dtype)
    return cdt, torch.promote_types(cdt, torch.float32)


def _local_targets(targets: torch.Tensor, width: int, tp: TensorParallel) -> tuple[torch.Tensor, torch.Tensor]:
    """(each target's column among this rank's ``width``, clamped into range; whether it is this rank's)."""
    local = targets - tp.rank * width
    owned = (local >= 0) & (local < width)
    return local.clamp(0, width - 1), owned


def _all_reduce(t: torch.Tensor, op: str, tp: TensorParallel) -> torch.Tensor:
    return funcol.wait_tensor(funcol.all_reduce(t.contiguous(), op, tp.group))


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """Per-token cross entropy (-100: ignored, 0) of ``hidden @ weight.T`` where ``weight`` holds this
    rank's rows of the output head (a range of the vocabulary): Megatron-LM's vocab-parallel cross
    entropy, computed ``chunk_rows`` rows at a time as the fused loss is (``ops/cross_entropy.py``):
    each chunk's logits columns come from one GEMM in the compute dtype, their row maxima, exponential
    sums, target logits (and for label smoothing logit sums) are all-reduced over the group, and the
    backward makes each chunk's logits again, so no ``[tokens, vocab / N]`` tensor outlives its chunk.
    ``split_loss``: the ranks hold different tokens' losses (sequence parallelism), so the incoming
    gradients are summed over the group first."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, tp, label_smoothing: float, z_loss: float, split_loss: bool,
                chunk_rows: int):
        cdt, acc = _dtypes(hidden, weight)
        width = weight.shape[0]
        local, owned = _local_targets(targets, width, tp)
        here = torch.where(owned, local, -1)  # (the target's column among this rank's, or -1)
        stats_rows, _ = _row_passes(hidden, cdt)
        w = weight.to(cdt)
        n = hidden.shape[0]
        stats = torch.empty(4, n, dtype=acc, device=hidden.device)  # max, exp sum, target logit, logit sum
        for a in range(0, n, chunk_rows):
            z = hidden[a:a + chunk_rows].to(cdt) @ w.T
            part = torch.empty(4, z.shape[0], dtype=acc, device=z.device)
            stats[:, a:a + chunk_rows] = stats_rows(z, here[a:a + chunk_rows], part, bool(label_smoothing))
        m = _all_reduce(stats[0], "max", tp)
        stats[1] *= (stats[0] - m).exp()
        total, target_logit, logit_sum = _all_reduce(stats[1:], "sum", tp)
        lse = m + total.log()
        loss = lse - (1 - label_smoothing) * target_logit - label_smoothing * logit_sum / (width * tp.size)
        if z_loss:
            loss = loss + z_loss * lse.square()
        keep = targets != -100
        ctx.save_for_backward(hidden, weight, lse, here, keep)
        ctx.settings = (tp, label_smoothing, z_loss, split_loss, chunk_rows, cdt, acc)
        return loss * keep

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, lse, here, keep = ctx.saved_tensors
        tp, label_smoothing, z_loss, split_loss, chunk_rows, cdt, acc = ctx.settings
        if split_loss:
            grad = _all_reduce(grad, "sum", tp)
        grad = (grad * keep).to(acc)
        _, grad_rows = _row_passes(hidden, cdt)
        w = weight.to(cdt)
        d_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        vocab = weight.shape[0] * tp.size
        for a in range(0, hidden.shape[0], chunk_rows):
            rows = slice(a, a + chunk_rows)
            h = hidden[rows].to(cdt)
            # this rank's columns of the gradient, written over the chunk's logits
            d = grad_rows(h @ w.T, here[rows], lse[rows], grad[rows], vocab, label_smoothing, z_loss)
            d_hidden[rows] = d @ w
            d_weight += (d.T @ h).to(acc)
        return d_hidden, d_weight.to(weight.dtype), None, None, None, None, None, None


def _row_passes(hidden: torch.Tensor, cdt: torch.dtype):
    """(stats, grad) row passes over a chunk of this rank's logit columns: the Triton kernels of
    ``kernels/cross_entropy.py`` where they run (CUDA, or ``APR_KERNELS_BACKEND=triton``) and compute
    ``cdt``, else their PyTorch references."""
    from apr_kernels import backend
    from apr_kernels.ops import reference as ref

    if backend.use_triton(hidden):
        k = backend.kernels("cross_entropy")
        if cdt in k.DTYPES:
            return k.split_vocab_stats, k.split_vocab_grad
    return ref.split_vocab_stats_reference, ref.split_vocab_grad_reference


class _GatherVocab(torch.autograd.Function):
    """Whole logits from the group's vocabulary ranges (a forward's output, the same on every rank);
    the gradient: this rank's columns."""

    @staticmethod
    def forward(ctx, x, tp):
        ctx.tp = tp
        return all_gather(x, x.dim() - 1, tp.group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.tp.local(grad, grad.dim() - 1).contiguous(), None


def vocab_parallel_logits(h: torch.Tensor, weight: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Whole logits of hidden states ``h`` (whole rows) from the group's output-projection rows."""
    if tp.sequence_parallel:
        raise ValueError("logits under --sequence-parallel: each rank holds a chunk of the positions; expected "
                         "loss() (or the model's whole_sequences())")
    return _GatherVocab.apply(F.linear(tp.enter(h), weight), tp)


def vocab_parallel_losses(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, tp: TensorParallel,
                          label_smoothing: float = 0.0, z_loss: float = 0.0, chunk_rows: int | None = None
                          ) -> torch.Tensor:
    """Per-token losses (flat, this rank's positions) of hidden states ``h`` under output-projection
    rows ``weight`` split by vocabulary range: each rank computes its columns of the logits of the
    whole rows (sequence parallelism: gathered), a chunk of rows at a time, and keeps the losses of
    its own positions."""
    from apr_kernels.ops.cross_entropy import default_chunk_rows

    sp = tp.sequence_parallel
    whole = gather_positions(targets, tp) if sp else targets
    h = tp.enter(h).flatten(0, 1)
    per = _VocabParallelLinearCrossEntropy.apply(h, weight, whole.flatten(), tp, label_smoothing, z_loss, sp,
                                                 chunk_rows or default_chunk_rows(h.shape[0], weight.shape[0]))
    return tp.chunk(per.view(whole.shape)).flatten() if sp else per


class _VocabParallelLinearDistillation(torch.autograd.Function):
    """Per-token distillation losses ``(1 - r) ce + r T^2 D`` (``ops/distillation.py``'s objective and
    ``reference.distillation_rows_reference``'s row maths) of student logits ``hidden @ weight.T``,
    ``weight`` this rank's rows of the output head, against the teacher's logits ``teacher_hidden @
    teacher_weight.T`` (the teacher whole: this rank takes its own columns of them), a chunk of rows
    at a time. Per row the maxima of the student's logits, of its and the teacher's softened shared
    columns are all-reduced (max), then the exponential sums, the target logit and the divergence's
    sum (sum); the generalized JSD needs a third exchange for its mixture's sums. Returns ``(loss,
    ce, divergence)`` per token (the last two without gradient); ``split_loss`` as for the cross
    entropy. The backward makes each chunk's logits again from the kept per-row normalisers."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, targets, tp, kd_ratio: float, temperature: float,
                beta: float, split_loss: bool, chunk_rows: int):
        cdt, acc = _dtypes(hidden, weight)
        width = weight.shape[0]
        local, owned = _local_targets(targets, width, tp)
        # this rank's columns inside the vocabulary both heads share (the divergence's)
        shared = max(0, min(width, min(width * tp.size, teacher_weight.shape[0]) - tp.rank * width))
        w, tw = weight.to(cdt), teacher_weight[tp.rank * width:tp.rank * width + shared].to(cdt)
        n, T = hidden.shape[0], temperature
        norms = torch.empty(4, n, dtype=acc, device=hidden.device)  # lse of s, of s'/T, of t/T; sum q l
        loss, ce_all, div_all = (torch.empty(n, dtype=acc, device=hidden.device) for _ in range(3))
        for a in range(0, n, chunk_rows):
            rows = slice(a, a + chunk_rows)
            s = (hidden[rows].to(cdt) @ w.T).to(acc)
            u = s[:, :shared] / T  # the student's and teacher's softened shared logits
            z = (teacher_hidden[rows].to(cdt) @ tw.T).to(acc) / T
            maxima = torch.stack([s.amax(-1)] + [x.amax(-1) if shared else torch.full_like(s[:, 0], -math.inf)
                                                 for x in (u, z)])
            ms, mq, mp = _all_reduce(maxima, "max", tp)
            eu, ez = (u - mq[:, None]).exp(), (z - mp[:, None]).exp()
            sums = torch.stack([(s - ms[:, None]).exp().sum(-1), s.gather(1, local[rows, None])[:, 0] * owned[rows],
                                eu.sum(-1), ez.sum(-1),
                                # the divergence's sum over the columns when one exchange gives it
                                (ez * (z - u)).sum(-1) if beta == 0 else (eu * (u - z)).sum(-1) if beta == 1
                                else torch.zeros_like(ms)])
            total, target, sq, sp, cross = _all_reduce(sums, "sum", tp)
            lse_s, lse_q, lse_p = ms + total.log(), mq + sq.log(), mp + sp.log()
            if beta == 0:  # KL(p || q) = sum p (t - s') / T - lse_p + lse_q
                div = cross / sp - lse_p + lse_q
                qell = torch.zeros_like(div)
            elif beta == 1:  # KL(q || p)
                div = qell = cross / sq - lse_q + lse_p
            else:  # beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
                log_q, log_p = u - lse_q[:, None], z - lse_p[:, None]
                log_m = torch.logaddexp(log_q + math.log(1 - beta), log_p + math.log(beta))
                q, p = log_q.exp(), log_p.exp()
                parts = torch.stack([(beta * p * (log_p - log_m) + (1 - beta) * q * (log_q - log_m)).sum(-1),
                                     (q * (log_q - log_m)).sum(-1)])
                div, qell = _all_reduce(parts, "sum", tp)
            ce = lse_s - target
            loss[rows], ce_all[rows], div_all[rows] = (1 - kd_ratio) * ce + kd_ratio * T * T * div, ce, T * T * div
            norms[:, rows] = torch.stack([lse_s, lse_q, lse_p, qell])
        keep = targets != -100
        for x in (loss, ce_all, div_all):
            x.mul_(keep)
        ctx.save_for_backward(hidden, weight, teacher_hidden, teacher_weight, norms, local, owned, keep)
        ctx.settings = (tp, kd_ratio, T, beta, split_loss, chunk_rows, cdt, acc, shared)
        ctx.mark_non_differentiable(ce_all, div_all)
        return loss, ce_all, div_all

    @staticmethod
    def backward(ctx, grad, _g_ce, _g_div):
        hidden, weight, teacher_hidden, teacher_weight, norms, local, owned, keep = ctx.saved_tensors
        tp, kd_ratio, T, beta, split_loss, chunk_rows, cdt, acc, shared = ctx.settings
        if split_loss:
            grad = _all_reduce(grad, "sum", tp)
        grad = (grad * keep).to(acc)
        width = weight.shape[0]
        w, tw = weight.to(cdt), teacher_weight[tp.rank * width:tp.rank * width + shared].to(cdt)
        d_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        for a in range(0, hidden.shape[0], chunk_rows):
            rows = slice(a, a + chunk_rows)
            lse_s, lse_q, lse_p, qell = (x[:, None] for x in norms[:, rows])
            h = hidden[rows].to(cdt)
            s = (h @ w.T).to(acc)
            d = (s - lse_s).exp().mul_(1 - kd_ratio)  # (1 - r)(softmax(s) - onehot(target))
            hit = owned[rows].nonzero()[:, 0]
            d[hit, local[rows][hit]] -= 1 - kd_ratio
            if shared:  # r T dD/du on the shared columns, u = s' / T
                log_q = s[:, :shared] / T - lse_q
                log_p = (teacher_hidden[rows].to(cdt) @ tw.T).to(acc) / T - lse_p
                q = log_q.exp()
                if beta == 0:
                    d_u = q - log_p.exp()
                elif beta == 1:
                    d_u = q * (log_q - log_p - qell)
                else:
                    log_m = torch.logaddexp(log_q + math.log(1 - beta), log_p + math.log(beta))
                    d_u = (1 - beta) * q * (log_q - log_m - qell)
                d[:, :shared] += kd_ratio * T * d_u
            d = (d * grad[rows, None]).to(cdt)
            d_hidden[rows] = d @ w
            d_weight += (d.T @ h).to(acc)
        return (d_hidden, d_weight.to(weight.dtype)) + (None,) * 9


def vocab_parallel_distillation(h: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                                teacher_weight: torch.Tensor, targets: torch.Tensor, tp: TensorParallel, *,
                                kd_ratio: float, temperature: float, beta: float = 0.0,
                                chunk_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token ``(loss, ce, kl)`` (flat, this rank's positions; ``ce`` and ``kl`` without gradient) of
    distilling the teacher (hidden states ``teacher_hidden`` of the same positions as ``h``, its whole
    output weight) into the student whose output-projection rows ``weight`` are split by vocabulary
    range, without whole logits of either (``_VocabParallelLinearDistillation``)."""
    from apr_kernels.ops.distillation import default_chunk_rows

    sp = tp.sequence_parallel
    whole = gather_positions(targets, tp) if sp else targets
    th = (gather_positions(teacher_hidden, tp) if sp else teacher_hidden).flatten(0, 1)
    h = tp.enter(h).flatten(0, 1)
    parts = _VocabParallelLinearDistillation.apply(
        h, weight, th, teacher_weight, whole.flatten(), tp, kd_ratio, temperature, beta, sp,
        chunk_rows or default_chunk_rows(h.shape[0], 2 * weight.shape[0]))
    return tuple(tp.chunk(x.view(whole.shape)).flatten() for x in parts) if sp else parts
