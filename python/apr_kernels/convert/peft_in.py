"""A PEFT LoRA adapter folder merged into the model while converting (``convert SRC DST --adapter DIR``).

Reads ``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT writes them
(``base_model.model.<module>.lora_A.weight`` [r, in] and ``.lora_B.weight`` [out, r]) and replaces
each adapted weight by ``W + scale B A``, computed in fp32 when the tensor is written and rounded
once to W's dtype. ``scale`` is PEFT's: ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), with
``rank_pattern`` / ``alpha_pattern`` overrides for modules whose name ends with a pattern key. A DoRA
adapter (``use_dora``; ``<module>.lora_magnitude_vector`` [out]) merges as PEFT merges it: each row of
``W + scale B A`` rescaled to its magnitude. Adapter kinds whose merge is not this (``fan_in_fan_out``,
trained ``modules_to_save``, bias training) are refused by name rather than merged wrongly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from apr_kernels._format import TORCH_DTYPES, LazyTensor

PREFIX = "base_model.model."


def _pattern(patterns: dict, module: str, default):
    """PEFT's per-module override: the value of the longest key the module name ends with."""
    keys = [k for k in patterns if module == k or module.endswith("." + k)]
    return patterns[max(keys, key=len)] if keys else default


class _StateDict:
    """A loaded state dict with safe_open's reading interface."""

    def __init__(self, state: dict):
        self.state = state

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.state = {}

    def keys(self):
        return self.state.keys()

    def get_tensor(self, name: str):
        t = self.state[name]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"adapter entry {name!r} is a {type(t).__name__}; expected a tensor")
        return t


def _adapter_tensors(path: Path):
    """The adapter's tensors, ``keys()`` / ``get_tensor(name)`` in a ``with``: safetensors, or an older
    adapter_model.bin read as ``convert`` reads PyTorch pickles (weights only)."""
    if path.suffix == ".bin":
        from .hf import torch_state_dict

        return _StateDict(torch_state_dict(path))
    from safetensors import safe_open

    return safe_open(str(path), framework="pt")


def merge_adapter(tensors: dict[str, LazyTensor], folder: str | Path) -> tuple[dict[str, LazyTensor], dict]:
    """(``tensors`` (HF name -> LazyTensor) with the adapter of ``folder`` merged in, the metadata to
    record as ``lora_merged``: where from, rank, alpha, the modules)."""
    folder = Path(folder)
    cfg_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not weights.is_file() and (folder / "adapter_model.bin").is_file():  # older PEFT: a PyTorch pickle
        weights = folder / "adapter_model.bin"
    if not cfg_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"{folder}: expected a PEFT adapter folder with adapter_config.json and "
                                f"adapter_model.safetensors (or adapter_model.bin)")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r}; expected 'LORA'")
    if cfg.get("fan_in_fan_out"):
        raise ValueError(f"{cfg_path}: fan_in_fan_out=True is not supported (its merge is not W + scale B A)")
    dora = bool(cfg.get("use_dora"))
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise ValueError(f"{cfg_path}: bias={cfg.get('bias')!r}, modules_to_save={cfg.get('modules_to_save')!r}; "
                         f"expected an adapter of LoRA matrices only (bias 'none', no modules_to_save)")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    rslora = bool(cfg.get("use_rslora"))
    out = dict(tensors)
    merged = []
    with _adapter_tensors(weights) as f:
        names = list(f.keys())
        modules = sorted({n[len(PREFIX):-len(".lora_A.weight")] for n in names
                          if n.startswith(PREFIX) and n.endswith(".lora_A.weight")})
        kinds = (".lora_A.weight", ".lora_B.weight") + ((".lora_magnitude_vector",) if dora else ())
        unknown = [n for n in names if not n.endswith(kinds)]
        if unknown or not modules:
            raise ValueError(f"{weights}: tensors {unknown[:3] or names[:3]} are not LoRA A/B matrices named "
                             f"{PREFIX}<module>.lora_A.weight / .lora_B.weight")
        for module in modules:
            name = f"{module}.weight"
            if name not in out:
                raise ValueError(f"{weights}: adapter for {module!r}, which the model does not have")
            rank = _pattern(cfg.get("rank_pattern") or {}, module, r)
            a_name, b_name = f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"
            a, b = f.get_tensor(a_name), f.get_tensor(b_name)
            base = out[name]
            if a.shape[0] != rank or b.shape[1] != rank or (b.shape[0], a.shape[1]) != tuple(base.shape):
                raise ValueError(f"{weights}: {module}: A {list(a.shape)}, B {list(b.shape)} do not make a rank-"
                                 f"{rank} update of the {list(base.shape)} weight")
            scale = _pattern(cfg.get("alpha_pattern") or {}, module, alpha) / (math.sqrt(rank) if rslora else rank)
            magnitude = None
            if dora:
                m_name = f"{PREFIX}{module}.lora_magnitude_vector"
                if m_name not in names:
                    raise ValueError(f"{weights}: use_dora adapter without {m_name}")
                magnitude = f.get_tensor(m_name)
                if tuple(magnitude.shape) != (base.shape[0],):
                    raise ValueError(f"{weights}: {m_name} has shape {list(magnitude.shape)}; expected "
                                     f"[{base.shape[0]}] (one magnitude per output row)")
            out[name] = _merged(base, a, b, scale, magnitude)
            merged.append(module)
    return out, {"source": str(folder.resolve()), "rank": r, "alpha": alpha, "use_rslora": rslora,
                 **({"use_dora": True} if dora else {}), "modules": merged}


def _merged(base: LazyTensor, a: torch.Tensor, b: torch.Tensor, scale: float,
            magnitude: torch.Tensor | None = None) -> LazyTensor:
    if base.dtype not in TORCH_DTYPES or not TORCH_DTYPES[base.dtype].is_floating_point:
        raise ValueError(f"cannot merge an adapter into a {base.dtype} weight; expected a float weight "
                         f"(convert from the unquantised model)")

    def value():
        from apr_kernels.model.lora import merged

        w = base.materialize()
        return merged(w, a, b, scale, w.dtype, magnitude)

    return LazyTensor(base.dtype, base.shape, value)
