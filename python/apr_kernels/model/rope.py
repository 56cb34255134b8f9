"""Rotary position embeddings in the two row orders found in model files.

* ``rope_type`` 2 (NEOX, Hugging Face ``rotate_half``): dimension i pairs with i + D/2.
* ``rope_type`` 0 (NORM, llama.cpp): dimension 2i pairs with 2i + 1.

Both rotate pair i by angle ``position * theta ** (-2i / D)``. llama.cpp's converter permutes the q/k
projection rows so that rotating adjacent pairs of the permuted weights gives exactly what rotating
split halves of the original weights gives; ``permute_rows_for_norm_rope`` is that permutation.
The cos/sin tables are computed in fp32 the way Hugging Face does (then cast to the activation dtype).

Frequency scaling (Hugging Face ``rope_scaling``, carried in APR metadata as the custom key
``rope_scaling``): ``linear`` divides every frequency by ``factor``; ``llama3`` (Llama 3.1+) divides
the low frequencies by ``factor``, keeps the high ones and interpolates between them. Other kinds
(yarn, dynamic, longrope) are refused by ``check_rope_scaling``, never silently ignored: ignoring them
would change the model's numbers.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_SCALING = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def check_rope_scaling(scaling, source: str = "ModelConfig") -> dict | None:
    """The scaling dict in canonical form (``rope_type`` key; None for no scaling), or a ValueError
    naming what is unsupported or missing."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise ValueError(f"{source}: rope_scaling={scaling!r}; expected a JSON object or null")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in SUPPORTED_SCALING:
        raise ValueError(f"{source}: rope_scaling type {kind!r} is not supported; expected one of "
                         f"{', '.join(SUPPORTED_SCALING)} (computing without it would give wrong numbers)")
    if kind == "default":
        return None
    out = {"rope_type": kind}
    for key in SUPPORTED_SCALING[kind]:
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{source}: rope_scaling[{key!r}]={value!r}; expected a positive number "
                             f"for {kind!r} scaling")
        out[key] = value
    if kind == "llama3" and not out["high_freq_factor"] > out["low_freq_factor"]:
        raise ValueError(f"{source}: rope_scaling high_freq_factor={out['high_freq_factor']} must exceed "
                         f"low_freq_factor={out['low_freq_factor']}")
    return out


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None = None, *, device=None) -> torch.Tensor:
    """The rotation frequency of each pair, [head_dim // 2] fp32, with ``scaling`` applied."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        # wavelengths longer than old_len / low are slowed by `factor`, shorter than old_len / high
        # kept, and the band between interpolated smoothly
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(seq_len: int, head_dim: int, theta: float, *, scaling: dict | None = None, device=None,
                dtype=torch.float32):
    """``(cos, sin)`` of shape [seq_len, head_dim // 2] for positions 0..seq_len-1 (fp32 maths)."""
    inv_freq = inv_frequencies(head_dim, theta, scaling, device=device)
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    angles = positions[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_type: int) -> torch.Tensor:
    """Rotate ``x`` [B, S, H, D] by the tables [S, D/2] (already in x's dtype)."""
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    if rope_type == 2:
        x1, x2 = x.chunk(2, dim=-1)
        # written as HF does (x*cos + rotate_half(x)*sin with duplicated tables) so fp32 rounding
        # matches it bit for bit
        c, s = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
        return x * c + torch.cat((-x2, x1), dim=-1) * s
    if rope_type == 0:
        pairs = x.unflatten(-1, (-1, 2))
        x1, x2 = pairs[..., 0], pairs[..., 1]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    raise ValueError(f"rope_type={rope_type!r}; expected 0 (adjacent pairs) or 2 (split halves)")


def permute_rows_for_norm_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's ``permute``: reorder q/k projection rows (or bias entries) per head from the split-half
    order to the adjacent-pair order. ``w`` is [n_heads * D, ...]."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute_rows_from_norm_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of ``permute_rows_for_norm_rope`` (adjacent-pair order back to Hugging Face order)."""
    return (w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))
