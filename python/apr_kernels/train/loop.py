"""The training loop: AdamW, warmup + cosine (or linear / WSD / constant) learning rate, gradient clipping and accumulation, bf16
autocast on CUDA (fp32 master weights), periodic held-out evaluation, logging and checkpoint hooks.

Output for people and scripts: a tqdm bar (loss, tokens/s) on stderr when it is a terminal, and one
line per logged step on stdout::

    step=12 loss=6.8123 lr=3.00e-04 tok_s=5123 grad_norm=0.91 mfu=0.4120
    eval step=12 eval_loss=6.7011 eval_tokens=8192

or, with ``json_lines``, one JSON object per line (``{"event": "train", "step": 12, ...}``).

``mfu`` (model FLOPs utilisation) = ``ModelConfig.flops_per_token(seq_len)`` x tokens/s / (GPUs x the
card's dense bf16 peak): logged on the GPUs of ``PEAK_TFLOPS`` (datasheet rates), or anywhere with
``APR_KERNELS_PEAK_TFLOPS`` set to the peak of one device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from .data import BatchStream, batch, evaluate, sequences
from .mixture import Mixture
from .schedule import default_warmup, lr_at


@dataclass
class TrainConfig:
    """Optimisation settings (stored in checkpoints as ``training.config``)."""

    steps: int = 100
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    lr_schedule: str = "cosine"         # cosine | linear | wsd | constant (schedule.py)
    decay_fraction: float = 0.2         # wsd: the share of the steps that decay
    warmup: int | None = None          # None: default_warmup(steps)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0              # max global grad norm; 0 disables clipping
    eval_every: int = 0                 # 0: evaluate only at the start and the end
    eval_tokens: int = 16384            # held-out target tokens per evaluation (at most)
    eval_batch_size: int = 8
    eval_choices: list | None = None    # multiple-choice question files scored at every eval (choices.py)
    log_every: int = 1
    save_every: int = 0                 # 0: checkpoint only at the end
    save_best: bool = False             # write best.apr at each eval that lowers the best eval loss
    early_stopping_patience: int = 0    # stop after this many evals without a lower eval loss (0: never)
    seed: int = 42
    document_mask: bool = False         # attend only within each document (ends at the eos id)
    packing: str = "stream"             # stream: cut every seq_len tokens | records: documents whole (data.py)
    precision: str = "auto"             # autocast: auto (bf16 on CUDA where supported, else fp16; CPU fp32) |
                                        # bf16 | fp16 (with loss scaling) | fp32
    teacher: str | None = None          # knowledge distillation from this APR file (model/distillation.py)
    kd_ratio: float = 0.5               # loss = (1 - kd_ratio) * CE + kd_ratio * T^2 KL(teacher || student)
    kd_temperature: float = 1.0
    kd_beta: float = 0.0                # the divergence: 0 forward KL, 1 reverse KL, between generalized JSD
    label_smoothing: float = 0.0        # the training loss's, as F.cross_entropy's (eval stays plain CE)
    z_loss: float = 0.0                 # z * logsumexp(logits)^2 per target added to the training loss
    neftune_alpha: float = 0.0          # NEFTune's embedding noise in training steps (0: off)
    router_aux_loss_coef: float | None = None  # mixture of experts: load-balancing loss weight (None: the model's)
    router_z_loss_coef: float = 0.0  # mixture of experts: ST-MoE's router z-loss weight (0: off)
    lora_plus_ratio: float = 0.0        # LoRA+: the adapters' B matrices at this multiple of the lr (0: off)
    activation_offload: bool = False    # tensors saved for the backward kept in (pinned) host memory
    float8: str | None = None           # the projections' GEMMs in float8: tensorwise | rowwise | ... (float8.py)
    qat: str | None = None              # quantisation-aware training for convert --quantize KIND (qat.py)
    freeze: list | None = None          # parameter name patterns (fnmatch) kept frozen (freeze_parameters)
    optimizer: str = "adamw"            # adamw | muon (Muon on the decoder layers' matrices, AdamW on the rest)
    muon_momentum: float = 0.95

    def __post_init__(self):
        if self.warmup is None:
            self.warmup = default_warmup(self.steps)
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"training config: {name}={getattr(self, name)}; expected >= 1")
        from .data import PACKINGS

        if self.precision not in PRECISIONS:
            raise ValueError(f"training config: precision={self.precision!r}; expected one of {', '.join(PRECISIONS)}")
        if self.packing not in PACKINGS:
            raise ValueError(f"training config: packing={self.packing!r}; expected one of {', '.join(PACKINGS)}")
        from .optim import OPTIMIZERS

        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"training config: optimizer={self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        if not 0.0 <= self.label_smoothing <= 1.0 or not self.z_loss >= 0:
            raise ValueError(f"training config: label_smoothing={self.label_smoothing}, z_loss={self.z_loss}; "
                             f"expected 0 <= label_smoothing <= 1 and z_loss >= 0")
        if not self.lora_plus_ratio >= 0:
            raise ValueError(f"training config: lora_plus_ratio={self.lora_plus_ratio}; expected >= 0 (0: off)")
        if self.early_stopping_patience < 0 or (self.early_stopping_patience and not self.eval_every):
            raise ValueError(f"training config: early_stopping_patience={self.early_stopping_patience} with "
                             f"eval_every={self.eval_every}; expected >= 0, and periodic evals (--eval-every N) "
                             f"to count with it")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            c = getattr(self, name)
            if c is not None and not 0 <= c < math.inf:
                raise ValueError(f"training config: {name}={c}; expected a finite number >= 0 (0: off)")
        if not self.neftune_alpha >= 0:
            raise ValueError(f"training config: neftune_alpha={self.neftune_alpha}; expected >= 0")
        if self.teacher and (self.label_smoothing or self.z_loss):
            raise ValueError("training config: label_smoothing and z_loss change the cross entropy alone; expected "
                             "neither with a teacher (distillation has its own loss)")
        if not 0.0 <= self.kd_ratio <= 1.0 or not self.kd_temperature > 0 or not 0.0 <= self.kd_beta <= 1.0:
            raise ValueError(f"training config: kd_ratio={self.kd_ratio}, kd_temperature={self.kd_temperature}, "
                             f"kd_beta={self.kd_beta}; expected 0 <= kd_ratio <= 1, kd_temperature > 0 and "
                             f"0 <= kd_beta <= 1")
        lr_at(0, lr=self.lr, total_steps=self.steps, warmup=self.warmup, schedule=self.lr_schedule,
              decay_fraction=self.decay_fraction)  # the schedule's own checks, before any step

    def lr_at_step(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` under this config's schedule."""
        return lr_at(step, lr=self.lr, total_steps=self.steps, warmup=self.warmup, min_ratio=self.min_lr_ratio,
                     schedule=self.lr_schedule, decay_fraction=self.decay_fraction)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "TrainConfig":
        """A config from ``to_dict``'s dict (a checkpoint's ``training.config``): unknown keys left out,
        each known value of its field's type (``int`` also for a float field; a list one of strings: file
        paths, name patterns), then ``__post_init__``'s checks."""
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        for k, v in d.items():
            kinds = fields.get(k, "").split(" | ")
            if k in fields and not (v is None and "None" in kinds or type(v) is bool and "bool" in kinds
                                    or type(v) is int and ("int" in kinds or "float" in kinds)
                                    or type(v) is float and "float" in kinds or type(v) is str and "str" in kinds
                                    or type(v) is list and "list" in kinds and all(type(x) is str for x in v)):
                raise ValueError(f"training config: {k}={v!r:.80}; expected {fields[k]}")
        return cls(**{**{k: v for k, v in d.items() if k in fields}, **overrides})

    def for_epochs(self, epochs: float | None, items: int, *, warmup: int | None, what: str) -> "TrainConfig":
        """This config with ``steps`` for ``epochs`` passes over ``items`` training items (sequences,
        pairs, prompts...) taken ``batch_size * grad_accum`` per step, rounded up so the last pass is
        whole (TRL's ``num_train_epochs``); ``warmup`` as given (None: the default for the new steps).
        Itself when ``epochs`` is None. ``what`` names the items in errors."""
        if epochs is None:
            return self
        if not (epochs > 0 and math.isfinite(epochs)):
            raise ValueError(f"--epochs {epochs}: expected a positive number of passes over the {what}")
        per_step = self.batch_size * self.grad_accum
        # (a float product like 0.3 * 10 = 3.0000000000000004 must not round up to an extra step)
        steps = max(1, math.ceil(round(epochs * items / per_step, 9)))
        return dataclasses.replace(self, steps=steps, warmup=warmup)


def freeze_parameters(model: torch.nn.Module, patterns: list[str] | None, pipeline=None,
                      optimizer: str = "adamw") -> list[str]:
    """``--freeze``: the parameters whose Hugging Face names match any of the fnmatch ``patterns``
    (``model.embed_tokens.weight``, ``model.layers.[0-9].*``) stop training (no gradient, no
    optimizer state); the names frozen. Before the optimizer and any DDP/FSDP wrapping. A pattern
    that matches nothing, freezing everything, or freezing on top of LoRA (whose base is frozen
    already) is an error naming it. ``pipeline``: a ``pipeline_parallel.PipelineParallel`` whose stages
    hold the model between them (a collective of its pipeline): a pattern counts when it matches on
    any stage, every stage raises the same error, and a stage may be left nothing to train (its
    parts then run no backward) but under Muon (``optimizer``), which needs a matrix on every stage."""
    import fnmatch

    if not patterns:
        return []
    if getattr(model, "lora", None):
        raise ValueError(f"--freeze {' '.join(patterns)} with LoRA: the adapters already train alone on a frozen "
                         f"model; expected one or the other")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    hits = [[n for n, _ in named if fnmatch.fnmatchcase(n, pattern)] for pattern in patterns]
    frozen = {n for h in hits for n in h}
    matched, bare = [len(h) for h in hits], []  # (bare: the stages left nothing to train)
    if pipeline is not None and pipeline.size > 1:
        import torch.distributed as dist

        stages = [0] * pipeline.size
        stages[pipeline.stage] = int(len(frozen) == len(named))
        t = torch.tensor(matched + stages, dtype=torch.int64, device=next(model.parameters()).device)
        dist.all_reduce(t, group=pipeline.pipeline)
        matched, bare = t[:len(patterns)].tolist(), [s for s, n in enumerate(t[len(patterns):].tolist()) if n]
    for pattern, n in zip(patterns, matched):
        if not n:
            raise ValueError(f"--freeze {pattern!r}: matches no trainable parameter; names look like "
                             f"{named[0][0] if named else '(none)'} and {named[-1][0] if named else ''}")
    if (len(bare) == pipeline.size) if bare else len(frozen) == len(named):
        raise ValueError(f"--freeze {' '.join(patterns)}: freezes every parameter; expected some left to train")
    if bare and optimizer == "muon":
        raise ValueError(f"--freeze {' '.join(patterns)}: freezes every parameter of pipeline stage(s) "
                         f"{', '.join(map(str, bare))}; --optimizer muon expects a matrix to train on every stage "
                         f"(or use AdamW)")
    for n, p in named:
        if n in frozen:
            p.requires_grad_(False)
    return [n for n, _ in named if n in frozen]


def autocast_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a ``TrainConfig.precision`` on ``device`` (None: fp32, no autocast)."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16  # V100, T4: fp16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """``cfg.optimizer`` for ``model`` (``optim.py``: AdamW, or Muon on the hidden matrices + AdamW)."""
    from .optim import make_optimizer as make

    return make(model, cfg)


# Dense bf16 tensor-core peaks (datasheet, no sparsity), matched in order against the CUDA device name.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0}
PEAK_ENV = "APR_KERNELS_PEAK_TFLOPS"
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def peak_tflops(device: torch.device) -> float | None:
    """One device's peak for the logged MFU: ``$APR_KERNELS_PEAK_TFLOPS``, else the datasheet rate of
    a known CUDA card, else None (no MFU is logged)."""
    env = os.environ.get(PEAK_ENV, "").strip()
    if env:
        try:
            value = float(env)
        except ValueError:
            value = -1.0
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{PEAK_ENV}={env!r}; expected a positive number of TFLOP/s (one device's "
                             f"dense bf16 peak)")
        return value
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for key, v in PEAK_TFLOPS.items() if key in name), None)


class Logger:
    """Log lines on stdout (text or JSON), kept clear of the progress bar; with ``tensorboard`` (a
    folder) also TensorBoard event files: each train and eval record's numbers as scalars
    ``train/<key>`` and ``eval/<key>`` at the record's step, the start record as text; with ``wandb``
    (``wandb_settings``) the same numbers in a Weights & Biases run, the start record as its config
    (wandb's own environment variables apply: ``WANDB_MODE=offline``, ``WANDB_ENTITY``, ...)."""

    def __init__(self, json_lines: bool = False, stream=None, tensorboard: str | os.PathLike | None = None,
                 wandb: dict | None = None):
        self.json_lines = json_lines
        self.stream = stream
        self.board = self.wandb = None
        if wandb is not None:
            try:
                import wandb as wandb_lib
            except ImportError:
                raise ValueError(f"--wandb {wandb['project']}: the wandb package is not installed; "
                                 f"pip install 'apr-kernels[wandb]'") from None
            self.wandb = wandb_lib.init(**wandb)
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError(f"--tensorboard {tensorboard}: the tensorboard package is not installed; "
                                 f"pip install 'apr-kernels[tensorboard]'") from None
            self.board = SummaryWriter(os.fspath(tensorboard))

    def __call__(self, event: str, record: dict) -> None:
        out = self.stream or sys.stdout
        if self.json_lines:
            line = json.dumps({"event": event, **record})
        else:
            parts = [f"{k}={_fmt(k, v)}" for k, v in record.items() if v is not None]
            line = " ".join(([] if event == "train" else [event]) + parts)
        from tqdm import tqdm

        tqdm.write(line, file=out)
        out.flush()
        if self.board is not None:
            self._to_board(event, record)
        if self.wandb is not None:
            if event == "start":
                self.wandb.config.update(record, allow_val_change=True)
            elif event in ("train", "eval"):
                self.wandb.log(_scalars(event, record), step=int(record.get("step") or 0))

    def _to_board(self, event: str, record: dict) -> None:
        step = int(record.get("step") or 0)
        if event == "start":
            self.board.add_text("start", "  \n".join(f"{k}: {v}" for k, v in record.items()), step)
        elif event in ("train", "eval"):
            for name, v in _scalars(event, record).items():
                self.board.add_scalar(name, v, step)
        else:
            return
        self.board.flush()  # visible to a running TensorBoard at once, and nothing lost on a crash

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None  # (records after the run, such as train's "done", stay on stdout)


def _scalars(event: str, record: dict) -> dict[str, float]:
    """A train or eval record's numbers as ``train/<key>`` / ``eval/<key>`` (``eval_`` prefixes
    dropped: ``eval_loss`` is ``eval/loss``), the step left out."""
    return {f"{event}/{key.removeprefix('eval_') if event == 'eval' else key}": v for key, v in record.items()
            if key != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def wandb_settings(project: str | None, out) -> dict | None:
    """``wandb.init`` keywords for ``--wandb PROJECT`` (None without it): the run named after the output
    folder and its files under it, unless ``WANDB_NAME`` / ``WANDB_DIR`` say otherwise."""
    if not project:
        return None
    from pathlib import Path

    out = Path(out).resolve()
    settings = {"project": project, "name": os.environ.get("WANDB_NAME") or out.name}
    if not os.environ.get("WANDB_DIR"):
        out.mkdir(parents=True, exist_ok=True)
        settings["dir"] = str(out)
    return settings


def _fmt(key: str, v) -> str:
    if isinstance(v, float):
        if key == "lr":
            return f"{v:.3e}"
        if key in ("tok_s",):
            return f"{v:.0f}"
        if key == "mfu":
            return f"{v:.4f}"
        return f"{v:.6f}"
    return str(v)


class StepProfiler:
    """``--profile DIR``: ``torch.profiler`` over ``steps`` training steps after the first ``skip`` ones
    (those pay compiles, autotuning and allocator growth), CPU and, on a GPU, CUDA activity. When the
    window closes it writes ``DIR/trace_rank<r>.json`` (a Chrome trace: chrome://tracing or
    ui.perfetto.dev) and ``DIR/summary_rank<r>.txt`` (the ops by self time, device time on a GPU).
    Used as a context around the step loop, ``step()`` after each training step."""

    def __init__(self, folder, *, rank: int = 0, skip: int = 1, steps: int = 3, cuda: bool = False):
        if steps < 1 or skip < 0:
            raise ValueError(f"--profile-steps {steps} (after {skip}); expected at least one step to profile")
        from pathlib import Path

        import torch.profiler as tp

        self.folder, self.rank, self.cuda = Path(folder), rank, cuda
        self.folder.mkdir(parents=True, exist_ok=True)
        activities = [tp.ProfilerActivity.CPU] + ([tp.ProfilerActivity.CUDA] if cuda else [])
        self.prof = tp.profile(activities=activities, on_trace_ready=self._write,
                               schedule=tp.schedule(wait=skip, warmup=1 if skip else 0, active=steps, repeat=1)
                               if skip else tp.schedule(wait=0, warmup=0, active=steps, repeat=1))
        self.written: list = []

    def _write(self, prof) -> None:
        trace = self.folder / f"trace_rank{self.rank}.json"
        prof.export_chrome_trace(str(trace))
        key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        summary = self.folder / f"summary_rank{self.rank}.txt"
        summary.write_text(prof.key_averages().table(sort_by=key, row_limit=40) + "\n")
        self.written = [trace, summary]

    def __enter__(self):
        self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        return self.prof.__exit__(*exc)

    def step(self) -> None:
        self.prof.step()


class RouterMeasures:
    """A mixture-of-experts model's measures for a step's log: the means over the step's training
    forwards and the ranks of its ``last_aux_loss``, ``last_expert_load`` and ``last_router_z_loss``
    (``Transformer.forward``), kept on the device until ``means`` (one all-reduce under DDP/FSDP)."""

    NAMES = ("aux_loss", "expert_load", "router_z_loss")

    def __init__(self, model, device):
        self.model, self.sums, self.forwards = model, torch.zeros(3, device=device), 0

    @classmethod
    def of(cls, model, device, parallel=None) -> "RouterMeasures | None":
        """The measures of ``model`` (None for a dense one). Under a parallel run the model counts its
        expert choices over every rank (``Transformer.router_aux_sync``: the global micro-batch's
        balance, as one process's)."""
        if not getattr(getattr(model, "config", None), "is_moe", False):
            return None
        pp = getattr(parallel, "pipeline", None)
        if pp is not None:  # (a stage's layers: their choices counted over the stage's replicas)
            model.router_aux_sync, model.router_aux_group = pp.data is not None, pp.data
        elif parallel is not None and parallel.world_size > 1:
            model.router_aux_sync = True
        return cls(model, device)

    def add(self) -> None:
        """Count the model's last forward (a training forward: it measured them). Detached: a log
        measure, which must not hold each forward's autograd graph until the step's ``means``."""
        m = self.model
        self.sums += torch.stack([m.last_aux_loss, m.last_expert_load, m.last_router_z_loss]).detach().float()
        self.forwards += 1

    def means(self, parallel=None) -> dict[str, torch.Tensor]:
        """The means (0-dim tensors) over the counted forwards, over every rank under ``parallel``; reset.
        (Under pipeline parallelism only the last stage's ranks count forwards: its ranks' mean.)"""
        if getattr(parallel, "pipeline", None) is not None:
            both = torch.cat([self.sums, self.sums.new_tensor([self.forwards])])
            torch.distributed.all_reduce(both)
            sums, forwards = both[:3], both[3]
        else:
            sums = parallel.mean(self.sums) if parallel is not None else self.sums
            forwards = max(self.forwards, 1)
        out = dict(zip(self.NAMES, sums / forwards))
        self.sums, self.forwards = torch.zeros_like(self.sums), 0
        return out

    def balance(self, means: dict) -> float:
        """The balance terms the objective held, from the ``means``: the model's coefficients times the
        mean load-balancing loss and router z-loss (a linear mean of each forward's terms)."""
        return float(self.model.router_aux_loss_coef * means["aux_loss"]
                     + self.model.router_z_loss_coef * means["router_z_loss"])


class EvalWatch:
    """What ``--save-best`` and ``--early-stopping-patience`` follow, mixed into ``Trainer`` and the
    post-training ``StepLoop``: the best eval of a training step so far, ``best_eval = (value, step)``
    (the lowest ``best_metric``, or the highest when ``best_higher``), and ``stale_evals``, the evals
    since it. The step-0 eval of the starting model is a baseline, not a candidate (as in Hugging
    Face's Trainer). Both are stored in step checkpoints, so a resumed run goes on counting."""

    best_metric = "eval_loss"
    best_higher = False
    best_eval: tuple[float, int] | None = None
    stale_evals = 0
    stopped_early = False

    def _watch(self, record: dict, on_best=None) -> None:
        """After an eval at a training step: ``on_best(self)`` on a new best; with
        ``cfg.early_stopping_patience`` evals in a row without one (before the last step), the run
        is to end here (``stopped_early``, logged as ``early_stop``)."""
        value = record.get(self.best_metric)
        if self.step == 0 or value is None:
            return
        best = self.best_eval
        # (a NaN is never better)
        if math.isfinite(value) and (best is None or (value > best[0] if self.best_higher else value < best[0])):
            self.best_eval, self.stale_evals = (float(value), self.step), 0
            if on_best is not None:
                on_best(self)
        else:
            self.stale_evals += 1
        patience = self.cfg.early_stopping_patience
        if patience and self.stale_evals >= patience and self.step < self.cfg.steps:
            self.stopped_early = True
            best = self.best_eval or (None, None)
            self.log("early_stop", {"step": self.step, "evals_without_improvement": self.stale_evals,
                                    "best_step": best[1], f"best_{self.best_metric}": best[0]})


class Trainer(EvalWatch):
    """Owns the model, optimizer, data position and step count of one run.

    ``train_tokens`` / ``eval_tokens`` are packed token streams (``data.tokenize_files``). On CUDA the
    forward and backward run under bf16 autocast; weights and optimizer state stay fp32.

    ``parallel`` (``distributed.parallelize(model, ...)``, whose ``module`` is ``model``): DDP/FSDP
    training. ``batch_size`` stays global: each rank trains on its share of every batch, and logged
    and evaluated losses are means over all ranks.

    ``eos_id``: the end-of-text id that ends each document of the streams; needed by
    ``config.document_mask``.

    ``teacher``: a frozen model to distil from (``config.kd_ratio``, ``config.kd_temperature``): each
    micro-batch's loss is ``model/distillation.py``'s, the step logs its ``ce`` and ``kl`` parts.
    Evaluation stays the student's cross entropy.
    """

    def __init__(self, model: torch.nn.Module, train_tokens: torch.Tensor, eval_tokens: torch.Tensor | None,
                 config: TrainConfig, *, device=None, autocast_dtype: torch.dtype | None | str = "auto",
                 log: Callable[[str, dict], None] | None = None, parallel=None, eos_id: int | None = None,
                 teacher: torch.nn.Module | None = None, extra_eval: Callable[["Trainer"], dict] | None = None):
        self.cfg = config
        self.parallel = parallel
        # (a pipeline asks the teacher on its last stage alone: the other stages distil without it)
        elsewhere = getattr(parallel, "pipeline", None) is not None and not parallel.pipeline.last
        if config.teacher and teacher is None and not elsewhere:
            raise ValueError(f"training config: teacher={config.teacher!r} but no teacher model was given")
        self.teacher = teacher
        self.distilling = teacher is not None or bool(config.teacher)
        self.extra_eval = extra_eval  # more held-out measures at each eval (train --eval-choices)
        model.neftune_alpha = config.neftune_alpha  # (the model adds it in training mode only)
        moe = getattr(getattr(model, "config", None), "is_moe", False)
        if config.router_aux_loss_coef is not None:
            if not moe:
                raise ValueError(f"training config: router_aux_loss_coef={config.router_aux_loss_coef} is the "
                                 f"load-balancing loss of mixture-of-experts models; this model is dense")
            model.router_aux_loss_coef = config.router_aux_loss_coef  # (added in training mode only)
        if config.router_z_loss_coef:
            if not moe:
                raise ValueError(f"training config: router_z_loss_coef={config.router_z_loss_coef} is the router "
                                 f"z-loss of mixture-of-experts models; this model is dense")
            model.router_z_loss_coef = config.router_z_loss_coef
        self._moe = moe
        if config.document_mask and eos_id is None:
            raise ValueError("document masking needs the tokenizer's end-of-text id (which ends every "
                             "document of the data); this tokenizer has none")
        # the id that batches split documents at, None without document masking
        self.doc_eos = eos_id if config.document_mask else None
        if parallel is not None:
            if parallel.module is not model:
                raise ValueError("Trainer: parallel.module is not the model given; expected "
                                 "parallelize(model, ...) of this model")
            if config.batch_size % parallel.data_ranks:
                sharing = [(f"--{kind}-parallel", g.size) for kind, g in (("context", parallel.context),
                                                                          ("tensor", parallel.tensor)) if g]
                raise ValueError(f"--batch-size {config.batch_size} is not a multiple of the "
                                 + (f"world size {parallel.world_size}" if not sharing else
                                    f"{parallel.data_ranks} data-parallel groups ({parallel.world_size} ranks / "
                                    + " / ".join(f"{kind} {n}" for kind, n in sharing) + ")")
                                 + "; expected an equal share of every batch per rank")
            if parallel.context is not None:  # what the split of every row into the group's chunks rules out
                parallel.context.check_length(config.seq_len, "--seq-len")
            sp = parallel.sequence  # (of each context-parallel rank's positions, under both)
            cp = parallel.context.size if parallel.context is not None else 1
            if sp is not None and config.seq_len % (cp * sp.size):
                raise ValueError(f"--seq-len {config.seq_len} does not split into {sp.size} equal chunks of "
                                 f"positions" + (f" per context-parallel rank ({config.seq_len} / {cp})" if cp > 1
                                                 else "")
                                 + f"; expected a multiple of --tensor-parallel {sp.size} with --sequence-parallel"
                                 + (f" x --context-parallel {cp}" if cp > 1 else ""))
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self._router = RouterMeasures.of(model, self.device, parallel)  # (mixture of experts; reset per step)
        # a parallel model is already placed (and an FSDP one must not be moved)
        self.model = model if parallel is not None else model.to(self.device)
        if autocast_dtype == "auto":
            autocast_dtype = autocast_dtype_for(config.precision, self.device)
        self.autocast_dtype = autocast_dtype
        # fp16's narrow range needs loss scaling: gradients scaled up for the backward, unscaled before
        # clipping, a step skipped (and the scale halved) when any is inf/NaN
        self.scaler = None
        if autocast_dtype == torch.float16:
            if config.optimizer == "muon":
                raise ValueError("--optimizer muon with fp16 loss scaling is not supported; use --precision bf16 "
                                 "or fp32")
            # an inf on any rank's shard (FSDP) or part (tensor parallelism) skips everyone's step
            if parallel is not None and (parallel.mode == "fsdp" or parallel.tensor is not None
                                         or parallel.pipeline is not None):
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

                self.scaler = ShardedGradScaler(self.device.type)
            else:
                self.scaler = torch.amp.GradScaler(self.device.type)
        # a token stream, or a Mixture of several (--data-weights) that already holds its sequences
        mixture = train_tokens if isinstance(train_tokens, Mixture) else None
        self.train_seqs = mixture if mixture is not None else sequences(train_tokens, config.seq_len)
        if len(self.train_seqs) == 0:
            raise ValueError(f"training data: {train_tokens.numel()} tokens; expected at least "
                             f"{config.seq_len + 1} for one sequence of --seq-len {config.seq_len}")
        self.eval_tokens = eval_tokens
        self.batches = (mixture.stream(config.seed) if mixture is not None
                        else BatchStream(len(self.train_seqs), seed=config.seed))
        self.optimizer = make_optimizer(self.model, config)
        self.step = 0
        self.log = log or Logger()
        self.last_eval: tuple[float, int] | None = None
        self.history: list[dict] = []
        # model FLOPs of one step over the whole job's peak, for the logged MFU (None: not logged)
        peak = peak_tflops(self.device)
        flops = getattr(getattr(model, "config", None), "flops_per_token", None)
        world = parallel.world_size if parallel is not None else 1
        self._mfu_scale = (flops(config.seq_len) / (world * peak * 1e12)
                           if peak is not None and flops is not None else None)

    # ------------------------------------------------------------------------------- one step
    def lr(self, step: int) -> float:
        return self.cfg.lr_at_step(step)

    def train_step(self) -> dict:
        c = self.cfg
        t0 = time.perf_counter()
        lr = self.lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # (LoRA+'s B matrices: a multiple)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        parts = torch.zeros(2, device=self.device)  # distillation: the step's ce and kl sums
        router = self._router
        par = self.parallel
        world = par.grad_ranks if par is not None else 1
        # the global batch of every micro-batch (the data position is global), and the number of loss
        # targets in the whole step, counted on the host by every rank alike: the step's loss is the
        # mean over those targets however they fall into micro-batches and ranks (with prompt tokens
        # excluded, counts differ between micro-batches; a mean of means would weight them wrongly)
        indices = [self.batches.next(c.batch_size) for _ in range(c.grad_accum)]
        counts = [int((self.train_seqs[i][:, 1:] >= 0).sum()) for i in indices]  # (each global micro-batch's)
        n_targets = max(1, sum(counts))
        if par is not None and par.pipeline is not None:  # the micro-batches through the stages, in its schedule
            total, ce_kl = self._pipeline_step(indices, counts, scale=world / n_targets)
            if ce_kl is not None:
                parts += ce_kl
        else:
            total = self._micro_batches(indices, counts, total, parts, scale=world / n_targets)
        if router is not None:  # the means over micro-batches and ranks (the loss includes their terms)
            router = router.means(par)
        if par is not None:
            total = par.total(total)  # the sum over ranks
            if self.distilling:
                parts = par.total(parts)
        mean_loss = total / n_targets
        grad_norm = None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # true gradients for clipping and the logged norm
        if c.grad_clip > 0:
            grad_norm = (par.clip_grad_norm(c.grad_clip) if par is not None  # (expert parallelism: global)
                         else torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip))
            from .distributed import full_tensor

            grad_norm = full_tensor(grad_norm)  # (FSDP: a replicated DTensor)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when a gradient is inf/NaN
            self.scaler.update()
        else:
            self.optimizer.step()
        self.step += 1
        # one device sync per step (this makes the timing below real): every logged scalar in one read
        scalars = {"loss": mean_loss}
        if grad_norm is not None:
            scalars["grad_norm"] = grad_norm
        if self.distilling:
            scalars["ce"], scalars["kl"] = parts / n_targets
        if router is not None:
            scalars.update(router)
        values = dict(zip(scalars, torch.stack([v.to(mean_loss.dtype) for v in scalars.values()]).tolist()))
        loss = values.pop("loss")
        dt = time.perf_counter() - t0
        tokens = c.batch_size * c.grad_accum * c.seq_len
        if not math.isfinite(loss):
            raise RuntimeError(f"training diverged: loss={loss} at step {self.step} (lower --lr?)")
        rec = {"step": self.step, "loss": loss, "lr": lr, "tok_s": tokens / dt, "grad_norm": None, **values}
        if self._mfu_scale is not None:
            rec["mfu"] = rec["tok_s"] * self._mfu_scale
        return rec

    def _micro_batches(self, indices: list, counts: list, total: torch.Tensor, parts: torch.Tensor, *,
                       scale: float) -> torch.Tensor:
        """Forward and backward of each micro-batch in turn (``_micro_batch``): ``total`` plus their summed
        losses; distilling, their ``[ce, kl]`` sums are added to ``parts``."""
        with self._quantised():  # (--qat: the step's forwards and backwards on the quantised weights)
            for micro, index in enumerate(indices):
                loss_sum, ce_kl = self._micro_batch(index, counts[micro], last=micro == len(indices) - 1,
                                                    scale=scale)
                total += loss_sum
                if ce_kl is not None:
                    parts += ce_kl
                if self._router is not None:
                    self._router.add()
        return total

    def _pipeline_step(self, indices: list, counts: list, *, scale: float) -> tuple:
        """The step's micro-batches through the pipeline's stages (``pipeline_parallel.py``), then each
        stage's gradients averaged over its replicas: this stage's summed loss (0 but on the last)
        and, distilling, its summed ``[ce, kl]`` (else None). ``counts``: each micro-batch's targets
        over all ranks."""
        c, par = self.cfg, self.parallel
        pp = par.pipeline
        # (a mixture of experts' balance terms: the global micro-batch's, in equal shares over the last
        # stage's ranks whose losses add up: its replicas, and its tensor-parallel ranks when each holds
        # its own positions)
        shares = pp.replicas * (pp.tensor if par.sequence is not None else 1)
        micro, rows = [], []
        for index in indices:  # (sequence parallelism: this rank's chunk of the positions travels)
            x, y, docs = batch(self.train_seqs, par.local_rows(index), self.device, self.doc_eos)
            micro.append((*par.local_positions(x, y), docs))
            rows.append(x)

        def teacher_of(m: int):  # (distilling; asked on the last stage only: the whole rows, this rank's positions)
            from apr_kernels.model.distillation import Teacher

            t = Teacher.of(self.teacher, rows[m], micro[m][2], kd_ratio=c.kd_ratio, temperature=c.kd_temperature,
                           beta=c.kd_beta)
            t.hidden = par.local_positions(t.hidden)
            return t

        def autocast():
            return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                                  enabled=self.autocast_dtype is not None)

        with self._quantised(), self._saved_tensors():  # (--qat: each stage's weights as the file holds them)
            total = pp.train_step(self.model, micro, scale, autocast=autocast, scaler=self.scaler,
                                  loss_kwargs={"label_smoothing": c.label_smoothing, "z_loss": c.z_loss},
                                  teacher_of=teacher_of if self.distilling else None, router=self._router,
                                  balance_targets=[n / shares for n in counts] if self._moe else None)
        pp.reduce_grads(self.model)
        return total  # (and the [ce, kl] sums: train_step's pair)

    def evaluate(self) -> tuple[float, int]:
        if self.eval_tokens is None:
            raise ValueError("no held-out data to evaluate on")
        self.last_eval = self.evaluate_tokens(self.eval_tokens)
        return self.last_eval

    def evaluate_tokens(self, tokens: torch.Tensor) -> tuple[float, int]:
        """(mean loss, targets) of held-out ``tokens`` (at most ``cfg.eval_tokens``), over all ranks."""
        if self.parallel is not None:
            return self.parallel.evaluate(tokens, self.cfg.seq_len, batch_size=self.cfg.eval_batch_size,
                                          autocast_dtype=self.autocast_dtype, max_tokens=self.cfg.eval_tokens,
                                          eos_id=self.doc_eos)
        return evaluate(self.model, tokens, self.cfg.seq_len, batch_size=self.cfg.eval_batch_size, device=self.device,
                        autocast_dtype=self.autocast_dtype, max_tokens=self.cfg.eval_tokens, eos_id=self.doc_eos)

    def _saved_tensors(self):
        """Where the forward's tensors for the backward live: with ``cfg.activation_offload`` in host
        memory (pinned on CUDA), copied back as the backward needs them (torchtune's activation
        offloading; trades PCIe traffic for GPU memory, with --grad-checkpointing only each layer's
        input is kept), else where they are made."""
        if not self.cfg.activation_offload:
            return contextlib.nullcontext()
        return torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda")

    def _micro_batch(self, index: torch.Tensor, count: int, *, last: bool, scale: float):
        """Forward and backward of the micro-batch of global rows ``index`` (``count`` targets over all
        ranks); gradients communicated when ``last``, the loss scaled by ``scale`` (ranks over the
        step's targets: DDP/FSDP average over ranks, the step's loss is a sum). Returns its summed
        loss (detached) and, distilling, its ``[ce, kl]`` sums (else None)."""
        c, par = self.cfg, self.parallel
        x, y, docs = batch(self.train_seqs, index if par is None else par.local_rows(index), self.device,
                           self.doc_eos)
        rows = x  # (the whole rows: what a distillation teacher reads)
        if self._moe and par is not None:  # (the balance term: the global micro-batch's, in equal shares)
            self.model.aux_targets = count / par.shares
        if par is not None:  # context or sequence parallelism: this rank's positions of the rows
            x, y = par.local_positions(x, y)
        ce_kl = None
        with par.grad_sync(last) if par else contextlib.nullcontext():
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                                enabled=self.autocast_dtype is not None):
                teacher = None
                if self.teacher is not None:  # (whole on every rank, or sharded under FSDP: it reads the
                    # whole rows, and the student's share of the positions takes its hidden states there)
                    from apr_kernels.model.distillation import Teacher

                    teacher = Teacher.of(self.teacher, rows, docs, kd_ratio=c.kd_ratio,
                                         temperature=c.kd_temperature, beta=c.kd_beta)
                    if par is not None:
                        teacher.hidden = par.local_positions(teacher.hidden)
                extra = {"teacher": teacher} if teacher is not None else \
                    {"label_smoothing": c.label_smoothing, "z_loss": c.z_loss}
                with self._saved_tensors():
                    loss_sum = (par.loss(x, y, docs, reduction="sum", **extra) if par
                                else self.model.loss(x, y, reduction="sum", documents=docs, **extra))
                if teacher is not None:  # [loss, ce, kl]
                    ce_kl = loss_sum[1:].detach()
                    loss_sum = loss_sum[0]
            scaled = loss_sum * scale
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss_sum.detach(), ce_kl

    def _quantised(self):
        """``--qat``: the weights as the quantised file will hold them, within (qat.FakeQuantizer)."""
        if not self.cfg.qat:
            return contextlib.nullcontext()
        if getattr(self, "_fake_quantizer", None) is None:  # (made on first use: the parallel model's parameters)
            from .qat import FakeQuantizer

            self._fake_quantizer = FakeQuantizer(self.model, self.cfg.qat)
        return self._fake_quantizer.applied()

    def _high_precision(self):
        """Evaluation of a ``--float8`` run in high precision (float8.high_precision: the saved model's loss)."""
        if not self.cfg.float8:
            return contextlib.nullcontext()
        from .float8 import high_precision

        return high_precision(self.model)

    def _eval_and_log(self) -> dict | None:
        """Evaluate and log; the eval record (None without held-out data)."""
        if self.eval_tokens is None and self.extra_eval is None:
            return None
        rec = {"step": self.step}
        with self._high_precision():
            if self.eval_tokens is not None:
                loss, n = self.evaluate()
                rec.update(eval_loss=loss, eval_tokens=n)
                if self.cfg.qat:  # and the quantised file's
                    with self._quantised():
                        rec["eval_loss_quantized"] = self.evaluate_tokens(self.eval_tokens)[0]
            if self.extra_eval is not None:
                rec.update(self.extra_eval(self))
        self.history.append({"event": "eval", **rec})
        self.log("eval", rec)
        return rec

    def summary(self) -> dict:
        """What this run trains, on what, and how (the ``start`` log record)."""
        c = self.cfg
        world = self.parallel.world_size if self.parallel is not None else 1
        tokens_per_step = c.batch_size * c.grad_accum * c.seq_len
        train_tokens = self.train_seqs.shape[0] * c.seq_len
        lora = getattr(self.model, "lora", None)
        from apr_kernels.model.lora import whole_model_adapters

        from .distributed import fsdp_fields
        from .expert_parallel import parameter_counts

        # the whole model's counts (with expert parallelism also this rank's share); a quantised LoRA
        # base holds its projections outside the parameters
        par = self.parallel
        sizes = (par.pipeline.parameter_counts(self.model) if par is not None and par.pipeline is not None
                 else parameter_counts(self.model, par.expert if par is not None else None,
                                       par.tensor if par is not None else None))
        if par is None or par.pipeline is None:  # (a pipeline's counts have its stages' bases)
            sizes["params"] += sum(math.prod(m.whole_base_shape) for m, _ in whole_model_adapters(self.model).values()
                                   if hasattr(m, "base"))
        return {
            "step": self.step, "steps": c.steps, **sizes, **fsdp_fields(self.model),
            "tokens_per_step": tokens_per_step, "train_tokens": train_tokens,
            "epochs": round(c.steps * tokens_per_step / max(1, train_tokens), 3),
            "device": str(self.device), "world": world,
            "autocast": str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else None,
            "fast": getattr(self.model, "use_fast", None) and self.model.use_fast(
                torch.empty(0, device=self.device)),
            "document_mask": c.document_mask, "lora_rank": lora["rank"] if lora else None,
            "lr": c.lr, "lr_schedule": c.lr_schedule, **({"float8": c.float8} if c.float8 else {}),
            **({"qat": c.qat} if c.qat else {}), **(self._teacher_fields() if self.distilling else {}),
            **({"mixture": self.train_seqs.describe(c.steps * c.batch_size * c.grad_accum)}
               if isinstance(self.train_seqs, Mixture) else {}),
        }

    def _teacher_fields(self) -> dict:
        """``cli.frozen_fields`` of the teacher; under a pipeline (a collective of it) also
        ``teacher_params_last_stage``: what the last stage's rank of this rank's pipeline holds of the
        teacher (only that stage loads it)."""
        from .cli import frozen_fields

        out = frozen_fields(self.teacher)
        pp = getattr(self.parallel, "pipeline", None)
        if pp is not None:
            import torch.distributed as dist

            t = torch.tensor([out.get("teacher_params", 0), out["teacher_params_rank"]], dtype=torch.int64,
                             device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=pp.pipeline)
            out.update(teacher_params=int(t[0]), teacher_params_last_stage=int(t[1]))
        return out

    # --------------------------------------------------------------------------------- the run
    def run(self, *, on_checkpoint: Callable[["Trainer"], None] | None = None, progress: bool | None = None,
            stop_at: int | None = None, on_best: Callable[["Trainer"], None] | None = None,
            profile: StepProfiler | None = None) -> list[dict]:
        """Train until ``cfg.steps`` (or ``stop_at``), evaluating and checkpointing on schedule.

        Evaluates before the first step of a fresh run (step 0: the init loss) and after the last.
        ``on_best(self)`` after each eval with the lowest eval loss so far (``cfg.save_best``); with
        ``cfg.early_stopping_patience`` the run ends (``stopped_early``, checkpointed) once that many
        evals in a row did not lower it. ``profile``: a ``StepProfiler`` stepped with the training steps.
        """
        from tqdm import tqdm

        c = self.cfg
        end = min(c.steps, stop_at) if stop_at is not None else c.steps
        self.log("start", self.summary())
        if self.step == 0:
            self._eval_and_log()
        bar = tqdm(total=c.steps, initial=self.step, unit="step", file=sys.stderr, dynamic_ncols=True,
                   disable=(not sys.stderr.isatty()) if progress is None else not progress, leave=False)
        try:
            with profile or contextlib.nullcontext():
                self._steps(end, bar, on_checkpoint, on_best, profile)
        finally:
            bar.close()
        if profile is not None and profile.written:
            self.log("profile", {"step": self.step, "files": [str(p) for p in profile.written]})
        return self.history

    def _steps(self, end: int, bar, on_checkpoint, on_best, profile) -> None:
        """The step loop of ``run``: train, log, evaluate, checkpoint, until ``end`` or an early stop."""
        c = self.cfg
        while self.step < end:
            rec = self.train_step()
            if profile is not None:
                profile.step()
            self.history.append({"event": "train", **rec})
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tok_s']:.0f}")
            if self.step % c.log_every == 0 or self.step == end:
                self.log("train", rec)
            last = self.step == c.steps
            if last or (c.eval_every and self.step % c.eval_every == 0):
                rec = self._eval_and_log()
                if rec is not None:
                    self._watch(rec, on_best)
            if on_checkpoint and (self.step == end or self.stopped_early
                                  or (c.save_every and self.step % c.save_every == 0)):
                on_checkpoint(self)
            if self.stopped_early:
                break
