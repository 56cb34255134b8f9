"""The output projection fused with next-token cross entropy, as a torch custom op with autograd.

Public function (also ``apr_kernels.linear_cross_entropy``)::

    linear_cross_entropy(hidden, weight, targets, *, ignore_index=-100, reduction="mean",
                         chunk_rows=None, label_smoothing=0.0, z_loss=0.0) -> loss
                                                        # fp32 scalar ("none": per position)

is ``F.cross_entropy(F.linear(hidden, weight).float().flatten(0, -2), targets.flatten(),
ignore_index=..., reduction=...)`` (what Hugging Face's causal-LM loss computes) without ever
holding the ``[tokens, vocab]`` logits: rows are processed ``chunk_rows`` at a time. For each chunk
the logits come from one GEMM in the compute dtype, the loss and d loss / d logits are computed in
fp32 and the gradient overwrites the logits (the Triton kernel of ``kernels/cross_entropy.py`` on
CUDA, ``reference.cross_entropy_rows_reference`` elsewhere), then two more GEMMs turn it into this
chunk's share of d hidden and d weight (the latter summed over chunks in fp32). The gradients are thus
computed during the forward, as in Liger-Kernel's fused linear cross entropy; the backward only scales
them by the incoming gradient. At Qwen2's 151,936-token vocabulary and 8k tokens this replaces ~10 GB
of logits, fp32 copies and their gradients with one ~0.5 GB chunk.

Compute dtype: under ``torch.autocast`` the autocast dtype (as ``F.linear`` would use), else
``promote(hidden.dtype, weight.dtype)``. The loss is then the same as the eager expression's: bf16
logits, cross entropy in fp32. ``reduction="mean"`` divides by the number of non-ignored targets (NaN
when there are none, like torch).

Op (opaque to torch.compile, so no graph breaks)::

    apr::linear_cross_entropy(hidden [N, H], weight [V, H], targets [N], ignore_index, compute_dtype,
                              with_grad, chunk_rows, label_smoothing, z_loss)
        -> (loss_sum, count, d_hidden, d_weight)

``d_hidden``/``d_weight`` are empty when ``with_grad`` is False (no autograd needed: evaluation).

``reduction="none"`` (per-token log-likelihoods for RL objectives such as GRPO's clipped ratio and
KL, whose per-token gradients are only known after the forward) takes a second op pair: the forward
computes the rows' losses only, and the backward recomputes each chunk's logits and scales each
row's ``softmax - onehot`` by its incoming gradient (four GEMMs per chunk instead of three)::

    apr::linear_cross_entropy_rows(hidden, weight, targets, ignore_index, compute_dtype, chunk_rows,
                                   label_smoothing, z_loss) -> loss [N]
    apr::linear_cross_entropy_rows_backward(grad [N], hidden, weight, targets, ...) -> (d_hidden, d_weight)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from apr_kernels import backend
from apr_kernels.ops import reference as ref

# Logits elements per chunk (2^28: 512 MiB in bf16). Large enough for efficient GEMMs and few fp32
# d_weight accumulations, small next to the unchunked logits of a 150k vocabulary.
CHUNK_ELEMENTS = 1 << 28


def default_chunk_rows(n_rows: int, vocab: int) -> int:
    return max(1, min(n_rows, CHUNK_ELEMENTS // max(vocab, 1)))


def _row_kernel(logits: Tensor, targets: Tensor):
    """The Triton launcher when this call should (and can) run it, else the reference."""
    kern = backend.kernels_for("cross_entropy", logits, targets)
    return ref.cross_entropy_rows_reference if kern is None else kern.cross_entropy_rows


def _chunked(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, cdt: torch.dtype,
             chunk_rows: int, rows_loss: Tensor, with_grad: bool, label_smoothing: float, z_loss: float,
             row_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The chunk loop every op here runs: per-row losses into ``rows_loss``; with ``with_grad`` also
    ``(d hidden, d weight)`` of the rows' losses, each row's gradient scaled by ``row_scale`` when given
    (the per-row incoming gradient of ``reduction="none"``), else summed; empty tensors otherwise."""
    n, h = hidden.shape
    v = weight.shape[0]
    hc, wc = hidden.to(cdt), weight.to(cdt)  # no copies when the dtypes already match
    dh = torch.empty((n, h) if with_grad else (0,), dtype=cdt, device=hidden.device)
    acc = torch.promote_types(weight.dtype, torch.float32)
    dw = torch.zeros((v, h) if with_grad else (0,), dtype=acc, device=weight.device)
    step = max(1, int(chunk_rows))
    rows_fn = None
    for s in range(0, n, step):
        e = min(n, s + step)
        logits = hc[s:e] @ wc.t()  # [rows, V] in cdt, contiguous
        if rows_fn is None:
            rows_fn = _row_kernel(logits, targets)
        rows_fn(logits, targets[s:e], rows_loss[s:e], ignore_index, with_grad, label_smoothing, z_loss)
        if with_grad:  # logits now hold d(sum loss)/d logits
            if row_scale is not None:
                logits.mul_(row_scale[s:e, None].to(logits.dtype))
            torch.mm(logits, wc, out=dh[s:e])
            if cdt == acc:
                dw.addmm_(logits.t(), hc[s:e])
            else:  # bf16/fp16 GEMM (fp32 accumulation inside), chunks summed in fp32
                dw.add_(logits.t() @ hc[s:e])
        del logits
    return dh.to(hidden.dtype), dw.to(weight.dtype)


def _compute_dtype(hidden: Tensor, weight: Tensor, compute_dtype: Optional[torch.dtype]) -> torch.dtype:
    return compute_dtype or torch.promote_types(hidden.dtype, weight.dtype)


def _rows_loss(hidden: Tensor, cdt: torch.dtype) -> Tensor:
    return torch.empty(hidden.shape[0], dtype=torch.promote_types(cdt, torch.float32), device=hidden.device)


def _linear_cross_entropy_impl(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, compute_dtype: Optional[torch.dtype],
    with_grad: bool, chunk_rows: int, label_smoothing: float, z_loss: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    cdt = _compute_dtype(hidden, weight, compute_dtype)
    rows_loss = _rows_loss(hidden, cdt)
    dh, dw = _chunked(hidden, weight, targets, ignore_index, cdt, chunk_rows, rows_loss, with_grad, label_smoothing,
                      z_loss)
    loss_sum = rows_loss.sum(dtype=torch.float32) if rows_loss.dtype != torch.float64 else rows_loss.sum()
    count = (targets != ignore_index).sum()
    return loss_sum, count, dh, dw


_op = torch.library.custom_op("apr::linear_cross_entropy", mutates_args=())(_linear_cross_entropy_impl)


@_op.register_fake
def _(hidden, weight, targets, ignore_index, compute_dtype, with_grad, chunk_rows, label_smoothing, z_loss):
    cdt = compute_dtype or torch.promote_types(hidden.dtype, weight.dtype)
    loss_dtype = torch.promote_types(cdt, torch.float32)
    loss = torch.empty((), dtype=loss_dtype, device=hidden.device)
    count = torch.empty((), dtype=torch.int64, device=hidden.device)
    dh = torch.empty(hidden.shape if with_grad else (0,), dtype=hidden.dtype, device=hidden.device)
    dw = torch.empty(weight.shape if with_grad else (0,), dtype=weight.dtype, device=weight.device)
    return loss, count, dh, dw


def _setup(ctx, inputs, output):
    _h, _w, _t, _ii, _cdt, with_grad, _c, _e, _z = inputs
    _loss, _count, dh, dw = output
    ctx.with_grad = with_grad
    ctx.save_for_backward(dh, dw)


def _backward(ctx, g_loss, _g_count, _g_dh, _g_dw):
    if not ctx.with_grad:
        raise RuntimeError("apr::linear_cross_entropy was called with with_grad=False; call "
                           "apr_kernels.linear_cross_entropy, which sets it when autograd needs it")
    dh, dw = ctx.saved_tensors
    return dh * g_loss.to(dh.dtype), dw * g_loss.to(dw.dtype), None, None, None, None, None, None, None


_op.register_autograd(_backward, setup_context=_setup)


# reduction="none": per-row losses whose incoming gradients are only known in the backward, so the
# forward computes losses only and the backward recomputes each chunk's logits (one GEMM more than
# the summed op: four instead of three).
@torch.library.custom_op("apr::linear_cross_entropy_rows", mutates_args=())
def _rows_op(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int,
             compute_dtype: Optional[torch.dtype], chunk_rows: int, label_smoothing: float, z_loss: float) -> Tensor:
    cdt = _compute_dtype(hidden, weight, compute_dtype)
    rows_loss = _rows_loss(hidden, cdt)
    _chunked(hidden, weight, targets, ignore_index, cdt, chunk_rows, rows_loss, False, label_smoothing, z_loss)
    return rows_loss


@_rows_op.register_fake
def _(hidden, weight, targets, ignore_index, compute_dtype, chunk_rows, label_smoothing, z_loss):
    return _rows_loss(hidden, _compute_dtype(hidden, weight, compute_dtype))


@torch.library.custom_op("apr::linear_cross_entropy_rows_backward", mutates_args=())
def _rows_backward_op(grad: Tensor, hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int,
                      compute_dtype: Optional[torch.dtype], chunk_rows: int, label_smoothing: float,
                      z_loss: float) -> tuple[Tensor, Tensor]:
    cdt = _compute_dtype(hidden, weight, compute_dtype)
    return _chunked(hidden, weight, targets, ignore_index, cdt, chunk_rows, _rows_loss(hidden, cdt), True,
                    label_smoothing, z_loss, row_scale=grad)


@_rows_backward_op.register_fake
def _(grad, hidden, weight, targets, ignore_index, compute_dtype, chunk_rows, label_smoothing, z_loss):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _rows_setup(ctx, inputs, output):
    hidden, weight, targets, ctx.ignore_index, ctx.compute_dtype, ctx.chunk_rows, ctx.smoothing, ctx.z_loss = inputs
    ctx.save_for_backward(hidden, weight, targets)


def _rows_backward(ctx, g_rows):
    hidden, weight, targets = ctx.saved_tensors
    dh, dw = _rows_backward_op(g_rows.contiguous(), hidden, weight, targets, ctx.ignore_index,
                               ctx.compute_dtype, ctx.chunk_rows, ctx.smoothing, ctx.z_loss)
    return dh, dw, None, None, None, None, None, None


_rows_op.register_autograd(_rows_backward, setup_context=_rows_setup)


def check_targets(targets: Tensor, vocab: int, ignore_index: int, where: str) -> None:
    """Every target in ``[0, vocab)`` or ``ignore_index``, else a ValueError naming the first. Checked
    on CPU only: on a GPU it would cost a sync; the row kernels turn a bad target into NaN instead."""
    if targets.is_cuda or not targets.numel() or torch.compiler.is_compiling():
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{where}: targets[{i}] = {int(targets[i])} is outside the vocabulary [0, {vocab}) and "
                         f"is not ignore_index={ignore_index}")


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, ignore_index: int = -100, reduction: str = "mean",
    chunk_rows: int | None = None, label_smoothing: float = 0.0, z_loss: float = 0.0,
) -> Tensor:
    """Cross entropy of ``hidden @ weight.T`` against ``targets`` without materialising the logits.

    hidden ``[..., H]``, weight ``[V, H]`` (the LM head or a tied embedding), targets ``[...]`` integer
    ids in ``[0, V)`` or ``ignore_index``; ``reduction`` "mean" (over non-ignored targets), "sum", or
    "none": each position's loss, ``targets``' shape (0 where ignored), as ``F.cross_entropy``.
    ``label_smoothing`` as ``F.cross_entropy``'s; ``z_loss`` adds ``z_loss * logsumexp(logits)^2`` per
    counted position (PaLM's auxiliary loss, Liger's ``lse_square_scale``), which keeps the
    normaliser near 1 (0: off). Returns fp32 (fp64 for fp64 inputs) with gradients for hidden and weight."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0 or not z_loss >= 0:
        raise ValueError(f"linear_cross_entropy: label_smoothing={label_smoothing}, z_loss={z_loss}; expected "
                         f"0 <= label_smoothing <= 1 and z_loss >= 0")
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden [..., H] and weight [V, H] must share H; got hidden "
                         f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"linear_cross_entropy: targets must have shape hidden.shape[:-1] = "
                         f"{tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"linear_cross_entropy: targets must be integer token ids, got {targets.dtype}")
    if not (hidden.dtype.is_floating_point and weight.dtype.is_floating_point):
        raise ValueError(f"linear_cross_entropy: hidden and weight must be floating point, got "
                         f"{hidden.dtype} and {weight.dtype}")
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    vocab = weight.shape[0]
    check_targets(t, vocab, ignore_index, "linear_cross_entropy")
    dev = hidden.device.type
    cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    rows = chunk_rows if chunk_rows is not None else default_chunk_rows(h2.shape[0], vocab)
    if reduction == "none":
        return _rows_op(h2, weight, t, int(ignore_index), cdt, int(rows), float(label_smoothing),
                        float(z_loss)).view(targets.shape)
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    loss_sum, count, _, _ = _op(h2, weight, t, int(ignore_index), cdt, with_grad, int(rows), float(label_smoothing),
                                float(z_loss))
    return loss_sum if reduction == "sum" else loss_sum / count
