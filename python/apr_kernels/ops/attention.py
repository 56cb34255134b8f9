"""Grouped-query attention as torch custom ops (``apr::``) with autograd.

Public function (also ``apr_kernels.attention``)::

    attention(q, k, v, *, causal=True, scale=None, window=None) -> o          # [B, S, Hq, D]
    attention(q, k, v, *, cu_seqlens=cu, max_seqlen=None, causal=True, scale=None, window=None) -> o

q ``[B, S, Hq, D]``, k/v ``[B, S, Hkv, D]`` with Hq a multiple of Hkv: query head h attends with K/V
head ``h // (Hq // Hkv)``; K/V are never expanded. The ``[B, H, S, D]`` layout is accepted as
``x.transpose(1, 2)`` (a view: the kernels read it through its strides, no copy). k/v may hold more
positions than q (``[B, Sk, Hkv, D]``, Sk >= Sq when causal): causal is then bottom-right aligned as in
FlashAttention >= 2.1, the queries being the last Sq of the Sk positions (query i sees keys
j <= i + Sk - Sq): a chunk of queries against its prefix of keys (context parallelism, prefill after a
KV cache). With Sq == Sk that is the usual query i sees keys j <= i. ``scale`` defaults to D**-0.5.
Softmax statistics are fp32; the output has q's dtype and is contiguous ``[B, S, Hq, D]``.
``window`` (causal only): a sliding window of that many keys, query i sees keys i - window + 1 .. i
(Mistral's ``sliding_window``, flash-attn's ``window_size=(window - 1, 0)``); the kernels skip the
key blocks before it.

Packed sequences (varlen, the layout of ``flash_attn_varlen_func``): with ``cu_seqlens`` (int32
``[N + 1]``, 0 = cu[0] <= cu[1] <= ... <= cu[N] = T, on q's device) q is ``[T, Hq, D]`` and k/v
``[T, Hkv, D]``; sequence i is rows ``cu[i]:cu[i+1]`` and attends only within itself (causal from its
own first row): the result equals running each sequence alone. ``max_seqlen`` (>= the longest
sequence) sizes the grid; when None it is computed from ``cu_seqlens`` and ``cu_seqlens`` is checked,
which reads it on the host (one device sync on CUDA). Passing ``max_seqlen`` skips that read and makes
a correct ``cu_seqlens`` the caller's promise on CUDA (the kernels clamp every sequence into [0, T],
so a wrong one cannot address memory out of bounds); CPU tensors are always checked.
``cu_seqlens_k`` (``flash_attn_varlen_func``'s cu_seqlens_q/cu_seqlens_k pair): k/v ``[Tk, Hkv, D]``
packed with their own spans, sequence i's keys rows ``cu_seqlens_k[i]:cu_seqlens_k[i+1]``; causal is
bottom-right aligned per sequence (its queries are its last key positions), so each needs at least
as many keys as queries (checked on CPU; on CUDA the caller's promise, like ``cu_seqlens``).
``max_seqlen_k`` as ``max_seqlen``. Context parallelism with document masking uses it: a chunk's
queries per document against that document's keys up to the chunk's end.

Ops (opaque to torch.compile)::

    apr::attention_fwd(q, k, v, causal, scale, window) -> (o, lse)   # lse [B, Hq, S], natural log
    apr::attention_bwd(do, q, k, v, o, lse, dlse?, causal, scale, window) -> (dq, dk, dv)
    apr::attention_varlen_fwd(q, k, v, cu_seqlens, max_seqlen, causal, scale, window, cu_seqlens_k?,
                              max_seqlen_k) -> (o, lse)  # lse [Hq, T]
    apr::attention_varlen_bwd(do, q, k, v, o, lse, dlse?, cu_seqlens, max_seqlen, causal, scale, window,
                              cu_seqlens_k?, max_seqlen_k)
    (window 0: none)

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
def _attention_fwd_op(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                      window: int) -> tuple[Tensor, Tensor]:
    kern = _kernels_for(q, k, v)
    if kern is not None:
        return kern.attention_fwd(q, k, v, causal, scale, window=window)
    o, lse = ref.attention_forward_reference(q, k, v, causal, scale, window)
    return o.contiguous(), lse.contiguous()


@_attention_fwd_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, window: int) -> tuple[Tensor, Tensor]:
    B, S, HQ, D = q.shape
    o = torch.empty((B, S, HQ, D), dtype=q.dtype, device=q.device)
    return o, torch.empty((B, HQ, S), dtype=_lse_dtype(q.dtype), device=q.device)


@torch.library.custom_op("apr::attention_bwd", mutates_args=())
def _attention_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                      dlse: Optional[Tensor], causal: bool, scale: float,
                      window: int) -> tuple[Tensor, Tensor, Tensor]:
    kern = _kernels_for(q, k, v, do)
    if kern is not None:
        return kern.attention_bwd(do, q, k, v, o, lse, causal, scale, dlse=dlse, window=window)
    grads = ref.attention_backward_reference(do, q, k, v, o, lse, causal, scale, dlse, window)
    return tuple(g.contiguous() for g in grads)


@_attention_bwd_op.register_fake
def _(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, dlse: Optional[Tensor],
      causal: bool, scale: float, window: int) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _setup(ctx, inputs, output):
    q, k, v, causal, scale, window = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.scale, ctx.window = causal, scale, window


def _backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    if do is None:  # only lse was used downstream
        do = torch.zeros_like(o)
    dq, dk, dv = torch.ops.apr.attention_bwd(do, q, k, v, o, lse, dlse, ctx.causal, ctx.scale, ctx.window)
    return dq, dk, dv, None, None, None


_attention_fwd_op.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("apr::attention_varlen_fwd", mutates_args=())
def _attention_varlen_fwd_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                             causal: bool, scale: float, window: int, cu_seqlens_k: Optional[Tensor],
                             max_seqlen_k: int) -> tuple[Tensor, Tensor]:
    kern = _kernels_for(q, k, v)
    if kern is not None:
        return kern.attention_fwd(q, k, v, causal, scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                  window=window, cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_seqlen_k)
    return ref.attention_varlen_forward_reference(q, k, v, cu_seqlens, causal, scale, window, cu_seqlens_k)


@_attention_varlen_fwd_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, causal, scale, window, cu_seqlens_k, max_seqlen_k):
    T, HQ, D = q.shape
    o = torch.empty((T, HQ, D), dtype=q.dtype, device=q.device)
    return o, torch.empty((HQ, T), dtype=_lse_dtype(q.dtype), device=q.device)


@torch.library.custom_op("apr::attention_varlen_bwd", mutates_args=())
def _attention_varlen_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                             dlse: Optional[Tensor], cu_seqlens: Tensor, max_seqlen: int, causal: bool,
                             scale: float, window: int, cu_seqlens_k: Optional[Tensor],
                             max_seqlen_k: int) -> tuple[Tensor, Tensor, Tensor]:
    kern = _kernels_for(q, k, v, do)
    if kern is not None:
        return kern.attention_bwd(do, q, k, v, o, lse, causal, scale, dlse=dlse, cu_seqlens=cu_seqlens,
                                  max_seqlen=max_seqlen, window=window, cu_seqlens_k=cu_seqlens_k,
                                  max_seqlen_k=max_seqlen_k)
    return ref.attention_varlen_backward_reference(do, q, k, v, o, lse, cu_seqlens, causal, scale, dlse,
                                                   window, cu_seqlens_k)


@_attention_varlen_bwd_op.register_fake
def _(do, q, k, v, o, lse, dlse, cu_seqlens, max_seqlen, causal, scale, window, cu_seqlens_k, max_seqlen_k):
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))


def _setup_varlen(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, causal, scale, window, cu_seqlens_k, max_seqlen_k = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens, cu_seqlens_k)
    ctx.max_seqlen, ctx.causal, ctx.scale, ctx.window = max_seqlen, causal, scale, window
    ctx.max_seqlen_k = max_seqlen_k


def _backward_varlen(ctx, do, dlse):
    q, k, v, o, lse, cu_seqlens, cu_seqlens_k = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    dq, dk, dv = torch.ops.apr.attention_varlen_bwd(do, q, k, v, o, lse, dlse, cu_seqlens, ctx.max_seqlen,
                                                    ctx.causal, ctx.scale, ctx.window, cu_seqlens_k,
                                                    ctx.max_seqlen_k)
    return dq, dk, dv, None, None, None, None, None, None, None


_attention_varlen_fwd_op.register_autograd(_backward_varlen, setup_context=_setup_varlen)


# ------------------------------------------------------------------------------- public function


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(int(s)) for s in t.shape) + "]"


def check_inputs(q, k, v, causal=True, scale=None, *, packed: bool | str = False) -> float:
    """Validate ``attention``'s arguments (TypeError/ValueError naming the argument, the expected
    and the actual value); return the effective scale. ``packed``: the varlen layout [T, H, D]
    (``"keys"``: k/v packed with their own spans, any token count)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{_WHERE}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if packed and t.dim() != 3:
            raise ValueError(f"{_WHERE}: with cu_seqlens, {name} must be 3-D [T, H, D] (the tokens of all "
                             f"sequences back to back); got shape {_shape(t)}")
        if not packed and t.dim() != 4:
            raise ValueError(f"{_WHERE}: {name} must be 4-D [B, S, H, D] (use x.transpose(1, 2) for "
                             f"[B, H, S, D]); got shape {_shape(t)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{_WHERE}: {name} must be float16, bfloat16, float32 or float64; got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{_WHERE}: {name}.dtype must equal q.dtype ({q.dtype}); got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{_WHERE}: {name} must be on q's device ({q.device}); got {t.device}")
    if packed:  # [T, H, D] -> the same checks as a batch of one sequence of T rows
        q, k, v = q[None], k[None], v[None]
    B, S, HQ, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"{_WHERE}: v must have k's shape {_shape(k)}; got {_shape(v)}")
    if k.shape[0] != B:
        raise ValueError(f"{_WHERE}: k batch size must equal q's ({B}); got k shape {_shape(k)}")
    if packed is True and k.shape[1] != S:
        raise ValueError(f"{_WHERE}: with cu_seqlens, k's token count must equal q's ({S}): each packed "
                         f"sequence attends to itself (pass cu_seqlens_k for keys packed with their own "
                         f"spans); got k shape {_shape(k[0])}")
    if causal is True and not packed and k.shape[1] < S:
        raise ValueError(f"{_WHERE}: causal attention needs at least as many keys as queries (the queries "
                         f"are the last Sq of Sk positions); got q shape {_shape(q)}, k shape {_shape(k)}")
    if k.shape[1] == 0 and S > 0 and not packed:
        raise ValueError(f"{_WHERE}: k has no keys (shape {_shape(k)}) for {S} queries")
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


def check_key_spans(cu_seqlens: Tensor, cu_seqlens_k: Tensor, causal: bool) -> None:
    """As many key spans as query spans, and (causal, read on the host where that costs no sync) no
    sequence with fewer keys than queries."""
    if cu_seqlens_k.numel() != cu_seqlens.numel():
        raise ValueError(f"{_WHERE}: cu_seqlens_k must hold as many sequences as cu_seqlens "
                         f"({cu_seqlens.numel() - 1}); got {cu_seqlens_k.numel() - 1}")
    if not causal or cu_seqlens.is_cuda or torch.compiler.is_compiling():
        return
    nq, nk = (t.diff().tolist() for t in (cu_seqlens, cu_seqlens_k))
    short = [i for i, (a, b) in enumerate(zip(nq, nk)) if b < a]
    if short:
        i = short[0]
        raise ValueError(f"{_WHERE}: causal attention with cu_seqlens_k needs at least as many keys as queries "
                         f"in every sequence (its queries are its last positions); sequence {i} has {nq[i]} "
                         f"queries and {nk[i]} keys")


def check_cu_seqlens(cu_seqlens, max_seqlen, n_tokens: int, device: torch.device, name: str = "cu_seqlens") -> int:
    """Validate the packed layout (see the module docstring); return the effective ``max_seqlen``."""
    mname = name.replace("cu_seqlens", "max_seqlen")
    what = "key" if name.endswith("_k") else "token"
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"{_WHERE}: {name} must be a torch.Tensor; got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{_WHERE}: {name} must be a 1-D int32 tensor [N + 1] of sequence starts and "
                         f"the end; got dtype {cu_seqlens.dtype}, shape {_shape(cu_seqlens)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{_WHERE}: {name} must be on q's device ({device}); got {cu_seqlens.device}")
    if max_seqlen is not None and (isinstance(max_seqlen, bool)
                                   or not isinstance(max_seqlen, (numbers.Integral, torch.SymInt))
                                   or max_seqlen < 0):
        raise TypeError(f"{_WHERE}: {mname} must be a non-negative int or None; got {max_seqlen!r}")
    if max_seqlen is not None and (cu_seqlens.is_cuda or torch.compiler.is_compiling()):
        return max_seqlen  # the caller's promise: no device sync, nothing data-dependent in a graph
    if torch.compiler.is_compiling():
        raise ValueError(f"{_WHERE}: under torch.compile pass {mname} with {name} (it cannot be "
                         f"read from the tensor inside a graph)")
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if bounds[0] != 0 or bounds[-1] != n_tokens or min(lengths, default=0) < 0:
        raise ValueError(f"{_WHERE}: {name} must rise from 0 to the {what} count {n_tokens} without "
                         f"decreasing; got {bounds[:8]}{' ...' if len(bounds) > 8 else ''} "
                         f"(ending at {bounds[-1]})")
    longest = max(lengths, default=0)
    if max_seqlen is not None and max_seqlen < longest:
        raise ValueError(f"{_WHERE}: {mname} {max_seqlen} is shorter than the longest sequence in "
                         f"{name} ({longest})")
    return longest if max_seqlen is None else max_seqlen


def check_window(window, causal: bool) -> int:
    """``window`` as the ops take it (0 = none); TypeError/ValueError naming the constraint."""
    if window is None:
        return 0
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
        raise TypeError(f"{_WHERE}: window must be a positive int (keys per query) or None; got {window!r}")
    if not causal:
        raise ValueError(f"{_WHERE}: window={window} needs causal=True (the window reaches back from each "
                         f"query; non-causal windows are not supported)")
    return int(window)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, scale: Optional[float] = None,
              cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
              window: Optional[int] = None, cu_seqlens_k: Optional[Tensor] = None,
              max_seqlen_k: Optional[int] = None) -> Tensor:
    """Softmax attention ``softmax(scale * q k^T [causal mask]) v`` with grouped K/V heads.

    q ``[B, S, Hq, D]``; k, v ``[B, Sk, Hkv, D]`` (Hq % Hkv == 0, same dtype and device; Sk == S for
    self-attention, causal with Sk > S: q holds the last S positions); returns a contiguous
    ``[B, S, Hq, D]`` in q's dtype. Differentiable in q, k and v.

    With ``cu_seqlens`` (packed sequences): q ``[T, Hq, D]``, k, v ``[T, Hkv, D]`` -> ``[T, Hq, D]``;
    each sequence ``cu_seqlens[i]:cu_seqlens[i+1]`` attends only within itself (module docstring).
    ``window``: causal sliding window of that many keys (query i sees keys i - window + 1 .. i).
    ``cu_seqlens_k`` (with ``cu_seqlens``; ``flash_attn_varlen_func``'s cu_seqlens_q/cu_seqlens_k): k, v
    ``[Tk, Hkv, D]`` packed with their own spans, sequence i's keys rows ``cu_seqlens_k[i]:cu_seqlens_k[i+1]``
    (as many sequences as ``cu_seqlens``); causal is bottom-right aligned per sequence (its queries are
    the last of its key positions, so each needs at least as many keys as queries). ``max_seqlen_k``
    as ``max_seqlen``.
    """
    if cu_seqlens is None:
        if max_seqlen is not None or cu_seqlens_k is not None or max_seqlen_k is not None:
            raise ValueError(f"{_WHERE}: max_seqlen, cu_seqlens_k and max_seqlen_k are only meaningful with "
                             f"cu_seqlens")
        scale = check_inputs(q, k, v, causal, scale)
        o, _ = torch.ops.apr.attention_fwd(q, k, v, causal, scale, check_window(window, causal))
        return o
    scale = check_inputs(q, k, v, causal, scale, packed="keys" if cu_seqlens_k is not None else True)
    max_seqlen = check_cu_seqlens(cu_seqlens, max_seqlen, q.shape[0], q.device)
    if cu_seqlens_k is not None:
        max_seqlen_k = check_cu_seqlens(cu_seqlens_k, max_seqlen_k, k.shape[0], q.device, "cu_seqlens_k")
        check_key_spans(cu_seqlens, cu_seqlens_k, causal)
    elif max_seqlen_k is not None:
        raise ValueError(f"{_WHERE}: max_seqlen_k is only meaningful with cu_seqlens_k")
    o, _ = torch.ops.apr.attention_varlen_fwd(q, k, v, cu_seqlens, max_seqlen, causal, scale,
                                              check_window(window, causal), cu_seqlens_k,
                                              max_seqlen if cu_seqlens_k is None else max_seqlen_k)
    return o
