"""RLOO (train/rloo.py): leave-one-out baselines, the KL to the model as loaded inside the reward, a
step equal to the objective written out (REINFORCE with the baseline; with --num-iterations 2 the
second update's clipped ratio per completion), the reward rising on a toy task and exact resume."""

import json
import statistics

import pytest
import torch

from apr_kernels.train.cli import byte_tokenizer
from apr_kernels.train.data import BatchStream
from apr_kernels.train.grpo import read_prompts
from apr_kernels.train.loop import TrainConfig
from apr_kernels.train.rloo import RLOOTrainer, leave_one_out_advantages

from test_grpo import _cli_run, _letters, _model, _policy, _prompts_file, _refusal_setup, assert_same_grads  # (the toy task GRPO learns)


def test_leave_one_out_advantages_subtract_the_others_mean():
    rewards = torch.tensor([[1.0, 0.0, 0.5], [2.0, 2.0, 2.0], [0.0, 3.0, -1.5]], dtype=torch.float64)
    want = [[1.0 - 0.25, 0.0 - 0.75, 0.5 - 0.5], [0.0, 0.0, 0.0], [0.0 - 0.75, 3.0 + 0.75, -1.5 - 1.5]]
    torch.testing.assert_close(leave_one_out_advantages(rewards), torch.tensor(want, dtype=torch.float64))
    with pytest.raises(ValueError, match="--num-generations must be at least 2"):
        leave_one_out_advantages(torch.zeros(2, 1))


def _logps(m, prompt_ids, ids):
    """Each token's log-probability under ``m``, from log_softmax over this sequence alone (float64)."""
    seq = torch.tensor([prompt_ids + ids])
    logits = m(seq[:, :-1])[0].double().log_softmax(-1)
    return torch.stack([logits[len(prompt_ids) - 1 + k, t] for k, t in enumerate(ids)])


@pytest.mark.parametrize("lora,beta,normalize,iterations", [(False, 0.05, False, 1), (True, 0.2, True, 1),
                                                             (False, 0.05, True, 2)],
                         ids=["reference-copy", "lora-base-normalised", "second-iteration-clipped"])
def test_a_step_is_the_rloo_objective_written_out(tmp_path, lora, beta, normalize, iterations):
    """The completions sampled with each prompt's seeded generator, scored, minus beta x their summed
    first-order KL to the model as loaded, leave-one-out advantages (normalised over the step), and
    -mean_i min(rho_i A_i, clip(rho_i) A_i) with rho_i the completion's probability ratio to the
    generating policy: the trainer's loss, KL, gradient norm and gradients are this objective's. With
    two iterations the check is on the second update (rho != 1, a large lr so that some clip)."""
    from apr_kernels.model.lora import adapters_disabled

    tok = byte_tokenizer()
    prompts = read_prompts([_prompts_file(tmp_path / "p.jsonl", ["Write:", "Say it:", "Go:"])], tok, 32)
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=48, lr=3e-2 if iterations > 1 else 3e-3, warmup=0,
                      min_lr_ratio=1.0)
    rewards = {"letters": lambda prompts, completions, **kw: _letters(completions)}

    def build():
        return _policy(tok, lora)

    trained, generating = build(), build()
    reference = None if lora else _model(tok).requires_grad_(False)
    kw = dict(tokenizer=tok, num_generations=3, max_new_tokens=6, temperature=1.0, beta=beta,
              normalize_advantages=normalize, num_iterations=iterations, epsilon=0.1)
    trainer = RLOOTrainer(trained, prompts, rewards, cfg, reference=reference, **kw)
    rec = trainer.train_step()
    model = build()
    if iterations > 1:  # the oracle starts where the trainer's second update starts
        model.load_state_dict(trained.state_dict())
        rec = trainer.train_step()

    index = BatchStream(len(prompts), seed=cfg.seed).next(2).tolist()
    helper = RLOOTrainer(build(), prompts, rewards, cfg, reference=_model(tok), **kw)
    groups = helper.sample_groups([prompts[i] for i in index],
                                  [torch.Generator().manual_seed((cfg.seed * 1_000_003 + 0) * 1_000_033 + k)
                                   for k in range(len(index))])
    scores, kls, kl_tokens, old_logps, items = [], [], 0, [], []
    with torch.no_grad():
        for i, completions in zip(index, groups):
            p = prompts[i]
            scores.append(_letters([tok.decode([t for t in ids if t != tok.eos_id]) for ids in completions]))
            row = []
            for ids in completions:
                old = _logps(generating, p["ids"], ids)
                if lora:
                    with adapters_disabled(generating):
                        ref = _logps(generating, p["ids"], ids)
                else:
                    ref = _logps(reference, p["ids"], ids)
                row.append(float((old - ref).sum()))
                kl_tokens += len(ids)
                old_logps.append(float(old.sum()))
                items.append((p["ids"], ids))
            kls.append(row)
    r = torch.tensor(scores, dtype=torch.float64) - beta * torch.tensor(kls, dtype=torch.float64)
    adv = torch.stack([torch.stack([row[j] - (row.sum() - row[j]) / 2 for j in range(3)]) for row in r]).flatten()
    if normalize:
        adv = (adv - adv.mean()) / (adv.std() + 1e-4)
    objective = 0.0
    for a, (prompt_ids, ids), old in zip(adv.tolist(), items, old_logps):
        logp = _logps(model, prompt_ids, ids).sum()
        if iterations == 1:  # rho = 1 here: REINFORCE, -A log p (its gradient; the value grpo logs too)
            objective = objective - a * logp / len(items)
        else:
            ratio = torch.exp(logp - old)
            objective = objective - torch.minimum(ratio * a, ratio.clamp(0.9, 1.1) * a) / len(items)
    objective.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    assert rec["loss"] == pytest.approx(objective.item(), rel=1e-5, abs=2e-6)  # (fp32 sums that cancel)
    assert rec["kl"] == pytest.approx(sum(map(sum, kls)) / kl_tokens, rel=1e-4, abs=1e-9)
    assert rec["reward"] == pytest.approx(statistics.mean(s for row in scores for s in row), rel=1e-9)
    assert rec["grad_norm"] == pytest.approx(norm.item(), rel=1e-4)
    if iterations > 1:
        assert rec["clip_ratio"] > 0  # (the second update moved some completions' ratio past the range)
    assert_same_grads(trained, model)


def test_refusals_name_the_option(tmp_path):
    tok, prompts, cfg, fn = _refusal_setup(tmp_path)
    with pytest.raises(ValueError, match="rloo: --beta > 0 needs the reference model"):
        RLOOTrainer(_model(tok), prompts, fn, cfg, tokenizer=tok)
    with pytest.raises(ValueError, match="rloo: no reward function or model"):
        RLOOTrainer(_model(tok), prompts, {}, cfg, tokenizer=tok, beta=0.0)
    with pytest.raises(ValueError, match="rloo: --num-generations must be at least 2"):
        RLOOTrainer(_model(tok), prompts, fn, cfg, tokenizer=tok, num_generations=1, beta=0.0)
    with pytest.raises(ValueError, match="rloo: loss_type is grpo's"):
        RLOOTrainer(_model(tok), prompts, fn, cfg, tokenizer=tok, beta=0.0, loss_type="grpo")


def test_cli_rloo_raises_the_reward_and_resumes_exactly(tmp_path, capsys):
    from apr_kernels.cli import main

    args = [*_cli_run(tmp_path, "rloo"), "--steps", "30", "--batch-size", "4", "--num-generations", "4",
            "--max-new-tokens", "8", "--max-prompt-len", "32", "--lr", "1e-2", "--save-every", "20",
            "--normalize-advantages", "--beta", "0.01"]
    assert main(args) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    train = [r for r in recs if r["event"] == "train"]
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert statistics.mean(r["reward"] for r in train[:5]) < 0.25 < 0.5 < statistics.mean(r["reward"] for r in train[-5:])
    evals = [r for r in recs if r["event"] == "eval"]
    assert evals[-1]["eval_reward"] > evals[0]["eval_reward"] + 0.3
    assert main(["rloo", "--resume", str(tmp_path / "o" / "step_000020.apr"), "--json", "--out",
                 str(tmp_path / "r")]) == 0
    resumed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["loss"] for r in resumed if r["event"] == "train"] == [r["loss"] for r in train[20:]]
