"""``train --qat KIND``: each step trains on the weights as ``convert --quantize KIND`` will store them.

The reference is the converter itself: ``apr-kernels convert model.apr q.apr --quantize KIND`` writes
the quantised file (``plan_tensor`` -> ``quantize`` -> ``save``), which the loader reads back and
dequantises. Inside ``FakeQuantizer.applied()`` the model must hold exactly those weights (and so
compute that file's logits and gradients); outside, exactly its own.
"""

from __future__ import annotations

import json
import re
import sysconfig
from pathlib import Path

import pytest
import torch

import apr_kernels
from apr_kernels.model import ModelConfig, Transformer
from apr_kernels.model.loading import from_apr
from apr_kernels.train import qat
from apr_kernels.train.checkpoint import save_checkpoint
from rank_runs import against_one_process, cli

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAIN = [str(STDLIB / "json"), str(STDLIB / "textwrap.py")]
HELD = str(STDLIB / "shlex.py")


def _config(**kw) -> ModelConfig:
    """Rows of 64 and 96 values (whole APR_Q4 blocks of 32); ``hidden_size=48`` gives rows that cut them."""
    base = dict(architecture="qwen2", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                intermediate_size=96, vocab_size=272, max_position_embeddings=256, rope_theta=1e4,
                rms_norm_eps=1e-6, attention_bias=True, tie_word_embeddings=True)
    return ModelConfig(**{**base, **kw})


def _logits_and_grads(model, ids):
    model.zero_grad()
    logits = model(ids)
    logits.float().logsumexp(-1).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["q4k", "q6k", "q8", "q4"])
@pytest.mark.parametrize("hidden", [64, 48])
def test_the_model_holds_the_converted_files_weights_within(kind, hidden, tmp_path):
    torch.manual_seed(0)
    cfg = _config(hidden_size=hidden, num_heads=4, head_dim=hidden // 4)
    model = Transformer(cfg, fast=False)
    save_checkpoint(tmp_path / "m.apr", model=model)
    assert cli(["convert", str(tmp_path / "m.apr"), str(tmp_path / "q.apr"), "--quantize", kind])[0] == 0
    deployed = from_apr(tmp_path / "q.apr", fast=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    quantizer = qat.FakeQuantizer(model, kind)
    with apr_kernels.open(tmp_path / "q.apr") as f:
        quantised = {n for n in f.keys() if f.info(n).dtype not in ("F32",)}
    # the targets are the tensors the converter quantised (the tied head is the embedding)
    assert {n for n, _ in quantizer.params} == quantised - {"lm_head.weight"}
    ids = torch.randint(0, 272, (2, 20))
    with quantizer.applied():
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), deployed.get_parameter(name).detach(), rtol=0, atol=0, msg=name)
        logits, grads = _logits_and_grads(model, ids)
    ref_logits, ref_grads = _logits_and_grads(deployed, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    for name in ref_grads:  # the quantised model's gradients (the straight-through estimator)
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=0, msg=name)
    for name, p in model.named_parameters():  # and its own weights back, bit for bit
        assert torch.equal(p.detach(), before[name]), name
    if kind in ("q4", "q4k"):  # (the coarse kinds move every weight matrix)
        assert any(not torch.equal(deployed.get_parameter(n), before[n]) for n in quantised - {"lm_head.weight"})


def test_refusals_name_the_reason():
    with pytest.raises(ValueError, match=r"--qat 'int4'; expected one of q4k, q6k, q8, q4"):
        qat.check("int4")
    with pytest.raises(ValueError, match="with --lora-rank the file stores the merged weights"):
        qat.check("q4k", lora=True)
    with pytest.raises(ValueError, match="--qat with --tensor-parallel 2: each rank's columns"):
        qat.check("q4k", tensor_parallel=2)


# ----------------------------------------------------------------------------------- the CLI
def _records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _losses(text: str, event: str = "train", key: str = "loss") -> list[float]:
    return [r[key] for r in _records(text) if r["event"] == event]


@pytest.fixture(scope="module")
def init(tmp_path_factory) -> Path:
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("qat") / "init.apr"
    save_checkpoint(path, model=Transformer(_config(), fast=False))
    return path


def _train(init: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--init", str(init), "--tokenizer", "bytes", "--data", *TRAIN, "--eval-data", HELD,
            "--max-tokens", "20000", "--steps", "4", "--batch-size", "4", "--grad-accum", "2", "--seq-len", "32",
            "--lr", "1e-2", "--eval-tokens", "160", "--save-every", "2", "--json", "--seed", "5", "--no-progress",
            "--fast", "off", "--dist-timeout", "60", "--out", str(out), *extra]


def test_a_qat_run_reports_the_quantised_files_loss_and_resumes_exactly(init, tmp_path, capsys):
    code, run = cli(_train(init, tmp_path / "run", "--qat", "q4k"))
    assert code == 0
    code, plain = cli(_train(init, tmp_path / "plain"))
    assert code == 0
    assert _records(run)[0]["qat"] == "q4k"
    assert _losses(run) != pytest.approx(_losses(plain), rel=1e-6)  # the steps saw other weights
    final = [r for r in _records(run) if r["event"] == "eval"][-1]
    # the converted checkpoint's loss is the run's eval_loss_quantized; the checkpoint's own, eval_loss
    assert cli(["convert", str(tmp_path / "run" / "model.apr"), str(tmp_path / "q.apr"), "--quantize", "q4k"])[0] == 0
    for path, key in ((tmp_path / "q.apr", "eval_loss_quantized"), (tmp_path / "run" / "model.apr", "eval_loss")):
        code, out = cli(["eval", "--init", str(path), "--data", HELD, "--max-tokens", "160", "--seq-len", "32"])
        assert code == 0
        assert float(out.strip().splitlines()[-1].split()[0].removeprefix("eval_loss=")) == pytest.approx(
            final[key], abs=2e-6), key
    code, resumed = cli(["train", "--resume", str(tmp_path / "run" / "step_000002.apr"), "--out",
                         str(tmp_path / "again"), "--json", "--no-progress"])
    assert code == 0
    assert _losses(resumed) == pytest.approx(_losses(run)[2:], rel=1e-6)
    capsys.readouterr()
    code, _ = cli(["train", "--resume", str(tmp_path / "run" / "step_000002.apr"), "--qat", "q8",
                   "--out", str(tmp_path / "no")])
    assert code != 0
    assert re.search(r"--qat q8 with --resume .*: the run was trained with --qat q4k", capsys.readouterr().err)


def test_qat_on_two_ranks_matches_one_process(init, tmp_path):
    """FSDP with APR_Q8 (one scale per tensor: each weight gathered to quantise it) and APR_Q4 (rows of
    whole blocks: each rank its own rows), DDP with Q4_K, and a Qwen2-MoE model's experts spread over
    the ranks (expert parallelism under FSDP, APR_Q8), and each row's positions split (context
    parallelism, Q4_K): one process's quantised weights (the first
    step's loss and gradient norm, the first evaluation: the same weights quantised alike), then its
    training within a looser tolerance: quantisation is discontinuous, so a weight that the ranks'
    other summation order moves by a rounding error can land on the other side of a level."""
    torch.manual_seed(4)
    moe = tmp_path / "moe.apr"  # (its experts under FSDP: sharded over their replicas, gathered for APR_Q8)
    save_checkpoint(moe, model=Transformer(_config(
        architecture="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, tie_word_embeddings=False), fast=False))
    runs = {"fsdp_q8": (init, "q8", "fsdp"), "fsdp_q4": (init, "q4", "fsdp"), "ddp_q4k": (init, "q4k", "ddp"),
            "ep_q8": (moe, "q8", "fsdp"), "cp_q4k": (init, "q4k", "ddp")}
    ep = {"ep_q8": ["--expert-parallel", "2"], "cp_q4k": ["--context-parallel", "2"]}
    launched = {name: (_train(path, tmp_path / name, "--qat", kind, "--parallel", mode, *ep.get(name, [])), 2)
                for name, (path, kind, mode) in runs.items()}
    references = {name: _train(path, tmp_path / f"one_{name}", "--qat", kind)
                  for name, (path, kind, _) in runs.items()}
    one, out = against_one_process(launched, references, tmp_path / "launch")
    for name in runs:
        got, ref = _losses(out[name]), _losses(one[name])
        assert got[0] == pytest.approx(ref[0], rel=1e-6), name
        assert _losses(out[name], key="grad_norm")[0] == pytest.approx(_losses(one[name], key="grad_norm")[0],
                                                                        rel=1e-5), name
        for key in ("eval_loss", "eval_loss_quantized"):
            assert _losses(out[name], "eval", key)[0] == pytest.approx(_losses(one[name], "eval", key)[0],
                                                                        rel=1e-6), name
        assert got == pytest.approx(ref, rel=2e-3), name
