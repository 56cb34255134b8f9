"""Reward modelling (Bradley-Terry, as in InstructGPT and TRL's ``RewardTrainer``): ``apr-kernels reward``.

The model is a sequence classifier with one label (``Transformer`` with ``config.num_labels = 1``,
Hugging Face's ``*ForSequenceClassification``): the decoder of a causal LM (usually the SFT model,
``--init``) with a ``score`` head ``[1, hidden]`` on the hidden state of each sequence's last token
instead of the output projection. From a causal LM the head is new (normal, std 0.02, seeded by
``--seed``); from a reward model it is the file's.

Data: JSON Lines preference records in TRL's formats: ``{"prompt", "chosen", "rejected"}`` (strings,
or message lists rendered with the chat format, as ``dpo`` reads them) or the implicit-prompt form
``{"chosen", "rejected"}`` (each side a whole text or conversation); an optional ``"margin"`` field.
Each side becomes prompt + answer followed by the token that closes it (``data.marked_ids``; the
end-of-text id last), and its reward is the score at that last token. Pairs with a side longer than
``--max-len`` tokens are left out (TRL filters them the same way), never cut: a cut sequence would be
scored at a token inside its answer.

Loss per pair (TRL's): ``-log sigmoid(r_chosen - r_rejected - margin) + c (r_chosen + r_rejected)^2``,
``c`` = ``--center-rewards-coefficient`` (0 by default; above 0 it keeps rewards centred on zero),
averaged over the step's pairs. Logged: the loss, ``accuracy`` (the share of pairs whose chosen side
scores higher), the mean ``margin`` ``r_chosen - r_rejected`` and the mean rewards of each side;
held-out: the same over ``--eval-data`` (or ``--eval-fraction`` of the data).

Padding-free batches (where the package kernels run) put a micro-batch's sequences back to back in
one row, each its own document, and read the score at each document's end. LoRA keeps the new score
head trainable (PEFT's ``modules_to_save`` for sequence classification). Checkpoints, ``--resume``,
torchrun and the rest follow ``posttrain.py``; the final ``model.apr`` is the reward model, which
``grpo --reward RM.apr`` scores completions with and ``export`` writes as a Hugging Face
``*ForSequenceClassification`` folder.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F

from .loop import TrainConfig
from .posttrain import (StepLoop, absolute, add_options, config_from, device_for, fit_epochs, held_out, logger_for,
                        parallel_for, run_command, settings_and_model, start_fields, tokenizer_for, train_and_save)
from .preference import answer_ids


def sequence_ids(prompt, answer, tokenizer, where: str, field: str) -> list[int]:
    """Plain ids of ``prompt`` + ``answer`` (as ``dpo`` renders them) ending with the end-of-text id."""
    return [t if t >= 0 else -1 - t for t in answer_ids(prompt, answer, tokenizer, where, field)]


def read_pairs(paths, tokenizer, max_len: int) -> tuple[list[tuple[list[int], list[int]]], list[float], int]:
    """(pairs of (chosen, rejected) ids, each pair's margin, pairs left out for a side over ``max_len``)."""
    from .posttrain import jsonl_records

    if getattr(tokenizer, "eos_id", None) is None:
        raise ValueError("reward: the tokenizer has no end-of-text id (the last token of every scored sequence)")
    pairs, margins, dropped = [], [], 0
    for where, record in jsonl_records(paths, "reward data ({'chosen', 'rejected'} records)"):
        if not isinstance(record, dict) or not all(k in record for k in ("chosen", "rejected")):
            raise ValueError(f"{where}: a reward record needs 'chosen' and 'rejected' (and optionally 'prompt' "
                             f"and 'margin')")
        margin = record.get("margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            raise ValueError(f"{where}: 'margin' must be a finite number, got {margin!r}")
        prompt = record.get("prompt", [] if isinstance(record["chosen"], list) else "")
        pair = tuple(sequence_ids(prompt, record[side], tokenizer, where, side) for side in ("chosen", "rejected"))
        if max(len(s) for s in pair) > max_len:
            dropped += 1
            continue
        pairs.append(pair)
        margins.append(float(margin))
    if not pairs:
        raise ValueError(f"reward: no usable pairs in {', '.join(map(str, paths))}"
                         + (f" ({dropped} longer than --max-len {max_len} tokens)" if dropped else ""))
    return pairs, margins, dropped


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None,
                center_coefficient: float = 0.0) -> torch.Tensor:
    """Per-pair Bradley-Terry losses of rewards ``[N]`` (module docstring)."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff.device, diff.dtype)
    losses = -F.logsigmoid(diff)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen + rejected) ** 2
    return losses


def sequence_rewards(model, seqs: list[list[int]], device, *, pad_id: int, padding_free: bool = False) -> torch.Tensor:
    """fp32 ``[N]``: the reward model's score of each id list (at its last token). Right-padded rows,
    or with ``padding_free`` one packed row with each sequence a document. ``model``: the classifier or
    its ``distributed.Parallel`` (the forward runs through DDP/FSDP)."""
    from apr_kernels.model.documents import Documents
    from apr_kernels.model.transformer import sequence_ends

    lengths = [len(s) for s in seqs]
    if padding_free:
        x = torch.tensor([[t for s in seqs for t in s]])
        cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
        docs, ends = Documents(cu, max(lengths)).to(device), sequence_ends(lengths)
    else:
        x = torch.full((len(seqs), max(lengths)), pad_id, dtype=torch.int64)
        for i, s in enumerate(seqs):
            x[i, : len(s)] = torch.tensor(s)
        docs, ends = None, sequence_ends(lengths, x.shape[1])
    return model(x.to(device), documents=docs, ends=ends.to(device))[:, 0].float()


class RewardTrainer(StepLoop):
    """Bradley-Terry reward modelling on ``pairs`` (``read_pairs``) with ``TrainConfig``'s optimiser,
    schedule, clipping, batch size (pairs per micro-batch), gradient accumulation, precision and seed.
    ``model``: a sequence classifier with one label."""

    def __init__(self, model, pairs, margins, eval_pairs, eval_margins, cfg: TrainConfig, *, eos_id: int,
                 center_coefficient: float = 0.0, device=None, log=None, parallel=None,
                 padding_free: bool | None = None):
        if model.config.num_labels != 1:
            raise ValueError(f"reward: the model has num_labels={model.config.num_labels}; expected a reward model "
                             f"(one label: from_apr(..., num_labels=1))")
        if not center_coefficient >= 0:
            raise ValueError(f"reward: --center-rewards-coefficient {center_coefficient}; expected >= 0")
        self._setup("reward", model, cfg, device=device, parallel=parallel, padding_free=padding_free, log=log,
                    n_data=len(pairs), what="every batch of pairs")
        self.eos, self.center = eos_id, center_coefficient
        self.pairs, self.margins = pairs, torch.tensor(margins, dtype=torch.float32)
        self.eval_pairs = eval_pairs
        self.eval_margins = torch.tensor(eval_margins or [], dtype=torch.float32)
        self.has_eval = bool(eval_pairs)

    def _batch_values(self, items) -> torch.Tensor:
        """``[N, 2]`` rewards of each pair's chosen and rejected sequence."""
        seqs = [s for item in items for s in item]
        with self._autocast():
            return sequence_rewards(self.parallel or self.model, seqs, self.device, pad_id=self.eos,
                                    padding_free=self.padding_free).view(len(items), 2)

    def _stats(self, rewards: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """Sums of (loss, correct pairs, margin, chosen reward, rejected reward) in float64."""
        r = rewards.detach()
        return torch.stack([losses.detach().sum(), (r[:, 0] > r[:, 1]).sum(), (r[:, 0] - r[:, 1]).sum(),
                            r[:, 0].sum(), r[:, 1].sum()]).double().cpu()

    def _record(self, sums: torch.Tensor, n: int, prefix: str = "") -> dict:
        loss, correct, margin, chosen, rejected = (v / n for v in sums.tolist())
        return {f"{prefix}loss": loss, f"{prefix}accuracy": correct, f"{prefix}margin": margin,
                f"{prefix}reward_chosen": chosen, f"{prefix}reward_rejected": rejected}

    def train_step(self) -> dict:
        c, par = self.cfg, self.parallel
        lr, t0 = self._start_step()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n = c.batch_size * c.grad_accum  # the step's loss is the mean over all of its pairs
        sums = torch.zeros(5, dtype=torch.float64)
        for micro in range(c.grad_accum):
            index = self.batches.next(c.batch_size)
            if par is not None:
                index = par.local_rows(index)
            with par.grad_sync(micro == c.grad_accum - 1) if par is not None else contextlib.nullcontext():
                rewards = self._batch_values([self.pairs[i] for i in index.tolist()])
                losses = reward_loss(rewards[:, 0], rewards[:, 1], self.margins[index], self.center)
                # DDP/FSDP average gradients over the ranks: scaled by the world size, a sum over ranks
                (losses.sum() * (self.world / n)).backward()
            sums += self._stats(rewards, losses)
        sums, grad_norm = self._finish_step(sums)
        record = self._record(sums, n)
        if not math.isfinite(record["loss"]):
            raise RuntimeError(f"reward diverged: loss={record['loss']} at step {self.step} (lower --lr?)")
        return {"step": self.step, **record, "lr": lr, "grad_norm": grad_norm, "s": time.perf_counter() - t0}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The loss, accuracy, margin and mean rewards over the held-out pairs."""
        rewards = self._logps(self.eval_pairs)
        losses = reward_loss(rewards[:, 0], rewards[:, 1], self.eval_margins, self.center)
        return {"step": self.step, **self._record(self._stats(rewards, losses), len(self.eval_pairs), "eval_"),
                "eval_pairs": len(self.eval_pairs)}


@torch.no_grad()
def evaluate_pairs(model, pairs, margins, *, eos_id: int, batch_size: int = 8, device=None,
                   autocast_dtype: torch.dtype | None = None, env=None, sharded: bool = False) -> dict:
    """A reward model's ``accuracy`` (chosen scored higher), mean ``margin`` and Bradley-Terry ``loss``
    over ``pairs`` (``read_pairs``), scored ``batch_size`` pairs at a time (``eval --pairs``; under
    torchrun, ``env``, every N-th batch on each rank, ``rank_share.batch_rounds``, with ``sharded`` as
    many forwards on every rank of a model FSDP shards; all of them on every rank)."""
    from .rank_share import batch_rounds, every_batch

    device = torch.device(device) if device is not None else next(model.parameters()).device
    padding_free = model.use_fast(torch.empty(0, device=device))
    was = model.training
    model.eval()
    parts = []
    for i in batch_rounds(len(pairs), batch_size, env, sharded):
        seqs = [s for pair in pairs[i or 0:(i or 0) + batch_size] for s in pair]
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            r = sequence_rewards(model, seqs, device, pad_id=eos_id, padding_free=padding_free)
        if i is not None:  # (else the padding forward of a sharded model: the others' gathers)
            parts.append(r.view(-1, 2).cpu().double())
    model.train(was)
    if sharded:  # (the root stays gathered after a forward without a backward)
        from .distributed import reshard

        reshard(model)
    r = torch.cat(every_batch(env, parts)).reshape(-1, 2)
    losses = reward_loss(r[:, 0], r[:, 1], torch.tensor(margins, dtype=torch.float64))
    return {"accuracy": float((r[:, 0] > r[:, 1]).double().mean()), "margin": float((r[:, 0] - r[:, 1]).mean()),
            "loss": float(losses.mean()), "pairs": len(pairs)}


def cmd_reward(args) -> int:
    """``apr-kernels reward``: a reward model from an APR file; step checkpoints (``--save-every``,
    resumable with ``--resume``), ``--out/model.apr`` at the end (adapters merged); DDP/FSDP under
    torchrun."""
    return run_command(args, lambda env, mode: _reward(args, env, mode))


def _reward(args, env, mode: str) -> int:
    from .checkpoint import restore_training_state
    from .cli import tristate

    def fresh():
        if not (args.init and args.data):
            raise ValueError("reward: --init FILE.apr and --data PAIRS.jsonl... are required (or --resume STEP.apr)")
        reward = {"center_rewards_coefficient": args.center_rewards_coefficient, "init": str(args.init),
                  "data": absolute(args.data), "eval_data": absolute(args.eval_data),
                  "eval_fraction": args.eval_fraction, "max_len": args.max_len, "tokenizer": args.tokenizer}
        return reward, config_from(args, grad_accum=args.grad_accum, seq_len=args.max_len)

    device = device_for(args, env, mode)
    reward, cfg, model = settings_and_model(args, env, mode, device, "reward", fresh, num_labels=1,
                                            score_seed=args.seed)
    source = args.resume or reward["init"]
    tok = tokenizer_for(reward["tokenizer"], model, source)
    pairs, margins, dropped = read_pairs(reward["data"], tok, reward["max_len"])
    if reward["eval_data"]:
        eval_pairs, eval_margins, eval_dropped = read_pairs(reward["eval_data"], tok, reward["max_len"])
        dropped += eval_dropped
    else:  # a held-out share, chosen by the seed
        keep, held = held_out(len(pairs), reward["eval_fraction"], cfg.seed)
        eval_pairs, eval_margins = [pairs[i] for i in held], [margins[i] for i in held]
        pairs, margins = [pairs[i] for i in keep], [margins[i] for i in keep]
    cfg = fit_epochs(args, cfg, len(pairs), "preference pairs")
    if not args.resume:
        torch.manual_seed(cfg.seed)
    parallel = parallel_for(model, env, mode)
    trainer = RewardTrainer(model, pairs, margins, eval_pairs, eval_margins, cfg, eos_id=tok.eos_id,
                            center_coefficient=reward["center_rewards_coefficient"], device=device,
                            parallel=parallel, padding_free=tristate(args.padding_free), log=logger_for(args, env))
    if args.resume:
        restore_training_state(args.resume, trainer)
    trainer.log("start", {**start_fields(trainer, device), "pairs": len(pairs), "eval_pairs": len(eval_pairs),
                          "dropped_too_long": dropped, "new_score_head": not args.resume and
                          not getattr(model, "apr_metadata", {}).get("num_labels")})
    return train_and_save(trainer, args, env, parallel, tok, {"training.reward": reward})


def register(subparsers) -> None:
    p = subparsers.add_parser("reward", help="train a reward model (Bradley-Terry) on preference pairs from an APR file")
    p.add_argument("--init", help="APR model to start from: a causal LM (a new score head) or a reward model")
    p.add_argument("--data", nargs="+", help="JSON Lines of {'prompt', 'chosen', 'rejected'} or {'chosen', 'rejected'} "
                                             "(optional 'margin')")
    p.add_argument("--eval-data", nargs="+", help="held-out pairs (default: --eval-fraction of --data)")
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--center-rewards-coefficient", type=float, default=0.0,
                   help="weight of (r_chosen + r_rejected)^2, keeping rewards centred on zero (default 0)")
    p.add_argument("--max-len", type=int, default=1024,
                   help="tokens per prompt + answer; pairs with a longer side are left out")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per micro-batch, over all ranks")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    add_options(p, command="reward", lr=1e-5, lr_help="peak learning rate (default 1e-5; LoRA wants ~1e-4)")
    p.set_defaults(func=cmd_reward)
