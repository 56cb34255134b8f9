"""Reward models (model.num_labels, train/reward.py): scores equal transformers' *ForSequenceClassification
(padded and packed, eager, reference and Triton paths), a causal LM becomes a reward model with a
seeded new head, classifier files are refused where a causal LM is expected, the loss is TRL's
formula, a step's gradients are the objective written out by hand, a toy preference is learned, and
the command line resumes exactly."""

import json
import math

import pytest
import torch

from apr_kernels.model import Transformer, pad_vocab, preset
from apr_kernels.model.transformer import sequence_ends
from apr_kernels.train.checkpoint import save_checkpoint
from apr_kernels.train.cli import byte_tokenizer
from apr_kernels.train.data import BatchStream
from apr_kernels.train.loop import TrainConfig
from apr_kernels.train.reward import RewardTrainer, read_pairs, reward_loss, sequence_rewards
from kernel_helpers import assert_grads_near

THINGS = ["fire", "lava", "the sun", "a stove", "an oven", "a kettle", "coal", "a candle", "a flame", "magma",
          "a furnace", "a heater", "steam", "a grill", "embers", "a torch"]


def _pairs_file(path, things, chosen=" yes", rejected=" no", **extra):
    path.write_text("".join(json.dumps({"prompt": f"Is {t} hot? A:", "chosen": chosen, "rejected": rejected, **extra})
                            + "\n" for t in things))
    return path


def _model(tok, seed=0, **changes):
    torch.manual_seed(seed)
    return Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(tok.vocab_size), num_labels=1, **changes),
                       fast=False)


def _hf_classifier(cfg, pad_id):
    """transformers' *ForSequenceClassification with test_model's far-from-init weights."""
    transformers = pytest.importorskip("transformers")
    from test_model import hf_model

    causal = hf_model(cfg.replace(num_labels=None))
    config = causal.config
    config.num_labels, config.pad_token_id = cfg.num_labels, pad_id
    cls = {"qwen2": transformers.Qwen2ForSequenceClassification,
           "llama": transformers.LlamaForSequenceClassification}[cfg.architecture]
    hf = cls(config)
    state = {k: v for k, v in causal.state_dict().items() if k.startswith("model.")}
    hf.load_state_dict(state, strict=False)
    with torch.no_grad():
        hf.score.weight.normal_(0, 0.3)
    return hf.eval()


def _ours(hf, cfg):
    ours = Transformer(cfg, fast=False).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # the same names: model.* and score.weight
    return ours


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_scores_match_transformers_sequence_classification(arch):
    """Right-padded rows pooled at each row's last real token, as Hugging Face pools at the last
    non-padding token; parameter names and shapes are Hugging Face's."""
    from test_model import LLAMA, QWEN

    cfg = (QWEN if arch == "qwen2" else LLAMA).replace(num_labels=2)
    pad = cfg.vocab_size - 1
    hf = _hf_classifier(cfg, pad)
    ours = _ours(hf, cfg)
    assert not hasattr(ours, "lm_head") and tuple(ours.score.weight.shape) == (2, cfg.hidden_size)
    assert sum(p.numel() for p in ours.parameters()) == cfg.num_parameters()
    g = torch.Generator().manual_seed(1)
    lengths = [11, 4, 17]
    x = torch.full((3, 17), pad)
    for i, n in enumerate(lengths):
        x[i, :n] = torch.randint(0, pad, (n,), generator=g)
    with torch.no_grad():
        want = hf(x, attention_mask=(x != pad).long()).logits
        got = ours(x, ends=sequence_ends(lengths, 17))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert ours(x).shape == (3, 17, 2)  # unpooled: every position's scores
    with pytest.raises(ValueError, match="sequence classifier .* without targets"):
        ours(x, x)
    with pytest.raises(ValueError, match="no output projection"):
        ours.output_weight


@pytest.mark.parametrize("backend_name,padding_free", [("eager", False), ("eager", True), ("reference", True),
                                                       ("triton", True)])
def test_sequence_rewards_are_transformers_scores_of_each_sequence_alone(use_backend, monkeypatch, backend_name,
                                                                         padding_free):
    """Padded rows or one packed row (each sequence a document), through the eager path, the fused
    path's reference code and the Triton kernels (interpreter): each sequence's reward equals the
    transformers classifier run on that sequence alone."""
    from kernel_helpers import spy_launchers
    from test_model import QWEN

    cfg = QWEN.replace(hidden_size=112, num_labels=1)
    hf = _hf_classifier(cfg, cfg.vocab_size - 1)
    ours = _ours(hf, cfg)
    ours.fast = backend_name != "eager"
    if ours.fast:
        use_backend(backend_name)
    calls = spy_launchers(monkeypatch, "attention", ("attention_fwd",))
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, cfg.vocab_size - 1, (n,), generator=g).tolist() for n in (9, 14, 5)]
    with torch.no_grad():
        got = sequence_rewards(ours, seqs, "cpu", pad_id=cfg.vocab_size - 1, padding_free=padding_free)
        want = torch.cat([hf(torch.tensor([s])).logits[:, 0] for s in seqs])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert bool(calls) == (backend_name == "triton")


def test_a_causal_lm_becomes_a_reward_model_and_files_say_which_they_are(tmp_path):
    """from_apr(num_labels=1) of a causal LM: its body, a new head drawn normal(0, 0.02) from the seed;
    the saved reward model records its class and loads back as it was; each kind of file is refused
    where the other is expected, by name."""
    import apr_kernels
    from apr_kernels.model import from_apr
    from apr_kernels.model.loading import PreflightError, load_classifier

    tok = byte_tokenizer()
    torch.manual_seed(0)
    lm = Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(tok.vocab_size)))
    save_checkpoint(tmp_path / "lm.apr", model=lm, tokenizer=tok)
    rm = from_apr(tmp_path / "lm.apr", num_labels=1, score_seed=3)
    lm_params = dict(lm.named_parameters())
    for name, p in rm.named_parameters():
        if name != "score.weight":
            assert torch.equal(p, lm_params[name]), name
    head = rm.score.weight
    again = from_apr(tmp_path / "lm.apr", num_labels=1, score_seed=3).score.weight
    other = from_apr(tmp_path / "lm.apr", num_labels=1, score_seed=4).score.weight
    assert torch.equal(head, again) and not torch.equal(head, other)
    assert abs(head.std().item() - 0.02) < 0.006 and abs(head.mean().item()) < 0.005

    with torch.no_grad():
        rm.score.weight.normal_(0, 1)  # a trained head
    save_checkpoint(tmp_path / "rm.apr", model=rm, tokenizer=tok)
    with apr_kernels.open(tmp_path / "rm.apr") as f:
        assert f.metadata["hf_architecture"] == "Qwen2ForSequenceClassification" and f.metadata["num_labels"] == 1
        assert "lm_head.weight" not in f and "score.weight" in f
    loaded = load_classifier(tmp_path / "rm.apr")
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), rm(x))
    assert torch.equal(from_apr(tmp_path / "rm.apr", num_labels=1).score.weight, rm.score.weight)  # not drawn anew
    with pytest.raises(PreflightError, match=r"rm.apr: a sequence classifier .*num_labels=1.*expected a causal LM"):
        from_apr(tmp_path / "rm.apr")
    with pytest.raises(PreflightError, match=r"rm.apr: a sequence classifier with num_labels=1; expected 3 labels"):
        from_apr(tmp_path / "rm.apr", num_labels=3)
    with pytest.raises(PreflightError, match=r"lm.apr: a causal LM .*expected a sequence classifier"):
        load_classifier(tmp_path / "lm.apr")


def test_reward_loss_is_trls_formula():
    c, r = torch.tensor([1.5, -0.2, 0.3], dtype=torch.float64), torch.tensor([0.5, 0.4, 0.3], dtype=torch.float64)
    m = torch.tensor([0.0, 1.0, -0.5], dtype=torch.float64)
    log_sigmoid = lambda v: -math.log1p(math.exp(-v))  # noqa: E731
    want = [-log_sigmoid(a - b - d) + 0.01 * (a + b) ** 2 for a, b, d in zip(c.tolist(), r.tolist(), m.tolist())]
    assert reward_loss(c, r, m, 0.01).tolist() == pytest.approx(want, rel=1e-12)
    assert reward_loss(c, r).tolist() == pytest.approx([-log_sigmoid(a - b) for a, b in zip(c.tolist(), r.tolist())])


def test_pairs_read_trls_formats_and_leave_out_too_long_ones(tmp_path):
    tok = byte_tokenizer()
    explicit = _pairs_file(tmp_path / "e.jsonl", ["fire"], margin=2)
    implicit = tmp_path / "i.jsonl"
    implicit.write_text(json.dumps({"chosen": "Is fire hot? A: yes", "rejected": "Is fire hot? A: no"}) + "\n"
                        + json.dumps({"chosen": "x" * 80, "rejected": "y"}) + "\n")
    pairs, margins, dropped = read_pairs([explicit, implicit], tok, 64)
    assert len(pairs) == 2 and dropped == 1 and margins == [2.0, 0.0]
    assert pairs[0] == pairs[1]  # the prompt given apart or inside the text: the same sequences
    assert tok.decode(pairs[0][0][:-1]) == "Is fire hot? A: yes" and pairs[0][0][-1] == tok.eos_id
    from apr_kernels.tokenizer import Tokenizer

    qwen = Tokenizer.qwen2()
    chat = tmp_path / "c.jsonl"
    turns = {"chosen": [{"role": "assistant", "content": "yes"}], "rejected": [{"role": "assistant", "content": "no"}]}
    chat.write_text(json.dumps({"prompt": [{"role": "user", "content": "hot?"}], **turns}) + "\n"
                    + json.dumps({k: [{"role": "user", "content": "hot?"}] + v for k, v in turns.items()}) + "\n")
    ((c, r), implicit_chat), _, _ = read_pairs([chat], qwen, 200)
    assert implicit_chat == (c, r) and c[-1] == r[-1] == qwen.eos_id
    assert qwen.decode(c).endswith("<|im_start|>user\nhot?<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n"
                                   "<|endoftext|>")
    for bad, message in [({"chosen": "a"}, "needs 'chosen' and 'rejected'"),
                         ({"chosen": "a", "rejected": "b", "margin": "big"}, "'margin' must be a finite number")]:
        (tmp_path / "b.jsonl").write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=message):
            read_pairs([tmp_path / "b.jsonl"], tok, 64)
    with pytest.raises(ValueError, match="no usable pairs .*1 longer than --max-len 8"):
        read_pairs([_pairs_file(tmp_path / "l.jsonl", ["fire"])], tok, 8)


def test_one_step_is_the_objective_written_out(tmp_path):
    """Two accumulated micro-batches with margins and the centring term: the trainer's loss, accuracy,
    clipped gradients are those of the mean per-pair objective over the step, each reward computed
    from its sequence alone."""
    tok = byte_tokenizer()
    pairs, _, _ = read_pairs([_pairs_file(tmp_path / "p.jsonl", THINGS[:8])], tok, 64)
    margins = [0.1 * i for i in range(8)]
    cfg = TrainConfig(steps=2, batch_size=2, grad_accum=2, seq_len=64, lr=3e-2, warmup=1)
    trained = _model(tok)
    trainer = RewardTrainer(trained, pairs, margins, [], [], cfg, eos_id=tok.eos_id, center_coefficient=0.05)
    trainer.train_step()
    rec = trainer.train_step()

    model = _model(tok)
    replay = RewardTrainer(model, pairs, margins, [], [], cfg, eos_id=tok.eos_id, center_coefficient=0.05)
    replay.train_step()  # stand where the trainer stood before its second step
    model.zero_grad()
    stream = BatchStream(len(pairs), seed=cfg.seed)
    stream.next(2), stream.next(2)
    index = stream.next(2).tolist() + stream.next(2).tolist()
    objective, correct = 0.0, 0
    for i in index:
        rc, rr = (model(torch.tensor([s]), ends=torch.tensor([len(s) - 1]))[0, 0] for s in pairs[i])
        objective = objective + (-torch.nn.functional.logsigmoid(rc - rr - margins[i]) + 0.05 * (rc + rr) ** 2) / 4
        correct += int(rc > rr)
    objective.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    assert rec["loss"] == pytest.approx(objective.item(), rel=1e-4) and rec["accuracy"] == correct / 4
    assert rec["grad_norm"] == pytest.approx(norm.item(), rel=1e-4)
    scale = max(p.grad.abs().max().item() for p in model.parameters())
    for (name, p), q in zip(model.named_parameters(), trained.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5 * scale, msg=name)


def test_padding_free_batches_train_like_padded_ones(tmp_path):
    tok = byte_tokenizer()
    pairs, margins, _ = read_pairs([_pairs_file(tmp_path / "p.jsonl", THINGS[:8], chosen=" yes it is")], tok, 64)
    cfg = TrainConfig(steps=3, batch_size=4, seq_len=64, lr=1e-2, warmup=1)
    runs = []
    for padding_free in (False, True):
        trainer = RewardTrainer(_model(tok), pairs, margins, [], [], cfg, eos_id=tok.eos_id, padding_free=padding_free)
        runs.append([trainer.train_step()["loss"] for _ in range(3)])
    assert runs[0] == pytest.approx(runs[1], rel=1e-5)


def test_lora_trains_the_adapters_and_the_new_head(tmp_path):
    from apr_kernels.model.lora import add_lora

    model = _model(byte_tokenizer())
    add_lora(model, rank=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and all(".lora_" in n or n == "score.weight" for n in trainable)


def test_cli_reward_learns_the_preference_resumes_exactly_and_scores_grpo_completions(tmp_path, capsys):
    """A reward model from a causal LM: held-out accuracy 0.5 -> 1 on a toy preference, exact
    resume, and `grpo --reward model.apr` scores completions with it as it scores them alone."""
    from apr_kernels.cli import main
    from apr_kernels.model.loading import load_classifier
    from apr_kernels.train.grpo import load_reward

    tok = byte_tokenizer()
    torch.manual_seed(0)
    lm = Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(tok.vocab_size)))
    save_checkpoint(tmp_path / "init.apr", model=lm, tokenizer=tok)
    train = _pairs_file(tmp_path / "t.jsonl", THINGS[:12])
    held = _pairs_file(tmp_path / "h.jsonl", THINGS[12:])
    args = ["reward", "--init", str(tmp_path / "init.apr"), "--data", str(train), "--eval-data", str(held),
            "--steps", "20", "--batch-size", "4", "--lr", "3e-3", "--max-len", "64", "--json",
            "--save-every", "10", "--out", str(tmp_path / "o")]
    assert main(args) == 0
    recs = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    start = next(r for r in recs if r["event"] == "start")
    assert start["pairs"] == 12 and start["new_score_head"] is True
    evals = [r for r in recs if r["event"] == "eval"]
    assert evals[-1]["eval_accuracy"] == 1.0 and evals[-1]["eval_margin"] > 1.0
    assert evals[-1]["eval_loss"] < 0.3 < evals[0]["eval_loss"]
    losses = [r["loss"] for r in recs if r["event"] == "train"]
    assert main(["reward", "--resume", str(tmp_path / "o" / "step_000010.apr"), "--json", "--out",
                 str(tmp_path / "r")]) == 0
    resumed = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [r["loss"] for r in resumed if r["event"] == "train"] == losses[10:]

    rm_path = tmp_path / "o" / "model.apr"
    assert main(["eval", "--init", str(rm_path), "--pairs", str(held), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert ev["pairs"] == 4 and ev["accuracy"] == evals[-1]["eval_accuracy"]
    assert ev["margin"] == pytest.approx(evals[-1]["eval_margin"], rel=1e-5)
    assert ev["loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-5)
    assert main(["eval", "--init", str(tmp_path / "init.apr"), "--pairs", str(held)]) != 0
    assert "init.apr: a causal LM (no score head" in capsys.readouterr().err
    rm = load_classifier(rm_path)
    score = load_reward(str(rm_path))
    prompts, completions = ["Is lava hot? A:", "Is coal hot? A:"], [" yes", " no"]
    got = score(prompts=prompts, completions=completions, completion_ids=[[0], [0]])
    seqs = [tok.encode(p + c) + [tok.eos_id] for p, c in zip(prompts, completions)]
    with torch.no_grad():
        want = [rm(torch.tensor([s]), ends=torch.tensor([len(s) - 1]))[0, 0].item() for s in seqs]
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6) and got[0] > got[1]


def test_hugging_face_reward_models_convert_and_export_both_ways(tmp_path):
    """A transformers Qwen2ForSequenceClassification folder -> `convert` -> APR (num_labels, no output head
    copy) scores as transformers does; `export` writes a folder AutoModelForSequenceClassification loads
    with the same scores; GGUF export refuses it by name."""
    import apr_kernels
    from apr_kernels.cli import main
    from apr_kernels.model.loading import load_classifier
    from test_model import QWEN

    transformers = pytest.importorskip("transformers")
    cfg = QWEN.replace(num_labels=1)
    hf = _hf_classifier(cfg, None)
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "rm.apr")]) == 0
    with apr_kernels.open(tmp_path / "rm.apr") as f:
        assert f.metadata["num_labels"] == 1 and "lm_head.weight" not in f
    x = torch.randint(0, cfg.vocab_size, (1, 13))
    ours = load_classifier(tmp_path / "rm.apr")
    with torch.no_grad():
        want = hf(x).logits
        torch.testing.assert_close(ours(x, ends=torch.tensor([12])), want, rtol=1e-5, atol=1e-5)
    assert main(["export", str(tmp_path / "rm.apr"), str(tmp_path / "out")]) == 0
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out",
                                                                            attn_implementation="eager").eval()
    assert type(again).__name__ == "Qwen2ForSequenceClassification" and again.config.num_labels == 1
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"rm.apr: a sequence classifier .*expected a causal LM"):
        from apr_kernels.convert.gguf_out import export_gguf

        export_gguf(tmp_path / "rm.apr", tmp_path / "rm.gguf")


@pytest.mark.cuda
def test_gpu_padding_free_rewards_match_padded_eager():
    """Qwen2-0.5B layer shapes on the GPU under bf16 autocast: the rewards of a packed row through the
    varlen kernels, and their gradients, against padded rows on the eager path."""
    cfg = preset("qwen2_0_5b").replace(num_layers=2, vocab_size=512, num_labels=1)
    torch.manual_seed(0)
    eager = Transformer(cfg, fast=False).cuda()
    fast = Transformer(cfg, fast=True).cuda()
    fast.load_state_dict(eager.state_dict())
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 500, (n,), generator=g).tolist() for n in (300, 77, 512, 129, 64, 250)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = sequence_rewards(eager, seqs, "cuda", pad_id=511)
        b = sequence_rewards(fast, seqs, "cuda", pad_id=511, padding_free=True)
    torch.testing.assert_close(b, a, rtol=5e-2, atol=5e-2)
    weights = torch.linspace(-1, 1, len(seqs), device="cuda")
    (a * weights).sum().backward()
    (b * weights).sum().backward()
    assert_grads_near(eager, fast)


def test_cli_reward_with_lora_resumes_exactly_and_merges_at_the_end(tmp_path, capsys):
    """reward --lora-rank: adapters and the new head train; a step checkpoint keeps the adapters and
    resumes exactly; the final model.apr is a plain reward model (adapters merged) that continues as
    --init with its own head."""
    import apr_kernels
    from apr_kernels.cli import main
    from apr_kernels.model.loading import load_classifier

    tok = byte_tokenizer()
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "init.apr", tokenizer=tok,
                    model=Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(tok.vocab_size))))
    data = _pairs_file(tmp_path / "t.jsonl", THINGS)
    args = ["reward", "--init", str(tmp_path / "init.apr"), "--data", str(data), "--steps", "4", "--batch-size", "4",
            "--lr", "1e-2", "--lora-rank", "2", "--json", "--save-every", "2", "--out", str(tmp_path / "o")]
    assert main(args) == 0
    recs = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    start = next(r for r in recs if r["event"] == "start")
    # rank 2 on q, k, v, o, gate, up, down of both layers (2 x 1568) plus the whole score head (56)
    assert start["lora_rank"] == 2 and start["trainable"] == 2 * 1568 + 56
    losses = [r["loss"] for r in recs if r["event"] == "train"]
    with apr_kernels.open(tmp_path / "o" / "step_000002.apr") as f:
        assert "score.weight" in f and any(k.endswith(".lora_A") for k in f.keys())
    assert main(["reward", "--resume", str(tmp_path / "o" / "step_000002.apr"), "--json", "--out",
                 str(tmp_path / "r")]) == 0
    resumed = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [r["loss"] for r in resumed if r["event"] == "train"] == losses[2:]
    final = load_classifier(tmp_path / "o" / "model.apr")
    assert getattr(final, "lora", None) is None
    assert main(["reward", "--init", str(tmp_path / "o" / "model.apr"), "--data", str(data), "--steps", "1",
                 "--batch-size", "4", "--json", "--out", str(tmp_path / "again")]) == 0
    again = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert next(r for r in again if r["event"] == "start")["new_score_head"] is False


def test_lora_reward_checkpoint_exports_as_a_peft_sequence_classification_adapter(tmp_path):
    """`export STEP.apr DIR --adapter` of a LoRA reward run: a SEQ_CLS adapter with the trained score head
    (modules_to_save) that PEFT puts on AutoModelForSequenceClassification of the exported base, scoring
    as our model does."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from apr_kernels.cli import main
    from apr_kernels.model.lora import add_lora

    torch.manual_seed(0)
    lm = Transformer(preset("tiny_qwen2"), fast=False)
    save_checkpoint(tmp_path / "base.apr", model=lm)
    from apr_kernels.model import from_apr

    rm = from_apr(tmp_path / "base.apr", num_labels=1, fast=False)
    add_lora(rm, 4, 8.0, ["q_proj", "v_proj", "up_proj"])
    with torch.no_grad():
        for name, p in rm.named_parameters():
            if ".lora_B" in name or name == "score.weight":
                p.normal_(0, 0.2)
    save_checkpoint(tmp_path / "step.apr", model=rm)
    assert main(["export", str(tmp_path / "base.apr"), str(tmp_path / "hf"), "-q"]) == 0
    assert main(["export", str(tmp_path / "step.apr"), str(tmp_path / "adapter"), "--adapter", "-q"]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", num_labels=1).eval()
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = torch.randint(0, lm.config.vocab_size, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, rm.eval()(x, ends=torch.tensor([10])), rtol=1e-5, atol=1e-5)
