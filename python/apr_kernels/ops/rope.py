"""Rotary position embedding of q and k as a torch custom op (``apr::``) with autograd.

Public function (also ``apr_kernels.rope``)::

    rope(q, k, cos, sin, rope_type=2) -> (q_rotated, k_rotated)

q ``[B, S, Hq, D]``, k ``[B, S, Hkv, D]`` (any strides, contiguous last dim), cos/sin ``[S, D/2]``
for positions 0..S-1 (``apr_kernels.model.rope.rope_tables``), rope_type 2 (Hugging Face
``rotate_half`` pairs) or 0 (adjacent pairs, llama.cpp order). One pass over q and k; the backward
is the inverse rotation and keeps nothing but the tables. Gradients flow to q and k (the tables are
constants of the model, not trained).

Op (opaque to torch.compile; eager calls use the same implementation through an autograd Function)::

    apr::rope(q, k, cos, sin, rope_type, inverse) -> (q_out, k_out)
"""

from __future__ import annotations

import torch
from torch import Tensor

from apr_kernels import backend
from apr_kernels.ops import reference as ref


def _rope_impl(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, rope_type: int, inverse: bool) -> tuple[Tensor, Tensor]:
    kern = backend.kernels_for("rope", q, k, cos, sin)
    if kern is not None:
        return kern.rope_fwd(q, k, cos, sin, rope_type, inverse)
    qo, ko = ref.rope_reference(q, k, cos, sin, rope_type, inverse)
    return qo.contiguous(), ko.contiguous()


_op = torch.library.custom_op("apr::rope", mutates_args=())(_rope_impl)


@_op.register_fake
def _(q, k, cos, sin, rope_type, inverse):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)


def _setup(ctx, inputs, output):
    _q, _k, cos, sin, rope_type, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.rope_type, ctx.inverse = rope_type, inverse


def _backward(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq, dk = torch.ops.apr.rope(dq, dk, cos, sin, ctx.rope_type, not ctx.inverse)
    return dq, dk, None, None, None, None


_op.register_autograd(_backward, setup_context=_setup)


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, rope_type):
        ctx.set_materialize_grads(True)  # an unused output still gets a (zero) gradient
        ctx.save_for_backward(cos, sin)
        ctx.rope_type = rope_type
        return _rope_impl(q, k, cos, sin, rope_type, False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = _rope_impl(dq, dk, cos, sin, ctx.rope_type, True)
        return dq, dk, None, None, None


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, rope_type: int = 2) -> tuple[Tensor, Tensor]:
    """Rotate q and k by the position tables (see the module docstring)."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"apr_kernels.rope: q [B, S, Hq, D] and k [B, S, Hkv, D] must share B, S and D; got "
                         f"q {tuple(q.shape)} and k {tuple(k.shape)}")
    d = q.shape[3]
    if d % 2:
        raise ValueError(f"apr_kernels.rope: head dim D = {d} must be even")
    want = (q.shape[1], d // 2)
    if tuple(cos.shape) != want or tuple(sin.shape) != want:
        raise ValueError(f"apr_kernels.rope: cos and sin must have shape [S, D/2] = {list(want)}; got "
                         f"{list(cos.shape)} and {list(sin.shape)}")
    if rope_type not in (0, 2):
        raise ValueError(f"apr_kernels.rope: rope_type must be 2 (rotate_half pairs) or 0 (adjacent pairs), "
                         f"got {rope_type}")
    if q.dtype != k.dtype or not q.dtype.is_floating_point:
        raise ValueError(f"apr_kernels.rope: q and k must share one floating dtype, got {q.dtype} and {k.dtype}")
    if torch.compiler.is_compiling():
        return torch.ops.apr.rope(q, k, cos, sin, rope_type, False)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return RoPEFunction.apply(q, k, cos, sin, rope_type)
    return _rope_impl(q, k, cos, sin, rope_type, False)
