"""GGML block types that GGUF files hold and APR files do not (Q5_K, Q5_0, Q5_1, Q8_0, and F16, llama.cpp's
last fallback), each as llama.cpp's ``quantize_row_*_ref`` writes it: the blocks ``export --quantize``
writes (``blocks``), and the values such a file gives back (``fake_quantize``: ``eval --quantize
gguf:KIND`` and ``train --qat gguf:KIND`` run the weights llama.cpp will). Q4_K and Q6_K are APR formats
too (``quant.py``; the same blocks).

Q5_K is Q4_K's search with 5-bit levels (``quant._fit_q4_sub_blocks`` with nmax 31 and
``quant.Q5_K_STEPS``; on a GPU ``kernels/kquant.py``'s ``q5_k_fit``). The 32-value types are written by the ``gguf`` package's quantisers (checked
byte for byte against llama-quantize's files) and fake-quantised here in torch, on the tensor's
device, with the same float32 operations: Q8_0 ``round(x / d) d`` with ``d = amax / 127`` (rounded
half away from zero), Q5_0 ``(trunc(x / d + 16.5) - 16) d`` with ``d = -max / 16`` of the value of
largest magnitude, Q5_1 ``trunc((x - min) / d + 0.5) d + min`` with ``d = (max - min) / 31``; the
division by ``d`` is a product with ``1 / d`` as there, the stored ``d`` (and Q5_1's ``min``) a float16.
"""

from __future__ import annotations

import torch

from .backend import kernels_for
from .quant import (Q5_K_STEPS, _fit_chunk, _div, _f16, _f16_bytes, _fit_q4_sub_blocks, _quantize_raw, _round_away,
                    _scale_min_k4, _scales_and_levels, fake_quantize as _apr_fake_quantize)

# GGML type -> values per block along a row (F16: one)
ROW_BLOCK = {"Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "Q8_0": 32, "Q5_0": 32, "Q5_1": 32, "F16": 1}


def q5_k_blocks(x: torch.Tensor) -> torch.Tensor:  # [B, 256] -> [B, 176]
    """GGML ``block_q5_K`` of each 256 values, ``quantize_row_q5_K_ref`` byte for byte (the Q4_K search
    with 5-bit levels: ``_fit_q4_sub_blocks(nmax 31, Q5_K_STEPS)``). Not an APR format: GGUF export
    (``export --quantize q4km``) writes it where llama.cpp's Q4_K_M does."""
    if x.shape[0] > _fit_chunk(x):  # bound the search's memory
        return torch.cat([q5_k_blocks(part) for part in x.split(_fit_chunk(x))])
    sub = x.to(torch.float32).reshape(-1, 8, 32)
    kq = kernels_for("kquant", sub)
    if kq is not None:  # (on a GPU: the same search in one launch, kernels/kquant.py)
        fit = tuple(t.view(*sub.shape[:2], *t.shape[1:]) for t in kq.q5_k_fit(sub.reshape(-1, 32)))
    else:
        fit = _fit_q4_sub_blocks(sub, 31.0, Q5_K_STEPS)
    d, dmin, s, q = _scales_and_levels(sub, *fit, nmax=31)
    q = q.view(-1, 4, 2, 32)  # [B, chunk of 64, low/high 32, l]
    ql = (q[:, :, 0] & 15) | ((q[:, :, 1] & 15) << 4)
    shifts = 2 * torch.arange(4, device=x.device).view(1, 4, 1)  # (chunk c: bits 2c and 2c + 1 of qh[l])
    qh = (((q[:, :, 0] >> 4) << shifts) | ((q[:, :, 1] >> 4) << (shifts + 1))).sum(dim=1)
    return torch.cat((_f16_bytes(d), _f16_bytes(dmin), s.to(torch.uint8), qh.to(torch.uint8),
                      ql.reshape(-1, 128).to(torch.uint8)), dim=1)


def _dequant_q5_k(blocks: torch.Tensor) -> torch.Tensor:  # [B, 176] -> [B, 256]
    """``dequantize_row_q5_K``: ``d sc (q + 16 h) - dmin m`` per sub-block, its low nibbles laid out as
    Q4_K's and each level's fifth bit ``h`` in ``qh`` (bit j of byte l: level l of sub-block j)."""
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, mn = _scale_min_k4(blocks[:, 4:16].to(torch.int32))
    qh = blocks[:, 16:48].to(torch.int32).unsqueeze(1)  # [B, 1, 32]
    qs = blocks[:, 48:176].to(torch.int32).view(-1, 4, 32)
    low = torch.stack((qs & 15, qs >> 4), dim=2).view(-1, 8, 32)  # chunk c: sub-blocks 2c (low), 2c + 1 (high)
    high = (qh >> torch.arange(8, device=blocks.device).view(1, 8, 1)) & 1
    q = (low + 16 * high).to(torch.float32)
    y = (d * sc.to(torch.float32)).unsqueeze(-1) * q - (dmin * mn.to(torch.float32)).unsqueeze(-1)
    return y.view(-1, 256)


def blocks(gtype: str, t: torch.Tensor):
    """``[rows, cols]`` floats -> the rows' GGML blocks ``[rows, bytes]`` (uint8 numpy): Q4_K/Q6_K/Q5_K
    from this package's llama.cpp-exact searches (on ``t``'s device), Q5_0/Q5_1/Q8_0 from the ``gguf``
    package's quantisers (on the host)."""
    rows = t.shape[0]
    if gtype in ("Q4_K", "Q6_K", "Q5_K"):
        t = t.to(torch.float32)
        raw = q5_k_blocks(t.reshape(-1, 256)) if gtype == "Q5_K" else _quantize_raw(gtype, t)
        return raw.view(rows, -1).cpu().numpy()
    import gguf
    from gguf.quants import quantize

    return quantize(t.to(torch.float32).cpu().contiguous().numpy(), getattr(gguf.GGMLQuantizationType, gtype))


def fake_quantize(gtype: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` (2-D, rows of whole blocks of ``gtype``) as a GGUF file of GGML type ``gtype`` gives it back,
    on ``t``'s device, in its dtype; APR formats (Q4_K, Q6_K, APR_Q8, APR_Q4) as ``quant.fake_quantize``."""
    if gtype not in ROW_BLOCK or gtype in ("Q4_K", "Q6_K"):
        return _apr_fake_quantize(gtype, t)
    if gtype == "F16":
        return t.to(torch.float16).to(t.dtype)
    x = t.detach().to(torch.float32)
    if gtype == "Q5_K":
        return _dequant_q5_k(q5_k_blocks(x.reshape(-1, 256))).reshape(t.shape).to(t.dtype)
    x = x.reshape(-1, 32)
    if gtype == "Q8_0":
        d = _div(x.abs().amax(dim=1, keepdim=True), 127.0)
        out = _round_away(x * _inverse(d)) * _as_f16(d)
    elif gtype == "Q5_0":
        peak = x.gather(1, x.abs().argmax(dim=1, keepdim=True))  # (signed, the first largest)
        d = _div(peak, -16.0)
        out = (torch.trunc(x * _inverse(d) + 16.5).clamp(max=31) - 16) * _as_f16(d)
    else:  # Q5_1
        lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
        d = _div(hi - lo, 31.0)
        out = torch.trunc((x - lo) * _inverse(d) + 0.5) * _as_f16(d) + _as_f16(lo)
    return out.reshape(t.shape).to(t.dtype)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """``d ? 1.0f / d : 0.0f`` (the quantisers multiply by it), correctly rounded."""
    return torch.where(d != 0, _div(1.0, torch.where(d != 0, d, 1.0)), torch.zeros((), device=d.device))


def _as_f16(v: torch.Tensor) -> torch.Tensor:
    """``v`` as the block stores it (float16), read back as float32."""
    return v.to(torch.float16).to(torch.float32)
