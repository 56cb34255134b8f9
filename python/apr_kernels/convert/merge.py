"""``apr-kernels merge``: model merging as mergekit does it, tensor by tensor, on APR files.

Methods (``--method``) for models ``M_1 .. M_n`` with weights ``w_i`` (``--weights``, default 1) and,
where the method needs one, a base model ``B`` (``--base``):

* ``linear``: ``sum_i w_i M_i / sum_i w_i`` (the mean by default: "model soups", Wortsman et al.);
* ``slerp``: two models, spherical interpolation at ``--t`` of each tensor (flattened; ``t = 0`` is the
  first model), linear where the two are nearly parallel (``|cos| > 0.9995``), as mergekit computes it;
* ``task_arithmetic``: ``B + sum_i w_i (M_i - B)`` (Ilharco et al.);
* ``ties`` (TIES-merging, Yadav et al.): each task vector ``d_i = M_i - B`` keeps its ``--density``
  share of largest-magnitude entries, each entry's sign is elected by ``sign(sum_i w_i d_i)``, and the
  kept entries that agree with it are averaged with their weights:
  ``B + sum_i w_i k_i d_i / sum_i w_i k_i`` (``k_i``: kept and agreeing; 0 where none is);
* ``dare_linear`` / ``dare_ties`` (DARE, Yu et al.): each task vector keeps a random ``--density``
  share of its entries, rescaled by ``1 / density``, then task arithmetic / TIES' sign election and
  disjoint mean; the drops are drawn from ``--seed`` (one generator per tensor and model, so the
  result does not depend on the order tensors are written in).

All models (and the base) must hold the same tensors with the same shapes and the same tokenizer;
the output carries the first model's metadata (config, tokenizer) plus ``merge`` (method, models,
weights and settings). Each tensor is merged in fp32 (quantised ones dequantised) only when the
writer comes to it, from the memory-mapped inputs: memory is about one tensor per model. Written
in the first model's dtype (F32 for a quantised one) or ``--dtype``. Training state
(``__training__.*`` tensors and ``training.*`` keys of checkpoints) is not carried.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties")
NEEDS_BASE = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
DOT_THRESHOLD = 0.9995  # mergekit's: above it, slerp falls back to linear interpolation
_TOKENIZER_KEYS = ("tokenizer.vocabulary", "tokenizer.merges", "tokenizer.model_type", "tokenizer.scores")


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of ``a`` and ``b`` (flattened directions, original magnitudes)."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    na, nb = a64.norm(), b64.norm()
    if na == 0 or nb == 0:
        return ((1 - t) * a.double() + t * b.double()).float()
    dot = float((a64 / na) @ (b64 / nb))
    if abs(dot) > DOT_THRESHOLD:
        return ((1 - t) * a.double() + t * b.double()).float()
    theta = math.acos(dot)
    s = math.sin(theta)
    return ((math.sin((1 - t) * theta) / s) * a.double() + (math.sin(t * theta) / s) * b.double()).float()


def trimmed(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: the ``density`` share of largest-magnitude entries kept, the rest zeroed."""
    k = int(round(density * delta.numel()))
    if k >= delta.numel():
        return delta
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    if k > 0:  # (ties broken by position: topk's order)
        keep[delta.abs().flatten().topk(k).indices] = True
    return delta * keep.view(delta.shape)


def dropped(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's drop and rescale: each entry kept with probability ``density``, kept ones / density."""
    keep = torch.rand(delta.shape, generator=generator) < density
    return delta * keep / density


def ties(base: torch.Tensor, models: list[torch.Tensor], weights: list[float], density: float,
         sparsify=None) -> torch.Tensor:
    """TIES-merging of one tensor (module docstring); ``sparsify(delta, i)`` replaces the trim (DARE)."""
    deltas = [(sparsify(m.float() - base.float(), i) if sparsify else trimmed(m.float() - base.float(), density))
              for i, m in enumerate(models)]
    w = torch.tensor(weights, dtype=torch.float32).view(-1, *([1] * base.dim()))
    stacked = torch.stack(deltas) * w
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    total = (stacked * agree).sum(0)
    norm = (w * agree).sum(0)
    return base.float() + torch.where(norm > 0, total / norm.clamp_min(1e-12), torch.zeros_like(total))


def _check(files: dict) -> list[str]:
    """Names to merge (the first model's, training state left out), checked alike in every file."""
    first_path, first = next(iter(files.items()))
    names = [n for n in first.keys() if not n.startswith("__training__.")]
    for path, f in files.items():
        have = [n for n in f.keys() if not n.startswith("__training__.")]
        missing = sorted(set(names) - set(have)) or sorted(set(have) - set(names))
        if missing:
            where, other = (path, first_path) if set(names) - set(have) else (first_path, path)
            raise ValueError(f"{where}: no tensor {missing[0]!r} (which {other} has); merging needs the same "
                             f"tensors in every model")
        for n in names:
            a, b = first.info(n).shape, f.info(n).shape
            if tuple(a) != tuple(b):
                raise ValueError(f"{path}: tensor {n!r} has shape {list(b)}, {first_path} has {list(a)}; merging "
                                 f"needs the same shapes")
        for key in _TOKENIZER_KEYS:
            if f.metadata.get(key) != first.metadata.get(key):
                raise ValueError(f"{path}: metadata {key} differs from {first_path}'s; merging needs the same "
                                 f"tokenizer")
    return names


def merge(models: list[str | os.PathLike], dst: str | os.PathLike, *, method: str = "linear",
          weights: list[float] | None = None, base: str | os.PathLike | None = None, t: float = 0.5,
          density: float = 0.5, dtype: str = "keep", seed: int = 0) -> dict:
    """Merge ``models`` into ``dst`` (module docstring); returns the written metadata."""
    import apr_kernels
    from apr_kernels._format import APR_DTYPE_OF, QUANTIZED, LazyTensor, TORCH_DTYPES

    from .core import DTYPE_CHOICES

    if method not in METHODS:
        raise ValueError(f"merge: --method {method!r}; expected one of {', '.join(METHODS)}")
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"merge: --dtype {dtype!r}; expected one of {', '.join(DTYPE_CHOICES)}")
    models = [str(m) for m in models]
    if len(models) < (1 if method in NEEDS_BASE else 2):
        raise ValueError(f"merge: --method {method} needs {'a model' if method in NEEDS_BASE else 'two models'} "
                         f"or more; got {len(models)}")
    if method == "slerp" and (len(models) != 2 or weights):
        raise ValueError("merge: --method slerp interpolates exactly two models at --t (no --weights)")
    if (base is not None) != (method in NEEDS_BASE):
        raise ValueError(f"merge: --base is {'required' if method in NEEDS_BASE else 'only for the task-vector methods'}"
                         f" with --method {method}")
    weights = list(weights) if weights else [1.0] * len(models)
    if len(weights) != len(models):
        raise ValueError(f"merge: {len(weights)} --weights for {len(models)} models; expected one per model")
    if method == "linear" and not sum(weights) > 0:
        raise ValueError(f"merge: --weights {weights} sum to {sum(weights)}; expected a positive sum")
    if not 0.0 <= t <= 1.0 or not 0.0 < density <= 1.0:
        raise ValueError(f"merge: --t {t}, --density {density}; expected 0 <= t <= 1 and 0 < density <= 1")
    if Path(dst).resolve() in {Path(p).resolve() for p in models + ([str(base)] if base else [])}:
        raise ValueError(f"merge: the output {dst} is one of the inputs")

    files = {p: apr_kernels.open(p) for p in models + ([str(base)] if base is not None else [])}
    try:
        names = _check(files)
        inputs = [files[p] for p in models]
        base_file = files[str(base)] if base is not None else None

        index = {name: i for i, name in enumerate(names)}

        def drop(name: str):  # DARE: a generator per (tensor, model) from the seed
            return lambda delta, i: dropped(delta, density, torch.Generator().manual_seed(
                (seed * 1_000_003 + index[name]) * 1_009 + i))

        def merged(name: str) -> torch.Tensor:
            ts = [f.get_tensor(name, dtype=torch.float32) for f in inputs]
            if method == "linear":
                return sum(w * x for w, x in zip(weights, ts)) / sum(weights)
            if method == "slerp":
                return slerp(t, ts[0], ts[1])
            b = base_file.get_tensor(name, dtype=torch.float32)
            if method == "task_arithmetic":
                return b + sum(w * (x - b) for w, x in zip(weights, ts))
            if method == "dare_linear":
                return b + sum(w * drop(name)(x - b, i) for i, (w, x) in enumerate(zip(weights, ts)))
            return ties(b, ts, weights, density, sparsify=drop(name) if method == "dare_ties" else None)

        first = inputs[0]
        out = {}
        for name in names:
            stored = first.info(name).dtype
            apr_dtype = DTYPE_CHOICES[dtype] or ("F32" if stored in QUANTIZED else stored)
            if apr_dtype not in TORCH_DTYPES or not TORCH_DTYPES[apr_dtype].is_floating_point:
                raise ValueError(f"{models[0]}: tensor {name!r} is {stored}; merging needs floating-point tensors")
            tdtype = TORCH_DTYPES[apr_dtype]
            out[name] = LazyTensor(APR_DTYPE_OF[tdtype], tuple(first.info(name).shape),
                                   lambda name=name, tdtype=tdtype: merged(name).to(tdtype).contiguous())
        meta = {k: v for k, v in first.metadata.items() if not k.startswith("training.")}
        meta["merge"] = {"method": method, "models": models, "weights": weights,
                         **({"base": str(base)} if base is not None else {}),
                         **({"t": t} if method == "slerp" else {}),
                         **({"density": density} if method in ("ties", "dare_linear", "dare_ties") else {}),
                         **({"seed": seed} if method.startswith("dare") else {})}
        apr_kernels.save(out, dst, metadata=meta)
    finally:
        for f in files.values():
            f.close()
    return meta
