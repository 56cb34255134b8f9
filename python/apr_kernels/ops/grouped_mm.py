"""Grouped GEMM (one weight per group of rows: the experts of a mixture-of-experts layer) as a torch
custom op (``apr::``) with autograd.

Public function (also ``apr_kernels.grouped_mm``)::

    grouped_mm(x, weights, offs) -> y          # y[rows of e] = x[rows of e] @ weights[e].T

x ``[N, in]`` with its rows sorted by group; ``weights``: E tensors ``[out, in]`` (``nn.Linear``
weights, one shape and dtype, kept separate: nothing is stacked), or one stacked ``[E, out, in]``
tensor (transformers' MoE experts); ``offs``: ``[E]`` integer cumulative
ends (group e owns rows ``offs[e-1] .. offs[e]``, ``offs[-1]`` = N; an empty group repeats the previous
end), as ``torch.nn.functional.grouped_mm``'s. The product is computed in x's dtype (the weights cast to
it, as autocast's per-call copy would be, accumulating in fp32; under ``torch.autocast`` x is first
cast to the autocast dtype, as ``F.linear`` does); y has that dtype. Gradients: dx, and
each weight's in the weight's dtype (zeros for an empty group). The group sizes never leave the
device on the Triton path, so a layer that uses it needs no host sync and ``torch.compile`` no graph
break. On CPU tensors ``offs`` is checked (sorted, ending at N); on CUDA that would be a sync, so
it is the caller's contract there.

Ops (torch.compile sees these; eager calls use the same implementations through an autograd Function)::

    apr::grouped_mm(x, weights, offs) -> y
    apr::grouped_mm_backward(dy, x, weights, offs, need_dx, need_dw) -> (dx, dw [E, out, in])
    apr::grouped_mm_stacked(x, weight, offs) -> y                     (weight [E, out, in])
    apr::grouped_mm_stacked_backward(dy, x, weight, offs, need_dx, need_dw) -> (dx, dw)

Dispatch per call: the Triton kernels of ``apr_kernels.kernels.grouped_mm`` when
``apr_kernels.backend.use_triton`` says so, else ``apr_kernels.ops.reference`` (also for fp64).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.graph import get_gradient_edge

from apr_kernels import backend
from apr_kernels.ops import reference as ref

# address tables of weight lists, keyed by their addresses (the key is the content, so a hit is
# always right); a layer reuses its table every step
_TABLES: OrderedDict = OrderedDict()
_TABLES_MAX = 1024


def _address_table(weights: Sequence[Tensor], device: torch.device) -> Tensor:
    key = (str(device), tuple(w.data_ptr() for w in weights))
    table = _TABLES.get(key)
    if table is None:
        table = torch.tensor(key[1], dtype=torch.int64)
        if device.type == "cuda":  # staged through pinned memory: no wait for the GPU (FSDP's unsharded
            table = table.pin_memory().to(device, non_blocking=True)  # weights move every step)
        else:
            table = table.to(device)
        _TABLES[key] = table
        if len(_TABLES) > _TABLES_MAX:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return table


def _stacked_table(w: Tensor) -> Tensor:
    """Addresses of the E matrices of a stacked ``[E, out, in]`` weight, computed on its device."""
    step = w.stride(0) * w.element_size()
    return torch.arange(w.shape[0], device=w.device, dtype=torch.int64) * step + w.data_ptr()


def _kernel(x: Tensor, *others: Tensor):
    return backend.kernels_for("grouped_mm", x, *others)


def _launch_weights(weights) -> tuple[Tensor, Tensor, object]:
    """(address table, first matrix, what must stay alive) for a weight list or a stacked weight, each
    matrix contiguous."""
    if isinstance(weights, Tensor):
        w = weights if weights[0].is_contiguous() else weights.contiguous()
        return _stacked_table(w), w[0], w
    ws = [w.contiguous() for w in weights]  # held until the launch is queued
    return _address_table(ws, ws[0].device), ws[0], ws


def _grouped_mm_impl(x: Tensor, weights, offs: Tensor) -> Tensor:
    k = _kernel(x, offs, *([weights] if isinstance(weights, Tensor) else weights))
    if k is None:
        return ref.grouped_mm_reference(x, weights, offs)
    table, w0, _alive = _launch_weights(weights)
    return k.grouped_mm_fwd(x, table, w0, offs, trans=True)


def _grouped_mm_backward_impl(dy: Tensor, x: Tensor, weights, offs: Tensor, need_dx: bool,
                              need_dw: bool) -> tuple[Tensor, Tensor]:
    """(dx, the weights' gradients stacked ``[E, out, in]``; an empty tensor for what is not needed)."""
    k = _kernel(x, dy, offs, *([weights] if isinstance(weights, Tensor) else weights))
    w0 = weights[0]
    dx = dw = x.new_empty(0)
    if k is None:
        if need_dx:
            dx = ref.grouped_mm_reference(dy, weights, offs, trans=False)
        if need_dw:
            dw = ref.grouped_mm_dw_reference(dy, x, offs, w0)
        return dx, dw
    if need_dx:
        table, w0c, _alive = _launch_weights(weights)
        dx = k.grouped_mm_fwd(dy, table, w0c, offs, trans=False)
    if need_dw:
        dw = k.grouped_mm_dw(dy, x, offs, w0)
    return dx, dw


# one op for a list of weights (a model's separate experts), one for a stacked [E, out, in] weight
def _list_impl(x: Tensor, weights: list[Tensor], offs: Tensor) -> Tensor:
    return _grouped_mm_impl(x, weights, offs)


def _list_backward_impl(dy: Tensor, x: Tensor, weights: list[Tensor], offs: Tensor, need_dx: bool,
                        need_dw: bool) -> tuple[Tensor, Tensor]:
    return _grouped_mm_backward_impl(dy, x, weights, offs, need_dx, need_dw)


_op = torch.library.custom_op("apr::grouped_mm", mutates_args=())(_list_impl)
_backward_op = torch.library.custom_op("apr::grouped_mm_backward", mutates_args=())(_list_backward_impl)


def _stacked_impl(x: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    return _grouped_mm_impl(x, weight, offs)


def _stacked_backward_impl(dy: Tensor, x: Tensor, weight: Tensor, offs: Tensor, need_dx: bool,
                           need_dw: bool) -> tuple[Tensor, Tensor]:
    return _grouped_mm_backward_impl(dy, x, weight, offs, need_dx, need_dw)


_stacked_op = torch.library.custom_op("apr::grouped_mm_stacked", mutates_args=())(_stacked_impl)
_stacked_backward_op = torch.library.custom_op("apr::grouped_mm_stacked_backward", mutates_args=())(
    _stacked_backward_impl)


@_op.register_fake
def _(x: Tensor, weights: list[Tensor], offs: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], weights[0].shape[0])


@_stacked_op.register_fake
def _(x: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[1])


def _fake_backward(dy, x, weights, offs, need_dx, need_dw):
    w0 = weights[0]
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    dw = w0.new_empty(len(weights), *w0.shape) if need_dw else x.new_empty(0)
    return dx, dw


_backward_op.register_fake(_fake_backward)
_stacked_backward_op.register_fake(_fake_backward)


def _setup(ctx, inputs, output):
    x, weights, offs = inputs
    ctx.stacked = isinstance(weights, Tensor)
    ctx.n = len(weights)
    ctx.need = (x.requires_grad, (weights.requires_grad if ctx.stacked else any(w.requires_grad for w in weights)))
    ctx.save_for_backward(x, offs, *([weights] if ctx.stacked else weights))


def _wanted(t: Tensor) -> bool:
    """Whether the backward now running uses ``t``'s gradient: False for the half a split backward
    (the zero-bubble pipeline's input or weight pass, ``train/split_backward.py``) does not ask for,
    so that half is not computed and thrown away; True whenever that cannot be told (compiling)."""
    if torch.compiler.is_compiling():
        return True
    try:
        return bool(torch._C._will_engine_execute_node(get_gradient_edge(t).node))
    except (RuntimeError, AttributeError, TypeError):
        return True


def _grads(ctx, dy, backward):
    """(dx or None, the weights' gradients: the stacked tensor, or a list of its slices, or Nones)."""
    x, offs, *weights = ctx.saved_tensors
    need_dx, need_dw = ctx.need
    need_dx = need_dx and _wanted(x)
    need_dw = need_dw and any(_wanted(w) for w in weights if w.requires_grad)
    dx, dw = backward(dy, x, weights[0] if ctx.stacked else weights, offs, need_dx, need_dw)
    dx = dx if need_dx else None
    if ctx.stacked:
        return dx, (dw if need_dw else None)
    return dx, ([dw[e] for e in range(ctx.n)] if need_dw else [None] * ctx.n)


def _backward(ctx, dy):
    dx, dws = _grads(ctx, dy, torch.ops.apr.grouped_mm_backward)
    return dx, dws, None


def _stacked_backward(ctx, dy):
    dx, dw = _grads(ctx, dy, torch.ops.apr.grouped_mm_stacked_backward)
    return dx, dw, None


_op.register_autograd(_backward, setup_context=_setup)
_stacked_op.register_autograd(_stacked_backward, setup_context=_setup)


class GroupedMMFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, offs, *weights):
        stacked = len(weights) == 1 and weights[0].dim() == 3
        w = weights[0] if stacked else list(weights)
        _setup(ctx, (x, w, offs), None)
        return _grouped_mm_impl(x, w, offs)

    @staticmethod
    def backward(ctx, dy):
        dx, dws = _grads(ctx, dy, _grouped_mm_backward_impl)
        return dx, None, *([dws] if ctx.stacked else dws)


def _check(x: Tensor, weights, offs: Tensor) -> None:
    where = "apr_kernels.grouped_mm"
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"{where}: x must be a 2-D floating-point tensor [rows, in], got "
                         f"{tuple(getattr(x, 'shape', ()))} {getattr(x, 'dtype', type(x).__name__)}")
    if isinstance(weights, Tensor):
        if weights.dim() != 3 or not weights.dtype.is_floating_point or weights.device != x.device \
                or weights.shape[0] == 0:
            raise ValueError(f"{where}: a stacked weight must be a floating-point [groups, out, in] tensor on x's "
                             f"device {x.device}, got {tuple(weights.shape)} {weights.dtype} on {weights.device}")
        w0 = weights[0]
    else:
        if not weights:
            raise ValueError(f"{where}: weights is empty; expected one [out, in] tensor per group")
        w0 = weights[0]
        for e, w in enumerate(weights):
            if not isinstance(w, Tensor) or w.dim() != 2 or w.shape != w0.shape or w.dtype != w0.dtype \
                    or w.device != x.device or not w.dtype.is_floating_point:
                raise ValueError(f"{where}: weights[{e}] is {tuple(getattr(w, 'shape', ()))} "
                                 f"{getattr(w, 'dtype', type(w).__name__)} on {getattr(w, 'device', '?')}; expected "
                                 f"every weight {tuple(w0.shape)} {w0.dtype} (floating point) on x's device {x.device}")
    if w0.shape[1] != x.shape[1]:
        raise ValueError(f"{where}: x has {x.shape[1]} columns but the weights are {tuple(w0.shape)} [out, in]; "
                         f"expected in = {x.shape[1]}")
    if not isinstance(offs, Tensor) or offs.dim() != 1 or offs.numel() != len(weights) \
            or offs.dtype not in (torch.int32, torch.int64) or offs.device != x.device:
        raise ValueError(f"{where}: offs must be a 1-D int32/int64 tensor of the {len(weights)} groups' cumulative "
                         f"row ends on {x.device}, got {tuple(getattr(offs, 'shape', ()))} "
                         f"{getattr(offs, 'dtype', type(offs).__name__)} on {getattr(offs, 'device', '?')}")
    if not offs.is_cuda and not torch.compiler.is_compiling():  # a host read is free here
        ends = offs.tolist()
        if any(b < a for a, b in zip([0] + ends, ends)) or ends[-1] != x.shape[0]:
            raise ValueError(f"{where}: offs {ends[:8]}{' ...' if len(ends) > 8 else ''} must be non-decreasing "
                             f"cumulative row ends from 0 ending at x's {x.shape[0]} rows")


def grouped_mm(x: Tensor, weights: Sequence[Tensor] | Tensor, offs: Tensor) -> Tensor:
    """``y[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ weights[e].T`` for every group ``e``, differentiable
    in x and the weights (module docstring). ``weights``: E tensors ``[out, in]``, or one stacked
    ``[E, out, in]`` tensor (its gradient then comes back stacked too)."""
    _check(x, weights, offs)
    stacked = isinstance(weights, Tensor)
    weights = weights if stacked else list(weights)
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.dtype != torch.float64:  # as F.linear under autocast
        x = x.to(torch.get_autocast_dtype(dev))
    if torch.compiler.is_compiling():
        return (torch.ops.apr.grouped_mm_stacked if stacked else torch.ops.apr.grouped_mm)(x, weights, offs)
    needs = weights.requires_grad if stacked else any(w.requires_grad for w in weights)
    if torch.is_grad_enabled() and (x.requires_grad or needs):
        return GroupedMMFunction.apply(x, offs, *([weights] if stacked else weights))
    return _grouped_mm_impl(x, weights, offs)
