"""Data mixtures: training sequences drawn from several sources in set proportions (``--data-weights``).

Each ``--data`` path is a source with its own token stream (and token-cache entry), cut into
sequences as usual. A *mix epoch* has as many slots as all sources have sequences together, ``M``;
source ``s`` gets ``k_s`` of them in proportion to its weight (largest remainders; at least one for a
positive weight), so a source with a bigger share than its size is repeated and a smaller one is
subsampled. Each mix epoch lays its slots out in a fresh seeded order; the ``j``-th slot of source
``s`` over the whole run reads that source's sequences in their own seeded per-pass permutations.

Everything follows from the number of sequences consumed (``position``), as for ``BatchStream``: a
resumed run replays the same batches, and every rank of a torchrun job draws the same global batch.
Memory: 6 bytes per slot of the current mix epoch's layout (plus the transient permutation).
"""

from __future__ import annotations

import math

import torch

from .data import sequences


def slot_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """Slots per source in a mix epoch of ``sum(sizes)`` slots, split in proportion to ``weights``
    by largest remainders, every source with a positive weight getting at least one."""
    total, wsum = sum(sizes), sum(weights)
    exact = [total * w / wsum for w in weights]
    counts = [max(1 if w > 0 else 0, math.floor(x)) for x, w in zip(exact, weights)]
    # hand out (or take back) the rest by remainder, largest first (ties: the earlier source)
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    i = 0
    while sum(counts) < total:
        counts[order[i % len(order)]] += 1
        i += 1
    while sum(counts) > total:  # only when the at-least-one rule overshot: take from the largest
        big = max(range(len(counts)), key=lambda j: (counts[j], -j))
        counts[big] -= 1
    return counts


class Mixture:
    """The training sequences of several token streams with ``weights``: ``len()`` is one mix epoch
    (all sources' sequences together); ``mixture[index]`` stacks the rows of global ``index``es
    (source ``s``'s row ``r`` is ``offsets[s] + r``), as a ``[n, seq_len + 1]`` tensor does."""

    def __init__(self, streams: list[torch.Tensor], weights: list[float], seq_len: int, names: list[str]):
        if not (len(streams) == len(weights) == len(names)) or not streams:
            raise ValueError(f"--data-weights: {len(weights)} weight(s) for {len(names)} --data path(s); "
                             f"expected one weight per path")
        if any(not (w >= 0 and math.isfinite(w)) for w in weights) or not sum(weights) > 0:
            raise ValueError(f"--data-weights {' '.join(map(str, weights))}: expected finite weights >= 0, "
                             f"not all 0")
        self.parts = [sequences(t, seq_len) for t in streams]
        for name, part, t in zip(names, self.parts, streams):
            if len(part) == 0:
                raise ValueError(f"{name}: {t.numel()} tokens; expected at least {seq_len + 1} for one sequence "
                                 f"of --seq-len {seq_len}")
        self.names, self.weights = list(names), list(weights)
        self.n_tokens = sum(t.numel() for t in streams)
        self.sizes = [len(p) for p in self.parts]
        self.offsets = [0]
        for n in self.sizes[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.slots = slot_counts(self.sizes, self.weights)
        self.n = sum(self.sizes)
        self.shape = (self.n, seq_len + 1)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        index = torch.as_tensor(index).reshape(-1)
        source = torch.searchsorted(torch.tensor(self.offsets), index, right=True) - 1
        return torch.stack([self.parts[s][i - self.offsets[s]] for s, i in zip(source.tolist(), index.tolist())])

    def stream(self, seed: int = 0) -> "MixtureStream":
        return MixtureStream(self, seed)

    def describe(self, sequences_drawn: int) -> list[dict]:
        """Per source: its weight, sequences and how many passes over it ``sequences_drawn`` make."""
        return [{"path": name, "weight": w, "sequences": n, "epochs": round(sequences_drawn * k / self.n / n, 3)}
                for name, w, n, k in zip(self.names, self.weights, self.sizes, self.slots)]


class MixtureStream:
    """``BatchStream`` for a ``Mixture``: ``next(count)`` gives global row indices, ``position`` counts
    the sequences drawn (the only state)."""

    def __init__(self, mixture: Mixture, seed: int = 0, position: int = 0):
        self.mixture, self.seed, self.position = mixture, seed, position
        self.n = mixture.n
        self._layout_epoch, self._layout = -1, None
        self._perms: dict[int, tuple[int, torch.Tensor]] = {}  # source -> (pass, permutation)

    def _epoch_layout(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(source of each slot, its ordinal among that source's slots) for mix epoch ``epoch``."""
        if epoch != self._layout_epoch:
            m = self.mixture
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + 7_919 * epoch + 1)
            source = torch.repeat_interleave(torch.arange(len(m.slots)), torch.tensor(m.slots))
            source = source[torch.randperm(self.n, generator=g)]
            order = torch.argsort(source, stable=True)
            starts = torch.tensor([0, *torch.tensor(m.slots).cumsum(0).tolist()[:-1]])
            ordinal = torch.empty(self.n, dtype=torch.int32)
            ordinal[order] = (torch.arange(self.n) - starts[source[order]]).to(torch.int32)
            self._layout, self._layout_epoch = (source.to(torch.int16), ordinal), epoch
        return self._layout

    def _row(self, s: int, j: int) -> int:
        """Source ``s``'s row for its ``j``-th draw of the run: per-pass seeded permutations."""
        n = self.mixture.sizes[s]
        p, i = divmod(j, n)
        if self._perms.get(s, (None,))[0] != p:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + p) * 104_729 + s + 2)
            self._perms[s] = (p, torch.randperm(n, generator=g))
        return int(self._perms[s][1][i])

    def next(self, count: int) -> torch.Tensor:
        out = torch.empty(count, dtype=torch.int64)
        m = self.mixture
        for k in range(count):
            epoch, r = divmod(self.position + k, self.n)
            source, ordinal = self._epoch_layout(epoch)
            s = int(source[r])
            out[k] = m.offsets[s] + self._row(s, epoch * m.slots[s] + int(ordinal[r]))
        self.position += count
        return out

    @property
    def epoch(self) -> float:
        return self.position / self.n
