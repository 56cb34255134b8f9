"""Generalized knowledge distillation (GKD; Agarwal et al., 2024) as TRL's ``GKDTrainer`` runs it:
``apr-kernels gkd``.

The student learns the teacher's whole next-token distribution on the completion tokens of
supervised records, where each micro-batch's completions come from one of three sources:

* with probability ``--lmbda`` (TRL's ``lmbda``), the student's own samples of the records' prompts
  (on-policy: the student is corrected where it goes, not only on the data's text);
* otherwise, with ``--seq-kd``, the teacher's samples (sequence-level KD);
* otherwise the records' completions.

The loss of a token is the divergence ``--beta`` names (TRL's generalized JSD: 0 the forward KL,
1 the reverse KL, between ``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``,
``p`` the teacher's distribution and ``q`` the student's, at temperature 1), averaged over all the
completion tokens of the step (every micro-batch and rank). On the fast path it is the fused
``linear_distillation`` (``kd_ratio`` 1): neither model's ``[tokens, vocab]`` logits are held.
Sampling uses ``--temperature`` / ``--top-k`` / ``--top-p`` and stops at the end-of-text id or the
chat turn's closing token (at most ``--max-new-tokens``). The coin of each micro-batch and each
prompt's sampling are seeded by the seed, the step and the place, so every rank agrees and a
resumed run repeats the uninterrupted one.

Data: JSON Lines ``{"prompt", "completion"}`` (strings, or message lists) or ``{"messages": [...]}``
whose last message is the assistant's answer (the rest is the prompt). Logged: the loss (the
divergence per completion token), ``ce`` (the student's NLL per completion token), ``on_policy`` and
``teacher_sampled`` (the shares of micro-batches whose completions were sampled by the student or
the teacher) and the completion tokens; held-out: the loss and ``ce`` on the records' completions.
The teacher needs the student's tokenizer and is held whole on every rank, its layers split
under ``--tensor-parallel``, or sharded like the student under ``--parallel fsdp`` (gathered for its
forwards and its samples); bf16 where the run computes in bf16. Checkpoints, ``--resume``, LoRA and
torchrun follow ``posttrain.py``.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch

from .loop import TrainConfig
from .posttrain import (StepLoop, absolute, add_options, config_from, device_for, fit_epochs, held_out, logger_for,
                        packed, padded_inputs, parallel_for, run_command, settings_and_model, start_fields,
                        tensor_group, tokenizer_for, train_and_save)
from .preference import answer_ids


def read_records(paths, tokenizer, max_prompt_len: int, max_len: int) -> list[dict]:
    """Supervised records as ``{"prompt", "ids" (the prompt's ids for sampling), "stops", "seq" (the
    record's marked ids, cut to max_len + 1)}``."""
    from .grpo import prompt_ids
    from .posttrain import jsonl_records

    if getattr(tokenizer, "eos_id", None) is None:
        raise ValueError("gkd: the tokenizer has no end-of-text id (it closes every completion)")
    out = []
    for where, record in jsonl_records(paths, "GKD data ({'prompt', 'completion'} or {'messages'} records)"):
        if isinstance(record, dict) and "messages" in record:
            messages = record["messages"]
            if not isinstance(messages, list) or len(messages) < 2 or not isinstance(messages[-1], dict) \
                    or messages[-1].get("role") != "assistant":
                raise ValueError(f"{where}: 'messages' must end with the assistant's answer after a prompt")
            prompt, completion = messages[:-1], messages[-1:]
        elif isinstance(record, dict) and "prompt" in record and "completion" in record:
            prompt, completion = record["prompt"], record["completion"]
        else:
            raise ValueError(f"{where}: a GKD record needs 'prompt' and 'completion', or 'messages'")
        seq = answer_ids(prompt, completion, tokenizer, where)[: max_len + 1]
        if not any(t >= 0 for t in seq[1:]):
            raise ValueError(f"{where}: the completion lies past --max-len {max_len} tokens; raise --max-len")
        ids, stops = prompt_ids(prompt, tokenizer, where, max_prompt_len)
        out.append({"prompt": prompt, "ids": ids, "stops": stops, "seq": seq})
    if not out:
        raise ValueError(f"gkd: no records in {', '.join(map(str, paths))}")
    return out


def _targets(seqs: list[list[int]]) -> int:
    """The completion tokens (loss targets) of marked id lists."""
    return sum(t >= 0 for s in seqs for t in s[1:])


class GKDTrainer(StepLoop):
    """GKD on ``records`` (``read_records``) from ``teacher`` (a frozen model with the same tokenizer),
    with ``TrainConfig``'s optimiser, schedule, clipping, batch size (records per micro-batch over all
    ranks), gradient accumulation, precision and seed (module docstring)."""

    def __init__(self, model, teacher, records, eval_records, cfg: TrainConfig, *, tokenizer, lmbda: float = 0.5,
                 beta: float = 0.5, seq_kd: bool = False, max_new_tokens: int = 128, temperature: float = 0.9,
                 top_k: int | None = None, top_p: float | None = None, device=None, log=None, parallel=None,
                 padding_free: bool | None = None):
        if not 0.0 <= lmbda <= 1.0 or not 0.0 <= beta <= 1.0:
            raise ValueError(f"gkd: --lmbda {lmbda} and --beta {beta}; expected both in [0, 1]")
        if temperature <= 0 or max_new_tokens < 1:
            raise ValueError(f"gkd: --temperature {temperature}, --max-new-tokens {max_new_tokens}; expected > 0 "
                             f"and >= 1")
        self._setup("gkd", model, cfg, device=device, parallel=parallel, padding_free=padding_free, log=log,
                    n_data=len(records), what="every batch of records")
        self.teacher, self.records, self.eval_records = teacher, records, eval_records or []
        self.has_eval = bool(self.eval_records)
        self.tok, self.eos = tokenizer, tokenizer.eos_id
        self.lmbda, self.beta, self.seq_kd = lmbda, beta, seq_kd
        self.max_new_tokens = max_new_tokens
        self.sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}

    def source_of(self, micro: int) -> str:
        """Where micro-batch ``micro`` of this step takes its completions: "student", "teacher" or
        "data" (a coin seeded by the seed, the step and ``micro``: the same on every rank)."""
        g = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + self.step) * 1_000_033 + micro)
        if float(torch.rand((), generator=g)) < self.lmbda:
            return "student"
        return "teacher" if self.seq_kd else "data"

    def sequences(self, records: list[dict], places: list[int], micro: int, source: str) -> list[list[int]]:
        """Marked id lists of ``records``: the data's, or the prompt (no target) + a completion sampled
        by the ``source`` model, each prompt with a generator seeded by the step, ``micro`` and its place."""
        if source == "data":
            return [r["seq"] for r in records]
        from apr_kernels.model.generate import generate_batch

        gens = [(1, torch.Generator(self.device).manual_seed(
            ((self.cfg.seed * 1_000_003 + self.step) * 1_000_033 + micro) * 10_007 + p)) for p in places]
        model = self.model if source == "student" else self.teacher
        was = model.training
        model.eval()
        with self._gathered(model), self._autocast():
            done = generate_batch(model, [r["ids"] for r in records], self.max_new_tokens,
                                  stops=[r["stops"] for r in records], generators=gens,
                                  vocab_size=self.tok.vocab_size, **self.sampling)
        model.train(was)
        return [[-1 - t for t in r["ids"]] + ids for r, ids in zip(records, done)]

    def _loss_sums(self, seqs: list[list[int]]) -> torch.Tensor:
        """``[loss, ce, kl]`` summed over the completion tokens of ``seqs`` (the divergence with
        ``kd_ratio`` 1: loss = kl), through the model's DDP/FSDP wrapper."""
        from apr_kernels.model.distillation import Teacher

        lengths = None
        if self.padding_free:
            x, y, docs = packed(seqs)
            x, y, docs = x.to(self.device), y.to(self.device), docs.to(self.device)
        else:
            (x, y, lengths), docs = padded_inputs(seqs, self.eos, self.device), None
        with self._autocast():
            teacher = Teacher.of(self.teacher, x, docs, kd_ratio=1.0, temperature=1.0, beta=self.beta)
            return (self.parallel or self.model).loss(x, y, reduction="sum", documents=docs, teacher=teacher,
                                                      lengths=lengths)

    def train_step(self) -> dict:
        c, par = self.cfg, self.parallel
        lr, t0 = self._start_step()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        # sample every micro-batch first: the step's loss is a mean over all its completion tokens
        micro_batches, sources = [], []
        for micro in range(c.grad_accum):
            index, place = self.batches.next(c.batch_size), torch.arange(c.batch_size)
            if par is not None:
                index, place = par.local_rows(index), par.local_rows(place)
            source = self.source_of(micro)
            records = [self.records[i] for i in index.tolist()]
            micro_batches.append(self.sequences(records, place.tolist(), micro, source))
            sources.append(source)
        tokens = torch.tensor([float(sum(_targets(seqs) for seqs in micro_batches))], dtype=torch.float64)
        if par is not None:
            tokens = par.mean(tokens.to(self.device)).cpu() * self.world
        n = max(1.0, float(tokens[0]))
        # a mixture-of-experts student: the "sum" loss holds its balance terms once per target; counted
        # as n over the forwards and ranks, the step's objective holds their mean (StepLoop._balance)
        self.model.aux_targets = n / (c.grad_accum * self.world)
        sums = torch.zeros(2, dtype=torch.float64)  # divergence, cross entropy
        for micro, seqs in enumerate(micro_batches):
            with par.grad_sync(micro == c.grad_accum - 1) if par is not None else contextlib.nullcontext():
                parts = self._loss_sums(seqs)
                # DDP/FSDP average gradients over the ranks: scaled by the world size, a sum over ranks
                (parts[0] * (self.world / n)).backward()
            if self.router is not None:
                self.router.add()
            sums += torch.stack([parts[0].detach(), parts[1]]).double().cpu()
        sums, grad_norm = self._finish_step(sums)
        router, _ = self._router_logs()  # (the loss sums hold the balance terms)
        loss, ce = (sums / n).tolist()
        if not math.isfinite(loss):
            raise RuntimeError(f"gkd diverged: loss={loss} at step {self.step} (lower --lr?)")
        return {"step": self.step, "loss": loss, "ce": ce, "lr": lr,
                "on_policy": sources.count("student") / len(sources),
                "teacher_sampled": sources.count("teacher") / len(sources), "tokens": int(n),
                **router, "grad_norm": grad_norm, "s": time.perf_counter() - t0}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The divergence and cross entropy per completion token of the held-out records' own
        completions, each rank scoring a share (as many forwards on every rank)."""
        was = self.model.training
        self.model.eval()
        rank = self.parallel.data_rank if self.parallel is not None else 0  # (a tensor-parallel group shares)
        per = -(-len(self.eval_records) // self.world)
        mine = [r["seq"] for r in self.eval_records[rank * per:(rank + 1) * per]]
        size = self.cfg.eval_batch_size
        sums = torch.zeros(3, dtype=torch.float64)  # divergence, cross entropy, tokens
        for a in range(0, max(per, 1), size):
            seqs = mine[a:a + size]
            parts = self._loss_sums(seqs or [self.eval_records[0]["seq"]])
            if seqs:  # (a rank without records runs a forward anyway: FSDP's are collectives)
                sums += torch.tensor([float(parts[0]), float(parts[1]), float(_targets(seqs))], dtype=torch.float64)
        self.model.train(was)
        if self.parallel is not None:
            self.parallel.reshard()
            sums = self.parallel.mean(sums.to(self.device)).cpu() * self.world
        loss, ce, n = sums.tolist()
        return {"step": self.step, "eval_loss": loss / n, "eval_ce": ce / n, "eval_tokens": int(n)}


def cmd_gkd(args) -> int:
    """``apr-kernels gkd``: generalized knowledge distillation from ``--teacher`` into ``--init``; step
    checkpoints (``--save-every``, resumable with ``--resume``), ``--out/model.apr`` at the end."""
    return run_command(args, lambda env, mode: _gkd(args, env, mode))


def _gkd(args, env, mode: str) -> int:
    from pathlib import Path

    from .checkpoint import restore_training_state
    from .cli import load_teacher, tristate

    def fresh():
        if not (args.init and args.teacher and args.data):
            raise ValueError("gkd: --init FILE.apr, --teacher T.apr and --data RECORDS.jsonl... are required (or "
                             "--resume STEP.apr)")
        gkd = {"teacher": str(Path(args.teacher).resolve()), "lmbda": args.lmbda, "beta": args.beta,
               "seq_kd": args.seq_kd, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
               "top_k": args.top_k, "top_p": args.top_p, "init": str(args.init), "data": absolute(args.data),
               "eval_data": absolute(args.eval_data), "eval_fraction": args.eval_fraction,
               "max_prompt_len": args.max_prompt_len, "max_len": args.max_len, "tokenizer": args.tokenizer}
        return gkd, config_from(args, grad_accum=args.grad_accum, seq_len=args.max_len)

    device = device_for(args, env, mode)
    gkd, cfg, model = settings_and_model(args, env, mode, device, "gkd", fresh)
    source = args.resume or gkd["init"]
    tok = tokenizer_for(gkd["tokenizer"], model, source)
    records = read_records(gkd["data"], tok, gkd["max_prompt_len"], gkd["max_len"])
    if gkd["eval_data"]:
        eval_records = read_records(gkd["eval_data"], tok, gkd["max_prompt_len"], gkd["max_len"])
    else:  # a held-out share, chosen by the seed
        keep, held = held_out(len(records), gkd["eval_fraction"], cfg.seed)
        eval_records, records = [records[i] for i in held], [records[i] for i in keep]
    cfg = fit_epochs(args, cfg, len(records), "records")
    if gkd["max_prompt_len"] + gkd["max_new_tokens"] > model.config.max_position_embeddings:
        raise ValueError(f"--max-prompt-len {gkd['max_prompt_len']} + --max-new-tokens {gkd['max_new_tokens']} exceed "
                         f"the model's max_position_embeddings {model.config.max_position_embeddings}")
    teacher = load_teacher(gkd["teacher"], cfg.precision, tok, device, tristate(args.fast), env=env, mode=mode,
                           tensor=tensor_group(args, env, mode))
    if not args.resume:
        torch.manual_seed(cfg.seed)
    parallel = parallel_for(model, env, mode)
    trainer = GKDTrainer(model, teacher, records, eval_records, cfg, tokenizer=tok, lmbda=gkd["lmbda"],
                         beta=gkd["beta"], seq_kd=gkd["seq_kd"], max_new_tokens=gkd["max_new_tokens"],
                         temperature=gkd["temperature"], top_k=gkd["top_k"], top_p=gkd["top_p"], device=device,
                         parallel=parallel, padding_free=tristate(args.padding_free), log=logger_for(args, env))
    if args.resume:
        restore_training_state(args.resume, trainer)
    trainer.log("start", {**start_fields(trainer, device), "records": len(records),
                          "eval_records": len(eval_records), "lmbda": gkd["lmbda"], "beta": gkd["beta"],
                          "seq_kd": gkd["seq_kd"], "teacher": gkd["teacher"]})
    return train_and_save(trainer, args, env, parallel, tok, {"training.gkd": gkd})


def register(subparsers) -> None:
    p = subparsers.add_parser("gkd", help="generalized knowledge distillation (on-policy, JSD) from a teacher APR model")
    p.add_argument("--init", help="APR model to train (the student)")
    p.add_argument("--teacher", help="APR model to distil from (the same tokenizer)")
    p.add_argument("--data", nargs="+", help="JSON Lines of {'prompt', 'completion'} or {'messages'} records")
    p.add_argument("--eval-data", nargs="+", help="held-out records (default: --eval-fraction of --data)")
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--lmbda", type=float, default=0.5,
                   help="share of micro-batches whose completions the student samples (on-policy; default 0.5)")
    p.add_argument("--beta", type=float, default=0.5,
                   help="the divergence: 0 forward KL, 1 reverse KL, between generalized JSD (default 0.5)")
    p.add_argument("--seq-kd", action="store_true",
                   help="the other micro-batches take completions sampled by the teacher instead of the data's")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per sampled completion at most")
    p.add_argument("--max-prompt-len", type=int, default=512, help="longest prompt in tokens (default 512)")
    p.add_argument("--max-len", type=int, default=1024, help="tokens per data record (longer ones are cut)")
    p.add_argument("--temperature", type=float, default=0.9, help="sampling temperature (default 0.9)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=8, help="records per micro-batch, over all ranks")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    add_options(p, command="gkd", lr=1e-5, lr_help="peak learning rate (default 1e-5)")
    p.set_defaults(func=cmd_gkd)
