"""Expert parallelism: a mixture-of-experts model's experts spread over a group of ranks.

    torchrun --nproc_per_node=8 -m apr_kernels train --init qwen3-30b-a3b.apr ... --parallel fsdp --expert-parallel 8

The experts hold almost all of an MoE model's weights (Qwen3-30B-A3B: 29 of 30.5 billion), and
each token uses only k of them. With ``--expert-parallel N`` the N consecutive ranks of a group
each keep ``num_experts / N`` consecutive experts of every sparse layer (rank r: experts
``r * E/N .. (r+1) * E/N - 1``) and the rest of the model (attention, router, norms, embeddings,
a shared expert) as data parallelism has it (replicated under DDP, sharded under FSDP). Per
sparse layer and step (GShard's layout, Lepikhin et al., 2020; Megatron-LM's and torchtitan's
all-to-all dispatcher):

* every rank routes its own tokens with the whole router and sorts the top-k choices by
  expert, as without expert parallelism; the sorted rows of rank r's experts are one contiguous run;
* the per-expert counts go round in one all-to-all (E numbers; the sizes are read on the host: one
  sync per layer), then the rows in a second (``all_to_all_single`` with those sizes: each rank
  sends each other rank exactly the rows that its experts chose, no padding, no capacity factor,
  no token dropped);
* the received rows, grouped by source then expert, are regrouped by expert (one stable sort of a
  few thousand ids) and run through this rank's experts (grouped GEMMs on the fast path);
* the outputs go back in the reverse all-to-all and are weighted and summed per token as before.

The all-to-alls are functional collectives with autograd: the backward sends the rows' gradients
the same way back and forth, so each expert's weight gradient sums the contributions of every
token of the group that chose it. What is left is the reduction over the ``world / N`` groups (the
ranks holding the same experts: its replicas), to the world-size mean that DDP and FSDP give the
other parameters:

* DDP is told to ignore the experts; after the backward ``reduce_grads`` sums each expert's
  gradient over its replicas and divides by the world size.
* FSDP shards each layer's ``Experts`` over its replicas only (``fully_shard`` on a mesh of its own
  before the layer's; a mesh of one rank when there is one group), so the reduce-scatter averages
  over the replicas; ``reduce_grads`` then divides by N.

Clipping uses the whole model's norm (``clip_grad_norm``): under DDP the replicated parameters'
squares plus the experts' summed over the group, under FSDP every rank's shards' squares summed
over the world.

Checkpoints stay one APR file with every expert under its Hugging Face name: rank 0 writes and
each expert's tensors (and optimizer moments) are made whole where they are held (under FSDP,
gathered over the replicas) and broadcast from the first group's holder when their turn comes
(``gathering.ShardGatherer`` with ``OwnedTensor`` items). Loading builds the model on the meta
device and drops the other ranks' experts before anything is allocated or read. Routing
statistics (the load-balancing loss) are unchanged: they count this rank's tokens' choices over all
experts, summed over ranks as without expert parallelism.

With context parallelism (``--context-parallel``) the groups of both kinds are consecutive ranks:
the ranks sharing rows by position also exchange their tokens' rows with their experts, which is
fine, since routing is per token. Also on ``dpo``, ``kto``, ``reward`` and the sampling commands
(``posttrain.EXPERT_PARALLEL_COMMANDS``): every forward must run on all the group's ranks in step, so
generation (``model/generate.py``) steps the group's ranks together until all of them are done. LoRA adapters on the experts live with
their experts (drawn in the whole model's order, so they are one process's; merged at the end
through the same gathering). Under HSDP (``--fsdp-shard-size S``, N dividing S) an expert's
holders in a node shard it and the nodes replicate it (a 2-D mesh of its own); clipping then sums
the squares within a node. A quantised LoRA base (QLoRA): each rank holds its experts' blocks
(under FSDP a ``distributed.ShardedBlocks`` over the experts' replicas, as their parameters are
sharded); ``OwnedTensor`` items of their raw bytes for the checkpoint.

With pipeline parallelism (``--pipeline-parallel P``) the groups and their replicas lie inside each
stage's ranks (``groups(..., stages=P)``), which hold that stage's layers' experts; the pipeline's
``reduce_grads``, clipping and checkpoint gathering treat the experts (``pipeline_parallel.py``).

With tensor parallelism (``--tensor-parallel M``) a group takes the same
tensor-parallel rank of N consecutive tensor-parallel groups (``groups(..., stride=M)``: ranks M
apart): each rank holds its share of its experts, split like a dense MLP
(``train/tensor_parallel.py``), and exchanges rows with the ranks holding the same share of the
other experts, inside the layer's tensor-parallel enter / leave; under FSDP each part is sharded
over the ranks holding it. An expert's checkpoint item joins its parts over the holding
tensor-parallel groups first (``OwnedTensor`` of a ``tensor_parallel.Split``, or of a quantised
base's ``gathering.WholeBaseRaw``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

from .distributed import check_group_size, full_tensor, local_part, rank_groups


class ExpertParallel:
    """This rank's place in its expert-parallel group: ``size`` ranks, ``rank`` within them (the
    experts it holds); ``replicas``: the ranks holding the same experts (one per group)."""

    def __init__(self, group, rank: int, size: int, replicas=None, world_size: int | None = None, stride: int = 1):
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"expert parallel: rank {rank} of a group of {size}; expected 0 <= rank < size")
        self.group, self.rank, self.size = group, rank, size
        self.replicas = replicas  # process group of this rank's replicas, None when there is one group
        # the data-parallel ranks (DDP's mean: every rank, or under tensor parallelism one per group)
        self.world_size = world_size or size
        self.stride = stride  # the group's ranks are this far apart (tensor-parallel groups between them)

    def owner_rank(self, index: int) -> int:
        """The global rank of the first group's member ``index`` (its tensor-parallel group's first)."""
        return index * self.stride

    # ------------------------------------------------------------------------- the exchange
    def dispatch(self, xs: torch.Tensor, counts: torch.Tensor,
                 run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Rows ``xs`` [R, h] of this rank's tokens sorted by expert (``counts`` [E]: rows per expert,
        on the device) through their experts wherever they are: ``run(rows, offs, counts)`` is called
        with the rows this rank's experts received, sorted by expert (``offs`` their groups' ends), and
        its outputs come back in the order of ``xs``."""
        n = self.size
        per = counts.numel() // n
        counts = counts.to(torch.int64)
        # recv[s, e]: rows that rank s sends to this rank's expert e (the first all-to-all)
        recv = funcol.wait_tensor(funcol.all_to_all_single(counts, None, None, self.group)).view(n, per)
        sizes = torch.cat([counts.view(n, per).sum(1), recv.sum(1)]).tolist()  # one host read per layer
        send_sizes, recv_sizes = sizes[:n], sizes[n:]
        rows = funcol.wait_tensor(funcol.all_to_all_single_autograd(xs, recv_sizes, send_sizes, self.group))
        # received by source, then expert: regroup by expert (stable: each source's rows keep their order)
        expert = torch.arange(per, device=xs.device).repeat(n).repeat_interleave(
            recv.flatten(), output_size=sum(recv_sizes))
        perm = expert.argsort(stable=True)
        mine = recv.sum(0)
        out = run(rows[perm], mine.cumsum(0), mine)
        back = out.new_empty(out.shape).index_copy(0, perm, out)
        return funcol.wait_tensor(funcol.all_to_all_single_autograd(back, send_sizes, recv_sizes, self.group))

    # --------------------------------------------------------------------------- gradients
    def reduce_grads(self, params, sharded: bool = False) -> None:
        """After the step's last backward: every expert gradient summed over its replicas and divided
        by the world size (DDP's mean, as the replicated parameters get it). ``sharded`` (FSDP): the
        replicas' reduce-scatter already averaged over them (world / N): divided by N."""
        grads = [local_part(p.grad) for p in params if p.grad is not None]
        if not grads:
            return
        if sharded:
            torch._foreach_div_(grads, float(self.size))
            return
        if self.replicas is not None:
            from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.replicas)
            for g, r in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(r)
        torch._foreach_div_(grads, float(self.world_size))

    def clip_grad_norm(self, params, expert_params, max_norm: float, sharded: bool = False,
                       group=None) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the whole model: the replicated parameters' squares
        (the same on every rank) plus the experts' summed over the group; ``sharded`` (FSDP): every
        rank of ``group`` (all; HSDP: a node's) holds its own part of every gradient, all squares
        summed over it. Returns the norm."""
        experts = {id(p) for p in expert_params}
        params = [p for p in params if p.grad is not None]
        grads = [local_part(p.grad) for p in params]
        if not grads:
            return torch.zeros(())

        def squares(gs):
            return (torch.stack([g.detach().float().square().sum() for g in gs]).sum() if gs
                    else torch.zeros((), device=grads[0].device))

        if sharded:
            total = squares(grads)
            dist.all_reduce(total, group=group)
        else:
            mine = squares([g for p, g in zip(params, grads) if id(p) in experts])
            dist.all_reduce(mine, group=self.group)
            total = squares([g for p, g in zip(params, grads) if id(p) not in experts]) + mine
        total = total.sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
        return total


def groups(world_size: int, size: int, rank: int, stride: int = 1, stages: int = 1) -> ExpertParallel:
    """Create the expert-parallel groups of ``size`` consecutive ranks and the replica groups (ranks
    ``r, r + size, ...``) (every rank must call this, in the same order); return this rank's
    :class:`ExpertParallel`. ``stride`` N > 1 (tensor parallelism, groups of N consecutive ranks):
    the groups' ranks are N apart (the same tensor-parallel rank of ``size`` consecutive groups,
    each holding the same part of its experts), and the replicas ``size * N`` apart. ``stages`` P > 1
    (pipeline parallelism, stage-major ranks): the groups and their replicas inside each stage's
    ``world_size / P`` ranks, which hold its layers' experts (the mean over the stage's replicas)."""
    if stages > 1:
        width = world_size // stages
        block = size * stride  # (a group: the same tensor-parallel rank of `size` consecutive groups)
        if width % block:
            raise ValueError(f"--expert-parallel {size} with --pipeline-parallel {stages}: expected groups inside "
                             f"a stage's {width} ranks ({size} x --tensor-parallel {stride} dividing {width})")
        group, index, _ = rank_groups(world_size, size, rank, replicas="none", stride=stride)
        replicas = None
        if width > block:
            for first in range(0, world_size, width):  # (a stage's ranks holding the same experts' same part)
                for t in range(block):
                    ranks = list(range(first + t, first + width, block))
                    g = dist.new_group(ranks)
                    if rank in ranks:
                        replicas = g
        return ExpertParallel(group, index, size, replicas, width // stride, stride)
    if size < 1 or world_size % (size * stride):
        parts = f"{size} groups of --tensor-parallel {stride}" if stride > 1 else str(size)
        raise ValueError(f"--expert-parallel {size} does not divide the world size {world_size}"
                         + (f" into {parts}" if stride > 1 else "") + f"; expected a divisor (the ranks form "
                         f"world / {size * stride} groups, each holding every expert once)")
    if stride == 1:
        group, index, replicas = rank_groups(world_size, size, rank)
        return ExpertParallel(group, index, size, replicas, world_size)
    group, index, _ = rank_groups(world_size, size, rank, stride=stride)
    replicas, block = None, size * stride
    if world_size > block:
        for first in range(block):  # (the ranks holding the same experts and the same part of them)
            ranks = list(range(first, world_size, block))
            g = dist.new_group(ranks)
            if rank in ranks:
                replicas = g
    return ExpertParallel(group, index, size, replicas, world_size // stride, stride)


def expert_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters of the experts this rank holds (every sparse layer's)."""
    from apr_kernels.model.moe import SparseMoE

    return [p for m in model.modules() if isinstance(m, SparseMoE) for e in m.local_experts()
            for p in e.parameters()]


def global_parameters(model):
    """(name, tensor, owner, held) of every parameter of the whole model, in one order on every rank.
    ``owner`` is None for a parameter every rank holds (or, under FSDP, shards over all); for an
    expert, the rank of the first group that holds it, ``held`` whether this rank holds it too, and
    ``tensor`` this rank's copy or, held elsewhere, one of the same layer's experts' (a template of
    the shape and dtype)."""
    from apr_kernels.model.moe import RemoteExpert, SparseMoE

    spread = {f"{n}.experts.": m for n, m in model.named_modules()
              if isinstance(m, SparseMoE) and m.expert_parallel is not None}
    done = set()
    for name, p in model.named_parameters():
        prefix = next((k for k in spread if name.startswith(k)), None)
        if prefix is None:
            yield name, p, None, True
            continue
        if prefix in done:
            continue
        done.add(prefix)
        m = spread[prefix]
        ep = m.expert_parallel
        per = m.num_experts // ep.size
        template = dict(m.local_experts()[0].named_parameters())
        for e, expert in enumerate(m.experts):
            held = not isinstance(expert, RemoteExpert)
            mine = dict(expert.named_parameters()) if held else template
            for suffix in template:
                yield f"{prefix}{e}.{suffix}", mine[suffix], ep.owner_rank(e // per), held


def parameter_counts(model, expert, tensor=None) -> dict:
    """The start record's sizes: ``params`` and ``trainable`` of the whole model (every rank's experts
    counted once, a tensor-parallel split's parts as the whole) and, when this rank holds only a
    share (``expert``: an ExpertParallel, ``tensor``: a TensorParallel, or None), ``params_rank``
    (this rank's share) and ``expert_parallel`` / ``tensor_parallel``."""
    from .tensor_parallel import split_dims

    mine = list(model.named_parameters())
    everything = [(n, t) for n, t, _, _ in global_parameters(model)] if expert is not None else mine
    split = split_dims(model)
    parts = {id(t) for n, t in mine if n in split}  # (another rank's expert: as its template, a held one)

    def whole(t):
        return t.numel() * (tensor.size if id(t) in parts else 1)

    out = {"params": sum(whole(t) for _, t in everything),
           "trainable": sum(whole(t) for _, t in everything if t.requires_grad)}
    if expert is not None or tensor is not None:
        out["params_rank"] = sum(t.numel() for _, t in mine)
    if expert is not None:
        out["expert_parallel"] = expert.size
    if tensor is not None:
        out["tensor_parallel"] = tensor.size
        out["vocab_parallel"] = getattr(model, "vocab_parallel", None) is not None
        if tensor.sequence_parallel:
            out["sequence_parallel"] = True
    return out


class OwnedTensor:
    """A tensor one rank of each expert-parallel group holds, for the checkpoint (an expert's weight
    or moment: a tensor, an FSDP DTensor, ``gathering.BlockShards``, or under tensor parallelism
    this rank's part, ``tensor_parallel.Split`` / ``SplitBlocks``): ``gather()`` (a collective of
    every rank) makes it whole where it is held (under FSDP: gathered over its replicas; a part:
    joined over its tensor-parallel group) and broadcasts it from ``owner``; the others receive it
    into a buffer of the template's (whole) shape."""

    def __init__(self, t, owner: int, held: bool, dtype=None, shape=None):
        self.t, self.owner, self.held = t.detach() if torch.is_tensor(t) else t, owner, held
        self.buffer = (t.dtype, tuple(t.shape))
        # what it stands for (a quantised base's raw bytes: its APR dtype and logical shape)
        self.dtype, self.shape = dtype or t.dtype, tuple(shape or t.shape)

    def gather(self) -> torch.Tensor:
        if self.held:
            buf = full_tensor(self.t) if torch.is_tensor(self.t) else self.t.gather()  # (BlockShards)
            buf = buf.clone() if buf is self.t else buf
        else:
            buf = torch.empty(self.buffer[1], dtype=self.buffer[0], device=_device(self.t))
        dist.broadcast(buf, src=self.owner)
        return buf


def _device(item) -> torch.device:
    """The device of a checkpoint item: a tensor's, or the tensor it wraps (``BlockShards.local``,
    ``Split.t``, ``SplitBlocks.t``)."""
    return item.device if torch.is_tensor(item) else _device(item.local if hasattr(item, "local") else item.t)


def check(size: int, mode: str, fsdp_shard: int = 0) -> None:
    """What ``--expert-parallel size`` does not combine with, refused before anything is loaded."""
    check_group_size("--expert-parallel", size, mode)
    if fsdp_shard and fsdp_shard % size:
        raise ValueError(f"--expert-parallel {size} does not divide --fsdp-shard-size {fsdp_shard}; expected each "
                         f"expert-parallel group inside one shard group (a node)")
