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

With TRL's defaults (one optimisation step per generation batch, ``num_iterations=1``, so PPO's
ratio is 1 and its clipping never acts; no KL penalty, ``beta=0``) this is the whole objective, and
each completion's summed log-likelihood comes from the model's loss per sequence
(``posttrain.sequence_logps``, padding-free where the package kernels run; the gradients computed in
the fused loss's forward). With ``--beta B > 0`` or ``--num-iterations K > 1`` the loss is TRL's
per-token one, each token weighted as above::

    loss_t = -min(rho_t A, clip(rho_t, 1 - eps, 1 + eps_high) A) + B (exp(q_t) - q_t - 1)
    rho_t = p(token_t) / p_generating(token_t),   q_t = log p_ref(token_t) - log p(token_t)

from per-token log-probabilities (``posttrain.token_logps``: the fused loss with
``reduction="none"``). A generation batch serves ``K`` steps; the generating policy's
log-probabilities are computed once, right after sampling (so ``rho`` is 1 in its first step). The
reference is the model as loaded: with LoRA the frozen base (the adapters switched off), otherwise a
second copy of ``--init`` without gradients (in bf16 where the run computes in bf16; sharded too under
FSDP), computed once per generation batch. Step checkpoints fall between generation batches (``--save-every`` a multiple of ``K``).
On-policy distillation (``--teacher T.apr``, as Qwen3's small models and Thinking Machines' recipe
distil): each sampled token's advantage gains ``--teacher-coef`` x ``(log p_teacher - log
p_generating)``, the per-token reverse KL to the teacher on the policy's own samples (the teacher's
log-probabilities computed once per generation batch, the teacher whole on every rank, split under
tensor parallelism or sharded under FSDP); with no ``--reward`` that is the only signal. Logged as
``teacher_kl``. A ``--reward RM.apr`` is likewise sharded under FSDP or split under tensor
parallelism (``RewardModel``).
``--mask-truncated-completions`` (TRL's) leaves completions cut at ``--max-new-tokens`` out of the
loss; they still count in the advantages and the normalising counts.
``--importance-sampling-level sequence`` is GSPO (Zheng et al., 2025; TRL's
``importance_sampling_level``): ``rho`` is each completion's ``exp(mean_t log(p / p_generating))``,
on every token of that completion.

Data: JSON Lines records with a ``prompt``, a string (encoded as is, after the begin-of-text id when
the tokenizer adds one) or a list of messages (rendered with the chat format and the assistant's
header, ``chat.generation_prompt``). Every other field of a record goes to the reward functions.

Reward functions (``--reward FILE.py:NAME`` or ``--reward package.module:NAME``, several allowed,
summed with ``--reward-weights``; ``--reward RM.apr`` is a reward model, ``RewardModel``, as TRL
takes a model among its reward functions) are called as TRL calls them::

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

from .loop import TrainConfig, autocast_dtype_for
from .posttrain import (StepLoop, absolute, add_options, config_from, device_for, fit_epochs, frozen, load_model,
                        logger_for, lora_settings, parallel_for, resumed, run_command, sequence_logps, start_fields,
                        tensor_group, token_logps, tokenizer_for, train_and_save)


# ------------------------------------------------------------------------------------------- data
def prompt_ids(prompt, tokenizer, where: str, max_prompt_len: int) -> tuple[list[int], list[int]]:
    """(the ids a completion of ``prompt`` is sampled after, the ids that stop it): a string after the
    begin-of-text id when the tokenizer adds one (stopped by the end-of-text id), or messages rendered
    with the assistant's header (also stopped by the token closing the turn)."""
    from .chat import generation_prompt
    from .data import document_bos

    eos = getattr(tokenizer, "eos_id", None)
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
    return ids, sorted(s for s in stops if s is not None)


def read_prompts(paths, tokenizer, max_prompt_len: int) -> list[dict]:
    """Prompt records of the JSON Lines ``paths``: ``{"prompt", "ids", "stops", "fields"}``."""
    from .posttrain import jsonl_records

    records = []
    for where, record in jsonl_records(paths, "prompt data ({'prompt': ...} records)"):
        if not isinstance(record, dict) or "prompt" not in record:
            raise ValueError(f"{where}: a prompt record needs a 'prompt' (a string or a list of messages)")
        ids, stops = prompt_ids(record["prompt"], tokenizer, where, max_prompt_len)
        records.append({"prompt": record["prompt"], "ids": ids, "stops": stops,
                        "fields": {k: v for k, v in record.items() if k != "prompt"}})
    if not records:
        raise ValueError(f"grpo: no prompt records in {', '.join(map(str, paths))}")
    return records


# ---------------------------------------------------------------------------------------- rewards
class RewardModel:
    """A reward model file (``--reward RM.apr``, written by ``apr-kernels reward``) as a reward function:
    each completion is scored as the model was trained, prompt + completion rendered as ``reward``
    renders a pair's side (the chat format for message prompts) with the file's own tokenizer, the
    end-of-text id last, the score at that token. Held without gradients: whole on every rank; under
    ``--parallel fsdp`` (``mode``, ``env``) sharded over all ranks as a policy is (every decoder
    layer and the root), each layer gathered for its forward; under DDP with ``--tensor-parallel``
    (``tensor``, the policy's group) its layers split over the group as a distillation teacher's
    (``cli.split_frozen``: the group's ranks score the same completions), its embedding and score
    head whole. A sharded one is called by every rank
    alike (``join`` for a rank with nothing to score): its ranks run as many forwards, the most any
    of them needs (a rank with fewer completions runs one-token ones), since each forward gathers
    every layer from all ranks."""

    def __init__(self, path, *, device="cpu", dtype: torch.dtype | None = None, fast: bool | None = None,
                 batch_size: int = 16, env=None, mode: str = "none", tensor=None):
        from apr_kernels.model.loading import classifier_labels, load_classifier, plan

        from .cli import load_tokenizer, split_frozen

        self.sharded, labels, self.model = mode == "fsdp", classifier_labels(path), None
        if self.sharded:
            from . import distributed

            self.model = distributed.from_apr(path, env, "fsdp", fast=fast, dtype=dtype, compute_dtype=dtype,
                                              num_labels=labels)
        elif tensor is not None:
            self.model = split_frozen(path, plan(path, labels).config, f"--reward {path}", env, mode, tensor,
                                      fast=fast, dtype=dtype, num_labels=labels)
        if self.model is None:
            self.model = load_classifier(path, device=device, dtype=dtype, fast=fast)
        self.model.requires_grad_(False).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"--reward {path}: a classifier with num_labels={self.model.config.num_labels}; "
                             f"expected a reward model (one label)")
        self.tok = load_tokenizer(None, self.model.apr_metadata, path)
        if getattr(self.tok, "eos_id", None) is None:
            raise ValueError(f"--reward {path}: its tokenizer has no end-of-text id (the scored token)")
        self.path, self.device, self.batch_size = str(path), torch.device(device), batch_size

    @torch.no_grad()
    def __call__(self, prompts, completions, **_) -> list[float]:
        from .reward import sequence_ids, sequence_rewards

        seqs = [sequence_ids(p, c, self.tok, f"--reward {self.path}: completion {i}", "completion")
                for i, (p, c) in enumerate(zip(prompts, completions))]
        fast = self.model.use_fast(torch.empty(0, device=self.device))
        batches = [seqs[i:i + self.batch_size] for i in range(0, len(seqs), self.batch_size)]
        forwards = len(batches)
        if self.sharded:  # (agreed before any forward: each one's gathers are collectives too)
            import torch.distributed as dist

            most = torch.tensor([forwards], device=self.device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            forwards = int(most)
        out = [sequence_rewards(self.model, b, self.device, pad_id=self.tok.eos_id, padding_free=fast)
               for b in batches]
        for _ in range(forwards - len(batches)):  # (the forwards the other ranks run: their gathers)
            sequence_rewards(self.model, [[self.tok.eos_id]], self.device, pad_id=self.tok.eos_id, padding_free=fast)
        if self.sharded:  # (the root stays gathered after a forward without a backward)
            from .distributed import reshard

            reshard(self.model)
        return torch.cat(out).tolist() if out else []

    def join(self) -> None:
        """A sharded reward model's share of the others' scoring, on a rank with nothing to score."""
        if self.sharded:
            self([], [])


def reward_name(spec: str) -> str:
    """The logged name of a ``--reward``: NAME of ``FILE.py:NAME``, the file's stem for ``RM.apr``."""
    return Path(spec).stem if spec.endswith(".apr") else spec.rpartition(":")[2]


def load_reward(spec: str, **model_kwargs):
    """The function named by ``FILE.py:NAME`` or ``module.path:NAME`` (its name for the logs is NAME),
    or ``RM.apr``: a reward model (``RewardModel``, ``model_kwargs`` its device, dtype and ``fast``)."""
    if spec.endswith(".apr"):
        if not Path(spec).is_file():
            raise ValueError(f"--reward {spec!r}: no file {spec}")
        return RewardModel(spec, **model_kwargs)
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
IMPORTANCE_LEVELS = ("token", "sequence")
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
    ``top_k``, ``top_p``. The per-token loss (module docstring): ``beta`` with ``reference`` (a frozen
    model; None with LoRA: the base), ``num_iterations``, ``epsilon``, ``epsilon_high`` and
    ``importance_sampling`` ("token", or "sequence": GSPO); ``mask_truncated``: completions without a
    stop token leave the loss; ``teacher`` (a frozen model with the same tokenizer) and ``teacher_coef``:
    on-policy distillation (``rewards`` may then be empty)."""

    best_metric, best_higher = "eval_reward", True  # (--save-best / --early-stopping-patience)

    command = "grpo"  # (the name errors give: subclasses train other objectives on the same sampling)

    def __init__(self, model, prompts: list[dict], rewards: dict, cfg: TrainConfig, *, tokenizer,
                 num_generations: int = 8, max_new_tokens: int = 256, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, reward_weights: list[float] | None = None,
                 device=None, log=None, padding_free: bool | None = None, parallel=None,
                 eval_prompts: list[dict] | None = None, micro_batch: int | None = None,
                 loss_type: str = "dapo", scale_rewards: str = "group", beta: float = 0.0,
                 num_iterations: int = 1, epsilon: float = 0.2, epsilon_high: float | None = None,
                 importance_sampling: str = "token", mask_truncated: bool = False, reference=None,
                 teacher=None, teacher_coef: float = 1.0):
        if cfg.grad_accum != 1:
            raise ValueError(f"{self.command}: gradient accumulation is not supported; --micro-batch N bounds a "
                             f"step's memory")
        if not rewards and teacher is None:
            raise ValueError("grpo: no reward function (--reward FILE.py:NAME) and no --teacher")
        if eval_prompts and not rewards:
            raise ValueError("grpo: --eval-data scores held-out completions with the reward functions; give --reward")
        if not teacher_coef > 0:
            raise ValueError(f"grpo: --teacher-coef {teacher_coef}; expected a positive weight")
        weights = list(reward_weights) if reward_weights else [1.0] * len(rewards)
        if len(weights) != len(rewards):
            raise ValueError(f"--reward-weights: {len(weights)} weight(s) for {len(rewards)} reward function(s)")
        if num_generations < 2:
            raise ValueError(f"{self.command}: --num-generations must be at least 2 (a prompt's completions are "
                             f"compared)")
        if temperature <= 0:
            raise ValueError(f"{self.command}: --temperature {temperature}; expected > 0 (the completions of a "
                             f"prompt must differ)")
        if micro_batch is not None and micro_batch < 1:
            raise ValueError(f"{self.command}: --micro-batch {micro_batch}; expected at least 1 completion per forward")
        sequence_weights([1], loss_type, n_tokens=1, n_sequences=1, max_new_tokens=1)  # (checks the names)
        group_advantages(torch.zeros(1, 2), scale_rewards)
        epsilon_high = epsilon if epsilon_high is None else epsilon_high
        if beta < 0 or num_iterations < 1 or not 0 < epsilon < 1 or epsilon_high <= 0:
            raise ValueError(f"grpo: --beta {beta}, --num-iterations {num_iterations}, --epsilon {epsilon}, "
                             f"--epsilon-high {epsilon_high}; expected beta >= 0, at least 1 iteration, "
                             f"0 < epsilon < 1 and epsilon-high > 0")
        if cfg.save_every and cfg.save_every % num_iterations:
            raise ValueError(f"grpo: --save-every {cfg.save_every} is not a multiple of --num-iterations "
                             f"{num_iterations}; checkpoints are written between generation batches")
        if importance_sampling not in IMPORTANCE_LEVELS:
            raise ValueError(f"grpo: --importance-sampling-level {importance_sampling!r}; expected one of "
                             f"{', '.join(IMPORTANCE_LEVELS)}")
        self.lora = bool(getattr(model, "lora", None))
        if beta and reference is None and not self.lora:
            raise ValueError("grpo: --beta > 0 needs the reference model (the model as loaded; with LoRA, the "
                             "frozen base)")
        self.loss_type, self.scale_rewards = loss_type, scale_rewards
        self.beta, self.num_iterations, self.epsilon = beta, num_iterations, (epsilon, epsilon_high)
        self.reference = reference if beta else None
        self.importance_sampling, self.mask_truncated = importance_sampling, mask_truncated
        # the per-token objective (PPO's clipped ratio to the generating policy, the KL penalty, GSPO's
        # sequence ratio) when it differs from the policy gradient; else each completion's summed
        # log-likelihood suffices
        self.teacher, self.teacher_coef = teacher, teacher_coef
        self.per_token = beta > 0 or num_iterations > 1 or importance_sampling == "sequence" or teacher is not None
        self._generation = None  # the batch being trained on (kept for --num-iterations steps)
        self._setup(self.command, model, cfg, device=device, parallel=parallel, padding_free=padding_free, log=log,
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

    def generate(self) -> dict:
        """The step's prompts (this rank's share), their sampled completions, rewards and advantages,
        and under the per-token objective the generating policy's and the reference's token
        log-probabilities, computed in the micro-batches of the update."""
        c, par = self.cfg, self.parallel
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
        if self.rewards:
            rewards, table = score(self.rewards, self.weights, [r["prompt"] for r, _ in flat],
                                   [[{"role": "assistant", "content": t}] if m else t for t, m in zip(texts, chat)],
                                   [ids for _, ids in flat], [r["fields"] for r, _ in flat])
        else:  # on-policy distillation alone: the teacher's log-probabilities are the only signal
            rewards, table = torch.zeros(len(flat), dtype=torch.float64), torch.zeros(0, len(flat), dtype=torch.float64)
        rewards = rewards.view(len(records), self.num_generations)
        # the step's counts over all ranks: completion tokens, completions, and the rewards' sums for a
        # batch-wide std
        totals = torch.tensor([float(sum(len(ids) for _, ids in flat)), float(len(flat)), float(rewards.sum()),
                               float((rewards ** 2).sum())], dtype=torch.float64)
        if par is not None:
            totals = par.mean(totals.to(self.device)).cpu() * self.world
        n_tokens, n_seqs, r_sum, r_sq = totals.tolist()
        batch_std = math.sqrt(max(0.0, (r_sq - r_sum * r_sum / n_seqs) / max(1.0, n_seqs - 1)))
        lengths = [len(ids) for _, ids in flat]
        finished = torch.tensor([bool(ids) and ids[-1] in s for (_, ids), s in zip(flat, stops)], dtype=torch.float64)
        # --mask-truncated-completions (TRL's): a completion cut at --max-new-tokens leaves the loss; the
        # advantages and the normalising counts still include it
        keep = finished if self.mask_truncated else torch.ones_like(finished)
        batch = {"flat": flat, "stops": stops, "groups": groups, "rewards": rewards, "table": table,
                 "lengths": lengths, "finished": finished, "keep": keep,
                 "seqs": [[-1 - t for t in r["ids"]] + ids for r, ids in flat],  # the prompt is no target
                 "advantages": group_advantages(rewards, self.scale_rewards, batch_std).flatten(),
                 "weights": keep * sequence_weights(lengths, self.loss_type, n_tokens=n_tokens, n_sequences=n_seqs,
                                                    max_new_tokens=self.max_new_tokens),
                 "old": None, "ref": None, "teacher": None}
        if self.num_iterations > 1:  # the generating policy, for PPO's ratio in the later iterations
            batch["old"] = self._token_logps_no_grad(batch["seqs"], self.parallel or self.model)
        if self.beta:
            if self.reference is not None:
                batch["ref"] = self._token_logps_no_grad(batch["seqs"], self.reference)
            else:  # LoRA: the frozen base is the model as loaded
                from apr_kernels.model.lora import adapters_disabled

                with adapters_disabled(self.model):
                    batch["ref"] = self._token_logps_no_grad(batch["seqs"], self.parallel or self.model)
        if self.teacher is not None:
            batch["teacher"] = self._token_logps_no_grad(batch["seqs"], self.teacher)
        return batch

    def _micro_batches(self, n: int) -> list[tuple[int, int]]:
        size = self.micro_batch or n
        return [(a, min(n, a + size)) for a in range(0, n, size)]

    @torch.no_grad()
    def _token_logps_no_grad(self, seqs: list[list[int]], model) -> list[torch.Tensor]:
        """``token_logps`` of each micro-batch of ``seqs`` through ``model`` (the policy, its DDP/FSDP
        wrapper, or the reference), without gradients; FSDP's root sharded again after."""
        with self._autocast():
            out = [token_logps(model, seqs[a:b], self.device, eos_id=self.tok.eos_id, padding_free=self.padding_free)
                   for a, b in self._micro_batches(len(seqs))]
        from .distributed import reshard

        for m in (self.model, self.reference, self.teacher):  # (a no-grad forward leaves FSDP's root gathered)
            if m is not None:
                reshard(m)
        return out

    def _token_objective(self, logps: torch.Tensor, batch: dict, k: int, a: int, b: int) -> tuple[torch.Tensor, list]:
        """TRL's per-token GRPO loss of micro-batch ``k`` (completions ``a:b``), weighted per token by its
        completion's ``sequence_weights``: ``-min(rho A, clip(rho, 1 - eps, 1 + eps_high) A) + beta KL``
        with ``rho = p / p_generating`` and the k3 estimate ``KL = exp(q) - q - 1``, ``q = log p_ref - log p``.
        With a teacher (on-policy distillation) each token's advantage also gets ``teacher_coef (log
        p_teacher - log p_generating)``: the reverse KL to the teacher on the policy's own samples, as a
        per-token reward. Also (KL sum, clipped-token count, teacher reverse-KL sum) over the tokens in
        the loss, for the logs."""
        lens = torch.tensor(batch["lengths"][a:b], device=logps.device)
        adv = batch["advantages"][a:b].to(logps.device, logps.dtype).repeat_interleave(lens)
        weight = batch["weights"][a:b].to(logps.device, logps.dtype).repeat_interleave(lens)
        kept = batch["keep"][a:b].to(logps.device).repeat_interleave(lens) > 0
        old = batch["old"][k] if batch["old"] is not None else logps.detach()
        teacher_kl = torch.zeros((), device=logps.device)
        if batch["teacher"] is not None:
            gap = old - batch["teacher"][k]  # log p_generating - log p_teacher of each sampled token
            adv = adv - self.teacher_coef * gap
            teacher_kl = (gap * kept).sum()
        log_ratio = logps - old
        if self.importance_sampling == "sequence":  # GSPO: each completion's mean log-ratio, on all its tokens
            seq = torch.arange(len(lens), device=logps.device).repeat_interleave(lens)
            mean = log_ratio.new_zeros(len(lens)).index_add(0, seq, log_ratio) / lens.clamp_min(1)
            log_ratio = mean[seq]
        ratio = torch.exp(log_ratio)
        low, high = self.epsilon
        per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - low, 1 + high) * adv)
        clipped = ((((ratio < 1 - low) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))) & kept).sum()
        kl = torch.zeros((), device=logps.device)
        if self.beta:
            q = batch["ref"][k] - logps
            per_token_kl = torch.exp(q) - q - 1
            per_token = per_token + self.beta * per_token_kl
            kl = (per_token_kl.detach() * kept).sum()
        return (weight * per_token).sum(), [kl, clipped, teacher_kl]

    def train_step(self) -> dict:
        par = self.parallel
        lr, t0 = self._start_step()
        if self._generation is None or self.step % self.num_iterations == 0:
            self._generation = self.generate()
        batch = self._generation
        flat, stops, groups, rewards, table = (batch[k] for k in ("flat", "stops", "groups", "rewards", "table"))
        seqs = batch["seqs"]
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        adv = batch["advantages"] * batch["weights"]  # each completion's weight in the objective
        # micro-batches of completions (every rank runs as many: equal shares); gradients synchronised
        # on the last
        parts = self._micro_batches(len(seqs))
        objective = torch.zeros((), dtype=torch.float64)
        token_stats = torch.zeros(3, dtype=torch.float64)  # KL sum, clipped tokens, teacher reverse-KL sum
        for k, (a, b) in enumerate(parts):
            with par.grad_sync(k == len(parts) - 1) if par is not None else contextlib.nullcontext():
                if self.per_token:
                    with self._autocast():
                        logps = token_logps(par or self.model, seqs[a:b], self.device, eos_id=self.tok.eos_id,
                                            padding_free=self.padding_free)
                    part, extra = self._token_objective(logps, batch, k, a, b)
                    token_stats += torch.stack([v.double() for v in extra]).cpu()
                else:
                    with self._autocast():
                        logps = sequence_logps(par or self.model, seqs[a:b], self.device, eos_id=self.tok.eos_id,
                                               padding_free=self.padding_free)
                    part = -(adv[a:b].to(logps.device, logps.dtype) * logps).sum()
                part = part + self._balance(len(parts))
                # DDP/FSDP average gradients over the ranks: scaled by the world size, a sum over ranks
                (part * self.world).backward()
            objective += part.detach().double().cpu()
        _, grad_norm = self._finish_step()
        router, _ = self._router_logs()  # (the objective summed below holds the balance terms)
        # sums over this rank's completions and groups, then over all ranks
        std = rewards.std(1)
        lengths = torch.tensor(batch["lengths"], dtype=torch.float64)
        stats = torch.cat([torch.stack([
            objective, rewards.sum(), std.sum(), (std == 0).sum(), lengths.sum(), (1 - batch["finished"]).sum(),
            torch.tensor(float(len(flat))), torch.tensor(float(len(groups))),
            (lengths * batch["keep"]).sum()]).double(),
            token_stats, torch.nansum(table, 1), (~table.isnan()).sum(1).double()])
        if par is not None:
            stats = par.mean(stats.to(self.device)).cpu() * self.world
        loss, r_sum, std_sum, zero_std, n_len, n_cut, n, n_groups, n_kept, kl_sum, n_clipped, t_kl = stats[:12].tolist()
        f = len(self.rewards)
        per_function = {f"reward_{name}": (total / count if count else float("nan"))
                        for name, total, count in zip(self.rewards, stats[12:12 + f].tolist(), stats[12 + f:].tolist())}
        if not math.isfinite(loss):
            raise RuntimeError(f"grpo diverged: loss={loss} at step {self.step} (lower --lr?)")
        per_token = {}
        if self.beta:
            per_token["kl"] = kl_sum / max(n_kept, 1.0)
        if self.num_iterations > 1:
            per_token["clip_ratio"] = n_clipped / max(n_kept, 1.0)
        if self.teacher is not None:
            per_token["teacher_kl"] = t_kl / max(n_kept, 1.0)
        return {"step": self.step, "loss": loss, "lr": lr, "reward": r_sum / n, "reward_std": std_sum / n_groups,
                **per_function, **per_token, "frac_reward_zero_std": zero_std / n_groups,
                "completion_len": n_len / n, "truncated": n_cut / n, **router, "grad_norm": grad_norm,
                "s": time.perf_counter() - t0}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean reward (and each function's) of one greedy completion per held-out prompt; each rank
        decodes a contiguous share, the sums are added over ranks."""
        par = self.parallel
        rank = par.data_rank if par is not None else 0  # (a tensor-parallel group decodes the same share)
        per = -(-len(self.eval_prompts) // self.world)
        mine = self.eval_prompts[rank * per:(rank + 1) * per]
        completions = []
        with self._gathered():  # (a collective under FSDP: every rank enters, even with no prompt)
            if mine or self.model.expert_parallel is not None:  # (expert parallelism: decoding in step)
                from apr_kernels.model.generate import generate_batch

                with self._autocast():
                    completions = generate_batch(self.model, [r["ids"] for r in mine], self.max_new_tokens,
                                                 stops=[r["stops"] for r in mine], vocab_size=self.tok.vocab_size)
        f = len(self.rewards)
        stats = torch.zeros(3 + 2 * f, dtype=torch.float64)
        if not mine:  # (a sharded reward model's forwards are collectives: this rank joins the others')
            for fn in self.rewards.values():
                if isinstance(fn, RewardModel):
                    fn.join()
        else:
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


def sampling_settings(args) -> dict:
    """The settings of a run that samples completions of prompts and scores them (``grpo``,
    ``online-dpo``, ``rloo``), from the command line (checked)."""
    return {"init": str(args.init), "data": absolute(args.data), "eval_data": absolute(args.eval_data),
            "micro_batch": args.micro_batch, "rewards": [_absolute_reward(s) for s in args.reward or []],
            "reward_weights": args.reward_weights, "num_generations": args.num_generations,
            "max_new_tokens": args.max_new_tokens, "max_prompt_len": args.max_prompt_len,
            "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "tokenizer": args.tokenizer,
            "reference": str(Path(args.init).resolve())}


class SamplingRun:
    """What a sampling run loads from its settings (``sampling_settings`` plus the command's own):
    ``cfg``, ``device``, ``rewards`` (name -> function; reward models whole on every rank, sharded
    under FSDP or split over a tensor-parallel group, bf16 where the run computes in bf16), ``model`` (this rank's), ``tok``, ``prompts``,
    ``eval_prompts``, and ``reference(needed)``: the frozen model as loaded when ``needed`` and the
    run has no LoRA (whose frozen base serves instead)."""

    def __init__(self, args, env, mode: str, settings: dict, cfg: TrainConfig, load: dict):
        from .cli import tristate

        self.args, self.env, self.mode, self.settings, self.cfg = args, env, mode, settings, cfg
        self.device = device_for(args, env, mode)
        self.bf16 = autocast_dtype_for(cfg.precision, torch.device(self.device)) == torch.bfloat16
        self.rewards = {reward_name(s): load_reward(s, device=self.device, dtype=torch.bfloat16 if self.bf16 else None,
                                                    fast=tristate(args.fast), env=env, mode=mode,
                                                    tensor=tensor_group(args, env, mode))
                        for s in settings["rewards"]}  # fail before the model loads
        self.source = args.resume or settings["init"]
        self.model = frozen(load_model(self.source, env, mode, self.device, args, **load), cfg)
        self.tok = tokenizer_for(settings["tokenizer"], self.model, self.source)
        self.prompts = read_prompts(settings["data"], self.tok, settings["max_prompt_len"])
        self.eval_prompts = (read_prompts(settings["eval_data"], self.tok, settings["max_prompt_len"])
                             if settings.get("eval_data") else None)
        if settings["max_prompt_len"] + settings["max_new_tokens"] > self.model.config.max_position_embeddings:
            raise ValueError(f"--max-prompt-len {settings['max_prompt_len']} + --max-new-tokens "
                             f"{settings['max_new_tokens']} exceed the model's max_position_embeddings "
                             f"{self.model.config.max_position_embeddings}")

    def reference(self, needed: bool):
        if not needed or getattr(self.model, "lora", None):  # (with LoRA the frozen base is the reference)
            return None
        # (in bf16 where it runs under bf16 autocast anyway: half the memory, under FSDP of each shard;
        # FSDP's bf16 compute copies of fp32 shards would be the same values)
        ref = load_model(self.settings["reference"], self.env, self.mode, self.device, self.args, trained=False,
                         lora_init=None, dtype=torch.bfloat16 if self.bf16 else None)
        return ref.requires_grad_(False).eval()

    def sampling_kwargs(self) -> dict:
        """The trainer keywords every sampling run passes on."""
        from .cli import tristate

        s = self.settings
        return dict(tokenizer=self.tok, num_generations=s["num_generations"], max_new_tokens=s["max_new_tokens"],
                    temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"],
                    reward_weights=s["reward_weights"], device=self.device,
                    padding_free=tristate(self.args.padding_free), eval_prompts=self.eval_prompts,
                    micro_batch=s.get("micro_batch"), log=logger_for(self.args, self.env))


def run_sampling_command(args, env, mode: str, command: str, own, build, start) -> int:
    """The body of a command that samples and scores completions (``grpo``, ``online-dpo``, ``rloo``):
    the settings (the checkpoint's on ``--resume``, else ``own(args)``, which checks the command's
    options first, over ``sampling_settings``), the ``SamplingRun``, ``--epochs``, the reference model
    when the settings' ``beta`` asks for one, the trainer ``build(run, settings, cfg, parallel,
    reference)``, exact resume, the start line (plus ``start(trainer)``), training and checkpoints."""
    from .checkpoint import restore_training_state

    key = command.replace("-", "_")
    if args.resume:  # everything but the device and the output folder comes from the checkpoint
        settings, cfg = resumed(args, key)
        load = {"lora": "keep", "keep_quantized": True}
    else:
        mine = own(args)
        settings = {**sampling_settings(args), **mine}
        cfg = config_from(args, seq_len=args.max_prompt_len + args.max_new_tokens)
        load = lora_settings(args)
    run = SamplingRun(args, env, mode, settings, cfg, load)
    cfg = fit_epochs(args, cfg, len(run.prompts), "prompts")
    reference = run.reference(bool(settings.get("beta")))
    if not args.resume:
        torch.manual_seed(cfg.seed)
    parallel = parallel_for(run.model, env, mode)
    trainer = build(run, settings, cfg, parallel, reference)
    if args.resume:
        restore_training_state(args.resume, trainer)
    trainer.log("start", {**start_fields(trainer, run.device), "prompts": len(run.prompts),
                          "eval_prompts": len(run.eval_prompts or []), "rewards": list(run.rewards),
                          "num_generations": trainer.num_generations, **start(trainer)})
    return train_and_save(trainer, args, env, parallel, run.tok, {f"training.{key}": settings})


def require_prompts_and_rewards(args, command: str) -> None:
    """A fresh sampling run's required options: --init, --data and --reward (online-dpo, rloo)."""
    if not (args.init and args.data and args.reward):
        raise ValueError(f"{command}: --init FILE.apr, --data PROMPTS.jsonl... and --reward FILE.py:NAME|RM.apr are "
                         f"required (or --resume STEP.apr)")


def _grpo(args, env, mode: str) -> int:
    from .cli import tristate

    def own(args) -> dict:
        if args.teacher_coef is not None and not args.teacher:
            raise ValueError(f"--teacher-coef {args.teacher_coef} needs --teacher")
        if not (args.init and args.data and (args.reward or args.teacher)):
            raise ValueError("grpo: --init FILE.apr, --data PROMPTS.jsonl... and --reward FILE.py:NAME (or --teacher "
                             "T.apr) are required (or --resume STEP.apr)")
        return {"loss_type": args.loss_type, "scale_rewards": args.scale_rewards, "beta": args.beta,
                "num_iterations": args.num_iterations, "epsilon": args.epsilon, "epsilon_high": args.epsilon_high,
                "importance_sampling": args.importance_sampling_level,
                "mask_truncated": args.mask_truncated_completions,
                "teacher": str(Path(args.teacher).resolve()) if args.teacher else None,
                "teacher_coef": 1.0 if args.teacher_coef is None else args.teacher_coef}

    def build(run, grpo, cfg, parallel, reference):
        teacher = None
        if grpo.get("teacher"):  # on-policy distillation: whole, split like the policy, or sharded
            from .cli import load_teacher

            teacher = load_teacher(grpo["teacher"], cfg.precision, run.tok, run.device, tristate(args.fast),
                                   env=run.env, mode=run.mode, tensor=tensor_group(args, run.env, run.mode))
        return GRPOTrainer(run.model, run.prompts, run.rewards, cfg, parallel=parallel, **run.sampling_kwargs(),
                           loss_type=grpo.get("loss_type", "dapo"), scale_rewards=grpo.get("scale_rewards", "group"),
                           beta=grpo.get("beta", 0.0), num_iterations=grpo.get("num_iterations", 1),
                           epsilon=grpo.get("epsilon", 0.2), epsilon_high=grpo.get("epsilon_high"),
                           importance_sampling=grpo.get("importance_sampling", "token"),
                           mask_truncated=grpo.get("mask_truncated", False), reference=reference,
                           teacher=teacher, teacher_coef=grpo.get("teacher_coef", 1.0))

    return run_sampling_command(args, env, mode, "grpo", own, build, lambda t: {
        "max_new_tokens": t.max_new_tokens, "beta": t.beta, "num_iterations": t.num_iterations,
        "importance_sampling": t.importance_sampling})


def _absolute_reward(spec: str) -> str:
    """A ``FILE.py:NAME`` or ``RM.apr`` spec with the file's absolute path (so ``--resume`` finds it
    from anywhere)."""
    if spec.endswith(".apr"):
        return str(Path(spec).resolve())
    where, _, name = spec.rpartition(":")
    return f"{Path(where).resolve()}:{name}" if where.endswith(".py") else spec


def add_sampling_options(p, *, num_generations: int, max_new_tokens: int, temperature: float) -> None:
    """The options of a run that samples completions of prompts and scores them (``grpo``,
    ``online-dpo``)."""
    p.add_argument("--init", help="APR model to train")
    p.add_argument("--data", nargs="+", help="JSON Lines of {'prompt': text or messages, ...fields for the rewards}")
    p.add_argument("--reward", nargs="+", metavar="FILE.py:NAME|RM.apr",
                   help="reward function(s): NAME(prompts, completions, completion_ids, **fields) -> list of floats, "
                        "or a reward model file (apr-kernels reward) scoring prompt + completion")
    p.add_argument("--reward-weights", nargs="+", type=float, default=None, help="one weight per --reward (default 1)")
    p.add_argument("--eval-data", nargs="+", help="held-out prompts: the mean reward of one greedy completion each "
                                                   "is logged at the start, every --eval-every steps and at the end")
    p.add_argument("--num-generations", type=int, default=num_generations,
                   help=f"completions sampled per prompt (default {num_generations})")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                   help=f"tokens per completion at most (default {max_new_tokens})")
    p.add_argument("--max-prompt-len", type=int, default=512, help="longest prompt in tokens (default 512)")
    p.add_argument("--temperature", type=float, default=temperature, help=f"sampling temperature (default {temperature:g})")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=4, help="prompts per step (each with --num-generations completions)")


def register(subparsers) -> None:
    p = subparsers.add_parser("grpo", help="reinforcement learning from reward functions (GRPO) from an APR file")
    add_sampling_options(p, num_generations=8, max_new_tokens=256, temperature=1.0)
    p.add_argument("--loss-type", choices=LOSS_TYPES, default="dapo",
                   help="normalisation of the objective, as TRL's: dapo (over the step's completion tokens), grpo "
                        "(per completion), dr_grpo (by max_new_tokens)")
    p.add_argument("--scale-rewards", choices=SCALES, default="group",
                   help="advantages divided by the group's reward std (group), the step's (batch) or not (none)")
    p.add_argument("--beta", type=float, default=0.0,
                   help="weight of the per-token KL penalty to the reference model (the model as loaded; with LoRA "
                        "the frozen base), TRL's beta (default 0: no penalty, no reference pass)")
    p.add_argument("--num-iterations", type=int, default=1,
                   help="updates per generation batch, TRL's num_iterations (PPO's clipped ratio to the generating "
                        "policy; default 1)")
    p.add_argument("--epsilon", type=float, default=0.2, help="PPO clipping range of the ratio (default 0.2)")
    p.add_argument("--epsilon-high", type=float, default=None,
                   help="upper clipping range (DAPO's clip-higher; default --epsilon)")
    p.add_argument("--importance-sampling-level", choices=IMPORTANCE_LEVELS, default="token",
                   help="PPO's ratio per token (GRPO) or per completion, the geometric mean of its tokens' "
                        "(sequence: GSPO, which wants a small --epsilon such as 3e-4 / --epsilon-high 4e-4)")
    p.add_argument("--mask-truncated-completions", action="store_true",
                   help="leave completions cut at --max-new-tokens (no stop token) out of the loss (TRL's option; "
                        "they still count in the advantages and the normalisation)")
    p.add_argument("--teacher", help="on-policy distillation: APR model (the same tokenizer) whose log-probability "
                                     "of each sampled token, minus the policy's, is added to that token's advantage "
                                     "(the reverse KL as a per-token reward); --reward becomes optional")
    p.add_argument("--teacher-coef", type=float, default=None, help="weight of the teacher term (default 1)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="completions per training forward (default: all of a rank's completions of the step)")
    add_options(p, command="grpo", lr=1e-6, lr_help="peak learning rate (default 1e-6; LoRA wants ~1e-5)")
    p.set_defaults(func=cmd_grpo)
