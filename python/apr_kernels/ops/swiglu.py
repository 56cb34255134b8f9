"""SwiGLU's activation ``silu(gate) * up`` as a torch custom op (``apr::``) with autograd.

Public function (also ``apr_kernels.swiglu``)::

    swiglu(gate, up) -> y                      # y = silu(gate) * up, Hugging Face's rounding points

gate and up: the same shape and floating dtype (the gate_proj and up_proj outputs of a Llama/Qwen2
MLP). Only gate and up are saved for the backward (eager autograd also keeps silu(gate)).

Ops (torch.compile sees these; eager calls use the same implementations through an autograd Function,
which costs less Python per call)::

    apr::swiglu(gate, up) -> y
    apr::swiglu_backward(dy, gate, up) -> (dgate, dup)

Dispatch per call: the Triton kernels of ``apr_kernels.kernels.swiglu`` when
``apr_kernels.backend.use_triton`` says so, else ``apr_kernels.ops.reference`` (also for fp64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from apr_kernels import backend
from apr_kernels.ops import reference as ref


def _swiglu_impl(gate: Tensor, up: Tensor) -> Tensor:
    k = backend.kernels_for("swiglu", gate, up)
    if k is not None:
        return k.swiglu_fwd(gate, up)
    return ref.swiglu_reference(gate, up).contiguous()


def _swiglu_backward_impl(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    k = backend.kernels_for("swiglu", gate, dy, up)
    if k is not None:
        return k.swiglu_bwd(dy, gate, up)
    dg, du = ref.swiglu_backward_reference(dy, gate, up)
    return dg.contiguous(), du.contiguous()


_swiglu_op = torch.library.custom_op("apr::swiglu", mutates_args=())(_swiglu_impl)
_swiglu_backward_op = torch.library.custom_op("apr::swiglu_backward", mutates_args=())(_swiglu_backward_impl)


@_swiglu_op.register_fake
def _(gate: Tensor, up: Tensor) -> Tensor:
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


@_swiglu_backward_op.register_fake
def _(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    return (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device),
            torch.empty(up.shape, dtype=up.dtype, device=up.device))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    return torch.ops.apr.swiglu_backward(dy, gate, up)


_swiglu_op.register_autograd(_backward, setup_context=_setup)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _swiglu_impl(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return _swiglu_backward_impl(dy, gate, up)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` (Hugging Face's Llama/Qwen2 MLP activation), differentiable in both."""
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"apr_kernels.swiglu: {name} must be a floating-point torch.Tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"apr_kernels.swiglu: gate and up must have one shape, dtype and device; got "
                         f"{tuple(gate.shape)} {gate.dtype} {gate.device} and {tuple(up.shape)} {up.dtype} "
                         f"{up.device}")
    if torch.compiler.is_compiling():
        return torch.ops.apr.swiglu(gate, up)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SwiGLUFunction.apply(gate, up)
    return _swiglu_impl(gate, up)
