"""Context parallelism: each sequence split over a group of ranks, for sequences too long for one.

    torchrun --nproc_per_node=8 -m apr_kernels train ... --seq-len 131072 --context-parallel 4

The ``N`` ranks of a context-parallel group train on the same rows; each holds ``T / N`` of every
row's positions. Everything but attention is per token, so it runs on the local positions as it
is; attention needs every earlier key. The layout and the exchange are Llama 3's (Meta, 2024,
section 3.3.2), which suits grouped-query attention:

* Zigzag split (load balance under the causal mask): a row of T tokens is cut into 2N chunks of
  C = T / 2N and rank r holds chunks r and 2N - 1 - r, so every rank has one early and one late
  chunk and the same number of query-key pairs to compute.
* K/V all-gather: each layer all-gathers the rotated K and V of the local positions in one
  collective (side by side; Hkv heads, a small fraction of the activations under GQA: Qwen2-0.5B's
  are 1/7 of Q's each) and each local chunk
  c attends to the keys of chunks 0..c with causal attention of Sq = C queries against Sk = (c+1)C
  keys, bottom-right aligned (``apr_kernels.attention``'s prefix form; the Triton kernels on the
  fast path, masked SDPA on the eager path). The backward reduce-scatters dK/dV back to the ranks
  that own those positions (a functional collective: ``torch.compile`` traces it).
* RoPE uses each token's global position; the loss of a rank is the sum over its own positions,
  and the trainer's gradient all-reduce over every rank (DDP/FSDP over data x context ranks) sums
  the groups' contributions like any other split of the tokens.
* Document masking (``Documents`` of the whole rows, which every rank of the group has): RoPE at
  each token's position in its document, and each chunk's queries packed by document against the
  keys of the same document up to the chunk's end (``attention(..., cu_seqlens=, cu_seqlens_k=)``,
  bottom-right per document; the eager path: SDPA with the same-document causal mask). The spans
  are worked out on the host once per forward (one small device read on CUDA).

Groups are consecutive ranks (on one node, so the all-gathers ride NVLink); the data-parallel share
of a batch goes to ``rank // N``. A distillation teacher (whole on every rank) reads the whole rows;
each rank takes its positions of the teacher's hidden states (``Trainer``).
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

import torch
import torch.nn.functional as F


class ChunkDocuments(NamedTuple):
    """Document masking of one local chunk (C queries of each of B rows) against its prefix of keys.
    Fast path: the chunk's queries ``[B*C]`` split by ``cu_q`` into per-document runs, each against
    the run of gathered keys ``keys`` (indices into the ``[B*T]`` keys) that ``cu_k`` delimits: the
    same document's keys up to the chunk's end. Eager path: ``mask`` ``[B, 1, C, end]`` (True: may
    attend) over the first ``end`` gathered keys."""

    cu_q: torch.Tensor | None
    cu_k: torch.Tensor | None
    max_q: int
    max_k: int
    keys: torch.Tensor | None
    mask: torch.Tensor | None


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

    def documents(self, documents, B: int, T: int, fast: bool):
        """``(per-chunk ChunkDocuments, this rank's tokens' positions in their documents [B * 2C])`` of
        ``documents`` (``model/documents.py``'s spans of the whole ``[B, T]`` rows)."""
        C = self.check_length(T)
        doc, pos = documents.token_index(B * T)
        doc = doc.view(B, T)
        local_pos = self.shard(pos.view(B, T)).reshape(-1)
        bounds = documents.cu_seqlens.tolist()  # (on CUDA one small device read per forward)
        dev = documents.cu_seqlens.device
        chunks = []
        for c in self.chunks:
            start, end = c * C, (c + 1) * C
            if not fast:
                from apr_kernels.model.transformer import window_mask

                visible = window_mask(C, end, dev, offset=start)  # causal (a layer's window: at the call)
                same = doc[:, start:end, None] == doc[:, None, :end]
                chunks.append(ChunkDocuments(None, None, 0, 0, None, (same & visible)[:, None]))
                continue
            nq, nk, keys = [0], [0], []
            for b in range(B):
                lo, hi = b * T + start, b * T + end  # the chunk's tokens in the flat [B*T] order
                first = bisect.bisect_right(bounds, lo) - 1  # the document holding the chunk's first token
                keys.append(torch.arange(bounds[first], hi, device=dev))
                d = first
                while d + 1 < len(bounds) and bounds[d] < hi:
                    s_, e_ = bounds[d], min(bounds[d + 1], hi)
                    nq.append(nq[-1] + e_ - max(s_, lo))
                    nk.append(nk[-1] + e_ - s_)
                    d += 1
            q_len = [b - a for a, b in zip(nq[:-1], nq[1:])]
            k_len = [b - a for a, b in zip(nk[:-1], nk[1:])]
            chunks.append(ChunkDocuments(torch.tensor(nq, dtype=torch.int32, device=dev),
                                         torch.tensor(nk, dtype=torch.int32, device=dev), max(q_len, default=0),
                                         max(k_len, default=0), torch.cat(keys), None))
        return chunks, local_pos

    # ----------------------------------------------------------------------- K/V exchange
    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` ``[B, 2C, ...]`` put together in position order ``[B, 2NC, ...]``;
        differentiable: the backward reduce-scatters, summing each rank's gradient into the positions'
        owner. Functional collectives (traceable: the layers compile with it inside)."""
        if self.size == 1:
            return t
        from torch.distributed import _functional_collectives as funcol

        from .distributed import collective

        gather = collective("all_gather_single_autograd", "all_gather_tensor_autograd")
        per_rank = gather(t.contiguous()[None], 0, self.group)  # [N, B, 2C, ...]
        return self.to_global(funcol.wait_tensor(per_rank))

    def to_global(self, per_rank: torch.Tensor) -> torch.Tensor:
        """``[N, B, 2C, ...]`` (rank n's chunks n and 2N-1-n at n) -> ``[B, 2NC, ...]`` in position order."""
        N, B, L = per_rank.shape[:3]
        x = per_rank.reshape(N, B, 2, L // 2, *per_rank.shape[3:])
        chunks = torch.cat([x[:, :, 0], x.flip(0)[:, :, 1]], 0)  # [2N, B, C, ...], chunk j at j
        return chunks.movedim(0, 1).reshape(B, N * L, *per_rank.shape[3:])

    # ----------------------------------------------------------------------------- attention
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, fast: bool,
                  window: int | None, scale: float, documents: list | None = None) -> torch.Tensor:
        """Causal attention of the local queries ``[B, 2C, Hq, D]`` (rotated at their global
        positions) over all earlier positions of the group; k, v: the local ``[B, 2C, Hkv, D]``.
        ``documents``: the chunks' :class:`ChunkDocuments` (only the same document's keys)."""
        # one collective for both (K and V side by side along head_dim), not two
        k_all, v_all = self.gather(torch.cat([k, v], -1)).split([k.shape[-1], v.shape[-1]], -1)
        C = q.shape[1] // 2
        out = []
        for i, c in enumerate(self.chunks):
            qc = q[:, i * C:(i + 1) * C]
            end = (c + 1) * C
            if documents is not None:
                out.append(self._document_attention(qc, k_all, v_all, documents[i], end, fast, window, scale))
                continue
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

    @staticmethod
    def _document_attention(qc, k_all, v_all, lay: ChunkDocuments, end: int, fast: bool, window, scale):
        B, C, HQ, D = qc.shape
        if fast:
            from apr_kernels.ops.attention import attention

            kc, vc = (t.flatten(0, 1)[lay.keys] for t in (k_all, v_all))
            o = attention(qc.reshape(B * C, HQ, D), kc, vc, causal=True, scale=scale, window=window,
                          cu_seqlens=lay.cu_q, max_seqlen=lay.max_q, cu_seqlens_k=lay.cu_k, max_seqlen_k=lay.max_k)
            return o.view(B, C, HQ, D)
        kc, vc = k_all[:, :end], v_all[:, :end]
        mask = lay.mask
        if window is not None:
            from apr_kernels.model.transformer import window_mask

            mask = mask & window_mask(C, window, qc.device, offset=end - C)
        return F.scaled_dot_product_attention(
            qc.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), attn_mask=mask, scale=scale,
            enable_gqa=HQ != kc.shape[2]).transpose(1, 2)


def groups(world_size: int, size: int, rank: int, stride: int = 1):
    """Create the context-parallel groups of ``size`` consecutive ranks (every rank must call this,
    in the same order) and return this rank's :class:`ContextParallel`. ``stride`` N: ranks N apart,
    around tensor-parallel groups of N consecutive ranks (each block of ``size * N`` ranks shares rows)."""
    if size < 1 or world_size % (size * stride):
        raise ValueError(f"--context-parallel {size} does not divide the world size {world_size}"
                         + (f" / --tensor-parallel {stride}" if stride > 1 else "")
                         + f"; expected a divisor (the ranks form data-parallel groups of {size * stride})")
    from .distributed import rank_groups

    group, index, _ = rank_groups(world_size, size, rank, replicas="none", stride=stride)
    return ContextParallel(group, index, size)
