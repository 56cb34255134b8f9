"""Optimizers (train/optim.py): Muon on the decoder layers' weight matrices and AdamW on the rest,
one step equal to the two torch optimizers built by hand on the named groups, Muon's update an
orthogonalised gradient, checkpoints that resume a Muon run exactly, and the refusals."""

import json
import sysconfig
from pathlib import Path

import pytest
import torch

import apr_kernels
from apr_kernels.model import Transformer, preset
from apr_kernels.train.loop import TrainConfig, Trainer, make_optimizer
from apr_kernels.train.optim import MuonWithAdamW, muon_parameters

STDLIB = Path(sysconfig.get_paths()["stdlib"])
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

pytestmark = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs PyTorch >= 2.9")


def _model(name="tiny_qwen2", seed=0):
    torch.manual_seed(seed)
    return Transformer(preset(name), fast=False)


def _grads(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 0.1


def test_muon_takes_the_decoder_matrices_and_adamw_the_rest():
    model = _model()  # Qwen2-shaped: q/k/v biases, which are vectors (AdamW)
    names = {n for n, _ in muon_parameters(model)}
    want = {n for n, p in model.named_parameters() if n.split(".")[-2] in PROJECTIONS and n.endswith(".weight")}
    assert names == want and len(names) == 7 * model.config.num_layers
    opt = make_optimizer(model, TrainConfig(optimizer="muon"))
    assert isinstance(opt, MuonWithAdamW)
    in_adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    rest = [n for n, p in model.named_parameters() if n not in names]
    assert rest and all(id(dict(model.named_parameters())[n]) in in_adamw for n in rest)  # embedding, norms, biases
    assert len(opt.param_groups) == len(opt.muon.param_groups) + len(opt.adamw.param_groups)


def test_one_step_is_muon_and_adamw_built_by_hand():
    cfg = TrainConfig(optimizer="muon", lr=0.02, weight_decay=0.05, muon_momentum=0.9)
    a, b = _model(), _model()
    opt = make_optimizer(a, cfg)
    hidden = [p for n, p in b.named_parameters() if n.split(".")[-2] in PROJECTIONS and n.endswith(".weight")]
    ids = {id(p) for p in hidden}
    muon = torch.optim.Muon(hidden, lr=0.02, weight_decay=0.05, momentum=0.9, nesterov=True,
                            adjust_lr_fn="match_rms_adamw")
    others = [p for p in b.parameters() if id(p) not in ids]
    adamw = torch.optim.AdamW([{"params": [p for p in others if p.ndim >= 2], "weight_decay": 0.05},
                               {"params": [p for p in others if p.ndim < 2], "weight_decay": 0.0}],
                              lr=0.02, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
    for step in range(2):
        _grads(a, step), _grads(b, step)
        opt.step()
        muon.step(), adamw.step()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


def test_muons_update_is_an_orthogonalised_gradient():
    """The first Muon update of a matrix has (nearly) equal singular values, scaled by Moonlight's
    0.2 sqrt(max(A, B)) x lr; AdamW's first update would be lr x sign(gradient) instead."""
    model = _model()
    w = model.model.layers[0].mlp.up_proj.weight
    before = w.detach().clone()
    opt = make_optimizer(model, TrainConfig(optimizer="muon", lr=0.01, weight_decay=0.0))
    _grads(model)
    w.grad = torch.randn(w.shape, generator=torch.Generator().manual_seed(3)) @ torch.diag(
        torch.linspace(0.3, 3.0, w.shape[1]))  # a gradient with spread singular values
    opt.step()
    s = torch.linalg.svdvals((before - w.detach()).double())
    scale = 0.01 * 0.2 * max(w.shape) ** 0.5
    assert 0.5 * scale < s.min() and s.max() < 1.5 * scale
    grad_s = torch.linalg.svdvals(w.grad.double())
    assert grad_s.max() / grad_s.min() > 10


def test_refusals():
    model = _model()
    tokens = torch.randint(0, 200, (500,))
    with pytest.raises(ValueError, match="--optimizer muon with fp16 loss scaling is not supported"):
        Trainer(model, tokens, None, TrainConfig(optimizer="muon", seq_len=16), autocast_dtype=torch.float16)
    with pytest.raises(ValueError, match="optimizer='sgd'; expected one of adamw, adamw8bit, muon"):
        TrainConfig(optimizer="sgd")
    from apr_kernels.model.lora import add_lora

    add_lora(model, 4)
    with pytest.raises(ValueError, match="no trainable decoder-layer weight matrix for Muon"):
        make_optimizer(model, TrainConfig(optimizer="muon"))


def test_cli_muon_run_learns_and_resumes_exactly(tmp_path, capsys):
    from apr_kernels.cli import main

    base = ["train", "--preset", "tiny_qwen2", "--tokenizer", "bytes", "--data", str(STDLIB / "textwrap.py"),
            "--eval-data", str(STDLIB / "shlex.py"), "--steps", "8", "--batch-size", "2", "--seq-len", "32",
            "--eval-tokens", "64", "--lr", "1e-2", "--save-every", "4", "--json", "--no-token-cache",
            "--optimizer", "muon"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    losses = [r["loss"] for r in recs if r["event"] == "train"]
    assert losses[-1] < losses[0] - 0.5
    with apr_kernels.open(tmp_path / "a" / "step_000004.apr") as f:
        muon = [k for k in f.keys() if k.startswith("__training__.muon.momentum_buffer.")]
        adam = [k for k in f.keys() if k.startswith("__training__.adam.exp_avg.")]
        assert len(muon) == 7 * preset("tiny_qwen2").num_layers and adam
        assert f.metadata["training.config"]["optimizer"] == "muon"
    assert main(["train", "--resume", str(tmp_path / "a" / "step_000004.apr"), "--json", "--out",
                 str(tmp_path / "b")]) == 0
    resumed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["loss"] for r in resumed if r["event"] == "train"] == losses[4:]
    assert main([*base[:-2], "--muon-momentum", "0.9", "--out", str(tmp_path / "c")]) == 1
    assert "--muon-momentum 0.9 needs --optimizer muon" in capsys.readouterr().err
