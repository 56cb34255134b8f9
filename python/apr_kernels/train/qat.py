"""Quantisation-aware training (``train --qat q4k|q6k|q8|q4|q4km``): train the weights that
``apr-kernels convert model.apr out.apr --quantize KIND`` will store, so the quantised file loses
less than quantising after training does.

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
other widths gather the whole tensor first. Costs: a copy of those weights (to put them back) and
one quantisation of each per optimizer step (shared by the step's micro-batches).

Evaluations report both losses: ``eval_loss`` of the weights as saved and ``eval_loss_quantized``
of the quantised file. The post-training step loops (``posttrain.StepLoop``) keep the window open
from ``_start_step`` to ``_finish_step``, so an RL step's sampling runs on the quantised weights too
(a reference model keeps its own); their evaluations run twice, the quantised one's values logged
as ``<name>_quantized``. Not combined (refused): LoRA (the deployed weight is the merged one) and
tensor parallelism (a rank's columns would cut the blocks).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from apr_kernels.convert.recipe import FLOAT_DTYPES, Layout, apr_format, check_kind


def check(kind: str, *, lora: bool = False, tensor_parallel: int = 1) -> None:
    check_kind(kind, "--qat")
    if lora:
        raise ValueError(f"--qat {kind} trains the weights the quantised file stores; with --lora-rank the file "
                         f"stores the merged weights. Expected one of the two")
    if tensor_parallel != 1:
        raise ValueError(f"--qat with --tensor-parallel {tensor_parallel}: each rank's columns of a weight would "
                         f"cut its quantisation blocks; expected --tensor-parallel 1")


def targets(model: nn.Module, kind: str) -> list[tuple[str, nn.Parameter, str]]:
    """The parameters ``convert --quantize kind`` stores in blocks, each once (a tied head is the
    embedding), with the APR format it stores each in (``convert.recipe.apr_format``)."""
    layout = Layout.of_config(model.config)
    out = []
    for name, p in model.named_parameters():  # (each parameter once, by its first name)
        fmt = apr_format(kind, name, p.shape, layout) if p.is_floating_point() else None
        if fmt is not None:
            out.append((name, p, fmt))
    return out


def _rows_alone(fmt: str, cols: int) -> bool:
    """Whether ``fmt`` quantises each row of ``cols`` values on its own (FSDP's row shards need no gather)."""
    return fmt in ("Q4_K", "Q6_K") or (fmt == "APR_Q4" and cols % 32 == 0)


class FakeQuantizer:
    """``applied()``: within, ``model``'s target weights hold their quantised values."""

    def __init__(self, model: nn.Module, kind: str):
        self.params = targets(model, kind)

    @staticmethod
    def quantised(name: str, p: torch.Tensor, fmt: str) -> torch.Tensor:
        """This rank's part of ``p`` as the quantised file holds it (in APR format ``fmt``)."""
        from apr_kernels.quant import fake_quantize

        from .distributed import local_part, local_shard

        if hasattr(p, "full_tensor") and not _rows_alone(fmt, p.shape[-1]):
            return local_shard(fake_quantize(fmt, p.full_tensor()), p, name)
        return fake_quantize(fmt, local_part(p))

    @contextlib.contextmanager
    def applied(self):
        from .distributed import local_part

        saved = []
        try:
            with torch.no_grad():
                for name, p, fmt in self.params:
                    local = local_part(p)
                    quantised = self.quantised(name, p, fmt)
                    saved.append((local, local.clone()))
                    local.copy_(quantised)
            yield
        finally:
            with torch.no_grad():
                for local, original in saved:
                    local.copy_(original)


def quantize_as_converted(model: nn.Module, kind: str, path) -> int:
    """Make ``model`` (loaded from the APR file ``path``) hold, for good, the weights ``convert path
    out.apr --quantize KIND`` would write: its targets quantised and dequantised, except the tensors the
    file already stores in blocks (the converter passes those through). ``eval --quantize``. Returns
    how many tensors changed."""
    import apr_kernels
    from apr_kernels.convert.export import model_tensor_names
    from apr_kernels.quant import fake_quantize

    check(kind)
    with apr_kernels.open(path) as f:
        stored = {hf: f.info(s).dtype for hf, s in model_tensor_names(f, path).items()}
    n = 0
    with torch.no_grad():
        for name, p, fmt in targets(model, kind):
            if stored.get(name) in FLOAT_DTYPES:  # (blocks the file stores pass through the converter)
                p.copy_(fake_quantize(fmt, p))
                n += 1
    return n
