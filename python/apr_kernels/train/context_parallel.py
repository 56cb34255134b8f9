"""Context parallelism: each sequence split over a group of ranks, for sequences too long for one.

    torchrun --nproc_per_node=8 -m apr_kernels train ... --seq-len 131072 --context-parallel 4

The ``N`` ranks of a context-parallel group train on the same rows; each holds ``T / N`` of every
row's positions. Everything but attention is per token, so it runs on the local positions as it
is; attention needs every earlier key. The layout and the exchange are Llama 3's (Meta, 2024,
section 3.3.2), which suits grouped-query attention:

* Zigzag split (load balance under the causal mask): a row of T tokens is cut into 2N chunks of
  C = T / 2N and rank r holds chunks r and 2N - 1 - r, so every rank has one early and one late
  chunk and the same number of query-key pairs to compute.
* K/V all-gather: each layer all-gathers the rotated K and V of the local positions (Hkv heads, a
  small fraction of the activations under GQA: Qwen2-0.5B's are 1/7 of Q's) and each local chunk
  c attends to the keys of chunks 0..c with causal attention of Sq = C queries against Sk = (c+1)C
  keys, bottom-right aligned (``apr_kernels.attention``'s prefix form; the Triton kernels on the
  fast path, masked SDPA on the eager path). The backward reduce-scatters dK/dV back to the ranks
  that own those positions.
* RoPE uses each token's global position; the loss of a rank is the sum over its own positions,
  and the trainer's gradient all-reduce over every rank (DDP/FSDP over data x context ranks) sums
  the groups' contributions like any other split of the tokens.

Groups are consecutive ranks (on one node, so the all-gathers ride NVLink); the data-parallel share
of a batch goes to ``rank // N``. Not with document masking (the packed spans would cross chunks)
or a distillation teacher (the teacher would need the same split).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class ContextParallel:
    """This rank's place in its context-parallel group: ``size`` ranks, ``rank`` within them."""

    def __init__(self, group, rank: int, size: int):
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"context parallel: rank {rank} of a group of {size}; expected 0 <= rank < size")
        self.group, self.rank, self.size = group, rank, size

    # ------------------------------------------------------------------------------ the split
    @property
    def chunks(self) -> tuple[int, int]:
        """The global indices of this rank's two chunks (of 2 * size)."""
        return self.rank, 2 * self.size - 1 - self.rank

    def check_length(self, T: int, what: str = "sequence length") -> int:
        """The chunk length C of rows of ``T`` tokens; ValueError unless 2 * size divides T."""
        if T % (2 * self.size):
            raise ValueError(f"context parallel over {self.size} ranks: {what} {T} is not a multiple of "
                             f"{2 * self.size} (2 x --context-parallel: each rank holds two equal chunks)")
        return T // (2 * self.size)

    def shard(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's positions of ``t`` (whole rows along ``dim``): chunks r and 2N - 1 - r."""
        C = self.check_length(t.shape[dim])
        a, b = self.chunks
        return torch.cat([t.narrow(dim, a * C, C), t.narrow(dim, b * C, C)], dim)

    def positions(self, local_len: int, device=None) -> torch.Tensor:
        """Global positions ``[local_len]`` of this rank's tokens (for RoPE)."""
        C = local_len // 2
        a, b = self.chunks
        return torch.cat([torch.arange(a * C, (a + 1) * C, device=device),
                          torch.arange(b * C, (b + 1) * C, device=device)])

    def global_length(self, local_len: int) -> int:
        return local_len * self.size

    # ----------------------------------------------------------------------- K/V exchange
    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` ``[B, 2C, ...]`` put together in position order ``[B, 2NC, ...]``;
        differentiable (the backward sums each rank's gradient into the positions' owner)."""
        if self.size == 1:
            return t
        return _GatherSequence.apply(t, self)

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """``[N, *t.shape]``: rank n's ``t`` at n."""
        t = t.contiguous()
        out = torch.empty((self.size,) + tuple(t.shape), dtype=t.dtype, device=t.device)
        if dist.get_backend(self.group) == "nccl":
            dist.all_gather_into_tensor(out, t, group=self.group)
        else:  # gloo has no all_gather_into_tensor
            dist.all_gather(list(out.unbind(0)), t, group=self.group)
        return out

    def _reduce_scatter(self, per_rank: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of ``per_rank[n]`` for this rank n (``per_rank`` ``[N, ...]``)."""
        per_rank = per_rank.contiguous()
        if dist.get_backend(self.group) == "nccl":
            out = torch.empty(per_rank.shape[1:], dtype=per_rank.dtype, device=per_rank.device)
            dist.reduce_scatter_tensor(out, per_rank, group=self.group)
            return out
        dist.all_reduce(per_rank, group=self.group)  # gloo has no reduce_scatter
        return per_rank[self.rank]

    def to_global(self, per_rank: torch.Tensor) -> torch.Tensor:
        """``[N, B, 2C, ...]`` (rank n's chunks n and 2N-1-n at n) -> ``[B, 2NC, ...]`` in position order."""
        N, B, L = per_rank.shape[:3]
        x = per_rank.reshape(N, B, 2, L // 2, *per_rank.shape[3:])
        chunks = torch.cat([x[:, :, 0], x.flip(0)[:, :, 1]], 0)  # [2N, B, C, ...], chunk j at j
        return chunks.movedim(0, 1).reshape(B, N * L, *per_rank.shape[3:])

    def to_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_global`: ``[B, 2NC, ...]`` -> ``[N, B, 2C, ...]``."""
        N, B = self.size, t.shape[0]
        chunks = t.reshape(B, 2 * N, t.shape[1] // (2 * N), *t.shape[2:]).movedim(1, 0)  # [2N, B, C, ...]
        per_rank = torch.stack([chunks[:N], chunks[N:].flip(0)], 2)  # [N, B, 2, C, ...]
        return per_rank.reshape(N, B, -1, *t.shape[2:])

    # ----------------------------------------------------------------------------- attention
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, fast: bool,
                  window: int | None, scale: float) -> torch.Tensor:
        """Causal attention of the local queries ``[B, 2C, Hq, D]`` (rotated at their global
        positions) over all earlier positions of the group; k, v: the local ``[B, 2C, Hkv, D]``."""
        k_all, v_all = self.gather(k), self.gather(v)
        C = q.shape[1] // 2
        out = []
        for i, c in enumerate(self.chunks):
            qc = q[:, i * C:(i + 1) * C]
            end = (c + 1) * C
            first = 0 if window is None else max(0, end - C - window + 1)  # keys no query of the chunk sees
            kc, vc = k_all[:, first:end], v_all[:, first:end]
            if fast:
                from apr_kernels.ops.attention import attention

                out.append(attention(qc, kc, vc, causal=True, scale=scale, window=window))
            else:
                from apr_kernels.model.transformer import window_mask

                reach = window if window is not None else end
                mask = window_mask(C, reach, q.device, offset=end - C)[:, first:]
                out.append(F.scaled_dot_product_attention(
                    qc.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), attn_mask=mask, scale=scale,
                    enable_gqa=q.shape[2] != k.shape[2]).transpose(1, 2))
        return torch.cat(out, 1)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, cp):
        ctx.cp = cp
        return cp.to_global(cp._all_gather(t))

    @staticmethod
    def backward(ctx, grad):
        cp = ctx.cp
        return cp._reduce_scatter(cp.to_ranks(grad)), None


def groups(world_size: int, size: int, rank: int):
    """Create the context-parallel groups of ``size`` consecutive ranks (every rank must call this,
    in the same order) and return this rank's :class:`ContextParallel`."""
    if size < 1 or world_size % size:
        raise ValueError(f"--context-parallel {size} does not divide the world size {world_size}; expected "
                         f"a divisor (the ranks form world / {size} data-parallel groups of {size})")
    mine = None
    for first in range(0, world_size, size):
        g = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = ContextParallel(g, rank - first, size)
    return mine
