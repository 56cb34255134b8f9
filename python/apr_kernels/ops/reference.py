"""Pure-PyTorch reference implementations: the CPU fallback path and the tests' readable oracle.

Each function states the numerics it implements; the Triton kernels must match them within the
dtype tolerances of tests/.
"""

from __future__ import annotations

import torch

# ---------------------------------------------------------------------------------- RMSNorm (issue 4)
# Hugging Face LlamaRMSNorm / Qwen2RMSNorm numerics (transformers/models/llama/modeling_llama.py):
# normalise in fp32, round x_hat to x's dtype, then multiply by the weight with torch's type
# promotion (so y has dtype promote(x, weight)). The fused add rounds x + residual to x's dtype
# first, as HF's `residual + hidden_states` does in the model dtype.


def rms_norm_forward_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, rstd)``: y = weight * dt(h * rstd), h = fp32(x), rstd = rsqrt(mean(h^2) + eps) (fp32,
    shape x.shape[:-1]). fp64 inputs are computed in fp64 (the gradcheck path)."""
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * (h * rstd).to(x.dtype)
    return y, rstd.squeeze(-1).to(torch.promote_types(x.dtype, torch.float32))


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """HF RMSNorm: ``weight * (fp32(x) * rsqrt(mean(fp32(x)^2) + eps)).to(x.dtype)``."""
    return rms_norm_forward_reference(x, weight, eps)[0]


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(s), s)`` with ``s = x + residual`` in x's dtype (the new residual stream)."""
    s = x + residual
    return rms_norm_reference(s, weight, eps), s


def rms_norm_backward_reference(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dresidual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dweight)`` of y = rms_norm(x), from the saved per-row ``rstd``, all in fp32 (fp64 for
    fp64 inputs); the cast of x_hat to x's dtype counts as the identity, as in autograd::

        g = dy * w;  dx = rstd * (g - x_hat * mean(g * x_hat)) + dresidual
        dw = sum over rows of dy * dt(x_hat)
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    h = x.to(acc)
    r = rstd.to(acc).unsqueeze(-1)
    x_hat = h * r
    g32 = dy.to(acc)
    g = g32 * weight.to(acc)
    dx = r * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
    if dresidual is not None:
        dx = dx + dresidual.to(acc)
    dw = (g32 * x_hat.to(x.dtype).to(acc)).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


# -------------------------------------------------------------------------------- Attention (issue 5)
