"""One fused AdamW step with block-wise 8-bit moments (``--optimizer adamw8bit``) in Triton.

The step of ``apr_kernels.train.adamw8bit`` for one parameter tensor, one program per block of 256
values: load the parameter, its gradient, both moments' codes and their block scales; decode the
codes through the two maps; update the moments and the parameter as AdamW (decoupled weight decay,
bias correction) in fp32; encode the moments again (the block's new largest magnitude as its scale,
each value the nearest code, found by an 8-step binary search over the 255 midpoints between the
sorted codes); store. Per value that is 4 + 4 + 1 + 1 bytes read and 4 + 1 + 1 written for an fp32
parameter and gradient, where the PyTorch version makes about 20 passes over fp32 temporaries.

Layout: the parameter and gradient contiguous, ``n`` values; codes padded to whole blocks
(``ceil(n / 256) * 256`` uint8), one fp32 scale per block. Padding values are zero moments (the code
of 0.0), as the PyTorch quantiser pads them. The maps are fp32 tensors of 256 sorted codes and their
255 midpoints.

Launcher: ``adamw8bit_step(p, g, m_codes, m_absmax, v_codes, v_absmax, m_mids, m_map, v_mids, v_map, *,
lr, beta1, beta2, eps, weight_decay, step)`` (in place).
"""

from __future__ import annotations

import triton
import triton.language as tl

BLOCK = 256  # values per scale: the optimizer's block (adamw8bit.BLOCK)


@triton.jit
def _nearest_code(x, MIDS):
    """Index of the nearest code: how many of the 255 sorted midpoints lie strictly below ``x``."""
    lo = tl.zeros(x.shape, dtype=tl.int32)
    hi = tl.full(x.shape, 255, dtype=tl.int32)
    for _ in tl.static_range(8):  # the count lies in [lo, hi]; 2^8 > 255 halvings settle it
        active = lo < hi
        mid = (lo + hi) // 2
        below = tl.load(MIDS + tl.minimum(mid, 254)) < x
        lo = tl.where(active & below, mid + 1, lo)
        hi = tl.where(active & (below == 0), mid, hi)
    return lo


@triton.jit
def _adamw8bit_kernel(P, G, MC, MA, VC, VA, MMIDS, MMAP, VMIDS, VMAP, n, lr, beta1, beta2, eps, decay,
                      step_size, bias2, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(MMAP + tl.load(MC + offs).to(tl.int32)) * tl.load(MA + pid)
    v = tl.load(VMAP + tl.load(VC + offs).to(tl.int32)) * tl.load(VA + pid)
    m = m + (1.0 - beta1) * (g - m)  # torch's lerp(m, g, 1 - beta1)
    v = v * beta2 + (1.0 - beta2) * (g * g)
    p = p * decay
    p = p - step_size * (m / (tl.sqrt(v / bias2) + eps))
    tl.store(P + offs, p.to(P.dtype.element_ty), mask=mask)
    m = tl.where(mask, m, 0.0)
    v = tl.where(mask, v, 0.0)
    m_abs = tl.max(tl.abs(m), axis=0)
    v_abs = tl.max(v, axis=0)
    m_code = _nearest_code(m / tl.where(m_abs > 0, m_abs, 1.0), MMIDS)
    v_code = _nearest_code(v / tl.where(v_abs > 0, v_abs, 1.0), VMIDS)
    tl.store(MC + offs, m_code.to(tl.uint8))
    tl.store(VC + offs, v_code.to(tl.uint8))
    tl.store(MA + pid, m_abs)
    tl.store(VA + pid, v_abs)


def adamw8bit_step(p, g, m_codes, m_absmax, v_codes, v_absmax, m_mids, m_map, v_mids, v_map, *, lr: float,
                   beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> None:
    """One AdamW step of ``p`` (contiguous; any float dtype) with gradient ``g`` and 8-bit moments, in place."""
    n = p.numel()
    if not (p.is_contiguous() and g.is_contiguous()):
        raise ValueError("adamw8bit_step: the parameter and its gradient must be contiguous")
    blocks = triton.cdiv(n, BLOCK)
    if m_codes.numel() != blocks * BLOCK or m_absmax.numel() != blocks:
        raise ValueError(f"adamw8bit_step: {n} values need {blocks * BLOCK} codes and {blocks} scales per moment")
    if n:
        _adamw8bit_kernel[(blocks,)](
            p, g, m_codes, m_absmax, v_codes, v_absmax, m_mids, m_map, v_mids, v_map, n, lr, beta1, beta2, eps,
            1.0 - lr * weight_decay, lr / (1.0 - beta1 ** step), 1.0 - beta2 ** step, BLOCK=BLOCK, num_warps=2)
