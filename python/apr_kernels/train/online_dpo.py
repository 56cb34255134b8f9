"""Online DPO (Guo et al., 2024, "Direct Language Model Alignment from Online AI Feedback") as TRL's
``OnlineDPOTrainer`` runs it with a reward model: ``apr-kernels online-dpo``.

Each step samples ``--num-generations`` (2) completions of each prompt from the policy being trained,
scores them with the reward functions or reward models (``--reward``, as ``grpo`` takes them; a
completion that never reached a stop token loses ``--missing-eos-penalty``, TRL's option), and makes
each prompt's best and worst completion a preference pair (ties: the first sampled is the chosen
one). The pairs train with DPO's loss (``--loss sigmoid|ipo``, ``--beta``; ``preference.dpo_loss``)
against the reference, the model as loaded (with LoRA, the frozen base; else a frozen copy of
``--init``), whose log-likelihoods of the fresh pairs are computed each step without gradients;
the step's loss is the mean over all its pairs (every rank's).

Prompts, sampling (seeded by the step and the prompt's place: exact resume, rank-invariant), reward
calling, held-out evaluation (the mean reward of one greedy completion per held-out prompt), LoRA,
checkpoints and torchrun are ``grpo``'s (``GRPOTrainer``, whose generation this trainer reuses).
Logged: the loss, the implicit rewards ``beta (pi - ref)`` of both sides, their margin and accuracy,
the reward functions' scores of all completions (``reward``), of the chosen and the rejected ones,
the completion lengths and the share cut at ``--max-new-tokens``.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from .grpo import GRPOTrainer, add_sampling_options, require_prompts_and_rewards, run_sampling_command
from .posttrain import add_options, run_command, sequence_logps
from .preference import dpo_loss

LOSSES = ("sigmoid", "ipo")


def pick_pairs(scores: torch.Tensor) -> torch.Tensor:
    """``[P, 2]`` indices of each row's best and worst completion in ``scores [P, G]`` (the first
    of equal scores is the best, the last of equal ones the worst: with ties everywhere, the first
    and last sampled)."""
    g = scores.shape[1]
    best = scores.argmax(1)  # (the first maximum)
    worst = g - 1 - scores.flip(1).argmin(1)  # (the last minimum)
    return torch.stack([best, worst], 1)


class OnlineDPOTrainer(GRPOTrainer):
    """Online DPO on ``prompts`` with ``rewards`` (``GRPOTrainer``'s sampling, scoring and evaluation)
    and the DPO loss ``loss`` at ``beta`` against ``reference`` (None with LoRA: the frozen base);
    ``micro_batch``: pairs per training forward."""

    command = "online-dpo"

    def __init__(self, model, prompts, rewards, cfg, *, beta: float = 0.1, loss: str = "sigmoid",
                 missing_eos_penalty: float | None = None, reference=None, **sampling):
        if loss not in LOSSES:
            raise ValueError(f"online-dpo: --loss {loss!r}; expected one of {', '.join(LOSSES)}")
        if not beta > 0:
            raise ValueError(f"online-dpo: --beta {beta}; expected a positive number")
        if not rewards:
            raise ValueError("online-dpo: no reward function or model (--reward FILE.py:NAME or RM.apr)")
        super().__init__(model, prompts, rewards, cfg, **sampling)
        if reference is None and not self.lora:
            raise ValueError("online-dpo: the reference model is needed (the model as loaded; with LoRA, the frozen "
                             "base)")
        self.reference, self.dpo_beta, self.loss_kind = reference, beta, loss
        self.missing_eos_penalty = missing_eos_penalty
        self.eos = self.tok.eos_id

    def _pair_logps(self, pairs: list[tuple[list[int], list[int]]], model) -> torch.Tensor:
        """``[N, 2]`` log-likelihoods of the chosen and rejected completions through ``model``."""
        with self._autocast():
            return sequence_logps(model, [s for pair in pairs for s in pair], self.device, eos_id=self.eos,
                                  padding_free=self.padding_free).view(len(pairs), 2)

    @torch.no_grad()
    def _reference_logps(self, pairs) -> torch.Tensor:
        if self.reference is not None:
            out = self._pair_logps(pairs, self.reference)
            from .distributed import reshard

            reshard(self.reference)  # (a no-grad forward leaves FSDP's root gathered)
            return out
        from apr_kernels.model.lora import adapters_disabled

        with adapters_disabled(self.model):  # LoRA: the frozen base is the model as loaded
            out = self._pair_logps(pairs, self.parallel or self.model)
        if self.parallel is not None:
            self.parallel.reshard()
        return out

    def train_step(self) -> dict:
        c, par = self.cfg, self.parallel
        lr, t0 = self._start_step()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        batch = self.generate()
        g = self.num_generations
        scores = batch["rewards"].clone()  # [P, G] of this rank's prompts
        if self.missing_eos_penalty is not None:
            scores -= self.missing_eos_penalty * (1 - batch["finished"].view_as(scores))
        picks = pick_pairs(scores)
        seqs = batch["seqs"]
        pairs = [(seqs[p * g + int(i)], seqs[p * g + int(j)]) for p, (i, j) in enumerate(picks.tolist())]
        lengths = torch.tensor([[sum(t >= 0 for t in s[1:]) for s in pair] for pair in pairs], dtype=torch.float32)
        ref = self._reference_logps(pairs)
        sums = torch.zeros(9, dtype=torch.float64)
        spans = self._micro_batches(len(pairs))
        for k, (a, b) in enumerate(spans):
            with par.grad_sync(k == len(spans) - 1) if par is not None else contextlib.nullcontext():
                pol = self._pair_logps(pairs[a:b], self.parallel or self.model)
                losses, chosen, rejected = dpo_loss(pol[:, 0], pol[:, 1], ref[a:b, 0].to(pol.device),
                                                    ref[a:b, 1].to(pol.device), self.dpo_beta, loss_type=self.loss_kind,
                                                    lengths=lengths[a:b])
                # the mean over the step's pairs (one per prompt, all ranks); DDP/FSDP average over ranks
                ((losses.sum() / c.batch_size + self._balance(len(spans))) * self.world).backward()
            sums[:5] += torch.stack([losses.detach().sum(), chosen.sum(), rejected.sum(), (chosen - rejected).sum(),
                                     (chosen > rejected).sum()]).double().cpu()
        rows = torch.arange(len(pairs))
        sums[5:] = torch.tensor([float(batch["rewards"].sum()), float(scores[rows, picks[:, 0]].sum()),
                                 float(scores[rows, picks[:, 1]].sum()),
                                 float(sum(batch["lengths"]))], dtype=torch.float64)
        cut = torch.tensor([float((1 - batch["finished"]).sum())], dtype=torch.float64)
        sums, grad_norm = self._finish_step(torch.cat([sums, cut]))
        router, balance = self._router_logs()
        loss, reward_chosen, reward_rejected, margin, acc = (sums[:5] / c.batch_size).tolist()
        loss += balance
        n = c.batch_size * g
        if not math.isfinite(loss):
            raise RuntimeError(f"online-dpo diverged: loss={loss} at step {self.step} (lower --lr?)")
        return {"step": self.step, "loss": loss, "lr": lr, "reward_chosen": reward_chosen,
                "reward_rejected": reward_rejected, "margin": margin, "reward_acc": acc,
                "reward": float(sums[5]) / n, "score_chosen": float(sums[6]) / c.batch_size,
                "score_rejected": float(sums[7]) / c.batch_size, "completion_len": float(sums[8]) / n,
                "truncated": float(sums[9]) / n, **router, "grad_norm": grad_norm, "s": time.perf_counter() - t0}


def cmd_online_dpo(args) -> int:
    """``apr-kernels online-dpo``: online DPO from an APR file; step checkpoints (``--save-every``,
    resumable with ``--resume``), ``--out/model.apr`` at the end (adapters merged); DDP/FSDP under
    torchrun."""
    return run_command(args, lambda env, mode: _online_dpo(args, env, mode))


def _online_dpo(args, env, mode: str) -> int:
    def own(args) -> dict:
        require_prompts_and_rewards(args, "online-dpo")
        # (beta here is DPO's, and the reference is always needed: run.reference asks for it)
        return {"beta": args.beta, "loss": args.loss, "missing_eos_penalty": args.missing_eos_penalty}

    def build(run, settings, cfg, parallel, reference):
        return OnlineDPOTrainer(run.model, run.prompts, run.rewards, cfg, parallel=parallel, **run.sampling_kwargs(),
                                beta=settings["beta"], loss=settings["loss"],
                                missing_eos_penalty=settings["missing_eos_penalty"], reference=reference)

    return run_sampling_command(args, env, mode, "online-dpo", own, build,
                                lambda t: {"beta": t.dpo_beta, "loss": t.loss_kind})


def register(subparsers) -> None:
    p = subparsers.add_parser("online-dpo", help="online DPO: pairs sampled from the policy and ranked by reward "
                                                 "functions or models, from an APR file")
    add_sampling_options(p, num_generations=2, max_new_tokens=64, temperature=0.9)
    p.add_argument("--beta", type=float, default=0.1, help="DPO's beta (default 0.1)")
    p.add_argument("--loss", choices=LOSSES, default="sigmoid", help="DPO's loss (sigmoid) or IPO's")
    p.add_argument("--missing-eos-penalty", type=float, default=None,
                   help="subtracted from the score of a completion cut at --max-new-tokens (TRL's option)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="pairs per training forward (default: all of a rank's pairs of the step)")
    add_options(p, command="online-dpo", lr=5e-7, lr_help="peak learning rate (default 5e-7; LoRA wants ~5e-5)")
    p.set_defaults(func=cmd_online_dpo)
