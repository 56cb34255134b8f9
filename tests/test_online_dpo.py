"""Online DPO (train/online_dpo.py): each prompt's best and worst sampled completion as a pair, a step
equal to DPO's loss written out over those pairs against the model as loaded (a frozen copy, or the
LoRA base), the missing-EOS penalty, the reward rising on a toy task and exact resume from the CLI."""

import json
import math
import statistics

import pytest
import torch

from apr_kernels.train.cli import byte_tokenizer
from apr_kernels.train.data import BatchStream
from apr_kernels.train.grpo import read_prompts
from apr_kernels.train.loop import TrainConfig
from apr_kernels.train.online_dpo import OnlineDPOTrainer, pick_pairs

from test_grpo import _cli_run, _letters, _model, _policy, _prompts_file, _refusal_setup, assert_same_grads  # (the toy task GRPO learns)


def test_pairs_are_the_best_and_the_worst_first_among_equals():
    scores = torch.tensor([[0.1, 0.9, 0.3], [0.5, 0.5, 0.5], [0.2, 0.2, 0.7], [1.0, 0.0, 0.0]])
    assert pick_pairs(scores).tolist() == [[1, 0], [0, 2], [2, 1], [0, 2]]


@pytest.mark.parametrize("lora,loss,penalty", [(False, "sigmoid", None), (True, "ipo", None),
                                               (False, "sigmoid", 0.5)],
                         ids=["reference-copy-sigmoid", "lora-base-ipo", "missing-eos-penalty"])
def test_one_step_is_dpo_on_the_ranked_samples_written_out(tmp_path, lora, loss, penalty):
    """The completions sampled with each prompt's seeded generator, ranked by the reward (minus
    the penalty when no stop token came), the best and worst of each prompt as a pair, DPO's loss of
    sequence log-likelihoods (each from log_softmax on that sequence alone) against the model as loaded:
    the trainer's loss, logged values and clipped gradients are this objective's."""
    from apr_kernels.model.lora import adapters_disabled

    tok = byte_tokenizer()
    prompts = read_prompts([_prompts_file(tmp_path / "p.jsonl", ["Write:", "Say it:", "Go:"])], tok, 32)
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=48, lr=3e-3, warmup=1)
    rewards = {"letters": lambda prompts, completions, **kw: _letters(completions)}

    def build():
        return _policy(tok, lora)

    trained = build()
    reference = None if lora else _model(tok).requires_grad_(False)
    trainer = OnlineDPOTrainer(trained, prompts, rewards, cfg, tokenizer=tok, num_generations=3, max_new_tokens=6,
                               temperature=1.0, beta=0.3, loss=loss, missing_eos_penalty=penalty,
                               reference=reference)
    rec = trainer.train_step()

    model = build()
    index = BatchStream(len(prompts), seed=cfg.seed).next(2).tolist()

    def logp(m, prompt_ids, ids):
        seq = torch.tensor([prompt_ids + ids])
        logits = m(seq[:, :-1])[0].double().log_softmax(-1)
        return sum(logits[len(prompt_ids) - 1 + k, t] for k, t in enumerate(ids))

    helper = OnlineDPOTrainer(build(), prompts, rewards, cfg, tokenizer=tok, num_generations=3, max_new_tokens=6,
                              temperature=1.0, reference=_model(tok))
    groups = helper.sample_groups([prompts[i] for i in index],
                                  [torch.Generator().manual_seed((cfg.seed * 1_000_003 + 0) * 1_000_033 + k)
                                   for k in range(len(index))])
    objective, chosen_scores = 0.0, []
    for i, completions in zip(index, groups):
        p = prompts[i]
        cut = [tok.eos_id not in ids for ids in completions]
        scores = _letters([tok.decode([t for t in ids if t != tok.eos_id]) for ids in completions])
        ranked = [s - (penalty if penalty and c else 0.0) for s, c in zip(scores, cut)]
        best = max(range(3), key=lambda j: (ranked[j], -j))
        worst = max(range(3), key=lambda j: (-ranked[j], j))
        chosen_scores.append(ranked[best])
        pc, pr = logp(model, p["ids"], completions[best]), logp(model, p["ids"], completions[worst])
        with torch.no_grad():
            if lora:
                with adapters_disabled(model):
                    rc, rr = logp(model, p["ids"], completions[best]), logp(model, p["ids"], completions[worst])
            else:
                rc, rr = logp(reference, p["ids"], completions[best]), logp(reference, p["ids"], completions[worst])
        if loss == "sigmoid":
            h = (pc - rc) - (pr - rr)
            objective = objective - torch.nn.functional.logsigmoid(0.3 * h) / 2
        else:  # IPO on per-token log-likelihoods, as TRL
            h = (pc - rc) / len(completions[best]) - (pr - rr) / len(completions[worst])
            objective = objective + (h - 1 / (2 * 0.3)) ** 2 / 2
    objective.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    assert rec["loss"] == pytest.approx(objective.item(), rel=1e-5)
    assert rec["score_chosen"] == pytest.approx(statistics.mean(chosen_scores), rel=1e-9)
    assert rec["grad_norm"] == pytest.approx(norm.item(), rel=1e-4)
    assert_same_grads(trained, model)


def test_refusals_name_the_option(tmp_path):
    tok, prompts, cfg, fn = _refusal_setup(tmp_path)
    with pytest.raises(ValueError, match="online-dpo: the reference model is needed"):
        OnlineDPOTrainer(_model(tok), prompts, fn, cfg, tokenizer=tok)
    with pytest.raises(ValueError, match="online-dpo: --loss 'hinge'; expected one of sigmoid, ipo"):
        OnlineDPOTrainer(_model(tok), prompts, fn, cfg, tokenizer=tok, loss="hinge", reference=_model(tok))
    with pytest.raises(ValueError, match="online-dpo: --num-generations must be at least 2"):
        OnlineDPOTrainer(_model(tok), prompts, fn, cfg, tokenizer=tok, num_generations=1, reference=_model(tok))


def test_cli_online_dpo_raises_the_reward_and_resumes_exactly(tmp_path, capsys):
    from apr_kernels.cli import main

    args = [*_cli_run(tmp_path, "online-dpo"), "--steps", "30", "--batch-size", "4", "--num-generations", "4",
            "--max-new-tokens", "8", "--max-prompt-len", "32", "--lr", "1e-2", "--beta", "0.5", "--save-every", "20"]
    assert main(args) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    train = [r for r in recs if r["event"] == "train"]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy is the reference
    assert statistics.mean(r["reward"] for r in train[:5]) < 0.25 < 0.5 < statistics.mean(r["reward"] for r in train[-5:])
    evals = [r for r in recs if r["event"] == "eval"]
    assert evals[-1]["eval_reward"] > evals[0]["eval_reward"] + 0.3
    assert main(["online-dpo", "--resume", str(tmp_path / "o" / "step_000020.apr"), "--json", "--out",
                 str(tmp_path / "r")]) == 0
    resumed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["loss"] for r in resumed if r["event"] == "train"] == [r["loss"] for r in train[20:]]
