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
    model; this module only fixes ``causal`` and ``scale``. Packed sequences: ``forward(q, k, v,
    cu_seqlens=..., max_seqlen=...)`` with q ``[T, Hq, D]``, k/v ``[T, Hkv, D]``."""

    def __init__(self, causal: bool = True, scale: float | None = None):
        super().__init__()
        self.causal = causal
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                max_seqlen: int | None = None) -> torch.Tensor:
        from apr_kernels.ops.attention import attention

        return attention(q, k, v, causal=self.causal, scale=self.scale, cu_seqlens=cu_seqlens,
                         max_seqlen=max_seqlen)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, scale={self.scale}"


# ------------------------------------------------------------------------------- SwiGLU MLP (issue 6)


class SwiGLUMLP(nn.Module):
    """Drop-in for HF ``LlamaMLP``/``Qwen2MLP`` (parameter names ``gate_proj``, ``up_proj``,
    ``down_proj``): ``down(swiglu(gate(x), up(x)))`` with the activation from :func:`apr_kernels.swiglu`."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, bias: bool = False, device=None, dtype=None):
        super().__init__()
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from apr_kernels.ops.swiglu import swiglu

        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


# ----------------------------------------------------------------------- LM loss (issue 6)


class LinearCrossEntropyLoss(nn.Module):
    """``loss(hidden, weight, targets)``: cross entropy of ``hidden @ weight.T`` without materialising
    the logits (:func:`apr_kernels.linear_cross_entropy`); ``weight`` is the LM head or the tied
    embedding. Parameter-free, like ``nn.CrossEntropyLoss`` (``label_smoothing`` as its; ``z_loss``:
    ``z * logsumexp(logits)^2`` per counted position added)."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                 z_loss: float = 0.0):
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing, self.z_loss = label_smoothing, z_loss

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from apr_kernels.ops.cross_entropy import linear_cross_entropy

        return linear_cross_entropy(hidden, weight, targets, ignore_index=self.ignore_index,
                                    reduction=self.reduction, label_smoothing=self.label_smoothing,
                                    z_loss=self.z_loss)

    def extra_repr(self) -> str:
        return (f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
                f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}")


class LinearDistillationLoss(nn.Module):
    """``loss(hidden, weight, teacher_hidden, teacher_weight, targets) -> (loss, ce, kl)``: knowledge
    distillation of the student head ``hidden @ weight.T`` from the teacher head (:func:
    `apr_kernels.linear_distillation`: ``(1 - kd_ratio) CE + kd_ratio T^2 KL(teacher || student)``, or
    the reverse KL / generalized JSD that ``beta`` names) without materialising either head's logits.
    Parameter-free."""

    def __init__(self, kd_ratio: float = 0.5, temperature: float = 1.0, ignore_index: int = -100,
                 reduction: str = "mean", beta: float = 0.0):
        super().__init__()
        self.kd_ratio, self.temperature, self.beta = kd_ratio, temperature, beta
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, teacher_hidden: torch.Tensor,
                teacher_weight: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from apr_kernels.ops.distillation import linear_distillation

        return linear_distillation(hidden, weight, teacher_hidden, teacher_weight, targets, kd_ratio=self.kd_ratio,
                                   temperature=self.temperature, beta=self.beta, ignore_index=self.ignore_index,
                                   reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"kd_ratio={self.kd_ratio}, temperature={self.temperature}, beta={self.beta}, "
                f"ignore_index={self.ignore_index}, reduction={self.reduction!r}")
