"""SwiGLU's elementwise half, ``silu(gate) * up``, forward and backward in Triton (elementwise, 1-D).

Numerics: Hugging Face's ``act_fn(gate_proj(x)) * up_proj(x)`` in the model dtype ``dt``, with its
rounding points (each torch op computes in fp32 and rounds its output to ``dt``)::

    s  = dt(g * sigmoid(g))                   # F.silu
    y  = dt(s * u)
  backward (autograd of the same two ops):
    du = dt(dy * s)
    ds = dt(dy * u)
    dg = dt(ds * sigmoid(g) * (1 + g * (1 - sigmoid(g))))     # silu_backward

Only g and u are saved for the backward (silu is recomputed), where eager autograd also keeps s: one
[tokens, intermediate] buffer less per layer, and 3 (forward) + 5 (backward) passes over such a buffer
instead of eager's 5 + 9 (silu, mul; two muls and silu_backward, each reading two and writing one).

Layout: g, u (and dy) of one shape and dtype, contiguous (the launchers copy otherwise; the outputs of
``nn.Linear`` already are). Offsets are 64-bit, so any element count works.

Launchers: ``swiglu_fwd(g, u) -> y``, ``swiglu_bwd(dy, g, u) -> (dg, du)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    s = (g * tl.sigmoid(g)).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + offs, (s * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    s = (g * sig).to(DG.dtype.element_ty).to(tl.float32)
    tl.store(DU + offs, (dy * s).to(DU.dtype.element_ty), mask=mask)
    ds = (dy * u).to(DG.dtype.element_ty).to(tl.float32)
    tl.store(DG + offs, (ds * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)


def launch_config(n_elements: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)``: 16 elements per thread (two 16-byte vectors of bf16), capped for tiny
    inputs. Not yet tuned on a GPU."""
    block = min(4096, max(128, triton.next_power_of_2(max(n_elements, 1))))
    return block, max(1, min(8, block // 512))


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def swiglu_fwd(g: torch.Tensor, u: torch.Tensor, *, block: int | None = None) -> torch.Tensor:
    g, u = _flat(g), _flat(u)
    y = torch.empty_like(g)
    n = g.numel()
    if n:
        b, warps = launch_config(n)
        b = block or b
        _swiglu_fwd_kernel[(triton.cdiv(n, b),)](g, u, y, n, BLOCK=b, num_warps=warps)
    return y


def swiglu_bwd(dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor, *, block: int | None = None):
    dy, g, u = _flat(dy), _flat(g), _flat(u)
    dg, du = torch.empty_like(g), torch.empty_like(u)
    n = g.numel()
    if n:
        b, warps = launch_config(n)
        b = block or b
        _swiglu_bwd_kernel[(triton.cdiv(n, b),)](dy, g, u, dg, du, n, BLOCK=b, num_warps=warps)
    return dg, du
