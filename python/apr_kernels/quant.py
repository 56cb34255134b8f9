"""Dequantisation and quantisation of the APR block formats (spec section 8), vectorised torch.

Formats (raw bytes as stored in the file, one 1-D uint8 tensor per tensor):
* APR_Q4: blocks of 32 flattened elements, 18 bytes: f16 scale | 16 bytes of nibbles (element 2k
  low nibble of byte k, 2k+1 high); x = (nibble - 8) * scale; a NaN/Inf/subnormal scale reads as 0.
* APR_Q8: f32 scale for the whole tensor | n int8; x = q * scale.
* Q4_K / Q6_K: GGML ``block_q4_K`` (144 bytes) / ``block_q6_K`` (210 bytes) per 256 elements, each
  row of the last dimension starting a new block (row-aligned, GH-370); byte-identical to llama.cpp.

Works on any device the raw tensor is on (so CUDA dequantises on the GPU).
"""

from __future__ import annotations

import math

import torch

from ._format import QUANTIZED, QuantizedTensor, nbytes_for
from .backend import kernels_for

__all__ = ["dequantize", "fake_quantize", "quantize"]

_F16_MIN_NORMAL = 2.0**-14


def dequantize(apr_dtype: str, shape, raw: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Floats of logical ``shape`` from the raw blocks ``raw`` (1-D uint8) of APR ``apr_dtype``.

    The maths runs in float32; the result is cast to ``dtype``.
    """
    out_dtype = dtype
    dtype = apr_dtype
    shape = tuple(int(d) for d in shape)
    if dtype not in QUANTIZED:
        raise ValueError(f"dequantize: {dtype!r} is not a quantised APR dtype ({', '.join(sorted(QUANTIZED))})")
    want = nbytes_for(dtype, shape)
    if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() != want:
        raise ValueError(f"dequantize: {dtype} of shape {list(shape)} needs a 1-D uint8 tensor of {want} bytes, "
                         f"got {raw.dtype} {list(raw.shape)}")
    n = math.prod(shape)
    if dtype == "APR_Q8":
        scale = raw[:4].clone().view(torch.float32)
        x = raw[4:].view(torch.int8).to(torch.float32) * scale
    elif dtype == "APR_Q4":
        x = _dequant_apr_q4(raw)[:n]
    else:
        cols = shape[-1] if shape else 1
        rows = math.prod(shape[:-1])
        nblk = -(-cols // 256)
        if rows * nblk == 0:
            return torch.zeros(shape, dtype=out_dtype, device=raw.device)
        fn = _dequant_q4_k if dtype == "Q4_K" else _dequant_q6_k
        x = fn(raw.view(rows * nblk, -1)).view(rows, nblk * 256)[:, :cols]
    return x.reshape(shape).to(out_dtype)


def block_bytes(apr_dtype: str) -> int:
    """Bytes of one independent block of ``apr_dtype`` (APR_Q8: its int8 values, 1; the tensor's scale
    leads its bytes)."""
    return {"Q4_K": 144, "Q6_K": 210, "APR_Q4": 18, "APR_Q8": 1}[apr_dtype]


# values per block of each format (APR_Q8: one value a "block", after the tensor's 4-byte scale)
_BLOCK_VALUES = {"Q4_K": 256, "Q6_K": 256, "APR_Q4": 32, "APR_Q8": 1}


def _block_grid(apr_dtype: str, shape) -> tuple[int, int, int] | None:
    """``(header bytes, blocks per row, bytes per block)`` of a 2-D tensor whose rows each start a new
    block (Q4_K/Q6_K always, padding a row's last block; APR_Q4 when a row is whole blocks; APR_Q8's
    values after its scale), so that its raw bytes view as ``[rows, blocks, bytes]``; else None."""
    if len(shape) != 2:
        return None
    cols, per = shape[1], _BLOCK_VALUES[apr_dtype]
    if apr_dtype == "APR_Q4" and cols % per:
        return None
    return (4 if apr_dtype == "APR_Q8" else 0), -(-cols // per), block_bytes(apr_dtype)


def split_blocks(apr_dtype: str, shape, raw: torch.Tensor, dim: int, index: int, parts: int):
    """``(shape, raw)`` of part ``index`` of ``parts`` equal parts of a 2-D quantised tensor split on
    ``dim`` (0: rows, 1: columns), as a tensor of its own in the same format (APR_Q8: the same scale),
    or None where a part would not be whole blocks: rows always are when the rows start blocks;
    columns when each part's columns fill whole blocks. ``raw`` may be a zero-copy view: the part is a
    new tensor."""
    grid = _block_grid(apr_dtype, shape)
    rows, cols = shape
    if grid is None or shape[dim] % parts:
        return None
    header, blocks, width = grid
    if dim == 1 and (cols % _BLOCK_VALUES[apr_dtype] or blocks % parts):
        return None
    body = raw[header:].view(rows, blocks, width)
    n = body.shape[dim] // parts
    part = body.narrow(dim, index * n, n).reshape(-1)
    local = (rows // parts, cols) if dim == 0 else (rows, cols // parts)
    return local, torch.cat([raw[:header], part]) if header else part.clone()


def join_blocks(apr_dtype: str, shape, parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """The raw bytes of the 2-D tensor of ``shape`` from its ``split_blocks`` parts, in order."""
    header, blocks, width = _block_grid(apr_dtype, shape)
    local = (shape[0] // len(parts), shape[1]) if dim == 0 else (shape[0], shape[1] // len(parts))
    lblocks = _block_grid(apr_dtype, local)[1]
    body = torch.cat([p[header:].view(local[0], lblocks, width) for p in parts], dim).reshape(-1)
    return torch.cat([parts[0][:header], body])


def blocks_finite(apr_dtype: str, part: torch.Tensor, scale: torch.Tensor | None = None) -> bool:
    """Whether whole blocks ``part`` (1-D uint8, a multiple of :func:`block_bytes`) dequantise to finite
    values, without the rest of the tensor (APR_Q8: its leading 4-byte ``scale`` decides)."""
    if apr_dtype == "APR_Q8":
        return bool(torch.isfinite(scale.clone().view(torch.float32)).all())
    if part.numel() == 0:
        return True
    if apr_dtype == "APR_Q4":
        return bool(torch.isfinite(_dequant_apr_q4(part)).all())
    fn = _dequant_q4_k if apr_dtype == "Q4_K" else _dequant_q6_k
    return bool(torch.isfinite(fn(part.view(-1, block_bytes(apr_dtype)))).all())


def _f16(cols: torch.Tensor) -> torch.Tensor:
    """[B, 2] uint8 columns -> [B, 1] float32 from little-endian f16."""
    return cols.contiguous().view(torch.float16).to(torch.float32)


def _dequant_apr_q4(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 18)
    scale = _f16(blocks[:, :2])
    scale = torch.where(torch.isfinite(scale) & (scale.abs() >= _F16_MIN_NORMAL), scale, torch.zeros_like(scale))
    q = blocks[:, 2:].to(torch.int32)
    nib = torch.stack((q & 15, q >> 4), dim=-1).view(-1, 32)  # element 2k low, 2k+1 high
    return ((nib - 8).to(torch.float32) * scale).view(-1)


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GGML get_scale_min_k4 for all 8 sub-blocks: [B, 12] int32 -> ([B, 8], [B, 8])."""
    sc = torch.cat((s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)), dim=1)
    mn = torch.cat((s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)), dim=1)
    return sc, mn


def _dequant_q4_k(blocks: torch.Tensor) -> torch.Tensor:  # [B, 144] -> [B, 256]
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, mn = _scale_min_k4(blocks[:, 4:16].to(torch.int32))
    qs = blocks[:, 16:144].to(torch.int32).view(-1, 4, 32)
    q = torch.stack((qs & 15, qs >> 4), dim=2).view(-1, 8, 32)  # chunk j: low -> 64j+l, high -> 64j+32+l
    y = (d * sc.to(torch.float32)).unsqueeze(-1) * q.to(torch.float32) - (dmin * mn.to(torch.float32)).unsqueeze(-1)
    return y.view(-1, 256)


def _dequant_q6_k(blocks: torch.Tensor) -> torch.Tensor:  # [B, 210] -> [B, 256]
    ql = blocks[:, 0:128].to(torch.int32).view(-1, 2, 2, 32)  # [B, half, a/b, 32]
    qh = blocks[:, 128:192].to(torch.int32).view(-1, 2, 32)
    sc = blocks[:, 192:208].contiguous().view(torch.int8).to(torch.float32)  # [B, 16]
    d = _f16(blocks[:, 208:210])
    a, b = ql[:, :, 0], ql[:, :, 1]
    q = torch.stack((
        (a & 15) | ((qh & 3) << 4),
        (b & 15) | (((qh >> 2) & 3) << 4),
        (a >> 4) | (((qh >> 4) & 3) << 4),
        (b >> 4) | (((qh >> 6) & 3) << 4),
    ), dim=2).view(-1, 16, 16) - 32  # 16 groups of 16, group g uses scale g
    return (d.unsqueeze(-1) * sc.unsqueeze(-1) * q.to(torch.float32)).view(-1, 256)


# -- quantisers --------------------------------------------------------------------------------

def quantize(dtype: str, tensor: torch.Tensor) -> QuantizedTensor:
    """Quantise a float tensor to APR ``dtype`` (APR_Q4, APR_Q8, Q4_K, Q6_K) -> QuantizedTensor.

    APR_Q4/APR_Q8 follow aprender's writer exactly (spec 8.1/8.2, round half away from zero).
    Q4_K and Q6_K are llama.cpp's quantisers without an importance matrix (``llama-quantize``'s
    ``quantize_row_q4_K_ref`` / ``quantize_row_q6_K_ref``: weighted grid searches for each sub-block's
    scale and Q4_K's offset), byte for byte, in the GGML layout llama.cpp and ``gguf`` read.
    """
    return QuantizedTensor(dtype, tuple(tensor.shape), _quantize_raw(dtype, tensor).cpu().contiguous())


def fake_quantize(dtype: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a file quantised to APR ``dtype`` gives it back: ``dequantize(quantize(tensor))``
    on ``tensor``'s device, in its dtype (quantisation-aware training: train/qat.py)."""
    return dequantize(dtype, tensor.shape, _quantize_raw(dtype, tensor), dtype=tensor.dtype)


def _quantize_raw(dtype: str, tensor: torch.Tensor) -> torch.Tensor:
    """The raw blocks (1-D uint8, on ``tensor``'s device) of ``tensor`` quantised to ``dtype``."""
    if dtype not in QUANTIZED:
        raise ValueError(f"quantize: {dtype!r} is not a quantised APR dtype ({', '.join(sorted(QUANTIZED))})")
    if not tensor.is_floating_point():
        raise ValueError(f"quantize: expected a floating-point tensor, got {tensor.dtype}")
    shape = tuple(tensor.shape)
    x = tensor.detach().to(torch.float32).reshape(-1)
    if dtype == "APR_Q8":
        data = _quant_apr_q8(x)
    elif dtype == "APR_Q4":
        data = _quant_apr_q4(x)
    else:
        cols = shape[-1] if shape else 1
        rows = math.prod(shape[:-1])
        nblk = -(-cols // 256)
        padded = torch.zeros(rows, nblk * 256, dtype=torch.float32, device=x.device)
        padded[:, :cols] = x.view(rows, cols)
        fn = _quant_q4_k if dtype == "Q4_K" else _quant_q6_k
        data = (fn(padded.view(-1, 256)).reshape(-1) if rows * nblk
                else torch.empty(0, dtype=torch.uint8, device=x.device))
    return data.to(torch.uint8)


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """Rust f32::round: halves away from zero (torch.round rounds halves to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _f16_bytes(v: torch.Tensor) -> torch.Tensor:  # [B] float -> [B, 2] uint8
    return v.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2)


def _quant_apr_q8(x: torch.Tensor) -> torch.Tensor:
    amax = x.abs().max() if x.numel() else x.new_zeros(())
    scale = amax / torch.full_like(amax, 127.0) if amax > 0 else x.new_ones(())  # (not CUDA's reciprocal)
    q = torch.clamp(_round_away(x / scale), -127, 127).to(torch.int8)
    return torch.cat((scale.reshape(1).to(torch.float32).view(torch.uint8), q.view(torch.uint8)))


def _quant_apr_q4(x: torch.Tensor) -> torch.Tensor:
    n = x.numel()
    nb = -(-n // 32)
    xb = torch.zeros(nb * 32, dtype=torch.float32, device=x.device)
    xb[:n] = x
    xb = xb.view(nb, 32)
    amax = xb.abs().amax(dim=1, keepdim=True) if nb else xb.new_zeros(0, 1)
    scale = torch.where(amax > 0, amax / torch.full_like(amax, 7.0), torch.ones_like(amax))  # (as above)
    nib = (torch.clamp(_round_away(xb / scale), -8, 7) + 8).to(torch.int32).view(-1)
    nib[n:] = 0  # a partial block is zero-filled
    nib = nib.view(nb, 16, 2)
    packed = (nib[..., 0] | (nib[..., 1] << 4)).to(torch.uint8)
    return torch.cat((_f16_bytes(scale.view(-1)), packed), dim=1).reshape(-1)


_FIT_BLOCKS = 4096  # super-blocks fitted at a time on the host (a few MB a step: stays in cache)
_FIT_BLOCKS_CUDA = 65536  # (tens of MB a step: fewer launches of the searches' many small steps)
_GROUP_MAX_EPS = 1e-15  # llama.cpp's GROUP_MAX_EPS: a sub-block of smaller values is all zero


def _fit_chunk(x: torch.Tensor) -> int:
    return _FIT_BLOCKS_CUDA if x.is_cuda else _FIT_BLOCKS


# The k-quant searches below do llama.cpp's reference arithmetic (``quantize_row_q4_K_ref`` /
# ``quantize_row_q6_K_ref`` in ggml-quants.c, no importance matrix) operation for operation in
# float32: each sum is accumulated left to right (``_fsum``), each product associated as the C
# source writes it, ties decided as its loops decide them. So the blocks are byte-identical to
# llama-quantize's (on x86, where that generic C code has no fused multiply-add;
# tests/test_quant_recipe.py checks bytes it wrote), on any device: every step is one IEEE float32
# operation. On a GPU (the Triton backend) kernels/kquant.py runs the same searches in one launch
# per chunk, bit for bit (tests/test_kquant.py).

def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


# The candidate grids, as llama.cpp forms them in float32 and in the order it tries them (the Triton
# launchers pass the same tables): Q4_K's 21 level counts (rmin + rdelta * k) + nmax over the range,
# Q6_K's numerators -(nmax + 0.1 * k) of the inverse scale, k = 0 first, then -9..-1, 1..9.
Q4_K_STEPS = tuple((_f32(-1.0) + _f32(0.1) * k) + 15.0 for k in range(21))
# (Q5_K, GGUF export only: make_qkx2_quants(nmax 31, rmin -0.5, rdelta 0.1, nstep 15))
Q5_K_STEPS = tuple((_f32(-0.5) + _f32(0.1) * k) + 31.0 for k in range(16))
Q6_K_NUMERATORS = tuple(-(_f32(32.0) + _f32(0.1) * k) for k in (0, *range(-9, 0), *range(1, 10)))


def _div(num, den):
    """``num / den`` as C divides floats, correctly rounded: a scalar operand becomes a full tensor
    (torch computes ``scalar / tensor`` as a reciprocal times the scalar, and on CUDA ``tensor /
    scalar`` as a product with the reciprocal)."""
    if not isinstance(num, torch.Tensor) or num.dim() == 0:
        num = torch.full_like(den, float(num))
    if not isinstance(den, torch.Tensor) or den.dim() == 0:
        den = torch.full_like(num, float(den))
    return num / den


def _fsum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the first dimension in float32, in order (a C ``for`` loop's ``s += t[i]``); the
    searches keep each sub-block's values down the first dimension, so every step is contiguous."""
    acc = t[0].clone()
    for i in range(1, t.shape[0]):
        acc += t[i]
    return acc


def _columns(sub: torch.Tensor) -> torch.Tensor:
    """[..., n] sub-blocks -> [n, sub-blocks]: one sub-block a column (``_fsum`` sums down them)."""
    return sub.reshape(-1, sub.shape[-1]).t().contiguous()


def _fit_q4_sub_blocks(sub: torch.Tensor, nmax: float = 15.0, steps=Q4_K_STEPS) -> tuple[torch.Tensor, torch.Tensor,
                                                                                       torch.Tensor]:
    """``(scale, min, levels)`` per 32-value sub-block of ``sub`` [B, 8, 32], ``x ~ scale * L - min``
    with 4-bit levels L and min >= 0: llama.cpp's make_qkx2_quants(nmax 15, rmin -1, rdelta 0.1,
    nstep 20) with weights ``rms(sub-block) + |x|``. Start from the min/max grid; then, in turn, 21
    grids of 14 + k/10 levels (k = 0..20) over the range from the current offset to the maximum are
    rounded, the weighted least-squares scale and offset for those levels solved, and a grid whose
    weighted error beats the best so far taken, its offset becoming the start of the next grids' range
    (so the grids depend on each other, as in llama.cpp's loop). Q5_K's search is the same with
    ``nmax`` 31 and its ``steps`` (``Q5_K_STEPS``)."""
    x = _columns(sub)  # [32, N]
    av = (_fsum(x * x) / 32.0).double().sqrt().float()  # (sqrtf's rounding: torch's float32 sqrt may differ)
    w = av + x.abs()
    lo = x.amin(dim=0).clamp(max=0.0)  # the offset is subtracted, so it is <= 0
    hi = x.amax(dim=0)
    flat = hi == lo
    sum_w, sum_x = _fsum(w), _fsum(w * x)
    one = torch.ones_like(hi)

    def levels_for(iscale, offset):
        return torch.round(iscale * (x - offset)).clamp(0, nmax)

    def error(scale, offset, lv):  # sum w (scale L + offset - x)^2
        diff = (scale * lv + offset) - x
        return _fsum(w * (diff * diff))

    iscale = _div(nmax, torch.where(flat, one, hi - lo))
    scale = _div(1.0, iscale)  # the min/max grid
    levels = levels_for(iscale, lo)
    best = error(scale, lo, levels)
    offset = lo
    for step in steps:
        rng = hi - offset
        iscale = _div(step, torch.where(flat | (rng == 0), one, rng))
        lv = levels_for(iscale, offset)
        wl = w * lv
        sum_l, sum_l2, sum_xl = _fsum(wl), _fsum(wl * lv), _fsum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = torch.where(ok, det, one)
        a = (sum_w * sum_xl - sum_x * sum_l) / det
        b = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clamp = b > 0  # a positive offset is not representable: refit the scale alone
        a = torch.where(clamp, sum_xl / torch.where(sum_l2 != 0, sum_l2, one), a)
        b = torch.where(clamp, torch.zeros_like(b), b)
        err = error(a, b, lv)
        take = ok & (err < best) & ~flat
        best = torch.where(take, err, best)
        scale, offset = torch.where(take, a, scale), torch.where(take, b, offset)
        levels = torch.where(take, lv, levels)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    levels = torch.where(flat, torch.zeros_like(levels), levels)
    return scale.view(sub.shape[:2]), (-offset).view(sub.shape[:2]), levels.t().reshape(sub.shape)


def _nearest_u8(v: torch.Tensor) -> torch.Tensor:
    """``(uint8_t) nearest_int(v)``: round half to even, wrapped to 0..255 as C's conversion does."""
    return torch.remainder(torch.round(v), 256)


def _quant_q4_k(x: torch.Tensor) -> torch.Tensor:  # [B, 256] -> [B, 144]
    if x.shape[0] > _fit_chunk(x):  # bound the search's memory
        return torch.cat([_quant_q4_k(part) for part in x.split(_fit_chunk(x))])
    sub = x.view(-1, 8, 32)
    kq = kernels_for("kquant", sub)
    if kq is not None:  # (on a GPU: the same search in one launch)
        fit = tuple(t.view(*sub.shape[:2], *t.shape[1:]) for t in kq.q4_k_fit(sub.reshape(-1, 32)))
    else:
        fit = _fit_q4_sub_blocks(sub)
    d, dmin, s, q = _scales_and_levels(sub, *fit, nmax=15)
    q = q.view(-1, 4, 2, 32)
    qs = q[:, :, 0] | (q[:, :, 1] << 4)
    return torch.cat((_f16_bytes(d), _f16_bytes(dmin), s.to(torch.uint8), qs.view(-1, 128).to(torch.uint8)), dim=1)


def _scales_and_levels(sub, scale, mins, search, *, nmax: int):
    """Q4_K's and Q5_K's super-block step from the sub-blocks' fits: ``(d, dmin, packed scales [B, 12],
    levels [B, 8, 32])``, each sub-block's 6-bit scale and min relative to the largest, and the values'
    levels recomputed from those rounded scales (as ``quantize_row_q4_K_ref`` does)."""
    max_scale, max_min = scale.amax(dim=1), mins.amax(dim=1)
    max_scale = torch.where(max_scale > 0, max_scale, 0.0)  # (llama.cpp's "if (v > max) max = v" from +0:
    max_min = torch.where(max_min > 0, max_min, 0.0)  # a -0.0 min stays out of dmin)
    safe = lambda v: torch.where(v > 0, v, torch.ones_like(v))  # noqa: E731
    inv_scale = torch.where(max_scale > 0, _div(63.0, safe(max_scale)), torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, _div(63.0, safe(max_min)), torch.zeros_like(max_min))
    sc = _nearest_u8(inv_scale[:, None] * scale).clamp(max=63).to(torch.int32)
    mn = _nearest_u8(inv_min[:, None] * mins).clamp(max=63).to(torch.int32)
    d = _div(max_scale, 63.0).to(torch.float16).to(torch.float32)
    dmin = _div(max_min, 63.0).to(torch.float16).to(torch.float32)
    eff_scale = d[:, None] * sc
    eff_min = dmin[:, None] * mn
    q = torch.round((sub + eff_min[..., None]) / torch.where(eff_scale != 0, eff_scale, 1.0)[..., None])
    # (a sub-block whose scale rounds to 0 keeps the search's levels, as llama.cpp's loop skips it)
    q = torch.where(eff_scale[..., None] != 0, q.clamp(0, nmax), search).to(torch.int32)
    s = torch.empty(sub.shape[0], 12, dtype=torch.int32, device=sub.device)
    s[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    s[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    s[:, 8:12] = (sc[:, 4:8] & 15) | ((mn[:, 4:8] & 15) << 4)
    return d, dmin, s, q


def _fit_q6_sub_blocks(sub: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, levels + 32)`` per 16-value sub-block of ``sub`` [B, 16, 16], a signed scale for 6-bit
    levels in [-32, 31]: llama.cpp's make_qx_quants(nmax 32, rmse_type 1). The value of largest
    magnitude maps to -32 (the long end of the range); then the grids of 32 + k/10 levels, k = -9..9
    (0 first), are rounded in turn, and one replaces the best so far when its x^2-weighted
    least-squares fit is better ((sum w x L)^2 > best * sum w L^2, compared in float32 as there)."""
    nmax = 32.0
    x = _columns(sub)  # [16, N]
    peak = x.gather(0, x.abs().argmax(dim=0, keepdim=True)).squeeze(0)  # signed, the first largest
    zero = peak.abs() < _GROUP_MAX_EPS
    safe_peak = torch.where(zero, torch.ones_like(peak), peak)
    w = x * x
    wx = w * x

    def grid(numerator: torch.Tensor):
        iscale = _div(numerator, safe_peak)
        lv = torch.round(iscale * x).clamp(-nmax, nmax - 1)
        return lv, _fsum(wx * lv), _fsum((w * lv) * lv)

    levels, sumlx, suml2 = grid(Q6_K_NUMERATORS[0])
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, 1.0), torch.zeros_like(sumlx))
    best = scale * sumlx
    for numerator in Q6_K_NUMERATORS[1:]:
        lv, sumlx, suml2 = grid(numerator)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = torch.where(better, sumlx / torch.where(suml2 > 0, suml2, 1.0), scale)
        best = torch.where(better, scale * sumlx, best)
        levels = torch.where(better, lv, levels)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    levels = torch.where(zero, torch.zeros_like(levels), levels + nmax)
    return scale.view(sub.shape[:2]), levels.t().reshape(sub.shape)


def _quant_q6_k(x: torch.Tensor) -> torch.Tensor:  # [B, 256] -> [B, 210]
    if x.shape[0] > _fit_chunk(x):  # bound the search's memory
        return torch.cat([_quant_q6_k(part) for part in x.split(_fit_chunk(x))])
    sub = x.view(-1, 16, 16)
    kq = kernels_for("kquant", sub)
    if kq is not None:  # (on a GPU: the same search in one launch)
        scale, search = (t.view(*sub.shape[:2], *t.shape[1:]) for t in kq.q6_k_fit(sub.reshape(-1, 16)))
    else:
        scale, search = _fit_q6_sub_blocks(sub)
    # the super-block scale: the sub-block scale of largest magnitude (the first) maps to -128
    top = scale.gather(1, scale.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    empty = top.abs() < _GROUP_MAX_EPS  # (an all-zero block: every byte 0)
    iscale = _div(-128.0, torch.where(empty, torch.ones_like(top), top))
    d = torch.where(empty, 0.0, _div(1.0, iscale)).to(torch.float16).to(torch.float32)
    sc = torch.where(empty[:, None], 0.0, torch.round(iscale[:, None] * scale).clamp(max=127))
    eff = d[:, None] * sc
    q = torch.round(sub / torch.where(eff != 0, eff, 1.0)[..., None]).clamp(-32, 31) + 32
    # (a sub-block whose scale rounds to 0 keeps the search's levels, as llama.cpp's loop skips it)
    q = torch.where(eff[..., None] != 0, q, search)
    q = torch.where(empty[:, None, None], 0.0, q).to(torch.int32)
    q = q.view(-1, 2, 4, 32)  # [B, half, quarter, l]
    q0, q1, q2, q3 = q[:, :, 0], q[:, :, 1], q[:, :, 2], q[:, :, 3]
    ql = torch.stack(((q0 & 15) | ((q2 & 15) << 4), (q1 & 15) | ((q3 & 15) << 4)), dim=2)  # [B, 2, 2, 32]
    qh = (q0 >> 4) | ((q1 >> 4) << 2) | ((q2 >> 4) << 4) | ((q3 >> 4) << 6)  # [B, 2, 32]
    return torch.cat((ql.reshape(-1, 128).to(torch.uint8), qh.reshape(-1, 64).to(torch.uint8),
                      sc.to(torch.int8).view(torch.uint8), _f16_bytes(d)), dim=1)
