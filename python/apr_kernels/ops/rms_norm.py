"""RMSNorm and fused residual-add RMSNorm as torch custom ops (``apr::``) with autograd.

Public functions (also ``apr_kernels.rms_norm`` / ``apr_kernels.add_rms_norm``)::

    rms_norm(x, weight, eps=1e-6) -> y
    add_rms_norm(x, residual, weight, eps=1e-6) -> (y, s)        # s = x + residual, y = rms_norm(s)

Numerics are Hugging Face LlamaRMSNorm's, exactly in form: normalise in fp32, round x_hat to x's
dtype, then multiply by the weight with torch's promotion, so ``y.dtype == promote(x.dtype,
weight.dtype)`` (bf16 x with an fp32 weight gives an fp32 y, as in HF). The fused add rounds
``x + residual`` to x's dtype before normalising (HF adds in the model dtype). Gradients: dx, dweight
and (fused add) dresidual = dx; the backward works in fp32, and dweight is summed over rows in fp32.

Ops (what the public functions call under torch.compile: opaque to it, so no graph breaks; in eager
mode they call the same implementations through lighter autograd Functions)::

    apr::rms_norm(x, weight, eps) -> (y, rstd)
    apr::add_rms_norm(x, residual, weight, eps) -> (y, s, rstd)
    apr::rms_norm_backward(dy, x, weight, rstd, dresidual?) -> (dx, dweight)

Dispatch (per call, inside the op): the Triton kernels of ``apr_kernels.kernels.rms_norm`` when
``apr_kernels.backend.use_triton`` says so (``APR_KERNELS_BACKEND``; CUDA tensors under ``auto``),
else ``apr_kernels.ops.reference``. Inputs the kernels do not cover (fp64, the gradcheck dtype, or a
hidden size above ``MAX_HIDDEN`` = 65536) take the reference on every backend.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Optional

import torch
from torch import Tensor

from apr_kernels import backend
from apr_kernels.ops import reference as ref

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_auto: list = []  # [kernel module or None], filled on the first CUDA call under `auto`


def _kernels_for(x: Tensor, weight: Tensor, *others: Tensor):
    """The Triton kernel module when this call should (and can) run it, else None.

    ``APR_KERNELS_BACKEND`` is read on every call (tests flip it), but the common case (unset or
    ``auto``, CUDA tensors) skips backend.use_triton's validation and import check: one dict lookup."""
    choice = os.environ.get(backend.ENV_VAR)
    if choice is None or choice == "auto":
        if not (x.is_cuda and weight.is_cuda) or not all(t.is_cuda for t in others):
            return None
        if not _auto:
            _auto.append(backend.kernels("rms_norm") if backend.triton_available() else None)
        k = _auto[0]
        if k is None:
            return None
    elif backend.use_triton(x, weight, *others):
        k = backend.kernels("rms_norm")
    else:
        return None
    if x.dtype not in k.DTYPES or weight.dtype not in k.DTYPES or x.shape[-1] > k.MAX_HIDDEN:
        return None
    return k


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# ------------------------------------------------------------- implementations (either backend)


def _rms_norm_impl(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    k = _kernels_for(x, weight)
    if k is not None:
        return k.rms_norm_fwd(x, weight, eps)
    y, rstd = ref.rms_norm_forward_reference(x, weight, eps)
    return y.contiguous(), rstd.contiguous()  # the layout the fake (and the kernel) promise


def _rms_norm_infer(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The forward alone when no gradient will be taken: the kernel skips the rstd buffer."""
    k = _kernels_for(x, weight)
    if k is not None:
        return k.rms_norm_fwd(x, weight, eps, need_rstd=False)[0]
    return ref.rms_norm_forward_reference(x, weight, eps)[0].contiguous()


def _add_rms_norm_infer(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    k = _kernels_for(x, weight, residual)
    if k is not None:
        y, s, _ = k.add_rms_norm_fwd(x, residual, weight, eps, need_rstd=False)
        return y, s
    s = (x + residual).contiguous()
    return ref.rms_norm_forward_reference(s, weight, eps)[0].contiguous(), s


def _add_rms_norm_impl(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    k = _kernels_for(x, weight, residual)
    if k is not None:
        return k.add_rms_norm_fwd(x, residual, weight, eps)
    s = (x + residual).contiguous()
    y, rstd = ref.rms_norm_forward_reference(s, weight, eps)
    return y.contiguous(), s, rstd.contiguous()


def _rms_norm_backward_impl(
    dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, dresidual: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    others = (dy, rstd) if dresidual is None else (dy, rstd, dresidual)
    k = _kernels_for(x, weight, *others)
    if k is not None:
        return k.rms_norm_bwd(dy, x, weight, rstd, dresidual)
    dx, dw = ref.rms_norm_backward_reference(dy, x, weight, rstd, dresidual)
    return dx.contiguous(), dw.contiguous()


def _dy_or_zeros(dy: Optional[Tensor], x: Tensor, weight: Tensor) -> Tensor:
    # y unused downstream: autograd may hand us None for its gradient
    if dy is not None:
        return dy
    return torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)


# ----------------------------------------------------------------- custom ops (torch.compile)

_rms_norm_op = torch.library.custom_op("apr::rms_norm", mutates_args=())(_rms_norm_impl)
_add_rms_norm_op = torch.library.custom_op("apr::add_rms_norm", mutates_args=())(_add_rms_norm_impl)
_rms_norm_backward_op = torch.library.custom_op("apr::rms_norm_backward", mutates_args=())(_rms_norm_backward_impl)


@_rms_norm_op.register_fake
def _(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    return y, torch.empty(x.shape[:-1], dtype=_acc_dtype(x.dtype), device=x.device)


@_add_rms_norm_op.register_fake
def _(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return y, s, torch.empty(x.shape[:-1], dtype=_acc_dtype(x.dtype), device=x.device)


@_rms_norm_backward_op.register_fake
def _(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, dresidual: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return dx, torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _eps = inputs
    _y, rstd = output
    ctx.save_for_backward(x, weight, rstd)


def _rms_norm_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.apr.rms_norm_backward(_dy_or_zeros(dy, x, weight), x, weight, rstd, None)
    return dx, dw, None


def _add_rms_norm_setup(ctx, inputs, output):
    _x, _residual, weight, _eps = inputs
    _y, s, rstd = output
    ctx.save_for_backward(s, weight, rstd)  # the backward normalises s, not x


def _add_rms_norm_backward(ctx, dy, ds, _drstd):
    s, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.apr.rms_norm_backward(_dy_or_zeros(dy, s, weight), s, weight, rstd, ds)
    # s = x + residual: both receive the same gradient (autograd's AddBackward does the same)
    return dx, dx, dw, None


_rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)
_add_rms_norm_op.register_autograd(_add_rms_norm_backward, setup_context=_add_rms_norm_setup)


# ------------------------------------------------------- eager path: the same impls, less overhead
# In eager mode a custom op costs tens of microseconds of Python dispatch per call, as much as the
# kernel itself at small sizes; these autograd Functions call the same implementations directly.
# Under torch.compile the public functions use the custom ops (opaque, no graph breaks).


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = _rms_norm_impl(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_backward_impl(dy, x, weight, rstd, None)
        return dx, dw, None


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        y, s, rstd = _add_rms_norm_impl(x, residual, weight, eps)
        ctx.save_for_backward(s, weight, rstd)
        return y, s

    @staticmethod
    def backward(ctx, dy, ds):
        s, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_backward_impl(dy, s, weight, rstd, ds)
        return dx, dx, dw, None


def _eager() -> bool:
    return not torch.compiler.is_compiling()


# ---------------------------------------------------------------------------- public functions


def _check_tensor(fn: str, name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"apr_kernels.{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"apr_kernels.{fn}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}"
        )


def _check_eps(fn: str, eps) -> float:
    if type(eps) is not float:  # the common case skips the (slow) numbers.Real ABC check
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
            raise TypeError(f"apr_kernels.{fn}: eps must be a real number, got {type(eps).__name__}")
        eps = float(eps)
    if not (0.0 <= eps < math.inf):  # NaN fails too
        raise ValueError(f"apr_kernels.{fn}: eps must be finite and >= 0, got {eps}")
    return eps


def _check_common(fn: str, x, weight, eps) -> float:
    _check_tensor(fn, "x", x)
    _check_tensor(fn, "weight", weight)
    if x.dim() < 1:
        raise ValueError(f"apr_kernels.{fn}: x must have a hidden (last) dimension, got a 0-d tensor")
    hidden = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != hidden:
        raise ValueError(
            f"apr_kernels.{fn}: weight must have shape ({hidden},) to match the hidden size "
            f"x.shape[-1] = {hidden}, got {tuple(weight.shape)}"
        )
    if weight.device != x.device:
        raise ValueError(f"apr_kernels.{fn}: weight is on {weight.device}, expected x's device {x.device}")
    return _check_eps(fn, eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """HF-style RMSNorm over the last dim: ``weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)``.

    x: (..., hidden), any leading shape, rows may be strided; weight: (hidden,).
    Returns y of x's shape with dtype ``promote(x.dtype, weight.dtype)``. Differentiable in x and
    weight."""
    eps = _check_common("rms_norm", x, weight, eps)
    if not _eager():
        return torch.ops.apr.rms_norm(x, weight, eps)[0]
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return RMSNormFunction.apply(x, weight, eps)
    return _rms_norm_infer(x, weight, eps)  # no autograd node, no rstd


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Fused pre-norm step: ``s = x + residual`` (rounded to x's dtype), return ``(rms_norm(s), s)``.

    residual must match x in shape, dtype and device; s is the new residual stream. Differentiable in
    x, residual and weight (x and residual get the same gradient)."""
    eps = _check_common("add_rms_norm", x, weight, eps)
    _check_tensor("add_rms_norm", "residual", residual)
    if residual.shape != x.shape:
        raise ValueError(
            f"apr_kernels.add_rms_norm: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}"
        )
    if residual.dtype != x.dtype:
        raise TypeError(f"apr_kernels.add_rms_norm: residual must have x's dtype {x.dtype}, got {residual.dtype}")
    if residual.device != x.device:
        raise ValueError(
            f"apr_kernels.add_rms_norm: residual is on {residual.device}, expected x's device {x.device}"
        )
    if not _eager():
        y, s, _rstd = torch.ops.apr.add_rms_norm(x, residual, weight, eps)
        return y, s
    if torch.is_grad_enabled() and (x.requires_grad or residual.requires_grad or weight.requires_grad):
        return AddRMSNormFunction.apply(x, residual, weight, eps)
    return _add_rms_norm_infer(x, residual, weight, eps)  # no autograd node, no rstd
