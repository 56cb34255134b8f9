"""Data parallel (DDP) and fully sharded (FSDP2) training under ``torchrun``.

    torchrun --nproc_per_node=8 -m apr_kernels train --init model.apr --data corpus/ --parallel fsdp
    torchrun --nnodes=2 --node_rank=0 --rdzv-backend=c10d --rdzv-endpoint=host:29400 \\
             --nproc_per_node=8 -m apr_kernels train ...            # multi-node: the usual flags

Only ``torch.distributed`` does the communication: the process group (nccl on CUDA, gloo on CPU,
``init_process_group(timeout=...)``), ``DistributedDataParallel`` and FSDP2
(``torch.distributed.fsdp.fully_shard``; bf16 compute / fp32 gradient reduction on CUDA through
``MixedPrecisionPolicy``), and plain all-reduce / broadcast for losses and error flags.

Data: the batch size is global. Every rank draws the same global batch of sequence indices from the
shared ``BatchStream`` (so ``training.data_position`` counts global sequences) and trains on its own
contiguous ``batch_size / world_size`` rows of it: the ranks read disjoint slices of the token stream,
and the gradient all-reduce (a mean over equal-sized slices) gives exactly the single-process
gradient of the global batch. Held-out evaluation splits the sequences across ranks and all-reduces
the (loss sum, target count) pair, in float64.

Loading (``from_apr``): every rank maps the same APR file (zero-copy views; one page cache per node).
Under FSDP the model is built on the meta device, ``fully_shard``-ed, given storage for the local
shards only (``to_empty``), and each parameter's local ``torch.chunk`` slice is copied out of the
file's view. Slicing a mapped tensor is free and touches only the pages of those rows, so a rank's
peak memory is about model / N plus, at most, one dequantised tensor (quantised or converted tensors
are decoded whole before slicing). This was chosen over "rank 0 loads and broadcasts": that path
needs the whole model in rank 0's memory and moves every byte over the interconnect, while here no
byte is communicated and the file is read once per node through the shared page cache.

Checkpoints (``gathering.py``): one APR file in the single-process format (``checkpoint.py``). Under FSDP each
parameter and AdamW moment is all-gathered (``DTensor.full_tensor``) when rank 0's ``save`` comes to
write it: rank 0 broadcasts the index of the tensor it needs and every rank joins that gather, so
rank 0 holds one whole tensor at a time, not the model and its moments (12 bytes per parameter);
under DDP rank 0's replica is the state. Rank 0 writes (``apr_kernels.save``: temporary file, fsync,
rename) and broadcasts success or its error, so every rank fails together.
Resuming on any number of ranks works: weights and moments are sliced like any init file, and the
data position is global.

Failures: the process group has a timeout (``--dist-timeout``), so when a rank dies or hangs the
others stop at their next collective (gloo: a closed connection fails at once; otherwise after the
timeout) with an error naming the rank, instead of waiting forever.
"""

from __future__ import annotations

import contextlib
import gc
import os
import dataclasses
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0
MODES = ("none", "ddp", "fsdp")


# ------------------------------------------------------------------------ process group
@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank, world size, its device and the process group it joined."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None        # None: no process group (plain single-process training)
    timeout_s: float = DEFAULT_TIMEOUT_S
    owns_group: bool = False          # setup() created the group, so teardown() destroys it
    # FSDP: the ranks that shard a parameter between them (0: all); fewer than all is HSDP, each group
    # of that many consecutive ranks (a node) holding one sharded copy, the copies replicated
    fsdp_shard: int = 0
    # the commands that only read a model (eval, generate) under --tensor-parallel N: this rank's
    # tensor_parallel.TensorParallel, N consecutive ranks holding one model split between them and
    # running the same batches (rank_share.py); None: a whole model per rank
    model_split: object = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.backend is not None


def launched() -> bool:
    """True inside a ``torchrun`` (or any ``env://``) launch: RANK and WORLD_SIZE are set."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}; expected an integer (set by torchrun)") from None


def setup(device: str | torch.device | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
          need_group: bool = False) -> DistEnv:
    """Join the process group a launcher describes (``env://``), or none when not launched.

    ``need_group``: create a one-process group even without a launcher (FSDP needs a device mesh).
    CUDA ranks use ``cuda:LOCAL_RANK`` unless ``device`` names an index.
    """
    if timeout_s <= 0:
        raise ValueError(f"--dist-timeout {timeout_s}; expected a positive number of seconds")
    is_launched = launched()
    rank, world = (_env_int("RANK", 0), _env_int("WORLD_SIZE", 1)) if is_launched else (0, 1)
    local_rank = _env_int("LOCAL_RANK", 0) if is_launched else 0
    dev = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not (is_launched or need_group):
        return DistEnv(device=dev, timeout_s=timeout_s)
    if dist.is_initialized():  # someone else's group: use it, leave it alone
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, dist.get_backend(),
                       timeout_s, owns_group=False)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
    if backend == "nccl":
        kwargs["device_id"] = dev  # eager communicator on this rank's GPU
    if is_launched:
        dist.init_process_group(init_method="env://", rank=rank, world_size=world, **kwargs)
    else:
        dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    return DistEnv(rank, world, local_rank, dev, backend, timeout_s, owns_group=True)


def teardown(env: DistEnv, *, failed: bool = False) -> None:
    """Leave the process group setup() created. After a failure on NCCL the group may hold hung
    kernels, so it is left to process exit (the NCCL watchdog aborts it) rather than waited on."""
    if not (env.owns_group and dist.is_initialized()):
        return
    if failed and env.backend == "nccl":
        return
    # FSDP modules, DTensors and the device mesh sit in reference cycles that keep the group alive
    # after destroy_process_group(); left to interpreter shutdown, gloo's worker threads were
    # destroyed joinable there ("terminate called without an active exception", SIGABRT, in ~1 of
    # 12 CPU runs). So: free those cycles, wait until every rank is done with the group, destroy it
    # while the interpreter is whole, and collect again.
    gc.collect()
    with contextlib.suppress(Exception):
        if not failed:  # a dead rank would never arrive
            dist.barrier()
        dist.destroy_process_group()
    gc.collect()


def resolve_mode(mode: str | None, env: DistEnv) -> str:
    """``--parallel``: explicit, or ddp when several ranks run and none when one does."""
    if mode is None:
        return "ddp" if env.world_size > 1 else "none"
    if mode not in MODES:
        raise ValueError(f"--parallel {mode!r}; expected one of {', '.join(MODES)}")
    if mode == "none" and env.world_size > 1:
        raise ValueError(f"--parallel none with WORLD_SIZE={env.world_size}; expected ddp or fsdp "
                         f"(independent replicas would each train on the whole batch)")
    return mode


def failure_message(env: DistEnv, exc: BaseException) -> str:
    """The error a rank reports when training stops (collective failures are plain RuntimeErrors)."""
    return (f"rank {env.rank} of {env.world_size} stopped: {exc} (when a rank dies or hangs, the others "
            f"fail at their next collective: at once when its connection closes, else after the "
            f"process-group timeout of {env.timeout_s:g} s set by --dist-timeout; the first error is "
            f"in the failing rank's output)")


def run(args, body) -> int:
    """``body(env, mode)`` inside the process group a launcher describes (``args.device``,
    ``args.parallel``, ``args.dist_timeout``; a one-process group for ``--parallel fsdp`` alone); a
    rank's failure is reported with its rank, and the group is left at the end."""
    want = getattr(args, "parallel", None)
    env = setup(args.device, timeout_s=getattr(args, "dist_timeout", DEFAULT_TIMEOUT_S), need_group=want == "fsdp")
    shard = getattr(args, "fsdp_shard_size", None)
    if shard is not None:
        if want != "fsdp" or shard < 1 or env.world_size % shard:
            teardown(env, failed=True)
            raise ValueError(f"--fsdp-shard-size {shard}: expected --parallel fsdp and a divisor of the world size "
                             f"{env.world_size} (groups of that many ranks shard, the groups replicate: HSDP)")
        env = dataclasses.replace(env, fsdp_shard=shard)
    failed = True
    try:
        code = body(env, resolve_mode(want, env))
        failed = False
        return code
    except RuntimeError as exc:
        if env.world_size > 1:
            raise RuntimeError(failure_message(env, exc)) from exc
        raise
    finally:
        teardown(env, failed=failed)


# ------------------------------------------------------------------------------ sharding
def local_rows(index: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's contiguous share of a global batch of sequence indices (shares are disjoint and
    equal, so the mean of the per-rank mean losses is the global mean)."""
    if index.numel() % world_size:
        raise ValueError(f"--batch-size {index.numel()} is not a multiple of the world size "
                         f"{world_size}; expected each rank to get an equal share of the global batch")
    per = index.numel() // world_size
    return index[rank * per:(rank + 1) * per]


def check_group_size(option: str, size: int, mode: str) -> None:
    """A ``--<kind>-parallel size`` option: a group size >= 1, under a data-parallel ``--parallel``."""
    if size < 1:
        raise ValueError(f"{option} {size}: expected a group size >= 1")
    if mode not in ("ddp", "fsdp"):
        raise ValueError(f"{option} {size} needs --parallel ddp or fsdp under torchrun (got {mode})")


def rank_groups(world_size: int, size: int, rank: int, replicas: str = "several", stride: int = 1):
    """Process groups of ``size`` consecutive ranks (a context-, expert- or tensor-parallel group) and
    of their replicas (ranks ``t, t + size, ...``), created on every rank in the same order: ``(this
    rank's group, its index in it, its replicas' group)``. ``replicas``: ``"several"`` makes them
    when there are several groups (else None), ``"always"`` also of one rank, ``"none"`` never.
    ``stride`` s > 1: the groups' ranks are s apart instead (``b + t, b + t + s, ...`` in each block
    ``b`` of ``size * s`` ranks: a context-parallel group around tensor-parallel groups of s)."""
    mine, others = None, None
    for block in range(0, world_size, size * stride):
        for t in range(stride):
            ranks = list(range(block + t, block + size * stride, stride))
            g = dist.new_group(ranks)
            if rank in ranks:
                mine = (g, ranks.index(rank))
    if stride > 1:
        return mine[0], mine[1], None
    if replicas == "always" or (replicas == "several" and world_size > size):
        for t in range(size):
            g = dist.new_group(list(range(t, world_size, size)))
            if rank % size == t:
                others = g
    return mine[0], mine[1], others


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard_axis(param):
    """``(ranks, this rank's index among them, their process group)`` that split ``param``'s rows: an
    FSDP2 DTensor ``Shard(0)`` on a 1-D mesh, or HSDP's ``(Replicate(), Shard(0))`` on a 2-D mesh
    (the shard dimension); None for any other placement."""
    from torch.distributed.tensor import Replicate, Shard

    mesh = getattr(param, "device_mesh", None)
    if mesh is None:
        return None
    places = tuple(param.placements)
    if mesh.ndim == 1 and places == (Shard(0),):
        return mesh.size(), mesh.get_local_rank(), mesh.get_group()
    if mesh.ndim == 2 and places == (Replicate(), Shard(0)):
        return mesh.size(1), mesh.get_local_rank(1), mesh.get_group(1)
    return None


def local_shard(full: torch.Tensor, param, name: str = "tensor") -> torch.Tensor:
    """The slice of ``full`` that ``param`` (an FSDP2 DTensor, ``Shard(0)``; HSDP: on the shard
    dimension of its mesh) holds on this rank: ``torch.chunk`` rows, empty for ranks past the last
    chunk. A view, not a copy."""
    if tuple(full.shape) != tuple(param.shape):
        raise ValueError(f"{name}: stored shape {list(full.shape)}, expected {list(param.shape)}")
    axis = shard_axis(param)
    if axis is None:
        raise ValueError(f"{name}: placements {param.placements} on a {param.device_mesh.ndim}-D mesh; expected "
                         f"(Shard(dim=0),) on a 1-D mesh (fully_shard's default) or (Replicate(), Shard(dim=0)) "
                         f"(HSDP)")
    size, rank, _ = axis
    chunks = list(torch.chunk(full, size, dim=0)) if full.ndim else [full]
    piece = chunks[rank] if rank < len(chunks) else full[:0]
    local = param.to_local()
    if tuple(piece.shape) != tuple(local.shape):
        raise ValueError(f"{name}: rank {rank}'s slice of {list(full.shape)} has shape "
                         f"{list(piece.shape)} but the local shard is {list(local.shape)}; expected "
                         f"torch.chunk(dim 0) sharding")
    return piece


def reshard(module) -> None:
    """Free every FSDP module's gathered parameters in ``module`` (``FSDPModule.reshard`` is not
    recursive): after a forward without backward, the root, and with layers that keep their
    parameters gathered after a forward (``_fsdp_shard``'s ``reshard_after_forward``) those too."""
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def fsdp_fields(model) -> dict:
    """The start record's ``fsdp_reshard_after_forward`` of a model ``_fsdp_shard`` wrapped (outside a
    pipeline, whose start record says ``fsdp_gathered_through_step``); nothing for any other model."""
    value = getattr(model, "fsdp_reshard_after_forward", None)
    return {} if value is None else {"fsdp_reshard_after_forward": value}


def copy_into(param, full: torch.Tensor, name: str = "tensor") -> None:
    """Fill ``param`` from the whole tensor ``full``: its local rows when it is an FSDP shard."""
    if _is_dtensor(param):
        param.to_local().copy_(local_shard(full, param, name))
    else:
        param.copy_(full)


def chunk_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """(first row, rows) that ``rank`` holds of ``rows`` split by ``torch.chunk`` over ``world`` ranks."""
    chunk = -(-rows // world)
    first = min(rank * chunk, rows)
    return first, min(chunk, rows - first)


def shard_rows(p: torch.Tensor) -> tuple[int, int] | None:
    """(first row, rows) of an FSDP parameter's local shard: ``torch.chunk`` of dim 0 over its shard
    ranks (``shard_axis``); None for a plain tensor or another placement."""
    axis = shard_axis(p)
    if axis is None or p.ndim == 0:
        return None
    return chunk_rows(p.shape[0], axis[0], axis[1])


def like_param(full: torch.Tensor, param, name: str = "tensor") -> torch.Tensor:
    """A fp32 copy of ``full`` placed like ``param``: a DTensor holding only the local rows when
    ``param`` is sharded (optimizer moments on resume), else a plain tensor on its device."""
    if not _is_dtensor(param):
        return full.to(param.device, torch.float32, copy=True)
    from torch.distributed.tensor import DTensor

    piece = local_shard(full, param, name).to(param.to_local().device, torch.float32, copy=True)
    return DTensor.from_local(piece, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathered from the ranks when sharded (a collective), else ``t``.

    On CPU without autograd, plain ``Shard``/``Replicate``/``Partial(sum)`` placements are gathered
    with blocking c10d collectives (``_gloo_full_tensor``) instead of ``DTensor.full_tensor``: on gloo
    (torch 2.13) its asynchronous functional all-gather of a padded shard corrupts the heap now and
    then (SIGSEGV or "malloc(): unaligned tcache chunk detected" on the padded rank, about once in
    100k gathers here; the pure-torch reproduction: docs/DESIGN.md "Gathering on CPU")."""
    if not _is_dtensor(t):
        return t
    if t.device.type == "cpu" and not (torch.is_grad_enabled() and t.requires_grad):
        whole = _gloo_full_tensor(t)
        if whole is not None:
            return whole
    return t.full_tensor()


def _gloo_full_tensor(t) -> torch.Tensor | None:
    """``t.full_tensor()`` through blocking ``all_gather_single`` / ``all_reduce`` per mesh
    dimension (last first: DTensor shards in mesh order), each shard padded to ``torch.chunk``'s
    size; None for placements this does not handle (strided shards, other reductions)."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    mesh, places = t.device_mesh, t.placements
    if not all(type(pl) in (Shard, Replicate) or (type(pl) is Partial and pl.reduce_op == "sum")
               for pl in places):
        return None
    # the tensor's size along each sharded dim before each mesh dimension cut it
    sizes, before = list(t.shape), []
    coords = mesh.get_coordinate()
    for i, pl in enumerate(places):
        before.append(list(sizes))
        if type(pl) is Shard:
            n, size = mesh.size(i), sizes[pl.dim]
            per = -(-size // n)
            sizes[pl.dim] = max(0, min(per, size - coords[i] * per))
    x, local = t.to_local().detach(), True
    for i in reversed(range(len(places))):
        pl, n = places[i], mesh.size(i)
        if n == 1 or type(pl) is Replicate:
            continue  # (the local tensor is already whole along this mesh dimension: no copy)
        group = mesh.get_group(i)
        if type(pl) is Partial:
            x, local = x.clone(), False
            dist.all_reduce(x, group=group)
            continue
        d, size = pl.dim, before[i][pl.dim]
        per = -(-size // n)
        moved = x.movedim(d, 0)
        if moved.shape[0] == per and moved.is_contiguous():
            padded = moved  # (an even shard goes as it is)
        else:
            padded = moved.new_zeros((per, *moved.shape[1:]))
            padded[:moved.shape[0]] = moved
        out = moved.new_empty((n * per, *moved.shape[1:]))
        collective("all_gather_single", "all_gather_into_tensor", blocking=True)(out, padded, group=group)
        x, local = out[:size].movedim(0, d), False
    # (never the local shard itself, as DTensor.full_tensor: callers may change what they get)
    return x.clone(memory_format=torch.contiguous_format) if local else x.contiguous()


def local_part(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view sharing its storage), else ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t


def _raise_together(env: DistEnv, error: BaseException | None, what: str) -> None:
    """Re-raise ``error`` on its rank and a matching error on the others (no rank waits alone)."""
    if not env.active or env.world_size == 1:
        if error is not None:
            raise error
        return
    flag = torch.tensor([0.0 if error is None else 1.0], device=env.device)
    dist.all_reduce(flag)
    if error is not None:
        raise error
    if flag.item():
        raise RuntimeError(f"rank {env.rank}: {what} failed on {int(flag.item())} other rank(s); "
                           f"see their error")


# ----------------------------------------------------------------------------- wrapping
def _fsdp_shard(model, env: DistEnv, compute_dtype: torch.dtype | None = None, expert=None, tensor=None,
                pipeline=None, mesh=None, reshard_after_forward: bool = True):
    """``fully_shard`` every decoder layer, then the root (embedding, final norm, lm_head). On CUDA the
    compute copies are bf16, or fp16 for a run in fp16 (``compute_dtype``: GPUs without bf16).
    ``expert``: an ``expert_parallel.ExpertParallel`` whose experts this model already holds: each
    sparse layer's ``Experts`` is sharded first, over its replicas only (the ranks that hold the same
    experts; a mesh of one rank when there is one group; under HSDP those of this node, replicated
    across the nodes; with ``tensor`` the ranks holding the same part of them). ``tensor``: a ``tensor_parallel.TensorParallel`` whose split this model already
    has: each rank's tensors are sharded over the ranks holding the same parts (its replicas).
    ``pipeline``: a ``pipeline_parallel.PipelineParallel`` whose split this model already has: its
    stage's layers and parts sharded over the stage's replicas, gathered around ``stage_forward``
    (its mesh kept as ``pipeline.fsdp_mesh``). ``mesh``: shard the whole model over this mesh instead
    (a pipeline's last stage's distillation teacher, over that stage's ``fsdp_mesh``).
    ``reshard_after_forward`` False (``--fsdp-reshard-after-forward never``): a layer keeps its
    gathered parameters from its forward to its backward (one all-gather a layer and micro-batch, not
    two; the whole unsharded model held at the forward's end). A pipeline stage ignores it: its
    schedule keeps the stage gathered through a step or not (``PipelineParallel.train_step``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if isinstance(model, FSDPModule):
        return model
    shard = env.fsdp_shard or env.world_size
    if mesh is not None:
        pass
    elif pipeline is not None:  # (stage-major ranks; in a stage, replicas of tensor-parallel groups of
        # consecutive ranks: each rank's parts sharded over the stage's ranks holding the same ones; under
        # HSDP over those of its group of fsdp_shard consecutive ranks, the groups replicating)
        r = pipeline.replicate
        mesh = init_device_mesh(env.device.type, (pipeline.size, r, pipeline.replicas // r, pipeline.tensor),
                                mesh_dim_names=("pipeline", "replicate", "data", "tensor"))
        mesh = pipeline.fsdp_mesh = mesh["replicate", "data"] if r > 1 else mesh["data"]
    elif tensor is not None and tensor.size > 1 and shard != env.world_size:  # HSDP of the ranks' parts
        mesh = init_device_mesh(env.device.type, (env.world_size // shard, shard // tensor.size, tensor.size),
                                mesh_dim_names=("replicate", "shard", "tensor"))["replicate", "shard"]
    elif tensor is not None and tensor.size > 1:  # (consecutive ranks split the layers: every tensor-th shards)
        mesh = init_device_mesh(env.device.type, (env.world_size // tensor.size, tensor.size),
                                mesh_dim_names=("data", "tensor"))["data"]
    elif shard == env.world_size:
        mesh = init_device_mesh(env.device.type, (env.world_size,))
    else:  # HSDP: reduce-scatter inside each group of `shard` ranks, all-reduce between the groups
        mesh = init_device_mesh(env.device.type, (env.world_size // shard, shard), mesh_dim_names=("replicate", "shard"))
    after_forward = reshard_after_forward or pipeline is not None
    # on CUDA: bf16 compute copies, fp32 gradient reduction and fp32 master weights
    half = torch.float16 if compute_dtype == torch.float16 else torch.bfloat16
    mp = (MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32)
          if env.device.type == "cuda" else MixedPrecisionPolicy())
    if expert is not None:
        from apr_kernels.model.moe import Experts

        n = expert.size
        if pipeline is not None:  # (a stage's ranks holding the same part of the same experts; under HSDP
            # those of its shard group shard them, the groups replicating)
            r = pipeline.replicate
            replicas = init_device_mesh(env.device.type, (pipeline.size, r, pipeline.replicas // (r * n), n,
                                                          pipeline.tensor),
                                        mesh_dim_names=("pipeline", "replicate", "shard", "expert", "tensor"))
            replicas = replicas["replicate", "shard"] if r > 1 else replicas["shard"]
        elif tensor is not None and tensor.size > 1:  # (the ranks holding the same part of the same experts)
            m = tensor.size
            if shard == env.world_size:
                replicas = init_device_mesh(env.device.type, (env.world_size // (n * m), n, m),
                                            mesh_dim_names=("replica", "expert", "tensor"))["replica"]
            else:  # HSDP: sharded over those in this node, replicated across the nodes
                replicas = init_device_mesh(env.device.type, (env.world_size // shard, shard // (n * m), n, m),
                                            mesh_dim_names=("replicate", "shard", "expert", "tensor"))[
                    "replicate", "shard"]
        elif shard == env.world_size:
            replicas = init_device_mesh(env.device.type, (env.world_size // n, n),
                                        mesh_dim_names=("replica", "expert"))["replica"]
        else:  # HSDP: an expert's replicas in this node shard it, the nodes' copies replicate it
            replicas = init_device_mesh(env.device.type, (env.world_size // shard, shard // n, n),
                                        mesh_dim_names=("replicate", "shard", "expert"))["replicate", "shard"]
        for m in model.modules():
            if isinstance(m, Experts):
                fully_shard(m, mesh=replicas, mp_policy=mp, reshard_after_forward=after_forward)
    layers = model.model.layers if pipeline is None else pipeline.layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    if pipeline is not None:  # (a stage runs stage_forward, never forward; activations sent in compute dtype)
        register_fsdp_forward_method(model, "stage_forward")
        pipeline.wire_dtype = mp.param_dtype
    else:  # (the start record's; a pipeline's schedule decides for its stage)
        model.fsdp_reshard_after_forward = after_forward
    return model


class _LossModule(torch.nn.Module):
    """DDP synchronises gradients only for what runs through its ``forward``: the loss must."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, x, y, documents=None, reduction="mean", teacher=None, ends=None, label_smoothing=0.0,
                z_loss=0.0, lengths=None):
        if y is None:  # a sequence classifier's scores (a reward model)
            return self.inner(x, documents=documents, ends=ends)
        return self.inner.loss(x, y, reduction=reduction, documents=documents, teacher=teacher,
                               label_smoothing=label_smoothing, z_loss=z_loss, lengths=lengths)


class Parallel:
    """One model trained by this rank: the loss through the DDP/FSDP wrapper, this rank's share of
    each batch, cross-rank means and sharded evaluation. ``module`` is the ``Transformer`` itself
    (Hugging Face names; DTensor parameters under FSDP)."""

    def __init__(self, module, mode: str, env: DistEnv, wrapper=None, context=None, expert=None, tensor=None,
                 pipeline=None):
        self.module, self.mode, self.env, self._wrapper = module, mode, env, wrapper
        self.context = context  # context_parallel.ContextParallel, or None
        self.expert = expert  # expert_parallel.ExpertParallel, or None
        self.tensor = tensor  # tensor_parallel.TensorParallel, or None
        self.pipeline = pipeline  # pipeline_parallel.PipelineParallel, or None
        # (HSDP under tensor parallelism: this rank's group of fsdp_shard consecutive ranks, for clipping)
        self._sharding_group = None
        if tensor is not None and mode == "fsdp" and env.fsdp_shard:
            self._sharding_group = rank_groups(env.world_size, env.fsdp_shard, env.rank, replicas="none")[0]

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def _sharing(self) -> int:
        """Consecutive ranks that see the same rows: a context- and/or tensor-parallel group's."""
        return (self.context.size if self.context is not None else 1) * \
            (self.tensor.size if self.tensor is not None else 1)

    @property
    def data_ranks(self) -> int:
        """Ranks that take different rows: all of them, or one per context- or tensor-parallel group
        (pipeline parallelism: one per pipeline)."""
        if self.pipeline is not None:
            return self.pipeline.row_groups
        return self.env.world_size // self._sharing

    @property
    def data_rank(self) -> int:
        if self.pipeline is not None:
            return self.pipeline.row_group
        return self.env.rank // self._sharing

    @property
    def sequence(self):
        """The tensor-parallel group when its ranks hold chunks of the positions (``--sequence-parallel``)."""
        return self.tensor if self.tensor is not None and self.tensor.sequence_parallel else None

    def local_positions(self, *ts: torch.Tensor):
        """This rank's positions of whole rows ``[B, T, ...]`` (all of them without context or
        sequence parallelism): its context-parallel rank's chunks, then of those its sequence-parallel
        chunk (the split blocks gather the group's chunks back into the context-parallel rank's)."""
        out = ts
        if self.context is not None:
            out = tuple(self.context.shard(t) for t in out)
        if self.sequence is not None:
            out = tuple(self.sequence.chunk(t) for t in out)
        return out if len(out) > 1 else out[0]

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def loss(self, x: torch.Tensor, y: torch.Tensor, documents=None, reduction: str = "mean",
             teacher=None, label_smoothing: float = 0.0, z_loss: float = 0.0, lengths=None) -> torch.Tensor:
        if self._wrapper is not None:
            return self._wrapper(x, y, documents, reduction, teacher, label_smoothing=label_smoothing, z_loss=z_loss,
                                 lengths=lengths)
        return self.module.loss(x, y, reduction=reduction, documents=documents, teacher=teacher,
                                label_smoothing=label_smoothing, z_loss=z_loss, lengths=lengths)

    def __call__(self, x: torch.Tensor, documents=None, ends=None) -> torch.Tensor:
        """A sequence classifier's scores (``Transformer.forward(x, documents=, ends=)``) through the
        DDP/FSDP wrapper."""
        if self._wrapper is not None:
            return self._wrapper(x, None, documents, ends=ends)
        return self.module(x, documents=documents, ends=ends)

    def grad_sync(self, enabled: bool):
        """Context for one micro-batch: no gradient communication unless ``enabled`` (the last)."""
        if enabled and (self.expert is not None or self.sequence is not None):
            return self._finish_sync()
        if enabled or self.mode == "none":
            return contextlib.nullcontext()
        if self.mode == "ddp":
            return self._wrapper.no_sync()

        @contextlib.contextmanager
        def fsdp_no_sync():
            self.module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.module.set_requires_gradient_sync(True)

        return fsdp_no_sync()

    @contextlib.contextmanager
    def _finish_sync(self):
        """The last micro-batch under expert or sequence parallelism: DDP/FSDP reduce the other
        parameters during the backward; after it, the experts' gradients are finished
        (``ExpertParallel.reduce_grads``: summed over their replicas, or under FSDP already
        reduce-scattered over them), and under sequence parallelism the parameters outside the split
        blocks (embedding, norms, output head), whose gradients each rank took from its own
        positions, are summed over the tensor-parallel group."""
        yield
        if self.expert is not None:
            from .expert_parallel import expert_parameters

            self.expert.reduce_grads(expert_parameters(self.module), sharded=self.mode == "fsdp")
        if self.sequence is None:
            return
        from .tensor_parallel import sequence_split_parameters

        all_reduce_flat([local_part(p.grad) for p in sequence_split_parameters(self.module) if p.grad is not None],
                        self.tensor.group)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip every gradient by the global norm of the whole model's; returns that norm (under FSDP
        a replicated DTensor, as ``torch.nn.utils.clip_grad_norm_`` returns it)."""
        if self.pipeline is not None:
            return self.pipeline.clip_grad_norm(self.module, max_norm)
        if self.tensor is not None:
            from .tensor_parallel import clip_grad_norm, split_dims

            split = {id(p) for n, p in self.module.named_parameters() if n in split_dims(self.module)}
            if self.mode != "fsdp":
                experts = None
                if self.expert is not None:  # (each rank holds its group's share of the experts)
                    from .expert_parallel import expert_parameters

                    experts = {id(p) for p in expert_parameters(self.module)}
                return clip_grad_norm(self.module.parameters(), split, max_norm, self.tensor, experts=experts,
                                      expert_group=self.expert.group if self.expert is not None else None)
            # the distinct parts: a whole-kept tensor's shards (its sharding ranks), a split one's over
            # the sharding group's ranks of every part (all ranks; under HSDP one group of fsdp_shard)
            sharding = shard_axis(self.module.model.norm.weight)[2]
            return clip_grad_norm(self.module.parameters(), split, max_norm, self.tensor, sharded_group=sharding,
                                  split_group=self._sharding_group or dist.group.WORLD)
        if self.expert is not None:
            from .expert_parallel import expert_parameters

            # under FSDP every rank holds its own part of each gradient, under HSDP within its node
            group = shard_axis(self.module.model.embed_tokens.weight)[2] if self.env.fsdp_shard else None
            return self.expert.clip_grad_norm(self.module.parameters(), expert_parameters(self.module), max_norm,
                                              sharded=self.mode == "fsdp", group=group)
        return torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)

    def reshard(self) -> None:
        """FSDP keeps the root's parameters gathered after a forward without backward (evaluation),
        and the layers' too under ``--fsdp-reshard-after-forward never``; while gathered a module
        holds plain tensors instead of the sharded DTensors that the optimizer updates: shard them
        again."""
        if self.mode == "fsdp":
            reshard(self.module)

    def local_rows(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (a context-parallel group's ranks share theirs)."""
        return local_rows(index, self.data_rank, self.data_ranks)

    @property
    def grad_ranks(self) -> int:
        """The ranks whose gradients DDP/FSDP average (all of them; a tensor-parallel group's ranks hold
        different parts, averaged only with their replicas; a pipeline stage's replicas): a loss scaled
        by this sums instead."""
        if self.pipeline is not None:
            return self.pipeline.replicas
        return self.env.world_size // (self.tensor.size if self.tensor is not None else 1)

    @property
    def shares(self) -> int:
        """The equal shares of a global batch whose losses add up: one per rank, a tensor-parallel
        group's ranks counting once (they compute the same), except under sequence parallelism."""
        return self.env.world_size if self.sequence is not None else self.grad_ranks

    def total(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of what each computed on its own share (a tensor-parallel group's
        ranks computed the same: counted once; under sequence parallelism each its own positions;
        under pipeline parallelism only the last stages hold losses, the others zeros)."""
        if self.pipeline is not None:
            t = t.clone()
            dist.all_reduce(t)  # (a tensor-parallel group's ranks on the last stage: the same loss each,
            if self.tensor is not None and self.sequence is None:  # unless each holds its positions')
                t = t / self.tensor.size
            return t
        return self.mean(t) * self.shares

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce mean (gloo has no AVG: sum, then divide)."""
        if self.env.world_size == 1:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t / self.env.world_size

    @torch.no_grad()
    def evaluate(self, tokens: torch.Tensor, seq_len: int, *, batch_size: int = 8,
                 autocast_dtype: torch.dtype | None = None, max_tokens: int | None = None,
                 eos_id: int | None = None):
        """``data.evaluate`` over all ranks: each takes a contiguous share of the sequences; every
        rank runs the same number of forwards (FSDP's are collectives), padding with a batch whose
        targets are all ignored; (loss sum, count) are all-reduced in float64. Pipeline parallelism:
        each replica's share goes through its stages, and the last one sums the losses."""
        from apr_kernels.model.documents import Documents

        from .data import eval_sequences, split_targets

        seqs = eval_sequences(tokens, seq_len, max_tokens)
        rank, world, dev = self.data_rank, self.data_ranks, self.env.device
        per = -(-len(seqs) // world)
        mine = seqs[rank * per:(rank + 1) * per]
        model, pp = self.module, self.pipeline
        was_training = model.training
        model.eval()
        acc = torch.zeros(2, dtype=torch.float64, device=dev)  # loss sum, target count

        def autocast():
            return torch.autocast(dev.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None)

        for b in range(-(-per // batch_size)):
            rows = mine[b * batch_size:(b + 1) * batch_size]
            x, y = split_targets(rows if len(rows) else seqs[:1])
            if not len(rows):  # the padding forward: no targets
                y = torch.full_like(y, -100)
            docs = None if eos_id is None else Documents.from_eos(x, eos_id).to(dev)
            x, y = self.local_positions(x.to(dev), y.to(dev))
            if pp is not None:  # through the stages: the last one's loss (the others add 0 and count nothing)
                acc[0] += pp.loss_sum(model, x, y, docs, autocast=autocast)
                acc[1] += (y != -100).sum() if pp.last else 0
                continue
            with autocast():
                acc[0] += model.loss(x, y, reduction="sum", documents=docs).double()
            acc[1] += (y != -100).sum()
        model.train(was_training)
        self.reshard()
        if self.env.world_size > 1:  # (context-parallel ranks hold disjoint positions: their sums add up)
            dist.all_reduce(acc)
            if self.tensor is not None and self.sequence is None:  # (a tensor-parallel group's ranks
                acc /= self.tensor.size  # each summed the same rows)
        return float(acc[0] / acc[1]), int(acc[1])


def parallelize(model, mode: str, env: DistEnv, compute_dtype: torch.dtype | None = None,
                context_parallel: int = 1, expert_parallel=None, tensor_parallel=None,
                pipeline_parallel=None, reshard_after_forward: bool = True) -> Parallel:
    """Wrap ``model`` for ``mode``: ``ddp`` (a replica per rank, gradients all-reduced), ``fsdp``
    (``fully_shard`` per decoder layer and at the root, ``compute_dtype`` as ``_fsdp_shard``'s;
    already sharded models pass through) or ``none``. Build the optimizer after this: FSDP replaces
    the parameters by DTensors. ``context_parallel`` N > 1: groups of N consecutive ranks split every
    sequence's positions between them (``context_parallel.py``); gradients are still reduced over
    every rank. ``expert_parallel``: an ``expert_parallel.ExpertParallel``: the experts spread over
    its group (already, when loaded that way); DDP reduces the rest, or FSDP shards the rest over
    every rank and the experts over their replicas. ``tensor_parallel``: a
    ``tensor_parallel.TensorParallel``: the layers split over its group (already, when loaded that
    way); DDP or FSDP over the ranks holding the same parts. ``reshard_after_forward``: FSDP's
    (``_fsdp_shard``'s)."""
    if mode not in MODES:
        raise ValueError(f"parallel mode {mode!r}; expected one of {', '.join(MODES)}")
    if mode != "none" and not env.active:
        raise ValueError(f"parallel mode {mode!r} needs a process group; run under torchrun or call "
                         f"setup(need_group=True)")
    context = None
    if context_parallel != 1:
        if mode == "none":
            raise ValueError(f"--context-parallel {context_parallel} needs --parallel ddp or fsdp (the ranks "
                             f"of a group hold parts of the same rows: their gradients must be reduced)")
        from .context_parallel import groups

        # (under tensor parallelism the context groups span the tensor-parallel groups: ranks N apart)
        context = groups(env.world_size, context_parallel, env.rank, tensor_parallel.size if tensor_parallel else 1)
        model.set_context_parallel(context)
        from .float8 import split_positions

        split_positions(model, context)  # (float8 scales spanning the positions: over the group)
    if expert_parallel is not None:
        from .expert_parallel import check

        check(expert_parallel.size, mode, fsdp_shard=env.fsdp_shard)
        if model.expert_parallel is None:
            model.set_expert_parallel(expert_parallel)
    tensor = tensor_parallel
    if tensor is not None:
        from .tensor_parallel import check

        check(tensor.size, mode, fsdp_shard=env.fsdp_shard,
              expert_parallel=expert_parallel.size if expert_parallel is not None else 1)
        if model.tensor_parallel is None:
            model.set_tensor_parallel(tensor)
    if pipeline_parallel is not None:  # (each stage's replicas average their gradients themselves, or
        if getattr(model, "pipeline", None) is None:  # FSDP shards the stage over them; a preset built
            pipeline_parallel.split(model)  # whole keeps this stage's parts)
        if mode == "fsdp":
            model = _fsdp_shard(model, env, compute_dtype, expert_parallel, pipeline=pipeline_parallel)
        return Parallel(model.to(env.device) if mode != "fsdp" else model, mode, env, pipeline=pipeline_parallel,
                        tensor=tensor, context=context, expert=expert_parallel)
    if mode == "fsdp":
        return Parallel(_fsdp_shard(model, env, compute_dtype, expert_parallel, tensor,
                                    reshard_after_forward=reshard_after_forward), mode, env, context=context,
                        expert=expert_parallel, tensor=tensor)
    model = model.to(env.device)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = _LossModule(model)
        if expert_parallel is not None:  # each rank's own experts: reduced by ExpertParallel, not DDP
            from .expert_parallel import expert_parameters

            mine = {id(p) for p in expert_parameters(model)}
            DDP._set_params_and_buffers_to_ignore_for_model(
                wrapped, [n for n, p in wrapped.named_parameters() if id(p) in mine])
        ids = [env.device.index] if env.device.type == "cuda" else None
        # (tensor parallelism: each rank's parts averaged with the ranks holding the same ones)
        group = tensor.replicas if tensor is not None else None
        return Parallel(model, mode, env, DDP(wrapped, device_ids=ids, process_group=group), context=context,
                        expert=expert_parallel, tensor=tensor)
    return Parallel(model, mode, env, context=context)


# ------------------------------------------------------------------------ load and save
def from_apr(path, env: DistEnv, mode: str, *, fast: bool | None = None, compute_dtype: torch.dtype | None = None,
             expert_parallel=None, tensor_parallel=None, pipeline_parallel=None, prepare=None, mesh=None,
             vocabulary: bool = True, everywhere: bool = True, reshard_after_forward: bool = True, **lora):
    """``model.loading.from_apr`` on this rank: sharded on the meta device under FSDP (each rank
    materialises only its shards; ``compute_dtype`` as ``_fsdp_shard``'s), only this rank's experts
    with ``expert_parallel``, only this rank's part of every layer with ``tensor_parallel``, a full
    replica otherwise. Fails on every rank if any fails.
    ``prepare(model)``: called on the meta device before FSDP shards it (float8's projections).
    ``mesh``: FSDP's device mesh (``_fsdp_shard``'s), else the run's. ``vocabulary``: with
    ``tensor_parallel``, split the embedding and head by vocabulary range too (``set_tensor_parallel``'s).
    ``everywhere``: every rank loads it (a failure anywhere fails all); else only some do (a pipeline's
    last stage's teacher, ``mesh`` or ``tensor_parallel`` of that stage's ranks), each failing alone.
    ``reshard_after_forward``: FSDP's (``_fsdp_shard``'s).
    ``lora``: from_apr's ``lora`` / ``lora_base_dtype`` (and ``dtype``)."""
    from apr_kernels.model.loading import from_apr as load

    def on_meta(m):
        if pipeline_parallel is not None:  # (only this stage's layers are allocated, and read)
            pipeline_parallel.split(m)
        if expert_parallel is not None:  # (before FSDP: only this rank's experts are sharded, and read)
            m.set_expert_parallel(expert_parallel)
        if tensor_parallel is not None:  # (likewise: only this rank's heads and rows)
            m.set_tensor_parallel(tensor_parallel, vocabulary)
        if mode == "fsdp":
            if prepare is not None:
                prepare(m)
            _fsdp_shard(m, env, compute_dtype, expert_parallel, tensor_parallel, pipeline_parallel, mesh,
                        reshard_after_forward)

    shard = (on_meta if mode == "fsdp" or expert_parallel is not None or tensor_parallel is not None
             or pipeline_parallel is not None else None)
    model, error = None, None
    try:
        model = load(path, device=env.device, fast=fast, shard=shard, **lora)
    except (ValueError, OSError, RuntimeError) as exc:
        error = exc
    if everywhere:
        _raise_together(env, error, f"loading {os.fspath(path)}")
    elif error is not None:  # (only some ranks load: no world-wide check)
        raise error
    return model


def all_reduce_flat(tensors: list[torch.Tensor], group, divide: int = 1) -> None:
    """Sum ``tensors`` in place over ``group`` in one all-reduce of their concatenation (then divided
    by ``divide``: a mean over that many ranks)."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    if divide != 1:
        flat /= divide
    torch._foreach_copy_(tensors, [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]),
                                                                       tensors)])


def collective(name: str, older: str, *, blocking: bool = False):
    """The functional collective ``name`` (``torch.distributed._functional_collectives``; with
    ``blocking``, c10d's ``torch.distributed``), or on a torch without it its ``older`` name (since
    deprecated: ``all_gather_tensor``, ``all_gather_into_tensor``, ``reduce_scatter_tensor`` warn on
    every call where the ``*_single`` ones exist)."""
    from torch.distributed import _functional_collectives as funcol

    module = dist if blocking else funcol
    return getattr(module, name, None) or getattr(module, older)


def all_gather(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Every rank's ``t`` joined along ``dim`` in the rank order of ``group``, without autograd (a
    functional collective: gloo and NCCL alike; on CPU a blocking one, see ``full_tensor``)."""
    from torch.distributed import _functional_collectives as funcol

    if t.device.type == "cpu":
        return _blocking_along(t, dim, group, "all_gather_single", "all_gather_into_tensor",
                               rows=lambda n: n * dist.get_world_size(group))
    return funcol.wait_tensor(collective("all_gather_single", "all_gather_tensor")(t.contiguous(), dim, group))


def reduce_scatter(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    """``t`` summed over ``group`` and this rank's chunk along ``dim`` kept, without autograd (on
    CPU a blocking collective, see ``full_tensor``)."""
    from torch.distributed import _functional_collectives as funcol

    if t.device.type == "cpu":
        return _blocking_along(t, dim, group, "reduce_scatter_single", "reduce_scatter_tensor",
                               rows=lambda n: n // dist.get_world_size(group))
    scatter = collective("reduce_scatter_single", "reduce_scatter_tensor")
    return funcol.wait_tensor(scatter(t.contiguous(), "sum", dim, group))


def _blocking_along(t: torch.Tensor, dim: int, group, name: str, older: str, rows) -> torch.Tensor:
    """The blocking c10d collective ``name`` (or ``older``) on ``t`` along ``dim``, its output
    ``rows(t.shape[dim])`` long there (CPU: see ``full_tensor`` for why not the functional one)."""
    x = t.detach().movedim(dim, 0).contiguous()
    out = x.new_empty((rows(x.shape[0]), *x.shape[1:]))
    collective(name, older, blocking=True)(out, x, group=group)
    return out.movedim(0, dim).contiguous()


def gather_uneven(local: torch.Tensor, lengths: list[int], group=None) -> torch.Tensor:
    """Every rank's 1-D ``local`` (rank r's of ``lengths[r]`` elements) joined in rank order; a
    collective (padded to the longest part for one all-gather; a functional collective, so gloo and
    NCCL alike)."""
    pad = max(lengths)
    buf = torch.zeros(pad, dtype=local.dtype, device=local.device)
    buf[:local.numel()] = local
    out = all_gather(buf, 0, group or dist.group.WORLD)
    return torch.cat([out[r * pad:r * pad + n] for r, n in enumerate(lengths)])


class ShardedBlocks:
    """A quantised LoRA base (QLoRA) under FSDP: the file's raw blocks split between the ranks in
    whole blocks (``torch.chunk`` of the block count, as FSDP splits rows), each rank holding only
    its part on its device, so the base's memory is divided by the world size like every sharded
    parameter's. ``gather()`` (a collective) returns the whole raw bytes; ``lora.QuantizedLoRALinear``
    calls it for each GEMM that needs the weight (in the forward and again in the backward, in the
    same order on every rank, as FSDP gathers its parameters) and dequantises, so the whole base is
    never held. Made from the file's zero-copy view: a rank reads only its blocks' pages."""

    def __init__(self, dtype: str, shape, raw: torch.Tensor, device, group=None):
        from apr_kernels.quant import block_bytes

        self.dtype, self.shape, self.group = dtype, tuple(shape), group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        unit = block_bytes(dtype)
        units = raw.numel() // unit
        spans = [chunk_rows(units, world, r) for r in range(world)]
        self.lengths = [n * unit for _, n in spans]
        self.lengths[-1] += raw.numel() - units * unit  # (APR_Q8's 4-byte scale: unit 1, nothing left)
        first = spans[rank][0] * unit
        self.local = raw[first:first + self.lengths[rank]].to(device, copy=True)
        self.first = first

    @property
    def nbytes(self) -> int:
        return sum(self.lengths)

    def gather(self) -> torch.Tensor:
        return gather_uneven(self.local, self.lengths, self.group)
