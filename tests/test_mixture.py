"""Data mixtures (train/mixture.py): slot counts follow the weights, every mix epoch draws each source
exactly its share with no row repeated before its source is used up, the stream is a pure function
of its position (resume), and `train --data-weights` trains on the mixture and resumes exactly."""

import json
import sysconfig
from collections import Counter
from pathlib import Path

import pytest
import torch

from apr_kernels.train.mixture import Mixture, slot_counts

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.mark.parametrize("sizes,weights,want", [
    ([10, 30], [0.5, 0.5], [20, 20]),      # the small source repeated twice, the big one subsampled
    ([10, 30], [1, 3], [10, 30]),          # weights as the sizes: the plain concatenation's shares
    ([10, 30], [1, 0], [40, 0]),           # a zero weight: never drawn
    ([5, 5, 5], [1, 1, 1], [5, 5, 5]),
    ([7, 0, 6], [1, 1, 1], [5, 4, 4]),     # 13 slots, 13/3 each: remainders to the earlier sources
    ([100, 3], [1e-9, 1], [1, 102]),       # a positive weight gets at least one slot
])
def test_slot_counts_split_a_mix_epoch_by_weight(sizes, weights, want):
    assert slot_counts(sizes, weights) == want


def _mixture(sizes, weights, seq_len=4):
    """Sources whose tokens say where they are from: source s, row r holds 1000 * s + r."""
    streams = []
    for s, n in enumerate(sizes):
        rows = torch.arange(n, dtype=torch.int32).repeat_interleave(seq_len) + 1000 * s
        streams.append(torch.cat([rows, rows[-1:]]))  # n * seq_len + 1 tokens: exactly n sequences
    return Mixture(streams, weights, seq_len, [f"src{s}" for s in range(len(sizes))])


def test_each_mix_epoch_draws_every_source_its_share_without_early_repeats():
    m = _mixture([6, 18], [0.5, 0.5])
    assert m.slots == [12, 12] and len(m) == 24
    stream = m.stream(seed=3)
    for epoch in range(3):
        rows = m[stream.next(len(m))]
        first = rows[:, 0].tolist()
        by_source = Counter(t // 1000 for t in first)
        assert by_source == {0: 12, 1: 12}
        # the small source (6 rows, 12 slots): each row exactly twice per mix epoch
        assert Counter(t for t in first if t < 1000) == {r: 2 for r in range(6)}
        assert (rows[:, :-1] == rows[:, :1]).all()  # each a whole row of its source (the last token is shared)
    # the big one (18 rows, 12 slots per epoch): no row twice until all 18 were drawn
    drawn = [t - 1000 for t in m[m.stream(seed=3).next(36)][:, 0].tolist() if t >= 1000]
    assert sorted(drawn[:18]) == list(range(18))


def test_the_stream_is_a_function_of_its_position():
    m = _mixture([5, 9, 3], [0.2, 0.5, 0.3])
    whole = m.stream(seed=11).next(40)
    part = m.stream(seed=11)
    part.next(17)
    resumed = m.stream(seed=11)
    resumed.position = 17
    assert torch.equal(resumed.next(23), whole[17:]) and torch.equal(part.next(23), whole[17:])
    assert not torch.equal(m.stream(seed=12).next(40), whole)


def test_bad_weights_are_refused_by_name():
    with pytest.raises(ValueError, match="2 weight\\(s\\) for 3 --data path\\(s\\)"):
        Mixture([torch.zeros(9)] * 3, [1, 1], 4, ["a", "b", "c"])
    with pytest.raises(ValueError, match="not all 0"):
        _mixture([3, 3], [0, 0])
    with pytest.raises(ValueError, match="expected finite weights >= 0"):
        _mixture([3, 3], [1, -1])
    with pytest.raises(ValueError, match="src1: 3 tokens; expected at least 5"):
        Mixture([torch.zeros(9), torch.zeros(3)], [1, 1], 4, ["src0", "src1"])


def test_train_on_a_mixture_logs_it_and_resumes_exactly(capsys, tmp_path):
    from apr_kernels.cli import main

    small, big = str(STDLIB / "textwrap.py"), str(STDLIB / "json")
    args = ["train", "--preset", "tiny_llama", "--tokenizer", "bytes", "--data", small, big, "--data-weights", "3",
            "1", "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--eval-tokens", "128", "--save-every", "2",
            "--json", "--no-token-cache", "--fast", "off", "--out", str(tmp_path / "o")]
    assert main(args) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    mix = recs[0]["mixture"]
    assert [m["path"] for m in mix] == [small, big] and [m["weight"] for m in mix] == [3, 1]
    # textwrap.py is the smaller source but has 3/4 of the draws: more passes over it per sequence
    assert mix[0]["epochs"] / mix[0]["weight"] > mix[1]["epochs"] / mix[1]["weight"]
    evals = [r for r in recs if r["event"] == "eval"]
    assert evals[0]["eval_tokens"] == 128  # 3 + 1 held-out sequences of 32: one per weight unit
    for e in evals:  # each source's held-out loss; the pooled one is their target-weighted mean
        assert e["eval_loss"] == pytest.approx((96 * e["eval_loss_textwrap"] + 32 * e["eval_loss_json"]) / 128,
                                               rel=1e-6)
    assert evals[0]["eval_loss_textwrap"] != evals[0]["eval_loss_json"]
    losses = [r["loss"] for r in recs if r["event"] == "train"]
    assert main(["train", "--resume", str(tmp_path / "o" / "step_000002.apr"), "--json", "--out", str(tmp_path / "r"),
                 "--no-token-cache"]) == 0
    resumed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["loss"] for r in resumed if r["event"] == "train"] == losses[2:]
    assert main([*args[:-1], str(tmp_path / "x"), "--data-weights", "1"]) == 1
    assert "--data-weights: 1 weight(s) for 2 --data path(s)" in capsys.readouterr().err
