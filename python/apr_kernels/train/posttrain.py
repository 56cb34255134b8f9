"""What the post-training commands (``dpo`` in ``preference.py``, ``grpo`` in ``grpo.py``) share.

* ``StepLoop``: the loop of a trainer that owns ``model``, ``cfg``, ``optimizer``, ``batches`` (the
  data position), ``step`` and ``log``: held-out evaluation at the start of a fresh run, every
  ``cfg.eval_every`` steps and at the end, step checkpoints every ``cfg.save_every`` steps, autocast
  by ``cfg.precision``. ``checkpoint.save_checkpoint`` / ``restore_training_state`` read the same
  attributes, so these runs resume exactly like ``train``.
* ``add_options``: the command-line options they have in common (optimiser, LoRA, precision,
  kernels, checkpoints, torchrun, logging), with ``train``'s meaning.
* ``run_command``: ``--resume auto``, then the process group (``distributed.run``).
* ``load_model``: ``from_apr`` for this rank (sharded under FSDP).
* ``train_and_save``: run, writing ``step_NNNNNN.apr`` (pruned by ``--keep-last``) and the final
  ``model.apr`` (LoRA adapters merged), rank 0 writing, every rank waiting.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import time
from pathlib import Path

import torch

from .data import BatchStream, split_targets
from .loop import EvalWatch, RouterMeasures, TrainConfig, autocast_dtype_for, make_optimizer


# ------------------------------------------------------------------ sequence log-likelihoods
def padded(seqs: list[list[int]], eos_id: int) -> torch.Tensor:
    """Rows ``[N, L]`` of the sequences, right-padded with non-target end-of-text ids."""
    width = max(len(s) for s in seqs)
    rows = torch.full((len(seqs), width), -1 - eos_id, dtype=torch.int64)
    for i, s in enumerate(seqs):
        rows[i, : len(s)] = torch.tensor(s)
    return rows


def padded_inputs(seqs: list[list[int]], eos_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, y, lengths)`` on ``device``: the inputs and targets of the ``padded`` rows (``split_targets``)
    and each row's inputs before its padding (``len - 1``: the tokens a packed row would hold, which
    a mixture-of-experts model's routing statistics count; ``Transformer.forward``)."""
    x, y = split_targets(padded(seqs, eos_id))
    return x.to(device), y.to(device), torch.tensor([len(s) - 1 for s in seqs]).to(device)


def packed(seqs: list[list[int]]):
    """``(x, y, documents)``: the sequences' inputs and targets back to back in one row ``[1, T]``,
    each sequence a document of its own (no padding: ``T`` is the sum of their lengths - 1)."""
    from apr_kernels.model.documents import Documents

    parts = [split_targets(torch.tensor([s])) for s in seqs]
    lengths = torch.tensor([len(s) - 1 for s in seqs])
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
    return (torch.cat([x for x, _ in parts], 1), torch.cat([y for _, y in parts], 1),
            Documents(cu, int(lengths.max())))


def sequence_logps(model, seqs: list[list[int]], device, *, eos_id: int, padding_free: bool = False) -> torch.Tensor:
    """Sum of the target tokens' log-probabilities of each of the marked id lists ``seqs`` (fp32 ``[N]``):
    right-padded rows, or with ``padding_free`` one packed row with each sequence a document (the
    packed-sequence attention kernel on the fast path: no compute on padding). ``model``: the
    ``Transformer``, or its ``distributed.Parallel`` (the loss runs through DDP/FSDP)."""
    if padding_free:
        x, y, docs = packed(seqs)
        return -model.loss(x.to(device), y.to(device), reduction="sequence", documents=docs.to(device)).float()
    x, y, lengths = padded_inputs(seqs, eos_id, device)
    return -model.loss(x, y, reduction="sequence", lengths=lengths).float()


def token_logps(model, seqs: list[list[int]], device, *, eos_id: int, padding_free: bool = False) -> torch.Tensor:
    """The log-probability of every target token of the marked id lists ``seqs``, all sequences' back
    to back in order (fp32 ``[targets]``; the same in both layouts of ``sequence_logps``): for
    objectives that weight each token after the forward (GRPO's clipped ratio and KL penalty)."""
    if padding_free:
        x, y, docs = packed(seqs)
        per = model.loss(x.to(device), y.to(device), reduction="none", documents=docs.to(device))
    else:
        x, y, lengths = padded_inputs(seqs, eos_id, "cpu")
        per = model.loss(x.to(device), y.to(device), reduction="none", lengths=lengths.to(device))
    where = (y.flatten() != -100).nonzero().squeeze(1).to(device)  # (found on the host: no sync)
    return -per.float().flatten()[where]



class StepLoop(EvalWatch):
    """Base of ``PreferenceTrainer`` and ``GRPOTrainer`` (module docstring). Subclasses define
    ``train_step() -> dict`` and, when ``has_eval``, ``evaluate() -> dict`` (with ``eval_loss``, or
    the ``best_metric`` they name, for ``--save-best`` / ``--early-stopping-patience``)."""

    last_eval = None  # (checkpoint.save_checkpoint reads it; these runs log their evaluations instead)
    has_eval = False

    def _setup(self, command: str, model, cfg: TrainConfig, *, device, parallel, padding_free, log, n_data: int,
               what: str) -> None:
        """The state every such trainer has: ``model``, ``cfg``, ``parallel`` and ``world``, ``device``,
        ``padding_free``, autocast, ``log``, the AdamW ``optimizer``, ``batches`` over ``n_data`` items
        (``what`` per rank in errors) and ``step``."""
        self.model, self.cfg, self.parallel = model, cfg, parallel
        # the ranks taking different items (a tensor-parallel group's ranks share theirs)
        self.world = parallel.data_ranks if parallel is not None else 1
        if cfg.batch_size % self.world:
            raise ValueError(f"{command}: --batch-size {cfg.batch_size} is not a multiple of the "
                             f"{self.world} data-parallel ranks; expected an equal share of {what} per rank")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        # padding-free batches (one packed row per micro-batch): where the packed-sequence kernel runs;
        # eager attention would mask a [T, T] square of the whole row instead, more work than padding
        if padding_free is None:
            padding_free = model.use_fast(torch.empty(0, device=self.device))
        self.padding_free = padding_free
        self.autocast_dtype = autocast_dtype_for(cfg.precision, self.device)
        if self.autocast_dtype == torch.float16:
            raise ValueError(f"{command}: fp16 (loss scaling) is not supported; use --precision bf16 or fp32")
        self.log = log or (lambda *a: None)
        self.optimizer = make_optimizer(model, cfg)
        self.batches = BatchStream(n_data, seed=cfg.seed)
        self.step = 0
        # a mixture-of-experts policy: its balance terms in the objective, its measures in the logs
        self.router = RouterMeasures.of(model, self.device, parallel)
        # --qat: each step, from _start_step to the optimizer step, on the quantised weights (qat.py)
        self._quantizer, self._quantised = None, None
        if cfg.qat:
            from .qat import FakeQuantizer

            self._quantizer = FakeQuantizer(model, cfg.qat)

    def _balance(self, forwards: int):
        """This rank's share of the step's mixture-of-experts balance terms, from the policy's last
        forward (``Transformer.last_balance_loss``, which a "sequence" or "none" loss leaves out): a
        mean over the step's ``forwards`` policy forwards and over the ranks, to add to the objective
        before its world-size scaling (as TRL's trainers add the model's ``aux_loss`` per forward).
        0 for a dense model; the forward's measures are counted for the logs."""
        if self.router is None:
            return 0.0
        self.router.add()
        term = self.model.last_balance_loss
        return 0.0 if term is None else term / (forwards * self.world)

    def _router_logs(self) -> tuple[dict, float]:
        """(the step's mixture-of-experts measures for its record, the balance terms its objective held:
        0 for a dense model); every rank calls it (an all-reduce)."""
        if self.router is None:
            return {}, 0.0
        means = self.router.means(self.parallel)
        return {k: float(v) for k, v in means.items()}, self.router.balance(means)

    def _batch_logps(self, items) -> torch.Tensor:
        """``[N, k]`` log-likelihoods of the ``k`` marked sequences of each item (a DPO pair: chosen,
        rejected) through the model (its DDP/FSDP wrapper); needs ``eos`` (padding)."""
        seqs = [s for item in items for s in item]
        with self._autocast():
            return sequence_logps(self.parallel or self.model, seqs, self.device, eos_id=self.eos,
                                  padding_free=self.padding_free).view(len(items), -1)

    def _batch_values(self, items) -> torch.Tensor:
        """``[N, k]`` per-item values ``_logps`` gathers: log-likelihoods here (a reward model's
        trainer gives its rewards)."""
        return self._batch_logps(items)

    @torch.no_grad()
    def _logps(self, items) -> torch.Tensor:
        """``_batch_values`` of all ``items`` on every rank (CPU), each rank computing a contiguous share
        (every rank runs as many forwards, padding with a repeated item: FSDP's are collectives)."""
        was = self.model.training
        self.model.eval()
        rank = self.parallel.data_rank if self.parallel is not None else 0
        per = -(-len(items) // self.world)
        mine = items[rank * per:(rank + 1) * per]
        size = self.cfg.eval_batch_size
        parts = [self._batch_values(mine[i: i + size] or items[:1]) for i in range(0, max(per, 1), size)]
        local = torch.cat(parts)[: len(mine)]
        self.model.train(was)
        if self.parallel is not None:
            self.parallel.reshard()
        if self.world == 1:
            return local.cpu()
        import torch.distributed as dist

        box = torch.zeros(per, local.shape[1], device=local.device)
        box[: len(local)] = local
        gathered = [torch.empty_like(box) for _ in range(self.parallel.world_size)]
        dist.all_gather(gathered, box)
        share = self.parallel.world_size // self.world  # (one of each tensor-parallel group's equal shares)
        return torch.cat(gathered[::share])[: len(items)].cpu()

    @contextlib.contextmanager
    def _gathered(self, model=None):
        """Whole parameters of ``model`` (default the policy; ``gkd``'s teacher) while sampling: FSDP's
        shards all-gathered (generation calls the layers' parts directly, past FSDP's hooks), sharded
        again after."""
        from torch.distributed.fsdp import FSDPModule

        model = self.model if model is None else model
        if not isinstance(model, FSDPModule):
            yield
            return
        modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        # (the root's lazy initialisation, which its first forward would do: generation may call a
        # sharded module of its own first, the experts of an expert-parallel layer)
        model._get_fsdp_state()._lazy_init()
        for m in modules:
            m.unshard()
        try:
            yield
        finally:
            for m in modules:
                m.reshard()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None)

    def _finish_step(self, sums: torch.Tensor | None = None) -> tuple[torch.Tensor | None, float | None]:
        """End a step: ``sums`` (float64, this rank's totals of its micro-batches) summed over the ranks,
        the gradients clipped to ``cfg.grad_clip``, the optimizer step taken. Returns (the sums, the
        gradient norm before clipping or None without clipping)."""
        self._full_precision()  # (--qat: the optimizer steps the full-precision weights)
        if sums is not None and self.parallel is not None:
            sums = self.parallel.total(sums.to(self.device)).cpu()
        grad_norm = None
        if self.cfg.grad_clip > 0:
            norm = (self.parallel.clip_grad_norm(self.cfg.grad_clip) if self.parallel is not None  # (experts: global)
                    else torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip))
            from .distributed import full_tensor

            grad_norm = float(full_tensor(norm))  # FSDP: a DTensor
        self.optimizer.step()
        self.step += 1
        return sums, grad_norm

    def _start_step(self) -> tuple[float, float]:
        """(learning rate of this step, set on the optimiser; start time)."""
        lr = self.cfg.lr_at_step(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # (LoRA+'s B matrices: a multiple)
        if self._quantizer is not None:  # (until _finish_step: the step's sampling, forwards and backwards)
            self._quantised = self._quantizer.applied()
            self._quantised.__enter__()
        return lr, time.perf_counter()

    def _full_precision(self) -> None:
        """End ``--qat``'s quantised window of this step, if one is open (the full-precision weights back)."""
        if self._quantised is not None:
            window, self._quantised = self._quantised, None
            window.__exit__(None, None, None)

    def run(self, on_checkpoint=None, on_best=None, profile=None) -> list[dict]:
        """Train to ``cfg.steps`` (module docstring); ``on_checkpoint(self)`` every ``cfg.save_every``
        steps before the last; ``on_best(self)`` and early stopping as ``EvalWatch`` says (the final
        checkpoint is the caller's, after an early stop too); ``profile``: a ``loop.StepProfiler``."""
        with profile or contextlib.nullcontext():
            history = self._steps(on_checkpoint, on_best, profile)
        if profile is not None and profile.written:
            self.log("profile", {"step": self.step, "files": [str(p) for p in profile.written]})
        return history

    def _steps(self, on_checkpoint, on_best, profile) -> list[dict]:
        c, history = self.cfg, []

        def evaluate():
            rec = self.evaluate()
            if self._quantizer is not None:  # --qat: the quantised file's measures too (<name>_quantized)
                with self._quantizer.applied():
                    rec.update({f"{k}_quantized": v for k, v in self.evaluate().items() if isinstance(v, float)})
            history.append({"event": "eval", **rec})
            self.log("eval", history[-1])
            self._watch(history[-1], on_best)

        if self.has_eval and self.step == 0:
            evaluate()
        while self.step < c.steps and not self.stopped_early:
            try:
                rec = self.train_step()
            finally:  # (a step that failed midway: its weights are still restored)
                self._full_precision()
            if profile is not None:
                profile.step()
            history.append({"event": "train", **rec})
            if self.step % c.log_every == 0 or self.step == c.steps:
                self.log("train", rec)
            if self.has_eval and (self.step == c.steps or (c.eval_every and self.step % c.eval_every == 0)):
                evaluate()
            if (on_checkpoint and c.save_every and self.step % c.save_every == 0 and self.step < c.steps
                    and not self.stopped_early):
                on_checkpoint(self)
        return history


def jsonl_records(paths, what: str):
    """``(where, record)`` of every non-blank line of the JSON Lines files found at ``paths``
    (``.jsonl``, ``.jsonl.gz``), and of every element of ``.json`` files holding a JSON array of
    objects; ``what`` names the records in errors. ShareGPT's and Alpaca's forms are read as ours
    (``chat.normalised``)."""
    from .chat import normalised
    from .data import find_text_files

    def read(where, record):
        try:
            return where, normalised(record)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    for path in find_text_files(paths):
        if path.name.endswith(".json"):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{path}: not valid JSON ({exc})") from None
            if not (isinstance(data, list) and all(isinstance(r, dict) for r in data)):
                raise ValueError(f"{path}: {what} in a .json file must be a JSON array of objects; got a JSON "
                                 f"{type(data).__name__}")
            for i, record in enumerate(data):
                yield read(f"{path}[{i}]", record)
            continue
        if not path.name.endswith((".jsonl", ".jsonl.gz")):
            raise ValueError(f"{path}: {what} must be JSON Lines (.jsonl, .jsonl.gz) or a JSON array (.json)")
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
                yield read(where, record)


def absolute(paths) -> list[str] | None:
    return [str(Path(p).resolve()) for p in paths] if paths else None


def lora_settings(args) -> dict:
    """``from_apr`` keywords for a fresh run: new adapters from ``--lora-rank/--lora-alpha/--lora-targets``
    (seeded by ``--seed``) or none, and ``--lora-quantized-base`` (the file's quantised projections
    kept as the frozen base, QLoRA-style)."""
    if args.lora_quantized_base and not args.lora_rank:
        raise ValueError("--lora-quantized-base needs --lora-rank R (the adapters that train on the quantised base)")
    if not args.lora_rank:
        return {"lora_init": None}
    if getattr(args, "qat", None):  # (what --qat cannot train, before any weight is read)
        from .qat import check

        check(args.qat, quantized_base=args.lora_quantized_base)
    return {"lora_init": {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": args.lora_targets.split(","),
                          "seed": args.seed, "rslora": args.lora_rslora, "dora": args.lora_dora},
            "keep_quantized": args.lora_quantized_base}


def config_from(args, **fields) -> TrainConfig:
    """The run's ``TrainConfig`` from the shared options, plus the command's own ``fields``."""
    return TrainConfig(steps=args.steps or 100, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                       weight_decay=args.weight_decay, grad_clip=args.grad_clip, eval_every=args.eval_every,
                       save_every=args.save_every, seed=args.seed, precision=args.precision,
                       lora_plus_ratio=args.lora_plus_ratio, save_best=args.save_best,
                       early_stopping_patience=args.early_stopping_patience, freeze=args.freeze,
                       optimizer=args.optimizer, qat=args.qat, **fields)


def fit_epochs(args, cfg: TrainConfig, items: int, what: str) -> TrainConfig:
    """``cfg`` with the steps of ``--epochs`` passes over ``items`` training ``what`` (a fresh run given
    ``--epochs``); ``cfg`` itself otherwise (a resumed run keeps the steps it started with)."""
    return cfg if args.resume else cfg.for_epochs(args.epochs, items, warmup=args.warmup, what=what)


def resumed(args, command: str) -> tuple[dict, TrainConfig]:
    """(the run's ``training.<command>`` settings, its ``TrainConfig``) from ``--resume``'s checkpoint."""
    from .checkpoint import training_metadata

    from .cli import extended

    meta = training_metadata(args.resume)
    settings = meta.get(f"training.{command}")
    if not isinstance(settings, dict):
        raise ValueError(f"{args.resume}: not a checkpoint of a {command} run (no metadata training.{command})")
    return settings, extended(TrainConfig.from_dict(meta["training.config"]), args, meta["training.step"], args.resume)


def held_out(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) indices of ``n`` items: a seeded ``fraction`` held out (at least one, never
    all; none of a single item)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(n - 1, max(1, round(n * fraction))) if n > 1 else 0
    return order[n_eval:], order[:n_eval]


def stored_reference(path, name: str, n: int) -> tuple:
    """The reference log-likelihoods ``(__training__.<name>.ref, .eval_ref or None)`` a step checkpoint
    of the run holds (``reference_state`` wrote them), checked to cover ``n`` training items."""
    import apr_kernels

    from .checkpoint import PREFIX

    with apr_kernels.open(path) as f:
        if f"{PREFIX}{name}.ref" not in f:
            raise ValueError(f"{path}: no reference log-likelihoods ({PREFIX}{name}.ref); expected a "
                             f"step_NNNNNN.apr of the run (its final model.apr is not resumable)")
        ref = (f.get_tensor(f"{PREFIX}{name}.ref").clone(),
               f.get_tensor(f"{PREFIX}{name}.eval_ref").clone() if f"{PREFIX}{name}.eval_ref" in f else None)
    if ref[0].shape[0] != n:
        raise ValueError(f"{path}: reference log-likelihoods for {ref[0].shape[0]} items, the data now has {n}; "
                         f"expected the same data files")
    return ref


def reference_state(name: str):
    """``extra_tensors`` for ``train_and_save``: a trainer's ``ref`` / ``eval_ref`` under ``<name>.``."""
    def tensors(t) -> dict:
        return {f"{name}.ref": t.ref} | ({f"{name}.eval_ref": t.eval_ref} if t.eval_ref is not None else {})

    return tensors


def device_for(args, env, mode: str) -> torch.device:
    """This rank's device under torchrun, else ``--device`` (default: cuda when there is one)."""
    from .cli import pick_device

    return env.device if mode != "none" else pick_device(args.device)


def tokenizer_for(spec, model, source):
    """The run's tokenizer (``spec``, default the one embedded in ``source``), checked to fit the model."""
    from apr_kernels.model.loading import check_tokenizer_vocab

    from .cli import load_tokenizer

    tok = load_tokenizer(spec, model.apr_metadata, source)
    check_tokenizer_vocab(tok.vocab_size, model.config.vocab_size, f"{source}: tokenizer")
    return tok


def parallel_for(model, env, mode: str):
    """The DDP/FSDP wrapper of ``model`` for ``mode`` (None in one process); experts spread when it was
    loaded so (``load_model``)."""
    from . import distributed

    return (distributed.parallelize(model, mode, env, expert_parallel=model.expert_parallel,
                                    tensor_parallel=model.tensor_parallel)
            if mode != "none" else None)


def logger_for(args, env):
    """``--json`` / ``--tensorboard`` / ``--wandb`` logging on rank 0; None on the other ranks (they log
    nothing)."""
    from .loop import Logger, wandb_settings

    return Logger(args.json, tensorboard=args.tensorboard, wandb=wandb_settings(args.wandb, args.out)) \
        if env.is_main else None


def run_command(args, body) -> int:
    """``body(env, mode)`` after ``--resume auto`` is resolved (nothing to do once ``--out`` holds the
    finished run), inside the process group a launcher describes."""
    from . import distributed
    from .cli import resolve_auto_resume

    if not resolve_auto_resume(args):
        return 0
    return distributed.run(args, body)


# --expert-parallel and --tensor-parallel: every post-training command. The sampling ones decode in
# step: a tensor-parallel group's ranks the same prompts (the same sums after each all-reduce, the same
# seeded draws), an expert-parallel group's ranks their own prompts until all of them are done
# (model/generate.py)
EXPERT_PARALLEL_COMMANDS = ("dpo", "kto", "reward", "grpo", "rloo", "online-dpo", "gkd")
TENSOR_PARALLEL_COMMANDS = EXPERT_PARALLEL_COMMANDS


def expert_group(args, env, mode: str):
    """``--expert-parallel N``'s group of this rank (made once per run, on every rank alike), or None."""
    n = getattr(args, "expert_parallel", 1)
    if n == 1:
        return None
    if getattr(args, "_expert_group", None) is None:
        from . import expert_parallel

        expert_parallel.check(n, mode, fsdp_shard=env.fsdp_shard)
        # (with --tensor-parallel N, each group takes one tensor-parallel rank of N-rank groups)
        args._expert_group = expert_parallel.groups(env.world_size, n, env.rank,
                                                    stride=getattr(args, "tensor_parallel", 1))
    return args._expert_group


def tensor_group(args, env, mode: str):
    """``--tensor-parallel N``'s group of this rank (made once per run, on every rank alike), or None."""
    n = getattr(args, "tensor_parallel", 1)
    if n == 1:
        return None
    if getattr(args, "_tensor_group", None) is None:
        from . import tensor_parallel

        tensor_parallel.check(n, mode, fsdp_shard=env.fsdp_shard, expert_parallel=getattr(args, "expert_parallel", 1))
        args._tensor_group = tensor_parallel.groups(env.world_size, n, env.rank)
    return args._tensor_group


def load_model(source, env, mode: str, device, args, *, trained: bool = True, **lora):
    """``from_apr(source, **lora)`` for this rank: sharded on the meta device under FSDP (adapters
    added before sharding; with ``--expert-parallel`` only this rank's experts), a replica otherwise;
    ``--fast`` and ``--grad-checkpointing`` as given; ``--fsdp-reshard-after-forward`` for the
    ``trained`` model (a frozen one has no backward to keep its gathered parameters for)."""
    from .cli import fsdp_reshard_after_forward, tristate

    reshard = not trained or fsdp_reshard_after_forward(args, mode)  # (the trained model's load checked the option)
    if mode != "none":
        from . import distributed

        model = distributed.from_apr(source, env, mode, fast=tristate(args.fast), **lora,
                                     expert_parallel=expert_group(args, env, mode),
                                     tensor_parallel=tensor_group(args, env, mode), reshard_after_forward=reshard)
    else:
        from apr_kernels.model.loading import from_apr

        model = from_apr(source, device=device, fast=tristate(args.fast), **lora)
    model.gradient_checkpointing = getattr(args, "grad_checkpointing", None) or False
    return model


def settings_and_model(args, env, mode: str, device, command: str, fresh, **model_kwargs):
    """(the run's ``training.<command>`` settings, its ``TrainConfig``, the model): from ``--resume``'s
    checkpoint (its adapters and quantised base kept), else ``fresh() -> (settings, cfg)`` (which checks
    the options first) and ``--init`` with the new adapters of ``--lora-*``. ``model_kwargs``: more
    ``from_apr`` keywords (a reward model's ``num_labels``)."""
    if args.resume:  # everything but the device and the output folder comes from the checkpoint
        settings, cfg = resumed(args, command)
        return settings, cfg, frozen(load_model(args.resume, env, mode, device, args, lora="keep",
                                                keep_quantized=True, **model_kwargs), cfg)
    settings, cfg = fresh()
    return settings, cfg, frozen(load_model(args.init, env, mode, device, args, **lora_settings(args),
                                            **model_kwargs), cfg)


def frozen(model, cfg: TrainConfig):
    """``model`` with ``cfg.freeze``'s parameters frozen (``loop.freeze_parameters``)."""
    from .loop import freeze_parameters

    freeze_parameters(model, cfg.freeze)
    return model


def start_fields(trainer, device) -> dict:
    """What every post-training run's ``start`` line reports besides its own settings (also
    ``cli.frozen_fields`` of a distillation teacher, a reference model and each reward model,
    ``reward_<name>``)."""
    from .cli import frozen_fields
    from .distributed import fsdp_fields
    from .grpo import RewardModel

    model = trainer.model
    held = {name: m for name in ("teacher", "reference") if (m := getattr(trainer, name, None)) is not None}
    held.update({f"reward_{name}": fn.model for name, fn in (getattr(trainer, "rewards", None) or {}).items()
                 if isinstance(fn, RewardModel)})
    c = trainer.cfg
    world = trainer.parallel.world_size if trainer.parallel is not None else 1
    return {"step": trainer.step, "steps": c.steps, "world": world, "device": str(device),
            "epochs": round(c.steps * c.batch_size * c.grad_accum / max(1, trainer.batches.n), 3),
            "padding_free": trainer.padding_free,
            **_trained_counts(model, trainer.parallel), **fsdp_fields(model),
            "lora_rank": (getattr(model, "lora", None) or {}).get("rank"), **({"qat": c.qat} if c.qat else {}),
            **{k: v for name, m in held.items() for k, v in frozen_fields(m, name).items()}}


def _trained_counts(model, parallel) -> dict:
    """``trainable`` (the whole model's), and with ``--expert-parallel`` this rank's ``params_rank``."""
    from .expert_parallel import parameter_counts

    counts = parameter_counts(model, parallel.expert if parallel is not None else None,
                              parallel.tensor if parallel is not None else None)
    del counts["params"]
    return counts


def train_and_save(trainer, args, env, parallel, tokenizer, metadata: dict, extra_tensors=None) -> int:
    """Run ``trainer``; ``--out/step_NNNNNN.apr`` every ``--save-every`` steps (with
    ``extra_tensors(trainer)`` as more training state, pruned to ``--keep-last``), then
    ``--out/model.apr`` (adapters merged). Closes the trainer's logger."""
    from . import gathering
    from .async_checkpoint import CheckpointWriter
    from .cli import prune_checkpoints

    c = trainer.cfg
    if getattr(args, "dry_run", False):  # the command logged its start line: stop before the first step
        trainer.log("dry_run", {"step": trainer.step, "steps": c.steps, "out": str(args.out)})
        if hasattr(trainer.log, "close"):
            trainer.log.close()
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if (c.save_best or c.early_stopping_patience) and not trainer.has_eval:
        raise ValueError("--save-best and --early-stopping-patience follow the held-out evaluation; this run has "
                         "no held-out data (--eval-data)")
    # --async-checkpoint: step checkpoints written in the background (a CPU run's snapshots clone)
    writer = CheckpointWriter.of(args.async_checkpoint, trainer)

    def checkpoint(t, final: bool = False) -> None:
        path = out / ("model.apr" if final else f"step_{t.step:06d}.apr")
        # (an early-stopped run's model.apr says so: --resume auto then sees a finished run)
        meta = {**metadata, **({"training.stopped_early": True} if final and t.stopped_early else {})}
        write, marks = writer.for_step(final)
        gathering.save_checkpoint(path, t, parallel, tokenizer=tokenizer, merge_lora=final, extra_metadata=meta,
                                  extra_tensors=None if final or extra_tensors is None else extra_tensors(t),
                                  write=write)
        t.log("checkpoint", {"step": t.step, "path": str(path), **marks})
        if env.is_main:
            prune_checkpoints(out, args.keep_last, t.log)

    def best(t) -> None:  # --save-best: the model (merged, no optimizer state) of the best eval so far
        path = out / "best.apr"
        gathering.save_checkpoint(path, t, parallel, tokenizer=tokenizer, merge_lora=True, weights_only=True,
                                  extra_metadata=metadata, write=writer.write_now)
        t.log("best", {"step": t.step, t.best_metric: t.best_eval[0], "path": str(path)})

    try:
        from .cli import step_profiler

        trainer.run(on_checkpoint=checkpoint, on_best=best if c.save_best else None,
                    profile=step_profiler(args, env, trainer.model))
        checkpoint(trainer, final=True)  # (after the last background write: its failure is raised here)
    finally:
        writer.join()
        if hasattr(trainer.log, "close"):
            trainer.log.close()
    return 0


def add_options(p, *, command: str, lr: float, lr_help: str) -> None:
    """The options every post-training command takes (``train``'s meaning)."""
    d = TrainConfig()
    p.add_argument("--resume", help=f"a step_NNNNNN.apr of a {command} run: continue exactly where it stopped; "
                                    f"auto: the newest in --out (a fresh start without one, nothing when --out is "
                                    f"finished)")
    p.add_argument("--tokenizer", help="as for train (default: --init's embedded one)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None,
                        help="optimizer steps (default 100); with --resume, a new total to extend the run to")
    length.add_argument("--epochs", type=float, default=None,
                        help="passes over the training data instead of --steps (rounded up to whole steps)")
    p.add_argument("--lr", type=float, default=lr, help=lr_help)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw",
                   help="adamw, or adamw8bit: its moments stored block-wise in 8 bits (a quarter of the optimizer "
                        "memory; under FSDP / --tensor-parallel each rank's rows or part)")
    from .cli import add_freeze_option

    add_freeze_option(p)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    from apr_kernels.convert.recipe import RUN_CHOICES

    p.add_argument("--qat", choices=RUN_CHOICES, default=None, metavar="KIND",
                   help="quantisation-aware training for `convert --quantize KIND` (as train's): each step, its "
                        "sampling included, on the weights as the quantised file will store them")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--grad-checkpointing", nargs="?", const="full", choices=("full", "selective"), default=None,
                   help="recompute each layer's activations in the backward instead of keeping them (less memory): "
                        "full, or selective (the matmul and attention outputs kept)")
    p.add_argument("--padding-free", choices=["auto", "on", "off"], default="auto",
                   help="pack a micro-batch's sequences into one row, each its own document, instead of padding "
                        "them (auto: where the package kernels run)")
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--lora-alpha", type=float, default=None)
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--lora-rslora", action="store_true", help="rank-stabilised LoRA: scale alpha / sqrt(rank)")
    p.add_argument("--lora-dora", action="store_true", help="DoRA: weight rows rescaled to trained magnitudes")
    p.add_argument("--lora-plus-ratio", type=float, default=0.0,
                   help="LoRA+: the adapters' B matrices at this multiple of the learning rate (e.g. 16; 0: off)")
    p.add_argument("--lora-quantized-base", action="store_true",
                   help="keep --init's quantised projections (Q4_K, Q6_K, APR_Q4/Q8) as the frozen base, "
                        "dequantised per GEMM (QLoRA-style; under fsdp each rank keeps 1/N of the blocks, gathered per GEMM)")
    p.add_argument("--save-every", type=int, default=0, help="write a resumable step checkpoint every N steps")
    p.add_argument("--keep-last", type=int, default=0, help="keep only the newest N step checkpoints (0: all)")
    from .cli import add_async_checkpoint_option, add_best_options, add_dry_run_option, add_profile_options

    add_async_checkpoint_option(p)
    add_best_options(p, "held-out value (eval_loss; grpo and online-dpo: eval_reward)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=None)
    p.add_argument("--fast", choices=("auto", "on", "off"), default="auto",
                   help="package kernels (on), eager PyTorch (off), or kernels on CUDA only (auto)")
    p.add_argument("--parallel", choices=["ddp", "fsdp", "none"], default=None,
                   help="under torchrun: ddp (the default with several ranks) or fsdp")
    p.add_argument("--fsdp-shard-size", type=int, default=None, metavar="N",
                   help="with --parallel fsdp: shard within groups of N ranks, replicate across them (HSDP)")
    from .cli import add_fsdp_reshard_option

    add_fsdp_reshard_option(p, pipeline=False)
    if command in EXPERT_PARALLEL_COMMANDS:
        p.add_argument("--expert-parallel", type=int, default=1, metavar="N",
                       help="a mixture-of-experts model's experts spread over groups of N ranks (as train's)")
    if command in TENSOR_PARALLEL_COMMANDS:
        p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                       help="every layer's heads and MLP rows split over groups of N ranks (as train's)")
    p.add_argument("--dist-timeout", type=float, default=600.0,
                   help="seconds a rank waits for the others before failing (default 600)")
    p.add_argument("--out", default=f"runs/{command}")
    p.add_argument("--json", action="store_true", help="log JSON lines")
    p.add_argument("--tensorboard", metavar="DIR", default=None,
                   help="also write the logged values as TensorBoard event files into DIR")
    add_profile_options(p)
    add_dry_run_option(p)
    p.add_argument("--wandb", metavar="PROJECT", default=None,
                   help="also log the values to a Weights & Biases run in PROJECT (named after --out; wandb's "
                        "environment applies, e.g. WANDB_MODE=offline)")
