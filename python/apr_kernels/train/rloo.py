"""REINFORCE Leave-One-Out (Ahmadian et al., 2024, "Back to Basics") as TRL's ``RLOOTrainer`` runs it:
``apr-kernels rloo``.

Each step samples ``--num-generations`` completions of each prompt and scores them as ``grpo`` does
(the same prompts, sampling, reward functions or models, held-out evaluation, LoRA, checkpoints and
torchrun: ``GRPOTrainer``, whose generation this trainer reuses). What differs is the objective:

* the KL penalty is part of the reward, per completion: ``r_i = score_i - beta * sum_t (log
  p_generating(t) - log p_ref(t))``, the first-order estimate summed over the completion's tokens
  (``--beta``, TRL's default 0.05; 0: no reference pass); the reference is the model as loaded (with
  LoRA, the frozen base);
* each completion's advantage has the mean reward of its prompt's *other* completions as baseline,
  ``A_i = r_i - (sum_j r_j - r_i) / (G - 1)``; with ``--normalize-advantages`` the step's advantages
  (all ranks) are then shifted and scaled to mean 0 and std 1 (unbiased std, + 1e-4);
* a completion is one action: the loss is PPO's clipped objective on the completion's probability
  ratio, ``-min(rho A, clip(rho, 1 - eps, 1 + eps_high) A)`` with ``rho = exp(sum_t log p - sum_t
  log p_generating)``, averaged over the step's completions (all ranks). With one update per
  generation batch (``--num-iterations 1``, the default) ``rho`` is 1 and this is REINFORCE with the
  leave-one-out baseline: ``-mean_i A_i log p(completion_i)``.

``--mask-truncated-completions`` leaves completions cut at ``--max-new-tokens`` out of the loss (they
still count in the baselines and the mean's denominator). Logged besides ``grpo``'s reward records:
``kl``, the mean per-token first-order KL of the step's kept tokens (with ``--beta``), and
``clip_ratio`` (with ``--num-iterations`` > 1: the share of kept tokens in completions whose ratio
was clipped).
"""

from __future__ import annotations

import math

import torch

from .grpo import GRPOTrainer, add_sampling_options, require_prompts_and_rewards, run_sampling_command
from .posttrain import add_options, run_command


def leave_one_out_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """``[P, G]`` rewards -> each one minus the mean of the other ``G - 1`` of its row."""
    g = rewards.shape[1]
    if g < 2:
        raise ValueError("rloo: --num-generations must be at least 2 (the baseline is the other completions' mean)")
    return rewards - (rewards.sum(1, keepdim=True) - rewards) / (g - 1)


def segment_sums(values: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Sums of consecutive runs of ``values`` of the given ``lengths`` (one per completion)."""
    lens = torch.tensor(lengths, device=values.device)
    index = torch.arange(len(lengths), device=values.device).repeat_interleave(lens)
    return values.new_zeros(len(lengths)).index_add(0, index, values)


class RLOOTrainer(GRPOTrainer):
    """RLOO on ``prompts`` with ``rewards`` (``GRPOTrainer``'s sampling, scoring and evaluation): the
    KL to ``reference`` (None with LoRA: the frozen base) at ``beta`` in the reward, leave-one-out
    advantages (``normalize_advantages``), the sequence-level clipped objective (module docstring)."""

    command = "rloo"

    def __init__(self, model, prompts, rewards, cfg, *, beta: float = 0.05, normalize_advantages: bool = False,
                 reference=None, **sampling):
        if not rewards:
            raise ValueError("rloo: no reward function or model (--reward FILE.py:NAME or RM.apr)")
        if not beta >= 0:
            raise ValueError(f"rloo: --beta {beta}; expected >= 0")
        for key in ("loss_type", "scale_rewards", "importance_sampling", "teacher"):
            if key in sampling:
                raise ValueError(f"rloo: {key} is grpo's; RLOO's objective is fixed (module docstring)")
        super().__init__(model, prompts, rewards, cfg, **sampling)  # (grpo's beta 0: no per-token KL)
        if beta and reference is None and not self.lora:
            raise ValueError("rloo: --beta > 0 needs the reference model (the model as loaded; with LoRA, the "
                             "frozen base)")
        self.kl_beta, self.normalize_advantages = beta, normalize_advantages
        self.reference = reference if beta else None
        self._kl = (0.0, 0.0)  # (first-order KL summed over the generation batch's kept tokens, their count)

    def _reference_token_logps(self, seqs) -> list[torch.Tensor]:
        if self.reference is not None:
            return self._token_logps_no_grad(seqs, self.reference)
        from apr_kernels.model.lora import adapters_disabled

        with adapters_disabled(self.model):  # LoRA: the frozen base is the model as loaded
            return self._token_logps_no_grad(seqs, self.parallel or self.model)

    def generate(self) -> dict:
        """``GRPOTrainer.generate``'s batch with RLOO's advantages and weights (module docstring)."""
        batch = super().generate()
        c, par = self.cfg, self.parallel
        lengths, seqs = batch["lengths"], batch["seqs"]
        rewards = batch["rewards"]  # [P, G] of this rank's prompts: the reward functions' scores
        kl = torch.zeros(len(seqs), dtype=torch.float64)
        kl_sums = torch.zeros(2, dtype=torch.float64)
        if self.kl_beta:
            if batch["old"] is None:  # the generating policy (with one update per batch, the policy now)
                batch["old"] = self._token_logps_no_grad(seqs, self.parallel or self.model)
            ref = self._reference_token_logps(seqs)
            parts = []
            for k, (a, b) in enumerate(self._micro_batches(len(seqs))):
                parts.append(segment_sums((batch["old"][k] - ref[k]).double(), lengths[a:b]).cpu())
            kl = torch.cat(parts)
            kept = batch["keep"]
            kl_sums = torch.stack([(kl * kept).sum(), (torch.tensor(lengths, dtype=torch.float64) * kept).sum()])
        adv = leave_one_out_advantages(rewards - self.kl_beta * kl.view_as(rewards)).flatten()
        # the step's advantage and KL sums over all ranks (a prompt's group stays on one rank)
        totals = torch.cat([torch.stack([adv.sum(), (adv ** 2).sum()]), kl_sums])
        if par is not None:
            totals = par.mean(totals.to(self.device)).cpu() * self.world
        n = c.batch_size * self.num_generations  # the step's completions, all ranks
        a_sum, a_sq, kl_sum, kl_tokens = totals.tolist()
        if self.normalize_advantages:
            std = math.sqrt(max(0.0, (a_sq - a_sum * a_sum / n) / max(1, n - 1)))
            adv = (adv - a_sum / n) / (std + 1e-4)
        batch["advantages"] = adv
        batch["weights"] = batch["keep"] / n  # the mean over the step's completions
        self._kl = (kl_sum, kl_tokens)
        return batch

    def _token_objective(self, logps: torch.Tensor, batch: dict, k: int, a: int, b: int) -> tuple[torch.Tensor, list]:
        """The sequence-level clipped objective of micro-batch ``k`` (completions ``a:b``) from token
        log-probabilities (``--num-iterations`` > 1), and (0, tokens of kept clipped completions, 0)."""
        lengths = batch["lengths"][a:b]
        seq = segment_sums(logps, lengths)
        old = segment_sums(batch["old"][k].to(logps.dtype), lengths)
        adv = batch["advantages"][a:b].to(logps.device, logps.dtype)
        ratio = torch.exp(seq - old)
        low, high = self.epsilon
        per_seq = -torch.minimum(ratio * adv, ratio.clamp(1 - low, 1 + high) * adv)
        clipped = ((ratio < 1 - low) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
        kept = batch["keep"][a:b].to(logps.device) > 0
        lens = torch.tensor(lengths, device=logps.device, dtype=logps.dtype)
        weight = batch["weights"][a:b].to(logps.device, logps.dtype)
        zero = torch.zeros((), device=logps.device)
        return (weight * per_seq).sum(), [zero, (lens * (clipped & kept)).sum(), zero]

    def train_step(self) -> dict:
        rec = super().train_step()
        if self.kl_beta:
            kl_sum, kl_tokens = self._kl
            rec["kl"] = kl_sum / max(kl_tokens, 1.0)
        return rec


def cmd_rloo(args) -> int:
    """``apr-kernels rloo``: RLOO from an APR file; step checkpoints (``--save-every``, resumable with
    ``--resume``), ``--out/model.apr`` at the end (adapters merged); DDP/FSDP under torchrun."""
    return run_command(args, lambda env, mode: _rloo(args, env, mode))


def _rloo(args, env, mode: str) -> int:
    def own(args) -> dict:
        require_prompts_and_rewards(args, "rloo")
        return {"beta": args.beta, "normalize_advantages": args.normalize_advantages,
                "num_iterations": args.num_iterations, "epsilon": args.epsilon, "epsilon_high": args.epsilon_high,
                "mask_truncated": args.mask_truncated_completions}

    def build(run, settings, cfg, parallel, reference):
        return RLOOTrainer(run.model, run.prompts, run.rewards, cfg, parallel=parallel, **run.sampling_kwargs(),
                           beta=settings["beta"], normalize_advantages=settings["normalize_advantages"],
                           reference=reference, num_iterations=settings["num_iterations"],
                           epsilon=settings["epsilon"], epsilon_high=settings["epsilon_high"],
                           mask_truncated=settings["mask_truncated"])

    return run_sampling_command(args, env, mode, "rloo", own, build, lambda t: {
        "beta": t.kl_beta, "normalize_advantages": t.normalize_advantages, "num_iterations": t.num_iterations})


def register(subparsers) -> None:
    p = subparsers.add_parser("rloo", help="REINFORCE leave-one-out (RLOO) from reward functions or models, from an "
                                           "APR file")
    add_sampling_options(p, num_generations=2, max_new_tokens=256, temperature=1.0)
    p.add_argument("--beta", type=float, default=0.05,
                   help="weight of the KL to the reference (the model as loaded; with LoRA the frozen base) "
                        "subtracted from each completion's reward (TRL's default 0.05; 0: no reference pass)")
    p.add_argument("--normalize-advantages", action="store_true",
                   help="scale the step's advantages to mean 0 and std 1 (TRL's normalize_advantages)")
    p.add_argument("--num-iterations", type=int, default=1,
                   help="updates per generation batch (PPO's clipped ratio per completion; default 1)")
    p.add_argument("--epsilon", type=float, default=0.2, help="PPO clipping range of the ratio (default 0.2)")
    p.add_argument("--epsilon-high", type=float, default=None, help="upper clipping range (default --epsilon)")
    p.add_argument("--mask-truncated-completions", action="store_true",
                   help="leave completions cut at --max-new-tokens out of the loss (TRL's option)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="completions per training forward (default: all of a rank's completions of the step)")
    add_options(p, command="rloo", lr=1e-6, lr_help="peak learning rate (default 1e-6; LoRA wants ~1e-5)")
    p.set_defaults(func=cmd_rloo)
