"""KTO (train/kto.py): the loss is TRL's formula, the KL estimate comes from mismatched pairs of the
batch, 0.5 at the start, a step's gradients equal the objective written out by hand, training makes
the desirable completions likelier on held-out prompts, and the command line resumes exactly."""

import json
import math

import pytest
import torch

from apr_kernels.model import Transformer, pad_vocab, preset
from apr_kernels.train.checkpoint import save_checkpoint
from apr_kernels.train.cli import byte_tokenizer
from apr_kernels.train.data import BatchStream
from apr_kernels.train.kto import KTOTrainer, kto_loss, read_examples
from apr_kernels.train.loop import TrainConfig
from apr_kernels.train.preference import sequence_logps

THINGS = ["fire", "lava", "the sun", "a stove", "an oven", "a kettle", "coal", "a candle", "a flame", "magma",
          "a furnace", "a heater", "steam", "a grill", "embers", "a torch"]


def _examples_file(path, things):
    """Unpaired feedback: ' yes' is good, ' no' is bad, alternating."""
    path.write_text("".join(json.dumps({"prompt": f"Is {t} hot? A:", "completion": " yes" if i % 2 == 0 else " no",
                                        "label": i % 2 == 0}) + "\n" for i, t in enumerate(things)))
    return path


def _model(tok, seed=0):
    torch.manual_seed(seed)
    return Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(tok.vocab_size)), fast=False)


def test_kto_loss_is_trls_formula():
    pol, ref = torch.tensor([-3.0, -1.0, -2.0], dtype=torch.float64), torch.tensor([-3.5, -0.5, -2.0],
                                                                                 dtype=torch.float64)
    labels = torch.tensor([True, False, True])
    beta, kl, wd, wu = 0.7, 0.2, 1.5, 0.5
    losses, rewards = kto_loss(pol, ref, torch.tensor(kl, dtype=torch.float64), labels, beta, wd, wu)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    r = [p - q for p, q in zip(pol.tolist(), ref.tolist())]
    want = [wd * (1 - sig(beta * (r[0] - kl))), wu * (1 - sig(beta * (kl - r[1]))), wd * (1 - sig(beta * (r[2] - kl)))]
    assert losses.tolist() == pytest.approx(want, rel=1e-12)
    assert rewards.tolist() == pytest.approx([beta * v for v in r])


def test_apo_zero_unpaired_is_trls_formula_and_learns_without_a_kl_pass(tmp_path):
    pol, ref = torch.tensor([-3.0, -1.0], dtype=torch.float64), torch.tensor([-3.5, -0.5], dtype=torch.float64)
    labels = torch.tensor([True, False])
    losses, _ = kto_loss(pol, ref, torch.tensor(9.0), labels, 0.7, 1.5, 0.5, loss_type="apo_zero_unpaired")
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    assert losses.tolist() == pytest.approx([1.5 * (1 - sig(0.7 * 0.5)), 0.5 * sig(0.7 * -0.5)], rel=1e-12)
    tok = byte_tokenizer()
    items, labels = read_examples([_examples_file(tmp_path / "e.jsonl", THINGS[:12])], tok, 64)
    held, held_labels = read_examples([_examples_file(tmp_path / "h.jsonl", THINGS[12:])], tok, 64)
    model = _model(tok)
    calls = []
    cfg = TrainConfig(steps=20, batch_size=4, seq_len=64, lr=3e-3, warmup=1)
    trainer = KTOTrainer(model, items, labels, held, held_labels, cfg, eos_id=tok.eos_id, beta=0.5,
                         loss_type="apo_zero_unpaired")
    model.register_forward_hook(lambda *a: calls.append(1))
    rec = trainer.train_step()
    assert rec["kl"] == 0.0 and len(calls) == 1  # one forward per micro-batch: no KL pairs
    trainer.run()
    last = trainer.evaluate()
    assert last["eval_reward_desirable"] > 0 > last["eval_reward_undesirable"]
    with pytest.raises(ValueError, match="--loss 'bco'; expected one of kto, apo_zero_unpaired"):
        KTOTrainer(model, items, labels, [], [], cfg, eos_id=tok.eos_id, loss_type="bco")


def test_examples_pair_each_prompt_with_the_next_completion(tmp_path):
    tok = byte_tokenizer()
    items, labels = read_examples([_examples_file(tmp_path / "e.jsonl", THINGS[:3])], tok, 64)
    assert labels == [True, False, True]
    text = lambda ids: tok.decode([t if t >= 0 else -1 - t for t in ids if (t if t >= 0 else -1 - t) != 256])  # noqa: E731
    assert text(items[0][0]) == "Is fire hot? A: yes" and text(items[0][1]) == "Is fire hot? A: no"
    assert text(items[2][1]) == "Is the sun hot? A: yes"  # the last prompt takes the first completion
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": "b", "label": "yes"}) + "\n")
    with pytest.raises(ValueError, match="'label' must be true"):
        read_examples([bad], tok, 64)


def test_one_step_is_the_objective_written_out(tmp_path):
    """z from the batch's mismatched pairs (policy minus reference, clamped at 0, no gradient), the
    per-example losses, their mean: the trainer's clipped gradients are those of this objective."""
    tok = byte_tokenizer()
    items, labels = read_examples([_examples_file(tmp_path / "e.jsonl", THINGS[:8])], tok, 64)
    cfg = TrainConfig(steps=2, batch_size=4, seq_len=64, lr=3e-2, warmup=1)
    trained = _model(tok)
    trainer = KTOTrainer(trained, items, labels, [], [], cfg, eos_id=tok.eos_id, beta=0.5)
    first = trainer.train_step()
    assert first["loss"] == pytest.approx(0.5, abs=1e-6) and first["kl"] == 0.0  # the policy is the reference
    rec = trainer.train_step()  # now z and the rewards are not 0

    model = _model(tok)
    ref = torch.stack([sequence_logps(model, list(it), "cpu", eos_id=tok.eos_id) for it in items]).detach()
    stream = BatchStream(len(items), seed=cfg.seed)
    stream.next(4)
    index = stream.next(4).tolist()
    # replay the first step on the copy to stand where the trainer stood before its second
    replay = KTOTrainer(model, items, labels, [], [], cfg, eos_id=tok.eos_id, beta=0.5, ref=(ref, None))
    replay.train_step()
    model.zero_grad()
    with torch.no_grad():
        z = max(0.0, sum(sequence_logps(model, [items[i][1]], "cpu", eos_id=tok.eos_id).item() - ref[i, 1].item()
                         for i in index) / 4)
    objective = 0.0
    for i in index:
        r = sequence_logps(model, [items[i][0]], "cpu", eos_id=tok.eos_id)[0] - ref[i, 0]
        objective = objective + (1 - torch.sigmoid(0.5 * ((r - z) if labels[i] else (z - r)))) / 4
    objective.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    assert rec["kl"] == pytest.approx(z, rel=1e-4, abs=1e-6) and rec["loss"] == pytest.approx(objective.item(), rel=1e-4)
    assert rec["grad_norm"] == pytest.approx(norm.item(), rel=1e-4)
    scale = max(p.grad.abs().max().item() for p in model.parameters())
    for (name, p), q in zip(model.named_parameters(), trained.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5 * scale, msg=name)


def test_cli_kto_learns_the_feedback_and_resumes_exactly(tmp_path, capsys):
    from apr_kernels.cli import main

    tok = byte_tokenizer()
    save_checkpoint(tmp_path / "init.apr", model=_model(tok), tokenizer=tok)
    train = _examples_file(tmp_path / "t.jsonl", THINGS[:12])
    held = _examples_file(tmp_path / "h.jsonl", THINGS[12:])
    args = ["kto", "--init", str(tmp_path / "init.apr"), "--data", str(train), "--eval-data", str(held),
            "--steps", "20", "--batch-size", "4", "--lr", "3e-3", "--beta", "0.5", "--max-len", "64", "--json",
            "--save-every", "10", "--out", str(tmp_path / "o")]
    assert main(args) == 0
    recs = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    evals = [r for r in recs if r["event"] == "eval"]
    assert evals[0]["eval_loss"] == pytest.approx(0.5, abs=1e-6)
    assert evals[-1]["eval_reward_desirable"] > 0.5 > -0.5 > evals[-1]["eval_reward_undesirable"]
    assert evals[-1]["eval_loss"] < 0.4
    losses = [r["loss"] for r in recs if r["event"] == "train"]
    assert main(["kto", "--resume", str(tmp_path / "o" / "step_000010.apr"), "--json", "--out",
                 str(tmp_path / "r")]) == 0
    resumed = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [r["loss"] for r in resumed if r["event"] == "train"] == losses[10:]
