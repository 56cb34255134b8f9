"""Preference tuning from unpaired feedback with KTO (Ethayarajh et al., 2024): ``apr-kernels kto``.

Data: JSON Lines in TRL's unpaired preference format, ``{"prompt", "completion", "label"}``: a
completion (a string, or a list of messages after a message-list prompt) and whether it is
desirable (``true``) or not (``false``): thumbs up / down, no pairs needed.

With ``r = log pi(completion | prompt) - log ref(completion | prompt)`` (the reference is the model
as loaded; its log-likelihoods are computed once at the start) and ``z`` the batch's estimate of
``KL(pi || ref)``, the loss of an example is (TRL's ``loss_type="kto"``)::

    desirable:    desirable_weight   * (1 - sigmoid(beta * (r - z)))
    undesirable:  undesirable_weight * (1 - sigmoid(beta * (z - r)))

averaged over the step's examples (``--loss apo_zero_unpaired``: TRL's APO-zero for unpaired data,
``desirable_weight (1 - sigmoid(beta r))`` and ``undesirable_weight sigmoid(beta r)``, no ``z``, so no
KL pass). ``z = max(0, mean(log pi(y'|x) - log ref(y'|x)))`` over the
micro-batch (all ranks), where ``y'`` is a mismatched completion: example i's prompt with the
completion of example i + 1 (mod the data set), a fixed pairing, so the reference's side is computed
once; the policy's side runs without gradient, and ``z`` is a constant of the step, as in TRL.

Logged: the loss, ``kl`` (z), and the mean rewards ``beta * r`` of the desirable and undesirable
examples of the step; held-out: the same over ``--eval-data`` (or ``--eval-fraction`` of the data).
Checkpoints, ``--resume``, LoRA, ``--lora-quantized-base``, padding-free batches and torchrun follow
``posttrain.py``.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F

from .loop import TrainConfig
from .posttrain import (StepLoop, absolute, add_options, config_from, device_for, fit_epochs, held_out, logger_for,
                        parallel_for, reference_state, run_command, settings_and_model, start_fields, stored_reference,
                        tokenizer_for, train_and_save)
from .preference import answer_ids


def read_examples(paths, tokenizer, max_len: int) -> tuple[list[tuple[list[int], list[int]]], list[bool]]:
    """(items, labels): per example its marked ids and those of its prompt with the next example's
    completion (the KL pair), cut to ``max_len`` + 1 tokens, and whether it is desirable."""
    from .posttrain import jsonl_records

    if getattr(tokenizer, "eos_id", None) is None:
        raise ValueError("kto: the tokenizer has no end-of-text id (it closes every completion)")
    records = []
    for where, record in jsonl_records(paths, "KTO data ({'prompt', 'completion', 'label'} records)"):
        if not isinstance(record, dict) or not all(k in record for k in ("prompt", "completion", "label")):
            raise ValueError(f"{where}: a KTO record needs 'prompt', 'completion' and 'label'")
        if not isinstance(record["label"], bool):
            raise ValueError(f"{where}: 'label' must be true (desirable) or false, got {record['label']!r}")
        records.append((where, record))
    if len(records) < 2:
        raise ValueError(f"kto: {len(records)} record(s) in {', '.join(map(str, paths))}; expected at least 2 "
                         f"(each is paired with another's completion for the KL estimate)")
    items = []
    for i, (where, record) in enumerate(records):
        other = records[(i + 1) % len(records)][1]["completion"]
        ids = answer_ids(record["prompt"], record["completion"], tokenizer, where)[: max_len + 1]
        kl = answer_ids(record["prompt"], other, tokenizer, where)[: max_len + 1]
        if not any(t >= 0 for t in ids[1:]) or not any(t >= 0 for t in kl[1:]):
            raise ValueError(f"{where}: the completion lies past --max-len {max_len} tokens; raise --max-len")
        items.append((ids, kl))
    return items, [r["label"] for _, r in records]


LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kto_loss(policy, ref, kl, labels: torch.Tensor, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0, loss_type: str = "kto"):
    """(per-example losses, rewards ``beta * (policy - ref)``) for log-likelihoods ``policy``/``ref``
    ``[N]``, the KL estimate ``kl`` (a scalar, no gradient; unused by ``apo_zero_unpaired``) and boolean
    ``labels`` (module docstring)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"kto: --loss {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    r = policy - ref
    good = labels.to(r.device)
    if loss_type == "apo_zero_unpaired":
        losses = torch.where(good, desirable_weight * (1 - F.sigmoid(beta * r)), undesirable_weight * F.sigmoid(beta * r))
    else:
        losses = torch.where(good, desirable_weight * (1 - F.sigmoid(beta * (r - kl))),
                             undesirable_weight * (1 - F.sigmoid(beta * (kl - r))))
    return losses, beta * r.detach()


class KTOTrainer(StepLoop):
    """KTO on ``items`` / ``labels`` (``read_examples``) with ``TrainConfig``'s optimiser, schedule,
    clipping, batch size (examples per micro-batch), gradient accumulation, precision and seed."""

    def __init__(self, model, items, labels, eval_items, eval_labels, cfg: TrainConfig, *, eos_id: int,
                 beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0, device=None,
                 log=None, ref: tuple | None = None, parallel=None, padding_free: bool | None = None,
                 loss_type: str = "kto"):
        if not beta > 0 or not desirable_weight >= 0 or not undesirable_weight >= 0:
            raise ValueError(f"kto: --beta {beta} must be > 0 and the weights ({desirable_weight}, "
                             f"{undesirable_weight}) >= 0")
        kto_loss(torch.zeros(1), torch.zeros(1), 0.0, torch.ones(1, dtype=torch.bool), beta, loss_type=loss_type)
        self.loss_type = loss_type
        self._setup("kto", model, cfg, device=device, parallel=parallel, padding_free=padding_free, log=log,
                    n_data=len(items), what="every batch of examples")
        self.items, self.labels, self.eos = items, torch.tensor(labels), eos_id
        self.eval_items, self.eval_labels = eval_items, torch.tensor(eval_labels or [], dtype=torch.bool)
        self.beta, self.weights = beta, (desirable_weight, undesirable_weight)
        self.has_eval = bool(eval_items)
        if ref is None:  # the model as loaded: [N, 2] (completion, KL pair) log-likelihoods ([N, 1]: no KL)
            ref = (self._logps(self._scored(items)), self._logps(self._scored(eval_items)) if eval_items else None)
        self.ref, self.eval_ref = ref

    def _scored(self, items):
        """What each item's log-likelihoods are needed of: the completion and its KL pair, or (a loss
        without the KL estimate) the completion alone."""
        return items if self.loss_type == "kto" else [(item[0],) for item in items]

    def _kl(self, policy_kl: torch.Tensor, ref_kl: torch.Tensor) -> torch.Tensor:
        """``z``: the mean over all ranks' KL pairs of ``policy - ref``, at least 0."""
        sums = torch.stack([(policy_kl - ref_kl.to(policy_kl.device)).sum().double(),
                            torch.tensor(float(len(policy_kl)), dtype=torch.float64, device=policy_kl.device)])
        if self.parallel is not None:
            sums = self.parallel.total(sums.to(self.device))
        return (sums[0] / sums[1]).clamp(min=0).float()

    def train_step(self) -> dict:
        c, par = self.cfg, self.parallel
        lr, t0 = self._start_step()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        n = c.batch_size * c.grad_accum  # the step's loss is the mean over all of its examples
        sums = torch.zeros(5, dtype=torch.float64)  # loss, desirable reward sum / count, undesirable sum / count
        kl_total = 0.0  # z of each micro-batch (the same on every rank)
        for micro in range(c.grad_accum):
            index = self.batches.next(c.batch_size)
            if par is not None:
                index = par.local_rows(index)
            kl = torch.zeros(())
            if self.loss_type == "kto":  # the policy's side of the KL estimate: no gradient (a step constant)
                with torch.no_grad():
                    kl = self._kl(self._batch_logps([(self.items[i][1],) for i in index.tolist()])[:, 0],
                                  self.ref[index, 1])
            if par is not None:
                par.reshard()
            with par.grad_sync(micro == c.grad_accum - 1) if par is not None else contextlib.nullcontext():
                pol = self._batch_logps([(self.items[i][0],) for i in index.tolist()])[:, 0]
                labels = self.labels[index]
                losses, rewards = kto_loss(pol, self.ref[index, 0].to(pol.device), kl, labels, self.beta,
                                           *self.weights, loss_type=self.loss_type)
                # DDP/FSDP average gradients over the ranks: scaled by the world size, a sum over ranks
                ((losses.sum() / n + self._balance(c.grad_accum)) * self.world).backward()
            good = labels.to(rewards.device)
            sums += torch.stack([losses.detach().sum(), rewards[good].sum(), good.sum(), rewards[~good].sum(),
                                 (~good).sum()]).double().cpu()
            kl_total += float(kl)
        sums, grad_norm = self._finish_step(sums)
        router, balance = self._router_logs()
        loss, good_sum, n_good, bad_sum, n_bad = sums.tolist()
        loss = loss / n + balance
        if not math.isfinite(loss):
            raise RuntimeError(f"kto diverged: loss={loss} at step {self.step} (lower --lr?)")
        return {"step": self.step, "loss": loss, "lr": lr, "kl": kl_total / c.grad_accum,
                "reward_desirable": good_sum / n_good if n_good else None,
                "reward_undesirable": bad_sum / n_bad if n_bad else None,
                **router, "grad_norm": grad_norm, "s": time.perf_counter() - t0}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The loss and mean rewards over the held-out examples (``z`` from all their KL pairs)."""
        pol = self._logps(self._scored(self.eval_items))
        kl = (pol[:, 1] - self.eval_ref[:, 1]).mean().clamp(min=0) if self.loss_type == "kto" else torch.zeros(())
        losses, rewards = kto_loss(pol[:, 0], self.eval_ref[:, 0], kl, self.eval_labels, self.beta, *self.weights,
                                   loss_type=self.loss_type)
        good = self.eval_labels
        return {"step": self.step, "eval_loss": float(losses.mean()), "eval_kl": float(kl),
                "eval_reward_desirable": float(rewards[good].mean()) if good.any() else None,
                "eval_reward_undesirable": float(rewards[~good].mean()) if (~good).any() else None,
                "eval_examples": len(self.eval_items)}


def cmd_kto(args) -> int:
    """``apr-kernels kto``: KTO from an APR file; step checkpoints (``--save-every``, resumable with
    ``--resume``), ``--out/model.apr`` at the end (adapters merged); DDP/FSDP under torchrun."""
    return run_command(args, lambda env, mode: _kto(args, env, mode))


def _kto(args, env, mode: str) -> int:
    from .checkpoint import restore_training_state
    from .cli import tristate

    def fresh():
        if not (args.init and args.data):
            raise ValueError("kto: --init FILE.apr and --data EXAMPLES.jsonl... are required (or --resume STEP.apr)")
        kto = {"beta": args.beta, "loss": args.loss, "desirable_weight": args.desirable_weight,
               "undesirable_weight": args.undesirable_weight, "init": str(args.init), "data": absolute(args.data),
               "eval_data": absolute(args.eval_data), "eval_fraction": args.eval_fraction, "max_len": args.max_len,
               "tokenizer": args.tokenizer}
        return kto, config_from(args, grad_accum=args.grad_accum, seq_len=args.max_len)

    device = device_for(args, env, mode)
    kto, cfg, model = settings_and_model(args, env, mode, device, "kto", fresh)
    source = args.resume or kto["init"]
    tok = tokenizer_for(kto["tokenizer"], model, source)
    items, labels = read_examples(kto["data"], tok, kto["max_len"])
    if kto["eval_data"]:
        eval_items, eval_labels = read_examples(kto["eval_data"], tok, kto["max_len"])
    else:  # a held-out share, chosen by the seed
        keep, held = held_out(len(items), kto["eval_fraction"], cfg.seed)
        eval_items, eval_labels = [items[i] for i in held], [labels[i] for i in held]
        items, labels = [items[i] for i in keep], [labels[i] for i in keep]
    cfg = fit_epochs(args, cfg, len(items), "examples")
    # the reference: the original model's, stored with the checkpoint on --resume
    ref = stored_reference(args.resume, "kto", len(items)) if args.resume else None
    if not args.resume:
        torch.manual_seed(cfg.seed)
    parallel = parallel_for(model, env, mode)
    trainer = KTOTrainer(model, items, labels, eval_items, eval_labels, cfg, eos_id=tok.eos_id, beta=kto["beta"],
                         desirable_weight=kto["desirable_weight"], undesirable_weight=kto["undesirable_weight"],
                         loss_type=kto.get("loss", "kto"),
                         device=device, ref=ref, parallel=parallel, padding_free=tristate(args.padding_free),
                         log=logger_for(args, env))
    if args.resume:
        restore_training_state(args.resume, trainer)
    trainer.log("start", {**start_fields(trainer, device), "examples": len(items), "desirable": sum(labels),
                          "eval_examples": len(eval_items), "beta": kto["beta"]})
    return train_and_save(trainer, args, env, parallel, tok, {"training.kto": kto}, reference_state("kto"))


def register(subparsers) -> None:
    p = subparsers.add_parser("kto", help="preference tuning from unpaired good/bad examples (KTO) from an APR file")
    p.add_argument("--init", help="APR model to fine-tune (also the reference)")
    p.add_argument("--data", nargs="+", help="JSON Lines of {'prompt', 'completion', 'label': true|false}")
    p.add_argument("--eval-data", nargs="+", help="held-out examples (default: --eval-fraction of --data)")
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--beta", type=float, default=0.1, help="KTO's beta (default 0.1)")
    p.add_argument("--desirable-weight", type=float, default=1.0)
    p.add_argument("--undesirable-weight", type=float, default=1.0)
    p.add_argument("--loss", choices=LOSS_TYPES, default="kto",
                   help="kto, or apo_zero_unpaired (TRL's APO-zero for unpaired data: no KL estimate)")
    p.add_argument("--max-len", type=int, default=1024, help="tokens per prompt + completion (longer ones are cut)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch, over all ranks")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    add_options(p, command="kto", lr=5e-7, lr_help="peak learning rate (default 5e-7; LoRA wants ~5e-5)")
    p.set_defaults(func=cmd_kto)
