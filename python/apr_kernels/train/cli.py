"""``apr-kernels train`` / ``tokenize`` / ``demo``, and what every command builds a run from (the
tokenizer, the data, the model, checkpoints' housekeeping, shared options); ``eval`` is in
``evaluation.py``, ``generate`` and ``chat`` in ``generation.py``.

    apr-kernels train --init model.apr --data corpus/ --steps 500 --out runs/ft
    apr-kernels train --preset qwen2_0_5b --tokenizer qwen2 --data corpus/ --out runs/scratch
    apr-kernels train --resume runs/ft/step_000100.apr
    apr-kernels demo
    torchrun --nproc_per_node=8 -m apr_kernels train --init model.apr --data corpus/ --parallel fsdp

Model: ``--init FILE.apr`` (config and weights from the file, after the preflight checks of
``apr_kernels.model.loading``), else ``--preset NAME`` (default ``llama_370m``, fresh weights).
Tokenizer (``--tokenizer``): ``qwen2`` (the Qwen2.5 vocabulary), ``bytes`` (256 bytes + end-of-text),
an APR file whose embedded tokenizer to use, or Hugging Face tokenizer files (a folder, its
``tokenizer.json``, or a SentencePiece ``tokenizer.model``); default: the one embedded in ``--init``,
else qwen2.
Its vocabulary must fit the model's (``--fit-vocab`` sizes a preset's vocabulary to the tokenizer).
Under ``torchrun`` the same command trains data parallel (``--parallel ddp``, the default) or fully
sharded (``--parallel fsdp``); ``--batch-size`` stays the global batch (see ``distributed``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import torch

from .loop import Logger, TrainConfig, Trainer, autocast_dtype_for, freeze_parameters, wandb_settings
from .schedule import SCHEDULES


# ---------------------------------------------------------------------------------- helpers
def load_tokenizer(spec: str | None, init_meta: dict | None = None, init_path: str | None = None):
    """A tokenizer from a CLI spec (see the module docstring)."""
    from apr_kernels.tokenizer import Tokenizer

    if spec is None:
        if init_meta and init_meta.get("tokenizer.vocabulary"):
            return Tokenizer.from_metadata(init_meta, init_path)
        spec = "qwen2"
    if spec == "qwen2":
        return Tokenizer.qwen2()
    if spec == "bytes":
        return byte_tokenizer()
    if os.path.isdir(spec) or os.path.basename(spec) == "tokenizer.json":
        from apr_kernels.convert.hf_tokenizer import read_hf_tokenizer

        folder = spec if os.path.isdir(spec) else os.path.dirname(spec) or "."
        meta = read_hf_tokenizer(folder)
        if meta is None:
            raise ValueError(f"{spec}: --tokenizer folder has no tokenizer.json, vocab.json + merges.txt or "
                             f"tokenizer.model")
        return Tokenizer.from_metadata(meta, spec)
    if spec.endswith(".model") and os.path.isfile(spec):
        from apr_kernels.spm_model import read_spm_model

        return Tokenizer.from_metadata(read_spm_model(spec), spec)
    if os.path.isfile(spec):
        import apr_kernels

        with apr_kernels.open(spec) as f:
            meta = f.metadata
        if not meta.get("tokenizer.vocabulary"):
            raise ValueError(f"{spec}: --tokenizer file has no embedded tokenizer (tokenizer.vocabulary)")
        return Tokenizer.from_metadata(meta, spec)
    raise ValueError(f"--tokenizer {spec!r}: expected 'qwen2', 'bytes', an existing APR file, or Hugging Face "
                     f"tokenizer files (a folder, tokenizer.json or tokenizer.model)")


def byte_tokenizer():
    """256 single-byte tokens plus ``<|endoftext|>`` (id 256): tiny vocabularies for tests."""
    from apr_kernels.tokenizer import Tokenizer

    return Tokenizer.from_ranks({bytes([i]): i for i in range(256)}, {"<|endoftext|>": 256}, eos_id=256)


def pick_device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def keep_freed_memory() -> None:
    """Have glibc reuse freed heap memory instead of returning big blocks to the OS (CLI processes
    on CPU only: it is process-wide).

    A 151k-vocabulary logits tensor is far above glibc's mmap threshold (at most 32 MiB), so by
    default every step gets fresh pages from the kernel and page-faults them in, which on CPU costs
    about as much as the maths. M_MMAP_MAX=0 serves them from the heap; a 1 GiB trim threshold keeps
    freed memory for the next step.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)        # M_MMAP_MAX
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def tristate(value: str) -> bool | None:
    """An auto|on|off choice: None (decide from the device), True or False."""
    return {"auto": None, "on": True, "off": False}[value]


def data_spec(args) -> dict:
    """What data a run reads, from train's (or tokenize's) arguments: stored in checkpoints so
    ``--resume`` reads the same, and the token cache's key depends on it."""
    spec = {"data": [os.path.abspath(p) for p in args.data],
            "eval_data": [os.path.abspath(p) for p in args.eval_data] if args.eval_data else None,
            "eval_fraction": args.eval_fraction, "max_tokens": args.max_tokens, "text_field": args.text_field}
    if getattr(args, "data_weights", None):  # a mixture: each path a source (train/mixture.py)
        if len(args.data_weights) != len(args.data):
            raise ValueError(f"--data-weights: {len(args.data_weights)} weight(s) for {len(args.data)} --data "
                             f"path(s); expected one weight per path")
        spec["weights"] = list(args.data_weights)
    return spec


FINETUNE_LR = 5e-5  # aprender's `pretrain --init` (finetune mode) default, and Hugging Face Trainer's


def default_lr(args) -> float:
    """``--lr``, else ``FINETUNE_LR`` when every weight of an ``--init`` model trains (a pretrained
    model forgets at a from-scratch rate), else ``TrainConfig.lr`` (from scratch; LoRA's new adapters)."""
    if args.lr is not None:
        return args.lr
    return FINETUNE_LR if args.init and not args.lora_rank else TrainConfig.lr


def load_data(spec: dict, tokenizer, seq_len: int, eval_tokens: int, *, cache_dir=None, log=None,
              packing: str = "stream"):
    """(train_tokens, eval_tokens) from a data spec (also stored in checkpoints for --resume), through
    the token cache in ``cache_dir`` unless it is None; ``packing`` "records": each laid out by
    ``data.pack_records`` (before the held-out split, so it takes whole rows)."""
    from .data import (TEXT_FIELD, cached_tokens, find_text_files, num_sequences, pack_records, split_holdout,
                       token_stream)

    field = spec.get("text_field") or TEXT_FIELD

    def tokens_of(paths, max_tokens):
        files = find_text_files(paths)
        if cache_dir is None:
            return token_stream(files, tokenizer, max_tokens=max_tokens, text_field=field, log=log)
        return cached_tokens(files, tokenizer, max_tokens=max_tokens, cache_dir=cache_dir, log=log,
                             text_field=field)

    def packed(tokens):
        return pack_records(tokens, seq_len, packing_eos(tokenizer)) if packing == "records" else tokens

    held_out = spec.get("eval_data")
    if spec.get("weights"):  # a mixture: one stream per source, held out from each by its weight
        from .mixture import Mixture

        weights, paths = spec["weights"], spec["data"]
        streams, tails = [], []
        for path, w in zip(paths, weights):
            tokens = packed(tokens_of([path], spec.get("max_tokens")))
            if not held_out:
                n_eval = max(1, round(eval_tokens // seq_len * w / sum(weights)))
                tokens, tail = split_holdout(tokens, seq_len, spec.get("eval_fraction", 0.05), n_eval, where=path)
                tails.append(tail)
            streams.append(tokens)
        mixture = Mixture(streams, weights, seq_len, paths)
        if held_out:
            held = packed(tokens_of(held_out, eval_tokens + 1))
        else:  # the tails back to back, each cut to whole sequences (the last keeps its target)
            parts = [t[: num_sequences(t.numel(), seq_len) * seq_len] for t in tails[:-1]] + [tails[-1]]
            held = torch.cat(parts)
            # where each source's held-out sequences lie in it (per-source eval losses)
            bounds = torch.tensor([0] + [p.numel() for p in parts]).cumsum(0).tolist()
            mixture.held_sources = [(name, a, b) for name, a, b in zip(source_names(paths), bounds, bounds[1:])]
        return mixture, held
    tokens = packed(tokens_of(spec["data"], spec.get("max_tokens")))
    if held_out:
        return tokens, packed(tokens_of(held_out, eval_tokens + 1))
    return split_holdout(tokens, seq_len, spec.get("eval_fraction", 0.05),
                         max(1, eval_tokens // seq_len), where=", ".join(spec["data"]))


def packing_eos(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        raise ValueError("--packing records needs the tokenizer's end-of-text id (it ends each document and pads "
                         "the sequences); this tokenizer has none")
    return eos


def build_model(args, tokenizer_spec, *, device=None, load=None):
    """(model, tokenizer) for train: from --init (preflight first) or a preset.

    ``device`` overrides --device (a rank's GPU); ``load(path, device, fast)`` replaces ``from_apr``
    (the sharded loader under FSDP).
    """
    from apr_kernels.model import DEFAULT_PRESET, Transformer, pad_vocab, preset
    from apr_kernels.model.loading import check_tokenizer_vocab, from_apr, plan

    device, fast = device or pick_device(args.device), tristate(args.fast)
    load = load or (lambda path, dev, fst: from_apr(path, device=dev, fast=fst))
    if args.init:
        if args.preset:
            raise ValueError("--init and --preset both given; the init file defines the model")
        p = plan(args.init)  # every metadata/shape check before any weight is read
        tok = load_tokenizer(tokenizer_spec, p.metadata, args.init)
        check_tokenizer_vocab(tok.vocab_size, p.config.vocab_size, f"{args.init}: tokenizer")
        return load(args.init, device, fast), tok
    tok = load_tokenizer(tokenizer_spec)
    cfg = preset(args.preset or DEFAULT_PRESET)
    if args.fit_vocab:
        cfg = cfg.replace(vocab_size=pad_vocab(tok.vocab_size), head_dim=cfg.head_dim)
    check_tokenizer_vocab(tok.vocab_size, cfg.vocab_size,
                          f"preset {args.preset or DEFAULT_PRESET!r} (pass --fit-vocab to size it)")
    torch.manual_seed(args.seed)
    return Transformer(cfg, fast=fast).to(device), tok


# ------------------------------------------------------------------------------------ train
def _settings_of(args) -> dict:
    """The distillation and Muon settings given, each refused without the option it tunes."""
    needs = {"kd_ratio": ("teacher", "--teacher"), "kd_temperature": ("teacher", "--teacher"),
             "kd_beta": ("teacher", "--teacher"),
             "muon_momentum": ("optimizer", "--optimizer muon")}
    out = {}
    for key, (option, spelled) in needs.items():
        value = getattr(args, key)
        if value is None:
            continue
        if not getattr(args, option) or (option == "optimizer" and args.optimizer != "muon"):
            raise ValueError(f"--{key.replace('_', '-')} {value} needs {spelled}")
        out[key] = value
    return out


def load_teacher(path: str, precision: str, tokenizer, device, fast, *, env=None, mode: str = "none", mesh=None,
                 tensor=None, last_stage: bool = False):
    """The frozen teacher of a distillation run (``train --teacher``, ``gkd``, ``grpo --teacher``), on
    ``device``, in bf16 where the run computes in bf16 (``precision``); its tokenizer must be the run's
    (the two models' next-token distributions are compared id by id). Each rank holds a whole copy,
    or under ``--parallel fsdp`` (``mode``, ``env``) its shards, as the student's: every decoder
    layer and the root (embedding, final norm, head) sharded over the ranks (HSDP: over the shard
    group), each gathered for the teacher's forward (the ranks ask it alike: the same number of
    micro-batches), so a teacher too big for one device fits N of them. ``last_stage``: only a
    pipeline's last stage's ranks load it (they alone run it), under FSDP sharded over ``mesh``, that
    stage's. ``tensor``: the
    student's ``TensorParallel`` under DDP: the teacher's layers split over the same group (each rank
    its heads and MLP rows; the group runs it on the same rows), its embedding and head whole (the
    loss takes each rank's columns of them), reading whole rows (no sequence parallelism); whole
    when the group does not divide its heads or MLP."""
    from apr_kernels.model.loading import check_tokenizer_vocab, from_apr, plan

    p = plan(path)  # preflight: a decoder-only model with every tensor in place
    if not p.metadata.get("tokenizer.vocabulary"):
        raise ValueError(f"--teacher {path}: no embedded tokenizer (tokenizer.vocabulary); expected the "
                         f"student's tokenizer in the file (apr-kernels convert embeds it)")
    teacher_tok = load_tokenizer(None, p.metadata, path)
    check_tokenizer_vocab(teacher_tok.vocab_size, p.config.vocab_size, f"--teacher {path}: tokenizer")
    if teacher_tok.fingerprint() != tokenizer.fingerprint():
        raise ValueError(f"--teacher {path}: its tokenizer ({teacher_tok.vocab_size} tokens) is not the "
                         f"student's ({tokenizer.vocab_size} tokens); distillation compares the two models' "
                         f"next-token distributions, which needs the same token ids")
    dtype = torch.bfloat16 if autocast_dtype_for(precision, torch.device(device)) == torch.bfloat16 else None
    teacher = None
    if mode == "fsdp":
        from torch.distributed.fsdp import register_fsdp_forward_method

        from . import distributed

        teacher = distributed.from_apr(path, env, "fsdp", fast=fast, dtype=dtype, mesh=mesh,
                                       compute_dtype=autocast_dtype_for(precision, env.device),
                                       everywhere=not last_stage)
        register_fsdp_forward_method(teacher, "hidden_states")  # (what distillation asks of it)
    elif tensor is not None:
        teacher = split_frozen(path, p.config, f"--teacher {path}", env, mode, tensor, fast=fast, dtype=dtype,
                               last_stage=last_stage)
    if teacher is None:
        teacher = from_apr(path, device=device, dtype=dtype, fast=fast)
    return teacher.requires_grad_(False).eval()


def split_frozen(path, config, option: str, env, mode: str, tensor, *, fast, dtype, last_stage: bool = False,
                 **load):
    """A frozen model beside the one trained (a distillation teacher, a reward model) split over the
    student's tensor-parallel group ``tensor`` (``posttrain.tensor_group``) under DDP: its layers'
    projections split as the student's (each rank its heads and MLP rows), its embedding and heads
    whole, reading whole rows (the group's ranks run it on the same rows). None, said once, when the
    group does not divide its heads or MLP (``config``): the caller holds it whole. ``last_stage``:
    only a pipeline's last stage loads it. ``load``: more ``from_apr`` keywords (``num_labels``)."""
    from . import distributed
    from .tensor_parallel import TensorParallel, check_config

    try:
        check_config(config, tensor.size, option)
    except ValueError as exc:
        if env is None or env.is_main or (last_stage and tensor.rank == 0):
            print(f"{exc}: held whole on every rank", file=sys.stderr)
        return None
    split = TensorParallel(tensor.group, tensor.rank, tensor.size, tensor.replicas)  # (whole rows)
    return distributed.from_apr(path, env, mode, fast=fast, dtype=dtype, tensor_parallel=split, vocabulary=False,
                                everywhere=not last_stage, **load)


def frozen_fields(model, name: str = "teacher") -> dict:
    """The start-record fields of a frozen model the run holds beside the one it trains (a
    distillation ``teacher``, a ``reference``): ``<name>_params``, how many of them this rank holds
    (``<name>_params_rank``: all, 1/N of them under FSDP, none off a pipeline's last stage), the
    dtype they are held in and under FSDP ``<name>_fsdp_reshard_after_forward`` (``fsdp_fields``)."""
    from .distributed import fsdp_fields, local_part
    from .expert_parallel import parameter_counts

    if model is None:
        return {f"{name}_params_rank": 0}
    params = list(model.parameters())  # (the whole count: a split teacher's parts as the whole)
    return {f"{name}_params": parameter_counts(model, None, getattr(model, "tensor_parallel", None))["params"],
            f"{name}_params_rank": sum(local_part(p).numel() for p in params),
            f"{name}_dtype": str(params[0].dtype).removeprefix("torch."),
            **{f"{name}_{k}": v for k, v in fsdp_fields(model).items()}}


def source_names(paths) -> list[str]:
    """A short name per --data source for the logs: the file or folder name without suffixes (made
    unique with its position when two agree)."""
    names = [Path(p).name.split(".")[0] or str(i) for i, p in enumerate(paths)]
    return [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]


def sources_eval(held: torch.Tensor, sources: list[tuple[str, int, int]]):
    """``Trainer(extra_eval=)`` for a mixture's held-out tails: ``eval_loss_<source>`` of each source's
    sequences (the slices of ``held`` the pooled ``eval_loss`` also scores, so it is their
    target-weighted mean)."""
    def measure(trainer) -> dict:
        return {f"eval_loss_{name}": trainer.evaluate_tokens(held[a: b + 1])[0] for name, a, b in sources}

    return measure


def choices_eval(paths, tokenizer):
    """``Trainer(extra_eval=)`` for ``train --eval-choices``: lm-evaluation-harness's ``acc`` and
    ``acc_norm`` on the multiple-choice questions of ``paths`` (read once, here), scored by every rank
    alike (FSDP's forwards are collectives) with the run's autocast."""
    from .choices import read_choices, score_choices

    records = read_choices(paths)

    def measure(trainer) -> dict:
        model, pp = trainer.model, getattr(trainer.parallel, "pipeline", None)
        if pp is not None:  # (through the stages, the scores on every rank)
            from .pipeline_parallel import PipelineScorer

            model = PipelineScorer(model, pp)
        with trainer.model.whole_sequences():  # (under context parallelism too: each rank scores all of it)
            res = score_choices(model, records, tokenizer, batch_size=trainer.cfg.eval_batch_size,
                                device=trainer.device, autocast_dtype=trainer.autocast_dtype)
        if trainer.parallel is not None:
            trainer.parallel.reshard()
        return {"eval_acc": res["acc"], "eval_acc_norm": res["acc_norm"], "eval_questions": res["questions"]}

    return measure


def run_training(model, tokenizer, train_tokens, eval_tokens, cfg: TrainConfig, out: Path, *,
                 data_spec: dict, json_lines=False, progress=None, resume_from=None, parallel=None,
                 keep_last: int = 0, tensorboard=None, wandb=None, teacher=None, profile=None, dry_run: bool = False,
                 async_checkpoint: bool = False):
    """Train, checkpointing into ``out`` (``step_<N>.apr`` periodically, ``model.apr`` at the end).

    ``parallel``: DDP/FSDP (``distributed.parallelize``); rank 0 logs and writes the checkpoints.
    ``keep_last``: after each periodic checkpoint keep only the newest ``keep_last`` ``step_*.apr``
    files of ``out`` (0: keep all). ``tensorboard``: a folder for TensorBoard event files, ``wandb``: a
    Weights & Biases run's ``loop.wandb_settings`` (rank 0). ``profile``: a ``loop.StepProfiler``.
    ``dry_run``: everything up to the first step (model, data, optimizer, resume), the start line, no
    training and nothing written.
    ``teacher``: the model to distil from (``load_teacher``).
    ``async_checkpoint``: the periodic checkpoints are written in the background (``async_checkpoint.py``).
    """
    from . import gathering
    from .async_checkpoint import CheckpointWriter
    from .checkpoint import restore_training_state

    main = parallel is None or parallel.is_main
    extras = ([choices_eval(cfg.eval_choices, tokenizer)] if cfg.eval_choices else []) + \
        ([sources_eval(eval_tokens, train_tokens.held_sources)] if getattr(train_tokens, "held_sources", None) else [])
    trainer = Trainer(model, train_tokens, eval_tokens, cfg, parallel=parallel,
                      log=Logger(json_lines, tensorboard=tensorboard, wandb=wandb) if main else (lambda *a: None),
                      eos_id=getattr(tokenizer, "eos_id", None), teacher=teacher,
                      extra_eval=(lambda t: {k: v for e in extras for k, v in e(t).items()}) if extras else None)
    if resume_from:
        restore_training_state(resume_from, trainer)
    if not main:
        progress = False
    if not dry_run:
        out.mkdir(parents=True, exist_ok=True)
    tok_meta = {}

    class _Tok:  # tokenizer.to_metadata() recovers the merges (seconds for 151k tokens): once per run
        def to_metadata(self):
            if not tok_meta:
                tok_meta.update(tokenizer.to_metadata())
            return tok_meta

    writer = CheckpointWriter.of(async_checkpoint, trainer)  # (rank 0 writes)

    def checkpoint(t: Trainer):
        final = t.step == cfg.steps or t.stopped_early
        path = out / ("model.apr" if final else f"step_{t.step:06d}.apr")
        # a LoRA run's final model is written merged: a plain model for every reader. Parallel:
        # gathered, written by rank 0, every rank waits. An early-stopped run's model.apr says so
        # (--resume auto then sees a finished run).
        meta = {"training.data_spec": data_spec, **({"training.stopped_early": True} if t.stopped_early else {})}
        write, marks = writer.for_step(final)
        gathering.save_checkpoint(path, t, parallel, tokenizer=_Tok(), extra_metadata=meta, merge_lora=final,
                                  write=write)
        t.log("checkpoint", {"step": t.step, "path": str(path), **marks})
        if main:
            prune_checkpoints(out, keep_last, t.log)

    def best(t: Trainer):  # --save-best: the model (merged, no optimizer state) of the best eval so far
        path = out / "best.apr"
        gathering.save_checkpoint(path, t, parallel, tokenizer=_Tok(), merge_lora=True, weights_only=True,
                                  extra_metadata={"training.data_spec": data_spec}, write=writer.write_now)
        t.log("best", {"step": t.step, "eval_loss": t.best_eval[0], "path": str(path)})

    try:
        if dry_run:
            trainer.log("start", trainer.summary())
            trainer.log("dry_run", {"step": trainer.step, "steps": cfg.steps, "out": str(out)})
        else:
            trainer.run(on_checkpoint=checkpoint, progress=progress, on_best=best if cfg.save_best else None,
                        profile=profile)
            failed = None
            try:  # (a run that stops before its last step ends with a periodic checkpoint in flight)
                writer.wait()
            except RuntimeError as exc:
                failed = exc
            if parallel is not None:
                from .distributed import _raise_together

                _raise_together(parallel.env, failed, "the last checkpoint write")
            elif failed is not None:
                raise failed
    finally:
        writer.join()  # (a failed run still leaves its last checkpoint whole, or not at all)
        if main:
            trainer.log.close()
    return trainer


def step_checkpoints(out: Path) -> list[Path]:
    """The periodic checkpoints (``step_NNNNNN.apr``) in ``out``, oldest step first."""
    import re

    found = sorted((int(m.group(1)), p) for p in Path(out).glob("step_*.apr")
                   if (m := re.fullmatch(r"step_(\d{6,})\.apr", p.name)))
    return [p for _, p in found]


def prune_checkpoints(out: Path, keep: int, log=None) -> list[Path]:
    """Delete all but the newest ``keep`` periodic checkpoints (``step_NNNNNN.apr``) in ``out`` (none
    when ``keep`` is 0); return the deleted paths, each also logged as ``checkpoint_removed`` through
    ``log``. ``model.apr`` and other files are never touched."""
    steps = step_checkpoints(out)
    doomed = steps[:-keep] if keep > 0 else []
    for p in doomed:
        p.unlink(missing_ok=True)
        if log is not None:
            log("checkpoint_removed", {"path": str(p)})
    return doomed


def resolve_auto_resume(args) -> bool:
    """``--resume auto``: the newest ``step_*.apr`` of ``--out`` (None when there is none: a fresh start
    from --init / --preset). Returns False when ``--out`` already holds the finished run's model.apr
    (nothing left to train)."""
    import apr_kernels

    if args.resume != "auto":
        return True
    out = Path(args.out)
    final = out / "model.apr"
    if final.exists():
        with apr_kernels.open(final) as f:  # (a LoRA run's final file is merged: not resumable, but finished)
            meta = f.metadata
        total = (meta.get("training.config") or {}).get("steps")
        if meta.get("training.stopped_early") or meta.get("training.step") == total:  # (early stopping: finished)
            print(f"--resume auto: {final} is the finished run (step {meta['training.step']}); nothing to do",
                  file=sys.stderr)
            return False
    steps = step_checkpoints(out)
    args.resume = str(steps[-1]) if steps else None
    print(f"--resume auto: {'continuing from ' + args.resume if steps else f'no checkpoint in {out}: starting fresh'}",
          file=sys.stderr)
    return True


def with_chat_template(tok, path):
    """A copy of ``tok`` whose ``tokenizer.chat_template`` is the jinja text of the file ``path``
    (checked to render a conversation before any data is read)."""
    import copy

    from . import chat

    try:
        template = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--chat-template {path}: not a readable text file ({exc})") from None
    out = copy.copy(tok)
    out.extra = dict(getattr(tok, "extra", None) or {}, **{"tokenizer.chat_template": template})
    probe = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    try:
        chat.render(probe, out, f"--chat-template {path}")
    except Exception as exc:  # jinja's errors (syntax, undefined names) and ours: one line naming the file
        raise ValueError(f"--chat-template {path}: does not render a conversation ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return out


def extended(cfg: TrainConfig, args, step: int, path) -> TrainConfig:
    """A resumed run's config: as stored, or with ``--steps N`` a longer run (the learning-rate schedule
    recomputed for N steps, the warmup kept). ``--epochs`` is refused: the data and batch are the run's;
    so are a ``--float8`` or ``--qat`` other than the run's."""
    if getattr(args, "epochs", None) is not None:
        raise ValueError(f"--epochs with --resume {path}: the run's data and batch are fixed; give --steps N (a new "
                         f"total) to extend it")
    for option in ("float8", "qat"):  # (what the run's weights were trained for)
        given, kept = getattr(args, option, None), getattr(cfg, option)
        if given and given != kept:
            raise ValueError(f"--{option} {given} with --resume {path}: the run was trained with --{option} "
                             f"{kept or '(none)'}, which a resumed run keeps")
    if args.steps is None or args.steps == cfg.steps:
        return cfg
    if args.steps <= step:
        raise ValueError(f"--steps {args.steps} with --resume {path}: the checkpoint is at step {step}; expected a "
                         f"new total above it")
    return dataclasses.replace(cfg, steps=args.steps)


def step_profiler(args, env, model):
    """``--profile DIR [--profile-steps N]``: a ``loop.StepProfiler`` for this rank, or None."""
    if not getattr(args, "profile", None):
        return None
    from .loop import StepProfiler

    device = next(model.parameters()).device
    return StepProfiler(args.profile, rank=env.rank, steps=args.profile_steps,
                        cuda=device.type == "cuda")


def add_freeze_option(p) -> None:
    p.add_argument("--freeze", nargs="+", metavar="PATTERN", default=None,
                   help="keep the parameters whose names match these fnmatch patterns frozen, e.g. "
                        "'model.embed_tokens.*' 'model.layers.[0-9].*' (not with LoRA)")


def add_fsdp_reshard_option(p, *, pipeline: bool) -> None:
    """``--fsdp-reshard-after-forward`` (``fsdp_reshard_after_forward`` resolves it); ``pipeline``: the
    command takes ``--pipeline-parallel`` (train), whose default differs."""
    pp = (", under --pipeline-parallel a stage kept gathered through the step (one all-gather a step instead of "
          "two a micro-batch); default: never under --pipeline-parallel (torchtitan's), else always") if pipeline \
        else "; default: always"
    p.add_argument("--fsdp-reshard-after-forward", choices=("default", "always", "never"), default="default",
                   help="with --parallel fsdp: always: a layer's gathered parameters freed after its forward and "
                        "gathered again for its backward (the least memory); never: kept from its forward to its "
                        "backward (one all-gather a layer and micro-batch fewer; the whole unsharded model held "
                        f"at the forward's end){pp}")


def fsdp_reshard_after_forward(args, mode: str) -> bool:
    """``--fsdp-reshard-after-forward`` resolved for ``mode``: whether FSDP frees a layer's gathered
    parameters after its forward (the default: not under pipeline parallelism, torchtitan's, else yes).
    A choice other than the default is refused without FSDP (nothing is gathered)."""
    option = getattr(args, "fsdp_reshard_after_forward", "default")
    if option != "default" and mode != "fsdp":
        raise ValueError(f"--fsdp-reshard-after-forward {option} with --parallel {mode}: expected --parallel fsdp "
                         f"(the parameters FSDP gathers)")
    return option == "always" or (option == "default" and getattr(args, "pipeline_parallel", 1) == 1)


def add_best_options(p, metric: str) -> None:
    """``--save-best`` and ``--early-stopping-patience`` (``loop.EvalWatch``), following ``metric``."""
    p.add_argument("--save-best", action="store_true",
                   help=f"write best.apr (the model, LoRA merged) at each eval with the best {metric} so far")
    p.add_argument("--early-stopping-patience", type=int, default=0, metavar="N",
                   help=f"end the run (model.apr at that step) after N evals in a row without a better {metric} "
                        f"(needs --eval-every; 0: never)")


def add_async_checkpoint_option(p) -> None:
    p.add_argument("--async-checkpoint", action="store_true",
                   help="write the periodic checkpoints in the background while training goes on (a snapshot "
                        "in host memory first: 12 bytes per parameter with AdamW; rank 0 only)")


def add_dry_run_option(p) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="load the model and data, print the start line (parameters, steps, epochs, ...), and stop "
                        "before the first step; nothing is written")


def add_profile_options(p) -> None:
    p.add_argument("--profile", metavar="DIR", default=None,
                   help="profile a few training steps after the first with torch.profiler: DIR/trace_rank<r>.json "
                        "(Chrome/Perfetto trace) and DIR/summary_rank<r>.txt (ops by self time)")
    p.add_argument("--profile-steps", type=int, default=3, metavar="N", help="steps profiled (default 3)")


def cmd_train(args) -> int:
    """``train``; under torchrun (or with --parallel fsdp) inside a process group, see ``distributed``."""
    from . import distributed

    if not resolve_auto_resume(args):
        return 0
    return distributed.run(args, lambda env, mode: _train(args, env, mode))


def _train(args, env, mode: str) -> int:
    from .checkpoint import training_metadata

    if pick_device(args.device).type == "cpu":
        keep_freed_memory()
    device = env.device if mode != "none" else None  # None: --device
    on_cuda = (device or pick_device(args.device)).type == "cuda"
    # LoRA on a GPU: the frozen base projections in bf16 (half their memory; autocast computes in
    # bf16 anyway), the adapters in fp32. Not under FSDP: sharding already divides that memory, and
    # its mixed-precision all-gathers work per dtype group.
    lora_base = torch.bfloat16 if on_cuda and mode != "fsdp" else None
    lora_new, lora_load = None, {}
    if args.lora_quantized_base and not (args.lora_rank and args.init):
        raise ValueError("--lora-quantized-base needs --lora-rank R and --init FILE.apr (whose projections "
                         "are stored quantised)")
    if args.lora_rank and not args.resume:
        lora_new = {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": args.lora_targets.split(","),
                    "seed": args.seed, "rslora": args.lora_rslora, "dora": args.lora_dora}
        # adapters added while loading: under FSDP (before sharding), tensor parallelism (before the
        # split) and on a quantised base
        if mode == "fsdp" or args.lora_quantized_base or args.tensor_parallel != 1:
            lora_load = {"lora_init": lora_new, "keep_quantized": args.lora_quantized_base,
                         "lora_base_dtype": lora_base}

    ep = None  # expert parallelism: this rank's group (made before loading: it loads only its experts)
    if args.expert_parallel != 1:
        from . import expert_parallel

        expert_parallel.check(args.expert_parallel, mode, fsdp_shard=env.fsdp_shard)
        # (with --tensor-parallel N, each group takes one tensor-parallel rank of N-rank groups)
        ep = expert_parallel.groups(env.world_size, args.expert_parallel, env.rank, stride=args.tensor_parallel,
                                    stages=max(args.pipeline_parallel, 1))
    tp = None  # tensor parallelism: likewise made before loading (each rank reads only its part)
    if args.tensor_parallel != 1:
        from . import tensor_parallel

        tensor_parallel.check(args.tensor_parallel, mode, fsdp_shard=env.fsdp_shard,
                              expert_parallel=args.expert_parallel,
                              compiled_selective=bool(args.compile) and args.grad_checkpointing == "selective")
        tp = tensor_parallel.groups(env.world_size, args.tensor_parallel, env.rank, args.sequence_parallel,
                                    stages=max(args.pipeline_parallel, 1))
    elif args.sequence_parallel:
        raise ValueError("--sequence-parallel splits the positions over a tensor-parallel group; expected "
                         "--tensor-parallel N (N > 1) with it")
    reshard = fsdp_reshard_after_forward(args, mode)
    pp = None  # pipeline parallelism: likewise (each rank allocates and reads only its stage)
    if args.pipeline_parallel != 1:
        from . import pipeline_parallel

        chunks = pipeline_parallel.chunks_for(args.pipeline_schedule, args.pipeline_chunks)
        pipeline_parallel.check(args.pipeline_parallel, world=env.world_size, mode=mode, fsdp_shard=env.fsdp_shard,
                                chunks=chunks, tensor=args.tensor_parallel, context=args.context_parallel,
                                schedule=args.pipeline_schedule, compiled=bool(args.compile),
                                selective=args.grad_checkpointing == "selective",
                                reshard_after_forward=reshard)
        pp = pipeline_parallel.groups(env.world_size, args.pipeline_parallel, env.rank, args.pipeline_schedule, chunks,
                                      tensor=args.tensor_parallel, context=args.context_parallel,
                                      fsdp_shard=env.fsdp_shard, reshard_after_forward=reshard)

    def prepare(m):
        """What a model gets before FSDP shards it (under FSDP on the meta device, while loading):
        ``--float8``'s projections."""
        from . import float8

        if cfg.float8 and not float8.float8_modules(m):  # (once: under FSDP already while loading)
            names = float8.convert(m, cfg.float8, device or pick_device(args.device))
            if env.is_main:
                where = "float8 GEMMs" if (device or pick_device(args.device)).type == "cuda" else "emulated"
                print(f"float8 ({cfg.float8}, {where}): {len(names)} projections", file=sys.stderr)

    def load(path, dev, fast, **lora):
        """from_apr for this run: sharded on the meta device under FSDP (only this rank's experts
        with expert parallelism); ``lora`` (resume) or the new adapters that must exist while loading."""
        if mode != "none":
            from . import distributed

            return distributed.from_apr(path, env, mode, fast=fast, **(lora or lora_load), expert_parallel=ep,
                                        tensor_parallel=tp, pipeline_parallel=pp, reshard_after_forward=reshard,
                                        compute_dtype=autocast_dtype_for(cfg.precision, env.device), prepare=prepare)
        from apr_kernels.model.loading import from_apr

        return from_apr(path, device=dev, fast=fast, **(lora or lora_load))

    if args.resume:
        meta = training_metadata(args.resume)
        if "training.data_spec" not in meta:
            raise ValueError(f"{args.resume}: metadata training.data_spec is missing; expected the data a train run "
                             f"read (train writes it in its checkpoints)")
        spec = meta["training.data_spec"]
        cfg = extended(TrainConfig.from_dict(meta["training.config"]), args, meta["training.step"], args.resume)
        _check_low_precision(cfg, args, device)
        # a LoRA run resumes with its adapters (and its quantised base, if it had one)
        keep = {"lora": "keep", "lora_base_dtype": lora_base, "keep_quantized": True}
        model = load(args.resume, device or pick_device(args.device), tristate(args.fast), **keep)
        tok = load_tokenizer(None, model.apr_metadata, args.resume)
    else:
        if not args.data:
            raise ValueError("train: --data PATH... is required (text files or folders)")
        spec = data_spec(args)
        cfg = TrainConfig(steps=args.steps or TrainConfig.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                          grad_accum=args.grad_accum, lr=default_lr(args), min_lr_ratio=args.min_lr_ratio,
                          lr_schedule=args.lr_schedule, decay_fraction=args.decay_fraction,
                          warmup=args.warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                          eval_every=args.eval_every, eval_tokens=args.eval_tokens,
                          log_every=args.log_every, save_every=args.save_every, seed=args.seed,
                          save_best=args.save_best, early_stopping_patience=args.early_stopping_patience,
                          freeze=args.freeze,
                          document_mask=args.document_mask, packing=args.packing, precision=args.precision,
                          teacher=str(Path(args.teacher).resolve()) if args.teacher else None,
                          optimizer=args.optimizer, label_smoothing=args.label_smoothing, z_loss=args.z_loss,
                          neftune_alpha=args.neftune_alpha, lora_plus_ratio=args.lora_plus_ratio,
                          router_aux_loss_coef=args.router_aux_loss_coef,
                          router_z_loss_coef=args.router_z_loss_coef,
                          activation_offload=args.activation_offload, float8=args.float8, qat=args.qat,
                          eval_choices=[str(Path(c).resolve()) for c in args.eval_choices] if args.eval_choices
                          else None,
                          **_settings_of(args))
        _check_low_precision(cfg, args, device)
        model, tok = build_model(args, args.tokenizer, device=device, load=load)
        if args.chat_template:
            tok = with_chat_template(tok, args.chat_template)
        if lora_new and not getattr(model, "lora", None):  # not added while loading (a preset, or plain LoRA)
            from apr_kernels.model.lora import add_lora

            add_lora(model, base_dtype=lora_base, **lora_new)
    context = {"rope_theta": args.rope_theta, "rope_scaling": args.rope_scaling,
               "max_position_embeddings": args.max_position_embeddings}
    if any(v is not None for v in context.values()):
        if args.resume:
            raise ValueError("--rope-scaling, --rope-theta and --max-position-embeddings set up a new run; a resumed "
                             "run keeps its checkpoint's (they are saved with it)")
        model.config = model.config.with_context(**context, where=str(args.init or "the preset config"))
    model.gradient_checkpointing = args.grad_checkpointing or False
    freeze_parameters(model, cfg.freeze, pp, cfg.optimizer)  # (a resumed run's come from its checkpoint)
    prepare(model)  # (done while loading under FSDP)
    if args.compile:
        compile_layers(model)
    if cfg.seq_len > model.config.max_position_embeddings:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}")
    parallel = None
    cp = args.context_parallel
    if cp != 1:
        if cp < 1 or mode == "none":
            raise ValueError(f"--context-parallel {cp}: expected a group size >= 1, run under torchrun with "
                             f"--parallel ddp or fsdp (each group of {cp} ranks splits every sequence)")
    if mode != "none":
        from . import distributed

        sharing = cp * (args.tensor_parallel if tp else 1) * args.pipeline_parallel
        what = " x ".join(f"--{kind}-parallel {n}" for kind, n in (("context", cp), ("tensor", args.tensor_parallel),
                                                                   ("pipeline", args.pipeline_parallel))
                          if n != 1) or "no sharing"
        data_ranks = env.world_size // sharing if env.world_size % sharing == 0 else env.world_size
        if cfg.batch_size % data_ranks:
            raise ValueError(f"--batch-size {cfg.batch_size} is not a multiple of the {data_ranks} data-parallel "
                             f"ranks (world size {env.world_size}, {what}); expected an equal share of every "
                             f"batch per rank")
        if pp is not None:
            pipeline_parallel.check(pp.size, world=env.world_size, mode=mode, num_layers=model.config.num_layers,
                                    chunks=pp.chunks, micro=cfg.grad_accum, tensor=pp.tensor, context=pp.context,
                                    schedule=pp.schedule)
        parallel = distributed.parallelize(model, mode, env, autocast_dtype_for(cfg.precision, env.device),
                                           context_parallel=cp, expert_parallel=ep, tensor_parallel=tp,
                                           pipeline_parallel=pp, reshard_after_forward=reshard)
    # (a pipeline asks the teacher on its last stage alone: only that stage's ranks load it, under FSDP
    # sharded over the mesh the stage's own parts are sharded on, under DDP split over its
    # tensor-parallel groups)
    teacher = (load_teacher(cfg.teacher, cfg.precision, tok, device or pick_device(args.device), tristate(args.fast),
                            env=env, mode=mode, mesh=pp.fsdp_mesh if pp is not None else None, tensor=tp,
                            last_stage=pp is not None)
               if cfg.teacher and (pp is None or pp.last) else None)
    from .data import default_cache_dir

    cache_dir = None if args.no_token_cache else (args.token_cache or default_cache_dir())
    note = (lambda msg: print(msg, file=sys.stderr)) if env.is_main else None
    # Under torchrun every rank looks the cache up on its own: on a miss the ranks of a machine take
    # turns on the entry's lock file (data.cached_tokens), so one tokenises and the others map its
    # file. No collective here: a long first tokenisation must not run into the process-group timeout.
    train_tokens, eval_tokens = load_data(spec, tok, cfg.seq_len, cfg.eval_tokens, cache_dir=cache_dir, log=note,
                                          packing=cfg.packing)
    if args.epochs is not None and not args.resume:  # (a resumed run keeps the steps it resolved)
        from .data import num_sequences
        from .mixture import Mixture

        n = len(train_tokens) if isinstance(train_tokens, Mixture) else num_sequences(train_tokens.numel(),
                                                                                         cfg.seq_len)
        cfg = cfg.for_epochs(args.epochs, n, warmup=args.warmup, what="training sequences")
    out = Path(args.out)
    trainer = run_training(model, tok, train_tokens, eval_tokens, cfg, out, data_spec=spec,
                           json_lines=args.json, progress=False if args.no_progress else None,
                           resume_from=args.resume, parallel=parallel, keep_last=args.keep_last,
                           tensorboard=args.tensorboard, wandb=wandb_settings(args.wandb, out), teacher=teacher,
                           profile=step_profiler(args, env, model), dry_run=args.dry_run,
                           async_checkpoint=args.async_checkpoint)
    if trainer.last_eval and not args.dry_run:
        loss, n = trainer.last_eval
        trainer.log("done", {"eval_loss": loss, "tokens": n, "checkpoint": str(out / "model.apr")})
    return 0


def _check_low_precision(cfg, args, device) -> None:
    """``--float8``'s and ``--qat``'s preconditions, before any weight is read (train/float8.py, qat.py)."""
    if cfg.qat:
        from . import qat

        qat.check(cfg.qat, quantized_base=args.lora_quantized_base)
    if not cfg.float8:
        return
    from . import float8

    device = device or pick_device(args.device)
    float8.check(cfg.float8, device, lora=bool(args.lora_rank), seq_len=cfg.seq_len)
    if device.type == "cuda" and not args.compile:
        print("warning: --float8 without --compile casts to float8 in separate eager kernels, usually slower "
              "than bf16; add --compile", file=sys.stderr)


# ------------------------------------------------------------------------------------- eval
def cmd_tokenize(args) -> int:
    """``tokenize``: build, ahead of a job, the token cache entries that ``train`` with the same data
    arguments and tokenizer will map instead of tokenising (a login node filling a shared cache)."""
    import time

    from .data import default_cache_dir

    init_meta = None
    if args.init:
        from apr_kernels.model.loading import plan

        init_meta = plan(args.init).metadata
    tok = load_tokenizer(args.tokenizer, init_meta, args.init)
    if args.shards:
        return write_corpus_shards(args, tok)
    spec = data_spec(args)
    cache_dir = Path(args.token_cache) if args.token_cache else default_cache_dir()
    t0 = time.perf_counter()
    train, held = load_data(spec, tok, args.seq_len, args.eval_tokens, cache_dir=cache_dir,
                            log=lambda msg: print(msg, file=sys.stderr))
    n_train = train.n_tokens if hasattr(train, "n_tokens") else train.numel()  # a Mixture, or one stream
    print(f"train_tokens={n_train} eval_tokens={held.numel()} seconds={time.perf_counter() - t0:.1f} "
          f"cache={cache_dir}")
    return 0


def write_corpus_shards(args, tok) -> int:
    """``tokenize --shards DIR``: the --data stream (every token, no held-out split) as aprender's
    pre-tokenised corpus, for its ``apr pretrain`` or this package's ``train --data DIR``."""
    import time

    from .data import find_text_files, token_parts, write_shards

    if args.eval_data or args.data_weights:
        raise ValueError("tokenize --shards writes one corpus (all of --data); expected no --eval-data or "
                         "--data-weights (run it once per corpus)")
    t0 = time.perf_counter()
    parts = token_parts(find_text_files(args.data), tok, max_tokens=args.max_tokens, text_field=args.text_field)
    manifest = {"written_by": "apr-kernels tokenize --shards", "sources": [os.path.abspath(p) for p in args.data],
                "vocab_size": tok.vocab_size, "eos_id": getattr(tok, "eos_id", None),
                "bos_id": getattr(tok, "bos_id", None), "tokenizer": tok.fingerprint()}
    n, paths = write_shards(parts, args.shards, shard_tokens=args.shard_tokens, manifest=manifest)
    print(f"tokens={n} shards={len(paths)} seconds={time.perf_counter() - t0:.1f} out={args.shards}")
    return 0


def compile_layers(model) -> None:
    """torch.compile each decoder layer's ``forward`` (not the module call: DDP/FSDP hooks stay outside
    the compiled code, and parameter names stay Hugging Face's). The package's ops are opaque custom ops
    to the compiler, so it fuses only the glue between them (residual adds, biases, casts). One compiled
    graph serves every layer. ``APR_KERNELS_COMPILE_BACKEND`` names another backend than inductor:
    ``aot_eager_decomp_partition`` traces, decomposes and partitions as inductor does but generates
    no code (a compile bug of inductor's own shows as a difference; the test suite uses it on CPU,
    where inductor builds C++ for seconds a process)."""
    backend = os.environ.get("APR_KERNELS_COMPILE_BACKEND") or "inductor"
    if model.gradient_checkpointing == "selective":
        # under DDP, dynamo's DDPOptimizer splits each layer's graph at gradient-bucket boundaries, and
        # the partitioner then fails on selective checkpointing's tags (torch 2.13: "'>' not supported
        # between NoneType"); a layer's graph is about one bucket anyway, so it is compiled whole
        torch._dynamo.config.optimize_ddp = False
    for layer in model.model.layers:
        layer.forward = torch.compile(layer.forward, backend=backend)


def cmd_demo(args) -> int:
    from .demo import run_demo

    if pick_device(args.device).type == "cpu":
        keep_freed_memory()
    return run_demo(args)


# --------------------------------------------------------------------------------- parsers
def add_common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--fast", choices=("auto", "on", "off"), default="auto",
                   help="package kernels (on), eager PyTorch (off), or kernels on CUDA only (auto)")
    p.add_argument("--json", action="store_true", help="log JSON lines instead of key=value text")


def register(subparsers) -> None:
    d = TrainConfig()
    p = subparsers.add_parser("demo", help="train a small Qwen2-shaped model on Python's stdlib (CPU, about a minute)",
                              description="Train a small Qwen2-shaped model (GQA 7:1, Qwen2.5 tokenizer) on "
                                          "CPython's standard library, save an APR checkpoint, re-evaluate it.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's budget)")
    p.add_argument("--no-progress", action="store_true")
    add_common_options(p)
    p.set_defaults(func=cmd_demo)

    p = subparsers.add_parser("train", help="train or fine-tune a Llama/Qwen2 model; APR checkpoints")
    m = p.add_argument_group("model")
    m.add_argument("--init", help="APR file to initialise from (config, weights, tokenizer)")
    m.add_argument("--preset", help="named config when no --init (default llama_370m)")
    m.add_argument("--resume", help="training checkpoint to continue exactly where it stopped; auto: the newest "
                                    "step_*.apr of --out if there is one, else a fresh start (for preemptible jobs: "
                                    "the same command every time)")
    m.add_argument("--tokenizer", help="qwen2 | bytes | FILE.apr | Hugging Face tokenizer folder, tokenizer.json "
                                       "or tokenizer.model (default: --init's embedded one, else qwen2)")
    m.add_argument("--chat-template", metavar="FILE.jinja",
                   help="render chat records with this jinja template (Hugging Face's chat_template) instead of the "
                        "tokenizer's; checkpoints carry it to generate, chat, eval and the post-training commands")
    m.add_argument("--fit-vocab", action="store_true",
                   help="size a preset's vocabulary to the tokenizer (rounded up to a multiple of 64)")
    g = p.add_argument_group("data")
    g.add_argument("--data", nargs="+", help="text, JSON Lines, Parquet or Arrow files, aprender's pre-tokenised "
                                             ".bin shards (little-endian u32 ids), or folders of them")
    g.add_argument("--data-weights", nargs="+", type=float, metavar="W",
                   help="a mixture: one weight per --data path, each path a source drawn in that proportion "
                        "(repeated or subsampled as needed)")
    g.add_argument("--eval-data", nargs="+", help="held-out text (default: the tail of --data)")
    g.add_argument("--eval-fraction", type=float, default=0.05, help="held-out share of --data")
    g.add_argument("--max-tokens", type=int, default=None, help="read at most this many training tokens")
    g.add_argument("--token-cache", default=None,
                   help="token cache folder (default $APR_KERNELS_CACHE/tokens or ~/.cache/apr-kernels/tokens)")
    g.add_argument("--no-token-cache", action="store_true", help="tokenise every time, write no cache")
    g.add_argument("--text-field", default="text",
                   help="the document field of .jsonl / .jsonl.gz records (default text); other files are "
                        "one document each")
    g.add_argument("--document-mask", action="store_true",
                   help="attend only within each document (documents end at the tokenizer's end-of-text "
                        "id); RoPE positions restart at each document")
    g.add_argument("--packing", choices=["stream", "records"], default="stream",
                   help="stream: documents back to back, cut every --seq-len tokens (pretraining); records: "
                        "each document (a chat or prompt/completion record) whole in one sequence, best-fit, "
                        "padded (fine-tuning: no answer cut from its prompt); add --document-mask")
    k = p.add_argument_group("distillation")
    k.add_argument("--teacher", help="APR model to distil from (the same tokenizer): the loss becomes (1 - "
                                     "--kd-ratio) x cross entropy + --kd-ratio x T^2 KL(teacher || student)")
    k.add_argument("--kd-ratio", type=float, default=None, help=f"weight of the KL term (default {d.kd_ratio})")
    k.add_argument("--kd-temperature", type=float, default=None,
                   help=f"softmax temperature T of both models in the KL term (default {d.kd_temperature:g})")
    k.add_argument("--kd-beta", type=float, default=None,
                   help="the divergence, as TRL's generalized JSD: 0 forward KL(teacher || student) (the default), "
                        "1 reverse KL(student || teacher), between beta KL(p || m) + (1 - beta) KL(q || m), "
                        "m = beta p + (1 - beta) q")
    o = p.add_argument_group("optimisation")
    o.add_argument("--label-smoothing", type=float, default=0.0,
                   help="label smoothing of the training loss, as F.cross_entropy's (default 0; eval stays plain)")
    o.add_argument("--z-loss", type=float, default=0.0,
                   help="add Z x logsumexp(logits)^2 per target to the training loss (PaLM's z-loss, e.g. 1e-4; "
                        "default 0)")
    o.add_argument("--router-aux-loss-coef", type=float, default=None,
                   help="mixture-of-experts models: the weight of the load-balancing loss added to the training "
                        "loss (Switch Transformer's, as Hugging Face's router_aux_loss_coef; default: the "
                        "model's, 0.001 for Qwen2/3-MoE; 0: off)")
    o.add_argument("--router-z-loss-coef", type=float, default=0.0,
                   help="mixture-of-experts models: the weight of the router z-loss, the mean of "
                        "logsumexp(router logits)^2 (ST-MoE's; e.g. 0.001 as OLMoE; default 0: off)")
    o.add_argument("--neftune-alpha", type=float, default=0.0,
                   help="NEFTune: uniform noise of magnitude alpha / sqrt(seq_len x hidden) on the token embeddings "
                        "in training steps (TRL's neftune_noise_alpha, e.g. 5; default 0: off)")
    o.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="autocast precision: auto = bf16 on GPUs that have it, fp16 with loss scaling on older ones "
                        "(V100, T4), fp32 on CPU; weights and optimizer state stay fp32")
    o.add_argument("--optimizer", choices=["adamw", "adamw8bit", "muon"], default=d.optimizer,
                   help="adamw; adamw8bit: AdamW with its moments stored block-wise in 8 bits (a quarter of the "
                        "optimizer memory; under FSDP / --tensor-parallel each rank's rows or part); or muon: Muon on the decoder layers' weight matrices "
                        "and AdamW on the rest (the same --lr)")
    o.add_argument("--muon-momentum", type=float, default=None, help=f"Muon's momentum (default {d.muon_momentum})")
    length = o.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None,
                        help=f"optimizer steps (default {d.steps}); with --resume, a new total to extend the run to")
    length.add_argument("--epochs", type=float, default=None,
                        help="passes over the training sequences instead of --steps (rounded up to whole steps)")
    o.add_argument("--batch-size", type=int, default=d.batch_size)
    o.add_argument("--seq-len", type=int, default=d.seq_len)
    o.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per step")
    o.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default {FINETUNE_LR:g} for full fine-tuning of an --init model, as "
                        f"aprender's pretrain --init and Hugging Face's Trainer; {d.lr:g} from scratch or for "
                        f"LoRA adapters)")
    o.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr / peak lr")
    o.add_argument("--warmup", type=int, default=None, help="warmup steps (default: 10%%, at most 100)")
    o.add_argument("--lr-schedule", choices=SCHEDULES, default=d.lr_schedule,
                   help="after the warmup: cosine (default) or linear decay to --min-lr-ratio, wsd (constant, "
                        "then a linear decay over the last --decay-fraction of the steps), constant")
    o.add_argument("--decay-fraction", type=float, default=d.decay_fraction,
                   help="wsd: share of the steps that decay (default 0.2)")
    o.add_argument("--weight-decay", type=float, default=d.weight_decay)
    add_freeze_option(o)
    o.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max grad norm (0: off)")
    o.add_argument("--seed", type=int, default=d.seed)
    o.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder layer's forward (fuses the glue around the kernels; "
                        "the first steps pay the compile)")
    from apr_kernels.convert.recipe import RUN_CHOICES

    from .float8 import RECIPES

    o.add_argument("--float8", choices=RECIPES, default=None,
                   metavar="RECIPE",
                   help="the decoder layers' projections multiply in float8 (torchao; CUDA compute capability "
                        ">= 8.9, with --compile): tensorwise (fastest), rowwise or rowwise_with_gw_hp scales; "
                        "weights and checkpoints stay in their dtype. Emulated off CUDA")
    o.add_argument("--qat", choices=RUN_CHOICES, default=None, metavar="KIND",
                   help="quantisation-aware training for `convert --quantize KIND` (q4k, q6k, q8, q4, q4km) or, as "
                        "gguf:KIND (gguf:q4km, gguf:q4ks, gguf:q5km, gguf:q5ks, gguf:q6k, gguf:q8_0), for the GGUF file "
                        "`export --quantize KIND` writes: each step's forward and backward see the weights as the "
                        "quantised file will store them")
    o.add_argument("--activation-offload", action="store_true",
                   help="keep the tensors saved for the backward in pinned host memory (less GPU memory, more "
                        "PCIe traffic; torchtune's activation offloading)")
    o.add_argument("--grad-checkpointing", nargs="?", const="full", choices=("full", "selective"), default=None,
                   help="recompute each layer's activations in the backward: full (the default; least memory, "
                        "~1/3 more compute) or selective (the matmul and attention outputs kept, the cheap rest "
                        "recomputed)")
    r = p.add_argument_group("evaluation, logging, checkpoints")
    r.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between evals (0: start/end)")
    r.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="held-out tokens per eval")
    r.add_argument("--eval-choices", nargs="+", metavar="FILE.jsonl",
                   help="multiple-choice questions (as eval --choices) scored at every eval: eval_acc, eval_acc_norm")
    r.add_argument("--log-every", type=int, default=d.log_every)
    r.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints (0: end)")
    r.add_argument("--keep-last", type=int, default=0,
                   help="keep only the newest N periodic step_*.apr checkpoints (0: all)")
    add_async_checkpoint_option(r)
    add_best_options(r, "the eval loss")
    r.add_argument("--out", default="runs/train", help="checkpoint folder (default runs/train)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    lo = p.add_argument_group("LoRA (adapters on a frozen model)")
    lo.add_argument("--lora-rank", type=int, default=0, help="train rank-R adapters only (0: full training)")
    lo.add_argument("--lora-alpha", type=float, default=None, help="adapter scale alpha / rank (default 2 x rank)")
    lo.add_argument("--lora-rslora", action="store_true",
                    help="rank-stabilised LoRA: scale alpha / sqrt(rank) (PEFT's use_rslora)")
    lo.add_argument("--lora-plus-ratio", type=float, default=0.0,
                    help="LoRA+: the adapters' B matrices at this multiple of the learning rate (e.g. 16; 0: off)")
    lo.add_argument("--lora-dora", action="store_true",
                    help="DoRA: each adapted weight row rescaled to a trained magnitude (PEFT's use_dora)")
    lo.add_argument("--lora-quantized-base", action="store_true",
                    help="keep the --init file's quantised projections (Q4_K, Q6_K, APR_Q4, APR_Q8) in their "
                         "blocks as the frozen base, dequantised per GEMM (QLoRA-style; under fsdp each rank keeps 1/N of the blocks, gathered per GEMM)")
    lo.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                    help="comma-separated projections that get adapters (default: all seven)")
    s = p.add_argument_group("scale out (torchrun --nproc_per_node=N -m apr_kernels train ...)")
    s.add_argument("--parallel", choices=("ddp", "fsdp", "none"), default=None,
                   help="ddp: a replica per rank; fsdp: parameters, gradients and AdamW state sharded "
                        "(FSDP2, bf16 compute on CUDA); default: ddp when WORLD_SIZE > 1, else none")
    lc = p.add_argument_group("longer context than the init model's (continued training at a longer --seq-len)")
    lc.add_argument("--rope-scaling", metavar="KIND:FACTOR|JSON", default=None,
                    help="RoPE frequency scaling from the model's current context: yarn:4 (Qwen2.5's 32k -> 128k), "
                         "llama3:8, linear:2, dynamic:2, a Hugging Face rope_scaling JSON object, or none; "
                         "raises max_position_embeddings by the factor unless --max-position-embeddings is given")
    lc.add_argument("--rope-theta", type=float, default=None,
                    help="a new RoPE base (adjusted base frequency, e.g. 1e6 -> 1e7)")
    lc.add_argument("--max-position-embeddings", type=int, default=None, metavar="N",
                    help="the model's new position limit (saved with the checkpoints)")
    s.add_argument("--fsdp-shard-size", type=int, default=None, metavar="N",
                   help="with --parallel fsdp: shard within groups of N consecutive ranks (a node) and replicate "
                        "across the groups (HSDP: the per-layer gathers stay inside a node; default: shard over all)")
    add_fsdp_reshard_option(s, pipeline=True)
    s.add_argument("--context-parallel", type=int, default=1, metavar="N",
                   help="split every sequence over groups of N consecutive ranks (long context: each holds "
                        "2 of 2N chunks of every row, K/V all-gathered per layer); --seq-len a multiple of 2N, "
                        "the batch shared by world/N data-parallel groups (default 1: off)")
    s.add_argument("--expert-parallel", type=int, default=1, metavar="N",
                   help="with --parallel ddp or fsdp, a mixture-of-experts model's experts spread over groups of N "
                        "consecutive ranks (each holds num_experts/N of every layer; rows exchanged by all-to-all; "
                        "with --tensor-parallel M: groups of ranks M apart; default 1: off)")
    s.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="with --parallel ddp or fsdp, every layer's heads and MLP (or experts') rows split over "
                        "groups of N consecutive ranks (Megatron-LM's column/row-parallel layout: two all-reduces per layer "
                        "and pass; the group shares its rows, the batch split over world/N; default 1: off)")
    s.add_argument("--pipeline-parallel", type=int, default=1, metavar="N",
                   help="with --parallel ddp or fsdp, the decoder layers split into N stages of consecutive layers, "
                        "stage s on ranks s*D..s*D+D-1 (D = world/N replicas, each averaging its stage's gradients, "
                        "or under fsdp sharding the stage; with --tensor-parallel T, D*T ranks per stage), "
                        "activations passed stage to stage per micro-batch (--grad-accum micro-batches, well above "
                        "N; default 1: off)")
    s.add_argument("--pipeline-schedule", choices=("1f1b", "gpipe", "interleaved", "zero-bubble"), default="1f1b",
                   help="1f1b: each stage at most N - s micro-batches' activations held (default); gpipe: all "
                        "forwards, then all backwards; interleaved: Megatron-LM's interleaved 1F1B, each stage "
                        "holding --pipeline-chunks chunks of layers (a smaller idle share for more activations "
                        "held and more messages; --grad-accum a multiple of N); zero-bubble: ZB-H1, each backward "
                        "split into the input's gradient (sent back at once) and the weights' (run where the "
                        "stage would idle), each stage holding at most N micro-batches (interleaved with "
                        "--pipeline-chunks C > 1; under FSDP a stage's parameters stay gathered through the step)")
    s.add_argument("--pipeline-chunks", type=int, default=None, metavar="C",
                   help="with --pipeline-schedule interleaved (default 2) or zero-bubble (default 1; its interleaved "
                        "form with more), the model chunks per stage (the layers split into N x C parts, part "
                        "c*N + s on stage s)")
    s.add_argument("--sequence-parallel", action="store_true",
                   help="with --tensor-parallel N, each rank of a group also holds 1/N of every row's positions "
                        "between the split blocks (norms, residuals, embedding, loss: their activations / N; the "
                        "all-reduces become all-gathers and reduce-scatters; --seq-len a multiple of N; with "
                        "--context-parallel C, 1/N of each context-parallel rank's positions)")
    s.add_argument("--dist-timeout", type=float, default=600.0,
                   help="seconds a collective may wait for the other ranks before the job stops (600)")
    add_common_options(p)
    p.add_argument("--tensorboard", metavar="DIR", default=None,
                   help="also write the logged values as TensorBoard event files into DIR")
    p.add_argument("--wandb", metavar="PROJECT", default=None,
                   help="also log the values to a Weights & Biases run in PROJECT (named after --out; wandb's "
                        "environment applies, e.g. WANDB_MODE=offline)")
    add_profile_options(p)
    add_dry_run_option(p)
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("tokenize", help="fill the token cache ahead of `train` (same data arguments), or "
                                                    "write aprender's pre-tokenised shards (--shards DIR)")
    p.add_argument("--data", nargs="+", required=True, help="as for train")
    p.add_argument("--data-weights", nargs="+", type=float, metavar="W", help="as for train (one cache entry per path)")
    p.add_argument("--eval-data", nargs="+", help="as for train")
    p.add_argument("--init", help="APR file whose embedded tokenizer train will use")
    p.add_argument("--tokenizer", help="as for train (default: --init's embedded one, else qwen2)")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--eval-fraction", type=float, default=0.05)
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--text-field", default="text")
    p.add_argument("--token-cache", default=None, help="cache folder (default as for train)")
    from .data import SHARD_TOKENS

    p.add_argument("--shards", metavar="DIR", default=None,
                   help="instead of the cache, write the --data stream into the new folder DIR as aprender's "
                        "pre-tokenised corpus (little-endian u32 .bin shards and a manifest.json), for aprender's "
                        "`apr pretrain` or `train --data DIR`")
    p.add_argument("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokens per shard (with --shards)")
    p.set_defaults(func=cmd_tokenize)

def main(argv=None) -> int:  # for tests: same as `apr-kernels ...`
    from apr_kernels.cli import main as root

    return root(argv)


if __name__ == "__main__":
    sys.exit(main())
