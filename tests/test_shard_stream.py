"""Pre-tokenised shards read in place (train/shard_stream.py): the mapped pieces stand for their
concatenation (the reference: the same ids joined into one tensor with numpy), rows are the rows of
the joined stream, and nothing is copied."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apr_kernels.train import shard_stream
from apr_kernels.train.data import eval_sequences, pack_records, sequences, split_holdout, token_stream
from apr_kernels.train.mixture import Mixture
from apr_kernels.train.shard_stream import SegmentedTokens, map_shards


class Vocab:
    vocab_size = 1000


def write(folder, sizes, seed=0):
    """Shards of ``sizes`` random ids < 1000 in ``folder``; returns (their files, the joined ids)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    files, joined = [], []
    for i, n in enumerate(sizes):
        ids = rng.integers(0, 1000, n).astype("<u4")
        path = folder / f"shard-{i:05d}.bin"
        ids.tofile(path)
        files.append(path)
        joined.append(ids)
    return files, torch.from_numpy(np.concatenate(joined).astype(np.int32))


def test_rows_are_the_joined_streams_rows(tmp_path):
    files, joined = write(tmp_path / "c", [5, 1, 0, 40, 3, 2, 60])  # rows crossing one, two and three shards
    stream = map_shards(files, Vocab.vocab_size)
    assert isinstance(stream, SegmentedTokens) and stream.numel() == joined.numel() == 111
    for seq_len in (4, 7, 16, 110):
        rows, want = sequences(stream, seq_len), sequences(joined, seq_len)
        assert rows.shape == tuple(want.shape) and len(rows) == len(want)
        every = torch.arange(len(want))
        assert torch.equal(rows[every], want)
        assert torch.equal(rows[every.flip(0)[:3]], want[every.flip(0)[:3]])
        assert torch.equal(rows[1:3], want[1:3]) and torch.equal(rows[-1], want[-1]) and torch.equal(rows[0], want[0])
    assert len(sequences(stream, 111)) == 0
    with pytest.raises(IndexError):
        sequences(stream, 4)[torch.tensor([27])]
    # slices of the stream are its views, joined only on request
    for a, b in ((0, 5), (3, 50), (6, 46), (100, 111), (46, 49), (50, 40)):
        part = stream[a:b]
        got = part if isinstance(part, torch.Tensor) else part.tensor()
        assert torch.equal(got, joined[a:b])
    assert isinstance(stream[6:46], torch.Tensor)  # (within one shard: a view of it)


def test_holdout_mixture_packing_and_eval_take_segments_as_the_joined_stream(tmp_path):
    files, joined = write(tmp_path / "c", [30, 17, 53, 1, 99], seed=1)
    stream = map_shards(files, Vocab.vocab_size)
    train, tail = split_holdout(stream, 8, 0.2)
    want_train, want_tail = split_holdout(joined, 8, 0.2)
    assert isinstance(tail, torch.Tensor) and torch.equal(tail, want_tail)
    assert torch.equal(sequences(train, 8)[torch.arange(len(sequences(want_train, 8)))], sequences(want_train, 8))
    assert torch.equal(eval_sequences(stream, 8, 40), eval_sequences(joined, 8, 40))
    mixed, ref = Mixture([stream, joined[:50]], [1, 1], 8, ["a", "b"]), Mixture([joined, joined[:50]], [1, 1], 8, ["a", "b"])
    index = torch.tensor([0, 3, 24, 13, 25, 29])
    assert len(mixed) == len(ref) and torch.equal(mixed[index], ref[index])
    assert torch.equal(pack_records(stream, 8, 7), pack_records(joined, 8, 7))


def test_shards_are_mapped_not_copied_and_cut_at_max_tokens(tmp_path):
    files, joined = write(tmp_path / "c", [64, 64, 64], seed=2)
    stream = token_stream([*files], Vocab())
    assert isinstance(stream, SegmentedTokens)
    # the file changed after mapping shows through: the stream is the file's pages, not a copy
    with open(files[1], "r+b") as f:
        f.seek(4 * 10)
        f.write(np.array([777], dtype="<u4").tobytes())
    assert int(stream[74:75][0]) == 777
    cut = map_shards(files, Vocab.vocab_size, max_tokens=100)
    assert cut.numel() == 100 and torch.equal(cut.tensor()[:70], joined[:70])
    assert torch.equal(map_shards(files, None, max_tokens=10), joined[:10])  # (one shard: a plain view)
    # a compressed shard or a text file sends the source down the tokenizer path (and its cache)
    assert not shard_stream.in_place([*files, tmp_path / "x.bin.gz"]) and not shard_stream.in_place([])


def test_ids_out_of_range_and_torn_shards_name_the_file_and_position(tmp_path, monkeypatch):
    monkeypatch.setattr(shard_stream, "CHECK_TOKENS", 16)  # (the position counts across checked chunks)
    files, _ = write(tmp_path / "c", [100], seed=3)
    ids = np.fromfile(files[0], dtype="<u4")
    ids[57] = 1000
    ids.tofile(files[0])
    with pytest.raises(ValueError, match=r"shard-00000\.bin: token 57 is id 1000, not below the tokenizer's "
                                         r"vocabulary size 1000"):
        map_shards(files, 1000)
    ids[57], ids[90] = 5, 3_000_000_000  # (a u32 id past 2**31 reads negative as int32)
    ids.tofile(files[0])
    with pytest.raises(ValueError, match=r"token 90 is id 3000000000, not below 2\*\*31"):
        map_shards(files, None)
    files[0].write_bytes(ids.tobytes() + b"\x00")
    with pytest.raises(ValueError, match=r"shard-00000\.bin: 401 bytes is no whole number of token ids"):
        map_shards(files, 1000)
