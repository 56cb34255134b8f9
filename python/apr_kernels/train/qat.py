"""Quantisation-aware training (``train --qat q4k|q6k|q8|q4|q4km|gguf:KIND``): train the weights that
``apr-kernels convert model.apr out.apr --quantize KIND`` will store (``gguf:KIND``: that ``export
model.apr out.gguf --quantize KIND`` writes for llama.cpp, in its GGML types, ``ggml_quant.py``), so
the quantised file loses less than quantising after training does.

Each training step runs its forwards and backwards on the weights as the quantised file will hold
them: every tensor that ``--quantize`` quantises, in the format it gets there (``convert.recipe``:
one format for the uniform kinds, llama.cpp's Q4_K/Q6_K mixture for ``q4km``), is replaced in place
by ``quant.fake_quantize``, the same quantiser and block layout as the converter's (Q4_K/Q6_K as
llama-quantize writes them, APR_Q8/APR_Q4 as aprender does), and put back before the optimizer step.
So the gradient is the quantised model's, applied to the full-precision weights (the
straight-through estimator, as BinaryConnect and torchao's QAT use it): the forward sees exactly the
deployed weights, every code path (fused q/k/v, grouped experts, the fused loss) reads them
unchanged, and the checkpoints keep the full-precision weights (``convert --quantize`` then writes
what training saw).

Under FSDP each rank replaces its own rows: Q4_K and Q6_K (blocks within each row) and APR_Q4 on
rows of whole 32-value blocks quantise the rows alone; APR_Q8 (one scale per tensor) and APR_Q4 on
other widths gather the whole tensor first. Under tensor parallelism likewise per split tensor: a
rank's rows (column-parallel projections, a vocabulary split) as under FSDP; a rank's columns
(row-parallel ``o_proj``/``down_proj``) alone where they are whole blocks of the rows (Q4_K/Q6_K:
a multiple of 256 columns a rank, APR_Q4: of 32), else the group's parts joined, quantised whole
and this rank's cut back out; the format is the one the whole tensor gets. Costs: a copy of those
weights (to put them back) and one quantisation of each per optimizer step (shared by the step's
micro-batches).

Evaluations report both losses: ``eval_loss`` of the weights as saved and ``eval_loss_quantized``
of the quantised file. The post-training step loops (``posttrain.StepLoop``) keep the window open
from ``_start_step`` to ``_finish_step``, so an RL step's sampling runs on the quantised weights too
(a reference model keeps its own); their evaluations run twice, the quantised one's values logged
as ``<name>_quantized``.

With LoRA the converter writes each adapted projection's merged weight ``M = W + scale B A``,
quantised, so that is the weight to train for: within the window the frozen ``W`` holds
``q(M) - scale B A`` (``FakeQuantizer``), the projection adds its adapters' term back and multiplies
by ``q(M)``, and A and B get the merged weight's gradient through the merge (the straight-through
estimator, as for a full weight). The base model with the adapters off (GRPO/RLOO/online DPO's
reference under LoRA) is the full-precision one, as a full fine-tune's reference model is.
A quantised base (QLoRA, ``--lora-quantized-base``): the converter dequantises it, merges and
quantises again, so each step quantises ``M = base + scale B A`` once into compact blocks
(``QuantizedLoRALinear.qat_blocks``) and each GEMM dequantises them less the adapters' term (under
FSDP and tensor parallelism each rank gathers the base and the adapters, quantises the whole merged
weight and keeps the blocks it multiplies by; APR kinds).

DoRA: the converter writes ``M = g (W + scale B A)``, each row rescaled by ``g = magnitude / ||W +
scale B A||_row``, quantised. Within the window the frozen ``W`` holds ``q(M) / g - scale B A`` (a
quantised base: its blocks of ``q(M)`` and ``1 / g``) and the module takes ``g`` from the
full-precision weight's row norms (``LoRALinear.qat_norm``, set here: the frozen weight now holds
another), so it multiplies by ``q(M)``. A and B get the merged weight's gradient through the merge;
the magnitude gets ``<G_r, q(M)_r> / m_r`` (``G`` the quantised weight's gradient), the derivative of
the quantised rows themselves: a block format's scales follow a row's scale, so ``q(c M_r) = c
q(M_r)`` up to the rounding of those scales, where the plain straight-through estimator would take
the full-precision row's direction instead (APR_Q8's one scale per tensor does not follow a row, but
its 8-bit grid keeps ``q(M)`` within half a step of ``M``, where the two agree).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import nn

from apr_kernels.convert.recipe import FLOAT_DTYPES, GGUF_PREFIX, Layout, check_kind, run_format
from apr_kernels.ggml_quant import ROW_BLOCK as GGML_ROW_BLOCK, _inverse


def check(kind: str, *, quantized_base: bool = False) -> None:
    check_kind(kind, "--qat", gguf=True)
    if quantized_base and kind.startswith(GGUF_PREFIX):
        raise ValueError(f"--qat {kind} with --lora-quantized-base: a quantised base trains for the APR kinds (q4k, "
                         f"q6k, q8, q4, q4km), whose blocks it keeps per step; expected one of those, or a float base")


def _split_dims(model: nn.Module) -> dict[str, int]:
    from .tensor_parallel import split_dims

    return split_dims(model)


def targets(model: nn.Module, kind: str) -> list[tuple[str, nn.Parameter, str]]:
    """The parameters ``convert --quantize kind`` stores in blocks, each once (a tied head is the
    embedding), with the APR format it stores each in (``convert.recipe.apr_format``; split over
    tensor-parallel ranks, the whole tensor's); for ``gguf:KIND`` those ``export --quantize KIND``
    quantises, with their GGML types (``recipe.run_format``)."""
    layout = Layout.of_config(model.config)
    split, tp = _split_dims(model), getattr(model, "tensor_parallel", None)
    out = []
    for name, p in model.named_parameters():  # (each parameter once, by its first name)
        if name.rsplit(".", 1)[-1].startswith("lora_"):  # (LoRA adapters: merged into their weight)
            continue
        shape = tp.whole_shape(p.shape, split[name]) if name in split else p.shape
        fmt = run_format(kind, name, shape, layout) if p.is_floating_point() else None
        if fmt is not None:
            out.append((name, p, fmt))
    return out


# the values of one block along a row, for the formats whose blocks stay within rows (GGML's: rows of
# whole blocks, as recipe.ggml_type picks them)
_ROW_BLOCK = {"APR_Q4": 32, **GGML_ROW_BLOCK}


def _rows_alone(fmt: str, cols: int) -> bool:
    """Whether ``fmt`` quantises each row of ``cols`` values on its own (FSDP's row shards need no gather)."""
    return fmt in _ROW_BLOCK and (fmt != "APR_Q4" or cols % 32 == 0)


def _part_alone(fmt: str, local_shape, dim: int) -> bool:
    """Whether a tensor-parallel rank's part (split on ``dim``, of ``local_shape``) quantises alone as
    the whole tensor's blocks there: whole rows, or columns that are whole blocks of each row."""
    if dim == 0:
        return _rows_alone(fmt, local_shape[-1])
    block = _ROW_BLOCK.get(fmt)
    return block is not None and local_shape[-1] % block == 0


def _placed_like(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``t`` (this rank's values of a tensor shaped and placed as ``p``) as a DTensor like ``p`` when
    ``p`` is one (FSDP), else ``t``."""
    if not hasattr(p, "full_tensor"):
        return t
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _whole_adapter(m, part: str) -> torch.Tensor:
    """Adapter ``part`` of LoRA module ``m`` whole, as one process holds it: gathered over FSDP's shards
    and tensor-parallel ranks (collectives) where it is split."""
    from .distributed import full_tensor

    t, dim = full_tensor(getattr(m, part)), m.adapter_dim(part)
    return t if dim is None else m.tensor_parallel.gather(t, dim)


class QatBlocks(NamedTuple):
    """A quantised base's merged weight for the step (``QuantizedLoRALinear.qat_blocks``): its blocks in
    ``fmt`` of ``shape`` (``raw``: a tensor, or FSDP's ``ShardedBlocks``), DoRA's ``1 / g`` for the
    whole rows (None without DoRA), and whether the blocks are this tensor-parallel rank's part
    (``split``) or the whole tensor's."""

    fmt: str
    shape: tuple
    raw: object
    inverse_gain: torch.Tensor | None
    split: bool


def _adapter_term(m) -> torch.Tensor:
    """This rank's part of ``scale * B A`` (fp32), the part of the weight it holds: FSDP's rows of B
    times the whole A; under tensor parallelism the rank's rows of B (column-parallel) or columns of A
    (row-parallel) times the whole other factor (``lora.ADAPTER_SPLIT``), as the merge computes it."""
    from .distributed import full_tensor, local_part

    return (local_part(m.lora_B).float() @ full_tensor(m.lora_A).float()) * m.scale


class FakeQuantizer:
    """``applied()``: within, ``model``'s target weights hold their quantised values.

    With LoRA (``model/lora.py``) the converted file stores each adapted projection's merged weight
    ``M = W + scale B A``, quantised: within, its frozen ``W`` holds ``q(M) - scale B A``, so the
    projection (which adds ``scale (x A^T) B^T``) multiplies by ``q(M)``, and the gradients of A and B
    are those of the merged weight (the straight-through estimator through the merge).
    ``full_precision()``, inside: the full-precision weights for a while (LoRA's reference, the base
    model with the adapters off: ``lora.adapters_disabled`` takes it)."""

    def __init__(self, model: nn.Module, kind: str):
        from apr_kernels.model.lora import QuantizedLoRALinear, lora_modules

        self.model = model
        self.params = targets(model, kind)
        self.split, self.tp = _split_dims(model), getattr(model, "tensor_parallel", None)
        # LoRA: weight name -> its adapted projection (the file stores the merged weight)
        self.adapted = {f"{n}.weight": m for n, m in lora_modules(model).items()}
        # QLoRA: quantised bases (not parameters) -> the APR format the converter writes their merged weight in
        bases = {n: m for n, m in self.adapted.items() if isinstance(m, QuantizedLoRALinear)}
        check(kind, quantized_base=bool(bases))
        layout = Layout.of_config(model.config)
        self.bases = [(m, fmt) for n, m in bases.items()
                      if (fmt := run_format(kind, n, m.whole_base_shape, layout)) is not None]
        self._saved = None

    def quantised(self, name: str, p: torch.Tensor, fmt: str) -> torch.Tensor:
        """This rank's part of ``p`` as the quantised file holds it (in APR format or GGML type ``fmt``)."""
        from apr_kernels.ggml_quant import fake_quantize

        from .distributed import full_tensor, local_part, local_shard

        dim = self.split.get(name)
        if dim is not None and not _part_alone(fmt, p.shape, dim):  # (the group's parts joined: a collective)
            tp = self.tp
            part = tp.local(fake_quantize(fmt, tp.gather(full_tensor(p), dim)), dim, name)
            return local_shard(part, p, name) if hasattr(p, "full_tensor") else part
        if hasattr(p, "full_tensor") and not _rows_alone(fmt, p.shape[-1]):
            return local_shard(fake_quantize(fmt, full_tensor(p)), p, name)
        return fake_quantize(fmt, local_part(p))

    @contextlib.contextmanager
    def applied(self):
        from .distributed import local_part

        saved = []
        try:
            with torch.no_grad():
                for name, p, fmt in self.params:
                    local = local_part(p)
                    adapter = self.adapted.get(name)
                    if adapter is None:
                        quantised = self.quantised(name, p, fmt)
                    else:  # the merged weight's quantised values, less the adapters' term the module adds
                        term = _adapter_term(adapter)
                        merged = local.float() + term
                        gain = self._dora_gain(adapter, merged)
                        if gain is not None:  # (DoRA: q(M) / g - scale B A, the module multiplies by g)
                            merged = merged * gain[:, None]
                        quantised = self.quantised(name, _placed_like(merged.to(local.dtype), p), fmt).float()
                        quantised = (quantised if gain is None else quantised * _inverse(gain)[:, None]) - term
                    saved.append((local, local.clone()))
                    local.copy_(quantised)
            self._quantise_bases()
            self._saved, self.model.qat_window = saved, self
            yield
        finally:
            self._saved, self.model.qat_window = None, None
            for m, _fmt in self.bases:
                m.qat_blocks = None
            for m in self.adapted.values():
                m.qat_norm = None
            with torch.no_grad():
                for local, original in saved:
                    local.copy_(original)

    def _dora_gain(self, m, merged: torch.Tensor, whole: bool = False) -> torch.Tensor | None:
        """DoRA's row gains ``g = magnitude / ||W + scale B A||_row`` for this rank's part ``merged`` of
        ``W + scale B A`` (``whole``: all of it; fp32; None without DoRA), as the converter's merge
        computes them. Sets ``m.qat_norm``, the norms the module takes for the step, of the
        full-precision weight (the frozen one then holds another): whole rows (a row-parallel
        projection's ranks' squares summed) and, under FSDP, all of them (the forward sees the
        gathered module)."""
        if not hasattr(m, "lora_magnitude"):
            return None
        from .distributed import full_tensor, local_part

        mag = m.lora_magnitude
        if whole:  # (the module's norms: its rows, a column-parallel rank's part of them)
            norm = merged.norm(dim=1)
            m.qat_norm = m.local_adapter("lora_magnitude", norm)
            return _whole_adapter(m, "lora_magnitude").float() / norm
        if self.tp is not None and m.split_dim == 1:
            norm = self.tp.sum(merged.square().sum(dim=1)).sqrt()
        else:
            norm = merged.norm(dim=1)
        m.qat_norm = full_tensor(_placed_like(norm, mag)) if hasattr(mag, "full_tensor") else norm
        return local_part(mag).float() / norm

    @torch.no_grad()
    def _quantise_bases(self) -> None:
        """QLoRA: each quantised base's merged weight ``M = dequantised base + scale B A`` (DoRA: its rows
        rescaled, ``g M``) quantised as the converter will (raw blocks, kept compact for the step;
        ``QuantizedLoRALinear.qat_blocks``, with ``1 / g`` for DoRA). Every rank quantises the whole
        merged weight (under FSDP and tensor parallelism it gathers the base's blocks and the adapters
        first) and keeps what its GEMMs multiply by: split over tensor-parallel ranks, its part where
        that is whole blocks of the format (``quant.split_blocks``), else the whole tensor's blocks, as
        the base is kept; under FSDP its share of those (``ShardedBlocks``, gathered per GEMM as the
        base's are)."""
        from apr_kernels.quant import _quantize_raw, split_blocks

        from .distributed import ShardedBlocks

        for m, fmt in self.bases:
            m.qat_blocks = None
            tp, shape = m.tensor_parallel, m.whole_base_shape
            term = (_whole_adapter(m, "lora_B").float() @ _whole_adapter(m, "lora_A").float()) * m.scale
            merged = m.whole_base_weight(torch.float32) + term
            gain = self._dora_gain(m, merged, whole=True)
            raw = _quantize_raw(fmt, merged if gain is None else merged * gain[:, None])
            part = None if tp is None else split_blocks(fmt, shape, raw, m.split_dim, tp.rank, tp.size)
            if part is not None:
                shape, raw = part
            if hasattr(m.base, "gather"):
                raw = ShardedBlocks(fmt, shape, raw, raw.device, m.base.group)
            m.qat_blocks = QatBlocks(fmt, shape, raw, None if gain is None else _inverse(gain), part is not None)

    @contextlib.contextmanager
    def full_precision(self):
        """Inside ``applied()``: the full-precision weights for the time of the block, the quantised
        ones back after (each swapped through a copy, one tensor at a time)."""
        saved = self._saved or []

        def swap():
            with torch.no_grad():
                for local, original in saved:
                    held = local.clone()
                    local.copy_(original)
                    original.copy_(held)
            for i, (m, _fmt) in enumerate(self.bases):  # (QLoRA: the stored base, or the step's blocks again)
                m.qat_blocks, held_blocks[i] = held_blocks[i], m.qat_blocks

        held_blocks = [None] * len(self.bases)

        swap()
        try:
            yield
        finally:
            swap()


def quantize_as_converted(model: nn.Module, kind: str, path) -> int:
    """Make ``model`` (loaded from the APR file ``path``) hold, for good, the weights ``convert path
    out.apr --quantize KIND`` would write: its targets quantised and dequantised, except the tensors the
    file already stores in blocks (the converter passes those through); for ``gguf:KIND`` the weights
    of the GGUF file ``export path out.gguf --quantize KIND`` writes (a file in blocks is refused, as
    there). ``eval --quantize``. Returns how many tensors changed."""
    import apr_kernels
    from apr_kernels.convert.export import model_tensor_names
    from apr_kernels.ggml_quant import fake_quantize

    check(kind)
    with apr_kernels.open(path) as f:
        stored = {hf: f.info(s).dtype for hf, s in model_tensor_names(f, path).items()}
    blocks = [n for n, dtype in stored.items() if dtype not in FLOAT_DTYPES and n.endswith(".weight")]
    if kind.startswith(GGUF_PREFIX) and blocks:
        raise ValueError(f"{path}: --quantize {kind} runs the weights `export --quantize {kind[len(GGUF_PREFIX):]}` "
                         f"quantises from float ones, but {len(blocks)} tensors are stored in blocks already (e.g. "
                         f"{blocks[0]}: {stored[blocks[0]]}); expected a float file")
    n = 0
    with torch.no_grad():
        for name, p, fmt in targets(model, kind):
            if stored.get(name) in FLOAT_DTYPES:  # (blocks the file stores pass through the converter)
                p.copy_(fake_quantize(fmt, p))
                n += 1
    return n
