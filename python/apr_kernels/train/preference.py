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
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import BatchStream, marked_ids, split_targets
from .loop import TrainConfig, autocast_dtype_for, lr_at, make_optimizer


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
                 log=None):
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
        self.ref = self._logps(pairs)  # [P, 2]: the model as loaded is the reference
        self.eval_ref = self._logps(eval_pairs) if eval_pairs else None

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
        lr = lr_at(self.step, lr=c.lr, total_steps=c.steps, warmup=c.warmup, min_ratio=c.min_lr_ratio,
                   schedule=c.lr_schedule, decay_fraction=c.decay_fraction)
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

    def run(self) -> list[dict]:
        history = []
        if self.eval_pairs:
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
        return history


def cmd_dpo(args) -> int:
    """``apr-kernels dpo``: DPO from an APR file; writes ``--out/model.apr`` (adapters merged)."""
    from apr_kernels.model.loading import check_tokenizer_vocab, from_apr

    from .checkpoint import save_checkpoint
    from .cli import load_tokenizer, pick_device
    from .loop import Logger

    device = pick_device(args.device)
    lora = None
    if args.lora_rank:
        lora = {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": args.lora_targets.split(","),
                "seed": args.seed}
    model = from_apr(args.init, device=device, lora_init=lora)
    tok = load_tokenizer(args.tokenizer, model.apr_metadata, args.init)
    check_tokenizer_vocab(tok.vocab_size, model.config.vocab_size, f"{args.init}: tokenizer")
    pairs = read_pairs(args.data, tok, args.max_len)
    if args.eval_data:
        eval_pairs = read_pairs(args.eval_data, tok, args.max_len)
    else:  # a held-out share of the pairs, chosen by the seed
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(args.seed)).tolist()
        n_eval = min(len(pairs) - 1, max(1, round(len(pairs) * args.eval_fraction))) if len(pairs) > 1 else 0
        eval_pairs = [pairs[i] for i in order[:n_eval]]
        pairs = [pairs[i] for i in order[n_eval:]]
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.max_len, lr=args.lr,
                      warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                      eval_every=args.eval_every, seed=args.seed, precision=args.precision)
    torch.manual_seed(args.seed)
    log = Logger(args.json)
    trainer = PreferenceTrainer(model, pairs, eval_pairs, cfg, beta=args.beta, eos_id=tok.eos_id, device=device,
                                log=log)
    log("start", {"pairs": len(pairs), "eval_pairs": len(eval_pairs), "beta": args.beta, "steps": cfg.steps,
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                  "device": str(device), "lora_rank": args.lora_rank or None})
    trainer.run()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "model.apr", model=model, tokenizer=tok, merge_lora=True, extra_metadata={
        "training.dpo": {"beta": args.beta, "steps": cfg.steps, "pairs": len(pairs), "init": str(args.init),
                         "config": cfg.to_dict()}})
    print(f"wrote {out / 'model.apr'}", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    d = TrainConfig()
    p = subparsers.add_parser("dpo", help="preference fine-tuning (DPO) from an APR file")
    p.add_argument("--init", required=True, help="APR model to fine-tune (also the reference)")
    p.add_argument("--data", nargs="+", required=True, help="JSON Lines of {'prompt', 'chosen', 'rejected'}")
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
