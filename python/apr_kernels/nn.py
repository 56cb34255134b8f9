"""nn.Module wrappers over the ops: parameters, ``extra_repr`` and a call to the functional op."""

from __future__ import annotations

import torch
from torch import nn

# ---------------------------------------------------------------------------------- RMSNorm (issue 4)
from apr_kernels.ops.rms_norm import add_rms_norm, rms_norm  # noqa: E402


class RMSNorm(nn.Module):
    """Drop-in for HF ``LlamaRMSNorm``/``Qwen2RMSNorm`` (same parameter name ``weight``, same
    numerics), backed by the ``apr::rms_norm`` / ``apr::add_rms_norm`` ops.

    ``forward(x)`` -> normalised x; ``forward(x, residual)`` -> ``(rms_norm(x + residual), x + residual)``,
    the fused pre-norm step whose second output is the new residual stream."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, *, device=None, dtype=None) -> None:
        super().__init__()
        self.hidden_size = int(hidden_size)
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(self.hidden_size, device=device, dtype=dtype))

    @property
    def variance_epsilon(self) -> float:  # the HF attribute name
        return self.eps

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


# -------------------------------------------------------------------------------- Attention (issue 5)


class Attention(nn.Module):
    """Parameter-free wrapper over :func:`apr_kernels.attention` (q ``[B, S, Hq, D]``, k/v
    ``[B, S, Hkv, D]``, grouped K/V heads, causal by default). Projections and RoPE belong to the
    model; this module only fixes ``causal`` and ``scale``."""

    def __init__(self, causal: bool = True, scale: float | None = None):
        super().__init__()
        self.causal = causal
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from apr_kernels.ops.attention import attention

        return attention(q, k, v, causal=self.causal, scale=self.scale)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, scale={self.scale}"
