"""Preference fine-tuning with DPO (Rafailov et al., 2023): ``apr-kernels dpo``.

Data: JSON Lines (``.jsonl``, ``.jsonl.gz``) of preference records in TRL's two formats:

* standard: ``{"prompt": str, "chosen": str, "rejected": str}``, each answer a completion of the prompt
  (the prompt + answer text, then the end-of-text id);
* conversational: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``, the
  conversation ``prompt + chosen`` (or ``+ rejected``) rendered as ``chat.py`` renders chat records.

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
  divided by its number of target tokens), as TRL computes IPO.

Logged with the implicit rewards ``beta * (pi - ref)`` of both answers, their margin and the share of
pairs whose chosen answer has the larger reward (``reward_acc``).

Under ``torchrun`` (DDP or FSDP, ``distributed.py``) ``--batch-size`` pairs is the global batch: every
rank draws the same pairs and trains on its equal share, so the gradient (a mean over ranks) and
the logged values are the one-process ones; the reference and held-out log-likelihoods are computed
on a share of the pairs per rank and gathered. ``--grad-accum K`` runs K such batches per step.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import PREFIX
from .data import BatchStream, marked_ids, split_targets
from .loop import TrainConfig, autocast_dtype_for, make_optimizer


def read_pairs(paths, tokenizer, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(chosen, rejected) marked id lists of every preference record in the JSON Lines ``paths``."""
    from .data import find_text_files

    if getattr(tokenizer, "eos_id", None) is None:
        raise ValueError("dpo: the tokenizer has no end-of-text id (it closes every answer)")
    pairs = []
    for path in find_text_files(paths):
        if not path.name.endswith((".jsonl", ".jsonl.gz")):
            raise ValueError(f"{path}: preference data must be JSON Lines (.jsonl, .jsonl.gz) records with "
                             f"'prompt', 'chosen' and 'rejected'")
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None
                pairs.append(tuple(_answer_ids(record, side, tokenizer, where)[: max_len + 1]
                                   for side in ("chosen", "rejected")))
    for chosen, rejected in pairs:
        if not any(t >= 0 for t in chosen[1:]) or not any(t >= 0 for t in rejected[1:]):
            raise ValueError(f"dpo: a record's answer lies past --max-len {max_len} tokens; raise --max-len")
    if not pairs:
        raise ValueError(f"dpo: no preference records in {', '.join(map(str, paths))}")
    return pairs


def _answer_ids(record, side: str, tokenizer, where: str) -> list[int]:
    if not isinstance(record, dict) or not all(k in record for k in ("prompt", "chosen", "rejected")):
        raise ValueError(f"{where}: a preference record needs 'prompt', 'chosen' and 'rejected'; got "
                         f"{sorted(record)[:6] if isinstance(record, dict) else type(record).__name__}")
    prompt, answer = record["prompt"], record[side]
    if isinstance(prompt, str) and isinstance(answer, str):
        return marked_ids({"prompt": prompt, "completion": answer}, tokenizer, where)
    if isinstance(prompt, list) and isinstance(answer, list):
        return marked_ids({"messages": prompt + answer}, tokenizer, where)
    raise ValueError(f"{where}: 'prompt' and {side!r} must both be strings (standard) or both lists of "
                     f"messages (conversational)")


def padded(seqs: list[list[int]], eos_id: int) -> torch.Tensor:
    """Rows ``[N, L]`` of the sequences, right-padded with non-target end-of-text ids."""
    width = max(len(s) for s in seqs)
    rows = torch.full((len(seqs), width), -1 - eos_id, dtype=torch.int64)
    for i, s in enumerate(seqs):
        rows[i, : len(s)] = torch.tensor(s)
    return rows


def sequence_logps(model, rows: torch.Tensor, device) -> torch.Tensor:
    """Sum of the target tokens' log-probabilities per row of marked ids ``rows`` ``[N, L]`` (fp32).
    ``model``: the ``Transformer``, or its ``distributed.Parallel`` (the loss runs through DDP/FSDP)."""
    x, y = split_targets(rows)
    return -model.loss(x.to(device), y.to(device), reduction="sequence").float()


LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, *, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, lengths: torch.Tensor | None = None):
    """(per-pair losses, chosen rewards, rejected rewards) of a batch of pairs (module docstring).

    ``lengths`` ``[N, 2]``: target tokens of the chosen and rejected answers (``ipo`` only)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"dpo: loss type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo: --label-smoothing {label_smoothing}; expected a rate in [0, 0.5)")
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    h = chosen - rejected
    e = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - e) * F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        if lengths is None:
            raise ValueError("dpo: the ipo loss needs the answers' target token counts (lengths)")
        n = lengths.to(h.device, h.dtype).clamp(min=1)
        losses = (chosen / n[:, 0] - rejected / n[:, 1] - 1 / (2 * beta)) ** 2
    return losses, beta * chosen.detach(), beta * rejected.detach()


def answer_lengths(pairs) -> torch.Tensor:
    """``[N, 2]`` target token counts of each pair's chosen and rejected answer."""
    return torch.tensor([[sum(t >= 0 for t in seq[1:]) for seq in pair] for pair in pairs], dtype=torch.float32)


class PreferenceTrainer:
    """DPO on ``pairs`` (``read_pairs``) with ``TrainConfig``'s optimiser, schedule, clipping, batch
    size (pairs per micro-batch), gradient accumulation, precision and seed.

    ``parallel`` (``distributed.parallelize(model, ...)``): DDP/FSDP; every rank trains on its share of
    each batch and the logged values are over all ranks. ``ref``: the reference log-likelihoods
    ``([P, 2], [E, 2] or None)`` when known (a resumed run), else computed from the model as given."""

    def __init__(self, model, pairs, eval_pairs, cfg: TrainConfig, *, beta: float, eos_id: int, device=None,
                 log=None, ref: tuple | None = None, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 parallel=None):
        self.model, self.pairs, self.eval_pairs, self.cfg = model, pairs, eval_pairs, cfg
        self.beta, self.eos, self.parallel = beta, eos_id, parallel
        dpo_loss(*torch.zeros(4, 1), beta, loss_type=loss_type, label_smoothing=label_smoothing,
                 lengths=torch.ones(1, 2))  # the settings are checked before any work
        self.loss_type, self.label_smoothing = loss_type, label_smoothing
        self.world = parallel.world_size if parallel is not None else 1
        if cfg.batch_size % self.world:
            raise ValueError(f"dpo: --batch-size {cfg.batch_size} is not a multiple of the world size {self.world}; "
                             f"expected an equal share of every batch of pairs per rank")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.autocast_dtype = autocast_dtype_for(cfg.precision, self.device)
        if self.autocast_dtype == torch.float16:
            raise ValueError("dpo: fp16 (loss scaling) is not supported; use --precision bf16 or fp32")
        self.log = log or (lambda *a: None)
        self.optimizer = make_optimizer(model, cfg)
        self.batches = BatchStream(len(pairs), seed=cfg.seed)
        self.lengths = answer_lengths(pairs)
        self.eval_lengths = answer_lengths(eval_pairs) if eval_pairs else None
        self.step = 0
        self.last_eval = None  # (checkpoint.save_checkpoint reads it; DPO's evaluations are logged instead)
        if ref is None:  # the model as loaded is the reference: [P, 2] and [E, 2] log-likelihoods
            ref = (self._logps(pairs), self._logps(eval_pairs) if eval_pairs else None)
        self.ref, self.eval_ref = ref

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None)

    def _batch_logps(self, pairs) -> torch.Tensor:
        """``[N, 2]`` answer log-likelihoods of ``pairs`` through the model (its DDP/FSDP wrapper)."""
        rows = padded([s for pair in pairs for s in pair], self.eos)  # chosen, rejected, chosen, ...
        with self._autocast():
            return sequence_logps(self.parallel or self.model, rows, self.device).view(len(pairs), 2)

    @torch.no_grad()
    def _logps(self, pairs) -> torch.Tensor:
        """``[len(pairs), 2]`` log-likelihoods on every rank, each rank computing a contiguous share
        (every rank runs as many forwards, padding with a repeated pair: FSDP's are collectives)."""
        was = self.model.training
        self.model.eval()
        rank = self.parallel.env.rank if self.parallel is not None else 0
        per = -(-len(pairs) // self.world)
        mine = pairs[rank * per:(rank + 1) * per]
        size = self.cfg.eval_batch_size
        parts = [self._batch_logps(mine[i: i + size] or pairs[:1]) for i in range(0, max(per, 1), size)]
        local = torch.cat(parts)[: len(mine)]
        self.model.train(was)
        if self.parallel is not None:
            self.parallel.reshard()
        if self.world == 1:
            return local.cpu()
        import torch.distributed as dist

        box = torch.zeros(per, 2, device=local.device)
        box[: len(local)] = local
        gathered = [torch.empty_like(box) for _ in range(self.world)]
        dist.all_gather(gathered, box)
        return torch.cat(gathered)[: len(pairs)].cpu()

    def train_step(self) -> dict:
        c = self.cfg
        t0 = time.perf_counter()
        lr = c.lr_at_step(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        par = self.parallel
        n_pairs = c.batch_size * c.grad_accum  # the step's loss is the mean over all of its pairs
        sums = torch.zeros(5, dtype=torch.float64)  # loss, chosen and rejected rewards, margin, correct pairs
        for micro in range(c.grad_accum):
            index = self.batches.next(c.batch_size)
            if par is not None:
                index = par.local_rows(index)
            with par.grad_sync(micro == c.grad_accum - 1) if par is not None else contextlib.nullcontext():
                pol = self._batch_logps([self.pairs[i] for i in index.tolist()])
                ref = self.ref[index].to(pol.device)
                losses, chosen, rejected = dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], self.beta,
                                                    loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                                                    lengths=self.lengths[index])
                # DDP/FSDP average gradients over the ranks: scaled by the world size, a sum over ranks
                (losses.sum() * (self.world / n_pairs)).backward()
            sums += torch.stack([losses.detach().sum(), chosen.sum(), rejected.sum(), (chosen - rejected).sum(),
                                 (chosen > rejected).sum()]).double().cpu()
        if par is not None:
            sums = par.mean(sums.to(self.device)).cpu() * self.world  # the sums over ranks
        grad_norm = None
        if c.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            if hasattr(grad_norm, "full_tensor"):  # FSDP: a replicated DTensor
                grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.step += 1
        loss, reward_chosen, reward_rejected, margin, acc = (sums / n_pairs).tolist()
        if not math.isfinite(loss):
            raise RuntimeError(f"dpo diverged: loss={loss} at step {self.step} (lower --lr?)")
        return {"step": self.step, "loss": loss, "lr": lr, "reward_chosen": reward_chosen,
                "reward_rejected": reward_rejected, "margin": margin, "reward_acc": acc,
                "grad_norm": None if grad_norm is None else float(grad_norm), "s": time.perf_counter() - t0}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss and reward accuracy over the held-out pairs."""
        pol = self._logps(self.eval_pairs)
        losses, chosen, rejected = dpo_loss(pol[:, 0], pol[:, 1], self.eval_ref[:, 0], self.eval_ref[:, 1], self.beta,
                                            loss_type=self.loss_type, label_smoothing=self.label_smoothing,
                                            lengths=self.eval_lengths)
        return {"step": self.step, "eval_loss": float(losses.mean()),
                "eval_reward_acc": float((chosen > rejected).float().mean()),
                "eval_margin": float((chosen - rejected).mean()), "eval_pairs": len(self.eval_pairs)}

    def run(self, on_checkpoint=None) -> list[dict]:
        """Train to ``cfg.steps``, evaluating at the start (a fresh run) and end; ``on_checkpoint(self)``
        every ``cfg.save_every`` steps."""
        history = []
        if self.eval_pairs and self.step == 0:
            history.append({"event": "eval", **self.evaluate()})
            self.log("eval", history[-1])
        while self.step < self.cfg.steps:
            rec = self.train_step()
            history.append({"event": "train", **rec})
            if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                self.log("train", rec)
            if self.eval_pairs and (self.step == self.cfg.steps or
                                    (self.cfg.eval_every and self.step % self.cfg.eval_every == 0)):
                history.append({"event": "eval", **self.evaluate()})
                self.log("eval", history[-1])
            if on_checkpoint and self.cfg.save_every and self.step % self.cfg.save_every == 0 \
                    and self.step < self.cfg.steps:
                on_checkpoint(self)
        return history


def cmd_dpo(args) -> int:
    """``apr-kernels dpo``: DPO from an APR file; ``--out/step_NNNNNN.apr`` every ``--save-every`` steps
    (resumable with ``--resume``), ``--out/model.apr`` at the end (adapters merged). Under torchrun:
    DDP or FSDP (``--parallel``), rank 0 logging and writing the files."""
    from . import distributed

    return distributed.run(args, lambda env, mode: _dpo(args, env, mode))


def _dpo(args, env, mode: str) -> int:
    from apr_kernels.model.loading import check_tokenizer_vocab

    from . import distributed
    from .checkpoint import restore_training_state, training_metadata
    from .cli import load_tokenizer, pick_device
    from .loop import Logger

    device = env.device if mode != "none" else pick_device(args.device)

    def load(path, **lora):
        if mode != "none":  # sharded on the meta device under FSDP (adapters added before sharding)
            return distributed.from_apr(path, env, mode, **lora)
        from apr_kernels.model.loading import from_apr

        return from_apr(path, device=device, **lora)

    if args.resume:  # everything but the device and the output folder comes from the checkpoint
        meta = training_metadata(args.resume)
        dpo = meta.get("training.dpo")
        if not isinstance(dpo, dict):
            raise ValueError(f"{args.resume}: not a checkpoint of a dpo run (no metadata training.dpo)")
        cfg = TrainConfig.from_dict(meta["training.config"])
        model = load(args.resume, lora="keep")
    else:
        if not (args.init and args.data):
            raise ValueError("dpo: --init FILE.apr and --data PREFS.jsonl... are required (or --resume STEP.apr)")
        lora = None
        if args.lora_rank:
            lora = {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": args.lora_targets.split(","),
                    "seed": args.seed}
        dpo = {"beta": args.beta, "loss": args.loss, "label_smoothing": args.label_smoothing, "init": str(args.init),
               "data": [str(Path(p).resolve()) for p in args.data],
               "eval_data": [str(Path(p).resolve()) for p in args.eval_data] if args.eval_data else None,
               "eval_fraction": args.eval_fraction, "max_len": args.max_len, "tokenizer": args.tokenizer}
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                          seq_len=args.max_len, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
                          grad_clip=args.grad_clip, eval_every=args.eval_every, save_every=args.save_every,
                          seed=args.seed, precision=args.precision)
        # the settings fail here, before the model is read
        dpo_loss(*torch.zeros(4, 1), dpo["beta"], loss_type=dpo["loss"], label_smoothing=dpo["label_smoothing"],
                 lengths=torch.ones(1, 2))
        model = load(args.init, lora_init=lora)
    tok = load_tokenizer(dpo["tokenizer"], model.apr_metadata, args.resume or dpo["init"])
    check_tokenizer_vocab(tok.vocab_size, model.config.vocab_size, f"{args.resume or dpo['init']}: tokenizer")
    pairs = read_pairs(dpo["data"], tok, dpo["max_len"])
    if dpo["eval_data"]:
        eval_pairs = read_pairs(dpo["eval_data"], tok, dpo["max_len"])
    else:  # a held-out share of the pairs, chosen by the seed
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_eval = min(len(pairs) - 1, max(1, round(len(pairs) * dpo["eval_fraction"]))) if len(pairs) > 1 else 0
        eval_pairs = [pairs[i] for i in order[:n_eval]]
        pairs = [pairs[i] for i in order[n_eval:]]
    ref = None
    if args.resume:  # the reference is the original model's, stored with the checkpoint
        import apr_kernels

        with apr_kernels.open(args.resume) as f:
            if f"{PREFIX}dpo.ref" not in f:
                raise ValueError(f"{args.resume}: no reference log-likelihoods ({PREFIX}dpo.ref); expected a "
                                 f"step_NNNNNN.apr of the run (its final model.apr is not resumable)")
            ref = (f.get_tensor(f"{PREFIX}dpo.ref").clone(),
                   f.get_tensor(f"{PREFIX}dpo.eval_ref").clone() if f"{PREFIX}dpo.eval_ref" in f else None)
        if ref[0].shape[0] != len(pairs):
            raise ValueError(f"{args.resume}: reference log-likelihoods for {ref[0].shape[0]} pairs, the data now "
                             f"has {len(pairs)}; expected the same preference files")
    else:
        torch.manual_seed(cfg.seed)
    parallel = distributed.parallelize(model, mode, env) if mode != "none" else None
    log = Logger(args.json) if env.is_main else (lambda *a: None)
    trainer = PreferenceTrainer(model, pairs, eval_pairs, cfg, beta=dpo["beta"], eos_id=tok.eos_id, device=device,
                                log=log, ref=ref, loss_type=dpo.get("loss", "sigmoid"),
                                label_smoothing=dpo.get("label_smoothing", 0.0), parallel=parallel)
    if args.resume:
        restore_training_state(args.resume, trainer)
    log("start", {"step": trainer.step, "pairs": len(pairs), "eval_pairs": len(eval_pairs), "beta": dpo["beta"],
                  "loss": trainer.loss_type, "steps": cfg.steps, "world": trainer.world,
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                  "device": str(device), "lora_rank": (getattr(model, "lora", None) or {}).get("rank")})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def checkpoint(t: PreferenceTrainer, final: bool = False) -> None:
        path = out / ("model.apr" if final else f"step_{t.step:06d}.apr")
        extra = {"dpo.ref": t.ref} | ({"dpo.eval_ref": t.eval_ref} if t.eval_ref is not None else {})
        distributed.save_checkpoint(path, t, parallel, tokenizer=tok, merge_lora=final,
                                    extra_metadata={"training.dpo": dpo}, extra_tensors=None if final else extra)
        log("checkpoint", {"step": t.step, "path": str(path)})

    trainer.run(on_checkpoint=checkpoint)
    checkpoint(trainer, final=True)
    return 0


def register(subparsers) -> None:
    d = TrainConfig()
    p = subparsers.add_parser("dpo", help="preference fine-tuning (DPO) from an APR file")
    p.add_argument("--init", help="APR model to fine-tune (also the reference)")
    p.add_argument("--data", nargs="+", help="JSON Lines of {'prompt', 'chosen', 'rejected'}")
    p.add_argument("--resume", help="a step_NNNNNN.apr of a dpo run: continue exactly where it stopped")
    p.add_argument("--save-every", type=int, default=0, help="write a resumable step checkpoint every N steps")
    p.add_argument("--eval-data", nargs="+", help="held-out pairs (default: --eval-fraction of --data)")
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--tokenizer", help="as for train (default: --init's embedded one)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO's beta (default 0.1)")
    p.add_argument("--loss", choices=LOSS_TYPES, default="sigmoid",
                   help="sigmoid (DPO), robust (rDPO), hinge (SLiC) or ipo, as TRL's loss_type")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="assumed rate of flipped labels in [0, 0.5): conservative DPO (sigmoid) or rDPO (robust)")
    p.add_argument("--max-len", type=int, default=1024, help="tokens per prompt + answer (longer ones are cut)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per micro-batch, over all ranks")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=5e-7, help="peak learning rate (default 5e-7; LoRA wants ~5e-5)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--lora-alpha", type=float, default=None)
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=None)
    p.add_argument("--parallel", choices=["ddp", "fsdp", "none"], default=None,
                   help="under torchrun: ddp (the default with several ranks) or fsdp")
    p.add_argument("--dist-timeout", type=float, default=600.0,
                   help="seconds a rank waits for the others before failing (default 600)")
    p.add_argument("--out", default="runs/dpo")
    p.add_argument("--json", action="store_true", help="log JSON lines")
    p.set_defaults(func=cmd_dpo)
