"""Pre-tokenised shards read in place: one token stream made of memory-mapped files, never joined.

aprender's corpus format (``data.py``: little-endian u32 ids, shards read in sorted order) is
already the int32 stream the trainer wants, since every id is below the vocabulary (checked here)
and so below 2**31. Copying it into the token cache would store the corpus twice and write it all
before the first step; instead each uncompressed shard is mapped (``torch.from_file``, a private
mapping: no file descriptor kept, nothing read until touched, one page cache for every rank of the
machine) and the pieces stand for their concatenation:

* ``SegmentedTokens`` is the stream: ``numel()``, and ``[a:b]`` slices that are views (a plain
  tensor when the slice lies in one shard, else another ``SegmentedTokens``).
* ``SegmentedRows`` is ``data.sequences`` of it: row ``i`` is ``stream[i*T : i*T + T + 1]``, exactly as
  for one tensor (rows that cross a shard boundary are stitched), and indexing it with row numbers
  gathers just those rows. The training loop, mixtures and evaluation index rows and never need the
  stream whole.

Like the APR loader's, each mapping is private and writable, so it counts against ``ulimit -v`` and
strict overcommit's commit limit; a refused one is an OSError naming the shard and those limits.

Only a source whose files are all uncompressed shards is read this way (``map_shards`` returns
None otherwise): gzip-compressed shards, and shards mixed with text, go through the tokenizer path
and its cache as before. A big-endian host would need a byte swap, so it does too.
"""

from __future__ import annotations

import bisect
import os
import sys
from pathlib import Path

import torch

CHECK_TOKENS = 1 << 24  # ids checked against the vocabulary this many at a time (64 MiB of a shard)


class SegmentedTokens:
    """An int32 token stream held as consecutive 1-D pieces (views of mapped shards)."""

    dtype = torch.int32

    def __init__(self, pieces: list[torch.Tensor]):
        self.pieces = [p for p in pieces if p.numel()]
        self.starts = [0]  # where each piece starts in the stream, and the stream's end
        for p in self.pieces:
            self.starts.append(self.starts[-1] + p.numel())

    def numel(self) -> int:
        return self.starts[-1]

    def __len__(self) -> int:
        return self.numel()

    def __repr__(self) -> str:
        return f"SegmentedTokens({self.numel()} tokens in {len(self.pieces)} pieces)"

    def __getitem__(self, key: slice) -> "torch.Tensor | SegmentedTokens":
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"SegmentedTokens[{key!r}]: expected a slice [a:b] of the stream")
        a, b, _ = key.indices(self.numel())
        b = max(a, b)
        first = max(0, bisect.bisect_right(self.starts, a) - 1)
        parts = []
        for i in range(first, len(self.pieces)):
            lo, hi = self.starts[i], self.starts[i + 1]
            if lo >= b:
                break
            parts.append(self.pieces[i][max(a, lo) - lo: min(b, hi) - lo])
        if len(parts) == 1:
            return parts[0]  # (a view of one shard)
        return SegmentedTokens(parts) if parts else torch.empty(0, dtype=self.dtype)

    def take(self, positions: torch.Tensor) -> torch.Tensor:
        """The tokens at ``positions`` (int64, any shape), gathered piece by piece."""
        flat = positions.reshape(-1)
        piece = torch.searchsorted(torch.tensor(self.starts[1:]), flat, right=True)
        out = torch.empty(flat.shape, dtype=self.dtype)
        for i in piece.unique().tolist():
            at = (piece == i).nonzero().squeeze(1)
            out[at] = self.pieces[i][flat[at] - self.starts[i]]
        return out.reshape(positions.shape)

    def tensor(self) -> torch.Tensor:
        """The stream joined into one tensor (a copy: for what needs it whole, e.g. record packing)."""
        return torch.cat(self.pieces) if self.pieces else torch.empty(0, dtype=self.dtype)

    def sequences(self, seq_len: int) -> "SegmentedRows":
        return SegmentedRows(self, seq_len)


class SegmentedRows:
    """``data.sequences`` of a ``SegmentedTokens``: ``[n, seq_len + 1]`` rows, consecutive rows sharing
    one token, read from the pieces when indexed. ``rows[i]`` (an int) is one row; ``rows[index]``
    (row numbers) and ``rows[a:b]`` are ``[k, seq_len + 1]`` tensors."""

    def __init__(self, stream: SegmentedTokens, seq_len: int):
        from .data import num_sequences

        self.stream, self.seq_len = stream, seq_len
        self.n = num_sequences(stream.numel(), seq_len)
        self.shape = (self.n, seq_len + 1)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, slice):
            a, b, step = key.indices(self.n)
            index = torch.arange(a, b, step)
        elif isinstance(key, int):
            return self[torch.tensor([key])][0]
        else:
            index = torch.as_tensor(key, dtype=torch.int64)
        if index.numel() and (int(index.min()) < -self.n or int(index.max()) >= self.n):
            raise IndexError(f"row index out of range for {self.n} sequences")
        index = torch.where(index < 0, index + self.n, index)
        positions = index.reshape(-1, 1) * self.seq_len + torch.arange(self.seq_len + 1)
        return self.stream.take(positions).reshape(*index.shape, self.seq_len + 1)


def in_place(files: list[Path]) -> bool:
    """Whether ``files`` can be read as a ``SegmentedTokens``: all uncompressed shards, little-endian host."""
    from .data import TOKEN_SUFFIX

    return bool(files) and sys.byteorder == "little" and all(Path(f).name.endswith(TOKEN_SUFFIX) for f in files)


def map_shards(files: list[Path], vocab_size: int | None = None,
               max_tokens: int | None = None) -> "torch.Tensor | SegmentedTokens":
    """The stream of the shards ``files`` (``in_place``), each mapped and its ids checked to be below
    ``vocab_size`` (2**31 when None); the first ``max_tokens`` of it when given. ValueError naming the
    file: a size that is no whole number of ids, an id out of range (with its position)."""
    pieces, total = [], 0
    for path in files:
        if max_tokens is not None and total >= max_tokens:
            break
        size = os.path.getsize(path)
        if size % 4:
            from .data import shard_size_error

            raise shard_size_error(path, size)
        n = size // 4
        if max_tokens is not None:
            n = min(n, max_tokens - total)
        if n == 0:
            continue
        try:
            ids = torch.from_file(os.fspath(path), shared=False, size=n, dtype=torch.int32)
        except RuntimeError as exc:  # (torch's "unable to mmap ... Cannot allocate memory (12)")
            if "(12)" not in str(exc):
                raise OSError(f"{path}: could not map the shard: {exc}") from None
            from apr_kernels.io import mapping_refused

            raise mapping_refused(os.fspath(path), 4 * n) from None
        check_ids(ids, path, vocab_size)
        pieces.append(ids)
        total += n
    stream = SegmentedTokens(pieces)
    return stream.pieces[0] if len(stream.pieces) == 1 else stream


def check_ids(ids: torch.Tensor, path, vocab_size: int | None) -> None:
    """Every id of a mapped shard (int32: a u32 id of 2**31 or more reads negative) is in range."""
    from .data import shard_id_error, shard_id_limit

    limit = shard_id_limit(vocab_size)
    for start in range(0, ids.numel(), CHECK_TOKENS):
        chunk = ids[start:start + CHECK_TOKENS]
        if int(chunk.min()) >= 0 and int(chunk.max()) < limit:
            continue
        bad = chunk < 0 if limit == 1 << 31 else (chunk < 0) | (chunk >= limit)  # (2**31 is no int32 scalar)
        i = int(bad.nonzero()[0, 0])
        raise shard_id_error(path, start + i, int(chunk[i]) % (1 << 32), vocab_size)
