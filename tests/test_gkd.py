"""GKD (train/gkd.py): records read in TRL's formats, each micro-batch's completions from the coin's
source (the student's or the teacher's samples, equal to decoding each prompt alone with its seeded
generator, or the data's), a step's loss and gradients equal the generalized JSD written out by hand
over the step's completion tokens, a student pulled towards a teacher on held-out records, and the
command line resumes exactly."""

import json
import math

import pytest
import torch

from apr_kernels.model import Transformer, pad_vocab, preset
from apr_kernels.train.checkpoint import save_checkpoint
from apr_kernels.train.cli import byte_tokenizer
from apr_kernels.train.gkd import GKDTrainer, read_records
from apr_kernels.train.loop import TrainConfig

WORDS = ["fire", "lava", "the sun", "a stove", "an oven", "a kettle", "coal", "a candle", "a flame", "magma",
         "a furnace", "a heater", "steam", "a grill", "embers", "a torch"]


def _records_file(path, words):
    path.write_text("".join(json.dumps({"prompt": f"Is {w} hot?", "completion": " yes, very"}) + "\n" for w in words))
    return path


def _models(tok, seed=0):
    vocab = pad_vocab(tok.vocab_size)
    torch.manual_seed(seed)
    student = Transformer(preset("tiny_qwen2").replace(vocab_size=vocab), fast=False)
    teacher = Transformer(preset("tiny_llama").replace(vocab_size=vocab), fast=False)
    with torch.no_grad():  # a confident teacher (random models are near uniform: little to learn)
        teacher.model.embed_tokens.weight.mul_(5)
    return student, teacher.requires_grad_(False).eval()


def _jsd(s_logits, t_logits, beta):
    """TRL's generalized JSD per position (fp64), written out with F.kl_div as TRL writes it."""
    import torch.nn.functional as F

    log_q, log_p = F.log_softmax(s_logits.double(), -1), F.log_softmax(t_logits.double(), -1)
    if beta == 0:
        return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    if beta == 1:
        return F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    b = torch.tensor(beta, dtype=torch.float64)
    log_m = torch.logsumexp(torch.stack([log_q + torch.log(1 - b), log_p + torch.log(b)]), 0)
    return (beta * F.kl_div(log_m, log_p, log_target=True, reduction="none").sum(-1)
            + (1 - beta) * F.kl_div(log_m, log_q, log_target=True, reduction="none").sum(-1))


def test_records_in_trls_formats(tmp_path):
    from apr_kernels.tokenizer import Tokenizer

    tok = byte_tokenizer()
    records = read_records([_records_file(tmp_path / "r.jsonl", ["fire"])], tok, 64, 64)
    (r,) = records
    assert tok.decode(r["ids"]) == "Is fire hot?" and r["stops"] == [tok.eos_id]
    assert tok.decode([t for t in r["seq"] if t >= 0]) == " yes, very<|endoftext|>"
    qwen = Tokenizer.qwen2()
    chat = tmp_path / "c.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hot?"},
                                             {"role": "assistant", "content": "yes"}]}) + "\n")
    (c,) = read_records([chat], qwen, 64, 64)
    assert qwen.decode(c["ids"]).endswith("<|im_start|>assistant\n") and len(c["stops"]) == 2
    assert qwen.decode([t for t in c["seq"] if t >= 0]).startswith("yes<|im_end|>")
    for bad, message in [({"messages": [{"role": "user", "content": "x"}]}, "must end with the assistant's answer"),
                         ({"prompt": "x"}, "needs 'prompt' and 'completion', or 'messages'")]:
        (tmp_path / "b.jsonl").write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=message):
            read_records([tmp_path / "b.jsonl"], tok, 64, 64)


@pytest.mark.parametrize("lmbda,seq_kd,beta", [(0.0, False, 0.5), (1.0, False, 0.5), (0.0, True, 1.0),
                                               (0.5, False, 0.0)],
                         ids=["data-jsd", "on-policy-jsd", "teacher-sampled-reverse-kl", "coin-forward-kl"])
def test_a_step_is_the_divergence_written_out_on_the_coins_completions(tmp_path, lmbda, seq_kd, beta):
    """Two micro-batches: each one's completions are the source its coin names (sampled ones equal
    decoding each prompt alone with its generator), and the step's loss, ce and gradients are those
    of the mean divergence over all the step's completion tokens, from logits written out."""
    from apr_kernels.model.generate import generate

    tok = byte_tokenizer()
    records = read_records([_records_file(tmp_path / "r.jsonl", WORDS[:8])], tok, 64, 64)
    student, teacher = _models(tok)
    oracle = Transformer(student.config, fast=False)
    oracle.load_state_dict(student.state_dict())
    cfg = TrainConfig(steps=1, batch_size=2, grad_accum=2, seq_len=64, lr=1e-3, warmup=1)
    trainer = GKDTrainer(student, teacher, records, [], cfg, tokenizer=tok, lmbda=lmbda, beta=beta, seq_kd=seq_kd,
                         max_new_tokens=6)
    sources = [trainer.source_of(m) for m in range(2)]
    from apr_kernels.train.data import BatchStream

    stream = BatchStream(len(records), seed=cfg.seed)
    micro = [[records[i] for i in stream.next(2).tolist()] for _ in range(2)]
    expected = []
    for m, (source, recs) in enumerate(zip(sources, micro)):
        seqs = []
        for place, r in enumerate(recs):
            if source == "data":
                seqs.append(r["seq"])
                continue
            g = torch.Generator().manual_seed(((cfg.seed * 1_000_003 + 0) * 1_000_033 + m) * 10_007 + place)
            model = oracle if source == "student" else teacher
            new = generate(model, torch.tensor([r["ids"]]), 6, temperature=0.9, eos_id=tok.eos_id, generator=g,
                           vocab_size=tok.vocab_size)[0].tolist()
            seqs.append([-1 - t for t in r["ids"]] + new[len(r["ids"]):])
        expected.append(seqs)
    rec = trainer.train_step()
    assert rec["on_policy"] == sources.count("student") / 2 and rec["teacher_sampled"] == sources.count("teacher") / 2
    if lmbda == 0.5:
        assert set(sources) <= {"student", "data"}
    divergence = ce = 0.0
    n = 0
    for seqs in expected:
        for s in seqs:
            ids = torch.tensor([[t if t >= 0 else -1 - t for t in s]])
            target = torch.tensor([t >= 0 for t in s[1:]])
            s_logits, t_logits = oracle(ids[:, :-1])[0], teacher(ids[:, :-1])[0]
            divergence = divergence + _jsd(s_logits, t_logits, beta)[target].sum()
            ce = ce + torch.nn.functional.cross_entropy(s_logits.double()[target], ids[0, 1:][target], reduction="sum")
            n += int(target.sum())
    (divergence / n).backward()
    assert rec["tokens"] == n
    assert rec["loss"] == pytest.approx(divergence.item() / n, rel=1e-5)
    assert rec["ce"] == pytest.approx(ce.item() / n, rel=1e-5)
    norm = torch.nn.utils.clip_grad_norm_(oracle.parameters(), cfg.grad_clip)
    assert rec["grad_norm"] == pytest.approx(norm.item(), rel=1e-4)
    scale = max(p.grad.abs().max().item() for p in oracle.parameters())
    for (name, p), q in zip(oracle.named_parameters(), student.parameters()):
        torch.testing.assert_close(q.grad, p.grad.float(), rtol=1e-3, atol=1e-5 * scale, msg=name)


def test_the_coin_follows_lmbda():
    tok = byte_tokenizer()
    student, teacher = _models(tok)
    records = [{"prompt": "a", "ids": [97], "stops": [256], "seq": [-98, 98, 256]}]
    trainer = GKDTrainer(student, teacher, records, [], TrainConfig(steps=1, batch_size=1), tokenizer=tok, lmbda=0.3,
                         seq_kd=True)
    coins = []
    for step in range(400):
        trainer.step = step
        coins.append(trainer.source_of(0))
    assert set(coins) == {"student", "teacher"} and abs(coins.count("student") / 400 - 0.3) < 0.06
    with pytest.raises(ValueError, match="--lmbda 1.5 and --beta 0.5; expected both in"):
        GKDTrainer(student, teacher, records, [], TrainConfig(), tokenizer=tok, lmbda=1.5)


def test_cli_gkd_pulls_the_student_to_the_teacher_and_resumes_exactly(tmp_path, capsys):
    from apr_kernels.cli import main

    tok = byte_tokenizer()
    student, teacher = _models(tok)
    save_checkpoint(tmp_path / "student.apr", model=student, tokenizer=tok)
    save_checkpoint(tmp_path / "teacher.apr", model=teacher, tokenizer=tok)
    train = _records_file(tmp_path / "t.jsonl", WORDS[:12])
    held = _records_file(tmp_path / "h.jsonl", WORDS[12:])
    args = ["gkd", "--init", str(tmp_path / "student.apr"), "--teacher", str(tmp_path / "teacher.apr"),
            "--data", str(train), "--eval-data", str(held), "--steps", "16", "--batch-size", "4",
            "--max-new-tokens", "8", "--max-prompt-len", "32", "--lr", "1e-2", "--json", "--save-every", "8",
            "--out", str(tmp_path / "o")]
    assert main(args) == 0
    recs = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    evals = [r for r in recs if r["event"] == "eval"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] / 2  # the JSD to the teacher on held-out records
    train_recs = [r for r in recs if r["event"] == "train"]
    assert 0 < sum(r["on_policy"] for r in train_recs) < len(train_recs)  # both sources were drawn
    assert main(["gkd", "--resume", str(tmp_path / "o" / "step_000008.apr"), "--json", "--out",
                 str(tmp_path / "r")]) == 0
    resumed = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [r["loss"] for r in resumed if r["event"] == "train"] == [r["loss"] for r in train_recs[8:]]
    assert math.isfinite(evals[-1]["eval_ce"])
