"""HSDP (``train --parallel fsdp --fsdp-shard-size N``): 4 ranks in 2 groups of 2, each group one
sharded copy of the model, the copies replicated (FSDP2 on a 2-D mesh), against one process on the
same global batch: AdamW (losses, held-out losses, the gathered checkpoint's weights; its step
checkpoint resumed in one process), 8-bit AdamW (each rank's blocks of the moments; distilling from
a teacher sharded alike), Muon (each update gathered whole) and a quantised LoRA base (each rank's
blocks of the base, shared within its group); and ``eval --parallel fsdp`` sharded alike."""

from __future__ import annotations

import json
import re

import pytest
import torch

from rank_runs import Launch
from test_distributed import (COMMON, HELD, _aligned_config, _cli, _losses, _odd_config, _records,
                              _same_checkpoint, _same_record, _same_run)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from apr_kernels.cli import main
    from apr_kernels.model import Transformer
    from apr_kernels.train.checkpoint import save_checkpoint
    from test_lora import _quantised_file

    root = tmp_path_factory.mktemp("hsdp")
    torch.manual_seed(11)
    save_checkpoint(root / "init.apr", model=Transformer(_odd_config(), fast=False))
    torch.manual_seed(14)
    save_checkpoint(root / "aligned.apr", model=Transformer(_aligned_config(), fast=False))
    _quantised_file(root / "q8.apr", _odd_config(), "APR_Q8", seed=15)
    from apr_kernels.train.cli import byte_tokenizer

    torch.manual_seed(16)  # (a distillation teacher, sharded like the student: over each group's 2 ranks)
    save_checkpoint(root / "teacher.apr", model=Transformer(_odd_config().replace(num_layers=1), fast=False),
                    tokenizer=byte_tokenizer())
    cases = {"adamw": ["train", "--init", str(root / "init.apr"), *COMMON],
             "adam8": ["train", "--init", str(root / "aligned.apr"), *COMMON, "--optimizer", "adamw8bit",
                       "--teacher", str(root / "teacher.apr"), "--kd-ratio", "0.5"],
             "muon": ["train", "--init", str(root / "init.apr"), *COMMON, "--optimizer", "muon"],
             "qlora": ["train", "--init", str(root / "q8.apr"), *COMMON, "--lora-rank", "4",
                       "--lora-quantized-base", "--lr", "1e-2"]}
    # and eval of the init model: its held-out loss and multiple-choice accuracy, sharded within the
    # groups, each rank scoring its share of the batches (the choices' 5 batches: ranks 1-3 pad)
    (root / "choices.jsonl").write_text("".join(
        json.dumps({"context": f"{t} is", "choices": [" hot", " cold", " warm"], "answer": i % 3}) + "\n"
        for i, t in enumerate(("fire", "ice", "tea", "snow", "lava", "soup", "rain"))))
    evals = {"eval_data": ["eval", "--init", str(root / "init.apr"), "--tokenizer", "bytes", "--data", HELD,
                           "--seq-len", "32", "--max-tokens", "2000", "--batch-size", "5", "--json"],
             "eval_choices": ["eval", "--init", str(root / "init.apr"), "--tokenizer", "bytes", "--choices",
                              str(root / "choices.jsonl"), "--batch-size", "5", "--json"]}
    launch = Launch({**{name: [*args, "--parallel", "fsdp", "--fsdp-shard-size", "2", "--out",
                               str(root / f"hsdp_{name}")] for name, args in cases.items()},
                     **{name: [*args, "--parallel", "fsdp", "--fsdp-shard-size", "2"] for name, args in evals.items()}},
                    4, root / "ranks")
    one = {}
    for name, args in cases.items():  # (the reference runs in this process meanwhile)
        code, one[name] = _cli(main, [*args, "--out", str(root / f"one_{name}")])
        assert code == 0
    for name, args in evals.items():
        code, one[name] = _cli(main, args)
        assert code == 0
    out = launch.outputs()
    # the 4-rank step checkpoint resumed in one process
    code, resumed = _cli(main, ["train", "--resume", str(root / "hsdp_adamw" / "step_000002.apr"), "--json",
                                "--no-progress", "--fast", "off", "--out", str(root / "resumed")])
    assert code == 0
    return root, one, out, resumed


@pytest.mark.parametrize("name", ["adamw", "adam8", "muon", "qlora"])
def test_hsdp_matches_one_process(runs, name):
    root, one, out, _ = runs
    # (Muon: its bf16 Newton-Schulz iteration amplifies the rounding of the replicas' gradient average,
    # as in test_pipeline_parallel: held-out losses within 1e-5 relative, weights within 1e-3; on an AMD
    # EPYC 2e-6 and 1.8e-4 off)
    muon = name == "muon"
    _same_run(one[name], out[name], grad_rel=None, eval_abs=None if muon else 1e-5)
    _same_checkpoint(root / f"hsdp_{name}" / "model.apr", root / f"one_{name}" / "model.apr", name,
                     atol=1e-3 if muon else 5e-5)
    if name == "adam8":  # (distilling: the same KL, each rank half of the teacher)
        got, want = _records(out[name]), _records(one[name])
        assert _losses(got, key="kl") == pytest.approx(_losses(want, key="kl"), rel=1e-5)
        start = next(r for r in got if r["event"] == "start")
        assert 0.4 * start["teacher_params"] < start["teacher_params_rank"] < 0.6 * start["teacher_params"]


def test_hsdp_eval_matches_one_process(runs):
    """``eval --parallel fsdp --fsdp-shard-size 2`` on 4 ranks: the loss and the choices' accuracy of
    one process, each rank holding half the model (its group's shards)."""
    root, one, out, _ = runs
    notes = re.findall(r"sharded over 2 ranks \(HSDP, 2 replicas\): rank 0 holds (\d+) of (\d+) parameters",
                       (root / "ranks" / "rank0.err").read_text())
    assert len(notes) == 2 and all(abs(int(a) - int(b) / 2) < int(b) / 10 for a, b in notes)
    for name, key, n in (("eval_data", "tokens", 62 * 32), ("eval_choices", "questions", 7)):
        got, want = (json.loads(text.splitlines()[-1]) for text in (out[name], one[name]))
        assert got[key] == want[key] == n
        _same_record(got, want, name)


def test_hsdp_step_checkpoint_resumes_in_one_process(runs):
    _, one, _, resumed = runs
    assert _losses(_records(resumed)) == pytest.approx(_losses(_records(one["adamw"]))[2:], rel=1e-5)


def test_fsdp_shard_size_must_divide_the_world(tmp_path, capsys):
    from apr_kernels.cli import main

    code, _ = _cli(main, ["train", "--preset", "tiny_qwen2", *COMMON, "--fsdp-shard-size", "2", "--out",
                          str(tmp_path / "x")])
    assert code != 0
    assert "--fsdp-shard-size 2: expected --parallel fsdp and a divisor of the world size 1" in capsys.readouterr().err
