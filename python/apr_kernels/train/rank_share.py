"""The commands that only read a model (``generate --prompts``, ``eval``) under torchrun: data
parallelism without training. Each rank holds a whole copy of the model (and of any reward model)
and takes every N-th batch of the work (``rank_batches``: batch b on rank ``b % N``), so in round r
the ranks hold batches ``r N .. r N + N - 1`` in rank order; rank 0 gathers what each rank made
(``gathered``, ``every_batch``) or the sums (``summed``) and alone writes or prints. Each batch is
the one a single process runs (the same records, the same per-record seeds), so the results are one
process's, up to the order sums are taken in.

With ``--tensor-parallel T`` (a model too big for one device) each group of T consecutive ranks
holds one copy split between them (``split_model``: every layer's heads and MLP rows, as training
splits them; the embedding and head whole) and is one worker: its ranks run the same batches (the
split layers' sums are collectives within the group) and the first of them alone hands on results,
so the N / T groups share the batches as N ranks do above.
"""

from __future__ import annotations

import dataclasses

import torch


def on_ranks(args, body, refuse: str | None = None) -> int:
    """``body(device, env)``: in one process (``env`` None), or under torchrun inside its process group
    on each rank's device (``env``; with ``--tensor-parallel T`` its ``model_split`` group made).
    ``refuse``: the request has nothing to share among the ranks; under torchrun this message is
    raised (before any process group) instead."""
    from . import distributed
    from .cli import pick_device

    split = getattr(args, "tensor_parallel", 1)
    if not distributed.launched():
        if split != 1:
            raise ValueError(f"--tensor-parallel {split} splits the model over torchrun's ranks; expected a torchrun "
                             f"launch (one process holds the whole model)")
        return body(pick_device(args.device), None)
    if refuse is not None:
        raise ValueError(refuse)

    def within(env, mode):
        if split != 1:
            from .tensor_parallel import groups

            env = dataclasses.replace(env, model_split=groups(env.world_size, split, env.rank))
        return body(env.device, env)

    return distributed.run(args, within)


def split_model(path, env, what: str, *, fast=None, dtype=None, **load):
    """``path`` split over ``env.model_split``'s ranks (``--tensor-parallel``): each rank reads and
    holds its heads and MLP rows of every layer, the embedding and head whole (the group's ranks run
    the same rows); ``load``: more ``from_apr`` keywords (``num_labels``). Refused by name when the
    group does not divide the heads or the MLP. Rank 0 says how much of it it holds (``what``: the
    command)."""
    import sys

    from apr_kernels.model.loading import plan

    from . import distributed
    from .expert_parallel import parameter_counts
    from .tensor_parallel import check_config

    tp = env.model_split
    check_config(plan(path, load.get("num_labels")).config, tp.size, f"{what} {path} --tensor-parallel {tp.size}")
    model = distributed.from_apr(path, env, "ddp", fast=fast, dtype=dtype, tensor_parallel=tp, vocabulary=False,
                                 **load)
    if env.is_main:
        counts = parameter_counts(model, None, tp)
        print(f"{what}: {path} split over {tp.size} tensor-parallel ranks ({env.world_size // tp.size} "
              f"{'copy' if env.world_size == tp.size else 'copies'}): rank 0 holds {counts['params_rank']} of "
              f"{counts['params']} parameters", file=sys.stderr)
    return model


def _world(env) -> tuple[int, int]:
    """(the workers sharing the batches, this rank's): the ranks, or their tensor-parallel groups."""
    if env is None:
        return 1, 0
    split = env.model_split.size if env.model_split is not None else 1
    return env.world_size // split, env.rank // split


def _hands_on(env) -> bool:
    """Whether this rank's results count: every rank's, or the first of each tensor-parallel group's
    (its other ranks made the same)."""
    return env is None or env.model_split is None or env.model_split.rank == 0


def rank_batches(n_items: int, batch_size: int, env) -> tuple[range, int]:
    """(the first item of each of this rank's batches of ``batch_size`` items, the number of rounds):
    batch b goes to worker ``b % workers`` (``_world``: a rank, or a tensor-parallel group, whose
    ranks all take it); a worker out of batches in the last round takes none."""
    world, rank = _world(env)
    starts = range(0, n_items, batch_size)
    return starts[rank::world], -(-len(starts) // world)


def batch_rounds(n_items: int, batch_size: int, env, sharded: bool = False) -> list[int | None]:
    """This rank's batches' first items (``rank_batches``), one per forward it runs; with ``sharded``
    (the model sharded by FSDP: each forward gathers every layer from all ranks, so every rank must
    run as many) a None for a padding forward in a last round this rank has no batch in."""
    starts, rounds = rank_batches(n_items, batch_size, env)
    return [*starts, *[None] * (rounds - len(starts) if sharded else 0)]


def gathered(env, items: list) -> list:
    """Every worker's ``items`` of one round on rank 0, in rank order (elsewhere: an empty list); as is
    in one process."""
    if env is None or env.world_size == 1:
        return items
    import torch.distributed as dist

    every = [None] * env.world_size if env.rank == 0 else None
    dist.gather_object(items if _hands_on(env) else [], every, dst=0)
    return [x for part in every for x in part] if env.rank == 0 else []


def every_batch(env, mine: list) -> list:
    """On every rank, every batch's result in batch order, from each worker's results ``mine`` of its
    batches (``rank_batches``' order)."""
    world, _ = _world(env)
    if env is None or env.world_size == 1:
        return mine
    import torch.distributed as dist

    every = [None] * env.world_size
    dist.all_gather_object(every, mine if _hands_on(env) else [])
    every = every[::env.world_size // world]  # (each worker's: its first rank's)
    # (batch b is worker b % world's (b // world)-th)
    return [every[b % world][b // world] for b in range(sum(len(part) for part in every))]


def summed(env, values: torch.Tensor) -> torch.Tensor:
    """``values`` (float64) summed over the workers (``_world``); as is in one process."""
    if env is None or env.world_size == 1:
        return values
    import torch.distributed as dist

    out = values.to(env.device) if _hands_on(env) else torch.zeros_like(values, device=env.device)
    dist.all_reduce(out)
    return out.cpu()
