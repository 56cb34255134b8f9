"""Preference fine-tuning with DPO (Rafailov et al., 2023): ``apr-kernels dpo``.

Data: JSON Lines (``.jsonl``, ``.jsonl.gz``) of preference records in TRL's two formats:

* standard: ``{"prompt": str, "chosen": str, "rejected": str}``, each answer a completion of the prompt
  (the prompt + answer text, then the end-of-text id);
* conversational: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``, the
  conversation ``prompt + chosen`` (or ``+ rejected``) rendered as ``chat.py`` renders chat records.

Each answer becomes a sequence whose targets are the answer tokens (``data.marked_ids``), cut to
``max_len`` + 1 tokens. The policy's log-likelihood of an answer is the sum of its target tokens'
log-probabilities (``sequence_logps``: the model's hidden states, then the fused output projection
and cross entropy per sequence). The reference is the model as loaded, before any step: its
log-likelihoods are computed once for every pair at the start (with LoRA that is the frozen base).

Loss per pair: ``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``, averaged over the batch
of pairs; logged with the implicit rewards ``beta * (pi - ref)`` of both answers, their margin and
the share of pairs whose chosen answer has the larger reward (``reward_acc``).
"""

from __future__ import annotations

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
    """Sum of the target tokens' log-probabilities per row of marked ids ``rows`` ``[N, L]`` (fp32)."""
    from apr_kernels.ops.cross_entropy import linear_cross_entropy

    x, y = split_targets(rows)
    x, y = x.to(device), y.to(device)
    h = model.hidden_states(x)
    w = model.output_weight
    return torch.stack([-linear_cross_entropy(h[i], w, y[i], reduction="sum") for i in range(len(rows))])


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
    """(mean loss, chosen rewards, rejected rewards) of a batch of pairs."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen - rejected).mean(), chosen.detach(), rejected.detach()


class PreferenceTrainer:
    """DPO on ``pairs`` (``read_pairs``) with ``TrainConfig``'s optimiser, schedule, clipping, batch
    size (pairs per step), precision and seed."""

    def __init__(self, model, pairs, eval_pairs, cfg: TrainConfig, *, beta: float, eos_id: int, device=None,
                 log=None, ref: tuple | None = None):
        if cfg.grad_accum != 1:
            raise ValueError("dpo: --grad-accum is not supported; lower --batch-size instead")
        self.model, self.pairs, self.eval_pairs, self.cfg = model, pairs, eval_pairs, cfg
        self.beta, self.eos = beta, eos_id
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.autocast_dtype = autocast_dtype_for(cfg.precision, self.device)
        if self.autocast_dtype == torch.float16:
            raise ValueError("dpo: fp16 (loss scaling) is not supported; use --precision bf16 or fp32")
        self.log = log or (lambda *a: None)
        self.optimizer = make_optimizer(model, cfg)
        self.batches = BatchStream(len(pairs), seed=cfg.seed)
        self.step = 0
        self.last_eval = None  # (checkpoint.save_checkpoint reads it; DPO's evaluations are logged instead)
        if ref is None:  # the model as loaded is the reference: [P, 2] and [E, 2] log-likelihoods
            ref = (self._logps(pairs), self._logps(eval_pairs) if eval_pairs else None)
        self.ref, self.eval_ref = ref

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None)

    def _batch_logps(self, pairs) -> torch.Tensor:
        rows = padded([s for pair in pairs for s in pair], self.eos)  # chosen, rejected, chosen, ...
        with self._autocast():
            return sequence_logps(self.model, rows, self.device).float().view(len(pairs), 2)

    @torch.no_grad()
    def _logps(self, pairs) -> torch.Tensor:
        was = self.model.training
        self.model.eval()
        out = torch.cat([self._batch_logps(pairs[i: i + self.cfg.eval_batch_size])
                         for i in range(0, len(pairs), self.cfg.eval_batch_size)])
        self.model.train(was)
        return out

    def train_step(self) -> dict:
        c = self.cfg
        t0 = time.perf_counter()
        lr = c.lr_at_step(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        index = self.batches.next(c.batch_size)
        pol = self._batch_logps([self.pairs[i] for i in index.tolist()])
        ref = self.ref[index].to(pol.device)
        loss, chosen, rejected = dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], self.beta)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip) if c.grad_clip > 0 else None
        self.optimizer.step()
        self.step += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise RuntimeError(f"dpo diverged: loss={value} at step {self.step} (lower --lr?)")
        return {"step": self.step, "loss": value, "lr": lr, "reward_chosen": float(chosen.mean()),
                "reward_rejected": float(rejected.mean()), "margin": float((chosen - rejected).mean()),
                "reward_acc": float((chosen > rejected).float().mean()),
                "grad_norm": None if grad_norm is None else float(grad_norm), "s": time.perf_counter() - t0}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean DPO loss and reward accuracy over the held-out pairs."""
        pol = self._logps(self.eval_pairs).to(self.eval_ref.device)
        loss, chosen, rejected = dpo_loss(pol[:, 0], pol[:, 1], self.eval_ref[:, 0], self.eval_ref[:, 1], self.beta)
        return {"step": self.step, "eval_loss": float(loss), "eval_reward_acc": float((chosen > rejected).float().mean()),
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
    (resumable with ``--resume``), ``--out/model.apr`` at the end (adapters merged)."""
    from apr_kernels.model.loading import check_tokenizer_vocab, from_apr

    from .checkpoint import restore_training_state, save_checkpoint, training_metadata
    from .cli import load_tokenizer, pick_device
    from .loop import Logger

    device = pick_device(args.device)
    if args.resume:  # everything but the device and the output folder comes from the checkpoint
        meta = training_metadata(args.resume)
        dpo = meta.get("training.dpo")
        if not isinstance(dpo, dict):
            raise ValueError(f"{args.resume}: not a checkpoint of a dpo run (no metadata training.dpo)")
        cfg = TrainConfig.from_dict(meta["training.config"])
        model = from_apr(args.resume, device=device, lora="keep")
    else:
        if not (args.init and args.data):
            raise ValueError("dpo: --init FILE.apr and --data PREFS.jsonl... are required (or --resume STEP.apr)")
        lora = None
        if args.lora_rank:
            lora = {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": args.lora_targets.split(","),
                    "seed": args.seed}
        dpo = {"beta": args.beta, "init": str(args.init), "data": [str(Path(p).resolve()) for p in args.data],
               "eval_data": [str(Path(p).resolve()) for p in args.eval_data] if args.eval_data else None,
               "eval_fraction": args.eval_fraction, "max_len": args.max_len, "tokenizer": args.tokenizer}
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.max_len, lr=args.lr,
                          warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                          eval_every=args.eval_every, save_every=args.save_every, seed=args.seed,
                          precision=args.precision)
        model = from_apr(args.init, device=device, lora_init=lora)
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
    log = Logger(args.json)
    trainer = PreferenceTrainer(model, pairs, eval_pairs, cfg, beta=dpo["beta"], eos_id=tok.eos_id, device=device,
                                log=log, ref=ref)
    if args.resume:
        restore_training_state(args.resume, trainer)
    log("start", {"step": trainer.step, "pairs": len(pairs), "eval_pairs": len(eval_pairs), "beta": dpo["beta"],
                  "steps": cfg.steps, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                  "device": str(device), "lora_rank": (getattr(model, "lora", None) or {}).get("rank")})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def checkpoint(t: PreferenceTrainer, final: bool = False) -> None:
        path = out / ("model.apr" if final else f"step_{t.step:06d}.apr")
        extra = {"dpo.ref": t.ref} | ({"dpo.eval_ref": t.eval_ref} if t.eval_ref is not None else {})
        save_checkpoint(path, t, tokenizer=tok, merge_lora=final, extra_metadata={"training.dpo": dpo},
                        extra_tensors=None if final else extra)
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
    p.add_argument("--max-len", type=int, default=1024, help="tokens per prompt + answer (longer ones are cut)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step")
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
    p.add_argument("--out", default="runs/dpo")
    p.add_argument("--json", action="store_true", help="log JSON lines")
    p.set_defaults(func=cmd_dpo)
