"""Rotary position embeddings in the two row orders found in model files.

* ``rope_type`` 2 (NEOX, Hugging Face ``rotate_half``): dimension i pairs with i + D/2.
* ``rope_type`` 0 (NORM, llama.cpp): dimension 2i pairs with 2i + 1.

Both rotate pair i by angle ``position * theta ** (-2i / D)``. llama.cpp's converter permutes the q/k
projection rows so that rotating adjacent pairs of the permuted weights gives exactly what rotating
split halves of the original weights gives; ``permute_rows_for_norm_rope`` is that permutation.
The cos/sin tables are computed in fp32 the way Hugging Face does (then cast to the activation dtype).

Frequency scaling (Hugging Face ``rope_scaling``, carried in APR metadata as the custom key
``rope_scaling``): ``linear`` divides every frequency by ``factor``; ``llama3`` (Llama 3.1+) divides
the low frequencies by ``factor``, keeps the high ones and interpolates between them by wavelength;
``yarn`` (Qwen2.5/Qwen3 long context) does the same with a linear ramp over pair index between the
pairs that turn ``beta_fast`` and ``beta_slow`` times within the original context, and multiplies the
cos/sin tables by its attention factor (``0.1 ln(factor) + 1`` unless given); ``dynamic`` (NTK) keeps
the frequencies up to ``max_position_embeddings`` and beyond it raises the base for the sequence's
length (as Hugging Face computes it for one forward of that length; it also carries that state over
to later calls). Other kinds (longrope) are refused by ``check_rope_scaling``, never silently
ignored: ignoring them would change the model's numbers.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_SCALING = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "dynamic": ("factor",),
}
# optional yarn keys, Hugging Face's defaults when absent: beta_fast 32, beta_slow 1, truncate True,
# attention_factor from factor (and mscale / mscale_all_dim when both are given)
YARN_OPTIONAL = ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


def check_rope_scaling(scaling, source: str = "ModelConfig", max_position_embeddings: int | None = None) -> dict | None:
    """The scaling dict in canonical form (``rope_type`` key; None for no scaling), or a ValueError
    naming what is unsupported or missing. As in Hugging Face, ``original_max_position_embeddings``
    of llama3/yarn defaults to the model's ``max_position_embeddings``."""
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
    if kind in ("llama3", "yarn") and scaling.get("original_max_position_embeddings") is None:
        scaling = {**scaling, "original_max_position_embeddings": max_position_embeddings}
    for key in SUPPORTED_SCALING[kind]:
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{source}: rope_scaling[{key!r}]={value!r}; expected a positive number "
                             f"for {kind!r} scaling")
        out[key] = value
    if kind == "llama3" and not out["high_freq_factor"] > out["low_freq_factor"]:
        raise ValueError(f"{source}: rope_scaling high_freq_factor={out['high_freq_factor']} must exceed "
                         f"low_freq_factor={out['low_freq_factor']}")
    if kind == "yarn":
        for key in YARN_OPTIONAL:
            value = scaling.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{source}: rope_scaling[{key!r}]={value!r}; expected a positive number or "
                                 f"null for 'yarn' scaling")
            out[key] = value
        if not isinstance(scaling.get("truncate", True), bool):
            raise ValueError(f"{source}: rope_scaling['truncate']={scaling['truncate']!r}; expected true or false")
        if scaling.get("truncate") is False:
            out["truncate"] = False
        if out.get("beta_fast", 32) <= out.get("beta_slow", 1):
            raise ValueError(f"{source}: rope_scaling beta_fast={out.get('beta_fast', 32)} must exceed "
                             f"beta_slow={out.get('beta_slow', 1)}")
    return out


def attention_factor(scaling: dict | None) -> float:
    """The factor yarn multiplies the cos/sin tables by (1.0 for every other kind)."""
    if (scaling or {}).get("rope_type") != "yarn":
        return 1.0
    if "attention_factor" in scaling:
        return float(scaling["attention_factor"])

    def mscale(factor: float, m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    factor, m, m_all = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    return float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None = None, *, device=None,
                    seq_len: int | None = None, max_position_embeddings: int | None = None) -> torch.Tensor:
    """The rotation frequency of each pair, [head_dim // 2] fp32, with ``scaling`` applied (``dynamic``
    needs the sequence length and the model's ``max_position_embeddings``)."""
    if (scaling or {}).get("rope_type") == "dynamic":
        if max_position_embeddings is None:
            raise ValueError("dynamic RoPE scaling needs max_position_embeddings")
        if seq_len is not None and seq_len > max_position_embeddings:
            factor = scaling["factor"]
            theta = theta * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
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
    if kind == "yarn":
        factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
        beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)

        def pair_turning(turns: float) -> float:  # the (fractional) pair index that turns `turns` times
            return head_dim * math.log(old_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

        low, high = pair_turning(beta_fast), pair_turning(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        # pairs below `low` turn often enough to be kept (extrapolated), above `high` are slowed by
        # `factor` (interpolated), a linear ramp between
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=device) - low)
                / (high - low if high != low else 0.001)).clamp(0, 1)
        keep = 1 - ramp
        return 1.0 / (factor * theta ** exponent) * (1 - keep) + inv_freq * keep  # Hugging Face's roundings
    return inv_freq


# Llama 3.1's llama3 band edges, used when a --rope-scaling spec names only the factor
LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


def parse_rope_scaling(spec: str, max_position_embeddings: int, where: str = "--rope-scaling") -> dict | None:
    """A rope_scaling dict from ``KIND:FACTOR`` (``yarn:4``, ``llama3:8``, ``linear:2``, ``dynamic:2``;
    ``none``: no scaling) or a JSON object (Hugging Face's keys), checked by :func:`check_rope_scaling`.
    The context it scales from (``original_max_position_embeddings`` of llama3/yarn) defaults to the
    model's current ``max_position_embeddings``."""
    import json

    spec = spec.strip()
    if spec.lower() in ("none", "default"):
        return None
    if spec.startswith("{"):
        try:
            scaling = json.loads(spec)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: {spec!r} is not valid JSON ({e.msg}); expected KIND:FACTOR or a JSON "
                             f"object") from None
    else:
        kind, _, factor = spec.partition(":")
        try:
            factor = float(factor)
        except ValueError:
            raise ValueError(f"{where}: {spec!r}; expected KIND:FACTOR with KIND one of "
                             f"{', '.join(k for k in SUPPORTED_SCALING if k != 'default')} and a number, e.g. "
                             f"yarn:4, or a JSON object") from None
        scaling = {"rope_type": kind, "factor": factor, **(LLAMA3_DEFAULTS if kind == "llama3" else {})}
    return check_rope_scaling(scaling, where, max_position_embeddings)


def rope_tables(seq_len: int, head_dim: int, theta: float, *, scaling: dict | None = None, device=None,
                dtype=torch.float32, max_position_embeddings: int | None = None):
    """``(cos, sin)`` of shape [seq_len, head_dim // 2] for positions 0..seq_len-1 (fp32 maths; yarn's
    attention factor multiplies both before the cast, as Hugging Face does)."""
    inv_freq = inv_frequencies(head_dim, theta, scaling, device=device, seq_len=seq_len,
                               max_position_embeddings=max_position_embeddings)
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    angles = positions[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    if (m := attention_factor(scaling)) != 1.0:
        cos, sin = cos * m, sin * m
    return cos.to(dtype), sin.to(dtype)


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
