"""Reinforcement learning from reward functions with GRPO (Shao et al., 2024): ``apr-kernels grpo``.

Each step takes ``batch_size`` prompts, samples ``num_generations`` completions of each from the
model (``model/generate.py``'s ``generate_batch``: all of a rank's prompts decoded together,
left-padded, with the KV cache; temperature / top-k / top-p; stopping at the end-of-text id or the
chat turn's closing token), scores every completion with the reward functions, and turns the
scores into group-relative advantages, ``A = (r - mean(group)) / (std(group) + 1e-4)`` (the
unbiased std over the prompt's completions, TRL's default ``scale_rewards="group"``; ``--scale-rewards
batch`` divides by the std of all the step's rewards, ``none`` by nothing, as Dr. GRPO). The loss is
the policy-gradient objective, normalised as TRL's ``loss_type`` (``--loss-type``)::

    loss = -sum_i A_i * log pi(completion_i | prompt_i) / (completion tokens of the step)    # dapo (default)
    loss = -sum_i A_i * log pi(completion_i | prompt_i) / (len_i * completions of the step)  # grpo
    loss = -sum_i A_i * log pi(completion_i | prompt_i) / (max_new_tokens * completions)    # dr_grpo

This is GRPO with one optimisation step per generation batch (TRL's ``num_iterations=1``: the PPO
ratio is 1, so its clipping never acts) and no KL penalty (TRL's default ``beta=0``); the sequence
log-likelihoods come from the model's loss per sequence (``preference.sequence_logps``, padding-free
where the package kernels run).

Data: JSON Lines records with a ``prompt``, a string (encoded as is, after the begin-of-text id when
the tokenizer adds one) or a list of messages (rendered with the chat format and the assistant's
header, ``chat.generation_prompt``). Every other field of a record goes to the reward functions.

Reward functions (``--reward FILE.py:NAME`` or ``--reward package.module:NAME``, several allowed,
summed with ``--reward-weights``) are called as TRL calls them::

    NAME(prompts=[...], completions=[...], completion_ids=[[...]], **fields) -> list[float | None]

one entry per completion: ``prompts`` and ``completions`` strings (for message prompts, the prompt's
message list and ``[{"role": "assistant", "content": text}]``), each other record field as a list
aligned with the completions. ``None`` means "not applicable": that function is left out of the sum
for that completion (a completion no function scores is an error).

Checkpoints are the trainer's: ``step_NNNNNN.apr`` every ``--save-every`` steps (resumable exactly:
each prompt's sampling is seeded by the seed, the step and its place in the step),
``model.apr`` at the end (LoRA adapters merged).

Under ``torchrun`` (DDP or FSDP, ``distributed.py``) ``--batch-size`` prompts is the global batch:
each rank samples, scores and trains on its share (a prompt's group stays on one rank), the token
count that normalises the objective and the logged values are summed over ranks, so the run is the
one-process run. Under FSDP the shards are gathered while sampling (the whole model on each rank
for that time) and sharded again for the update.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import time
from pathlib import Path

import torch

from .loop import TrainConfig
from .posttrain import (StepLoop, absolute, add_options, config_from, device_for, load_model, logger_for,
                        lora_settings, parallel_for, resumed, run_command, sequence_logps, tokenizer_for,
                        train_and_save)


# ------------------------------------------------------------------------------------------- data
def read_prompts(paths, tokenizer, max_prompt_len: int) -> list[dict]:
    """Prompt records of the JSON Lines ``paths``: ``{"prompt", "ids", "stops", "fields"}``."""
    from .chat import generation_prompt
    from .data import document_bos
    from .posttrain import jsonl_records

    eos = getattr(tokenizer, "eos_id", None)
    records = []
    for where, record in jsonl_records(paths, "prompt data ({'prompt': ...} records)"):
        if not isinstance(record, dict) or "prompt" not in record:
            raise ValueError(f"{where}: a prompt record needs a 'prompt' (a string or a list of messages)")
        prompt = record["prompt"]
        stops = {eos} if eos is not None else set()
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt, special=False)
            bos = document_bos(tokenizer)
            ids = ([bos] if bos is not None else []) + ids
        elif isinstance(prompt, list):
            text, close = generation_prompt(prompt, tokenizer)
            ids = tokenizer.encode(text, special=True)
            stops.add(close)
        else:
            raise ValueError(f"{where}: 'prompt' must be a string or a list of messages, got {type(prompt).__name__}")
        if not ids:
            raise ValueError(f"{where}: the prompt encodes to no tokens")
        if len(ids) > max_prompt_len:
            raise ValueError(f"{where}: the prompt has {len(ids)} tokens, more than --max-prompt-len {max_prompt_len}")
        records.append({"prompt": prompt, "ids": ids, "stops": sorted(s for s in stops if s is not None),
                        "fields": {k: v for k, v in record.items() if k != "prompt"}})
    if not records:
        raise ValueError(f"grpo: no prompt records in {', '.join(map(str, paths))}")
    return records


# ---------------------------------------------------------------------------------------- rewards
def load_reward(spec: str):
    """The function named by ``FILE.py:NAME`` or ``module.path:NAME`` (its name for the logs is NAME)."""
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise ValueError(f"--reward {spec!r}: expected FILE.py:NAME or package.module:NAME")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"--reward {spec!r}: no file {path}")
        mod_spec = importlib.util.spec_from_file_location(f"apr_kernels_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise ValueError(f"--reward {spec!r}: cannot import {where} ({exc})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"--reward {spec!r}: {where} has no function {name!r}")
    return fn


def score(functions: dict, weights: list[float], prompts: list, completions: list, completion_ids: list[list[int]],
          fields: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted sum of the functions' rewards per completion ``[N]``, each function's rewards
    ``[F, N]`` with NaN where it returned None), float64."""
    n = len(completions)
    columns = {key: [f.get(key) for f in fields] for key in sorted({k for f in fields for k in f})}
    table = torch.full((len(functions), n), float("nan"), dtype=torch.float64)
    for row, (name, fn) in enumerate(functions.items()):
        out = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        if not isinstance(out, (list, tuple)) or len(out) != n:
            raise ValueError(f"reward {name}: returned {type(out).__name__}"
                             f"{f' of {len(out)}' if isinstance(out, (list, tuple)) else ''}; expected a list of "
                             f"{n} numbers (one per completion)")
        for i, v in enumerate(out):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"reward {name}: completion {i} scored {v!r}; expected a finite number or None")
            table[row, i] = float(v)
    unscored = table.isnan().all(0)
    if unscored.any():
        raise ValueError(f"reward: completion {int(unscored.nonzero()[0, 0])} was scored None by every function")
    w = torch.tensor(weights, dtype=torch.float64)[:, None]
    return torch.nansum(table * w, 0), table


SCALES = ("group", "batch", "none")
LOSS_TYPES = ("dapo", "grpo", "dr_grpo")


def group_advantages(rewards: torch.Tensor, scale: str = "group", batch_std: float | None = None) -> torch.Tensor:
    """``[P, G]`` rewards -> advantages: each group centred on its mean, then divided by (TRL's
    ``scale_rewards``) its own std + 1e-4 (``group``), the std of all the step's rewards + 1e-4
    (``batch``: ``batch_std``, over all ranks; default: of ``rewards``), or nothing (``none``, as
    Dr. GRPO). Stds are unbiased."""
    if rewards.shape[1] < 2:
        raise ValueError("grpo: --num-generations must be at least 2 (advantages compare a prompt's completions)")
    if scale not in SCALES:
        raise ValueError(f"grpo: --scale-rewards {scale!r}; expected one of {', '.join(SCALES)}")
    centred = rewards - rewards.mean(1, keepdim=True)
    if scale == "group":
        return centred / (rewards.std(1, keepdim=True) + 1e-4)
    if scale == "batch":
        return centred / ((float(rewards.std()) if batch_std is None else batch_std) + 1e-4)
    return centred


def sequence_weights(lengths: list[int], loss_type: str, *, n_tokens: float, n_sequences: float,
                     max_new_tokens: int) -> torch.Tensor:
    """How each completion's summed log-likelihood enters the loss (TRL's ``loss_type``): ``dapo``
    1 / (completion tokens of the step), ``grpo`` 1 / (its own length x completions of the step),
    ``dr_grpo`` 1 / (max_new_tokens x completions of the step); counts over all ranks."""
    if loss_type == "dapo":
        return torch.full((len(lengths),), 1.0 / max(1.0, n_tokens), dtype=torch.float64)
    if loss_type == "grpo":
        return torch.tensor([1.0 / (max(1, n) * n_sequences) for n in lengths], dtype=torch.float64)
    if loss_type == "dr_grpo":
        return torch.full((len(lengths),), 1.0 / (max_new_tokens * n_sequences), dtype=torch.float64)
    raise ValueError(f"grpo: --loss-type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")


# ---------------------------------------------------------------------------------------- trainer
class GRPOTrainer(StepLoop):
    """GRPO on ``prompts`` (``read_prompts``) with ``rewards`` (name -> function) and their ``weights``;
    ``TrainConfig`` gives the optimiser, schedule, clipping, prompts per step (``batch_size``),
    precision and seed. ``sampling``: ``num_generations``, ``max_new_tokens``, ``temperature``,
    ``top_k``, ``top_p``."""

    def __init__(self, model, prompts: list[dict], rewards: dict, cfg: TrainConfig, *, tokenizer,
                 num_generations: int = 8, max_new_tokens: int = 256, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, reward_weights: list[float] | None = None,
                 device=None, log=None, padding_free: bool | None = None, parallel=None,
                 eval_prompts: list[dict] | None = None, micro_batch: int | None = None,
                 loss_type: str = "dapo", scale_rewards: str = "group"):
        if cfg.grad_accum != 1:
            raise ValueError("grpo: gradient accumulation is not supported; --micro-batch N bounds a step's memory")
        if not rewards:
            raise ValueError("grpo: no reward function (--reward FILE.py:NAME)")
        weights = list(reward_weights) if reward_weights else [1.0] * len(rewards)
        if len(weights) != len(rewards):
            raise ValueError(f"--reward-weights: {len(weights)} weight(s) for {len(rewards)} reward function(s)")
        if num_generations < 2:
            raise ValueError("grpo: --num-generations must be at least 2 (advantages compare a prompt's completions)")
        if temperature <= 0:
            raise ValueError(f"grpo: --temperature {temperature}; expected > 0 (the completions of a prompt must differ)")
        if micro_batch is not None and micro_batch < 1:
            raise ValueError(f"grpo: --micro-batch {micro_batch}; expected at least 1 completion per forward")
        sequence_weights([1], loss_type, n_tokens=1, n_sequences=1, max_new_tokens=1)  # (checks the names)
        group_advantages(torch.zeros(1, 2), scale_rewards)
        self.loss_type, self.scale_rewards = loss_type, scale_rewards
        self._setup("grpo", model, cfg, device=device, parallel=parallel, padding_free=padding_free, log=log,
                    n_data=len(prompts), what="the prompts of every step")
        self.prompts, self.rewards, self.weights, self.tok = prompts, rewards, weights, tokenizer
        self.eval_prompts, self.micro_batch = eval_prompts or [], micro_batch
        self.has_eval = bool(self.eval_prompts)
        self.sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        self.num_generations, self.max_new_tokens = num_generations, max_new_tokens

    def sample_groups(self, records: list[dict], generators: list[torch.Generator]) -> list[list[list[int]]]:
        """``num_generations`` completions of each prompt (ids after the prompt, the stop id included
        when one came), all decoded in one left-padded batch, each prompt's group sampled with its
        own generator."""
        from apr_kernels.model.generate import generate_batch

        g = self.num_generations
        with self._autocast():
            flat = generate_batch(self.model, [r["ids"] for r in records for _ in range(g)], self.max_new_tokens,
                                  stops=[r["stops"] for r in records for _ in range(g)],
                                  generators=[(g, gen) for gen in generators], vocab_size=self.tok.vocab_size,
                                  **self.sampling)
        return [flat[k * g:(k + 1) * g] for k in range(len(records))]

    @contextlib.contextmanager
    def _gathered(self):
        """Whole parameters while sampling: FSDP's shards all-gathered (generation calls the layers'
        parts directly, past FSDP's hooks), sharded again after."""
        if self.parallel is None or self.parallel.mode != "fsdp":
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        modules = [m for m in self.model.modules() if isinstance(m, FSDPModule)]
        for m in modules:
            m.unshard()
        try:
            yield
        finally:
            for m in modules:
                m.reshard()

    def train_step(self) -> dict:
        c = self.cfg
        par = self.parallel
        lr, t0 = self._start_step()
        # every rank draws the step's prompts and takes its share; each prompt's sampling is seeded by
        # the step and its place in the step, so any number of ranks (and a resumed run) samples alike
        index, place = self.batches.next(c.batch_size), torch.arange(c.batch_size)
        if par is not None:
            index, place = par.local_rows(index), par.local_rows(place)
        records = [self.prompts[i] for i in index.tolist()]
        with self._gathered():
            # (generators on the model's device: sampling needs no copy of the probabilities to the host)
            groups = self.sample_groups(records, [torch.Generator(self.device).manual_seed(
                (c.seed * 1_000_003 + self.step) * 1_000_033 + k) for k in place.tolist()])
        # rewards of all completions of this rank at once (functions may batch their work)
        flat = [(r, ids) for r, g in zip(records, groups) for ids in g]
        stops = [set(r["stops"]) for r, _ in flat]
        texts = [self.tok.decode([t for t in ids if t not in s]) for (r, ids), s in zip(flat, stops)]
        chat = [isinstance(r["prompt"], list) for r, _ in flat]
        rewards, table = score(self.rewards, self.weights, [r["prompt"] for r, _ in flat],
                               [[{"role": "assistant", "content": t}] if m else t for t, m in zip(texts, chat)],
                               [ids for _, ids in flat], [r["fields"] for r, _ in flat])
        rewards = rewards.view(len(records), self.num_generations)
        # the step's counts over all ranks: completion tokens, completions, and the rewards' sums for a
        # batch-wide std
        totals = torch.tensor([float(sum(len(ids) for _, ids in flat)), float(len(flat)), float(rewards.sum()),
                               float((rewards ** 2).sum())], dtype=torch.float64)
        if par is not None:
            totals = par.mean(totals.to(self.device)).cpu() * self.world
        n_tokens, n_seqs, r_sum, r_sq = totals.tolist()
        batch_std = math.sqrt(max(0.0, (r_sq - r_sum * r_sum / n_seqs) / max(1.0, n_seqs - 1)))
        advantages = group_advantages(rewards, self.scale_rewards, batch_std)
        weights = sequence_weights([len(ids) for _, ids in flat], self.loss_type, n_tokens=n_tokens,
                                   n_sequences=n_seqs, max_new_tokens=self.max_new_tokens)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        seqs = [[-1 - t for t in r["ids"]] + ids for r, ids in flat]  # the prompt is no target
        adv = advantages.flatten() * weights  # each completion's weight in the objective
        # micro-batches of completions (every rank runs as many: equal shares); gradients synchronised
        # on the last
        size = self.micro_batch or len(seqs)
        starts = range(0, len(seqs), size)
        objective = torch.zeros((), dtype=torch.float64)
        for k, a in enumerate(starts):
            with par.grad_sync(k == len(starts) - 1) if par is not None else contextlib.nullcontext():
                with self._autocast():
                    logps = sequence_logps(par or self.model, seqs[a:a + size], self.device, eos_id=self.tok.eos_id,
                                           padding_free=self.padding_free)
                part = -(adv[a:a + size].to(logps.device, logps.dtype) * logps).sum()
                # DDP/FSDP average gradients over the ranks: scaled by the world size, a sum over ranks
                (part * self.world).backward()
            objective += part.detach().double().cpu()
        grad_norm = None
        if c.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            if hasattr(grad_norm, "full_tensor"):  # FSDP: a replicated DTensor
                grad_norm = grad_norm.full_tensor()
            grad_norm = float(grad_norm)
        self.optimizer.step()
        self.step += 1
        # sums over this rank's completions and groups, then over all ranks
        std = rewards.std(1)
        stats = torch.cat([torch.stack([
            objective, rewards.sum(), std.sum(), (std == 0).sum(),
            torch.tensor(float(sum(len(ids) for _, ids in flat))),
            torch.tensor(float(sum(not any(t in s for t in ids[-1:]) for (_, ids), s in zip(flat, stops)))),
            torch.tensor(float(len(flat))), torch.tensor(float(len(groups)))]).double(),
            torch.nansum(table, 1), (~table.isnan()).sum(1).double()])
        if par is not None:
            stats = par.mean(stats.to(self.device)).cpu() * self.world
        loss, r_sum, std_sum, zero_std, n_len, n_cut, n, n_groups = stats[:8].tolist()
        f = len(self.rewards)
        per_function = {f"reward_{name}": (total / count if count else float("nan"))
                        for name, total, count in zip(self.rewards, stats[8:8 + f].tolist(), stats[8 + f:].tolist())}
        if not math.isfinite(loss):
            raise RuntimeError(f"grpo diverged: loss={loss} at step {self.step} (lower --lr?)")
        return {"step": self.step, "loss": loss, "lr": lr, "reward": r_sum / n, "reward_std": std_sum / n_groups,
                **per_function, "frac_reward_zero_std": zero_std / n_groups, "completion_len": n_len / n,
                "truncated": n_cut / n, "grad_norm": grad_norm, "s": time.perf_counter() - t0}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean reward (and each function's) of one greedy completion per held-out prompt; each rank
        decodes a contiguous share, the sums are added over ranks."""
        par = self.parallel
        rank = par.env.rank if par is not None else 0
        per = -(-len(self.eval_prompts) // self.world)
        mine = self.eval_prompts[rank * per:(rank + 1) * per]
        completions = []
        with self._gathered():  # (a collective under FSDP: every rank enters, even with no prompt)
            if mine:
                from apr_kernels.model.generate import generate_batch

                with self._autocast():
                    completions = generate_batch(self.model, [r["ids"] for r in mine], self.max_new_tokens,
                                                 stops=[r["stops"] for r in mine], vocab_size=self.tok.vocab_size)
        f = len(self.rewards)
        stats = torch.zeros(3 + 2 * f, dtype=torch.float64)
        if mine:
            texts = [self.tok.decode([t for t in ids if t not in r["stops"]]) for r, ids in zip(mine, completions)]
            rewards, table = score(self.rewards, self.weights, [r["prompt"] for r in mine],
                                   [[{"role": "assistant", "content": t}] if isinstance(r["prompt"], list) else t
                                    for r, t in zip(mine, texts)], completions, [r["fields"] for r in mine])
            stats = torch.cat([torch.tensor([float(rewards.sum()), float(len(mine)),
                                             float(sum(len(c) for c in completions))], dtype=torch.float64),
                               torch.nansum(table, 1), (~table.isnan()).sum(1).double()])
        if par is not None:
            stats = par.mean(stats.to(self.device)).cpu() * self.world
        total, n, n_len = stats[:3].tolist()
        return {"step": self.step, "eval_reward": total / n,
                **{f"eval_reward_{name}": (v / c if c else float("nan"))
                   for name, v, c in zip(self.rewards, stats[3:3 + f].tolist(), stats[3 + f:].tolist())},
                "eval_completion_len": n_len / n, "eval_prompts": int(n)}


# -------------------------------------------------------------------------------------------- CLI
def cmd_grpo(args) -> int:
    """``apr-kernels grpo``: GRPO from an APR file; ``--out/step_NNNNNN.apr`` every ``--save-every``
    steps (resumable with ``--resume``), ``--out/model.apr`` at the end (adapters merged). Under
    torchrun: DDP or FSDP (``--parallel``), each rank sampling and scoring its share of the prompts."""
    return run_command(args, lambda env, mode: _grpo(args, env, mode))


def _grpo(args, env, mode: str) -> int:
    from .checkpoint import restore_training_state
    from .cli import tristate

    device = device_for(args, env, mode)
    if args.resume:  # everything but the device and the output folder comes from the checkpoint
        grpo, cfg = resumed(args, "grpo")
        load = {"lora": "keep", "keep_quantized": True}
    else:
        if not (args.init and args.data and args.reward):
            raise ValueError("grpo: --init FILE.apr, --data PROMPTS.jsonl... and --reward FILE.py:NAME are required "
                             "(or --resume STEP.apr)")
        grpo = {"init": str(args.init), "data": absolute(args.data), "eval_data": absolute(args.eval_data),
                "micro_batch": args.micro_batch, "rewards": [_absolute_reward(s) for s in args.reward],
                "reward_weights": args.reward_weights, "num_generations": args.num_generations,
                "max_new_tokens": args.max_new_tokens, "max_prompt_len": args.max_prompt_len,
                "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "tokenizer": args.tokenizer,
                "loss_type": args.loss_type, "scale_rewards": args.scale_rewards}
        cfg = config_from(args, seq_len=args.max_prompt_len + args.max_new_tokens)
        load = lora_settings(args)
    rewards = {s.rpartition(":")[2]: load_reward(s) for s in grpo["rewards"]}  # fail before the model loads
    source = args.resume or grpo["init"]
    model = load_model(source, env, mode, device, args, **load)
    tok = tokenizer_for(grpo["tokenizer"], model, source)
    prompts = read_prompts(grpo["data"], tok, grpo["max_prompt_len"])
    eval_prompts = read_prompts(grpo["eval_data"], tok, grpo["max_prompt_len"]) if grpo.get("eval_data") else None
    if grpo["max_prompt_len"] + grpo["max_new_tokens"] > model.config.max_position_embeddings:
        raise ValueError(f"--max-prompt-len {grpo['max_prompt_len']} + --max-new-tokens {grpo['max_new_tokens']} "
                         f"exceed the model's max_position_embeddings {model.config.max_position_embeddings}")
    if not args.resume:
        torch.manual_seed(cfg.seed)
    parallel = parallel_for(model, env, mode)
    trainer = GRPOTrainer(model, prompts, rewards, cfg, tokenizer=tok, num_generations=grpo["num_generations"],
                          max_new_tokens=grpo["max_new_tokens"], temperature=grpo["temperature"],
                          top_k=grpo["top_k"], top_p=grpo["top_p"], reward_weights=grpo["reward_weights"],
                          device=device, padding_free=tristate(args.padding_free), parallel=parallel,
                          eval_prompts=eval_prompts, micro_batch=grpo.get("micro_batch"),
                          loss_type=grpo.get("loss_type", "dapo"), scale_rewards=grpo.get("scale_rewards", "group"),
                          log=logger_for(args, env))
    if args.resume:
        restore_training_state(args.resume, trainer)
    trainer.log("start", {"step": trainer.step, "prompts": len(prompts), "eval_prompts": len(eval_prompts or []),
                          "steps": cfg.steps, "rewards": list(rewards),
                          "num_generations": trainer.num_generations, "max_new_tokens": trainer.max_new_tokens,
                          "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                          "device": str(device), "world": trainer.world, "padding_free": trainer.padding_free,
                          "lora_rank": (getattr(model, "lora", None) or {}).get("rank")})
    return train_and_save(trainer, args, env, parallel, tok, {"training.grpo": grpo})


def _absolute_reward(spec: str) -> str:
    """A ``FILE.py:NAME`` spec with the file's absolute path (so ``--resume`` finds it from anywhere)."""
    where, _, name = spec.rpartition(":")
    return f"{Path(where).resolve()}:{name}" if where.endswith(".py") else spec


def register(subparsers) -> None:
    p = subparsers.add_parser("grpo", help="reinforcement learning from reward functions (GRPO) from an APR file")
    p.add_argument("--init", help="APR model to train")
    p.add_argument("--data", nargs="+", help="JSON Lines of {'prompt': text or messages, ...fields for the rewards}")
    p.add_argument("--reward", nargs="+", metavar="FILE.py:NAME",
                   help="reward function(s): NAME(prompts, completions, completion_ids, **fields) -> list of floats")
    p.add_argument("--reward-weights", nargs="+", type=float, default=None, help="one weight per --reward (default 1)")
    p.add_argument("--eval-data", nargs="+", help="held-out prompts: the mean reward of one greedy completion each "
                                                   "is logged at the start, every --eval-every steps and at the end")
    p.add_argument("--num-generations", type=int, default=8, help="completions sampled per prompt (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per completion at most (default 256)")
    p.add_argument("--max-prompt-len", type=int, default=512, help="longest prompt in tokens (default 512)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=4, help="prompts per step (each with --num-generations completions)")
    p.add_argument("--loss-type", choices=LOSS_TYPES, default="dapo",
                   help="normalisation of the objective, as TRL's: dapo (over the step's completion tokens), grpo "
                        "(per completion), dr_grpo (by max_new_tokens)")
    p.add_argument("--scale-rewards", choices=SCALES, default="group",
                   help="advantages divided by the group's reward std (group), the step's (batch) or not (none)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="completions per training forward (default: all of a rank's completions of the step)")
    add_options(p, command="grpo", lr=1e-6, lr_help="peak learning rate (default 1e-6; LoRA wants ~1e-5)")
    p.set_defaults(func=cmd_grpo)
