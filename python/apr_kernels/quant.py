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
    Q4_K and Q6_K fit each sub-block's scale (and Q4_K's offset) with llama.cpp's weighted grid
    searches (``_fit_q4_sub_blocks``, ``_fit_q6_sub_blocks``) and write the GGML byte layout, which
    llama.cpp and the ``gguf`` package read.
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
    scale = amax / 127 if amax > 0 else x.new_ones(())
    q = torch.clamp(_round_away(x / scale), -127, 127).to(torch.int8)
    return torch.cat((scale.reshape(1).to(torch.float32).view(torch.uint8), q.view(torch.uint8)))


def _quant_apr_q4(x: torch.Tensor) -> torch.Tensor:
    n = x.numel()
    nb = -(-n // 32)
    xb = torch.zeros(nb * 32, dtype=torch.float32, device=x.device)
    xb[:n] = x
    xb = xb.view(nb, 32)
    amax = xb.abs().amax(dim=1, keepdim=True) if nb else xb.new_zeros(0, 1)
    scale = torch.where(amax > 0, amax / 7, torch.ones_like(amax))
    nib = (torch.clamp(_round_away(xb / scale), -8, 7) + 8).to(torch.int32).view(-1)
    nib[n:] = 0  # a partial block is zero-filled
    nib = nib.view(nb, 16, 2)
    packed = (nib[..., 0] | (nib[..., 1] << 4)).to(torch.uint8)
    return torch.cat((_f16_bytes(scale.view(-1)), packed), dim=1).reshape(-1)


_FIT_BLOCKS = 4096  # super-blocks fitted at a time (the search holds 21 candidate grids of each)
_FIT_BLOCKS_CUDA = 65536  # (about 1.5 GB of grids: fewer, larger launches where a GPU fits them)


def _fit_chunk(x: torch.Tensor) -> int:
    return _FIT_BLOCKS_CUDA if x.is_cuda else _FIT_BLOCKS


def _fit_q4_sub_blocks(sub: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, min)`` per 32-value sub-block of ``sub`` [B, 8, 32], ``x ~ scale * L - min`` with
    4-bit levels L and min >= 0, fitted the way llama.cpp's k-quants do (make_qkx2_quants): start from
    the min/max grid, then for 21 candidate grids (15 + k/10 - 1 levels over the range, k = 0..20)
    round, solve the weighted least-squares scale and offset for those levels, and keep the candidate
    with the smallest weighted error. Weights ``rms(sub-block) + |x|`` favour the large values.

    Every weighted sum is a batched matrix-vector product, and the error of a fit ``a * L + b`` is
    expanded into those sums (in float64), so no [B, 8, 21, 32] residual is formed."""
    nmax = 15.0
    lo = sub.amin(dim=2).clamp(max=0.0)  # the offset is subtracted, so it is <= 0
    rng = sub.amax(dim=2) - lo
    flat = rng <= 0
    safe_rng = torch.where(flat, torch.ones_like(rng), rng)
    w = sub.pow(2).mean(dim=2, keepdim=True).sqrt() + sub.abs()  # [B, 8, 32]
    wv, wxv = w[..., None], (w * sub)[..., None]  # [B, 8, 32, 1]
    sw = w.sum(dim=2, dtype=torch.float64)[..., None]
    sx = wxv.sum(dim=(2, 3), dtype=torch.float64)[..., None]
    sxx = (wxv.squeeze(-1) * sub).sum(dim=2, dtype=torch.float64)[..., None]

    def fit_error(lv, a, b):  # sum w (a L + b - x)^2 from the sums, lv [B, 8, K, 32]
        sl = (lv @ wv).squeeze(-1).double()
        sl2 = ((lv * lv) @ wv).squeeze(-1).double()
        sxl = (lv @ wxv).squeeze(-1).double()
        if a is None:  # least squares for this grid
            det = sw * sl2 - sl * sl
            ok = det > 0
            det = torch.where(ok, det, torch.ones_like(det))
            a = (sw * sxl - sx * sl) / det
            b = (sl2 * sx - sl * sxl) / det
            clamp = b > 0  # a positive offset is not representable: refit the scale alone
            a = torch.where(clamp, sxl / torch.where(sl2 > 0, sl2, torch.ones_like(sl2)), a)
            b = torch.where(clamp, torch.zeros_like(b), b)
        else:
            ok = torch.ones_like(sl, dtype=torch.bool)
        err = a * a * sl2 + 2 * a * b * sl - 2 * a * sxl + b * b * sw - 2 * b * sx + sxx
        return a, b, torch.where(ok, err, torch.full_like(err, float("inf")))

    # the min/max grid: scale = range / 15, offset = lo
    a0, b0 = (rng / nmax)[..., None].double(), lo[..., None].double()
    lv0 = torch.round((sub - lo[..., None]) / (safe_rng / nmax)[..., None]).clamp(0, nmax)[:, :, None, :]
    _, _, best_err = fit_error(lv0, a0, b0)
    # the candidate grids, all at once: [B, 8, 21, 32] levels
    ks = torch.arange(21, dtype=sub.dtype, device=sub.device) * 0.1 - 1.0
    iscale = (nmax + ks)[None, None, :] / safe_rng[..., None]
    lv = torch.round(iscale[..., None] * (sub - lo[..., None])[:, :, None, :]).clamp(0, nmax)
    a, b, err = fit_error(lv, None, None)
    i = err.argmin(dim=2, keepdim=True)
    better = err.gather(2, i) < best_err
    scale = torch.where(better, a.gather(2, i), a0).squeeze(2).to(sub.dtype)
    offset = torch.where(better, b.gather(2, i), b0).squeeze(2).to(sub.dtype)
    scale = torch.where(flat, torch.zeros_like(scale), scale.clamp(min=0.0))
    return scale, torch.where(flat, -lo, -offset).clamp(min=0.0)


def _quant_q4_k(x: torch.Tensor) -> torch.Tensor:  # [B, 256] -> [B, 144]
    if x.shape[0] > _fit_chunk(x):  # bound the search's memory
        return torch.cat([_quant_q4_k(part) for part in x.split(_fit_chunk(x))])
    sub = x.view(-1, 8, 32)
    scale, mins = _fit_q4_sub_blocks(sub)
    d = (scale.amax(dim=1) / 63).to(torch.float16).to(torch.float32)
    dmin = (mins.amax(dim=1) / 63).to(torch.float16).to(torch.float32)
    safe = lambda v: torch.where(v > 0, v, torch.ones_like(v))  # noqa: E731
    sc = torch.clamp(torch.round(scale / safe(d)[:, None]), 0, 63).to(torch.int32)
    mn = torch.clamp(torch.round(mins / safe(dmin)[:, None]), 0, 63).to(torch.int32)
    eff_scale = d[:, None] * sc
    eff_min = dmin[:, None] * mn
    q = torch.round((sub + eff_min[..., None]) / safe(eff_scale)[..., None])
    q = torch.where(eff_scale[..., None] > 0, q, torch.zeros_like(q)).clamp(0, 15).to(torch.int32)
    s = torch.empty(x.shape[0], 12, dtype=torch.int32, device=x.device)
    s[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    s[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    s[:, 8:12] = (sc[:, 4:8] & 15) | ((mn[:, 4:8] & 15) << 4)
    q = q.view(-1, 4, 2, 32)
    qs = q[:, :, 0] | (q[:, :, 1] << 4)
    return torch.cat((_f16_bytes(d), _f16_bytes(dmin), s.to(torch.uint8), qs.view(-1, 128).to(torch.uint8)), dim=1)


def _fit_q6_sub_blocks(sub: torch.Tensor) -> torch.Tensor:
    """Signed scale per 16-value sub-block of ``sub`` [B, 16, 16] for 6-bit levels in [-32, 31],
    fitted as llama.cpp's make_qx_quants does: the value of largest magnitude maps to -32 (the long
    end of the range), then 19 grids (32 + k/10 levels, k = -9..9) are rounded and the one with the
    best x^2-weighted least-squares scale kept (largest (sum w x L)^2 / sum w L^2)."""
    nmax = 32.0
    peak = sub.gather(2, sub.abs().argmax(dim=2, keepdim=True)).squeeze(2)  # signed
    zero = peak == 0
    safe_peak = torch.where(zero, torch.ones_like(peak), peak)
    w = sub * sub
    ks = torch.arange(-9, 10, dtype=sub.dtype, device=sub.device) * 0.1
    iscale = -(nmax + ks)[None, None, :] / safe_peak[..., None]  # [B, 16, 19]
    lv = torch.round(iscale[..., None] * sub[:, :, None, :]).clamp(-nmax, nmax - 1)  # [B, 16, 19, 16]
    sumlx = (lv @ (w * sub)[..., None]).squeeze(-1).double()
    suml2 = ((lv * lv) @ w[..., None]).squeeze(-1).double()
    ok = suml2 > 0
    suml2 = torch.where(ok, suml2, torch.ones_like(suml2))
    score = torch.where(ok, sumlx * sumlx / suml2, torch.full_like(sumlx, -1.0))
    i = score.argmax(dim=2, keepdim=True)
    scale = (sumlx.gather(2, i) / suml2.gather(2, i)).squeeze(2).to(sub.dtype)
    return torch.where(zero, torch.zeros_like(scale), scale)


def _quant_q6_k(x: torch.Tensor) -> torch.Tensor:  # [B, 256] -> [B, 210]
    if x.shape[0] > _fit_chunk(x):  # bound the search's memory
        return torch.cat([_quant_q6_k(part) for part in x.split(_fit_chunk(x))])
    sub = x.view(-1, 16, 16)
    scale = _fit_q6_sub_blocks(sub)
    # the super-block scale: the sub-block scale of largest magnitude maps to -128 (llama.cpp's rule)
    top = scale.gather(1, scale.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    d = (-top / 128).to(torch.float16).to(torch.float32)
    safe = lambda v: torch.where(v != 0, v, torch.ones_like(v))  # noqa: E731
    sc = torch.clamp(torch.round(scale / safe(d)[:, None]), -128, 127)
    sc = torch.where(d[:, None] != 0, sc, torch.zeros_like(sc))
    eff = d[:, None] * sc
    q = torch.round(sub / safe(eff)[..., None])
    q = torch.where(eff[..., None] != 0, q, torch.zeros_like(q)).clamp(-32, 31).to(torch.int32) + 32
    q = q.view(-1, 2, 4, 32)  # [B, half, quarter, l]
    q0, q1, q2, q3 = q[:, :, 0], q[:, :, 1], q[:, :, 2], q[:, :, 3]
    ql = torch.stack(((q0 & 15) | ((q2 & 15) << 4), (q1 & 15) | ((q3 & 15) << 4)), dim=2)  # [B, 2, 2, 32]
    qh = (q0 >> 4) | ((q1 >> 4) << 2) | ((q2 >> 4) << 4) | ((q3 >> 4) << 6)  # [B, 2, 32]
    return torch.cat((ql.reshape(-1, 128).to(torch.uint8), qh.reshape(-1, 64).to(torch.uint8),
                      sc.to(torch.int8).view(torch.uint8), _f16_bytes(d)), dim=1)
