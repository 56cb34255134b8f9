"""Knowledge distillation from a teacher model (``apr-kernels train --teacher``).

``Teacher`` carries what the student's loss needs of the teacher for one batch: its final hidden
states (computed without gradients) and its output weight, with the loss's settings.
``model.loss(x, y, teacher=Teacher.of(teacher_model, x))`` then returns ``[loss, ce, kl]``
(``ops/distillation.py`` defines them): on the fast path the fused ``linear_distillation``, which
never holds either model's ``[B, T, vocab]`` logits; on the eager path ``eager_loss`` below, the
expression written with ``F.cross_entropy`` and ``F.kl_div``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Teacher:
    hidden: torch.Tensor  # the teacher's final hidden states [B, T, Ht] (no gradient)
    weight: torch.Tensor  # the teacher's output weight [Vt, Ht]
    kd_ratio: float = 0.5
    temperature: float = 1.0
    beta: float = 0.0  # the divergence: 0 forward KL, 1 reverse KL, between generalized JSD (ops/distillation.py)

    @classmethod
    @torch.no_grad()
    def of(cls, model, input_ids: torch.Tensor, documents=None, **settings) -> "Teacher":
        """``model``'s hidden states for ``input_ids`` (the student's batch and document spans). A
        teacher sharded by FSDP (``train/cli.py``'s ``load_teacher``; ``hidden_states`` registered as
        an FSDP forward method) gathers each layer for its forward and its root (embedding, final norm,
        head) for the call; the head is copied out, since resharding frees the gathered one."""
        hidden = model.hidden_states(input_ids, documents)
        weight = model.output_weight.detach()
        if hasattr(model, "reshard"):  # (an FSDPModule: its root stays gathered after a no-grad forward)
            weight = weight.full_tensor() if hasattr(weight, "full_tensor") else weight.clone()
            model.reshard()
        return cls(hidden, weight, **settings)


def eager_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, kd_ratio: float,
               temperature: float, reduction: str, beta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, kl)`` from the two heads' logits ``[..., V]`` / ``[..., Vt]`` in fp32 (the divergence
    over the shared leading columns, as TRL's ``generalized_jsd_loss`` writes it; ``ce`` and ``kl``
    detached)."""
    s, t = logits.float().flatten(0, -2), teacher_logits.float().flatten(0, -2)
    y = targets.flatten()
    mask = y != -100
    v = min(s.shape[1], t.shape[1])
    ce = F.cross_entropy(s, y, reduction="none")
    log_q = F.log_softmax(s[:, :v] / temperature, -1)
    log_p = F.log_softmax(t[:, :v] / temperature, -1)
    if beta == 0:  # KL(p || q)
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    elif beta == 1:  # KL(q || p)
        kl = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    else:
        b = torch.tensor(beta, dtype=log_q.dtype)
        log_m = torch.logsumexp(torch.stack([log_q + torch.log(1 - b), log_p + torch.log(b)]), 0)
        kl = (beta * F.kl_div(log_m, log_p, log_target=True, reduction="none").sum(-1)
              + (1 - beta) * F.kl_div(log_m, log_q, log_target=True, reduction="none").sum(-1))
    kl = kl * temperature ** 2
    kl = torch.where(mask, kl, 0.0)
    parts = torch.stack([((1 - kd_ratio) * ce + kd_ratio * kl).sum(), ce.sum(), kl.sum()])
    if reduction == "mean":
        parts = parts / mask.sum()
    return parts[0], parts[1].detach(), parts[2].detach()
