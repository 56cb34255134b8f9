"""Grouped-query attention as torch custom ops (``apr::``) with autograd.

Public function (also ``apr_kernels.attention``)::

    attention(q, k, v, *, causal=True, scale=None) -> o          # [B, S, Hq, D]

q ``[B, S, Hq, D]``, k/v ``[B, S, Hkv, D]`` with Hq a multiple of Hkv: query head h attends with K/V
head ``h // (Hq // Hkv)``; K/V are never expanded. The ``[B, H, S, D]`` layout is accepted as
``x.transpose(1, 2)`` (a view: the kernels read it through its strides, no copy). Only self-attention
(Sq == Sk); causal is top-left aligned (query i sees keys j <= i). ``scale`` defaults to D**-0.5.
Softmax statistics are fp32; the output has q's dtype and is contiguous ``[B, S, Hq, D]``.

Ops (opaque to torch.compile)::

    apr::attention_fwd(q, k, v, causal, scale) -> (o, lse)          # lse [B, Hq, S], natural log
    apr::attention_bwd(do, q, k, v, o, lse, dlse?, causal, scale) -> (dq, dk, dv)

Dispatch (per call, inside the op): the Triton kernels of ``apr_kernels.kernels.attention`` when
``apr_kernels.backend.use_triton`` says so and the kernels cover the input (fp16/bf16/fp32,
head_dim a multiple of 8 in 16..128); otherwise the reference of ``apr_kernels.ops.reference``.
Input the kernels don't cover raises ``ValueError`` under ``APR_KERNELS_BACKEND=triton`` (asked for
explicitly) and takes the reference under ``auto``.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from apr_kernels import backend
from apr_kernels.ops import reference as ref

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KERNEL_HEAD_DIMS = tuple(range(16, 129, 8))  # padded to a power of two inside the kernel
_DTYPES = KERNEL_DTYPES + (torch.float64,)
_WHERE = "apr_kernels.attention"


def _kernel_gap(q: Tensor) -> Optional[str]:
    """Why the Triton kernels cannot run this input (None when they can)."""
    if q.dtype not in KERNEL_DTYPES:
        return f"dtype {q.dtype} (the Triton kernels take float16, bfloat16 or float32)"
    if q.shape[-1] not in KERNEL_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} (the Triton kernels take multiples of 8 in 16..128)"
    return None


def _kernels_for(q: Tensor, *others: Tensor):
    """The Triton kernel module when this call should run it, else None (reference)."""
    if not backend.use_triton(q, *others):
        return None
    gap = _kernel_gap(q)
    if gap is not None:
        if backend.backend() == "triton":
            raise ValueError(f"{_WHERE}: {backend.ENV_VAR}=triton but q has unsupported {gap}; "
                             f"use {backend.ENV_VAR}=reference (or auto) for this input")
        return None
    return backend.kernels("attention")


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


# ------------------------------------------------------------------------------------------- ops


@torch.library.custom_op("apr::attention_fwd", mutates_args=())
def _attention_fwd_op(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    kern = _kernels_for(q, k, v)
    if kern is not None:
        return kern.attention_fwd(q, k, v, causal, scale)
    o, lse = ref.attention_forward_reference(q, k, v, causal, scale)
    return o.contiguous(), lse.contiguous()


@_attention_fwd_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    B, S, HQ, D = q.shape
    o = torch.empty((B, S, HQ, D), dtype=q.dtype, device=q.device)
    return o, torch.empty((B, HQ, S), dtype=_lse_dtype(q.dtype), device=q.device)


@torch.library.custom_op("apr::attention_bwd", mutates_args=())
def _attention_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                      dlse: Optional[Tensor], causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    kern = _kernels_for(q, k, v, do)
    if kern is not None:
        return kern.attention_bwd(do, q, k, v, o, lse, causal, scale, dlse=dlse)
    grads = ref.attention_backward_reference(do, q, k, v, o, lse, causal, scale, dlse)
    return tuple(g.contiguous() for g in grads)


@_attention_bwd_op.register_fake
def _(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, dlse: Optional[Tensor],
      causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _setup(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    if do is None:  # only lse was used downstream
        do = torch.zeros_like(o)
    dq, dk, dv = torch.ops.apr.attention_bwd(do, q, k, v, o, lse, dlse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


_attention_fwd_op.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------- public function


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(int(s)) for s in t.shape) + "]"


def check_inputs(q, k, v, causal=True, scale=None) -> float:
    """Validate ``attention``'s arguments (TypeError/ValueError naming the argument, the expected
    and the actual value); return the effective scale."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{_WHERE}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{_WHERE}: {name} must be 4-D [B, S, H, D] (use x.transpose(1, 2) for "
                             f"[B, H, S, D]); got shape {_shape(t)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{_WHERE}: {name} must be float16, bfloat16, float32 or float64; got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{_WHERE}: {name}.dtype must equal q.dtype ({q.dtype}); got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{_WHERE}: {name} must be on q's device ({q.device}); got {t.device}")
    B, S, HQ, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{_WHERE}: v must have k's shape {_shape(k)}; got {_shape(v)}")
    if k.shape[0] != B:
        raise ValueError(f"{_WHERE}: k batch size must equal q's ({B}); got k shape {_shape(k)}")
    if k.shape[1] != S:
        raise ValueError(f"{_WHERE}: k sequence length must equal q's ({S}): only self-attention with "
                         f"Sq == Sk is supported; got k shape {_shape(k)}")
    if k.shape[3] != D:
        raise ValueError(f"{_WHERE}: k head_dim must equal q's ({D}); got k shape {_shape(k)}")
    HKV = k.shape[2]
    if HKV == 0 or HQ % HKV != 0:
        raise ValueError(f"{_WHERE}: q heads ({HQ}) must be a multiple of k/v heads; got Hkv={HKV} "
                         f"(q {_shape(q)}, k {_shape(k)})")
    if not isinstance(causal, bool):
        raise TypeError(f"{_WHERE}: causal must be a bool; got {type(causal).__name__}")
    if scale is None:
        return 1.0 / math.sqrt(D) if D > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise TypeError(f"{_WHERE}: scale must be a finite real number or None; got {scale!r}")
    return float(scale)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: Optional[float] = None) -> Tensor:
    """Softmax attention ``softmax(scale * q k^T [causal mask]) v`` with grouped K/V heads.

    q ``[B, S, Hq, D]``; k, v ``[B, S, Hkv, D]`` (Hq % Hkv == 0, same dtype and device); returns a
    contiguous ``[B, S, Hq, D]`` in q's dtype. Differentiable in q, k and v.
    """
    scale = check_inputs(q, k, v, causal, scale)
    o, _ = torch.ops.apr.attention_fwd(q, k, v, causal, scale)
    return o
