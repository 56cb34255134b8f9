"""Pipeline parallelism (``train --pipeline-parallel N``): the decoder layers split into N stages of
consecutive layers, one per rank of a pipeline, each micro-batch's activations handed on stage by stage.

Why: a stage holds only its layers (and their gradients and optimizer state), and stages exchange
only one ``[rows, seq_len, hidden]`` activation (forward) or its gradient (backward) per micro-batch,
point to point. So a model can span nodes joined by a slow network, where FSDP's all-gathers of
every weight would crawl; data parallelism then runs inside each node.

Layout (as torchtitan's, the pipeline dimension outermost): world = N stages x D replicas; stage s
runs on ranks ``s*D .. s*D + D - 1`` (consecutive ranks, one node's GPUs, are one stage's data-parallel
replicas), and replica d's pipeline is ranks ``d, D + d, 2D + d, ...``. Layers are split as evenly as
possible (the first stages take one more when they do not divide). Stage 0 also holds the embedding,
the last stage the final norm and the output head; with tied embeddings the last stage holds a copy
of the embedding as its head, and the two copies' gradients are summed after every step (as
Megatron-LM's embedding group does), so they stay equal.

A step's ``--grad-accum`` micro-batches (each ``--batch-size / D`` rows of the replica's share) go
through the pipeline in one of three schedules (``schedule``):

* ``gpipe``: all forwards, then all backwards (every micro-batch's activations held at once);
* ``1f1b`` (the default): stage s runs ``N - s - 1`` forwards ahead, then alternates one forward and
  one backward, so it holds at most ``N - s`` micro-batches' activations (PipeDream-Flush, Megatron-LM's
  default). The pipeline's idle share (its "bubble") is ``(N - 1) / (M + N - 1)`` for both: use M well
  above N.
* ``interleaved`` (Megatron-LM's interleaved 1F1B, torchtitan's Interleaved1F1B): the layers are split
  into N x C parts (``--pipeline-chunks C``, default 2) and stage s holds C model chunks, parts s,
  N + s, 2N + s, ...; a micro-batch loops C times through the stages (the last stage's chunk c hands
  on to stage 0's chunk c + 1). The idle share falls to ``(N - 1) / (C M + N - 1)``, for more
  activations held (about ``1 + (N - 1) / (N C)`` times 1F1B's on stage 0) and C times the messages.
  M must be a multiple of N.
* ``zero-bubble`` (ZB-H1 of Qi et al., 2024, "Zero Bubble Pipeline Parallelism"): each backward split
  in two (``split_backward.py``): ``B``, the input's gradient, sent back at once (what the previous
  stage waits for), and ``W``, the weights' gradients, run later where the stage would otherwise wait
  (``zero_bubble``: 1F1B's forwards and Bs, stage s running each W s micro-batches late). With F, B
  and W of equal cost the idle share falls to ``(N - 1) / (3 M + N - 1)`` for M >= N (a third of
  1F1B's); each stage holds at most N micro-batches' activations (stage 0's 1F1B peak; a micro-batch's
  are kept until its W). With ``--pipeline-chunks C`` > 1 its interleaved form (interleaved 1F1B's
  order; idle share ``(N - 1) / (3 C M + N - 1)``). Without ``--compile`` (a compiled layer's backward
  is one node: nothing to split) or ``--grad-checkpointing selective`` (its saved results serve one
  recomputation; with full checkpointing each half recomputes a layer once); under FSDP see below.

Sends are asynchronous (``isend``, waited for at the end of the step) and receives blocking. Each
direction between two neighbouring stages (with chunks, also from the last stage to stage 0) has its own
process group (activations forward, gradients backward): NCCL runs a communicator's operations in order
on one stream, so with one group a stage's queued activation send would wait behind its gradient receive
while the neighbour's gradient send waits behind its own activation receive (1F1B's steady state: a
deadlock). With one group per direction, every group carries messages one way in one order, which both
ends agree on. Every rank computes its rows' inputs, targets and document spans itself (every rank draws
the same global batch), so only hidden states travel. After the schedule the gradients of each stage are
averaged over its D replicas (one all-reduce), the tied embedding's two copies summed, and the global
gradient norm (the tied copy counted once) taken over the pipeline for clipping. Losses are summed over
the last stages; evaluation runs the held-out batches through the pipeline the same way.

Tensor parallelism (``--tensor-parallel T``, Megatron-LM's 3-D layout; torchtitan's under FSDP): each
stage's D x T ranks are D replicas of a tensor-parallel group of T consecutive ranks, which splits the
stage's layers (and the embedding and head by vocabulary range) as ``tensor_parallel.py`` does without a
pipeline; rank t of a group exchanges the (whole) activations with rank t of the neighbouring stages'
groups (with ``--sequence-parallel`` its chunk of the positions: 1/T of the activation). Its parts are
averaged over the replicas holding the same part, the clipping norm counts each split tensor's parts and
each whole-kept tensor once, and a checkpoint's split tensor is joined by the first replica's group
before its rank 0 sends it on. Under FSDP each rank's parts are sharded over the stage's D ranks holding
the same ones (the ``data`` dimension of a ``(pipeline, data, tensor)`` mesh).

Context parallelism (``--context-parallel C``, long sequences): each stage's replicas form groups of C
consecutive ranks that split every row's positions as ``context_parallel.py`` does; each rank sends on
its positions' activations, the group's ranks average their gradients like replicas (or FSDP shards
the stage over all of them), and their losses of disjoint positions add up. With tensor parallelism
too (4-D) a context-parallel group takes ranks T apart (``context_parallel.groups``' stride), each
rank of it heading its tensor-parallel group's share of the heads for its positions.

Checkpoints are ordinary whole-model APR files: rank 0 writes, asking each tensor of the whole model
(weights, AdamW moments or Muon buffers) in turn from the first replica's rank holding it
(``PipelineGatherer``), so no rank holds more than its stage plus one tensor. Resuming loads each
stage's share of any checkpoint, on any number of stages.

FSDP (``--parallel fsdp``; torchtitan's PP x FSDP): each stage is sharded over its D replicas only (a
``(pipeline, data)`` device mesh, the stage's layers and its ends ``fully_shard``-ed on the data
dimension), so a rank holds 1/D of its stage's weights, gradients and moments. A stage runs one
method, ``Transformer.stage_forward``, registered as an FSDP forward method, so FSDP gathers the
stage's parameters for it as for ``forward``. By default (torchtitan's under PP) a stage stays
gathered from its first forward to the step's end, and its gradients accumulate unsharded over the
step's micro-batches and are reduce-scattered (averaged over the replicas) once its last backward, or
in the zero-bubble schedule its last weight half, has run (``_fsdp_defer_reduction``,
``_fsdp_reduce_deferred``): one all-gather and one reduce-scatter a step, for the memory of the
stage's whole parameters. ``--fsdp-reshard-after-forward always`` (not zero-bubble, whose weight
halves may read the parameters) gathers them around every micro-batch's forward and backward instead,
the last backward reduce-scattering the sum (``set_requires_gradient_sync``). The tied embedding's
copies are summed row shard by row shard (both stages shard it alike); the clipping norm sums every
rank's rows; a checkpoint's tensor is all-gathered by its stage's replicas before its owner sends it
to rank 0.
Under FSDP on CUDA the activations cross stages in the compute dtype (bf16, or fp16). HSDP
(``--fsdp-shard-size S``, a stage spanning nodes): each stage sharded within groups of S consecutive
ranks, replicated across them (FSDP's 2-D ``(replicate, shard)`` mesh; clipping counts a group once).

What combines: every schedule with ``--parallel ddp`` or ``fsdp`` across the replicas (also with
``--tensor-parallel``); AdamW, Muon, and 8-bit AdamW (its codes and scales gathered for a checkpoint
as ``gathering.ShardGatherer`` does: ``BlockShards`` over FSDP shards, ``SplitBlocks`` over
tensor-parallel parts); LoRA and DoRA (every stage draws the whole model's adapters in order and keeps
its own: ``lora.whole_model_adapters``; the final checkpoint merged from the gathered weights and
adapters; QLoRA's quantised bases listed too, their whole raw blocks gathered from their stage);
``--freeze`` (a part with nothing trainable in it or before it runs no backward and keeps no
activations: frozen first stages cost only their forwards); ``--qat`` and ``--float8`` (each stage's
weights and projections, as without a pipeline); distillation (``--teacher``, loaded on the last
stage's ranks only, under FSDP sharded over them (``fsdp_mesh``), else split over their
tensor-parallel groups; its hidden states asked there: ``train_step``'s ``teacher_of``); mixtures of
experts (the balance terms of the whole model's routing: ``_forward``), also with expert parallelism
inside the stages (``--expert-parallel N``: groups of N of a stage's ranks, with ``--tensor-parallel T`` ranks T
apart, each stage's experts averaged over its ranks holding them, counted N times in the clipping norm
when replicated, listed for the checkpoint by the stage's first group, under HSDP sharded within a
shard group, with QLoRA their quantised bases gathered from their holders); ``--eval-choices`` (the
questions' log-likelihoods through the stages, ``PipelineScorer``); document masking, label smoothing
and z-loss, gradient checkpointing, fp16/bf16 autocast.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .gathering import BlockShards, Gathered8bit, RankZeroGather, WholeBaseRaw

SCHEDULES = ("1f1b", "gpipe", "interleaved", "zero-bubble")


class PipelineHole(nn.Module):
    """A decoder layer another stage holds: no parameters here, never run."""

    pipeline_hole = True  # (how model/lora.py, which does not import this, tells one)

    def __init__(self, layer: int, stage: int):
        super().__init__()
        self.layer, self.stage = layer, stage

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"decoder layer {self.layer} runs on pipeline stage {self.stage}, not here")


def schedule(kind: str, size: int, stage: int, micro: int, chunks: int = 1) -> list[tuple[str, int, int]]:
    """Stage ``stage``'s work for one step of ``micro`` micro-batches through ``size`` stages, in order:
    ``("F" | "B", chunk, micro-batch)``, a forward or backward of its model chunk ``chunk`` (the
    pipeline's part ``chunk * size + stage``; chunk 0 but under ``interleaved``).

    ``gpipe``: all forwards, then all backwards. ``1f1b``: ``size - stage - 1`` forwards ahead, then a
    forward and a backward in turn, then the remaining backwards. ``interleaved`` (Megatron-LM's
    interleaved 1F1B; ``micro`` a multiple of ``size``): the forwards go through the chunks in groups
    of ``size`` micro-batches (chunk 0 of micro-batches 0..size-1, chunk 1 of the same, ...), the
    backwards likewise from the last chunk; ``2 (size - stage - 1) + (chunks - 1) size`` forwards
    ahead, then in turn. Every stage sends each neighbour its activations (and gradients) in the
    order that neighbour receives them."""
    if kind == "gpipe":
        return [("F", 0, m) for m in range(micro)] + [("B", 0, m) for m in range(micro)]
    if kind == "zero-bubble":
        return zero_bubble(size, stage, micro, chunks)
    if kind == "1f1b":
        units, ahead = ([(0, m) for m in range(micro)],) * 2, min(size - stage - 1, micro)
    else:
        def unit(k: int, forward: bool) -> tuple[int, int]:
            group, within = divmod(k, size * chunks)
            chunk = within // size
            return (chunk if forward else chunks - 1 - chunk), group * size + within % size

        total = micro * chunks
        units = ([unit(k, True) for k in range(total)], [unit(k, False) for k in range(total)])
        ahead = min(2 * (size - stage - 1) + (chunks - 1) * size, total)
    (fwd, bwd), n = units, len(units[0])
    ops = [("F", *fwd[k]) for k in range(ahead)]
    for k in range(n - ahead):
        ops += [("F", *fwd[ahead + k]), ("B", *bwd[k])]
    return ops + [("B", *bwd[k]) for k in range(n - ahead, n)]


def zero_bubble(size: int, stage: int, micro: int, chunks: int = 1) -> list[tuple[str, int, int]]:
    """Stage ``stage``'s ops of the ``zero-bubble`` schedule (ZB-H1 of Qi et al., 2024; with ``chunks``
    > 1 its interleaved form, as torch's ScheduleInterleavedZeroBubble): each backward split into
    ``B`` (the input's gradient, sent back at once) and ``W`` (the weights', ``split_backward.py``),
    ops ``("F" | "B" | "W", chunk, micro-batch)``. The forwards and ``B``s in 1F1B's order (the
    interleaved schedule's with chunks), each ``W`` run ``stage`` backwards after its ``B``: the later
    a stage, the longer its neighbours keep it waiting for gradients at the start, so the more ``W``s
    it holds back to fill the waits at the end. Every stage holds at most as many micro-batches'
    activations as stage 0 does in 1F1B (or interleaved 1F1B); with F, B and W of equal cost the
    step idles ``size - 1`` units of a chunk's op, a third of 1F1B's (or of interleaved 1F1B's)."""
    ops, held_back = [], []
    for op in schedule("1f1b" if chunks == 1 else "interleaved", size, stage, micro, chunks):
        ops.append(op)
        if op[0] == "B":
            held_back.append(op)
            if len(held_back) > stage:
                ops.append(("W", *held_back.pop(0)[1:]))
    return ops + [("W", c, m) for _, c, m in held_back]


def stage_layers(num_layers: int, size: int) -> list[range]:
    """Each stage's decoder layers: consecutive, as even as possible, the first stages one more."""
    per, extra = divmod(num_layers, size)
    out, start = [], 0
    for s in range(size):
        n = per + (s < extra)
        out.append(range(start, start + n))
        start += n
    return out


def chunks_for(schedule: str, chunks: int | None) -> int:
    """The model chunks per stage: ``--pipeline-chunks`` (2 by default under ``interleaved``, which
    needs at least 2; 1 by default under ``zero-bubble``, interleaved with more; 1 for the other
    schedules, which run one chunk)."""
    if schedule == "zero-bubble":
        if chunks is not None and chunks < 1:
            raise ValueError(f"--pipeline-chunks {chunks} with --pipeline-schedule zero-bubble: expected at least 1 "
                             f"model chunk per stage")
        return chunks or 1
    if schedule != "interleaved":
        if chunks not in (None, 1):
            raise ValueError(f"--pipeline-chunks {chunks} with --pipeline-schedule {schedule}: a stage of that "
                             f"schedule runs one chunk of layers; expected --pipeline-schedule interleaved")
        return 1
    if chunks is None:
        return 2
    if chunks < 2:
        raise ValueError(f"--pipeline-chunks {chunks} with --pipeline-schedule interleaved: expected at least 2 "
                         f"model chunks per stage")
    return chunks


def check(size: int, *, world: int, mode: str, num_layers: int | None = None, fsdp_shard: int | None = None,
          chunks: int = 1, micro: int | None = None, tensor: int = 1, context: int = 1, schedule: str = "1f1b",
          compiled: bool = False, selective: bool = False, reshard_after_forward: bool = False,
          **refused) -> None:
    """Raise ``ValueError`` when ``--pipeline-parallel size`` cannot run (every reason named).
    ``chunks``: model chunks per stage (interleaved), ``micro``: micro-batches per step (``--grad-accum``),
    ``tensor``, ``context``: ``--tensor-parallel``, ``--context-parallel``; ``schedule``, ``compiled``,
    ``selective``: ``--pipeline-schedule``, ``--compile``, ``--grad-checkpointing selective``;
    ``reshard_after_forward``: ``--fsdp-reshard-after-forward always``.
    ``refused``: option name -> whether it is in use (each a combination not built)."""
    if size < 1:
        raise ValueError(f"--pipeline-parallel {size}: expected a number of stages >= 1")
    if size == 1:
        return
    if mode not in ("ddp", "fsdp"):
        raise ValueError(f"--pipeline-parallel {size} with --parallel {mode}: the stages are processes of one "
                         f"job; expected --parallel ddp or fsdp under torchrun")
    if schedule == "zero-bubble" and compiled:
        raise ValueError("--pipeline-schedule zero-bubble with --compile: a compiled layer's backward is one node "
                         "giving its input's and weights' gradients together, so it cannot be split (and frees its "
                         "buffers after one run); expected no --compile (or another schedule)")
    if schedule == "zero-bubble" and selective:
        raise ValueError("--pipeline-schedule zero-bubble with --grad-checkpointing selective: a selectively "
                         "checkpointed layer's saved results serve one recomputation, and the weight half "
                         "recomputes the layer a second time; expected --grad-checkpointing full (or another "
                         "schedule)")
    if schedule == "zero-bubble" and reshard_after_forward:
        raise ValueError("--pipeline-schedule zero-bubble with --fsdp-reshard-after-forward always: a stage's weight "
                         "halves run after its input halves, some reading the gathered parameters, so the stage "
                         "stays gathered through the step; expected --fsdp-reshard-after-forward default or never "
                         "(or another schedule)")
    width = world // size if world % size == 0 else None
    if fsdp_shard and width is not None and (width % fsdp_shard or fsdp_shard % tensor):
        raise ValueError(f"--pipeline-parallel {size} with --fsdp-shard-size {fsdp_shard}: HSDP shards a stage over "
                         f"groups of that many of its {width} ranks; expected a divisor of {width}"
                         + (f" and a multiple of --tensor-parallel {tensor}" if tensor > 1 else ""))
    if world % (size * tensor * context):
        inner = [(kind, n) for kind, n in (("tensor", tensor), ("context", context)) if n > 1]
        raise ValueError(f"--pipeline-parallel {size}" + "".join(f" x --{k}-parallel {n}" for k, n in inner)
                         + f" does not divide the world size {world}; expected world = stages x data-parallel "
                         f"replicas" + "".join(f" x {k}-parallel ranks" for k, _ in inner))
    if num_layers is not None and num_layers < size * chunks:
        per = "stage" if chunks == 1 else f"model chunk ({size} stages x {chunks} chunks)"
        raise ValueError(f"--pipeline-parallel {size}: the model has {num_layers} decoder layers; expected at "
                         f"least one per {per}")
    if chunks > 1 and micro is not None and micro % size:
        raise ValueError(f"--pipeline-schedule {schedule} with --pipeline-chunks {chunks} and --grad-accum {micro}: "
                         f"the micro-batches go through the chunks in groups of {size}; expected a multiple of "
                         f"--pipeline-parallel {size}")
    for option, used in refused.items():
        if used:
            raise ValueError(f"--pipeline-parallel with {option} is not supported; expected one of the two")


def _fsdp_defer_reduction(model) -> None:
    """A stage kept gathered through the step under FSDP, before the step: its gradients accumulate
    unsharded through every backward (or backward half: in zero-bubble none may reduce-scatter, its
    last W runs after its last B), and its parameters stay gathered from their first forward to the
    step's end: one all-gather per step rather than two per micro-batch, for the memory of the stage's
    whole parameters (torchtitan's PP x FSDP default; zero-bubble needs it: a deferred weight pass's
    autograd call may read them, float8's backward, a fallback's from the outputs)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():  # (the root keeps its own: FSDP never reshards it after a forward)
        if isinstance(m, FSDPModule) and m is not model:
            m.set_reshard_after_forward(False, recurse=False)
    model.set_reshard_after_backward(False)
    model.set_requires_gradient_sync(False)
    model.set_is_last_backward(False)


def _fsdp_reduce_deferred(model) -> None:
    """A stage kept gathered through the step, after its last backward (or W): FSDP's post-backward run
    by hand on every parameter group (as ``torch.distributed.pipelining``'s ``perform_reduce_grad``
    does: FSDP has no public call for it), which reduce-scatters the summed unsharded gradients and
    reshards, then its end-of-backward callback; the settings ``_fsdp_defer_reduction`` changed put
    back."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    model.set_is_last_backward(True)
    model.set_reshard_after_backward(True)
    model.set_requires_gradient_sync(True)
    state = fully_shard.state(model)
    for each in state._state_ctx.all_states:
        groups = getattr(each, "_fsdp_param_groups", None)  # (older torch: one group, singular)
        if groups is None:
            groups = [g for g in (getattr(each, "_fsdp_param_group", None),) if g is not None]
        for group in groups:
            group.post_backward()
    state._root_post_backward_final_callback()
    for m in model.modules():
        if isinstance(m, FSDPModule) and m is not model:
            m.set_reshard_after_forward(True, recurse=False)


class _WholeBackward:
    """A first part's backward under ``zero-bubble``: nothing to send back, so all of it runs in the
    ``W`` slot (``weights_pass``)."""

    def __init__(self, outputs, grads):
        self.outputs, self.grads = outputs, grads

    def weights_pass(self) -> None:
        torch.autograd.backward(self.outputs, self.grads)
        self.outputs = self.grads = None


@dataclass
class PipelineParallel:
    """This rank's place in the pipelines: ``size`` stages x ``replicas`` x ``tensor`` ranks (a
    tensor-parallel group of ``tensor`` consecutive ranks splits each layer; 1 without); it runs stage
    ``stage`` of replica ``replica``'s pipeline, as rank ``tensor_rank`` of its tensor-parallel
    group. The replicas hold the same parameters and average their gradients; with ``context`` > 1
    (context parallelism) groups of that many consecutive replicas share rows, each holding its
    share of the positions, so ``replicas / context`` of them take different rows. A stage holds
    ``chunks`` model chunks (``interleaved``; else 1): the model's layers split into ``size * chunks``
    parts of consecutive layers, part ``c * size + s`` being chunk c of stage s. Groups: ``data``
    (this stage's replicas, None for one), ``tied`` (this pipeline's first and last stage, on those
    two; used when the model ties its embeddings), ``pipeline`` (this replica's stages), ``links``
    (one per direction between stages that exchange)."""

    size: int
    stage: int
    replicas: int
    replica: int
    schedule: str = "1f1b"
    chunks: int = 1
    data: object = None
    tied: object = None
    pipeline: object = None
    links: dict = None  # ("acts" | "grads", from stage, to stage) -> the 2-rank group of that direction
    tensor: int = 1
    tensor_rank: int = 0
    context: int = 1
    # part -> whether its backward runs: some parameter of it or of an earlier part trains (``--freeze``
    # may leave the first parts nothing to train); found at the first step (``_plan_backward``)
    backward: list | None = None
    # the residual stream's dtype between stages when not the parameters' (FSDP's compute dtype on CUDA)
    wire_dtype: torch.dtype | None = None
    # HSDP (``--fsdp-shard-size``): the groups of a stage's ranks that each hold a whole sharded copy
    replicate: int = 1
    # under FSDP: the device mesh sharding this stage over its replicas (a last stage's distillation
    # teacher is sharded on it too)
    fsdp_mesh: object = None
    # under FSDP: free the stage's gathered parameters after each micro-batch's forward and backward
    # (gathered twice a micro-batch, the least memory) instead of keeping them gathered through the
    # step (once a step; ``--fsdp-reshard-after-forward always``; zero-bubble always keeps them)
    reshard_after_forward: bool = False

    @property
    def row_groups(self) -> int:
        """The replicas that take different rows of a batch (a context-parallel group counts once)."""
        return self.replicas // self.context

    @property
    def row_group(self) -> int:
        return self.replica // self.context

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.size - 1

    @property
    def width(self) -> int:
        """The ranks of one stage: its replicas x its tensor-parallel ranks."""
        return self.replicas * self.tensor

    @property
    def local(self) -> int:
        """This rank's index among its stage's ranks (its counterpart on every other stage has it too)."""
        return self.replica * self.tensor + self.tensor_rank

    def rank_of(self, stage: int) -> int:
        """This rank's counterpart on stage ``stage`` (the same replica and tensor-parallel rank)."""
        return stage * self.width + self.local

    @property
    def parts(self) -> int:
        """The pipeline's parts (virtual stages): stages x chunks."""
        return self.size * self.chunks

    def part(self, chunk: int) -> int:
        return chunk * self.size + self.stage

    # ------------------------------------------------------------------------------- the model
    def split(self, model) -> None:
        """Keep only this stage's parts of ``model`` (best on the meta device, before anything is
        allocated): other stages' layers become ``PipelineHole``s; the embedding stays on the first
        stage (and the last when tied: its head), the final norm and head on the last.
        ``model.pipeline_absent`` lists the dropped name prefixes (the loader skips them)."""
        cfg = model.config
        parts = stage_layers(cfg.num_layers, self.parts)
        mine = {i for c in range(self.chunks) for i in parts[self.part(c)]}
        absent = []
        for i, layer in enumerate(model.model.layers):
            if i not in mine:
                model.model.layers[i] = PipelineHole(i, self.stage_of_layer(i, cfg.num_layers))
                absent.append(f"model.layers.{i}.")
        if not self.first and not (self.last and cfg.tie_word_embeddings):
            model.model.embed_tokens = None
            absent.append("model.embed_tokens.")
        if not self.last:
            model.model.norm = None
            absent.append("model.norm.")
            if not cfg.tie_word_embeddings:
                model.lm_head = None
                absent.append("lm_head.")
        model.pipeline, model.pipeline_absent = self, tuple(absent)

    def parameter_counts(self, model) -> dict:
        """The start record's sizes: the whole model's ``params`` and ``trainable`` (summed over the
        stages), this rank's ``params_rank``, and the layout (a collective of the pipeline)."""
        from .distributed import local_part
        from .tensor_parallel import split_dims

        owned, split = self.owned(model), split_dims(model)
        ep, experts = self.experts(model)  # (each rank of an expert-parallel group its share of the experts)
        device = next(model.parameters()).device
        whole = [(p.numel() * (self.tensor if n in split else 1) * (ep.size if id(p) in experts else 1),
                  p.requires_grad) for n, p in owned]
        from apr_kernels.model.lora import QuantizedLoRALinear

        whole += [(math.prod(m.whole_base_shape) * (ep.size if id(m.lora_A) in experts else 1), False)
                  for m in model.modules() if isinstance(m, QuantizedLoRALinear)]  # (QLoRA's frozen bases)
        t = torch.tensor([sum(k for k, _ in whole), sum(k for k, trains in whole if trains)],
                         dtype=torch.int64, device=device)
        dist.all_reduce(t, group=self.pipeline)
        out = {"params": int(t[0]), "trainable": int(t[1]),  # (under FSDP this rank's shards)
               "params_rank": sum(local_part(p).numel() for p in model.parameters()), "pipeline_parallel": self.size,
               "pipeline_schedule": self.schedule, "pipeline_chunks": self.chunks}
        if self.sharded(model):  # (FSDP: whether a stage stays gathered through the step, train_step's)
            out["fsdp_gathered_through_step"] = self.gathered_through_step
        if self.tensor > 1:  # (as without a pipeline: expert_parallel.parameter_counts)
            out["tensor_parallel"] = self.tensor
            out["vocab_parallel"] = getattr(model, "vocab_parallel", None) is not None
            if model.sequence_parallel is not None:
                out["sequence_parallel"] = True
        if ep is not None:
            out["expert_parallel"] = ep.size
        return out

    @staticmethod
    def experts(model) -> tuple:
        """(the expert-parallel group's ``ExpertParallel`` or None, the ids of this rank's experts'
        parameters): under expert parallelism a stage's experts are spread over groups of its ranks."""
        ep = getattr(model, "expert_parallel", None)
        if ep is None:
            return None, set()
        from .expert_parallel import expert_parameters

        return ep, {id(p) for p in expert_parameters(model)}

    def stage_of_layer(self, layer: int, num_layers: int) -> int:
        return next(k for k, r in enumerate(stage_layers(num_layers, self.parts)) if layer in r) % self.size

    def owned(self, model) -> list[tuple[str, torch.Tensor]]:
        """This stage's parameters in the whole model's sense: all it holds (``split`` left it nothing
        else) but the last stage's copy of a tied embedding (the first stage's counts)."""
        copy = "model.embed_tokens.weight" if self.last and not self.first else None
        return [(n, p) for n, p in model.named_parameters() if n != copy]

    def layers(self, model, chunk: int | None = None) -> list:
        """The decoder layers this stage holds, in order (``chunk``: those of that model chunk)."""
        if chunk is None:
            return [layer for layer in model.model.layers if not isinstance(layer, PipelineHole)]
        return [model.model.layers[i] for i in stage_layers(model.config.num_layers, self.parts)[self.part(chunk)]]

    def _plan_backward(self, model) -> list[bool]:
        """``backward``: each part's trainable parameters counted on its stage, summed over the
        pipeline (a collective), then carried forward (a part passes gradients back while an earlier
        one trains)."""
        held = torch.zeros(self.parts, dtype=torch.int64, device=next(model.parameters()).device)
        for chunk in range(self.chunks):
            first, last = self.ends(chunk)
            head = model.model.embed_tokens if getattr(model, "lm_head", None) is None else model.lm_head
            modules = [*self.layers(model, chunk), *([model.model.embed_tokens] if first else []),
                       *([model.model.norm, head] if last else [])]
            held[self.part(chunk)] = sum(int(p.requires_grad) for m in modules for p in m.parameters())
        if self.pipeline is not None:
            dist.all_reduce(held, group=self.pipeline)
        return (held.cumsum(0) > 0).tolist()

    def ends(self, chunk: int) -> tuple[bool, bool]:
        """Whether model chunk ``chunk`` is the pipeline's first part (the embedding), its last (the
        final norm and the head)."""
        k = self.part(chunk)
        return k == 0, k == self.parts - 1

    # ------------------------------------------------------------------------- communication
    def _recv(self, shape, dtype, device, stage: int, kind: str) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=device)
        group = self.links.get((kind, stage, self.stage)) if self.links else None
        dist.recv(buf, src=self.rank_of(stage), group=group)
        return buf

    def _send(self, t: torch.Tensor, stage: int, kind: str, pending: list) -> None:
        t = t.detach().contiguous()
        group = self.links.get((kind, self.stage, stage)) if self.links else None
        pending.append((dist.isend(t, dst=self.rank_of(stage), group=group), t))  # (t kept alive until sent)

    # ----------------------------------------------------------------------- forward, backward
    @staticmethod
    def routes(model) -> bool:
        """Whether the parts exchange routing statistics (a mixture of experts in training mode: the
        balance terms are of the whole model's routing, see ``_forward``)."""
        return model.config.is_moe and model.training

    def _forward(self, model, chunk: int, x, y, docs, pending_sends, *, loss_kwargs: dict, grad: bool):
        """Model chunk ``chunk``'s part of one micro-batch: (the received input or None, the output sent
        on or, on the pipeline's last part, the summed loss, the routing statistics or None).
        ``grad``: recorded for a backward (for a part that runs one: ``backward``).

        A mixture of experts' balance terms (load balancing, router z-loss) are functions of sums over
        every sparse layer (``Transformer.routing_totals``). So each part sends on, after its
        activations, the running totals (earlier parts' plus its own, detached: ``[4, E]`` numbers),
        and the last part adds the terms of the whole model's totals to its loss, the earlier parts'
        as a tensor that requires grad. The terms are linear in each part's probabilities and
        z-sums, so that tensor's gradient is also the gradient of every earlier part's own totals: it
        travels back after each activation gradient (``_backward``). Returned as the third item: the
        part's own totals (their graph), or on the last part the earlier parts' tensor."""
        dtype = self.dtype(model)
        first, last = self.ends(chunk)
        k = self.part(chunk)
        routes = self.routes(model)
        h_in = before = None
        if not first:  # (from the previous stage; chunk c > 0 of stage 0 from the last stage's chunk c - 1)
            h_in = self._recv((*x.shape, model.config.hidden_size), dtype, x.device, (self.stage - 1) % self.size,
                              "acts")
            h_in.requires_grad_(grad and self.backward[k - 1])
            if routes:
                before = self._recv((4, model.config.num_experts), torch.float32, x.device,
                                    (self.stage - 1) % self.size, "acts")
                before.requires_grad_(last and grad and self.backward[k - 1])
        with torch.set_grad_enabled(grad and self.backward[k]):  # (a frozen part keeps no activations)
            out = model.stage_forward(h_in, x, y if last else None, docs, chunk=chunk,
                                      **(dict(loss_kwargs, routing_before=before) if last else {}))
        if last:
            return h_in, out, before
        self._send(out.to(dtype), (self.stage + 1) % self.size, "acts", pending_sends)
        own = None
        if routes:
            own = model.routing_totals()  # (this part's sparse layers'; None for none)
            running = torch.zeros(4, model.config.num_experts, device=x.device) if before is None else before
            self._send(running if own is None else running + own.detach(), (self.stage + 1) % self.size, "acts",
                       pending_sends)
        return h_in, out, own

    def _backward(self, model, chunk: int, h_in, out, routing, scale: float, pending_sends, scaler=None,
                  split: bool = False):
        """The backward of one micro-batch's part (``_forward``'s outputs); ``routing``: its third. With
        ``split`` (``zero-bubble``) only the input's gradient, sent back at once: returns the weights'
        pass to run later (``split_backward.SplitBackward``; on the first part, which sends nothing
        back, the whole backward)."""
        first, last = self.ends(chunk)
        routes, pass_back = self.routes(model), not first and self.backward[self.part(chunk) - 1]
        grad_routing = None  # (the balance terms' gradient of every part's routing totals)
        if last:  # (distilling, ``out`` is [loss, ce, kl])
            loss = (out[0] if out.ndim else out) * scale
            outputs, grads = [scaler.scale(loss) if scaler is not None else loss], [None]
        else:
            g = self._recv(out.shape, out.dtype, out.device, (self.stage + 1) % self.size, "grads")
            outputs, grads = [out], [g]
            if routes:
                grad_routing = self._recv((4, model.config.num_experts), torch.float32, out.device,
                                          (self.stage + 1) % self.size, "grads")
                if routing is not None and routing.requires_grad:  # (rows 1 and 2: probabilities, z-sums)
                    outputs.append((grad_routing[1:3] * routing[1:3]).sum())
                    grads.append(None)
        later = None
        if not split:
            torch.autograd.backward(outputs, grads)
        elif not pass_back:  # (nothing to send: all of it later)
            later = _WholeBackward(outputs, grads)
        else:
            from .split_backward import SplitBackward

            inputs = [h_in, *([routing] if last and routes else [])]
            later = SplitBackward(outputs, grads, inputs)
            later.inputs_pass()
        if last and routes and pass_back:
            grad_routing = routing.grad if routing.grad is not None else torch.zeros_like(routing)
        if pass_back:
            self._send(h_in.grad, (self.stage - 1) % self.size, "grads", pending_sends)
            if routes:
                self._send(grad_routing, (self.stage - 1) % self.size, "grads", pending_sends)
        return later

    def dtype(self, model) -> torch.dtype:
        """The residual stream's dtype between stages: the parameters' (under autocast the stream
        stays in it: the embedding and every residual add are in the weights' dtype), or under FSDP
        on CUDA its compute copies' (``wire_dtype``)."""
        return self.wire_dtype or next(model.parameters()).dtype

    @property
    def gathered_through_step(self) -> bool:
        """Under FSDP, whether a stage's parameters stay gathered from its first forward to the step's
        end (``_fsdp_defer_reduction``): unless ``reshard_after_forward``; always under zero-bubble."""
        return self.schedule == "zero-bubble" or not self.reshard_after_forward

    @staticmethod
    def sharded(model) -> bool:
        """Whether FSDP shards this stage over its replicas (``--parallel fsdp``): it then gathers the
        parameters around each forward and backward and reduce-scatters the gradients itself."""
        return hasattr(model, "set_requires_gradient_sync")

    def train_step(self, model, micro_batches: list, scale: float, *, autocast=contextlib.nullcontext,
                   loss_kwargs: dict | None = None, scaler=None, teacher_of=None, router=None,
                   balance_targets: list | None = None) -> tuple:
        """Forward and backward of the step's micro-batches ``[(x, y, docs), ...]`` through the pipeline
        in ``self.schedule``; each loss scaled by ``scale`` for the backward. ``teacher_of(m)``:
        distillation's ``Teacher`` of micro-batch m (asked on the last stage, in its forward). A mixture
        of experts: ``router`` (``loop.RouterMeasures``) counts each of the last part's forwards, and
        ``balance_targets[m]`` is the model's ``aux_targets`` for micro-batch m. Returns
        the summed loss (detached; 0 on every stage but the last) and, distilling, the summed
        ``[ce, kl]`` (else None). Gradients are this stage's, not yet reduced (``reduce_grads``)."""
        loss_kwargs = loss_kwargs or {}
        sends: list = []
        saved: dict[tuple[int, int], tuple] = {}  # (chunk, micro-batch) -> its input and output
        weights: dict[tuple[int, int], object] = {}  # zero-bubble: -> its backward's weights pass, to run
        total = torch.zeros((), device=micro_batches[0][0].device)
        parts = torch.zeros(2, device=total.device) if teacher_of is not None else None
        if scaler is not None:  # (fp16: only the last stage scales a loss, but every stage's scaler must
            scaler.scale(total)  # hold the scale its gradients were multiplied by, to unscale them)
        fsdp, n = self.sharded(model), len(micro_batches)
        deferred = fsdp and self.gathered_through_step  # (reduce-scattered after its last backward or W)
        if self.backward is None:
            self.backward = self._plan_backward(model)
        if deferred:
            _fsdp_defer_reduction(model)
        for op, chunk, m in schedule(self.schedule, self.size, self.stage, n, self.chunks):
            if op == "F":
                x, y, docs = micro_batches[m]
                last = self.ends(chunk)[1]
                if last and balance_targets is not None:
                    model.aux_targets = balance_targets[m]
                with autocast():
                    kwargs = {"teacher": teacher_of(m)} if last and teacher_of is not None else loss_kwargs
                    h_in, out, routing = self._forward(model, chunk, x, y, docs, sends, loss_kwargs=kwargs,
                                                       grad=True)
                if last and router is not None:
                    router.add()
                if last and parts is not None:  # [loss, ce, kl]
                    total, parts = total + out[0].detach().float(), parts + out[1:].detach().float()
                elif last:
                    total = total + out.detach().float()
                if self.backward[self.part(chunk)]:
                    saved[chunk, m] = (h_in, out, routing)
                continue
            if not self.backward[self.part(chunk)]:  # (nothing here or before it trains: no backward)
                continue
            if op == "W":  # (zero-bubble: the weights' half of a backward whose input half ran)
                weights.pop((chunk, m)).weights_pass()
                continue
            h_in, out, routing = saved.pop((chunk, m))
            if fsdp and not deferred:  # (gradients accumulate unsharded; a chunk's last backward
                model.set_requires_gradient_sync(m == n - 1)  # reduce-scatters their sum)
            later = self._backward(model, chunk, h_in, out, routing, scale, sends, scaler,
                                   split=self.schedule == "zero-bubble")
            if later is not None:
                weights[chunk, m] = later
        for work, _ in sends:
            work.wait()
        if deferred:
            _fsdp_reduce_deferred(model)
        elif fsdp:
            model.set_requires_gradient_sync(True)
        return total, parts

    @torch.no_grad()
    def _forward_only(self, model, x, y, docs, loss_kwargs: dict) -> torch.Tensor:
        """One batch through this stage's chunks without gradients: the last chunk's output (on the
        last stage, the loss ``loss_kwargs`` ask for)."""
        sends: list = []
        for chunk in range(self.chunks):
            _, out, _ = self._forward(model, chunk, x, y, docs, sends, loss_kwargs=loss_kwargs, grad=False)
        for work, _ in sends:
            work.wait()
        return out

    def loss_sum(self, model, x, y, docs, *, autocast=contextlib.nullcontext) -> torch.Tensor:
        """The summed loss of one batch through the pipeline without gradients (0 but on the last stage)."""
        with autocast():
            out = self._forward_only(model, x, y, docs, {})
        return out.double() if self.last else torch.zeros((), dtype=torch.float64, device=x.device)

    def sequence_losses(self, model, x, y, documents=None) -> torch.Tensor:
        """``forward``'s ``reduction="sequence"`` losses of the rows ``x`` (each document's, with
        ``documents``) through the pipeline, fp32, on every stage (broadcast from the last one)."""
        out = self._forward_only(model, x, y, documents, {"reduction": "sequence"})
        n = x.shape[0] if documents is None else documents.cu_seqlens.numel() - 1
        losses = out.float() if self.last else torch.empty(n, dtype=torch.float32, device=x.device)
        dist.broadcast(losses, src=self.rank_of(self.size - 1), group=self.pipeline)
        return losses

    # ------------------------------------------------------------------------------ gradients
    def reduce_grads(self, model) -> None:
        """After the schedule: under sequence parallelism the whole-kept parameters' gradients summed over
        the tensor-parallel group; each gradient averaged over this stage's replicas (FSDP's last
        backward already reduce-scattered them), then the tied embedding's two copies summed (first and
        last stage; under FSDP each replica's rows of both, which the two stages shard alike)."""
        from .distributed import all_reduce_flat, local_part

        sp = model.sequence_parallel
        if sp is not None:  # (the norms' gradients, each rank's from its own positions, summed over the group)
            from .tensor_parallel import sequence_split_parameters

            all_reduce_flat([local_part(p.grad) for p in sequence_split_parameters(model) if p.grad is not None],
                            sp.group)
        ep, experts = self.experts(model)
        if self.data is not None and not self.sharded(model):
            all_reduce_flat([p.grad for p in model.parameters() if p.grad is not None and id(p) not in experts],
                            self.data, self.replicas)
        if ep is not None:  # (experts: summed over the stage's ranks holding them, the mean over its replicas)
            ep.reduce_grads([p for p in model.parameters() if id(p) in experts], sharded=self.sharded(model))
        if self.tied is not None and model.config.tie_word_embeddings \
                and model.model.embed_tokens.weight.requires_grad:  # (not under --freeze)
            embed = model.model.embed_tokens.weight
            if embed.grad is None:
                embed.grad = torch.zeros_like(embed)
            dist.all_reduce(local_part(embed.grad), group=self.tied)

    def clip_grad_norm(self, model, max_norm: float) -> torch.Tensor:
        """Clip every gradient by the whole model's gradient norm (over the pipeline's stages, the tied
        copy once); returns that norm."""
        from .distributed import local_part
        from .tensor_parallel import split_dims

        # (under FSDP each rank's rows: the replicas' shards of a stage are disjoint, so the sum over
        # every rank is the whole model's; else each rank's parts of the split tensors (tensor
        # parallelism), the whole-kept ones (alike on the group's ranks) counted on its rank 0, summed
        # over every rank, whose replicas agree after the average: divided by them)
        # (expert parallelism, unsharded: an expert is held by 1/N of the replicas: its squares count N
        # times to be divided by them like the rest)
        split, (ep, experts) = split_dims(model), self.experts(model)
        weight = ep.size if ep is not None and not self.sharded(model) else 1
        grads = [(local_part(p.grad), weight if id(p) in experts else 1) for n, p in self.owned(model)
                 if p.grad is not None and (n in split or self.tensor_rank == 0)]
        device = next(model.parameters()).device
        sq = torch.zeros((), dtype=torch.float32, device=device)
        if grads:
            sq = torch.stack([g.detach().float().pow(2).sum() * w for g, w in grads]).sum()
        dist.all_reduce(sq)
        if not self.sharded(model):
            sq = sq / self.replicas
        elif self.replicate > 1:  # (HSDP: each shard group holds the stage's rows once)
            sq = sq / self.replicate
        norm = sq.sqrt()
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        every = [local_part(p.grad) for p in model.parameters() if p.grad is not None]
        if every:
            torch._foreach_mul_(every, coef.to(every[0].dtype))
        return norm


def groups(world: int, size: int, rank: int, schedule: str = "1f1b", chunks: int = 1,
           tensor: int = 1, context: int = 1, fsdp_shard: int = 0,
           reshard_after_forward: bool = False) -> PipelineParallel:
    """This rank's ``PipelineParallel`` for ``size`` stages (of ``chunks`` model chunks each) over
    ``world`` ranks (stage-major; within a stage, tensor-parallel groups of ``tensor`` consecutive
    ranks, or context-parallel groups of ``context`` consecutive ranks; under HSDP, ``fsdp_shard``,
    shard groups of that many; ``reshard_after_forward``: the field's). Every rank creates every
    group, in one order, as ``torch.distributed.new_group`` needs (the tied embedding's too: whether
    the model ties is known only once it is loaded)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"--pipeline-schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    width = world // size
    replicas = width // tensor
    stage, local = divmod(rank, width)
    pp = PipelineParallel(size, stage, replicas, local // tensor, schedule, chunks, tensor=tensor,
                          tensor_rank=local % tensor, context=context,
                          replicate=width // fsdp_shard if fsdp_shard else 1,
                          reshard_after_forward=reshard_after_forward)
    for s in range(size):  # each stage's replicas (those holding the same tensor-parallel part)
        for t in range(tensor):
            g = dist.new_group([s * width + d * tensor + t for d in range(replicas)]) if replicas > 1 else None
            if (s, t) == (stage, pp.tensor_rank):
                pp.data = g
    pp.links = {}
    for i in range(width):  # each stage index's pipeline, its tied first and last stage, its links
        g = dist.new_group([s * width + i for s in range(size)])
        t = dist.new_group([i, (size - 1) * width + i])
        if i == local:
            pp.pipeline = g
            if pp.first or pp.last:
                pp.tied = t
        # (one group per direction between neighbours, see the module docstring; with several chunks
        # the last stage's chunk c hands on to stage 0's chunk c + 1: a ring)
        for s in range(size if chunks > 1 else size - 1):
            nxt = (s + 1) % size
            pair = sorted([s * width + i, nxt * width + i])
            acts, grads = dist.new_group(pair), dist.new_group(pair)
            if i == local and stage in (s, nxt):
                pp.links["acts", s, nxt], pp.links["grads", nxt, s] = acts, grads
    return pp


class PipelineScorer:
    """The whole pipeline as ``choices.score_choices`` (``posttrain.sequence_logps``) reads a model:
    its ``loss(..., reduction="sequence")`` runs through the stages (``sequence_losses``), every rank
    getting the result; the rest is the stage's model's."""

    def __init__(self, model, pp: PipelineParallel):
        self.model, self.pp = model, pp
        self.config, self.use_fast = model.config, model.use_fast

    @property
    def training(self) -> bool:
        return self.model.training

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def loss(self, x, y, reduction: str = "mean", documents=None, lengths=None) -> torch.Tensor:
        if reduction != "sequence":
            raise ValueError(f"PipelineScorer.loss: reduction {reduction!r}; expected 'sequence' (each row's or "
                             f"document's loss, the same on every stage)")
        return self.pp.sequence_losses(self.model, x, y, documents)


class PipelineGatherer(RankZeroGather):
    """The whole model's tensors for rank 0's checkpoint (``gathering.save_checkpoint``): each weight,
    AdamW moment or Muon buffer is broadcast, when rank 0's ``save`` writes it, from the first
    replica's rank of the stage holding it (under FSDP that stage's replicas first all-gather it).
    Every rank learns the whole list first (names, shapes, dtypes, owners, AdamW step counts: one
    ``all_gather_object``); then rank 0's ``state()`` gives LazyTensors and the others ``serve()``
    until ``done()`` (``gathering.RankZeroGather``)."""

    def __init__(self, trainer, pp: PipelineParallel):
        from .distributed import _is_dtensor
        from .tensor_parallel import SplitBlocks, split_dims

        self.pp, self.device, self.model = pp, trainer.device, trainer.model
        model, opt = trainer.model, trainer.optimizer
        self.tp, split = model.tensor_parallel, split_dims(model)
        # (expert parallelism: an expert listed by the stage's first rank holding it, its replicas of
        # the same index in their groups gather it under FSDP)
        self.ep, experts = pp.experts(model)
        self.local: dict[tuple[str, str], torch.Tensor] = {}  # (every replica's: FSDP's shards gather)
        entries = []  # (kind, name, dtype, whole shape, step, split dim): the first replica's
        # (the stage's first expert-parallel group lists its experts: each of its ranks its own)
        self.held = {name for name, p in pp.owned(model) if id(p) in experts}
        # (the first expert-parallel group's ranks of tensor-parallel rank 0: replicas 0 .. N - 1)
        first_group = self.ep is not None and pp.replica < self.ep.size and pp.tensor_rank == 0
        for name, p in pp.owned(model):
            dim = split.get(name)
            shape = self.tp.whole_shape(p.shape, dim) if dim is not None else tuple(p.shape)
            self.local["weight", name] = p
            entries.append(("weight", name, str(p.dtype), shape, None, dim))
            state = opt.state.get(p) or {}
            step = int(state["step"]) if "step" in state else None
            for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                m = state.get(key)
                if m is None:
                    continue
                if torch.is_tensor(m):
                    self.local[key, name] = m
                    entries.append((key, name, "torch.float32", shape, step, dim))
                    continue
                # an 8-bit moment (adamw8bit.Blockwise8bit): its codes and scales, under FSDP this rank's
                # blocks (gathered over the stage's replicas), of a split parameter's part joined as the
                # whole's blocks (as ShardGatherer does without a pipeline)
                pair = ((BlockShards(m.codes, p), BlockShards(m.absmax, p)) if _is_dtensor(p)
                        else (m.codes, m.absmax))
                if dim is not None:
                    pair = SplitBlocks.pair(*pair, tuple(p.shape), dim, self.tp)
                for part, t in zip(("codes", "absmax"), pair):
                    self.local[f"{key}.{part}", name] = t
                    entries.append((f"{key}.{part}", name, str(t.dtype), tuple(t.shape), step, None))
        from apr_kernels.model.lora import QuantizedLoRALinear

        for name, m in model.named_modules():  # QLoRA: the quantised bases' whole raw blocks (no parameters)
            if isinstance(m, QuantizedLoRALinear):
                if id(m.lora_A) in experts:  # (an expert's: listed by its holder in the first group)
                    self.held.add(f"{name}.weight")
                self.local["base", f"{name}.weight"] = WholeBaseRaw(m)
                entries.append(("base", f"{name}.weight", m.base.dtype, tuple(m.whole_base_shape), None, None))
        if pp.local != 0:  # (one list per stage: its first replica's tensor-parallel rank 0's)
            entries = [e for e in entries if first_group and e[1] in self.held]
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, (dist.get_rank(), entries))
        self.items = [(kind, name, dtype, shape, step, rank, dim) for rank, es in every
                      for kind, name, dtype, shape, step, dim in es]

    def _full(self, i: int) -> torch.Tensor:
        from .distributed import full_tensor

        from apr_kernels._format import nbytes_for

        kind, name, dtype, shape, _, owner, dim = self.items[i]
        if kind == "base":  # (a quantised base: its raw bytes)
            dtype, shape = torch.uint8, (nbytes_for(dtype, shape),)
        else:
            dtype = getattr(torch, dtype.removeprefix("torch."))
        whole = None
        # (FSDP: the stage's replicas gather its rows; an expert's, the stage's ranks holding it)
        if owner // self.pp.width == self.pp.stage and (kind, name) in self.local:
            item = self.local[kind, name]  # (an 8-bit moment's part, a quantised base: gathers itself)
            whole = full_tensor(item.detach()) if torch.is_tensor(item) else item.gather()
            if dim is not None and self.pp.replica == (owner % self.pp.width) // self.pp.tensor:
                # (the owner's tensor-parallel group joins its parts)
                whole = self.tp.gather(whole, dim)
        if dist.get_rank() == owner:
            buf = whole.to(dtype).clone()
        else:
            buf = torch.empty(shape, dtype=dtype, device=self.device)
        dist.broadcast(buf, src=owner)
        return buf

    def _fetch(self, i: int) -> torch.Tensor:
        self._broadcast(i)
        return self._full(i).cpu()

    def state(self, merge_lora: bool = False) -> tuple[dict, dict]:
        from apr_kernels._format import APR_DTYPE_OF
        from apr_kernels.io import LazyTensor, QuantizedTensor

        weights, moments = {}, {}
        for i, (kind, name, dtype, shape, step, *_) in enumerate(self.items):
            if kind == "base":  # (a quantised LoRA base: its blocks written as they are)
                weights[name] = LazyTensor(dtype, shape,
                                           lambda i=i, d=dtype, s=shape: QuantizedTensor(d, s, self._fetch(i)))
                continue
            lazy = LazyTensor(APR_DTYPE_OF[getattr(torch, dtype.removeprefix("torch."))], shape,
                              lambda i=i: self._fetch(i))
            if kind == "weight":
                weights[name] = lazy
                continue
            entry = moments.setdefault(name, {})
            key, _, part = kind.partition(".")
            if not part:
                entry[key] = lazy
            elif part == "codes":  # (an 8-bit moment: its codes, then its scales)
                entry[key] = Gathered8bit(lazy, None)
            else:
                entry[key].absmax = lazy
            if step is not None:
                entry["step"] = step
        lora = getattr(self.model, "lora", None)
        if merge_lora and lora:  # each adapted projection's W + scale B A (DoRA: rows rescaled), no adapters
            from apr_kernels.model.lora import lora_scale

            scale = lora_scale(lora["rank"], lora["alpha"], lora.get("rslora", False))
            index = {(kind, name): i for i, (kind, name, *_) in enumerate(self.items)}
            for base in [n.removesuffix(".lora_A") for n in weights if n.endswith(".lora_A")]:
                parts = [index.get(("weight", f"{base}.{p}")) for p in ("weight", "lora_A", "lora_B", "lora_magnitude")]
                if parts[0] is None:  # (QLoRA: the quantised base, dequantised)
                    parts[0] = index[("base", f"{base}.weight")]
                for p in ("lora_A", "lora_B", "lora_magnitude"):
                    weights.pop(f"{base}.{p}", None)
                weights[f"{base}.weight"] = LazyTensor("F32", self.items[parts[0]][3],
                                                       lambda parts=parts: self._merged(*parts, scale))
            moments = {}
        return weights, moments

    def _merged(self, w: int, a: int, b: int, magnitude: int | None, scale: float) -> torch.Tensor:
        from apr_kernels.model.lora import merged
        from apr_kernels.quant import dequantize

        kind, _, fmt, shape, *_ = self.items[w]  # (QLoRA: the base's blocks, dequantised)
        weight = dequantize(fmt, shape, self._fetch(w)) if kind == "base" else self._fetch(w).float()
        lora_a, lora_b, mag = (None if i is None else self._fetch(i).float() for i in (a, b, magnitude))
        return merged(weight, lora_a, lora_b, scale, torch.float32, mag)

