"""DPO (train/preference.py): the loss is the paper's, sequence log-likelihoods are transformers',
the policy starts equal to the reference (loss ln 2), training makes it prefer the chosen answers on
held-out prompts, and the command line runs end to end."""

import json
import math
from pathlib import Path

import pytest
import torch

from apr_kernels.model import Transformer, pad_vocab, preset
from apr_kernels.train.checkpoint import save_checkpoint, training_metadata
from apr_kernels.train.cli import byte_tokenizer
from apr_kernels.train.loop import TrainConfig
from apr_kernels.train.posttrain import token_logps
from apr_kernels.train.preference import (PreferenceLoss, PreferenceTrainer, dpo_loss, padded, read_pairs,
                                          sequence_logps)
from kernel_helpers import assert_grads_near


def test_dpo_loss_is_the_papers():
    pc, pr, rc, rr = torch.tensor([-3.0, -1.0]), torch.tensor([-4.0, -0.5]), torch.tensor([-3.5, -1.2]), \
        torch.tensor([-3.9, -0.9])
    beta = 0.3
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    z = [beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item() for i in range(2)]
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-v)) for v in z], rel=1e-6)
    assert chosen.tolist() == pytest.approx([beta * 0.5, beta * 0.2])
    assert rejected.tolist() == pytest.approx([beta * -0.1, beta * 0.4])


def _log_sigmoid(v: float) -> float:
    return -math.log1p(math.exp(-v))


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_loss_variants_are_trls_formulas(eps):
    """sigmoid with label smoothing (cDPO), robust (rDPO), hinge (SLiC), length-normalised ipo, apo_zero,
    apo_down, nca_pair, sppo_hard, exo_pair and simpo / orpo (no reference), each written out per pair in
    plain floats as TRL writes them; ipo and simpo read the answers' target counts."""
    pc, pr, rc, rr = [-3.0, -1.0, -7.0], [-4.0, -0.5, -2.0], [-3.5, -1.2, -6.0], [-3.9, -0.9, -2.5]
    lengths = [[2, 5], [1, 1], [9, 3]]
    beta = 0.4
    t = [torch.tensor(v, dtype=torch.float64) for v in (pc, pr, rc, rr)]
    h = [(pc[i] - rc[i]) - (pr[i] - rr[i]) for i in range(3)]
    want = {
        "sigmoid": [-(1 - eps) * _log_sigmoid(beta * v) - eps * _log_sigmoid(-beta * v) for v in h],
        "robust": [(-(1 - eps) * _log_sigmoid(beta * v) + eps * _log_sigmoid(-beta * v)) / (1 - 2 * eps) for v in h],
        "hinge": [max(0.0, 1 - beta * v) for v in h],
        "ipo": [((pc[i] - rc[i]) / lengths[i][0] - (pr[i] - rr[i]) / lengths[i][1] - 1 / (2 * beta)) ** 2
                for i in range(3)],
        "apo_zero": [1 - 1 / (1 + math.exp(-beta * (pc[i] - rc[i]))) + 1 / (1 + math.exp(-beta * (pr[i] - rr[i])))
                     for i in range(3)],
    }
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    c = [beta * (pc[i] - rc[i]) for i in range(3)]
    r = [beta * (pr[i] - rr[i]) for i in range(3)]
    want["apo_down"] = [sig(c[i]) + 1 - sig(beta * h[i]) for i in range(3)]
    want["nca_pair"] = [-_log_sigmoid(c[i]) - 0.5 * _log_sigmoid(-c[i]) - 0.5 * _log_sigmoid(-r[i]) for i in range(3)]
    want["sppo_hard"] = [(pc[i] - rc[i] - 0.5 / beta) ** 2 + (pr[i] - rr[i] + 0.5 / beta) ** 2 for i in range(3)]
    e = eps or 1e-3
    want["exo_pair"] = [sig(beta * v) * (_log_sigmoid(beta * v) - math.log(1 - e))
                        + sig(-beta * v) * (_log_sigmoid(-beta * v) - math.log(e)) for v in h]
    gamma = 0.7
    z = [beta * (pc[i] / lengths[i][0] - pr[i] / lengths[i][1]) - gamma for i in range(3)]
    want["simpo"] = [-(1 - eps) * _log_sigmoid(v) - eps * _log_sigmoid(-v) for v in z]

    def log_odds(a):
        return a - math.log(1 - math.exp(a))

    want["orpo"] = [-beta * _log_sigmoid(log_odds(pc[i] / lengths[i][0]) - log_odds(pr[i] / lengths[i][1]))
                    for i in range(3)]
    for kind, expected in want.items():
        got, chosen, _ = dpo_loss(*t, beta, loss_type=kind, label_smoothing=eps, lengths=torch.tensor(lengths),
                                  gamma=gamma)
        assert got.tolist() == pytest.approx(expected, rel=1e-12), kind
        reward = [pc[i] / lengths[i][0] if kind in ("simpo", "orpo") else pc[i] - rc[i] for i in range(3)]
        assert chosen.tolist() == pytest.approx([beta * r for r in reward]), kind
    # label smoothing moves the optimum: the smoothed loss no longer falls forever as h grows
    big = torch.tensor([50.0], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    if eps:
        assert dpo_loss(big, zero, zero, zero, beta, label_smoothing=eps)[0] > \
            dpo_loss(big / 10, zero, zero, zero, beta, label_smoothing=eps)[0]


def test_bad_loss_settings_are_refused():
    z = torch.zeros(1)
    with pytest.raises(ValueError, match="loss type 'kto'"):
        dpo_loss(z, z, z, z, 0.1, loss_type="kto")
    with pytest.raises(ValueError, match="--label-smoothing 0.5"):
        dpo_loss(z, z, z, z, 0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match="ipo loss needs"):
        dpo_loss(z, z, z, z, 0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="loss type 'cpo'"):
        PreferenceLoss(kind="cpo")
    with pytest.raises(ValueError, match="--beta 0"):
        PreferenceLoss(beta=0)
    with pytest.raises(ValueError, match="--sft-weight -1"):
        PreferenceLoss(sft_weight=-1)


# (head_dim 16: the smallest the Triton kernels take)
@pytest.mark.parametrize("backend_name,padding_free", [("eager", False), ("eager", True), ("reference", False),
                                                       ("reference", True), ("triton", True)])
def test_sequence_logps_are_transformers_answer_log_likelihoods(use_backend, monkeypatch, backend_name, padding_free):
    """Per-sequence answer log-likelihoods, from padded rows or from one packed row (each sequence a
    document), on the eager path, the fused path's reference code and the Triton kernels (interpreter),
    equal transformers' run on each sequence alone."""
    pytest.importorskip("transformers")
    from test_model import QWEN, hf_model, ours_from_hf

    cfg = QWEN.replace(hidden_size=112)
    hf = hf_model(cfg)
    ours = ours_from_hf(hf, cfg)
    ours.fast = backend_name != "eager"
    if ours.fast:
        use_backend(backend_name)
    from kernel_helpers import spy_launchers

    calls = spy_launchers(monkeypatch, "attention", ("attention_fwd",))
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (9, 14, 5)]
    # mark the first tokens of each as prompt (non-targets), the rest as the answer
    marked = [[-1 - t if i < 4 else t for i, t in enumerate(s)] for s in seqs]
    got = sequence_logps(ours, marked, "cpu", eos_id=cfg.vocab_size - 1, padding_free=padding_free)
    # and per token (GRPO's objective), all sequences' answer tokens back to back
    tokens = token_logps(ours, marked, "cpu", eos_id=cfg.vocab_size - 1, padding_free=padding_free)
    assert tokens.shape == (sum(len(s) - 4 for s in seqs),)
    at = 0
    for k, s in enumerate(seqs):
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([s])).logits[0].double(), -1)
        want = [logp[i - 1, s[i]].item() for i in range(4, len(s))]
        assert got[k].item() == pytest.approx(sum(want), rel=1e-5, abs=1e-4)
        assert tokens[at:at + len(want)].tolist() == pytest.approx(want, rel=1e-5, abs=1e-5)
        at += len(want)
    assert bool(calls) == (backend_name == "triton")  # the packed-sequence kernel ran


def _pairs_file(path, things, chosen=" yes", rejected=" no"):
    path.write_text("".join(json.dumps({"prompt": f"Is {t} hot? A:", "chosen": chosen, "rejected": rejected}) + "\n"
                            for t in things))
    return path


THINGS = ["fire", "lava", "the sun", "a stove", "an oven", "a kettle", "coal", "a candle", "a flame", "magma",
          "a furnace", "a heater", "steam", "a grill", "embers", "a torch"]


def _dpo_cli_files(tmp_path) -> Path:
    """``tmp_path/init.apr`` (a seeded tiny Qwen2-shaped model with the byte tokenizer) and the pairs
    file of ``THINGS``, for the command-line tests."""
    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(tok.vocab_size)), fast=False)
    save_checkpoint(tmp_path / "init.apr", model=model, tokenizer=tok)
    return _pairs_file(tmp_path / "p.jsonl", THINGS)


def test_pairs_from_a_json_array_read_as_from_json_lines(tmp_path):
    """A .json file holding an array of pair records (datasets' to_json(lines=False)) gives the pairs
    its JSON Lines twin gives; other JSON is refused by name."""
    tok = byte_tokenizer()
    lines = _pairs_file(tmp_path / "p.jsonl", THINGS[:5])
    records = [json.loads(line) for line in lines.read_text().splitlines()]
    (tmp_path / "p.json").write_text(json.dumps(records, indent=2))
    assert read_pairs([tmp_path / "p.json"], tok, 64) == read_pairs([lines], tok, 64)
    (tmp_path / "o.json").write_text(json.dumps({"prompt": "x"}))
    with pytest.raises(ValueError, match=r"o.json: .* in a .json file must be a JSON array of objects; got a JSON "
                                         r"dict"):
        read_pairs([tmp_path / "o.json"], tok, 64)


def test_dpo_prefers_the_chosen_answers_on_held_out_prompts(tmp_path):
    tok = byte_tokenizer()
    train = read_pairs([_pairs_file(tmp_path / "t.jsonl", THINGS[:12])], tok, 64)
    held = read_pairs([_pairs_file(tmp_path / "h.jsonl", THINGS[12:])], tok, 64)
    assert len(train) == 12 and all(t >= 0 for t in train[0][0][-3:])  # " yes" + end-of-text are targets
    torch.manual_seed(0)
    model = Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(tok.vocab_size)), fast=False)
    cfg = TrainConfig(steps=25, batch_size=4, seq_len=64, lr=3e-3, warmup=2, weight_decay=0.0)
    trainer = PreferenceTrainer(model, train, held, cfg, eos_id=tok.eos_id, loss=PreferenceLoss(beta=0.5))
    first = trainer.evaluate()
    assert first["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy is the reference
    ref = trainer.ref.clone()
    history = trainer.run()
    last = [h for h in history if h["event"] == "eval"][-1]
    assert last["eval_reward_acc"] == 1.0 and last["eval_loss"] < 0.3 and last["eval_margin"] > 1.0
    assert torch.equal(trainer.ref, ref)  # the reference stays the model as loaded


def test_dpo_with_lora_trains_the_adapters_only(tmp_path):
    from apr_kernels.model.lora import add_lora

    tok = byte_tokenizer()
    pairs = read_pairs([_pairs_file(tmp_path / "t.jsonl", THINGS[:8])], tok, 64)
    torch.manual_seed(0)
    model = Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(tok.vocab_size)), fast=False)
    add_lora(model, 4, 8)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = PreferenceTrainer(model, pairs, [], TrainConfig(steps=2, batch_size=4, seq_len=64, lr=1e-2),
                                eos_id=tok.eos_id, loss=PreferenceLoss(beta=0.5))
    rec = trainer.train_step()
    assert rec["loss"] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: the policy starts as the reference
    trainer.train_step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))


def test_conversational_pairs_target_the_assistant_answers():
    from apr_kernels.tokenizer import Tokenizer

    tok = Tokenizer.qwen2()
    import tempfile
    from pathlib import Path

    rec = {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4."}],
           "rejected": [{"role": "assistant", "content": "5."}]}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.jsonl"
        path.write_text(json.dumps(rec) + "\n")
        (chosen, rejected), = read_pairs([path], tok, 128)
    targets = lambda ids: tok.decode([t for t in ids if t >= 0])  # noqa: E731
    assert targets(chosen).startswith("4.<|im_end|>") and targets(rejected).startswith("5.<|im_end|>")
    assert "<|im_start|>user\n2+2?" in tok.decode([t if t >= 0 else -1 - t for t in chosen])
    with pytest.raises(ValueError, match=r"c\.jsonl:1: a preference record needs 'chosen' and 'rejected'"):
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "c.jsonl"
            path.write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
            read_pairs([path], tok, 128)


def test_cli_dpo_writes_a_model_that_prefers_the_chosen_answer(tmp_path, capsys):
    from apr_kernels.cli import main
    from apr_kernels.model import from_apr

    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(tok.vocab_size)), fast=False)
    save_checkpoint(tmp_path / "init.apr", model=model, tokenizer=tok)
    data = _pairs_file(tmp_path / "p.jsonl", THINGS)
    code = main(["dpo", "--init", str(tmp_path / "init.apr"), "--data", str(data), "--steps", "15", "--batch-size",
                 "4", "--lr", "3e-3", "--beta", "0.5", "--max-len", "64", "--json", "--out", str(tmp_path / "o"),
                 "--eval-fraction", "0.25"])
    out = capsys.readouterr().out
    assert code == 0
    recs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert recs[0]["event"] == "start" and recs[0]["pairs"] == 12 and recs[0]["eval_pairs"] == 4
    evals = [r for r in recs if r["event"] == "eval"]
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6) and evals[-1]["eval_reward_acc"] == 1.0
    # a step checkpoint (here written in the background) resumes where the run stood: the same losses
    # as the uninterrupted run
    losses = [r["loss"] for r in recs if r["event"] == "train"]
    code = main(["dpo", "--init", str(tmp_path / "init.apr"), "--data", str(data), "--steps", "15", "--batch-size",
                 "4", "--lr", "3e-3", "--beta", "0.5", "--max-len", "64", "--json", "--out", str(tmp_path / "s"),
                 "--eval-fraction", "0.25", "--save-every", "10", "--async-checkpoint"])
    marks = [r.get("background") for r in map(json.loads, (line for line in capsys.readouterr().out.splitlines()
                                                            if line.startswith("{"))) if r["event"] == "checkpoint"]
    assert code == 0 and (tmp_path / "s" / "step_000010.apr").exists() and marks == [True, None]
    code = main(["dpo", "--resume", str(tmp_path / "s" / "step_000010.apr"), "--json", "--out", str(tmp_path / "r")])
    resumed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert code == 0 and [r["loss"] for r in resumed if r["event"] == "train"] == losses[10:]
    assert main(["dpo", "--resume", str(tmp_path / "s" / "model.apr"), "--out", str(tmp_path / "x")]) == 1
    # (FSDP's option without FSDP: refused before anything is loaded)
    assert main(["dpo", "--init", str(tmp_path / "init.apr"), "--data", str(data), "--fsdp-reshard-after-forward",
                 "never", "--out", str(tmp_path / "y")]) == 1
    assert ("--fsdp-reshard-after-forward never with --parallel none: expected --parallel fsdp"
            in capsys.readouterr().err)
    tuned = from_apr(tmp_path / "o" / "model.apr", fast=False)
    pairs = read_pairs([data], tok, 64)[:4]
    seqs = [s for p in pairs for s in p]
    with torch.no_grad():
        before = sequence_logps(model.eval(), seqs, "cpu", eos_id=tok.eos_id).view(-1, 2)
        after = sequence_logps(tuned.eval(), seqs, "cpu", eos_id=tok.eos_id).view(-1, 2)
    assert ((after[:, 0] - after[:, 1]) > (before[:, 0] - before[:, 1])).all()


def test_gradient_accumulation_gives_the_whole_batch_step(tmp_path):
    """Batches of 4 pairs in one micro-batch or in two of 2: the same pairs per step (the data position
    is per pair), the same loss and the same weights after the steps: for DPO, length-normalised ipo,
    and DPO + NLL, whose NLL is a mean over all chosen tokens of the step (answers of unequal lengths
    make the micro-batches' token counts differ)."""
    tok = byte_tokenizer()
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Is {t} hot? A:", "chosen": " yes" + " very" * (i % 3),
                                        "rejected": " no"}) + "\n" for i, t in enumerate(THINGS[:12])))
    train = read_pairs([path], tok, 64)
    runs = {}
    losses = {"sigmoid": PreferenceLoss(beta=0.5), "ipo": PreferenceLoss(kind="ipo", beta=0.5),
              "rpo": PreferenceLoss(beta=0.5, sft_weight=0.7)}
    for name, loss in losses.items():
        for batch, accum in ((4, 1), (2, 2)):
            torch.manual_seed(0)
            model = Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(tok.vocab_size)), fast=False)
            cfg = TrainConfig(steps=3, batch_size=batch, grad_accum=accum, seq_len=64, lr=3e-3, warmup=1)
            trainer = PreferenceTrainer(model, train, [], cfg, eos_id=tok.eos_id, loss=loss)
            runs[name, accum] = (trainer.run(), model.state_dict())
        (one, w1), (two, w2) = runs[name, 1], runs[name, 2]
        assert [h["loss"] for h in two] == pytest.approx([h["loss"] for h in one], rel=1e-5)
        # (Adam divides by the gradients' own size: float noise in near-zero ones shows as ~1e-5)
        assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4
    first = {name: runs[name, 1][0][0] for name in losses}
    assert first["sigmoid"]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 1: the policy is the reference
    assert first["ipo"]["loss"] == pytest.approx((0 - 1 / (2 * 0.5)) ** 2, rel=1e-5)  # h = 0 at the start
    # DPO + NLL: ln 2 plus the weight times the chosen tokens' mean NLL, which equals the step's
    # cross entropy on those tokens computed on its own
    torch.manual_seed(0)
    model = Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(tok.vocab_size)), fast=False)
    from apr_kernels.train.data import BatchStream, split_targets

    index = BatchStream(len(train), seed=TrainConfig().seed).next(4)
    x, y = split_targets(padded([train[i][0] for i in index.tolist()], tok.eos_id))
    with torch.no_grad():
        nll = model.loss(x, y).item()
    assert first["rpo"]["chosen_nll"] == pytest.approx(nll, rel=1e-5)
    assert first["rpo"]["loss"] == pytest.approx(math.log(2) + 0.7 * nll, rel=1e-5)
    # and its first step is AdamW on that objective written out: the paper's loss over the 4 pairs plus
    # 0.7 x the cross entropy of the chosen answers, clipped as the trainer clips
    from apr_kernels.train.loop import make_optimizer

    cfg = TrainConfig(steps=1, batch_size=4, seq_len=64, lr=3e-3, warmup=1)
    seqs = [s for i in index.tolist() for s in train[i]]
    ref = sequence_logps(model, seqs, "cpu", eos_id=tok.eos_id).view(4, 2).detach()
    pol = sequence_logps(model, seqs, "cpu", eos_id=tok.eos_id).view(4, 2)
    h = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
    objective = -torch.nn.functional.logsigmoid(0.5 * h).mean() + 0.7 * model.loss(x, y)
    opt = make_optimizer(model, cfg)
    for group in opt.param_groups:
        group["lr"] = cfg.lr_at_step(0)
    objective.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    torch.manual_seed(0)
    stepped = Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(tok.vocab_size)), fast=False)
    PreferenceTrainer(stepped, train, [], cfg, eos_id=tok.eos_id, loss=losses["rpo"]).train_step()
    for name, w in model.state_dict().items():
        # (AdamW's first step is about lr x sign(gradient): float noise in near-zero gradients moves ~1e-6)
        torch.testing.assert_close(stepped.state_dict()[name], w, rtol=0, atol=3e-5, msg=name)


@pytest.mark.parametrize("loss", [PreferenceLoss(kind="simpo", beta=2.0, gamma=0.5), PreferenceLoss(kind="orpo",
                                                                                                    beta=1.0),
                                  PreferenceLoss(beta=0.5, sft_weight=1.0, reference_free=True)],
                         ids=["simpo", "orpo", "cpo"])
def test_reference_free_losses_learn_the_preference(tmp_path, loss):
    tok = byte_tokenizer()
    train = read_pairs([_pairs_file(tmp_path / "t.jsonl", THINGS[:12])], tok, 64)
    held = read_pairs([_pairs_file(tmp_path / "h.jsonl", THINGS[12:])], tok, 64)
    torch.manual_seed(0)
    model = Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(tok.vocab_size)), fast=False)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    cfg = TrainConfig(steps=25, batch_size=4, seq_len=64, lr=3e-3, warmup=2, weight_decay=0.0)
    trainer = PreferenceTrainer(model, train, held, cfg, eos_id=tok.eos_id, loss=loss)
    assert not calls and not trainer.ref.any() and not trainer.eval_ref.any()  # no reference pass
    assert loss.sft_weight == (0.0 if loss.kind == "simpo" else 1.0)  # ORPO: its NLL term, weight 1
    history = trainer.run()
    evals = [h for h in history if h["event"] == "eval"]
    assert evals[-1]["eval_reward_acc"] == 1.0 and evals[-1]["eval_loss"] < evals[0]["eval_loss"] / 2


def test_model_loss_names_a_bad_reduction():
    model = Transformer(preset("tiny_qwen2"), fast=False)
    x = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction 'token'; expected 'mean', 'sum', 'sequence' or 'none'"):
        model.loss(x, x, reduction="token")


def test_cli_loss_settings_travel_into_checkpoints(tmp_path, capsys):
    """SimPO + NLL from the command line: the start record names the settings, and a resumed run keeps
    them (the same losses as the uninterrupted run); bad settings stop before the model is read."""
    from apr_kernels.cli import main

    data = _dpo_cli_files(tmp_path)
    args = ["dpo", "--init", str(tmp_path / "init.apr"), "--data", str(data), "--steps", "4", "--batch-size", "2",
            "--lr", "3e-3", "--beta", "2.0", "--loss", "simpo", "--gamma", "0.3", "--sft-weight", "0.2",
            "--max-len", "64", "--json", "--out", str(tmp_path / "o"), "--save-every", "2"]
    assert main([*args, "--tensorboard", str(tmp_path / "tb")]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "tb"))
    board.Reload()
    train = [r for r in recs if r["event"] == "train"]
    for key in ("loss", "chosen_nll", "reward_acc", "margin"):
        assert [e.value for e in board.Scalars(f"train/{key}")] == pytest.approx([r[key] for r in train], rel=1e-6)
    assert [e.step for e in board.Scalars("eval/reward_acc")] == [0, 4]
    start = recs[0]
    assert (start["kind"], start["beta"], start["gamma"], start["sft_weight"]) == ("simpo", 2.0, 0.3, 0.2)
    losses = [r["loss"] for r in recs if r["event"] == "train"]
    assert main(["dpo", "--resume", str(tmp_path / "o" / "step_000002.apr"), "--json", "--out", str(tmp_path / "r")]) == 0
    resumed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert resumed[0]["kind"] == "simpo" and [r["loss"] for r in resumed if r["event"] == "train"] == losses[2:]
    bad = [a if a != "0.2" else "-1" for a in args]
    bad[bad.index("--init") + 1] = str(tmp_path / "missing.apr")
    assert main(bad) == 1
    assert "--sft-weight -1" in capsys.readouterr().err


def test_cli_epochs_set_the_steps_from_the_pairs(tmp_path, capsys):
    """dpo --epochs 2 over 16 pairs, 3 x 2 a step: ceil(2 * 16 / 6) = 6 steps (the post-training
    commands share the option); the start record reports the passes the steps make."""
    from apr_kernels.cli import main

    data = _dpo_cli_files(tmp_path)
    assert main(["dpo", "--init", str(tmp_path / "init.apr"), "--data", str(data), "--eval-data", str(data),
                 "--epochs", "2", "--batch-size", "3", "--grad-accum", "2", "--max-len", "64", "--json",
                 "--out", str(tmp_path / "o")]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert recs[0]["pairs"] == len(THINGS) == 16
    assert recs[0]["steps"] == 6 and recs[0]["epochs"] == round(6 * 6 / 16, 3)
    assert [r["step"] for r in recs if r["event"] == "train"] == list(range(1, 7))
    assert training_metadata(tmp_path / "o" / "model.apr")["training.data_position"] == 36


def test_cli_early_stopping_and_best_model_of_a_post_training_run(tmp_path, capsys):
    """dpo --early-stopping-patience 1 --save-best: from an unstopped run's held-out losses the test
    works out the stop (the first eval no lower than the best before it) and the best step; the
    stopped run ends there with model.apr marked finished, and best.apr holds the weights the
    unstopped run had at the best step."""
    from apr_kernels.cli import main

    data = _dpo_cli_files(tmp_path)
    common = ["dpo", "--init", str(tmp_path / "init.apr"), "--data", str(data), "--steps", "10", "--batch-size", "2",
              "--eval-every", "1", "--eval-fraction", "0.25", "--lr", "3e-3", "--max-len", "64", "--json"]

    def records(out):
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    assert main([*common, "--save-every", "1", "--out", str(tmp_path / "full")]) == 0
    losses = {r["step"]: r["eval_loss"] for r in records(capsys.readouterr().out) if r["event"] == "eval"}
    best, stop = 1, None
    for step in range(2, 11):
        if losses[step] < losses[best]:
            best = step
        else:
            stop = step
            break
    assert stop is not None and stop < 10, losses  # (the settings must make the loss rise once)
    assert main([*common, "--early-stopping-patience", "1", "--save-best", "--out", str(tmp_path / "es")]) == 0
    recs = records(capsys.readouterr().out)
    assert [r["step"] for r in recs if r["event"] == "train"] == list(range(1, stop + 1))
    assert [r["step"] for r in recs if r["event"] == "best"] == list(range(1, best + 1))
    (early,) = [r for r in recs if r["event"] == "early_stop"]
    assert (early["step"], early["best_step"], early["best_eval_loss"]) == (stop, best, losses[best])
    final = training_metadata(tmp_path / "es" / "model.apr")
    assert final["training.step"] == stop and final["training.stopped_early"] is True
    import apr_kernels

    best_model = apr_kernels.load(tmp_path / "es" / "best.apr")
    assert apr_kernels.open(tmp_path / "es" / "best.apr").metadata["training.step"] == best
    # the unstopped run's step checkpoint of the best step holds the same weights
    same_step = apr_kernels.load(tmp_path / "full" / f"step_{best:06d}.apr")
    for name, t in best_model.items():
        torch.testing.assert_close(t, same_step[name], rtol=0, atol=0, msg=name)
    assert main([*common, "--early-stopping-patience", "1", "--resume", "auto", "--out", str(tmp_path / "es")]) == 0
    assert "nothing to do" in capsys.readouterr().err


def test_cli_profile_of_a_post_training_command(tmp_path, capsys):
    """dpo --profile: the profiled steps (after the first) in a Chrome trace, as train's."""
    from apr_kernels.cli import main

    data = _dpo_cli_files(tmp_path)
    assert main(["dpo", "--init", str(tmp_path / "init.apr"), "--data", str(data), "--steps", "3", "--batch-size",
                 "2", "--max-len", "64", "--json", "--profile", str(tmp_path / "prof"), "--profile-steps", "1",
                 "--out", str(tmp_path / "o")]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    (done,) = [r for r in recs if r["event"] == "profile"]
    trace = json.loads((tmp_path / "prof" / "trace_rank0.json").read_text())
    assert sorted(e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")) == \
        ["ProfilerStep#2"]
    assert done["step"] == 3 and (tmp_path / "prof" / "summary_rank0.txt").stat().st_size > 0


def test_cli_resume_with_more_steps_extends_a_post_training_run(tmp_path, capsys):
    from apr_kernels.cli import main

    data = _dpo_cli_files(tmp_path)
    assert main(["dpo", "--init", str(tmp_path / "init.apr"), "--data", str(data), "--steps", "3", "--batch-size", "2",
                 "--max-len", "64", "--save-every", "2", "--out", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    assert main(["dpo", "--resume", str(tmp_path / "o" / "step_000002.apr"), "--steps", "5", "--json",
                 "--out", str(tmp_path / "more")]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert recs[0]["steps"] == 5 and [r["step"] for r in recs if r["event"] == "train"] == [3, 4, 5]
    assert training_metadata(tmp_path / "more" / "model.apr")["training.config"]["steps"] == 5


def test_cli_wandb_run_of_a_post_training_command(tmp_path, capsys, monkeypatch):
    """dpo --wandb (offline): the train and eval records' numbers at their steps, as train's."""
    pytest.importorskip("wandb")
    from apr_kernels.cli import main
    from wandb_records import finished_run_file, history

    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    data = _dpo_cli_files(tmp_path)
    assert main(["dpo", "--init", str(tmp_path / "init.apr"), "--data", str(data), "--steps", "2", "--batch-size",
                 "2", "--max-len", "64", "--json", "--wandb", "apr-tests", "--out", str(tmp_path / "o")]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    run_file = finished_run_file(tmp_path / "o")
    rows = {}
    for row in history(run_file):
        rows.setdefault(row["_step"], {}).update(row)
    train = [r for r in recs if r["event"] == "train"]
    assert [rows[r["step"]]["train/loss"] for r in train] == pytest.approx([r["loss"] for r in train], rel=1e-12)
    evals = [r for r in recs if r["event"] == "eval"]
    assert [rows[r["step"]]["eval/reward_acc"] for r in evals] == [r["eval_reward_acc"] for r in evals]
    assert [r["step"] for r in evals] == [0, 2]


def test_tensorboard_or_wandb_without_the_package_is_a_clear_error(monkeypatch, tmp_path):
    import sys

    from apr_kernels.train.loop import Logger

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(ValueError, match=r"--tensorboard .*tb: the tensorboard package is not installed; "
                                         r"pip install 'apr-kernels\[tensorboard\]'"):
        Logger(tensorboard=tmp_path / "tb")
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ValueError, match=r"--wandb proj: the wandb package is not installed; "
                                         r"pip install 'apr-kernels\[wandb\]'"):
        Logger(wandb={"project": "proj"})


def test_cli_dpo_resume_auto_and_keep_last(tmp_path, capsys):
    """One command for a preemptible job: ``--resume auto`` continues from the newest step file of
    --out (after a crash: the uninterrupted run's last loss), and does nothing once model.apr is
    there; ``--keep-last 2`` leaves the two newest step files."""
    from apr_kernels.cli import main

    tok = byte_tokenizer()
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "init.apr", tokenizer=tok,
                    model=Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(tok.vocab_size)), fast=False))
    out = tmp_path / "o"
    args = ["dpo", "--init", str(tmp_path / "init.apr"), "--data", str(_pairs_file(tmp_path / "p.jsonl", THINGS)),
            "--steps", "4", "--batch-size", "2", "--lr", "3e-3", "--max-len", "64", "--json", "--out", str(out),
            "--save-every", "1", "--keep-last", "2", "--resume", "auto"]
    assert main(args) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert sorted(p.name for p in out.glob("step_*.apr")) == ["step_000002.apr", "step_000003.apr"]
    assert [Path(r["path"]).name for r in recs if r["event"] == "checkpoint_removed"] == ["step_000001.apr"]
    (out / "model.apr").unlink()  # as if the job died before the end
    assert main(args) == 0
    captured = capsys.readouterr()
    resumed = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    assert "continuing from " + str(out / "step_000003.apr") in captured.err
    assert [(r["step"], r["loss"]) for r in resumed if r["event"] == "train"] == \
        [(r["step"], r["loss"]) for r in recs if r["event"] == "train"][3:]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "nothing to do" in captured.err and not captured.out


def test_padding_free_batches_train_like_padded_ones(tmp_path):
    """The fused path with each micro-batch packed into one row (each answer a document: what the
    packed-sequence kernel runs on a GPU) gives the padded batches' losses and weights; auto picks
    packing only where the fast path runs."""
    tok = byte_tokenizer()
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Is {t} hot?" + " Say." * (i % 4), "chosen": " yes" + " very" * (i % 3),
                                        "rejected": " no"}) + "\n" for i, t in enumerate(THINGS[:12])))
    train = read_pairs([path], tok, 64)
    runs = {}
    for padding_free in (False, True):
        torch.manual_seed(0)
        model = Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(tok.vocab_size)), fast=True)
        cfg = TrainConfig(steps=3, batch_size=4, seq_len=64, lr=3e-3, warmup=1)
        trainer = PreferenceTrainer(model, train, [], cfg, eos_id=tok.eos_id, padding_free=padding_free,
                                    loss=PreferenceLoss(beta=0.5, sft_weight=0.3))
        runs[padding_free] = ([h["loss"] for h in trainer.run()], model.state_dict(), trainer.ref)
    (a, wa, ra), (b, wb, rb) = runs[False], runs[True]
    torch.testing.assert_close(rb, ra, rtol=1e-5, atol=1e-5)
    assert b == pytest.approx(a, rel=1e-5)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=3e-5, msg=name)
    eager = Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(tok.vocab_size)), fast=False)
    assert PreferenceTrainer(eager, train, [], cfg, eos_id=tok.eos_id).padding_free is False
    fast = Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(tok.vocab_size)), fast=True)
    assert PreferenceTrainer(fast, train, [], cfg, eos_id=tok.eos_id).padding_free is True


@pytest.mark.cuda
def test_gpu_padding_free_sequence_logps_match_padded_eager():
    """Qwen2-0.5B layer shapes on the GPU under bf16 autocast: the per-answer log-likelihoods of a
    packed row through the varlen kernels and fused losses, and their gradients, against padded
    rows on the eager path."""
    cfg = preset("qwen2_0_5b").replace(num_layers=2, vocab_size=512)
    torch.manual_seed(0)
    eager = Transformer(cfg, fast=False).cuda()
    fast = Transformer(cfg, fast=True).cuda()
    fast.load_state_dict(eager.state_dict())
    g = torch.Generator().manual_seed(1)
    seqs = [[-1 - t if i < n // 3 else t for i, t in enumerate(torch.randint(0, 500, (n,), generator=g).tolist())]
            for n in (300, 77, 512, 129, 64, 250)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = sequence_logps(eager, seqs, "cuda", eos_id=511)
        b = sequence_logps(fast, seqs, "cuda", eos_id=511, padding_free=True)
    torch.testing.assert_close(b, a, rtol=2e-2, atol=0.5)
    weights = torch.linspace(-1, 1, len(seqs), device="cuda")
    (a * weights).sum().backward()
    (b * weights).sum().backward()
    assert_grads_near(eager, fast)
    # per token (GRPO's objective: the fused loss's reduction="none", logits recomputed in the backward)
    eager.zero_grad()
    fast.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = token_logps(eager, seqs, "cuda", eos_id=511)
        b = token_logps(fast, seqs, "cuda", eos_id=511, padding_free=True)
    assert (b - a).abs().mean() < 0.05
    weights = torch.randn(a.shape, generator=g).cuda()
    (a * weights).sum().backward()
    (b * weights).sum().backward()
    assert_grads_near(eager, fast, what=" (per token)")


def test_dpo_on_a_quantised_base_trains_like_its_dequantised_copy(tmp_path, capsys):
    """--lora-quantized-base: the adapters on the file's 4-bit blocks (dequantised per GEMM) give the
    losses of the same adapters on the dequantised weights, and the run resumes with its blocks."""
    from apr_kernels.cli import main
    from test_lora import QCFG, _quantised_file

    tok = byte_tokenizer()
    _quantised_file(tmp_path / "q.apr", QCFG.replace(vocab_size=pad_vocab(tok.vocab_size)), "APR_Q4")
    data = _pairs_file(tmp_path / "p.jsonl", THINGS)
    args = ["dpo", "--init", str(tmp_path / "q.apr"), "--tokenizer", "bytes", "--data", str(data), "--steps", "4",
            "--batch-size", "4", "--lr", "1e-2", "--beta", "0.5", "--max-len", "64", "--json", "--lora-rank", "4",
            "--save-every", "2"]
    losses = {}
    for name, extra in (("quantised", ["--lora-quantized-base"]), ("dequantised", [])):
        assert main([*args, *extra, "--out", str(tmp_path / name)]) == 0
        losses[name] = [json.loads(x)["loss"] for x in capsys.readouterr().out.splitlines()
                        if x.startswith('{"event": "train"')]
    assert losses["quantised"] == pytest.approx(losses["dequantised"], rel=1e-5)
    import apr_kernels

    for name, dtype in (("quantised", "APR_Q4"), ("dequantised", "F32")):  # the base as the step files hold it
        with apr_kernels.open(tmp_path / name / "step_000002.apr") as f:
            assert f.info("model.layers.0.mlp.up_proj.weight").dtype == dtype
    assert main(["dpo", "--resume", str(tmp_path / "quantised" / "step_000002.apr"), "--json", "--out",
                 str(tmp_path / "r")]) == 0
    resumed = [json.loads(x)["loss"] for x in capsys.readouterr().out.splitlines() if x.startswith('{"event": "train"')]
    assert resumed == losses["quantised"][2:]
    assert main(["dpo", "--init", str(tmp_path / "q.apr"), "--data", str(data), "--lora-quantized-base",
                 "--out", str(tmp_path / "x")]) == 1
    assert "--lora-quantized-base needs --lora-rank" in capsys.readouterr().err


def test_implicit_prompts_are_the_common_beginning_as_trl_extracts_them(tmp_path):
    """{"chosen", "rejected"} without a prompt (Anthropic HH's form): the prompt is their common
    beginning, characters of texts (a space before the difference left to the answers) or messages of
    conversations, and the pairs are those of the explicit records; a prompt of another format than the
    answers is replaced the same way."""
    from apr_kernels.tokenizer import Tokenizer
    from apr_kernels.train.chat import implicit_prompt

    assert implicit_prompt({"chosen": "The sky is blue.", "rejected": "The sky is green."}) == \
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    user = {"role": "user", "content": "What color is the sky?"}
    blue, green = {"role": "assistant", "content": "It is blue."}, {"role": "assistant", "content": "It is green."}
    got = implicit_prompt({"prompt": "What color is the sky?", "chosen": [user, blue], "rejected": [user, green]})
    assert got == {"prompt": [user], "chosen": [blue], "rejected": [green]}
    explicit = {"prompt": "x", "chosen": "y", "rejected": "z"}
    assert implicit_prompt(explicit) is explicit
    tok = Tokenizer.qwen2()
    (tmp_path / "i.jsonl").write_text(json.dumps({"chosen": "Q: hot? A: yes", "rejected": "Q: hot? A: no"}) + "\n"
                                      + json.dumps({"chosen": [user, blue], "rejected": [user, green]}) + "\n")
    (tmp_path / "e.jsonl").write_text(json.dumps({"prompt": "Q: hot? A:", "chosen": " yes", "rejected": " no"}) + "\n"
                                      + json.dumps({"prompt": [user], "chosen": [blue], "rejected": [green]}) + "\n")
    assert read_pairs([tmp_path / "i.jsonl"], tok, 64) == read_pairs([tmp_path / "e.jsonl"], tok, 64)


def test_sharegpt_records_read_as_messages(tmp_path):
    """ShareGPT's {"conversations": [{"from": "human" | "gpt", "value"}]} gives the ids and targets of
    the same conversation as messages, in supervised data and in preference pairs."""
    from apr_kernels.tokenizer import Tokenizer
    from apr_kernels.train.data import marked_ids, token_parts

    tok = Tokenizer.qwen2()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hot?"},
                {"role": "assistant", "content": "yes"}]
    share = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hot?"}, {"from": "gpt", "value": "yes"}]
    (tmp_path / "s.jsonl").write_text(json.dumps({"conversations": share}) + "\n")
    stream = torch.cat(list(token_parts([tmp_path / "s.jsonl"], tok))).tolist()
    assert stream == marked_ids({"messages": messages}, tok, "x")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"conversations": [share]}), tmp_path / "s.parquet")
    assert torch.cat(list(token_parts([tmp_path / "s.parquet"], tok))).tolist() == stream
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": share[:2], "chosen": [share[2]],
                                                  "rejected": [{"from": "gpt", "value": "no"}]}) + "\n")
    (pair,) = read_pairs([tmp_path / "p.jsonl"], tok, 64)
    assert tok.decode([t for t in pair[0] if t >= 0]).startswith("yes<|im_end|>")
    assert tok.decode([t if t >= 0 else -1 - t for t in pair[1]]).startswith("<|im_start|>system\nBe brief.")


def test_cpo_step_is_the_policy_margin_and_the_nll_written_out(tmp_path):
    """--reference-free with --sft-weight 1 (CPO): the step's loss is -log sigmoid(beta (pi_c - pi_r))
    averaged over pairs plus the chosen answers' NLL per token, from each answer's log-likelihood alone."""
    tok = byte_tokenizer()
    pairs = read_pairs([_pairs_file(tmp_path / "t.jsonl", THINGS[:4], chosen=" yes it is")], tok, 64)
    torch.manual_seed(0)
    model = Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(tok.vocab_size)), fast=False)
    oracle = Transformer(model.config, fast=False)
    oracle.load_state_dict(model.state_dict())
    cfg = TrainConfig(steps=1, batch_size=4, seq_len=64, lr=1e-3, warmup=1)
    rec = PreferenceTrainer(model, pairs, [], cfg, eos_id=tok.eos_id,
                            loss=PreferenceLoss(beta=0.5, sft_weight=1.0, reference_free=True)).train_step()
    logp = torch.stack([sequence_logps(oracle, list(pair), "cpu", eos_id=tok.eos_id) for pair in pairs]).double()
    n_chosen = sum(sum(t >= 0 for t in pair[0][1:]) for pair in pairs)
    want = -torch.nn.functional.logsigmoid(0.5 * (logp[:, 0] - logp[:, 1])).mean() - logp[:, 0].sum() / n_chosen
    assert rec["loss"] == pytest.approx(want.item(), rel=1e-5)


def test_dpo_of_a_mixture_of_experts_policy_adds_its_balance_terms(tmp_path):
    """A Qwen3-MoE policy: the step's objective is DPO's loss plus the policy forward's balance terms
    (router_aux_loss_coef x the load-balancing loss + router_z_loss_coef x the router z-loss, of the
    tokens inside the sequences: the padding left out), as TRL's DPO adds the model's aux loss; its
    gradients are that objective's written out, and the log holds the terms' measures."""
    import copy

    from apr_kernels.train.data import BatchStream

    tok = byte_tokenizer()
    train = read_pairs([_pairs_file(tmp_path / "t.jsonl", THINGS[:8], chosen=" yes it is")], tok, 64)
    torch.manual_seed(0)
    cfg_model = preset("tiny_qwen3_moe").replace(vocab_size=pad_vocab(tok.vocab_size), router_aux_loss_coef=0.2)
    model = Transformer(cfg_model, fast=False)
    model.router_z_loss_coef = 0.01
    oracle = copy.deepcopy(model)
    cfg = TrainConfig(steps=1, batch_size=4, seq_len=64, lr=3e-3, warmup=1)
    rec = PreferenceTrainer(model, train, [], cfg, eos_id=tok.eos_id, loss=PreferenceLoss(beta=0.5)).train_step()

    index = BatchStream(len(train), seed=cfg.seed).next(4)
    seqs = [s for i in index.tolist() for s in train[i]]
    with torch.no_grad():
        ref = sequence_logps(oracle.eval(), seqs, "cpu", eos_id=tok.eos_id).view(4, 2)
    pol = sequence_logps(oracle.train(), seqs, "cpu", eos_id=tok.eos_id).view(4, 2)
    balance = oracle.last_balance_loss
    torch.testing.assert_close(balance, 0.2 * oracle.router_aux_loss() + 0.01 * oracle.router_z_loss())
    h = (pol[:, 0] - ref[:, 0]) - (pol[:, 1] - ref[:, 1])
    dpo = -torch.nn.functional.logsigmoid(0.5 * h).mean()
    gate = dict(oracle.named_parameters())["model.layers.0.mlp.gate.weight"]
    without = torch.autograd.grad(dpo, gate, retain_graph=True)[0]
    (dpo + balance).backward()
    norm = torch.nn.utils.clip_grad_norm_(oracle.parameters(), cfg.grad_clip)
    assert rec["grad_norm"] == pytest.approx(float(norm), rel=1e-5)
    # the trainer's (clipped) gradients are the written-out objective's
    for (name, p), q in zip(model.named_parameters(), oracle.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)
    scale = min(1.0, cfg.grad_clip / float(norm))
    assert (gate.grad - without * scale).abs().max() > 1e-4  # (the router's gradient holds the terms')
    assert rec["loss"] == pytest.approx(math.log(2) + balance.item(), rel=1e-5)
    assert rec["aux_loss"] == pytest.approx(oracle.last_aux_loss.item(), rel=1e-5) and rec["aux_loss"] > 1.0
    assert rec["router_z_loss"] == pytest.approx(oracle.last_router_z_loss.item(), rel=1e-5)
    assert rec["expert_load"] >= 1.0


def test_cli_grad_checkpointing_recomputes_and_changes_nothing(tmp_path, capsys, monkeypatch):
    """--grad-checkpointing (every post-training command): the layers run under activation
    checkpointing, and the losses are those of the run without it."""
    from apr_kernels.cli import main
    import torch.utils.checkpoint as ckpt

    tok = byte_tokenizer()
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "init.apr", tokenizer=tok,
                    model=Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(tok.vocab_size)), fast=False))
    data = _pairs_file(tmp_path / "t.jsonl", THINGS[:8])
    args = ["dpo", "--init", str(tmp_path / "init.apr"), "--data", str(data), "--steps", "3", "--batch-size", "4",
            "--lr", "3e-3", "--max-len", "64", "--json", "--eval-fraction", "0.25"]
    runs = []
    calls = []
    real = ckpt.checkpoint
    monkeypatch.setattr(ckpt, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    for extra in ([], ["--grad-checkpointing"]):
        calls.clear()
        assert main([*args, *extra, "--out", str(tmp_path / ("b" if extra else "a"))]) == 0
        runs.append([json.loads(x)["loss"] for x in capsys.readouterr().out.splitlines() if '"event": "train"' in x])
        assert bool(calls) == bool(extra)
    assert runs[1] == pytest.approx(runs[0], rel=1e-6)


@pytest.mark.parametrize("kind", ["nca_pair", "sppo_hard", "exo_pair"])
def test_more_trl_losses_learn_the_preference(tmp_path, kind):
    tok = byte_tokenizer()
    train = read_pairs([_pairs_file(tmp_path / "t.jsonl", THINGS[:12])], tok, 64)
    held = read_pairs([_pairs_file(tmp_path / "h.jsonl", THINGS[12:])], tok, 64)
    torch.manual_seed(0)
    model = Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(tok.vocab_size)), fast=False)
    cfg = TrainConfig(steps=25, batch_size=4, seq_len=64, lr=3e-3, warmup=2, weight_decay=0.0)
    history = PreferenceTrainer(model, train, held, cfg, eos_id=tok.eos_id,
                                loss=PreferenceLoss(kind=kind, beta=0.5)).run()
    evals = [h for h in history if h["event"] == "eval"]
    assert evals[-1]["eval_reward_acc"] == 1.0 and evals[-1]["eval_margin"] > evals[0]["eval_margin"] + 1.0
