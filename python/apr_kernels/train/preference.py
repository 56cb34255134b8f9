"""Preference fine-tuning with DPO (Rafailov et al., 2023): ``apr-kernels dpo``.

Data: JSON Lines (``.jsonl``, ``.jsonl.gz``) of preference records in TRL's two formats:

* standard: ``{"prompt": str, "chosen": str, "rejected": str}``, each answer a completion of the prompt
  (the prompt + answer text, then the end-of-text id);
* conversational: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``, the
  conversation ``prompt + chosen`` (or ``+ rejected``) rendered as ``chat.py`` renders chat records;
* either with an implicit prompt, ``{"chosen", "rejected"}`` holding the whole texts or conversations
  (Anthropic HH's form): the prompt is their longest common beginning (``chat.implicit_prompt``, as
  TRL's ``maybe_extract_prompt``).

Each answer becomes a sequence whose targets are the answer tokens (``data.marked_ids``), cut to
``max_len`` + 1 tokens. The policy's log-likelihood of an answer is the sum of its target tokens'
log-probabilities (``sequence_logps``: the model's loss with ``reduction="sequence"``, on the fast
path the fused output projection + cross entropy per sequence). The reference is the model as
loaded, before any step: its log-likelihoods are computed once for every pair at the start (with
LoRA that is the frozen base).

Loss per pair, with ``h = (pi_c - ref_c) - (pi_r - ref_r)`` (``--loss``, TRL's ``loss_type`` names and
forms, averaged over the pairs of a step):

* ``sigmoid`` (DPO): ``-(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)``; ``e`` is
  ``--label-smoothing`` (0: the paper's loss; above 0: conservative DPO, labels flipped with rate e);
* ``robust`` (rDPO): ``(-(1 - e) log sigmoid(beta h) + e log sigmoid(-beta h)) / (1 - 2e)``, unbiased
  under label noise of rate e;
* ``hinge`` (SLiC): ``max(0, 1 - beta h)``;
* ``ipo``: ``(h' - 1 / (2 beta))^2`` with ``h'`` made of per-token log-likelihoods (each answer's
  divided by its number of target tokens), as TRL computes IPO;
* ``apo_zero`` (APO-zero): ``1 - sigmoid(beta (pi_c - ref_c)) + sigmoid(beta (pi_r - ref_r))``, for
  chosen answers better than the model's own; ``apo_down``: ``sigmoid(beta (pi_c - ref_c)) + 1 -
  sigmoid(beta h)``, for chosen answers worse than the model's own;
* ``nca_pair`` (NCA): ``-log sigmoid(c) - log sigmoid(-c) / 2 - log sigmoid(-r) / 2`` of the rewards
  ``c = beta (pi_c - ref_c)``, ``r = beta (pi_r - ref_r)``; ``sppo_hard`` (SPPO with hard
  probabilities): ``(pi_c - ref_c - 1 / (2 beta))^2 + (pi_r - ref_r + 1 / (2 beta))^2``; ``exo_pair``
  (EXO): ``sigmoid(beta h) (log sigmoid(beta h) - log(1 - e)) + sigmoid(-beta h) (log sigmoid(-beta h)
  - log e)`` with ``e`` = ``--label-smoothing`` (1e-3 when 0, as TRL);
* ``simpo`` (SimPO, no reference model: none is computed): the ``sigmoid`` form of
  ``beta (pi_c / n_c - pi_r / n_r) - gamma``, per-token log-likelihoods and a margin ``--gamma``;
* ``orpo`` (ORPO, no reference model): ``-beta log sigmoid(log odds(a_c) - log odds(a_r))`` with the
  per-token log-likelihoods ``a = pi / n`` and ``odds(a) = e^a / (1 - e^a)``, plus the chosen answers'
  NLL per token at weight 1 (``--sft-weight``, which defaults to 1 here), as TRL's ORPOTrainer.

``--reference-free`` (TRL's ``reference_free``) replaces the reference by one that gives every answer
the same likelihood (its log-likelihoods 0): no reference pass; with ``--sft-weight 1`` the sigmoid
loss is CPO's (Xu et al., 2024: DPO without a reference plus the chosen answers' NLL).

``--sft-weight w`` adds ``w`` times the chosen answers' negative log-likelihood per token, over all
chosen tokens of the step (RPO, the DPO + NLL mix of Llama 3's post-training; TRL's
``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, w]``).

Logged with the implicit rewards ``beta * (pi - ref)`` of both answers (SimPO: ``beta * pi / n``),
their margin, the share of pairs whose chosen answer has the larger reward (``reward_acc``) and the
chosen answers' NLL per token (``chosen_nll``: DPO can lower the chosen likelihood too).

Under ``torchrun`` (DDP or FSDP, ``distributed.py``) ``--batch-size`` pairs is the global batch: every
rank draws the same pairs and trains on its equal share, so the gradient (a mean over ranks) and
the logged values are the one-process ones; the reference and held-out log-likelihoods are computed
on a share of the pairs per rank and gathered. ``--grad-accum K`` runs K such batches per step.

Padding-free batches (``padding_free``, on by default where the package kernels run): the answers of
a micro-batch go back to back into one row, each its own document (``model/documents.py``), so the
packed-sequence attention kernel and one fused loss per answer see no padding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import marked_ids
from .loop import TrainConfig
from .posttrain import padded, sequence_logps  # noqa: F401 (re-exported: the functions DPO is made of)
from .posttrain import (StepLoop, absolute, add_options, config_from, device_for, fit_epochs, held_out, logger_for,
                        parallel_for, reference_state, run_command, settings_and_model, start_fields, stored_reference,
                        tokenizer_for, train_and_save)


def read_pairs(paths, tokenizer, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(chosen, rejected) marked id lists of every preference record in the JSON Lines ``paths``."""
    from .posttrain import jsonl_records

    if getattr(tokenizer, "eos_id", None) is None:
        raise ValueError("dpo: the tokenizer has no end-of-text id (it closes every answer)")
    pairs = [tuple(_answer_ids(record, side, tokenizer, where)[: max_len + 1] for side in ("chosen", "rejected"))
             for where, record in jsonl_records(paths, "preference data ({'prompt', 'chosen', 'rejected'} records)")]
    for chosen, rejected in pairs:
        if not any(t >= 0 for t in chosen[1:]) or not any(t >= 0 for t in rejected[1:]):
            raise ValueError(f"dpo: a record's answer lies past --max-len {max_len} tokens; raise --max-len")
    if not pairs:
        raise ValueError(f"dpo: no preference records in {', '.join(map(str, paths))}")
    return pairs


def _answer_ids(record, side: str, tokenizer, where: str) -> list[int]:
    from .chat import implicit_prompt

    if not isinstance(record, dict) or not all(k in record for k in ("chosen", "rejected")):
        raise ValueError(f"{where}: a preference record needs 'chosen' and 'rejected' (and 'prompt', unless it "
                         f"is their common beginning); got "
                         f"{sorted(record)[:6] if isinstance(record, dict) else type(record).__name__}")
    record = implicit_prompt(record)
    return answer_ids(record["prompt"], record[side], tokenizer, where, side)


def answer_ids(prompt, answer, tokenizer, where: str, field: str = "completion") -> list[int]:
    """Marked ids of ``prompt`` + ``answer`` (the answer and the token closing it are the targets):
    both strings (a prompt and its completion) or both message lists (a conversation)."""
    if isinstance(prompt, str) and isinstance(answer, str):
        return marked_ids({"prompt": prompt, "completion": answer}, tokenizer, where)
    if isinstance(prompt, list) and isinstance(answer, list):
        return marked_ids({"messages": prompt + answer}, tokenizer, where)
    raise ValueError(f"{where}: 'prompt' and {field!r} must both be strings (standard) or both lists of "
                     f"messages (conversational)")


LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "apo_zero", "apo_down", "nca_pair", "sppo_hard", "exo_pair",
              "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, *, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, lengths: torch.Tensor | None = None, gamma: float = 0.5):
    """(per-pair losses, chosen rewards, rejected rewards) of a batch of pairs (module docstring).

    ``lengths`` ``[N, 2]``: target tokens of the chosen and rejected answers (``ipo``, ``simpo``);
    ``gamma``: SimPO's reward margin. ``simpo`` and ``orpo`` ignore the reference."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"dpo: loss type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo: --label-smoothing {label_smoothing}; expected a rate in [0, 0.5)")
    if loss_type in ("ipo", "simpo", "orpo"):
        if lengths is None:
            raise ValueError(f"dpo: the {loss_type} loss needs the answers' target token counts (lengths)")
        n = lengths.to(policy_chosen.device, policy_chosen.dtype).clamp(min=1)
    if loss_type in REFERENCE_FREE:  # length-normalised log-likelihoods are the rewards, no reference
        chosen, rejected = policy_chosen / n[:, 0], policy_rejected / n[:, 1]
    else:
        chosen, rejected = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    h = chosen - rejected
    e = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - e) * F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (chosen / n[:, 0] - rejected / n[:, 1] - 1 / (2 * beta)) ** 2
    elif loss_type == "apo_zero":  # raise the chosen likelihood, lower the rejected one, each on its own
        losses = 1 - torch.sigmoid(beta * chosen) + torch.sigmoid(beta * rejected)
    elif loss_type == "apo_down":  # (chosen answers worse than the model's own) lower both, the margin kept
        losses = torch.sigmoid(beta * chosen) + 1 - torch.sigmoid(beta * h)
    elif loss_type == "nca_pair":  # NCA: each answer's reward against an absolute target, not only the margin
        losses = -F.logsigmoid(beta * chosen) - 0.5 * F.logsigmoid(-beta * chosen) - 0.5 * F.logsigmoid(-beta * rejected)
    elif loss_type == "sppo_hard":  # SPPO with hard win probabilities: rewards pushed to +-1 / (2 beta)
        losses = (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2
    elif loss_type == "exo_pair":  # EXO: KL(softmax of the two rewards || [1 - e, e]), e 1e-3 unless given
        e = e or 1e-3
        losses = torch.sigmoid(beta * h) * (F.logsigmoid(beta * h) - math.log(1 - e)) + \
            torch.sigmoid(-beta * h) * (F.logsigmoid(-beta * h) - math.log(e))
    elif loss_type == "orpo":  # log odds = a - log(1 - e^a), with log(-expm1(a)) accurate as a -> 0
        log_odds = (chosen - torch.log(-torch.expm1(chosen))) - (rejected - torch.log(-torch.expm1(rejected)))
        losses = -beta * F.logsigmoid(log_odds)
    else:
        z = beta * h - gamma
        losses = -(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)
    return losses, beta * chosen.detach(), beta * rejected.detach()


@dataclass(frozen=True)
class PreferenceLoss:
    """The loss of a preference run: ``kind`` (``LOSS_TYPES``) with its ``beta``, ``label_smoothing``
    and SimPO's ``gamma``, plus ``sft_weight`` times the negative log-likelihood per chosen-answer token
    (RPO / Llama 3's DPO + NLL; TRL's ``loss_type=["sigmoid", "sft"]``; ORPO's NLL, weight 1 unless
    given). Checked when made."""

    kind: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    gamma: float = 0.5
    sft_weight: float = 0.0
    reference_free: bool = False  # a uniform reference (log-likelihoods 0), TRL's reference_free

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"dpo: --beta {self.beta}; expected a positive number")
        if not self.sft_weight >= 0:
            raise ValueError(f"dpo: --sft-weight {self.sft_weight}; expected a weight >= 0")
        self.pairs(-torch.ones(1, 2), torch.zeros(1, 2), torch.ones(1, 2))  # kind, smoothing
        if self.kind == "orpo" and self.sft_weight == 0:  # ORPO is its NLL plus the odds-ratio term
            object.__setattr__(self, "sft_weight", 1.0)

    @property
    def needs_reference(self) -> bool:
        return self.kind not in REFERENCE_FREE and not self.reference_free

    def pairs(self, policy: torch.Tensor, ref: torch.Tensor, lengths: torch.Tensor):
        """``dpo_loss`` of ``[N, 2]`` (chosen, rejected) policy and reference log-likelihoods."""
        return dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], self.beta, loss_type=self.kind,
                        label_smoothing=self.label_smoothing, lengths=lengths, gamma=self.gamma)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def answer_lengths(pairs) -> torch.Tensor:
    """``[N, 2]`` target token counts of each pair's chosen and rejected answer."""
    return torch.tensor([[sum(t >= 0 for t in seq[1:]) for seq in pair] for pair in pairs], dtype=torch.float32)


class PreferenceTrainer(StepLoop):
    """DPO on ``pairs`` (``read_pairs``) with ``TrainConfig``'s optimiser, schedule, clipping, batch
    size (pairs per micro-batch), gradient accumulation, precision and seed.

    ``parallel`` (``distributed.parallelize(model, ...)``): DDP/FSDP; every rank trains on its share of
    each batch and the logged values are over all ranks. ``ref``: the reference log-likelihoods
    ``([P, 2], [E, 2] or None)`` when known (a resumed run), else computed from the model as given."""

    def __init__(self, model, pairs, eval_pairs, cfg: TrainConfig, *, eos_id: int, loss: PreferenceLoss | None = None,
                 device=None, log=None, ref: tuple | None = None, parallel=None, padding_free: bool | None = None):
        self._setup("dpo", model, cfg, device=device, parallel=parallel, padding_free=padding_free, log=log,
                    n_data=len(pairs), what="every batch of pairs")
        self.pairs, self.eval_pairs, self.eos = pairs, eval_pairs, eos_id
        self.loss = loss or PreferenceLoss()
        self.has_eval = bool(eval_pairs)
        self.lengths = answer_lengths(pairs)
        self.eval_lengths = answer_lengths(eval_pairs) if eval_pairs else None
        if ref is None:  # the model as loaded is the reference: [P, 2] and [E, 2] log-likelihoods
            logps = self._logps if self.loss.needs_reference else (lambda ps: torch.zeros(len(ps), 2))
            ref = (logps(pairs), logps(eval_pairs) if eval_pairs else None)
        self.ref, self.eval_ref = ref

    def train_step(self) -> dict:
        c = self.cfg
        lr, t0 = self._start_step()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        par = self.parallel
        # the step's loss is the mean over all of its pairs, plus the SFT term's mean over all of its
        # chosen-answer tokens (counted on the host, alike on every rank)
        indices = [self.batches.next(c.batch_size) for _ in range(c.grad_accum)]
        n_pairs = c.batch_size * c.grad_accum
        n_tokens = max(1.0, float(sum(self.lengths[index, 0].sum() for index in indices)))
        sums = torch.zeros(6, dtype=torch.float64)  # loss, chosen/rejected rewards, margin, correct, chosen nll
        for micro, index in enumerate(indices):
            if par is not None:
                index = par.local_rows(index)
            with par.grad_sync(micro == c.grad_accum - 1) if par is not None else contextlib.nullcontext():
                pol = self._batch_logps([self.pairs[i] for i in index.tolist()])
                losses, chosen, rejected = self.loss.pairs(pol, self.ref[index].to(pol.device), self.lengths[index])
                nll = -pol[:, 0].sum()
                objective = losses.sum() / n_pairs + self.loss.sft_weight * nll / n_tokens + self._balance(c.grad_accum)
                # DDP/FSDP average gradients over the ranks: scaled by the world size, a sum over ranks
                (objective * self.world).backward()
            sums += torch.stack([losses.detach().sum(), chosen.sum(), rejected.sum(), (chosen - rejected).sum(),
                                 (chosen > rejected).sum(), nll.detach()]).double().cpu()
        sums, grad_norm = self._finish_step(sums)
        router, balance = self._router_logs()
        pref, reward_chosen, reward_rejected, margin, acc = (sums[:5] / n_pairs).tolist()
        chosen_nll = float(sums[5]) / n_tokens
        loss = pref + self.loss.sft_weight * chosen_nll + balance
        if not math.isfinite(loss):
            raise RuntimeError(f"dpo diverged: loss={loss} at step {self.step} (lower --lr?)")
        return {"step": self.step, "loss": loss, "lr": lr, "reward_chosen": reward_chosen,
                "reward_rejected": reward_rejected, "margin": margin, "reward_acc": acc, "chosen_nll": chosen_nll,
                **router, "grad_norm": grad_norm, "s": time.perf_counter() - t0}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss and reward accuracy over the held-out pairs."""
        pol = self._logps(self.eval_pairs)
        losses, chosen, rejected = self.loss.pairs(pol, self.eval_ref, self.eval_lengths)
        chosen_nll = float(-pol[:, 0].sum() / self.eval_lengths[:, 0].sum().clamp(min=1))
        return {"step": self.step, "eval_loss": float(losses.mean()) + self.loss.sft_weight * chosen_nll,
                "eval_reward_acc": float((chosen > rejected).float().mean()),
                "eval_margin": float((chosen - rejected).mean()), "eval_chosen_nll": chosen_nll,
                "eval_pairs": len(self.eval_pairs)}


def preference_loss(dpo: dict) -> PreferenceLoss:
    """The ``PreferenceLoss`` of a run's ``training.dpo`` settings (older runs: DPO's sigmoid)."""
    return PreferenceLoss(kind=dpo.get("loss", "sigmoid"), beta=dpo["beta"],
                          label_smoothing=dpo.get("label_smoothing", 0.0), gamma=dpo.get("gamma", 0.5),
                          sft_weight=dpo.get("sft_weight", 0.0), reference_free=dpo.get("reference_free", False))


def cmd_dpo(args) -> int:
    """``apr-kernels dpo``: DPO from an APR file; ``--out/step_NNNNNN.apr`` every ``--save-every`` steps
    (resumable with ``--resume``), ``--out/model.apr`` at the end (adapters merged). Under torchrun:
    DDP or FSDP (``--parallel``), rank 0 logging and writing the files."""
    return run_command(args, lambda env, mode: _dpo(args, env, mode))


def _dpo(args, env, mode: str) -> int:
    from .checkpoint import restore_training_state
    from .cli import tristate

    def fresh():
        if not (args.init and args.data):
            raise ValueError("dpo: --init FILE.apr and --data PREFS.jsonl... are required (or --resume STEP.apr)")
        dpo = {"beta": args.beta, "loss": args.loss, "label_smoothing": args.label_smoothing, "gamma": args.gamma,
               "sft_weight": args.sft_weight, "reference_free": args.reference_free, "init": str(args.init),
               "data": absolute(args.data),
               "eval_data": absolute(args.eval_data), "eval_fraction": args.eval_fraction, "max_len": args.max_len,
               "tokenizer": args.tokenizer}
        preference_loss(dpo)  # bad settings fail here, before the model is read
        return dpo, config_from(args, grad_accum=args.grad_accum, seq_len=args.max_len)

    device = device_for(args, env, mode)
    dpo, cfg, model = settings_and_model(args, env, mode, device, "dpo", fresh)
    tok = tokenizer_for(dpo["tokenizer"], model, args.resume or dpo["init"])
    pairs = read_pairs(dpo["data"], tok, dpo["max_len"])
    if dpo["eval_data"]:
        eval_pairs = read_pairs(dpo["eval_data"], tok, dpo["max_len"])
    else:  # a held-out share of the pairs, chosen by the seed
        keep, held = held_out(len(pairs), dpo["eval_fraction"], cfg.seed)
        pairs, eval_pairs = [pairs[i] for i in keep], [pairs[i] for i in held]
    cfg = fit_epochs(args, cfg, len(pairs), "preference pairs")
    # the reference: the original model's, stored with the checkpoint on --resume
    ref = stored_reference(args.resume, "dpo", len(pairs)) if args.resume else None
    if not args.resume:
        torch.manual_seed(cfg.seed)
    parallel = parallel_for(model, env, mode)
    trainer = PreferenceTrainer(model, pairs, eval_pairs, cfg, eos_id=tok.eos_id, loss=preference_loss(dpo),
                                device=device, ref=ref, parallel=parallel, padding_free=tristate(args.padding_free),
                                log=logger_for(args, env))
    if args.resume:
        restore_training_state(args.resume, trainer)
    trainer.log("start", {**start_fields(trainer, device), "pairs": len(pairs), "eval_pairs": len(eval_pairs),
                          **trainer.loss.to_dict()})
    return train_and_save(trainer, args, env, parallel, tok, {"training.dpo": dpo}, reference_state("dpo"))


def register(subparsers) -> None:
    p = subparsers.add_parser("dpo", help="preference fine-tuning (DPO) from an APR file")
    p.add_argument("--init", help="APR model to fine-tune (also the reference)")
    p.add_argument("--data", nargs="+", help="JSON Lines of {'prompt', 'chosen', 'rejected'}")
    p.add_argument("--eval-data", nargs="+", help="held-out pairs (default: --eval-fraction of --data)")
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--beta", type=float, default=0.1, help="DPO's beta (default 0.1)")
    p.add_argument("--loss", choices=LOSS_TYPES, default="sigmoid",
                   help="sigmoid (DPO), robust (rDPO), hinge (SLiC), ipo, apo_zero / apo_down (APO), nca_pair (NCA), "
                        "sppo_hard (SPPO), exo_pair (EXO), simpo or orpo (no reference), as TRL names them")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="assumed rate of flipped labels in [0, 0.5): conservative DPO (sigmoid, simpo) or rDPO (robust)")
    p.add_argument("--gamma", type=float, default=0.5, help="SimPO's reward margin (default 0.5)")
    p.add_argument("--sft-weight", type=float, default=0.0,
                   help="add this times the chosen answers' NLL per token (RPO; default 0, ORPO's 1)")
    p.add_argument("--reference-free", action="store_true",
                   help="a reference giving every answer the same likelihood: no reference pass (TRL's "
                        "reference_free; with --sft-weight 1, CPO)")
    p.add_argument("--max-len", type=int, default=1024, help="tokens per prompt + answer (longer ones are cut)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per micro-batch, over all ranks")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    add_options(p, command="dpo", lr=5e-7, lr_help="peak learning rate (default 5e-7; LoRA wants ~5e-5)")
    p.set_defaults(func=cmd_dpo)
