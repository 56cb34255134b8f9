"""GRPO (train/grpo.py): group advantages and reward scoring as TRL defines them, one step equal to
AdamW on the policy-gradient objective written out by hand, the reward rising on a toy task, chat
prompts handed to reward functions in TRL's conversational form, and exact resume from the CLI."""

import json
import math
import statistics

import apr_kernels
import pytest
import torch

from apr_kernels.model import Transformer, pad_vocab, preset
from apr_kernels.train.checkpoint import save_checkpoint
from apr_kernels.train.cli import byte_tokenizer
from apr_kernels.train.data import BatchStream
from apr_kernels.train.grpo import GRPOTrainer, group_advantages, load_reward, read_prompts, score
from apr_kernels.train.loop import TrainConfig

REWARDS = '''
def letters(prompts, completions, **kw):
    """Share of the completion that is lowercase ASCII letters (random bytes: about 1 in 10)."""
    return [sum(c.isascii() and c.islower() for c in text) / max(1, len(text)) for text in completions]
'''


def _letters(completions):
    return [sum(c.isascii() and c.islower() for c in t) / max(1, len(t)) for t in completions]


def _model(tok, seed=0):
    torch.manual_seed(seed)
    return Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(tok.vocab_size)), fast=False)


def _prompts_file(path, prompts, **fields):
    path.write_text("".join(json.dumps({"prompt": p, **fields}) + "\n" for p in prompts))
    return path


def _cli_run(tmp_path, command: str, *, held: bool = True) -> list[str]:
    """The shared start of a sampling command's CLI test: --init (``_model`` with the byte tokenizer),
    the ``letters`` reward, four training prompts (and three held-out ones), --json, --out."""
    tok = byte_tokenizer()
    save_checkpoint(tmp_path / "init.apr", model=_model(tok), tokenizer=tok)
    (tmp_path / "rewards.py").write_text(REWARDS)
    data = _prompts_file(tmp_path / "p.jsonl", ["Write:", "Say:", "Go:", "Now:"])
    args = [command, "--init", str(tmp_path / "init.apr"), "--data", str(data), "--reward",
            f"{tmp_path / 'rewards.py'}:letters", "--json", "--out", str(tmp_path / "o")]
    if held:
        args += ["--eval-data", str(_prompts_file(tmp_path / "h.jsonl", ["Next:", "Tell:", "Then:"]))]
    return args


def _policy(tok, lora: bool):
    """``_model`` as a policy that differs from the model as loaded: with ``lora``, rank-4 adapters
    whose B matrices already moved (seeded), so the frozen base is a different reference."""
    from apr_kernels.model.lora import add_lora

    m = _model(tok)
    if lora:
        add_lora(m, 4, 8.0)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if ".lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return m


def _refusal_setup(tmp_path):
    """(tokenizer, two prompts, a one-step config, a reward function) for the refusal tests."""
    tok = byte_tokenizer()
    prompts = read_prompts([_prompts_file(tmp_path / "p.jsonl", ["a", "b"])], tok, 8)
    return tok, prompts, TrainConfig(steps=1, batch_size=2), {"f": lambda **kw: [0.0] * len(kw["completions"])}


def assert_same_grads(trained, oracle):
    """Every gradient of ``oracle`` (float64 maths written out) equals ``trained``'s (the trainer's
    step), to 1e-3 relative and 1e-5 of the largest gradient."""
    grads = {n: p.grad for n, p in oracle.named_parameters() if p.grad is not None}
    scale = max(g.abs().max().item() for g in grads.values())
    for name, q in trained.named_parameters():
        if name in grads:
            torch.testing.assert_close(q.grad, grads[name].float(), rtol=1e-3, atol=1e-5 * scale, msg=name)


def test_group_advantages_are_centred_and_scaled_per_prompt():
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.5], [2.0, 2.0, 2.0, 2.0], [0.0, 3.0, 1.0, -1.0]], dtype=torch.float64)
    got = group_advantages(rewards)
    for g, row in enumerate(rewards.tolist()):
        mean, std = statistics.mean(row), statistics.stdev(row)  # the unbiased std, as torch.std and TRL
        assert got[g].tolist() == pytest.approx([(r - mean) / (std + 1e-4) for r in row], rel=1e-12)
    assert not got[1].any()  # equal rewards: no signal
    with pytest.raises(ValueError, match="--num-generations must be at least 2"):
        group_advantages(rewards[:, :1])


def test_scores_are_weighted_sums_with_none_left_out():
    def a(prompts, completions, completion_ids, **kw):
        return [1.0, None, 3.0]

    def b(prompts, completions, completion_ids, answer, **kw):
        return [float(c == x) for c, x in zip(completions, answer)]

    total, table = score({"a": a, "b": b}, [0.5, 2.0], ["p"] * 3, ["x", "y", "z"], [[1], [2], [3]],
                         [{"answer": "x"}, {"answer": "q"}, {"answer": "z"}])
    assert total.tolist() == [0.5 * 1 + 2 * 1, 2 * 0, 0.5 * 3 + 2 * 1]
    assert table[0, 0] == 1 and table[0, 1].isnan() and table[1].tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="reward a: returned list of 2; expected a list of 3 numbers"):
        score({"a": lambda **k: [1, 2]}, [1], ["p"] * 3, ["x"] * 3, [[1]] * 3, [{}] * 3)
    with pytest.raises(ValueError, match="reward a: completion 1 scored 'bad'"):
        score({"a": lambda **k: [1, "bad", 2]}, [1], ["p"] * 3, ["x"] * 3, [[1]] * 3, [{}] * 3)
    with pytest.raises(ValueError, match="completion 0 was scored None by every function"):
        score({"a": lambda **k: [None, 1, 2]}, [1], ["p"] * 3, ["x"] * 3, [[1]] * 3, [{}] * 3)


def test_reward_specs_name_what_is_wrong(tmp_path):
    (tmp_path / "r.py").write_text(REWARDS)
    assert load_reward(f"{tmp_path / 'r.py'}:letters")(prompts=[], completions=["ab"]) == [1.0]
    assert load_reward("statistics:mean") is statistics.mean
    with pytest.raises(ValueError, match="expected FILE.py:NAME"):
        load_reward("letters")
    with pytest.raises(ValueError, match="no file"):
        load_reward(f"{tmp_path / 'missing.py'}:letters")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        load_reward(f"{tmp_path / 'r.py'}:nope")
    with pytest.raises(ValueError, match="cannot import no_such_module_xyz"):
        load_reward("no_such_module_xyz:f")


@pytest.mark.parametrize("fast,micro_batch,loss_type,scale", [
    (False, None, "dapo", "group"), (True, None, "dapo", "group"), (False, 3, "dapo", "group"),
    (False, None, "grpo", "batch"), (False, None, "dr_grpo", "none")],
    ids=["eager-padded", "fused-padding-free", "micro-batches-of-3", "grpo-batch-std", "dr-grpo-unscaled"])
def test_one_step_is_adamw_on_the_policy_gradient_objective(tmp_path, fast, micro_batch, loss_type, scale):
    """The trainer's step against the objective written out: the same sampled completions (the seed
    and step fix them), rewards from the function, advantages with statistics.stdev (of the group, of
    the step, or none), and -sum A_i log p(completion_i) normalised by the step's completion tokens
    (dapo), by each completion's length x completions (grpo) or by max_new_tokens x completions
    (dr_grpo), each log-likelihood from the model's summed loss on that sequence alone; its clipped
    gradients are the ones the trainer stepped with."""
    tok = byte_tokenizer()
    prompts = read_prompts([_prompts_file(tmp_path / "p.jsonl", ["Write:", "Say it:", "Go:"])], tok, 32)
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=48, lr=3e-3, warmup=1)
    trained = _model(tok)
    trained.fast = fast  # the fused loss per sequence, each group packed into one row
    trainer = GRPOTrainer(trained, prompts, {"letters": lambda prompts, completions, **kw: _letters(completions)},
                          cfg, tokenizer=tok, num_generations=4, max_new_tokens=6, micro_batch=micro_batch,
                          loss_type=loss_type, scale_rewards=scale)
    rec = trainer.train_step()
    assert trainer.padding_free == fast

    model = _model(tok)
    index = BatchStream(len(prompts), seed=cfg.seed).next(2).tolist()
    helper = GRPOTrainer(model, prompts, {"x": lambda **kw: []}, cfg, tokenizer=tok, num_generations=4,
                         max_new_tokens=6)
    groups = helper.sample_groups([prompts[i] for i in index],
                                  [torch.Generator().manual_seed((cfg.seed * 1_000_003 + 0) * 1_000_033 + k)
                                   for k in range(len(index))])
    rewards = [_letters([tok.decode([t for t in ids if t != tok.eos_id]) for ids in g]) for g in groups]
    assert rec["reward"] == pytest.approx(statistics.mean(r for g in rewards for r in g), rel=1e-12)
    n_tokens = sum(len(ids) for g in groups for ids in g)
    every = [r for g in rewards for r in g]
    objective = 0.0
    for i, g, r in zip(index, groups, rewards):
        mean = statistics.mean(r)
        std = {"group": statistics.stdev(r) + 1e-4, "batch": statistics.stdev(every) + 1e-4, "none": 1.0}[scale]
        for ids, reward in zip(g, r):
            seq = torch.tensor([prompts[i]["ids"] + ids])
            targets = seq[:, 1:].clone()
            targets[:, : len(prompts[i]["ids"]) - 1] = -100  # the prompt is no target
            logp = -model.loss(seq[:, :-1], targets, reduction="sum")
            norm = {"dapo": n_tokens, "grpo": len(ids) * len(every), "dr_grpo": 6 * len(every)}[loss_type]
            objective = objective - (reward - mean) / std * logp / norm
    objective.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    assert rec["loss"] == pytest.approx(objective.item(), rel=1e-4)
    assert rec["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)
    # the clipped gradients the trainer's AdamW step used (compared as gradients: AdamW's first step is
    # about lr x sign(gradient), which float noise flips in near-zero gradients)
    scale = max(p.grad.abs().max().item() for p in model.parameters())
    for (name, p), q in zip(model.named_parameters(), trained.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6 * scale, msg=name)


def _token_logps_alone(model, prompt_ids, ids):
    """log p of each completion token, from the model's logits on the sequence alone (log_softmax)."""
    seq = torch.tensor([prompt_ids + ids])
    logits = model(seq[:, :-1]).double()
    logp = torch.log_softmax(logits, -1)[0, len(prompt_ids) - 1:]
    return logp.gather(1, torch.tensor(ids)[:, None]).squeeze(1)


def _trl_objective(model, groups, index, prompts, rewards, *, old=None, ref=None, beta=0.0, eps=(0.2, 0.2),
                   level="token"):
    """TRL's per-token GRPO loss written out: group advantages (statistics.stdev), dapo normalisation,
    rho = p / p_old (``old``: the generating model, default the policy itself, rho = 1; ``level``
    "sequence": GSPO's exp of the completion's mean log-ratio on each of its tokens), the clipped
    surrogate and beta x the k3 KL estimate to ``ref``; plus (KL sum, clipped tokens)."""
    n_tokens = sum(len(ids) for g in groups for ids in g)
    objective, kl_sum, clipped = 0.0, 0.0, 0
    for i, g, r in zip(index, groups, rewards):
        mean, std = statistics.mean(r), statistics.stdev(r) + 1e-4
        for ids, reward in zip(g, r):
            adv = (reward - mean) / std
            lp = _token_logps_alone(model, prompts[i]["ids"], ids)
            with torch.no_grad():
                lp_old = lp.detach() if old is None else _token_logps_alone(old, prompts[i]["ids"], ids)
            rho = torch.exp(lp - lp_old)
            if level == "sequence":
                rho = torch.exp((lp - lp_old).mean()).expand(len(ids))
            per_token = -torch.minimum(rho * adv, rho.clamp(1 - eps[0], 1 + eps[1]) * adv)
            clipped += int((((rho < 1 - eps[0]) & (adv < 0)) | ((rho > 1 + eps[1]) & (adv > 0))).sum())
            if beta:
                with torch.no_grad():
                    lp_ref = _token_logps_alone(ref, prompts[i]["ids"], ids)
                q = lp_ref - lp
                kl = torch.exp(q) - q - 1
                per_token = per_token + beta * kl
                kl_sum += kl.sum().item()
            objective = objective + per_token.sum() / n_tokens
    return objective, kl_sum, clipped


def _sampled(tok, prompts, cfg, step=0, batch=2):
    """The prompts and completions the trainer samples at ``step`` (its seeds), from the initial model."""
    index = BatchStream(len(prompts), seed=cfg.seed).next(batch).tolist()
    helper = GRPOTrainer(_model(tok), prompts, {"x": lambda **kw: []}, cfg, tokenizer=tok, num_generations=4,
                         max_new_tokens=6)
    groups = helper.sample_groups([prompts[i] for i in index],
                                  [torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 1_000_033 + k)
                                   for k in range(len(index))])
    rewards = [_letters([tok.decode([t for t in ids if t != tok.eos_id]) for ids in g]) for g in groups]
    return index, groups, rewards


def _assert_same_grads(model, trained, cfg):
    """The oracle's clipped gradients are the ones the trainer stepped with."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
    scale = max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None)
    for (name, p), q in zip(model.named_parameters(), trained.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6 * scale, msg=lambda m: f"{name}: {m}")
    return norm.item()


@pytest.mark.parametrize("fast,micro_batch,lora", [(False, None, False), (True, 3, False), (False, None, True)],
                         ids=["eager", "fused-padding-free-micro-batches", "lora-base-is-the-reference"])
def test_kl_penalty_step_is_adamw_on_trls_per_token_loss(tmp_path, fast, micro_batch, lora):
    """--beta > 0: one step's loss, KL and clipped gradients against TRL's per-token loss written out
    with log_softmax on each sequence alone, the reference a different model (so the KL and its
    gradient are not zero at the first step): a second model, or with LoRA the base under adapters
    that already moved."""
    from apr_kernels.model.lora import add_lora, lora_modules

    tok = byte_tokenizer()
    prompts = read_prompts([_prompts_file(tmp_path / "p.jsonl", ["Write:", "Say it:", "Go:"])], tok, 32)
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=48, lr=3e-3, warmup=1)

    def policy():
        model = _model(tok)
        if lora:
            add_lora(model, rank=4, seed=3)
            g = torch.Generator().manual_seed(5)
            for m in lora_modules(model).values():  # moved adapters: the policy is not its base
                m.lora_B.data = torch.randn(m.lora_B.shape, generator=g) * 0.05
        return model

    reference = _model(tok) if lora else _model(tok, seed=1)
    trained = policy()
    trained.fast = fast
    trainer = GRPOTrainer(trained, prompts, {"letters": lambda prompts, completions, **kw: _letters(completions)},
                          cfg, tokenizer=tok, num_generations=4, max_new_tokens=6, micro_batch=micro_batch,
                          beta=0.5, reference=None if lora else _model(tok, seed=1))
    assert (trainer.reference is None) == lora
    rec = trainer.train_step()
    model = policy()
    # the completions are the trainer's: sampled from the same policy with the same seeds
    index = BatchStream(len(prompts), seed=cfg.seed).next(2).tolist()
    groups = GRPOTrainer(policy(), prompts, {"x": lambda **kw: []}, cfg, tokenizer=tok, num_generations=4,
                         max_new_tokens=6, beta=0.5, reference=reference).sample_groups(
        [prompts[i] for i in index], [torch.Generator().manual_seed((cfg.seed * 1_000_003) * 1_000_033 + k)
                                      for k in range(2)])
    rewards = [_letters([tok.decode([t for t in ids if t != tok.eos_id]) for ids in g]) for g in groups]
    objective, kl_sum, _ = _trl_objective(model, groups, index, prompts, rewards, ref=reference, beta=0.5)
    objective.backward()
    n_tokens = sum(len(ids) for g in groups for ids in g)
    assert kl_sum / n_tokens > 1e-3 and rec["kl"] == pytest.approx(kl_sum / n_tokens, rel=1e-4)
    assert rec["loss"] == pytest.approx(objective.item(), rel=1e-4, abs=1e-7)
    assert rec["grad_norm"] == pytest.approx(_assert_same_grads(model, trained, cfg), rel=1e-5)
    assert "clip_ratio" not in rec  # one iteration: the ratio is 1


@pytest.mark.parametrize("level,eps", [("token", (0.2, 0.28)), ("sequence", (0.02, 0.03))], ids=["grpo", "gspo"])
def test_num_iterations_reuse_the_batch_with_the_clipped_ratio(tmp_path, level, eps):
    """--num-iterations 2: the first step is the plain policy-gradient step (the ratio is 1), the
    second trains on the same completions with rho = p / p_generating clipped to [1 - eps, 1 + eps_high]
    (a large learning rate moves the policy far enough that clipping acts), against TRL's loss
    written out with the generating model's log-probabilities; per token (GRPO) or per completion
    (GSPO: the geometric mean of its tokens' ratios)."""
    import copy

    tok = byte_tokenizer()
    prompts = read_prompts([_prompts_file(tmp_path / "p.jsonl", ["Write:", "Say it:", "Go:"])], tok, 32)
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=48, lr=3e-2, warmup=1)
    reward = {"letters": lambda prompts, completions, **kw: _letters(completions)}
    once = _model(tok)
    GRPOTrainer(once, prompts, reward, cfg, tokenizer=tok, num_generations=4, max_new_tokens=6).train_step()
    trained = _model(tok)
    trainer = GRPOTrainer(trained, prompts, reward, cfg, tokenizer=tok, num_generations=4, max_new_tokens=6,
                          num_iterations=2, epsilon=eps[0], epsilon_high=eps[1], importance_sampling=level)
    first = trainer.train_step()
    for p, q in zip(once.parameters(), trained.parameters()):  # step 1 = the one-iteration step
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-8)
    after_first = copy.deepcopy(trained.state_dict())
    second = trainer.train_step()
    assert second["reward"] == first["reward"] and second["completion_len"] == first["completion_len"]

    index, groups, rewards = _sampled(tok, prompts, cfg)
    model = _model(tok)
    model.load_state_dict(after_first)
    objective, _, clipped = _trl_objective(model, groups, index, prompts, rewards, old=_model(tok), eps=eps,
                                           level=level)
    objective.backward()
    n_tokens = sum(len(ids) for g in groups for ids in g)
    assert clipped > 0 and second["clip_ratio"] == pytest.approx(clipped / n_tokens)
    assert second["loss"] == pytest.approx(objective.item(), rel=1e-4, abs=1e-7)
    assert second["grad_norm"] == pytest.approx(_assert_same_grads(model, trained, cfg), rel=1e-5)


def test_per_token_settings_are_checked(tmp_path):
    tok = byte_tokenizer()
    prompts = read_prompts([_prompts_file(tmp_path / "p.jsonl", ["Write:"])], tok, 32)
    reward = {"r": lambda **kw: []}

    def make(cfg=TrainConfig(steps=1, batch_size=1, seq_len=48), **kw):
        return GRPOTrainer(_model(tok), prompts, reward, cfg, tokenizer=tok, num_generations=2, max_new_tokens=4, **kw)

    with pytest.raises(ValueError, match="--save-every 3 is not a multiple of --num-iterations 2"):
        make(TrainConfig(steps=6, batch_size=1, seq_len=48, save_every=3), num_iterations=2)
    with pytest.raises(ValueError, match="--beta > 0 needs the reference model"):
        make(beta=0.1)
    with pytest.raises(ValueError, match="expected beta >= 0, at least 1 iteration, 0 < epsilon < 1"):
        make(epsilon=1.5)
    with pytest.raises(ValueError, match="expected beta >= 0"):
        make(num_iterations=0)
    with pytest.raises(ValueError, match="--importance-sampling-level 'word'; expected one of token, sequence"):
        make(importance_sampling="word")


def test_chat_prompts_reach_the_rewards_as_messages_and_answers_stop_at_the_turns_end(tmp_path, monkeypatch):
    from apr_kernels.model import generate as gen
    from apr_kernels.tokenizer import Tokenizer

    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)},
                               {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}, eos_id=256)
    path = _prompts_file(tmp_path / "p.jsonl", [[{"role": "user", "content": "hi"}]], answer="x")
    prompts = read_prompts([path], tok, 64)
    assert tok.decode(prompts[0]["ids"]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert prompts[0]["stops"] == [256, 258]
    # completions as generate_batch returns them: cut after the first stop id
    monkeypatch.setattr(gen, "generate_batch", lambda model, prompts, n, **kw: [[104, 258], [104, 105, 106, 107, 108],
                                                                                [256]])
    seen = {}

    def spy(prompts, completions, completion_ids, answer, **kw):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids, answer=answer)
        return [float(len(c[0]["content"])) for c in completions]

    model = Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(259)), fast=False)
    trainer = GRPOTrainer(model, prompts, {"spy": spy}, TrainConfig(steps=1, batch_size=1, seq_len=80), tokenizer=tok,
                          num_generations=3, max_new_tokens=5)
    rec = trainer.train_step()
    assert seen["prompts"] == [[{"role": "user", "content": "hi"}]] * 3 and seen["answer"] == ["x"] * 3
    assert seen["ids"] == [[104, 258], [104, 105, 106, 107, 108], [256]]  # cut after the first stop id
    assert [c[0]["content"] for c in seen["completions"]] == ["h", "hijkl", ""]
    assert all(c[0]["role"] == "assistant" and len(c) == 1 for c in seen["completions"])
    assert rec["truncated"] == pytest.approx(1 / 3) and rec["completion_len"] == pytest.approx(8 / 3)


@pytest.mark.parametrize("beta", [0.0, 0.3], ids=["sequence-objective", "per-token-with-kl"])
def test_masked_truncated_completions_leave_the_loss_but_not_the_counts(tmp_path, monkeypatch, beta):
    """--mask-truncated-completions: a completion without a stop token adds nothing to the loss (nor
    to the logged KL), while the advantages and the dapo token count still include it, as TRL's
    completion mask does."""
    from apr_kernels.model import generate as gen

    tok = byte_tokenizer()
    prompts = read_prompts([_prompts_file(tmp_path / "p.jsonl", ["Go:"])], tok, 32)
    eos = tok.eos_id
    completions = [[104, 105, eos], [97, 98, 99, 100, 101], [120, eos], [106, 107, 108, 109, 110]]
    monkeypatch.setattr(gen, "generate_batch", lambda model, p, n, **kw: [list(c) for c in completions])
    cfg = TrainConfig(steps=1, batch_size=1, seq_len=48, lr=1e-3, warmup=1)
    reward = {"letters": lambda prompts, completions, **kw: [float(len(c)) for c in completions]}
    reference = _model(tok, seed=1)
    trained = _model(tok)
    rec = GRPOTrainer(trained, prompts, reward, cfg, tokenizer=tok, num_generations=4, max_new_tokens=5,
                      mask_truncated=True, beta=beta, reference=reference).train_step()
    assert rec["truncated"] == 0.5
    model = _model(tok)
    texts = [tok.decode([t for t in c if t != eos]) for c in completions]
    rewards = [float(len(t)) for t in texts]
    mean, std = statistics.mean(rewards), statistics.stdev(rewards) + 1e-4  # all four completions
    n_tokens = sum(len(c) for c in completions)  # all four completions' tokens
    objective, kl_sum, kept = 0.0, 0.0, 0
    for c, r in zip(completions, rewards):
        if c[-1] != eos:
            continue
        lp = _token_logps_alone(model, prompts[0]["ids"], c)
        per_token = -(r - mean) / std * torch.exp(lp - lp.detach())
        if beta:
            with torch.no_grad():
                q = _token_logps_alone(reference, prompts[0]["ids"], c)
            q = q - lp
            kl = torch.exp(q) - q - 1
            per_token = per_token + beta * kl
            kl_sum, kept = kl_sum + kl.sum().item(), kept + len(c)
        objective = objective + per_token.sum() / n_tokens
    objective.backward()
    assert rec["grad_norm"] == pytest.approx(_assert_same_grads(model, trained, cfg), rel=1e-5)
    if beta:
        assert rec["kl"] == pytest.approx(kl_sum / kept, rel=1e-4)


def test_cli_grpo_raises_the_reward_and_resumes_exactly(tmp_path, capsys):
    from apr_kernels.cli import main

    args = [*_cli_run(tmp_path, "grpo"), "--steps", "30", "--batch-size", "2", "--num-generations", "8",
            "--max-new-tokens", "8", "--max-prompt-len", "32", "--lr", "1e-2", "--save-every", "20"]
    tok, held = byte_tokenizer(), tmp_path / "h.jsonl"
    assert main(args) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    rewards = [r["reward"] for r in recs if r["event"] == "train"]
    assert statistics.mean(rewards[:5]) < 0.25 and statistics.mean(rewards[-5:]) > 0.6
    # held-out prompts: one greedy completion each, scored before and after training
    from apr_kernels.model.generate import generate

    evals = [r for r in recs if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 30] and evals[0]["eval_prompts"] == 3
    model = _model(tok)
    firsts = []
    for p in read_prompts([held], tok, 32):
        ids = generate(model, torch.tensor([p["ids"]]), 8, eos_id=tok.eos_id)[0, len(p["ids"]):].tolist()
        firsts.append(_letters([tok.decode([t for t in ids if t != tok.eos_id])])[0])
    assert evals[0]["eval_reward"] == pytest.approx(statistics.mean(firsts), rel=1e-9)
    assert evals[-1]["eval_reward"] > evals[0]["eval_reward"] + 0.3
    assert main(["grpo", "--resume", str(tmp_path / "o" / "step_000020.apr"), "--json", "--out",
                 str(tmp_path / "r")]) == 0
    resumed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["reward"] for r in resumed if r["event"] == "train"] == rewards[20:]
    assert [r["loss"] for r in resumed if r["event"] == "train"] == \
        [r["loss"] for r in recs if r["event"] == "train"][20:]
    assert all(math.isfinite(r["grad_norm"]) for r in recs if r["event"] == "train")
    assert main([*args[:6], f"{tmp_path / 'rewards.py'}:nope", *args[7:]]) == 1
    assert "has no function 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("lora", [False, True], ids=["reference-copy", "lora-base"])
def test_cli_kl_and_iterations_resume_exactly(tmp_path, capsys, lora):
    """grpo --beta 0.2 --num-iterations 2 from the CLI: the reference is a second copy of --init (or,
    with LoRA, the base), the KL is logged and grows from 0 as the policy moves, and a run resumed at
    a generation boundary repeats the uninterrupted run's losses, KL and clipped shares."""
    from apr_kernels.cli import main

    args = [*_cli_run(tmp_path, "grpo", held=False), "--steps", "6", "--batch-size", "2", "--num-generations", "4",
            "--max-new-tokens", "6", "--max-prompt-len", "32", "--lr", "1e-2", "--save-every", "2",
            "--beta", "0.2", "--num-iterations", "2", *(["--lora-rank", "4", "--lr", "3e-2"] if lora else [])]
    assert main(args) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    start = next(r for r in recs if r["event"] == "start")
    assert start["beta"] == 0.2 and start["num_iterations"] == 2
    train = [r for r in recs if r["event"] == "train"]
    assert train[0]["kl"] == pytest.approx(0, abs=1e-6) and train[-1]["kl"] > 1e-4
    assert all("clip_ratio" in r for r in train)
    # each generation batch serves two steps: the same rewards twice
    assert [r["reward"] for r in train[::2]] == [r["reward"] for r in train[1::2]]
    assert main(["grpo", "--resume", str(tmp_path / "o" / "step_000002.apr"), "--json", "--out",
                 str(tmp_path / "r")]) == 0
    resumed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    for key in ("loss", "kl", "clip_ratio", "reward"):
        assert [r[key] for r in resumed if r["event"] == "train"] == [r[key] for r in train[2:]], key
    assert main([*args, "--save-every", "3", "--out", str(tmp_path / "x")]) == 1  # (the last option wins)
    assert "--save-every 3 is not a multiple of --num-iterations 2" in capsys.readouterr().err


def test_frozen_models_are_held_in_bf16_when_the_run_computes_in_bf16(tmp_path, capsys):
    """--precision bf16: the KL reference copy and the distillation teacher are loaded in bf16 (half
    the memory; they run under bf16 autocast anyway), the policy stays fp32 (AdamW's master weights);
    the start record says so, and the run trains."""
    from apr_kernels.cli import main
    from apr_kernels.model import from_apr

    args = _cli_run(tmp_path, "grpo", held=False)
    save_checkpoint(tmp_path / "teacher.apr", model=_model(byte_tokenizer(), seed=5), tokenizer=byte_tokenizer())
    assert main([*args, "--steps", "1", "--batch-size", "2", "--num-generations", "2", "--max-new-tokens", "4",
                 "--max-prompt-len", "32", "--beta", "0.2", "--teacher", str(tmp_path / "teacher.apr"),
                 "--precision", "bf16", "--save-every", "0"]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    start = next(r for r in recs if r["event"] == "start")
    n = sum(p.numel() for p in from_apr(tmp_path / "init.apr").parameters())
    assert start["reference_params"] == start["reference_params_rank"] == start["teacher_params"] == n
    assert start["reference_dtype"] == start["teacher_dtype"] == "bfloat16"
    train = next(r for r in recs if r["event"] == "train")
    assert math.isfinite(train["loss"]) and math.isfinite(train["teacher_kl"])
    with apr_kernels.open(tmp_path / "o" / "model.apr") as f:  # (the policy trained in fp32)
        assert f.info("model.norm.weight").dtype == "F32"


@pytest.mark.parametrize("with_rewards", [False, True], ids=["teacher-only", "teacher-and-rewards"])
def test_on_policy_distillation_step_is_the_reverse_kl_policy_gradient(tmp_path, with_rewards):
    """--teacher: each sampled token's advantage gains coef x (log p_teacher - log p_policy) (the reverse
    KL to the teacher, per token, on the policy's own samples), added to the group advantage when
    reward functions are given; the step's gradients, loss and logged teacher_kl against that
    objective written out with log_softmax on each sequence alone."""
    tok = byte_tokenizer()
    prompts = read_prompts([_prompts_file(tmp_path / "p.jsonl", ["Write:", "Say it:", "Go:"])], tok, 32)
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=48, lr=3e-3, warmup=1)
    teacher = _model(tok, seed=3).requires_grad_(False)
    reward = {"letters": lambda prompts, completions, **kw: _letters(completions)} if with_rewards else {}
    trained = _model(tok)
    rec = GRPOTrainer(trained, prompts, reward, cfg, tokenizer=tok, num_generations=4, max_new_tokens=6,
                      teacher=teacher, teacher_coef=0.5).train_step()
    index, groups, rewards = _sampled(tok, prompts, cfg)
    model = _model(tok)
    n_tokens = sum(len(ids) for g in groups for ids in g)
    objective, teacher_kl = 0.0, 0.0
    for i, g, r in zip(index, groups, rewards):
        mean, std = statistics.mean(r), statistics.stdev(r) + 1e-4
        for ids, reward_value in zip(g, r):
            lp = _token_logps_alone(model, prompts[i]["ids"], ids)
            with torch.no_grad():
                lt = _token_logps_alone(teacher, prompts[i]["ids"], ids)
            adv = ((reward_value - mean) / std if with_rewards else 0.0) - 0.5 * (lp.detach() - lt)
            objective = objective + (-adv * torch.exp(lp - lp.detach())).sum() / n_tokens
            teacher_kl += (lp.detach() - lt).sum().item()
    objective.backward()
    assert rec["teacher_kl"] == pytest.approx(teacher_kl / n_tokens, rel=1e-4)
    assert rec["loss"] == pytest.approx(objective.item(), rel=1e-4, abs=1e-7)
    assert rec["grad_norm"] == pytest.approx(_assert_same_grads(model, trained, cfg), rel=1e-5)


def test_cli_on_policy_distillation_lowers_the_reverse_kl_and_resumes(tmp_path, capsys):
    from apr_kernels.cli import main

    tok = byte_tokenizer()
    save_checkpoint(tmp_path / "init.apr", model=_model(tok), tokenizer=tok)
    teacher = _model(tok, seed=5)
    with torch.no_grad():  # a confident teacher: clear preferences to learn
        teacher.model.embed_tokens.weight.mul_(5)
    save_checkpoint(tmp_path / "teacher.apr", model=teacher, tokenizer=tok)
    data = _prompts_file(tmp_path / "p.jsonl", ["Write:", "Say:", "Go:", "Now:"])
    args = ["grpo", "--init", str(tmp_path / "init.apr"), "--teacher", str(tmp_path / "teacher.apr"), "--data",
            str(data), "--steps", "20", "--batch-size", "2", "--num-generations", "4", "--max-new-tokens", "8",
            "--max-prompt-len", "32", "--lr", "1e-2", "--json", "--save-every", "10", "--out", str(tmp_path / "o")]
    assert main(args) == 0
    train = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"train"' in line]
    kl = [r["teacher_kl"] for r in train]
    assert statistics.mean(kl[-5:]) < statistics.mean(kl[:5]) / 2
    assert main(["grpo", "--resume", str(tmp_path / "o" / "step_000010.apr"), "--json", "--out",
                 str(tmp_path / "r")]) == 0
    resumed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"train"' in line]
    assert [r["teacher_kl"] for r in resumed] == kl[10:]
