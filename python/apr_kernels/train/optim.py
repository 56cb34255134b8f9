"""The optimizers of a training run (``TrainConfig.optimizer``).

* ``adamw`` (default): AdamW with weight decay on matrices (the embedding included), not on norms and
  biases; the fused CUDA implementation on GPUs.
* ``adamw8bit``: the same AdamW with its moments stored block-wise in 8 bits (``adamw8bit.py``,
  bitsandbytes' and torchao's ``AdamW8bit``): a quarter of the optimizer memory, under FSDP (each
  rank's rows) and tensor parallelism (each rank's part) too.
* ``muon``: Muon (Jordan et al., 2024; ``torch.optim.Muon``) on the decoder layers' weight matrices
  (the attention and MLP projections), AdamW on everything else (the embedding, the output head,
  norms and biases; LoRA adapters), as Muon's authors and Moonlight prescribe. Muon's learning rate
  is matched to AdamW's by update RMS (``adjust_lr_fn="match_rms_adamw"``, Moonlight's rule: ``0.2
  sqrt(max(A, B))``), so one ``--lr`` and one schedule serve both. Its state is one momentum buffer
  per matrix (``__training__.muon.momentum_buffer.<param>`` in checkpoints). Under FSDP
  (``ShardedMuon``) each rank keeps the momentum of its own rows, and the update, which Muon
  orthogonalises as a whole matrix, is all-gathered and orthogonalised by ``torch.optim.Muon``
  itself on every rank, each keeping its rows; under tensor parallelism likewise over the group's
  parts (heads, MLP rows or columns). Not with fp16 loss scaling.

LoRA+ (``TrainConfig.lora_plus_ratio``, Hayou et al., 2024; PEFT's ``create_loraplus_optimizer``): the
adapters' B matrices take ``ratio`` times the learning rate of everything else (their own param
groups carry ``lr_scale``, which the trainers multiply into each step's scheduled rate).

``MuonWithAdamW`` puts the two behind the interface the trainers and checkpoints use: ``param_groups``
(Muon's first), ``state``, ``step``, ``zero_grad``, ``state_dict`` / ``load_state_dict`` with one flat
parameter index over both.
"""

from __future__ import annotations

import re

import torch

OPTIMIZERS = ("adamw", "adamw8bit", "muon")
_HIDDEN_MATRIX = re.compile(r"(^|\.)layers\.\d+\..*\.weight$")


def adamw(named_params, cfg, eight_bit: bool = False, splits: dict | None = None) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (``named_params``: the trainable ones, with their names;
    with LoRA+ the adapters' B matrices in a group of their own at ``lr_scale`` = the ratio);
    ``eight_bit``: its moments kept in 8 bits (``adamw8bit.AdamW8bit``; ``splits``: parameter id ->
    ``(dim, ranks)`` of the tensor-parallel parts)."""
    decay, no_decay, lora_b = [], [], []
    ratio = getattr(cfg, "lora_plus_ratio", 0.0)
    for name, p in named_params:
        (lora_b if ratio and name.endswith(".lora_B") else decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if lora_b:
        groups.append({"params": lora_b, "weight_decay": cfg.weight_decay, "lr_scale": ratio})
    every = decay + no_decay + lora_b
    if eight_bit:
        from .adamw8bit import AdamW8bit

        return AdamW8bit(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, splits=splits)
    # the fused CUDA implementation: one kernel for all parameters instead of a few per tensor
    fused = bool(every) and all(p.is_cuda for p in every)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
                             fused=fused or None)


def muon_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable decoder-layer weight matrices Muon updates (everything else takes AdamW)."""
    return [(n, p) for n, p in model.named_parameters()
            if p.requires_grad and p.ndim == 2 and _HIDDEN_MATRIX.search(n) and ".lora_" not in n]


class ShardedMuon(torch.optim.Optimizer):
    """Muon on parts of matrices: FSDP row shards (DTensors, ``torch.chunk`` rows of dim 0) and/or
    tensor-parallel parts (``splits``: parameter id -> the dimension group ``tp`` splits it on). The
    momentum (Nesterov, in ``torch.optim.Muon``'s form) is updated on each rank's part; the update is
    all-gathered into the whole matrix (over the shards, then over the tensor-parallel group),
    orthogonalised and scaled by a throwaway ``torch.optim.Muon`` step from zero (its Newton-Schulz
    iteration and learning-rate rule exactly, whatever this torch's version), and each rank applies
    its part with the decoupled weight decay. One all-gather per matrix and split per step; the
    orthogonalisation runs on every rank."""

    def __init__(self, params, lr: float, weight_decay: float, momentum: float, adjust_lr_fn: str = "match_rms_adamw",
                 splits: dict | None = None, tp=None):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True,
                                      adjust_lr_fn=adjust_lr_fn))
        self.splits, self.tp = splits or {}, tp

    @torch.no_grad()
    def step(self, closure=None):
        from torch.distributed.tensor import DTensor

        from .distributed import full_tensor, local_part, shard_rows

        for group in self.param_groups:
            mu, lr = group["momentum"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)  # (a DTensor: this rank's rows)
                buf, g = local_part(state["momentum_buffer"]), local_part(p.grad)
                buf.lerp_(g, 1 - mu)
                update = g.lerp(buf, mu) if group["nesterov"] else buf
                sharded = isinstance(p, DTensor)
                whole = full_tensor(DTensor.from_local(update, p.device_mesh, p.placements, run_check=False,
                                                       shape=p.shape, stride=p.stride())) if sharded else update
                dim = self.splits.get(id(p))
                if dim is not None:  # (this rank's heads or MLP rows of the whole matrix)
                    whole = self.tp.gather(whole, dim)
                delta = torch.nn.Parameter(torch.zeros_like(whole))
                delta.grad = whole
                torch.optim.Muon([delta], lr=lr, weight_decay=0.0, momentum=0.0, nesterov=False,
                                 adjust_lr_fn=group["adjust_lr_fn"]).step()  # delta = -lr' NS(update)
                part = delta if dim is None else self.tp.local(delta, dim)
                first, rows = shard_rows(p) if sharded else (0, part.shape[0])
                w = local_part(p)
                w.mul_(1 - lr * group["weight_decay"])
                w.add_(part[first:first + rows].to(w.dtype))
        return None


class MuonWithAdamW:
    """Muon on ``muon_parameters``, AdamW on the rest, as one optimizer (module docstring)."""

    def __init__(self, model, cfg):
        if not hasattr(torch.optim, "Muon"):
            raise ValueError(f"--optimizer muon needs torch.optim.Muon (PyTorch >= 2.9); this is {torch.__version__}")
        hidden = [p for _, p in muon_parameters(model)]
        if not hidden:
            raise ValueError("--optimizer muon: no trainable decoder-layer weight matrix for Muon to update")
        ids = {id(p) for p in hidden}
        tp = getattr(model, "tensor_parallel", None)
        if any(hasattr(p, "device_mesh") for p in hidden) or tp is not None:  # FSDP row shards, split matrices
            self.muon = ShardedMuon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
                                    splits=split_parameter_dims(model), tp=tp)
        else:
            self.muon = torch.optim.Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                         momentum=cfg.muon_momentum, nesterov=True, adjust_lr_fn="match_rms_adamw")
        self.adamw = adamw([(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in ids], cfg)
        self._parts = (self.muon, self.adamw)

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict:
        return {**self.muon.state, **self.adamw.state}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self._parts:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self._parts:
            opt.step()

    def _split(self) -> int:
        return sum(len(g["params"]) for g in self.muon.param_groups)

    def state_dict(self) -> dict:
        n = self._split()
        muon, adamw_ = self.muon.state_dict(), self.adamw.state_dict()
        return {"state": {**muon["state"], **{i + n: s for i, s in adamw_["state"].items()}},
                "param_groups": muon["param_groups"] + adamw_["param_groups"]}

    def load_state_dict(self, state_dict: dict) -> None:
        """``state_dict["state"]`` by the flat index over both (Muon's parameters first); each part keeps
        its own param_groups."""
        n = self._split()
        for opt, lo, hi in ((self.muon, 0, n), (self.adamw, n, None)):
            own = {i - lo: s for i, s in state_dict["state"].items() if i >= lo and (hi is None or i < hi)}
            opt.load_state_dict({"state": own, "param_groups": opt.state_dict()["param_groups"]})


def split_parameter_dims(model: torch.nn.Module) -> dict[int, int]:
    """Parameter id -> the dimension the tensor-parallel ranks split it on (empty when unsplit)."""
    from .tensor_parallel import split_dims

    dims = split_dims(model)
    return {id(p): dims[n] for n, p in model.named_parameters() if n in dims}


def make_optimizer(model: torch.nn.Module, cfg):
    """The optimizer ``cfg.optimizer`` names for ``model``'s trainable parameters."""
    if getattr(cfg, "lora_plus_ratio", 0.0) and not getattr(model, "lora", None):
        raise ValueError(f"--lora-plus-ratio {cfg.lora_plus_ratio} needs LoRA adapters (--lora-rank R)")
    if cfg.optimizer == "muon":
        return MuonWithAdamW(model, cfg)
    tp = getattr(model, "tensor_parallel", None)  # (8-bit moments: where a part's blocks are the whole's)
    splits = {i: (dim, tp.size) for i, dim in split_parameter_dims(model).items()} if tp is not None else None
    return adamw([(n, p) for n, p in model.named_parameters() if p.requires_grad], cfg,
                 eight_bit=cfg.optimizer == "adamw8bit", splits=splits)
