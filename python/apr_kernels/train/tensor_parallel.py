"""Tensor parallelism: every decoder layer's projections split over a group of ranks.

    torchrun --nproc_per_node=8 -m apr_kernels train --init qwen2.5-32b.apr ... --parallel fsdp --tensor-parallel 4

Megatron-LM's layout (Shoeybi et al., 2019), as torchtitan's ``ColwiseParallel`` /
``RowwiseParallel`` plan has it, on plain local tensors: in a group of N consecutive ranks, rank t
holds

* of the attention: query heads ``t * Hq/N ..`` and key/value heads ``t * Hkv/N ..`` (the rows of
  ``q_proj``/``k_proj``/``v_proj`` and their biases: *column-parallel*) and the matching columns of
  ``o_proj`` (*row-parallel*); grouped-query attention stays grouped, each rank's query heads
  reading its own K/V heads, so the kernels run unchanged on the local heads;
* of the MLP: ``intermediate / N`` rows of ``gate_proj`` and ``up_proj`` and those columns of
  ``down_proj``;
* when N divides the vocabulary, the embedding's and ``lm_head``'s rows of token ids
  ``t * V/N ..`` (``VocabParallelEmbedding``: a masked lookup, summed by ``leave``; the loss by
  ``vocab_parallel_losses``, Megatron-LM's vocab-parallel cross entropy: each rank computes its
  columns of the logits, only row maxima, exponential sums and target logits are all-reduced);
* of a mixture-of-experts layer: every expert's (and the shared expert's) rows and columns as the
  MLP's, the experts running between one ``enter`` and one ``leave``; the router (and Qwen2-MoE's
  shared-expert gate) whole through ``shared``, and the balance losses' router statistics through
  ``counted_once`` (every rank computes them alike and adds them to its copy of the loss);
* everything else (norms, Qwen3's per-head q/k norms; the embedding and head otherwise) whole.

Per layer and pass that is two all-reduces forward and two backward: the block's input enters
unchanged and its gradient is summed over the group (``enter``), the row-parallel output's partial
sums are summed in the forward (``leave``) and its gradient passes unchanged. The activations
between them (q, k, v, attention, the SwiGLU intermediate) are 1/N per rank, and so are the
layer's weights, gradients and optimizer moments. The ranks of a group see the same rows
(``Parallel.data_ranks``), so the whole-kept parameters get the same gradient on each.

Data parallelism spans the groups: DDP over the ranks ``t, t + N, ...`` that hold the same shard
(``replicas``), or FSDP2 sharding each rank's tensors over them (a 1-D mesh of its own, as for a
model without tensor parallelism). Clipping takes the whole model's norm: the split tensors'
squares summed over the group, the whole-kept ones counted once. Checkpoints stay one APR file of
whole tensors under their Hugging Face names: each split tensor and its moments are concatenated
from the group (``Split``, an item of ``gathering.ShardGatherer``) when their turn comes; loading
and resuming read each rank's rows or columns of the file's zero-copy view (``local``).

LoRA and DoRA adapters split with their projections (``model/lora.py``'s ``ADAPTER_SPLIT``): a
column-parallel projection's rank holds its rows of B (and of the DoRA magnitude) and the whole A, a
row-parallel one's its columns of A and the whole B and magnitude; the whole-kept factor enters
through ``enter`` (its gradient, partial on each rank, summed), a DoRA row's squared norm is summed
over the ranks holding its columns. Only the adapters train, so the exchange per layer is unchanged.
A quantised base (QLoRA, ``lora.QuantizedLoRALinear``) is cut into the rank's part where that is whole
blocks (``quant.split_blocks``: rows always, columns that fill whole blocks) and otherwise kept whole,
each GEMM dequantising it and taking the rank's columns; checkpoints join the parts back
(``gathering.SplitBase``).

Sequence parallelism (``--sequence-parallel``; Korthikanti et al., 2022): between the split blocks
each rank of the group holds a contiguous ``T / N`` chunk of every row's positions (embedding, norms,
residual stream, output head and loss), so those activations are divided by N as well. ``enter``
becomes an all-gather of the chunks along the positions (its backward a reduce-scatter) and
``leave`` a reduce-scatter of the partial sums (its backward an all-gather): the same bytes as the
two all-reduces. RoPE tables and document spans are the whole rows' (the blocks see every position);
the parameters outside the blocks get each rank's part of their gradient, summed over the group
after the last micro-batch (``sequence_split_parameters``), and the ranks' loss sums add up.

HSDP (``--fsdp-shard-size S``, a multiple of N): a 3-D mesh (world/S, S/N, N); each rank's tensors are
sharded over the S/N ranks of its group of S holding the same parts and replicated across the groups.

Context parallelism around it (``--context-parallel C``): groups of C ranks N apart (ranks
``b + t + c N``), each group of C·N ranks sharing rows, each context-parallel rank its chunks of the
positions, each tensor-parallel rank its heads of them (the K/V all-gathers run on the local heads).
With sequence parallelism too, each context-parallel rank's positions are split again over its
tensor-parallel group between the blocks (``Parallel.local_positions``); the blocks gather them back,
so RoPE positions and document spans are the context-parallel rank's.

Muon: each split matrix's update gathered whole over the group, orthogonalised, each rank keeping its part
(``optim.ShardedMuon``). 8-bit AdamW (``adamw8bit.py``): each rank's part keeps 8-bit moments where
its blocks of 256 values are whole blocks of the tensor (a row split of whole blocks, a column split
of rows of whole blocks), so the updates and the checkpoint's codes and scales are one process's
(``SplitBlocks``); the other split tensors keep fp32 moments.

Sampling (``grpo``, ``rloo``, ``online-dpo``; ``model/generate.py``): a group's ranks decode the same
prompts in step, each with the KV cache of its heads and the whole logits (vocabulary columns
gathered); the sums after each all-reduce are the same on every rank and the draws are seeded alike,
so they pick the same tokens and stop together. Distillation (``gkd``, ``train --teacher``): the
teacher's layers split over the group too (its embedding and head whole; sharded instead under
FSDP), reading the whole rows (under sequence parallelism each rank's chunk of its hidden states
taken); under a vocabulary split the loss runs on each rank's columns of both
models' logits (``vocab_parallel.vocab_parallel_distillation``). A reward model (``--reward RM.apr``)
is split alike, its score head whole (``cli.split_frozen``). The vocabulary split itself (the
embedding, head, losses and gathered logits) is ``vocab_parallel.py``.

With expert parallelism: each expert-parallel group takes the same tensor-parallel rank of
consecutive groups (ranks N apart); a rank's experts are split like a dense MLP, the rows go to
their experts' ranks inside the layer's enter / leave (under FSDP each expert's part is sharded
over the ranks holding the same part), and the checkpoint joins an expert's parts where it is held
before broadcasting it (``expert_parallel.OwnedTensor`` of a ``Split``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

from .distributed import all_gather, check_group_size, full_tensor, rank_groups, reduce_scatter
from .vocab_parallel import VocabParallelEmbedding

# module attribute -> dimension of its weight that the ranks split (0: rows, column-parallel;
# 1: columns, row-parallel); biases follow the rows
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "w1", "w3")  # (w1/w3/w2: Mixtral's experts)
ROW = ("o_proj", "down_proj", "w2")


class _Enter(torch.autograd.Function):
    """Identity forward; the gradient summed over the group (each rank's partial from its columns)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return funcol.wait_tensor(funcol.all_reduce(grad.contiguous(), "sum", ctx.group)), None


class _Leave(torch.autograd.Function):
    """The row-parallel partial sums added up over the group; the gradient passes unchanged."""

    @staticmethod
    def forward(ctx, x, group):
        return funcol.wait_tensor(funcol.all_reduce(x.contiguous(), "sum", group))

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Gather(torch.autograd.Function):
    """Sequence parallelism's entry: the group's chunks of positions joined along dimension 1; the
    gradient summed over the group and each rank's chunk kept (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, 1, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter(grad, 1, ctx.group), None


class _Scatter(torch.autograd.Function):
    """Sequence parallelism's exit: the row-parallel partial sums added up, each rank keeping its chunk
    of positions (reduce-scatter along dimension 1); the gradient's chunks joined (all-gather)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter(x, 1, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather(grad, 1, ctx.group), None


class _CountedOnce(torch.autograd.Function):
    """Unchanged forward; the gradient divided by the group's size (``TensorParallel.counted_once``)."""

    @staticmethod
    def forward(ctx, x, size):
        ctx.size = size
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad / ctx.size, None


class TensorParallel:
    """This rank's place in its tensor-parallel group: ``size`` ranks, ``rank`` within them;
    ``replicas``: the process group of the ranks holding the same shards (one per group).
    ``sequence_parallel``: between the split blocks each rank holds its chunk of every row's
    positions (``enter`` gathers them, ``leave`` reduce-scatters)."""

    def __init__(self, group, rank: int, size: int, replicas=None, sequence_parallel: bool = False):
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"tensor parallel: rank {rank} of a group of {size}; expected 0 <= rank < size")
        self.group, self.rank, self.size = group, rank, size
        self.replicas = replicas
        self.sequence_parallel = sequence_parallel

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """A split block's input ``[B, S, ...]``: the whole rows (sequence parallelism: gathered from
        the group's chunks), its gradient summed over the group."""
        if self.size == 1:
            return x
        return _Gather.apply(x, self.group) if self.sequence_parallel else _Enter.apply(x, self.group)

    def leave(self, x: torch.Tensor) -> torch.Tensor:
        """A split block's row-parallel partial output summed over the group (sequence parallelism:
        each rank keeps its chunk of the positions)."""
        if self.size == 1:
            return x
        return _Scatter.apply(x, self.group) if self.sequence_parallel else _Leave.apply(x, self.group)

    def shared(self, w: torch.Tensor) -> torch.Tensor:
        """A whole parameter used inside the split blocks (Qwen3's per-head norms, LoRA's whole-kept
        factors): unchanged, its gradient (each rank's part) summed over the group."""
        return _Enter.apply(w, self.group) if self.size > 1 else w

    def counted_once(self, x: torch.Tensor) -> torch.Tensor:
        """A whole value inside a split block that every rank of the group computes alike and adds to
        its copy of the loss (a router's balance statistics): its gradient divided by N, so the
        group's summed gradients (``enter``, ``shared``) count it once. Under sequence parallelism
        each rank's loss is its own share and the ranks' terms add up: unchanged."""
        return x if self.size == 1 or self.sequence_parallel else _CountedOnce.apply(x, self.size)

    def chunk(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's chunk of the positions of whole rows ``[B, T, ...]`` (sequence parallelism)."""
        if t.shape[1] % self.size:
            raise ValueError(f"--sequence-parallel: rows of {t.shape[1]} positions do not split into "
                             f"{self.size} equal chunks; expected a multiple of --tensor-parallel {self.size}")
        n = t.shape[1] // self.size
        return t.narrow(1, self.rank * n, n)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the group, no gradient (a DoRA row's squares from each rank's columns)."""
        return funcol.wait_tensor(funcol.all_reduce(x.contiguous(), "sum", self.group)) if self.size > 1 else x

    def local(self, full: torch.Tensor, dim: int | None, name: str = "tensor") -> torch.Tensor:
        """This rank's part of the whole tensor ``full`` split on ``dim`` (None: kept whole): a view."""
        if dim is None:
            return full
        if full.shape[dim] % self.size:
            raise ValueError(f"{name}: {full.shape[dim]} along dimension {dim} of {list(full.shape)} is not a "
                             f"multiple of --tensor-parallel {self.size}")
        n = full.shape[dim] // self.size
        return full.narrow(dim, self.rank * n, n)

    def whole_shape(self, local_shape, dim: int | None) -> tuple:
        shape = list(local_shape)
        if dim is not None:
            shape[dim] *= self.size
        return tuple(shape)

    def gather(self, local: torch.Tensor, dim: int) -> torch.Tensor:
        """The whole tensor from every rank's part (a collective of the group)."""
        parts = all_gather(local, 0, self.group)
        return torch.cat(parts.chunk(self.size, 0), dim)


def groups(world_size: int, size: int, rank: int, sequence_parallel: bool = False,
           stages: int = 1) -> TensorParallel:
    """Create the tensor-parallel groups of ``size`` consecutive ranks and the replica groups (ranks
    ``t, t + size, ...``) (every rank must call this, in the same order); this rank's
    :class:`TensorParallel`. ``stages`` > 1 (pipeline parallelism): the world is that many blocks of
    consecutive ranks, one per stage, and a rank's replicas are those of its own stage."""
    if size < 1 or world_size % (size * stages):
        raise ValueError(f"--tensor-parallel {size} does not divide the world size {world_size}"
                         + (f" / --pipeline-parallel {stages}" if stages > 1 else "")
                         + f"; expected a divisor (world / {size * stages} data-parallel groups of {size} ranks"
                         + (" per stage)" if stages > 1 else ")"))
    if stages == 1:  # (replicas of one rank when there is one group: DDP must not broadcast over the group)
        group, index, replicas = rank_groups(world_size, size, rank, replicas="always")
        return TensorParallel(group, index, size, replicas, sequence_parallel)
    group, index, _ = rank_groups(world_size, size, rank, replicas="none")
    width, replicas = world_size // stages, None
    for block in range(0, world_size, width):
        for t in range(size):
            g = dist.new_group(list(range(block + t, block + width, size)))
            if rank // width == block // width and rank % size == t:
                replicas = g
    return TensorParallel(group, index, size, replicas, sequence_parallel)


def split_dims(model) -> dict[str, int]:
    """Hugging Face parameter name -> the dimension the tensor-parallel ranks split it on, for every
    split parameter of ``model`` (empty without tensor parallelism)."""
    from apr_kernels.model.lora import LoRALinear

    if getattr(model, "tensor_parallel", None) is None:
        return {}
    out = {}
    if model.vocab_parallel is not None:  # (rows by vocabulary range; a pipeline stage may hold neither)
        if isinstance(model.model.embed_tokens, VocabParallelEmbedding):
            out["model.embed_tokens.weight"] = 0
        if getattr(model, "lm_head", None) is not None:
            out["lm_head.weight"] = 0
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in COLUMN or leaf in ROW:
            out[f"{name}.weight"] = 0 if leaf in COLUMN else 1
            if leaf in COLUMN and getattr(m, "bias", None) is not None:
                out[f"{name}.bias"] = 0
            if isinstance(m, LoRALinear):  # (the adapter parts split with the weight)
                out.update({f"{name}.{part}": m.adapter_dim(part) for part in ("lora_A", "lora_B", "lora_magnitude")
                            if hasattr(m, part) and m.adapter_dim(part) is not None})
    return out


def sequence_split_parameters(model) -> list:
    """The parameters used outside the split blocks (embedding, the layers' and the final norms, the
    output or score head): under sequence parallelism each rank's gradient of them covers only its
    positions (``Parallel._finish_sync`` sums them over the group)."""
    split = split_dims(model)  # (the embedding and head split by vocabulary see every position)
    inside = (".self_attn.", ".mlp.", ".block_sparse_moe.")  # (the attention and the MLP or experts)
    return [p for name, p in model.named_parameters()
            if p.requires_grad and not any(part in name for part in inside) and name not in split]


def check_config(cfg, size: int, where: str = "the model") -> None:
    """The head and MLP counts that ``size`` ranks split evenly (a mixture-of-experts model's: every
    expert's and the shared expert's intermediate size too)."""
    sizes = [("num_attention_heads", cfg.num_heads), ("num_key_value_heads", cfg.num_kv_heads)]
    if any(not cfg.moe_layer(i) for i in range(cfg.num_layers)):
        sizes.append(("intermediate_size", cfg.intermediate_size))
    if cfg.num_experts:
        sizes.append(("moe_intermediate_size", cfg.moe_intermediate_size))
        if cfg.shared_expert_intermediate_size:
            sizes.append(("shared_expert_intermediate_size", cfg.shared_expert_intermediate_size))
    for what, n in sizes:
        if n % size:
            raise ValueError(f"--tensor-parallel {size}: {where}'s {what} is {n}; expected a multiple of {size} "
                             f"(each rank holds an equal share)")


def check(size: int, mode: str, *, fsdp_shard: int = 0, expert_parallel: int = 1,
          compiled_selective: bool = False) -> None:
    """What ``--tensor-parallel size`` does not combine with, refused before anything is loaded.
    ``compiled_selective``: ``--compile`` with ``--grad-checkpointing selective``, whose compiled
    recomputation gives the MLP weights wrong gradients around the all-reduces (torch 2.13; checked
    against eager: full checkpointing compiled, and selective eager, are right). With
    ``--expert-parallel`` (its groups N ranks apart, ``expert_parallel.groups``): under HSDP each
    sharding group holds whole expert-parallel groups of tensor-parallel groups."""
    check_group_size("--tensor-parallel", size, mode)
    if fsdp_shard and fsdp_shard % size:
        raise ValueError(f"--fsdp-shard-size {fsdp_shard} with --tensor-parallel {size}: expected a multiple of "
                         f"{size} (each sharding group of ranks holds whole tensor-parallel groups)")
    if fsdp_shard and fsdp_shard % (size * expert_parallel):
        raise ValueError(f"--fsdp-shard-size {fsdp_shard} with --tensor-parallel {size} and --expert-parallel "
                         f"{expert_parallel}: expected a multiple of {size * expert_parallel} (each sharding group "
                         f"of ranks holds whole expert-parallel groups of tensor-parallel groups)")
    refused = [(compiled_selective, "--compile and --grad-checkpointing selective together (the compiled "
                                    "recomputation's gradients are wrong around the all-reduces; use either, or "
                                    "--grad-checkpointing full)")]
    for bad, what in refused:
        if bad:
            _refuse(size, what)


def _refuse(size: int, what: str) -> None:
    raise ValueError(f"--tensor-parallel {size} does not combine with {what}; expected plain data "
                     f"parallelism (ddp or fsdp) around it")


def clip_grad_norm(params, split: set, max_norm: float, tp: TensorParallel, sharded_group=None,
                   split_group=None, experts: set | None = None, expert_group=None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole model: the squares of the split parameters
    (ids in ``split``) summed over ``split_group`` (the tensor-parallel group; under FSDP every rank,
    under HSDP the ranks of one sharding group), the whole-kept ones' counted once (under FSDP summed
    over ``sharded_group``, the ranks sharding them). With expert parallelism (DDP) the squares of
    this rank's experts (ids in ``experts``) are first summed over ``expert_group``, whose ranks
    hold the other experts (the same part of them). Returns the norm."""
    from .distributed import local_part

    params = [p for p in params if p.grad is not None]
    grads = [local_part(p.grad) for p in params]
    if not grads:
        return torch.zeros(())
    dev = grads[0].device

    kinds = [(id(p) in split, id(p) in (experts or ())) for p in params]

    def squares(is_split: bool, is_expert: bool):  # (the squares of one kind of gradient)
        gs = [g for g, kind in zip(grads, kinds) if kind == (is_split, is_expert)]
        return torch.stack([g.detach().float().square().sum() for g in gs]).sum() if gs else torch.zeros((), device=dev)

    parts, whole = squares(True, False), squares(False, False)
    if experts:  # (every expert's: its split parts', its whole-kept adapter factors')
        held = torch.stack([squares(True, True), squares(False, True)])
        dist.all_reduce(held, group=expert_group)
        parts, whole = parts + held[0], whole + held[1]
    dist.all_reduce(parts, group=split_group or tp.group)
    if sharded_group is not None:
        dist.all_reduce(whole, group=sharded_group)
    total = (parts + whole).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return total


class Split:
    """A split parameter (or its moment) for the checkpoint: ``gather()`` (a collective of every
    rank) makes this rank's part whole over its data-parallel shards (FSDP), then joins the group's
    parts along ``dim``."""

    def __init__(self, t: torch.Tensor, dim: int, tp: TensorParallel):
        self.t, self.dim, self.tp = t.detach(), dim, tp
        self.dtype, self.shape = t.dtype, tp.whole_shape(t.shape, dim)

    def gather(self) -> torch.Tensor:
        return self.tp.gather(full_tensor(self.t), self.dim)


class SplitBlocks:
    """The flat 8-bit codes or block scales of a split parameter's moment for the checkpoint
    (``adamw8bit.eight_bit_layout`` holding): ``gather()`` makes this rank's part whole over its FSDP
    shards (``gathering.BlockShards``), then joins the group's parts, viewed as
    ``adamw8bit.split_block_views`` says, into the whole tensor's as one process stores them."""

    def __init__(self, t, view: tuple, dim: int, tp: TensorParallel):
        self.t, self.view, self.dim, self.tp = t, view, dim, tp
        self.dtype, self.shape = t.dtype, (math.prod(view) * tp.size,)

    @classmethod
    def pair(cls, codes, scales, shape, dim: int, tp: TensorParallel) -> tuple["SplitBlocks", "SplitBlocks"]:
        """The codes and scales of a moment of a part of ``shape``."""
        from .adamw8bit import split_block_views

        code_view, scale_view = split_block_views(shape, dim)
        return cls(codes, code_view, dim, tp), cls(scales, scale_view, dim, tp)

    def gather(self) -> torch.Tensor:
        part = full_tensor(self.t) if torch.is_tensor(self.t) else self.t.gather()
        return self.tp.gather(part.reshape(self.view), self.dim).reshape(-1)
