"""Mixture-of-experts layers (Qwen2-MoE, Qwen3-MoE, Mixtral): the router, the experts run together,
and the routing statistics the balance losses are made of.

``SparseMoE`` takes a ``Block``'s MLP place: it routes each token to its top-k experts, groups the
tokens by expert with one sort (``sort_by_expert``), runs every expert on its rows (``Experts``: three
grouped GEMMs on the fast path), and sums the weighted outputs back per token (``combine_experts``).
Under expert parallelism (``train/expert_parallel.py``) the experts other ranks hold are
``RemoteExpert`` places; under tensor parallelism every expert is split like a dense MLP.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import apr_kernels

from .config import ModelConfig


def sort_by_expert(chosen: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offs) of the top-k choices ``chosen`` [T, k]: the choices (token t's at t*k .. t*k + k-1)
    sorted by expert, stably, and each expert's cumulative end in that order (``grouped_mm``'s offs)."""
    sorted_ids, order = chosen.flatten().sort(stable=True)
    arange = torch.arange(num_experts, device=chosen.device, dtype=sorted_ids.dtype)
    return order, torch.searchsorted(sorted_ids, arange, right=True)


def combine_experts(out: torch.Tensor, weights: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The experts' outputs ``out`` [T*k, h] (in ``order``) weighted by ``weights`` [T, k], put back in
    token order (a permutation: no index sharing, no atomics) and each token's k summed: [T, h]."""
    out = out * weights.flatten()[order, None]
    return out.new_empty(out.shape).index_copy(0, order, out).view(weights.shape[0], weights.shape[1], -1).sum(1)


class RemoteExpert(nn.Module):
    """An expert held by another rank of the expert-parallel group (``train/expert_parallel.py``): no
    parameters here, only the place in ``SparseMoE.experts``, so every rank's own experts keep their
    Hugging Face names (``...experts.<global index>...``) for loading, optimizer state and checkpoints."""

    def __init__(self, owner: int):
        super().__init__()
        self.owner = owner  # the expert-parallel rank that holds it

    def extra_repr(self) -> str:
        return f"owner={self.owner}"


class Routing(NamedTuple):
    """``SparseMoE.route``'s result."""

    probs: torch.Tensor    # [T, E] fp32 softmax over every expert
    weights: torch.Tensor  # [T, k] the chosen experts' weights
    chosen: torch.Tensor   # [T, k] expert ids
    lse: torch.Tensor      # [T] fp32 logsumexp of the router logits (the z-loss)


class Experts(nn.ModuleList):
    """A sparse layer's experts (``experts.<index>.*``, Hugging Face's names), run together by one call,
    so that FSDP can shard them on a mesh of their own and gather them around it (expert
    parallelism under FSDP, ``train/distributed.py``)."""

    def forward(self, xs: torch.Tensor, offs: torch.Tensor, counts: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """This rank's experts on their rows of ``xs`` (sorted by expert; ``offs`` the groups' ends,
        ``counts`` their sizes)."""
        if fast and self._grouped():
            return self._experts_grouped(xs, offs)
        # one GEMM chain per expert (DoRA, the eager path)
        groups = xs.split(counts.tolist())
        return torch.cat([expert(g, fast) for expert, g in zip(self.local(), groups)])

    def local(self) -> list[nn.Module]:
        """The experts this rank holds (all of them without expert parallelism), in order."""
        return [e for e in self if not isinstance(e, RemoteExpert)]

    def _grouped(self) -> bool:
        """Whether the fast path can run the experts as grouped GEMMs: every projection plain, or LoRA
        (on a plain or a quantised base; not DoRA), of one kind, scale and base shape across experts.
        Decided again only when the experts' module kinds change (LoRA added or merged, a base
        quantised): the full check walks every expert, which costs milliseconds per layer and step."""
        key = tuple((type(m), "lora_magnitude" in m._parameters) for e in self.local()
                    for m in e._modules.values())
        if key != getattr(self, "_grouped_key", None):
            self._grouped_key, self._grouped_ok = key, self._check_grouped()
        return self._grouped_ok

    def _check_grouped(self) -> bool:
        for name in ("gate_proj", "up_proj", "down_proj"):
            mods = [getattr(e, name) for e in self.local()]
            if any(hasattr(m, "lora_magnitude") for m in mods):
                return False
            kinds = {(hasattr(m, "adapt"), getattr(m, "scale", None), hasattr(m, "base"),
                      tuple(m.base.shape) if hasattr(m, "base") else None) for m in mods}
            if len(kinds) != 1:
                return False
        return True

    def _experts_grouped(self, xs: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """Every expert's SwiGLU on its rows of ``xs`` (sorted by expert, ``offs`` their ends) in three
        grouped GEMMs and one swiglu pass: the group sizes stay on the device (no host sync, no graph
        break) and each GEMM is one launch for all experts, reading their weights in place."""
        gate = self._grouped_projection(xs, "gate_proj", offs)
        up = self._grouped_projection(xs, "up_proj", offs)
        return self._grouped_projection(apr_kernels.swiglu(gate, up), "down_proj", offs)

    def _grouped_projection(self, x: torch.Tensor, name: str, offs: torch.Tensor) -> torch.Tensor:
        """One projection of every expert as a grouped GEMM; LoRA-adapted experts (model/lora.py) add
        ``scale * (x A_e^T) B_e^T`` as two more grouped GEMMs (frozen bases get no weight gradient;
        quantised ones are dequantised into one stacked weight per use, never kept: QLoRA)."""
        ops = apr_kernels
        mods = [getattr(e, name) for e in self.local()]
        if hasattr(mods[0], "base"):
            from .lora import FrozenGroupedLinear, stacked_bases

            y = FrozenGroupedLinear.apply(x, offs, lambda dtype: stacked_bases(mods, dtype))
        else:
            y = ops.grouped_mm(x, [m.weight for m in mods], offs)
        if hasattr(mods[0], "adapt") and mods[0].scale:
            a, b = zip(*(m.factors() for m in mods))
            y = y + ops.grouped_mm(ops.grouped_mm(x, list(a), offs), list(b), offs) * mods[0].scale
        return y


class SparseMoE(nn.Module):
    """Routed experts in place of the MLP (Qwen2-MoE, Qwen3-MoE, Mixtral), as Hugging Face computes them.

    The router ``gate`` scores every expert; a softmax in fp32 over all of them, the top
    ``num_experts_per_tok`` kept (renormalised to sum 1 with ``norm_topk_prob``, always for Mixtral,
    whose weights stay fp32; Qwen's are cast to the router's dtype) weight those experts' outputs.
    Qwen2-MoE adds a shared expert that every token passes through, scaled by ``sigmoid(
    shared_expert_gate(x))``.

    Tokens are grouped by expert with one sort; on the fast path all experts run as three grouped
    GEMMs (``apr_kernels.grouped_mm``: the group sizes never leave the device), otherwise each expert
    runs one GEMM chain on its group (one host read of the group sizes per layer). The weighted
    outputs are summed back per token without atomics (deterministic). Every expert runs each step,
    an empty group included, so every expert weight gets a gradient (zeros when unused, as with
    Hugging Face's stacked experts): DDP needs every parameter used, and all ranks step the same
    parameters.

    ``forward(x, fast, routed=None) -> (y, stats)``: ``stats`` [3, num_experts] fp32, per expert the
    number of top-k choices and the sum of router probabilities over these tokens, and (in its first
    column) the sum over tokens of ``logsumexp(router logits)^2``, from which ``Transformer`` forms the
    load-balancing loss and the router z-loss; with ``routed`` (bool, a flag per token of ``x``) over
    the flagged tokens only (padding left out, as Hugging Face's attention mask does).

    Expert parallelism (``set_expert_parallel``): this rank holds ``num_experts / N`` consecutive
    experts, the others are ``RemoteExpert`` places; routing is unchanged (the router is replicated),
    and the sorted rows travel to their experts' ranks and back in two all-to-alls per layer
    (``train/expert_parallel.py``)."""

    # train/expert_parallel.py's ExpertParallel while the experts are spread over ranks, else None
    expert_parallel = None
    # train/tensor_parallel.py's TensorParallel while every expert's rows and columns are split (each
    # rank computes its share of every expert; the router whole), else None
    tensor_parallel = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.fp32_weights = cfg.architecture == "mixtral"
        self.gate = nn.Linear(h, cfg.num_experts, bias=False)
        from .transformer import MLP, MixtralExpert  # (transformer.py imports this module)

        expert = MixtralExpert if cfg.architecture == "mixtral" else MLP
        self.experts = Experts(expert(h, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(h, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(h, 1, bias=False)

    def route(self, x: torch.Tensor) -> "Routing":
        """(probabilities [T, E] fp32, top-k weights [T, k], top-k expert ids [T, k], the router logits'
        ``logsumexp`` [T] fp32 for the z-loss) of tokens ``x`` [T, h]."""
        logits = self._whole(self.gate, x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(probs, weights if self.fp32_weights else weights.to(logits.dtype), chosen,
                       torch.logsumexp(logits.float(), dim=-1))

    def _whole(self, lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``lin(x)`` of a projection every rank holds whole (the router, the shared-expert gate): split
        over tensor-parallel ranks, each rank's experts give a part of its gradient (``shared``)."""
        tp = self.tensor_parallel
        return lin(x) if tp is None else F.linear(x, tp.shared(lin.weight))

    def forward(self, x: torch.Tensor, fast: bool = False,
                routed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        tp = self.tensor_parallel
        if tp is not None:  # (the whole rows' tokens on every rank: the same routing)
            x = tp.enter(x)
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs, weights, chosen, lse = self.route(x)
        order, offs = sort_by_expert(chosen, self.num_experts)
        counts = offs.diff(prepend=offs.new_zeros(1))
        xs = x[order // self.top_k]
        if self.expert_parallel is not None:  # rows to their experts' ranks, run there, and back
            out = self.expert_parallel.dispatch(xs, counts, lambda rows, o, c: self.experts(rows, o, c, fast))
        else:
            out = self.experts(xs, offs, counts, fast)
        y = combine_experts(out, weights, order).to(x.dtype)
        if hasattr(self, "shared_expert"):
            y = y + torch.sigmoid(self._whole(self.shared_expert_gate, x)) * self.shared_expert(x, fast)
        if tp is not None:  # (the balance losses: computed alike on every rank of the group)
            probs, lse = tp.counted_once(probs), tp.counted_once(lse)
        z = torch.zeros_like(probs[0])
        if routed is None:
            z[0] = lse.square().sum()
            stats = torch.stack([counts.to(torch.float32), probs.sum(0), z])
        else:  # only the tokens the statistics count (padding left out; every token is still computed)
            keep = routed.reshape(-1).to(torch.float32)
            chosen_kept = torch.zeros_like(z).scatter_add_(0, chosen.flatten(), keep.repeat_interleave(self.top_k))
            z[0] = (lse.square() * keep).sum()
            stats = torch.stack([chosen_kept, (probs * keep[:, None]).sum(0), z])
        return (y.view(shape), stats) if tp is None else (tp.leave(y.view(shape)), stats)

    def local_experts(self) -> list[nn.Module]:
        """The experts this rank holds (all of them without expert parallelism), in order."""
        return self.experts.local()

    def set_expert_parallel(self, ep) -> None:
        """Keep only expert-parallel rank ``ep.rank``'s ``num_experts / ep.size`` consecutive experts
        (the others become ``RemoteExpert`` places, their parameters freed) and route rows through
        ``ep`` (``train/expert_parallel.py``). Once per model: the dropped experts do not come back."""
        if self.expert_parallel is not None:
            raise ValueError("SparseMoE: the experts are already spread over an expert-parallel group")
        if self.num_experts % ep.size:
            raise ValueError(f"--expert-parallel {ep.size} does not divide num_experts {self.num_experts}; "
                             f"expected an equal share of the experts per rank")
        per = self.num_experts // ep.size
        for e in range(self.num_experts):
            if e // per != ep.rank:
                self.experts[e] = RemoteExpert(e // per)
        self.expert_parallel = ep

    def mlps(self) -> list[nn.Module]:
        return [*self.local_experts(), *([self.shared_expert] if hasattr(self, "shared_expert") else [])]
