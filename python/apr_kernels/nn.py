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
