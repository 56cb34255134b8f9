"""Training checkpoints as APR v2 files: a usable model file plus everything needed to resume exactly.

Layout of a checkpoint written by ``save_checkpoint``:

* weights: every model parameter under its Hugging Face name, in the parameter dtype (fp32 master
  weights when training). A tied model also gets an explicit ``lm_head.weight`` copy of the embedding
  and ``tied_embeddings: true`` (spec writer checklist, section 17); ``from_apr`` ignores that copy.
* metadata: the model config (``AprModelConfig.to_metadata()`` keys) and, when given, the tokenizer
  (``tokenizer.*`` keys), so the file is self-contained for ``from_apr`` and ``apr-kernels eval``.
* optimizer state, as extra tensors under the ``__training__.`` prefix that inference readers skip
  (spec 10.3): ``__training__.adam.exp_avg.<param>`` and ``__training__.adam.exp_avg_sq.<param>``
  (fp32, the parameter's shape), and for the matrices Muon updates (``optim.py``)
  ``__training__.muon.momentum_buffer.<param>``; the torch CPU RNG as ``__training__.rng.torch_cpu`` (U8) and, on
  CUDA, ``__training__.rng.torch_cuda``.
* scalars under ``training.*`` metadata keys: ``training.step`` (optimizer steps done),
  ``training.data_position`` (training sequences consumed: the batch stream resumes there),
  ``training.adam_steps`` (parameter name -> AdamW step count), ``training.config`` (the
  ``TrainConfig``: schedule, batch and seed), ``training.eval_loss`` / ``training.eval_tokens`` (the
  last held-out evaluation) and ``training.format``. Callers add their own keys (the CLI stores
  ``training.data_spec``: data paths, tokenizer and split, so ``--resume`` needs nothing else).

A LoRA run (``model/lora.py``) stores its adapters as ``<module>.lora_A`` / ``.lora_B`` next to the
frozen base weights, with metadata ``lora`` (``from_apr`` merges them unless told to keep them). Its
final checkpoint is instead written merged (``merge_lora=True``): a plain model under Hugging Face
names for any reader, with the training metadata but without optimizer state (not resumable).

Because the schedule is a pure function of the step and the batch order a pure function of the seed
and position, restoring weights, AdamW moments and step counts reproduces the uninterrupted run.

Memory: every tensor goes to ``apr_kernels.save`` as a ``LazyTensor`` that is copied to the host
(or, sharded, all-gathered; or, LoRA, merged) only when its turn to be written comes, so a checkpoint
holds about one tensor at a time in host memory, not a second copy of the model and its AdamW
moments (12 bytes per parameter).
"""

from __future__ import annotations

import math
import os

import torch

from apr_kernels.io import LazyTensor
from apr_kernels._format import APR_DTYPE_OF

FORMAT = "apr-kernels-checkpoint-v1"
PREFIX = "__training__."
_MOMENTS = ("exp_avg", "exp_avg_sq")
_ADAM8 = "adam8"  # --optimizer adamw8bit's moments: __training__.adam8.<moment>.{codes,absmax}.<param>
_MUON = "momentum_buffer"  # Muon's one state tensor per matrix (optim.py)


def host_copy(t: torch.Tensor, dtype: torch.dtype | None = None) -> LazyTensor:
    """``t`` (in ``dtype``) as a LazyTensor: copied to the host only when ``save`` writes it."""
    dtype = dtype or t.dtype
    return LazyTensor(APR_DTYPE_OF[dtype], tuple(t.shape), lambda: t.detach().to("cpu", dtype))


def model_tensors(model, weights: dict | None = None) -> dict[str, LazyTensor]:
    """Weights by Hugging Face name as LazyTensors, with the explicit lm_head copy when tied.
    ``weights``: LazyTensors to use instead of the parameters (a sharded model's gathered ones)."""
    if weights is None:
        weights = {name: host_copy(p) for name, p in model.named_parameters()}
        weights.update(quantized_bases(model))
    out = dict(weights)
    if model.config.tie_word_embeddings and not model.config.num_labels:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def quantized_bases(model) -> dict[str, LazyTensor]:
    """The raw blocks of a quantised LoRA base (``lora.QuantizedLoRALinear``) under their Hugging Face
    weight names, stored bit for bit."""
    from apr_kernels.io import QuantizedTensor
    from apr_kernels.model.lora import QuantizedLoRALinear

    def raw(q):
        return LazyTensor(q.dtype, q.shape, lambda: QuantizedTensor(q.dtype, q.shape, q.data.cpu()))

    return {f"{name}.weight": raw(m.base) for name, m in model.named_modules()  # (sharded or split: ShardGatherer's)
            if isinstance(m, QuantizedLoRALinear) and not hasattr(m.base, "gather") and not m.base_split}


def model_metadata(model, tokenizer=None) -> dict:
    meta = model.config.to_apr_config().to_metadata()
    meta["name"] = f"apr-kernels {model.config.architecture}"
    if getattr(model, "lora", None):  # adapters are stored as <module>.lora_A/.lora_B (model/lora.py)
        meta["lora"] = dict(model.lora)
    if tokenizer is not None:
        meta.update(tokenizer.to_metadata())
    return meta


def _param_names(model, optimizer) -> list[str]:
    """Parameter names in the optimizer's flat index order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _moments(model, opt) -> dict[str, dict]:
    """Optimizer state by parameter name: AdamW's {"exp_avg", "exp_avg_sq" (fp32, lazy host copies),
    "step" (int)} or Muon's {"momentum_buffer"} (``optim.py``)."""
    out = {}
    for name, p in zip(_param_names(model, opt), (p for g in opt.param_groups for p in g["params"])):
        state = opt.state.get(p)
        if state and _MUON in state:
            out[name] = {_MUON: host_copy(state[_MUON], torch.float32)}
        elif state:
            out[name] = {key: _moment_copy(state[key]) for key in _MOMENTS}
            out[name]["step"] = int(state["step"])
    return out


def _moment_copy(moment):
    """An AdamW moment as an fp32 LazyTensor; an 8-bit one (``adamw8bit.py``) as it is stored."""
    return host_copy(moment, torch.float32) if torch.is_tensor(moment) else moment


def merged_weights(model) -> dict[str, LazyTensor]:
    """Hugging Face name -> weight with every LoRA adapter folded in (fp32 for the adapted ones),
    each merged only when it is written."""
    from apr_kernels.model.lora import lora_modules

    adapted = {f"{name}.weight": m for name, m in lora_modules(model).items()}
    out = {name: host_copy(p) for name, p in model.named_parameters()
           if not name.endswith((".lora_A", ".lora_B", ".lora_magnitude")) and name not in adapted}
    for name, m in adapted.items():  # (a quantised base is no parameter: listed here, not above)
        out[name] = LazyTensor("F32", (m.out_features, m.in_features),
                               lambda m=m: m.merged_weight(torch.float32).detach().cpu())
    return out


def save_checkpoint(path: str | os.PathLike, trainer=None, *, model=None, tokenizer=None,
                    extra_metadata: dict | None = None, state: tuple[dict, dict] | None = None,
                    merge_lora: bool = False, extra_tensors: dict | None = None, weights_only: bool = False,
                    write=None) -> None:
    """Write ``trainer``'s model and training state (or just ``model``) as one APR file.

    ``state``: (weights, moments) of a sharded model, as LazyTensors that all-gather when written
    (``gathering.save_checkpoint``), used instead of the parameters and optimizer of this process
    (with ``merge_lora``, the weights are the merged ones). ``merge_lora``: a LoRA
    model is written with its adapters folded in and without optimizer state (module docstring).
    ``weights_only``: any model written that way (a LoRA one merged): a model with the step and eval
    loss it had, not a resumable checkpoint (``train --save-best``'s best.apr).
    ``extra_tensors``: more training state, stored under ``__training__.<name>``.
    ``write(tensors, path, metadata=)``: what writes the file (default ``apr_kernels.save``;
    ``async_checkpoint.CheckpointWriter.write`` snapshots the tensors and writes in the background).
    """
    import apr_kernels

    write = write or apr_kernels.save
    model = model if model is not None else trainer.model
    weights, moments = state if state is not None else (None, None)
    lora = getattr(model, "lora", None)
    if (merge_lora and lora) or weights_only:
        meta = model_metadata(model, tokenizer)
        if lora:
            del meta["lora"]
            meta["training.lora"] = dict(lora)
        if trainer is not None:
            meta.update({"training.step": trainer.step, "training.config": trainer.cfg.to_dict()})
            if trainer.last_eval is not None:
                meta["training.eval_loss"], meta["training.eval_tokens"] = trainer.last_eval
        meta.update(extra_metadata or {})
        if weights is None and lora:
            weights = merged_weights(model)
        write(model_tensors(model, weights), path, metadata=meta)
        return
    tensors = model_tensors(model, weights)
    meta = model_metadata(model, tokenizer)
    if trainer is not None:
        steps = {}
        for name, entry in (moments if moments is not None else _moments(model, trainer.optimizer)).items():
            if _MUON in entry:
                tensors[f"{PREFIX}muon.{_MUON}.{name}"] = entry[_MUON]
                continue
            for key in _MOMENTS:
                m = entry[key]
                if isinstance(m, LazyTensor):
                    tensors[f"{PREFIX}adam.{key}.{name}"] = m
                else:  # 8-bit (adamw8bit.py): its codes and block scales, exactly (gathered under FSDP)
                    for part in ("codes", "absmax"):
                        t = getattr(m, part)
                        tensors[f"{PREFIX}{_ADAM8}.{key}.{part}.{name}"] = t if isinstance(t, LazyTensor) else host_copy(t)
            steps[name] = entry["step"]
        tensors[f"{PREFIX}rng.torch_cpu"] = torch.get_rng_state()
        if trainer.device.type == "cuda":
            tensors[f"{PREFIX}rng.torch_cuda"] = torch.cuda.get_rng_state(trainer.device)
        meta.update({
            "training.format": FORMAT,
            "training.step": trainer.step,
            "training.data_position": trainer.batches.position,
            "training.adam_steps": steps,
            "training.config": trainer.cfg.to_dict(),
        })
        if getattr(trainer, "scaler", None) is not None:  # fp16 loss scale: resumed as it was
            meta["training.grad_scaler"] = trainer.scaler.state_dict()
        if trainer.last_eval is not None:
            meta["training.eval_loss"], meta["training.eval_tokens"] = trainer.last_eval
        if getattr(trainer, "best_eval", None) is not None:  # (train --save-best / --early-stopping-patience)
            meta["training.best_eval"] = list(trainer.best_eval)
            meta["training.stale_evals"] = trainer.stale_evals
    meta.update(extra_metadata or {})
    tensors.update({f"{PREFIX}{name}": t for name, t in (extra_tensors or {}).items()})
    write(tensors, path, metadata=meta)


def training_metadata(path: str | os.PathLike) -> dict:
    """The ``training.*`` keys of a checkpoint (ValueError naming the file when it has none)."""
    import apr_kernels

    with apr_kernels.open(path) as f:
        meta = {k: v for k, v in f.metadata.items() if k.startswith("training.")}
    if meta.get("training.format") != FORMAT:
        raise ValueError(f"{path}: not a resumable training checkpoint (metadata training.format="
                         f"{meta.get('training.format')!r}; expected {FORMAT!r})")
    _check_training_metadata(path, meta)
    return meta


def _count(v) -> bool:
    return type(v) is int and v >= 0


def _number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _paths(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v)


# A resumable checkpoint's training.* metadata (a file is input: a damaged value is an error naming the
# file and the key, not a KeyError or TypeError where it is used): key -> (required, check, expected)
_TRAINING_KEYS = {
    "training.step": (True, _count, "an integer >= 0"),
    "training.data_position": (True, _count, "an integer >= 0"),
    "training.adam_steps": (True, lambda v: isinstance(v, dict) and all(_count(n) for n in v.values()),
                            "an object of parameter name: integer >= 0"),
    "training.config": (True, lambda v: isinstance(v, dict), "an object (the run's TrainConfig)"),
    "training.eval_loss": (False, _number, "a finite number"),
    "training.eval_tokens": (False, _count, "an integer >= 0"),
    "training.best_eval": (False, lambda v: isinstance(v, list) and len(v) == 2 and _number(v[0]) and _count(v[1]),
                           "[eval loss, step]"),
    "training.stale_evals": (False, _count, "an integer >= 0"),
    "training.grad_scaler": (False, lambda v: isinstance(v, dict), "an object (the fp16 loss scaler's state)"),
    "training.stopped_early": (False, lambda v: isinstance(v, bool), "true or false"),
    "training.data_spec": (False, lambda v: (
        isinstance(v, dict) and _paths(v.get("data")) and (v.get("eval_data") is None or _paths(v["eval_data"]))
        and (v.get("max_tokens") is None or _count(v["max_tokens"]))
        and (v.get("eval_fraction") is None or (_number(v["eval_fraction"]) and 0 <= v["eval_fraction"] < 1))
        and (v.get("text_field") is None or isinstance(v["text_field"], str))
        and (v.get("weights") is None or (isinstance(v["weights"], list) and len(v["weights"]) == len(v["data"])
                                          and all(_number(w) and w > 0 for w in v["weights"])))),
        "an object with data (a list of paths), eval_data (paths or null), max_tokens, eval_fraction, "
        "text_field and weights (one > 0 per data path) as train writes them"),
}


def stored_config(meta: dict, path) -> dict:
    """The ``training.config`` a file's metadata ``meta`` holds ({} when none; a checkpoint or a model
    a run wrote), checked as ``TrainConfig`` checks it: a damaged one is an error naming the file."""
    from .loop import TrainConfig

    cfg = meta.get("training.config")
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: metadata training.config={cfg!r:.100}; expected an object (the run's TrainConfig)")
    try:
        TrainConfig.from_dict(cfg)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: metadata training.config: {exc}") from None
    return cfg


def _check_training_metadata(path, meta: dict) -> None:
    for key, (required, check, expected) in _TRAINING_KEYS.items():
        if key not in meta:
            if required:
                raise ValueError(f"{path}: metadata {key} is missing; expected {expected} in a resumable checkpoint")
            continue
        if not check(meta[key]):
            raise ValueError(f"{path}: metadata {key}={meta[key]!r:.100}; expected {expected}")
    if ("training.eval_loss" in meta) != ("training.eval_tokens" in meta):
        raise ValueError(f"{path}: metadata training.eval_loss and training.eval_tokens; expected both or neither")
    if ("training.best_eval" in meta) != ("training.stale_evals" in meta):
        raise ValueError(f"{path}: metadata training.best_eval and training.stale_evals; expected both or neither")
    stored_config(meta, path)


def _adam8_moment(f, path, key: str, name: str, p, opt, split=None):
    """A checkpoint's 8-bit moment of parameter ``name`` (``adamw8bit.Blockwise8bit``) for ``opt``.

    An FSDP shard takes the blocks of its own rows, a tensor-parallel part (``split``: its ``(dim,
    TensorParallel)``) those of its rows or columns; where they are not whole blocks of the stored
    tensor (another layout than the run that wrote it) the moment comes back in fp32, placed like
    ``p``."""
    from .adamw8bit import BLOCK, Blockwise8bit, split_block_views
    from .distributed import like_param, shard_rows

    if not hasattr(opt, "qmap"):
        raise ValueError(f"{path}: parameter {name!r} has 8-bit AdamW moments (--optimizer adamw8bit); expected "
                         f"that optimizer to resume them")
    absmax = f"{PREFIX}{_ADAM8}.{key}.absmax.{name}"
    if absmax not in f:
        raise ValueError(f"{path}: checkpoint lacks optimizer tensor {absmax!r}; expected one beside its codes")
    codes, scales = f.get_tensor(f"{PREFIX}{_ADAM8}.{key}.codes.{name}"), f.get_tensor(absmax)
    _check_moment(scales, path, absmax)
    local = p.to_local() if hasattr(p, "to_local") else p
    qmap = opt.qmap(key == "exp_avg", local.device)
    what = f"{path}: optimizer state {key!r} of {name!r}"
    shape = p.shape if split is None else split[1].whole_shape(p.shape, split[0])
    try:
        whole = Blockwise8bit.from_parts(codes, scales, shape, qmap.cpu())
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    eight_bit = opt.layout(p)
    if split is not None:  # this rank's part of the whole tensor: its blocks, or its values
        dim, tp = split
        if not eight_bit:
            return like_param(tp.local(whole.dequantize(), dim, what), p, what)
        code_view, scale_view = split_block_views(shape, dim)
        whole = Blockwise8bit.from_parts(tp.local(whole.codes.view(code_view), dim).reshape(-1),
                                         tp.local(whole.absmax.view(scale_view), dim).reshape(-1), p.shape, qmap.cpu())
    if not hasattr(p, "device_mesh"):
        return Blockwise8bit.from_parts(whole.codes.to(p.device, copy=True), whole.absmax.to(p.device, copy=True),
                                        p.shape, qmap)
    if not eight_bit:
        return like_param(whole.dequantize(), p, what)
    first, rows = shard_rows(p)
    cols = p.numel() // p.shape[0]
    start, blocks = first * cols // BLOCK, -(-rows * cols // BLOCK)
    return Blockwise8bit.from_parts(whole.codes[start * BLOCK:(start + blocks) * BLOCK].to(local.device, copy=True),
                                    whole.absmax[start:start + blocks].to(local.device, copy=True), local.shape, qmap)


def restore_training_state(path: str | os.PathLike, trainer) -> None:
    """Load step, data position, AdamW moments and RNG from a checkpoint into ``trainer``.

    The model weights come from ``from_apr(path)`` (done by the caller, before the trainer is built).
    """
    import apr_kernels

    meta = training_metadata(path)
    opt = trainer.optimizer
    params = [p for g in opt.param_groups for p in g["params"]]
    names = _param_names(trainer.model, opt)
    steps = meta["training.adam_steps"]
    from .tensor_parallel import split_dims

    # tensor parallelism: this rank's rows or columns of a split parameter's whole moments
    split, tp = split_dims(trainer.model), trainer.model.tensor_parallel
    state = {}
    with apr_kernels.open(path) as f:
        for i, (name, p) in enumerate(zip(names, params)):
            muon = f"{PREFIX}muon.{_MUON}.{name}"
            if muon in f:  # a Muon matrix (optim.py): its momentum buffer
                t = f.get_tensor(muon)
                _check_moment(t, path, muon)
                if name in split:
                    t = tp.local(t, split[name], f"{path}: optimizer tensor {muon!r}")
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"{path}: optimizer tensor {muon!r} has shape {list(t.shape)}, expected "
                                     f"{list(p.shape)}")
                from .distributed import like_param  # (this rank's rows of an FSDP shard)

                state[i] = {_MUON: like_param(t, p, f"{path}: optimizer tensor {muon!r}")}
                continue
            if name not in steps:
                continue
            entry = {"step": torch.tensor(float(steps[name]))}
            for key in _MOMENTS:
                codes = f"{PREFIX}{_ADAM8}.{key}.codes.{name}"
                if codes in f:  # 8-bit moments (adamw8bit.py), restored as they were stored
                    entry[key] = _adam8_moment(f, path, key, name, p, opt,
                                               (split[name], tp) if name in split else None)
                    continue
                tname = f"{PREFIX}adam.{key}.{name}"
                if tname not in f:
                    raise ValueError(f"{path}: checkpoint lacks optimizer tensor {tname!r}; expected one "
                                     f"per trained parameter")
                t = f.get_tensor(tname)
                _check_moment(t, path, tname)
                if name in split:
                    t = tp.local(t, split[name], f"{path}: optimizer tensor {tname!r}")
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"{path}: optimizer tensor {tname!r} has shape {list(t.shape)}, "
                                     f"expected {list(p.shape)}")
                if hasattr(p, "device_mesh"):  # an FSDP shard: keep this rank's rows only
                    from .distributed import like_param

                    entry[key] = like_param(t, p, f"{path}: optimizer tensor {tname!r}")
                else:
                    entry[key] = t.to(p.device, torch.float32, copy=True)
            state[i] = entry
        rng_cpu = f.get_tensor(f"{PREFIX}rng.torch_cpu").clone() if f"{PREFIX}rng.torch_cpu" in f else None
        rng_cuda = (f.get_tensor(f"{PREFIX}rng.torch_cuda").clone()
                    if f"{PREFIX}rng.torch_cuda" in f and trainer.device.type == "cuda" else None)
    try:
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: its optimizer state does not fit this run's optimizer ({exc!r}); expected a "
                         f"checkpoint of the same --optimizer") from None
    trainer.step = int(meta["training.step"])
    trainer.batches.position = int(meta["training.data_position"])
    if getattr(trainer, "scaler", None) is not None and "training.grad_scaler" in meta:
        try:
            trainer.scaler.load_state_dict(meta["training.grad_scaler"])
        except (RuntimeError, TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"{path}: metadata training.grad_scaler: {exc!r}; expected the fp16 loss scaler's "
                             f"state") from None
    if "training.eval_loss" in meta:
        trainer.last_eval = (float(meta["training.eval_loss"]), int(meta["training.eval_tokens"]))
    if "training.best_eval" in meta:
        loss, step = meta["training.best_eval"]
        trainer.best_eval, trainer.stale_evals = (float(loss), int(step)), int(meta["training.stale_evals"])
    try:
        if rng_cpu is not None:
            torch.set_rng_state(rng_cpu)
        if rng_cuda is not None:
            torch.cuda.set_rng_state(rng_cuda, trainer.device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: tensor {PREFIX}rng.torch_cpu/cuda is not a random generator state ({exc})") from None


def _check_moment(t: torch.Tensor, path, name: str) -> None:
    """An optimizer moment read back: floating point, finite, and a second moment >= 0 (a NaN, an inf
    or the square root of a negative value would poison every step)."""
    if (not t.is_floating_point() or not bool(torch.isfinite(t).all())
            or ((".exp_avg_sq." in name or ".absmax." in name) and bool((t < 0).any()))):
        raise ValueError(f"{path}: optimizer tensor {name!r} ({t.dtype}) is not floating point, holds non-finite "
                         f"values, or (a second moment, a block scale) negative ones; expected the moments the run "
                         f"saved")
