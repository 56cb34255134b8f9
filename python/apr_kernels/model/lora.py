"""LoRA: low-rank adapters on the decoder's projections, the rest of the model frozen.

``add_lora(model, rank, alpha, targets)`` turns each targeted ``nn.Linear`` of every decoder layer
(default: all seven projections, q/k/v/o and gate/up/down) into a :class:`LoRALinear`: the same
module with the same ``weight``/``bias`` (Hugging Face names unchanged, frozen) plus ``lora_A``
``[rank, in]`` and ``lora_B`` ``[out, rank]``, so that

    y = x W^T + b + (alpha / rank) * (x A^T) B^T

(PEFT's convention: A starts Kaiming-uniform, B at zero, so training starts from the base model;
with ``rslora`` the scale is ``alpha / sqrt(rank)``, rank-stabilised LoRA, PEFT's ``use_rslora``;
with ``dora`` (DoRA, Liu et al., 2024; PEFT's ``use_dora``) each output row of ``W + scale B A`` is
also rescaled to a trained magnitude ``m`` (``lora_magnitude`` ``[out]``, starting at the rows' norms
of W), the norm taken without gradient as the paper and PEFT do:
``y = m / ||W + scale B A||_row * (x W^T + scale (x A^T) B^T) + b``;
A is drawn from a generator seeded by ``seed``, module by module, so every process and every
sharding of the model starts from the same adapters).
Every other parameter is frozen too (embeddings, norms, biases, the output head); AdamW then keeps
state for the adapters only. A sequence classifier's (reward model's) ``score`` head is the
exception: small and often new, it trains whole, as PEFT's ``modules_to_save`` does for it. The fast path's fused q/k/v GEMM stays one GEMM on the base weights,
the three low-rank terms added to its output.

Quantised base (QLoRA-style, ``from_apr(..., lora_init=..., keep_quantized=True)``): a targeted
projection whose weight the file stores in a block format (Q4_K, Q6_K, APR_Q4, APR_Q8) becomes a
:class:`QuantizedLoRALinear` holding those raw blocks (about 4.5 bits per weight for Q4_K instead of
16 or 32) and dequantising them for each GEMM, in the forward and again in the backward
(:class:`FrozenLinear`), so no dequantised weight outlives its GEMM. Its checkpoints store the same
blocks under the Hugging Face name, bit for bit.

Files: a checkpoint of a LoRA run stores the base weights under their Hugging Face names, the
adapters under ``<module>.lora_A`` / ``.lora_B`` and the settings as metadata ``lora`` (rank, alpha,
targets). ``from_apr`` merges them into the weights by default (``W + (alpha / rank) B A``: a plain
model for ``eval``, ``generate``, ``export`` and ``--init``) or keeps them (``lora="keep"``: resuming).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
import torch.nn.functional as F

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
META_KEY = "lora"


def merged(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
           dtype: torch.dtype, magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """``W + scale * B A`` (DoRA, with ``magnitude``: each row rescaled to it), computed in fp32 and
    rounded once to ``dtype``: every merge of an adapter (the modules, checkpoints, exports, PEFT
    adapters) goes through here."""
    w = weight.float() + (lora_b.float() @ lora_a.float()) * scale
    if magnitude is not None:
        w = w * (magnitude.float() / w.norm(dim=1))[:, None]
    return w.to(dtype)


# Tensor parallelism (train/tensor_parallel.py): weight split dimension -> the adapter parts split
# with it and on which dimension. A column-parallel projection (its rows split) keeps its rows of B
# and of the DoRA magnitude and the whole A; a row-parallel one (its columns split) its columns of A
# and the whole B and magnitude.
ADAPTER_SPLIT = {0: {"lora_B": 0, "lora_magnitude": 0}, 1: {"lora_A": 1}}


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a trainable low-rank update (see the module docstring)."""

    rank: int
    scale: float
    # under tensor parallelism (split_adapters): the group, and the dimension of the weight it splits
    tensor_parallel = None
    split_dim: int | None = None
    # DoRA under --qat (train/qat.py), for a step: the rows' norms of the full-precision
    # ``W + scale B A``, while the frozen weight holds the quantised merged weight's in-place form
    qat_norm = None

    def dora_norm(self) -> torch.Tensor:
        """DoRA: each output row's norm of ``W + scale B A`` (fp32, no gradient; whole rows, the squares
        of a row-parallel projection's ranks' columns summed)."""
        if self.qat_norm is not None:
            return self.qat_norm
        with torch.no_grad():
            w = frozen_weight(self, torch.float32)
            square = (w + (self.lora_B.float() @ self.lora_A.float()) * self.scale).square().sum(dim=1)
            tp = self.tensor_parallel
            return (tp.sum(square) if tp is not None and self.split_dim == 1 else square).sqrt()

    def adapt(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The adapted output from the frozen projection's ``y = x W^T + b``: ``y + scale (x A^T) B^T``,
        with DoRA ``g (y + scale (x A^T) B^T) + (1 - g) b``, ``g = m / ||W + scale B A||_row`` (no gradient
        through the norm). A scale of 0 (``adapters_disabled``) gives ``y``: the base model.

        Split over tensor-parallel ranks, each rank adds its part: the factor every rank uses whole
        (A of a column-parallel projection, B and the magnitude of a row-parallel one, whose ``y``
        is a partial sum that ``leave`` adds up) goes through ``shared``, its partial gradients
        summed over the group; a row's squared norm is summed over the ranks holding its columns."""
        if self.scale == 0:
            return y
        tp = self.tensor_parallel
        a, b = self.factors()
        y = y + F.linear(F.linear(x, a), b) * self.scale
        if not hasattr(self, "lora_magnitude"):
            return y
        mag = self.lora_magnitude
        if tp is not None and self.split_dim == 1:
            mag = tp.shared(mag)
        g = (mag.float() / self.dora_norm()).to(y.dtype)
        y = y * g
        return y if self.bias is None else y + (1 - g) * self.bias.to(y.dtype)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as this rank multiplies by them: split over tensor-parallel ranks, the factor every
        rank uses whole (A of a column-parallel projection, B of a row-parallel one) through
        ``shared``, its partial gradients summed over the group (also the grouped experts' path)."""
        tp, a, b = self.tensor_parallel, self.lora_A, self.lora_B
        if tp is None:
            return a, b
        return (tp.shared(a), b) if self.split_dim == 0 else (a, tp.shared(b))

    def adapter_dim(self, part: str) -> int | None:
        """The dimension tensor-parallel ranks split adapter ``part`` on (None: whole on each)."""
        return None if self.tensor_parallel is None else ADAPTER_SPLIT[self.split_dim].get(part)

    def whole_adapter_shape(self, part: str) -> tuple:
        """The shape of adapter ``part`` in the whole (unsplit) model."""
        shape = tuple(getattr(self, part).shape)
        dim = self.adapter_dim(part)
        return shape if dim is None else self.tensor_parallel.whole_shape(shape, dim)

    def local_adapter(self, part: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's part of the whole model's adapter ``part`` (``full``): a view."""
        dim = self.adapter_dim(part)
        return full if dim is None else self.tensor_parallel.local(full, dim, part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapt(super().forward(x), x)

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W + scale * B A`` (DoRA: rows rescaled to the magnitude) computed in fp32, returned in
        ``dtype`` (default: the weight's)."""
        if self.tensor_parallel is not None:  # (checkpoints merge the gathered whole tensors instead)
            raise ValueError("merged_weight: a projection split over tensor-parallel ranks; expected a whole one")
        w = self.weight
        return merged(w, self.lora_A, self.lora_B, self.scale, dtype or w.dtype, getattr(self, "lora_magnitude", None))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lora_rank={self.rank}, lora_scale={self.scale:g}"


class FrozenLinear(torch.autograd.Function):
    """``y = x W^T + b`` for a frozen ``W = weight(dtype)`` that is made twice, in the forward and in the
    backward (dequantising a quantised base), instead of being kept for the backward. Only ``x`` gets
    a gradient. Under autocast ``W`` is made in the autocast dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight, bias):
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        ctx.weight, ctx.x_dtype = weight, x.dtype
        return F.linear(x, weight(dtype), bias)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        return (dy @ ctx.weight(dy.dtype)).to(ctx.x_dtype), None, None


class FrozenGroupedLinear(torch.autograd.Function):
    """``apr_kernels.grouped_mm(x, W, offs)`` for frozen stacked expert weights ``W = weight(dtype)``
    (``[E, out, in]``, dequantised quantised bases) made twice, in the forward and in the backward, as
    ``FrozenLinear`` does for one projection. Only ``x`` gets a gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, offs: torch.Tensor, weight):
        from apr_kernels import grouped_mm

        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        ctx.weight, ctx.x_dtype = weight, x.dtype
        ctx.save_for_backward(offs)
        return grouped_mm(x.to(dtype), weight(dtype), offs)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from apr_kernels.ops.grouped_mm import _grouped_mm_backward_impl

        (offs,) = ctx.saved_tensors
        dx, _ = _grouped_mm_backward_impl(dy, dy, ctx.weight(dy.dtype), offs, True, False)
        return dx.to(ctx.x_dtype), None, None


def stacked_bases(mods: list, dtype: torch.dtype) -> torch.Tensor:
    """The quantised bases of ``mods`` (``QuantizedLoRALinear``, one shape) dequantised into one
    ``[E, out, in]`` tensor: row-block formats (Q4_K, Q6_K) in one pass over their bytes laid end to
    end, others expert by expert."""
    from apr_kernels.quant import dequantize

    kinds = {m.base.dtype for m in mods}
    out, inp = mods[0].base.shape
    whole = all(m.tensor_parallel is None or m.base_split for m in mods)  # (the bases are what they multiply)
    if len(kinds) == 1 and kinds <= {"Q4_K", "Q6_K"} and whole and all(m.qat_blocks is None for m in mods):
        raw = torch.cat([raw_blocks(m.base) for m in mods])
        return dequantize(kinds.pop(), (len(mods) * out, inp), raw, dtype=dtype).view(len(mods), out, inp)
    return torch.stack([m.base_weight(dtype) for m in mods])


def raw_blocks(base) -> torch.Tensor:
    """The whole raw bytes of a quantised base: its ``data``, or under FSDP its ranks' parts gathered
    (``train/distributed.py``'s ``ShardedBlocks``: a collective)."""
    return base.gather() if hasattr(base, "gather") else base.data


class QuantizedLoRALinear(LoRALinear):
    """A LoRALinear whose frozen weight is ``base``, the file's quantised blocks (a
    ``QuantizedTensor`` on the model's device; under FSDP a ``ShardedBlocks``, this rank's blocks;
    not a parameter, so optimizers, DDP and ``.to`` leave it alone). ``weight`` reads as the
    dequantised fp32 matrix.

    Split over tensor-parallel ranks (``split_adapters``) the base holds this rank's part as a tensor
    of its own (``base_split``: its rows, or its columns when they fill whole blocks, cut out of the
    file's blocks by ``quant.split_blocks``; sharded by FSDP over the ranks holding the same part);
    where the columns would cut blocks (Llama-7B's ``down_proj``: 43 blocks a row) it keeps the whole
    tensor's blocks and each GEMM dequantises them and takes this rank's columns."""

    # base: apr_kernels.io.QuantizedTensor or ShardedBlocks, set by whoever loads the blocks (model/loading.py)
    base_split = False  # tensor parallelism: whether ``base`` is this rank's part (else the whole tensor)
    # --qat (train/qat.py), for a step: the blocks of the quantised merged weight q(M) (``qat.QatBlocks``),
    # so that the module multiplies by q(M) - scale B A (its adapters add scale B A back; DoRA:
    # q(M) / g - scale B A, the module's gain g multiplying); None otherwise
    qat_blocks = None

    @property
    def whole_base_shape(self) -> tuple:
        shape = tuple(self.base.shape)
        return self.tensor_parallel.whole_shape(shape, self.split_dim) if self.base_split else shape

    def whole_base_raw(self) -> torch.Tensor:
        """The whole tensor's raw blocks (a collective when the base is sharded or split)."""
        raw = raw_blocks(self.base)
        if not self.base_split:
            return raw
        from apr_kernels.quant import join_blocks

        tp = self.tensor_parallel
        return join_blocks(self.base.dtype, self.whole_base_shape, list(tp.gather(raw, 0).chunk(tp.size)),
                           self.split_dim)

    def whole_base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The whole (unsplit) frozen weight, dequantised to ``dtype`` (a collective when split)."""
        from apr_kernels.quant import dequantize

        return dequantize(self.base.dtype, self.whole_base_shape, self.whole_base_raw(), dtype=dtype)

    def base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The frozen weight this module multiplies by (this rank's part under tensor parallelism)."""
        from apr_kernels.quant import dequantize

        if self.qat_blocks is not None:  # (--qat's step: q(M) less the adapters' term, made per GEMM)
            return self._qat_weight(dtype)
        w = dequantize(self.base.dtype, self.base.shape, raw_blocks(self.base), dtype=dtype)
        return w if self.tensor_parallel is None or self.base_split else self.tensor_parallel.local(w, self.split_dim)

    def _qat_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``q(M)`` less the adapters' term (DoRA: ``q(g M) / g`` less it), this rank's part of it: the
        weight the module multiplies by within --qat's step (``train/qat.py``'s ``QatBlocks``)."""
        from apr_kernels.quant import dequantize

        b = self.qat_blocks
        raw = b.raw if isinstance(b.raw, torch.Tensor) else b.raw.gather()  # (FSDP: the ranks' shares gathered)
        w = dequantize(b.fmt, b.shape, raw)
        tp = self.tensor_parallel
        if b.inverse_gain is not None:  # (whole rows: a column-parallel rank's part of them when split)
            w = w * (tp.local(b.inverse_gain, 0) if b.split and self.split_dim == 0 else b.inverse_gain)[:, None]
        if tp is not None and not b.split:
            w = tp.local(w, self.split_dim)
        term = (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scale
        return (w - term).to(dtype)

    @property
    def weight(self) -> torch.Tensor:  # merged_weight, export: the dequantised matrix (fp32)
        return self.base_weight(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapt(FrozenLinear.apply(x, self.base_weight, self.bias), x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, base={self.base.dtype}"


def quantize_base(lin: LoRALinear) -> QuantizedLoRALinear:
    """Turn an adapted projection into a QuantizedLoRALinear (its weight parameter is dropped; set
    ``base`` before use)."""
    del lin.weight
    lin.__class__ = QuantizedLoRALinear
    return lin


def frozen_weight(m: nn.Linear, dtype: torch.dtype) -> torch.Tensor:
    """A projection's frozen weight in ``dtype`` (dequantised for a quantised base)."""
    return m.base_weight(dtype) if isinstance(m, QuantizedLoRALinear) else m.weight.to(dtype)


def lora_scale(rank: int, alpha: float, rslora: bool = False) -> float:
    """The adapters' scale: ``alpha / rank``, or rank-stabilised (rsLoRA, PEFT's ``use_rslora``)
    ``alpha / sqrt(rank)``."""
    return alpha / (math.sqrt(rank) if rslora else rank)


def check_settings(rank, alpha, targets) -> tuple[int, float, tuple[str, ...]]:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora: rank={rank!r}; expected a positive int")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"lora: alpha={alpha!r}; expected a positive number")
    targets = tuple(targets)
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"lora: targets {list(targets)}; expected a non-empty subset of {', '.join(TARGETS)}")
    return rank, float(alpha), targets


def add_lora(model, rank: int, alpha: float | None = None, targets=TARGETS, *, base_dtype=None,
             seed: int = 0, rslora: bool = False, dora: bool = False) -> dict:
    """Add adapters to ``model`` in place and freeze everything else; return the settings (the
    ``lora`` metadata of its checkpoints). ``alpha`` defaults to ``2 * rank``. ``base_dtype``: the
    frozen projection weights are cast to it (e.g. bfloat16 on a GPU: half the memory; the adapters
    stay in the model's dtype). On the meta device (a model about to be sharded) the adapters get
    no values: call ``init_adapters`` once the parameters have storage."""
    rank, alpha, targets = check_settings(rank, 2 * rank if alpha is None else alpha, targets)
    if getattr(model, "tensor_parallel", None) is not None:
        raise ValueError("add_lora: the model is split over tensor-parallel ranks already; expected the adapters "
                         "added before (set_tensor_parallel splits them with their projections)")
    for p in model.parameters():
        p.requires_grad_(False)
    if hasattr(model, "score"):  # a reward model's head trains whole (PEFT's modules_to_save for it)
        model.score.weight.requires_grad_(True)
    for layer in model.model.layers:
        if getattr(layer, "pipeline_hole", False):  # (another pipeline stage's layer: not here)
            continue
        _adapt_layer(layer, rank, lora_scale(rank, alpha, rslora), targets, dora, base_dtype)
    settings = {"rank": rank, "alpha": alpha, "targets": list(targets)} | ({"rslora": True} if rslora else {}) \
        | ({"dora": True} if dora else {})
    model.lora = settings
    if next(model.parameters()).device.type != "meta":
        init_adapters(model, seed)
    return settings


def _adapt_layer(layer, rank: int, scale: float, targets, dora: bool = False, base_dtype=None) -> None:
    """``add_lora`` on one decoder layer: each ``targets`` projection (of a mixture-of-experts layer,
    every expert's) made a ``LoRALinear`` in place."""
    for parent in (layer.self_attn, *layer.mlps()):
        for name in targets:
            lin = getattr(parent, name, None)
            if lin is None or isinstance(lin, LoRALinear):
                continue
            lin.__class__ = LoRALinear  # same parameters, same names: no copy
            lin.rank, lin.scale = rank, scale
            w = lin.weight
            lin.lora_A = nn.Parameter(torch.empty(rank, lin.in_features, device=w.device, dtype=w.dtype))
            lin.lora_B = nn.Parameter(torch.empty(lin.out_features, rank, device=w.device, dtype=w.dtype))
            if dora:  # (its values: the rows' norms of W, set by init_adapters)
                lin.lora_magnitude = nn.Parameter(torch.empty(lin.out_features, device=w.device, dtype=w.dtype))
            if base_dtype is not None:
                lin.weight.data = lin.weight.data.to(base_dtype)
                if lin.bias is not None:
                    lin.bias.data = lin.bias.data.to(base_dtype)


def _absent_layer_adapters(model, index: int) -> list[tuple[str, LoRALinear]]:
    """(name within the layer, adapted projection) of decoder layer ``index`` of the whole model, which
    another pipeline stage holds: a layer of the model's config built on the meta device and adapted
    alike (its own kind: dense or sparse, every expert), in module order."""
    from .transformer import Block

    lora = getattr(model, "lora", None)
    if not lora:  # (no adapters anywhere)
        return []
    with torch.device("meta"):
        layer = Block(model.config, index)
    _adapt_layer(layer, lora["rank"], 1.0, lora["targets"], lora.get("dora", False))
    return [(sub, t) for sub, t in layer.named_modules() if isinstance(t, LoRALinear)]


def split_adapters(old: LoRALinear, new: nn.Linear, tp, dim: int) -> None:
    """Make ``new`` (this rank's part of ``old``'s weight, split on ``dim`` over tensor-parallel group
    ``tp``) an adapted projection holding its parts of ``old``'s adapters (``ADAPTER_SPLIT``)."""
    new.__class__ = type(old)
    new.rank, new.scale, new.tensor_parallel, new.split_dim = old.rank, old.scale, tp, dim
    for part in ("lora_A", "lora_B", "lora_magnitude"):
        if hasattr(old, part):
            whole = getattr(old, part)
            local = new.local_adapter(part, whole)
            local = local.contiguous() if local.is_meta else local.detach().clone(memory_format=torch.contiguous_format)
            setattr(new, part, nn.Parameter(local,
                                            requires_grad=whole.requires_grad))


@torch.no_grad()
def init_adapters(model, seed: int = 0, whole_weight=None) -> None:
    """A Kaiming-uniform (PEFT's ``a = sqrt(5)``) from a CPU generator seeded with ``seed``, in module
    order; B zero. A sharded (FSDP) adapter receives its rows of the same full matrix, a split
    (tensor-parallel) one its part of it, and with expert parallelism the draws of the experts other
    ranks hold are made and dropped. ``whole_weight(name)``: the whole frozen weight of projection
    ``name``, for the DoRA magnitudes of row-parallel projections (rows spanning the group's parts)."""
    from apr_kernels.train.distributed import copy_into

    g = torch.Generator().manual_seed(seed)
    for name, (m, held) in whole_model_adapters(model).items():
        a = torch.empty(m.whole_adapter_shape("lora_A"), dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
        if not held:  # another rank's expert (expert parallelism): drawn all the same, so every
            continue  # rank's adapters are those of the whole model
        copy_into(m.lora_A, m.local_adapter("lora_A", a), f"{name}.lora_A")
        copy_into(m.lora_B, torch.zeros(tuple(m.lora_B.shape)), f"{name}.lora_B")
        if hasattr(m, "lora_magnitude") and m.split_dim == 1:  # (each rank holds some of every row)
            if whole_weight is None and not isinstance(m, QuantizedLoRALinear):
                raise ValueError(f"{name}: a DoRA magnitude of a row-parallel projection; expected the whole "
                                 f"weight (init_adapters' whole_weight) for its rows' norms")
            w = m.whole_base_weight(torch.float32) if isinstance(m, QuantizedLoRALinear) else whole_weight(name)
            copy_into(m.lora_magnitude, w.float().norm(dim=1), f"{name}.lora_magnitude")
        elif hasattr(m, "lora_magnitude"):  # DoRA starts from the base: m = ||W||_row (B is 0)
            w = frozen_weight(m, torch.float32)
            if hasattr(w, "to_local"):  # FSDP: the magnitude's rows are the weight's rows (both Shard(0))
                m.lora_magnitude.to_local().copy_(w.to_local().norm(dim=1))
            else:
                copy_into(m.lora_magnitude, w.norm(dim=1), f"{name}.lora_magnitude")


def lora_modules(model) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def whole_model_adapters(model) -> dict[str, tuple[LoRALinear, bool]]:
    """name -> (adapted projection, held) of the whole model in module order: ``lora_modules`` and,
    with expert parallelism, at each other rank's expert (``RemoteExpert``) its projections' names
    with a held expert's of the same layer standing in (shapes, scale), ``held`` False; likewise with
    pipeline parallelism at each other stage's decoder layer a meta-device layer's of its kind
    (``_absent_layer_adapters``: the whole layer, every expert)."""
    from .moe import Experts, RemoteExpert

    out, template = {}, None
    for name, m in model.named_modules():
        if getattr(m, "pipeline_hole", False):
            out.update({f"{name}.{sub}": (t, False) for sub, t in _absent_layer_adapters(model, m.layer)})
        elif isinstance(m, Experts):
            template = m.local()[0]
        elif isinstance(m, RemoteExpert):
            out.update({f"{name}.{sub}": (t, False) for sub, t in template.named_modules()
                        if isinstance(t, LoRALinear)})
        elif isinstance(m, LoRALinear):
            out[name] = (m, True)
    return out


@contextlib.contextmanager
def adapters_disabled(model):
    """The base model for the time of the block: every adapter's scale set to 0 (its term adds exact
    zeros), restored after: GRPO's reference model under LoRA. Inside a ``--qat`` step (``model.qat_window``,
    train/qat.py) the base is the full-precision one, as a full fine-tune's reference model is."""
    modules = list(lora_modules(model).values())
    scales = [m.scale for m in modules]
    window = getattr(model, "qat_window", None)
    with window.full_precision() if window is not None else contextlib.nullcontext():
        for m in modules:
            m.scale = 0.0
        try:
            yield model
        finally:
            for m, scale in zip(modules, scales):
                m.scale = scale


@torch.no_grad()
def merge_into_weights(model) -> None:
    """Fold every adapter into its weight and turn the modules back into plain ``nn.Linear`` (the
    model is then an ordinary one; every parameter trainable again)."""
    for m in lora_modules(model).values():
        if isinstance(m, QuantizedLoRALinear):  # a plain parameter again, in the adapters' dtype
            merged = m.merged_weight(m.lora_A.dtype)
            del m.lora_A, m.lora_B, m.base
            if hasattr(m, "lora_magnitude"):
                del m.lora_magnitude
            m.__class__ = nn.Linear
            m.weight = nn.Parameter(merged)
            continue
        m.weight.data = m.merged_weight()
        del m.lora_A, m.lora_B
        if hasattr(m, "lora_magnitude"):
            del m.lora_magnitude
        m.__class__ = nn.Linear
    for p in model.parameters():
        p.requires_grad_(True)
    model.lora = None
