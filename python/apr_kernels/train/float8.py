"""Float8 training (``train --float8 RECIPE``): the decoder layers' dense projections multiply in
float8 through torchao's ``Float8Linear``, as torchtitan's float8 converter does.

What changes: each converted projection casts its input, its weight and (in the backward) the
output's gradient to float8 with dynamic scales (``tensorwise``: one scale per tensor, the fastest;
``rowwise``: one per row, closer to bf16; ``rowwise_with_gw_hp``: rowwise, the weight gradient's GEMM in
high precision) and runs its GEMMs on float8 tensor cores. What does not: the parameters, their
gradients and the optimizer state stay in their own dtype, so checkpoints, resuming and every other
command are unchanged (the state dict has the same names and dtypes).

Which projections: the attention's q/k/v/o and the dense MLP's gate/up/down (Qwen2-MoE's shared
expert too) whose two dimensions are multiples of 16 (float8 GEMMs need them). Kept in high
precision, as torchtitan keeps them: the embedding, the output head (the fused linear cross-entropy
reads it, and the logits need the precision), the routers and the experts (the grouped GEMM).
Under float8 the attention's q/k/v run as three GEMMs, not the fast path's one GEMM on concatenated
weights (each is its own float8 cast and scale).

Where: after loading and tensor-parallel splitting (below), before FSDP's ``fully_shard``
(``distributed.from_apr`` converts on the meta device first), before ``torch.compile``. On CUDA it
needs float8 tensor cores (compute capability 8.9: H100, H200, L4, RTX 4090 and later) and is fast
only compiled (``--compile``: the casts fuse into a few kernels); elsewhere torchao's emulation runs
the same casts and scales with high-precision GEMMs, to check a run on CPU, not for speed.

Evaluation runs in high precision (``high_precision``): the eval loss is the saved model's, as
``apr-kernels eval`` and any bf16 use of the checkpoint see it, and it does not depend on how the
held-out batches are split over ranks (a float8 scale would be each batch's).

Tensor parallelism: a cast whose scale spans the axis the ranks split (``out`` of a column-parallel
q/k/v/gate/up, ``in`` of a row-parallel o/down; any tensorwise scale of them) takes its maximum over
the group (an all-reduce of one value per scale: per tensor, or per row of a rowwise recipe), so a
rank's part of a weight or of an activation gets the scale of the whole tensor or row, as one
process and torchtitan's DTensor-based float8 have it. A scale along an axis each rank holds whole
(a column-parallel input's rows, a weight gradient's scales over the tokens) needs no reduction.

Not combined (each refused with a message): LoRA (the frozen base would need a float8 weight cache)
and context parallelism with ``tensorwise`` or
``rowwise`` (an input scale, or a weight gradient's, spans the tokens, of which a rank holds some).
``rowwise_with_gw_hp`` combines with context parallelism: its scales are each one token's row, one
weight row or the whole weight (which every context-parallel rank holds), and its weight gradients
are high-precision GEMMs, so a rank's positions are cast as one process casts them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import logging
import re

import torch
from torch import nn

RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
# the projections converted, by their Hugging Face names
PROJECTIONS = re.compile(r"(^|\.)(self_attn\.[qkvo]_proj|mlp\.(shared_expert\.)?(gate|up|down)_proj)$")
MIN_CAPABILITY = (8, 9)


def check(recipe: str, device: torch.device, *, lora: bool = False, context_parallel: int = 1,
          seq_len: int | None = None) -> None:
    """Raise ``ValueError`` when ``--float8 recipe`` cannot run here (every reason named). ``seq_len``:
    a multiple of 16, as the weight gradient's float8 GEMM needs its token count to be (checked on
    every device, so that a run checked on CPU also runs on a GPU)."""
    if recipe not in RECIPES:
        raise ValueError(f"--float8 {recipe!r}; expected one of {', '.join(RECIPES)}")
    if seq_len is not None and seq_len % 16:
        raise ValueError(f"--float8 with --seq-len {seq_len}: the weight gradients' float8 GEMMs sum over the "
                         f"tokens, whose count must be a multiple of 16; expected --seq-len a multiple of 16")
    try:
        _import_torchao()
    except Exception as exc:  # noqa: BLE001  (not installed, or a torchao built for another torch)
        raise ValueError(f"--float8 needs torchao's float8 training (pip install 'apr-kernels[float8]', a "
                         f"torchao for this torch {torch.__version__}): {type(exc).__name__}: {exc}") from None
    if lora:
        raise ValueError("--float8 trains the model's own projections; with --lora-rank the base is frozen. "
                         "Expected one of the two")
    if context_parallel != 1 and recipe != "rowwise_with_gw_hp":
        spans = ("each micro-batch's input scale" if recipe == "tensorwise"
                 else "the weight gradients' scales (one per output row or input column, over the tokens)")
        raise ValueError(f"--float8 {recipe} with --context-parallel {context_parallel}: {spans} would span only "
                         f"a rank's positions, so the run would not equal one process; expected --float8 "
                         f"rowwise_with_gw_hp (each scale one token's or one weight's) or --context-parallel 1")
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < MIN_CAPABILITY:
            raise ValueError(f"--float8 needs float8 tensor cores (compute capability >= 8.9: H100, H200, L4, "
                             f"RTX 4090); {torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}")


def _import_torchao():
    """torchao.float8, imported without its start-up noise in every rank's log: the CUDA-only libraries
    it could not load (a CPU torch) and torch's deprecation note on one of its enums."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import torchao.float8
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return torchao.float8


def config(recipe: str, device: torch.device):
    """torchao's ``Float8LinearConfig`` for ``recipe``, emulated off CUDA (same casts, no float8 GEMM)."""
    Float8LinearConfig = _import_torchao().Float8LinearConfig
    cfg = Float8LinearConfig() if recipe == "tensorwise" else Float8LinearConfig.from_recipe_name(recipe)
    return cfg if device.type == "cuda" else dataclasses.replace(cfg, emulate=True)


def eligible(name: str, module: nn.Module) -> bool:
    """A plain projection named in ``PROJECTIONS`` with both dimensions multiples of 16."""
    return (type(module) is nn.Linear and PROJECTIONS.search(name) is not None
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def float8_modules(model: nn.Module) -> list[str]:
    """The names of ``model``'s projections that run in float8."""
    float8_linear = _import_torchao().float8_linear
    return [n for n, m in model.named_modules() if isinstance(m, float8_linear.Float8Linear)]


class _GroupMesh:
    """What torchao's amax reduction asks of a device mesh: the process group to reduce over."""

    def __init__(self, group):
        self.group = group

    def get_group(self):
        return self.group


_AMAX_GROUP = None  # tensor parallelism: the group over which a split projection's scales' amaxes are reduced
# the axis of a projection a cast's scale spans, by the cast's role and whether torchao's axiswise_dim
# is the tensor's last (the weight is cast as weight.t(), [in, out]; the others are [tokens, features])
_SPANS = {"INPUT": ("tokens", "in"), "WEIGHT": ("in", "out"), "GRAD_OUTPUT": ("tokens", "out")}


def _spans_split(hp_tensor, linear_mm_config, kwargs) -> bool:
    """Whether a cast of a tensor-parallel projection needs its amax over the group: a tensorwise
    scale (the whole tensor) of a split projection always; a rowwise one when it spans the split axis
    (``out`` of a column-parallel projection, ``in`` of a row-parallel one, ``_mark_splits``)."""
    split = getattr(linear_mm_config, "split", None)
    if split is None:  # (a projection each rank holds whole)
        return False
    dim = kwargs.get("axiswise_dim")
    if dim is None:
        return True
    role = kwargs["gemm_input_role"].name
    return _SPANS[role][dim % hp_tensor.dim() == hp_tensor.dim() - 1] == split


def _reduce_amax_over_tensor_parallel_group(group) -> None:
    """Tensor parallelism: a float8 cast of a split projection (torchao's ``Float8Linear``: input,
    weight, output gradient, forward and backward) whose scale spans the split axis takes its maximum
    over ``group`` (an all-reduce of one value, or of one per row), so a rank's part of a weight, of a
    row-parallel input or of a column-parallel output gradient gets the scale of the whole tensor or
    of the whole row, as one process computes it (torchtitan's float8 tensor parallelism does the same
    through DTensor). A scale over an axis each rank holds whole (a column-parallel input's rows, a
    rowwise scale over the tokens) is left alone. Installed once per process, in torchao's module
    namespace, where the casts look the function up."""
    global _AMAX_GROUP
    float8_linear = importlib.import_module("torchao.float8.float8_linear")
    cast = getattr(float8_linear, "hp_tensor_to_float8_dynamic", None)
    if cast is None:
        raise ValueError("--float8 with --tensor-parallel: this torchao's Float8Linear has no "
                         "hp_tensor_to_float8_dynamic to reduce its scales over the group; expected torchao >= 0.9")
    if not getattr(cast, "reduces_over_tensor_parallel_group", False):
        def reduced(hp_tensor, float8_dtype, linear_mm_config, **kwargs):
            if _AMAX_GROUP is not None and _spans_split(hp_tensor, linear_mm_config, kwargs):
                kwargs.update(reduce_amax=True, device_mesh=_GroupMesh(_AMAX_GROUP))
            return cast(hp_tensor, float8_dtype, linear_mm_config, **kwargs)

        reduced.reduces_over_tensor_parallel_group = True
        float8_linear.hp_tensor_to_float8_dynamic = reduced
    _AMAX_GROUP = group


@functools.cache
def _split_config_type(split: str):
    """torchao's ``LinearMMConfig`` (a named tuple, handed to every cast of its projection, forward and
    backward) with the projection's split axis as ``split``: ``out`` (column-parallel) or ``in``."""
    LinearMMConfig = importlib.import_module("torchao.float8.float8_training_tensor").LinearMMConfig
    return type(f"{split.capitalize()}SplitLinearMMConfig", (LinearMMConfig,), {"__slots__": (), "split": split})


def _mark_splits(model: nn.Module) -> None:
    """Tell each converted tensor-parallel projection's casts which axis the ranks split
    (``_spans_split``), through the ``LinearMMConfig`` they are handed."""
    from .tensor_parallel import split_dims

    split = split_dims(model)
    for name in float8_modules(model):
        m = model.get_submodule(name)
        m.linear_mm_config = _split_config_type(("out", "in")[split[f"{name}.weight"]])(*m.linear_mm_config)


def _check_split(model: nn.Module, tp) -> None:
    """Under tensor parallelism a projection converts by the shape a rank multiplies by; one whose
    whole shape would convert (one process) but whose part would not is refused by name."""
    from .tensor_parallel import split_dims

    split = split_dims(model)
    for name, m in model.named_modules():
        dim = split.get(f"{name}.weight")
        if dim is None or type(m) is not nn.Linear or PROJECTIONS.search(name) is None:
            continue
        local = (m.out_features, m.in_features)
        whole = tp.whole_shape(local, dim)
        if all(n % 16 == 0 for n in whole) and not all(n % 16 == 0 for n in local):
            raise ValueError(f"--float8 with --tensor-parallel {tp.size}: {name}'s part {list(local)} of "
                             f"{list(whole)} is no multiple of 16 in both dimensions, as float8 GEMMs need; "
                             f"expected a --tensor-parallel that leaves each part a multiple of 16")


def convert(model: nn.Module, recipe: str, device: torch.device) -> list[str]:
    """Swap ``model``'s eligible projections for ``Float8Linear`` (the same parameters); the converted
    names. Refuses a model with LoRA adapters (``check``). Split over tensor-parallel ranks, each
    cast's scale is the whole tensor's or the whole row's."""
    convert_to_float8_training = _import_torchao().convert_to_float8_training
    if getattr(model, "lora", None):
        raise ValueError("--float8 trains the model's own projections; this model has LoRA adapters")
    tp = getattr(model, "tensor_parallel", None)
    if tp is not None and tp.size > 1:
        _check_split(model, tp)
        _reduce_amax_over_tensor_parallel_group(tp.group)
    convert_to_float8_training(model, module_filter_fn=lambda m, name: eligible(name, m),
                               config=config(recipe, device))
    if tp is not None and tp.size > 1:
        _mark_splits(model)
    names = float8_modules(model)
    if not names:
        shapes = [f"{n} ({m.in_features} -> {m.out_features})" for n, m in model.named_modules()
                  if type(m) is nn.Linear and PROJECTIONS.search(n)]
        raise ValueError(f"--float8: no projection of this model has both dimensions a multiple of 16 (float8 "
                         f"GEMMs need them): {', '.join(shapes[:3]) or 'it has none'}")
    converted = set(names)
    for name, module in model.named_modules():  # q/k/v as three float8 GEMMs (see the docstring)
        if hasattr(module, "fused_qkv") and f"{name}.q_proj" in converted:
            module.fused_qkv = False
    return names


@contextlib.contextmanager
def high_precision(model: nn.Module):
    """Within: ``model``'s float8 projections run as plain ``nn.Linear`` (evaluation)."""
    modules = [model.get_submodule(name) for name in float8_modules(model)]
    for m in modules:
        m.forward = functools.partial(nn.Linear.forward, m)
    try:
        yield
    finally:
        for m in modules:
            del m.forward
