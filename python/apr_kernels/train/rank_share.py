"""The commands that only read a model (``generate --prompts``, ``eval``) under torchrun: data
parallelism without training. Each rank holds a whole copy of the model (and of any reward model)
and takes every N-th batch of the work (``rank_batches``: batch b on rank ``b % N``), so in round r
the ranks hold batches ``r N .. r N + N - 1`` in rank order; rank 0 gathers what each rank made
(``gathered``, ``every_batch``) or the sums (``summed``) and alone writes or prints. Each batch is
the one a single process runs (the same records, the same per-record seeds), so the results are one
process's, up to the order sums are taken in.
"""

from __future__ import annotations

import torch


def on_ranks(args, body, refuse: str | None = None) -> int:
    """``body(device, env)``: in one process (``env`` None), or under torchrun inside its process group
    on each rank's device (``env``). ``refuse``: the request has nothing to share among the ranks;
    under torchrun this message is raised (before any process group) instead."""
    from . import distributed
    from .cli import pick_device

    if not distributed.launched():
        return body(pick_device(args.device), None)
    if refuse is not None:
        raise ValueError(refuse)
    return distributed.run(args, lambda env, mode: body(env.device, env))


def _world(env) -> tuple[int, int]:
    return (env.world_size, env.rank) if env is not None else (1, 0)


def rank_batches(n_items: int, batch_size: int, env) -> tuple[range, int]:
    """(the first item of each of this rank's batches of ``batch_size`` items, the number of rounds):
    batch b goes to rank ``b % world``; a rank out of batches in the last round takes none."""
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
    """Every rank's ``items`` of one round on rank 0, in rank order (elsewhere: an empty list); as is
    in one process."""
    world, rank = _world(env)
    if world == 1:
        return items
    import torch.distributed as dist

    every = [None] * world if rank == 0 else None
    dist.gather_object(items, every, dst=0)
    return [x for part in every for x in part] if rank == 0 else []


def every_batch(env, mine: list) -> list:
    """On every rank, every batch's result in batch order, from each rank's results ``mine`` of its
    batches (``rank_batches``' order)."""
    world, _ = _world(env)
    if world == 1:
        return mine
    import torch.distributed as dist

    every = [None] * world
    dist.all_gather_object(every, mine)
    # (batch b is rank b % world's (b // world)-th)
    return [every[b % world][b // world] for b in range(sum(len(part) for part in every))]


def summed(env, values: torch.Tensor) -> torch.Tensor:
    """``values`` (float64) summed over the ranks; as is in one process."""
    if _world(env)[0] == 1:
        return values
    import torch.distributed as dist

    out = values.to(env.device)
    dist.all_reduce(out)
    return out.cpu()
