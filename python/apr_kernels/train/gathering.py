"""A parallel run's checkpoint: one ordinary APR file of whole tensors, written by rank 0.

Every rank holds only parts of the model and its optimizer state under FSDP (its rows of each
tensor), tensor parallelism (its heads' rows or columns) and expert parallelism (its experts).
``ShardGatherer`` lists every tensor of the whole model in one order on every rank, each as an
item that can make itself whole with a collective: a DTensor (FSDP), ``tensor_parallel.Split`` /
``SplitBlocks`` (a split parameter or its 8-bit moment), ``expert_parallel.OwnedTensor`` (an
expert, broadcast from the rank holding it), ``BlockShards`` (an 8-bit moment's codes or scales
under FSDP), ``SplitBase`` / ``WholeBaseRaw`` (a quantised LoRA base's blocks). Rank 0 writes the
file lazily, asking for each tensor in turn; the other ranks serve each gather until it is done
(``save_checkpoint``), so the whole model is never held at once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .distributed import Parallel, ShardedBlocks, _is_dtensor, chunk_rows, full_tensor, gather_uneven, shard_axis


class BlockShards:
    """One part of an 8-bit AdamW moment under FSDP (``adamw8bit.py``): this rank's codes (one per
    value) or block scales (one per 256 values) of its rows of parameter ``param``. The ranks' rows
    start on block boundaries, so the parts in rank order are the whole tensor's, as one process
    stores them: ``gather()`` (a collective) returns them joined."""

    def __init__(self, local: torch.Tensor, param):
        from .adamw8bit import BLOCK

        self.local, self.param = local, param
        self.dtype = local.dtype
        self.per_block = BLOCK if local.dtype == torch.uint8 else 1  # codes, or scales
        self.shape = (-(-param.numel() // BLOCK) * self.per_block,)

    def _length(self, rank: int) -> int:
        from .adamw8bit import BLOCK

        rows = self.param.shape[0]
        n = chunk_rows(rows, shard_axis(self.param)[0], rank)[1] * (self.param.numel() // rows)
        return -(-n // BLOCK) * self.per_block

    def gather(self) -> torch.Tensor:
        size, _, group = shard_axis(self.param)
        return gather_uneven(self.local, [self._length(r) for r in range(size)], group)


class SplitBase:
    """A quantised LoRA base split over tensor-parallel ranks (``lora.QuantizedLoRALinear.base_split``)
    for the checkpoint: ``gather()`` (a collective) joins the group's parts (each first gathered over
    its FSDP shards) into the whole tensor's raw blocks."""

    def __init__(self, module):
        self.module, self.dtype, self.shape = module, module.base.dtype, module.whole_base_shape

    def gather(self) -> torch.Tensor:
        return self.module.whole_base_raw()


class WholeBaseRaw:
    """The raw bytes of a split or sharded quantised base's whole tensor (``lora.QuantizedLoRALinear``),
    as an expert's checkpoint item (``expert_parallel.OwnedTensor``; under pipeline parallelism every
    base's, whole ones too: ``PipelineGatherer``): ``gather()`` joins the
    tensor-parallel group's parts (each gathered over its FSDP shards first); ``dtype`` and ``shape``
    those of the bytes."""

    def __init__(self, module):
        from apr_kernels._format import nbytes_for

        base = module.base
        self.module, self.t = module, base.local if isinstance(base, ShardedBlocks) else base.data
        self.dtype, self.shape = torch.uint8, (nbytes_for(module.base.dtype, module.whole_base_shape),)

    def gather(self) -> torch.Tensor:
        return self.module.whole_base_raw()


class Gathered8bit:
    """An 8-bit moment for ``checkpoint.save_checkpoint``: its codes and scales as LazyTensors."""

    def __init__(self, codes, absmax):
        self.codes, self.absmax = codes, absmax


class RankZeroGather:
    """Rank 0 asks for the whole tensors of a checkpoint one at a time: it broadcasts the index of the
    one it needs (``_broadcast``) and every rank joins that tensor's collective (``_full(i)``, the
    subclass's); the other ranks sit in ``serve()`` until rank 0's ``done()`` broadcasts -1. Driving
    the order from rank 0 keeps the ranks in step whatever order ``save`` writes in. Needs ``device``."""

    def _broadcast(self, i: int) -> int:
        box = torch.tensor([i], dtype=torch.int64, device=self.device)  # NCCL needs a device tensor
        dist.broadcast(box, src=0)
        return int(box.item())

    def serve(self) -> None:
        """Ranks other than 0: join every gather rank 0 asks for, until it is done."""
        while (i := self._broadcast(-1)) >= 0:
            self._full(i)

    def done(self) -> None:
        """Rank 0: release the serving ranks (also after a failed save)."""
        self._broadcast(-1)


class ShardGatherer(RankZeroGather):
    """Whole tensors of a sharded model and its optimizer state (AdamW's moments, fp32 or 8-bit; Muon's
    momentum), gathered one at a time on demand.

    Every rank lists the same tensors in the same order. Rank 0's ``state()`` returns LazyTensors;
    writing one broadcasts its index and all-gathers it, while the other ranks sit in ``serve()``
    joining each gather until rank 0's ``done()`` broadcasts -1. Driving the order from rank 0 keeps
    the ranks in step whatever order ``save`` writes in."""

    def __init__(self, trainer):
        model, opt = trainer.model, trainer.optimizer
        self.model, self.device = model, trainer.device
        self.items: list[torch.Tensor] = []  # DTensors (or replicated tensors), by index
        self.weights: dict[str, int] = {}
        # name -> {"exp_avg": index or (codes, scales) indices, "exp_avg_sq": ..., "step": int}, or
        # {"momentum_buffer": index} (Muon)
        self.moments: dict[str, dict] = {}
        from .expert_parallel import OwnedTensor, global_parameters

        # every parameter of the whole model, in one order on every rank (an expert held by one rank
        # of each expert-parallel group: broadcast from the first group's)
        everything = list(global_parameters(model))
        from .tensor_parallel import Split, SplitBlocks, split_dims

        # a parameter the tensor-parallel ranks split: joined from the group's parts (an expert's
        # held elsewhere: split as its template, a held one, is; then broadcast from its holder)
        split, tp = split_dims(model), model.tensor_parallel
        dims = {id(p): split[n] for n, p in model.named_parameters() if n in split}

        def item(t, p, owner, held):  # a parameter's (or its moment's) item
            t = Split(t, dims[id(p)], tp) if id(p) in dims else t
            return t if owner is None else OwnedTensor(t, owner, held)

        for name, p, owner, held in everything:
            self.weights[name] = self._add(item(p, p, owner, held))
        from apr_kernels.model.lora import QuantizedLoRALinear

        # quantised LoRA bases sharded by block (QLoRA), or split over tensor-parallel ranks (joined
        # from the group's parts): HF weight name -> index
        self.bases: dict[str, int] = {
            f"{name}.weight": self._add(SplitBase(m) if m.base_split else m.base) for name, m in model.named_modules()
            if isinstance(m, QuantizedLoRALinear) and (m.base_split or isinstance(m.base, ShardedBlocks))}
        # and (expert parallelism) the experts' whole bases, each broadcast from its holder
        owners = {name: (owner, held) for name, _, owner, held in everything if owner is not None}
        from apr_kernels.model.lora import whole_model_adapters

        for name, (m, _) in whole_model_adapters(model).items():
            if isinstance(m, QuantizedLoRALinear) and f"{name}.lora_A" in owners:
                owner, held = owners[f"{name}.lora_A"]
                # (split over tensor-parallel ranks, or sharded: the whole tensor's blocks joined where held)
                raw = WholeBaseRaw(m) if m.base_split or isinstance(m.base, ShardedBlocks) else m.base.data
                self.bases[f"{name}.weight"] = self._add(OwnedTensor(raw, owner, held, m.base.dtype,
                                                                     m.whole_base_shape))
        from .adamw8bit import Blockwise8bit

        trained = {id(p) for g in opt.param_groups for p in g["params"]}
        for name, p, owner, held in everything:  # (a remote expert's: the structure of its template's)
            state = opt.state.get(p) if id(p) in trained else None
            if state and "momentum_buffer" in state:  # Muon (optim.py)
                self.moments[name] = {"momentum_buffer": self._add(item(state["momentum_buffer"], p, owner, held))}
            elif state:
                entry = self.moments[name] = {"step": int(state["step"])}
                for key in ("exp_avg", "exp_avg_sq"):
                    m = state[key]
                    if not isinstance(m, Blockwise8bit):
                        entry[key] = self._add(item(m, p, owner, held))
                        continue
                    # (FSDP: this rank's blocks; a split parameter's: joined as the whole's blocks)
                    pair = ((BlockShards(m.codes, p), BlockShards(m.absmax, p)) if _is_dtensor(p)
                            else (m.codes, m.absmax))
                    if id(p) in dims:
                        pair = SplitBlocks.pair(*pair, p.shape, dims[id(p)], tp)
                    entry[key] = tuple(self._add(t if owner is None else OwnedTensor(t, owner, held)) for t in pair)

    def _add(self, t) -> int:
        self.items.append(t.detach() if torch.is_tensor(t) else t)
        return len(self.items) - 1

    def _full(self, i: int) -> torch.Tensor:
        """The whole tensor of item ``i`` (a collective): gathered by the item (``BlockShards``,
        ``ShardedBlocks``, ``OwnedTensor``, ``Split``), or a DTensor's full tensor."""
        item = self.items[i]
        return full_tensor(item) if torch.is_tensor(item) else item.gather()

    def _fetch_raw(self, i: int) -> torch.Tensor:
        """A sharded quantised base's whole raw bytes, on the host."""
        self._broadcast(i)
        return self._full(i).cpu()

    def _fetch(self, i: int, dtype: torch.dtype) -> torch.Tensor:
        self._broadcast(i)
        return self._full(i).to("cpu", dtype)

    def _lazy(self, i: int, dtype: torch.dtype | None = None):
        from apr_kernels.io import LazyTensor
        from apr_kernels._format import APR_DTYPE_OF

        t = self.items[i]
        dtype = dtype or t.dtype
        return LazyTensor(APR_DTYPE_OF[dtype], tuple(t.shape), lambda: self._fetch(i, dtype))

    def state(self, merge_lora: bool = False) -> tuple[dict, dict]:
        """(weights, moments) for ``checkpoint.save_checkpoint(state=...)``: rank 0 only. With
        ``merge_lora`` the weights are ``W + scale B A`` (fp32) of each adapted projection, and no
        adapters."""
        from .checkpoint import quantized_bases

        from apr_kernels.io import LazyTensor, QuantizedTensor
        from apr_kernels.quant import dequantize

        weights = {name: self._lazy(i) for name, i in self.weights.items()}
        # a quantised LoRA base is no parameter: its blocks written as they are (gathered when sharded)
        weights.update({k: v for k, v in quantized_bases(self.model).items() if k not in self.bases})
        for name, i in self.bases.items():
            b = self.items[i]
            weights[name] = LazyTensor(b.dtype, b.shape, lambda b=b, i=i: QuantizedTensor(b.dtype, b.shape,
                                                                                          self._fetch_raw(i)))
        if merge_lora:
            from apr_kernels.model.lora import QuantizedLoRALinear, whole_model_adapters

            # (with expert parallelism other ranks' experts too: their names, a held expert's shapes)
            for name, (m, _) in whole_model_adapters(self.model).items():
                a, b = (self.weights[f"{name}.{part}"] for part in ("lora_A", "lora_B"))
                # the frozen weight: gathered, or a quantised base dequantised here (gathered first
                # when sharded)
                if f"{name}.weight" in self.bases:
                    i = self.bases[f"{name}.weight"]
                    w = lambda b=self.items[i], i=i: dequantize(b.dtype, b.shape, self._fetch_raw(i))  # noqa: E731
                elif isinstance(m, QuantizedLoRALinear):  # (whole on every tensor-parallel rank)
                    w = lambda m=m: m.whole_base_weight(torch.float32).cpu()  # noqa: E731
                else:
                    w = self.weights[f"{name}.weight"]
                mag = self.weights.get(f"{name}.lora_magnitude")  # DoRA
                del weights[f"{name}.lora_A"], weights[f"{name}.lora_B"]
                weights.pop(f"{name}.lora_magnitude", None)
                # (the whole shape: a split projection's weight item is its gathered one, a quantised
                # base's blocks are the whole tensor's)
                shape = tuple(self.items[w].shape) if isinstance(w, int) else tuple(m.whole_base_shape)
                weights[f"{name}.weight"] = LazyTensor(
                    "F32", shape,
                    lambda w=w, a=a, b=b, s=m.scale, g=mag: self._merged(w, a, b, s, g))

        def lazy(key, value):  # the step as it is; an 8-bit moment's two parts; a moment (fp32)
            if key == "step":
                return value
            if isinstance(value, tuple):
                return Gathered8bit(self._lazy(value[0]), self._lazy(value[1]))
            return self._lazy(value, torch.float32)

        moments = {name: {k: lazy(k, v) for k, v in m.items()} for name, m in self.moments.items()}
        return weights, moments

    def _merged(self, w, a: int, b: int, scale: float, magnitude: int | None = None) -> torch.Tensor:
        """``W + scale B A`` (DoRA: rows rescaled to the magnitude); ``w``: the weight's index, or a
        function making it (a quantised base, the same on every rank)."""
        from apr_kernels.model.lora import merged

        weight = w() if callable(w) else self._fetch(w, torch.float32)
        lora_a, lora_b = (self._fetch(i, torch.float32) for i in (a, b))
        mag = self._fetch(magnitude, torch.float32) if magnitude is not None else None
        return merged(weight, lora_a, lora_b, scale, torch.float32, mag)



def save_checkpoint(path, trainer, parallel: Parallel | None, **kwargs) -> None:
    """``checkpoint.save_checkpoint`` for a parallel run: one gathered APR file written atomically by
    rank 0; every rank returns once it is on disk, or raises if rank 0 could not write it. Without
    ``parallel``: the plain save."""
    from .checkpoint import save_checkpoint as save

    if parallel is None:
        return save(path, trainer, **kwargs)
    env = parallel.env
    parallel.reshard()
    gathered = parallel.mode == "fsdp" or parallel.expert is not None or parallel.tensor is not None
    if parallel.pipeline is not None:  # (each stage's tensors from the first replica's rank of that stage)
        from .pipeline_parallel import PipelineGatherer

        gatherer = PipelineGatherer(trainer, parallel.pipeline)
    else:
        gatherer = ShardGatherer(trainer) if gathered else None
    error = None
    if env.is_main:
        try:
            state = gatherer.state(kwargs.get("merge_lora", False)) if gatherer else None
            save(path, trainer, state=state, **kwargs)
        except Exception as exc:  # reported to every rank below, then raised here
            error = exc
        finally:
            if gatherer:
                gatherer.done()
    elif gatherer:
        gatherer.serve()
    if env.active and env.world_size > 1:
        box = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and error is None:
            raise RuntimeError(f"{path}: rank 0 could not write the checkpoint: {box[0]}")
    if error is not None:
        raise error
