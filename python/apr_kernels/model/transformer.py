"""A decoder-only Llama/Qwen2 transformer with Hugging Face parameter names.

Reading order: RMSNorm -> Attention -> MLP -> Block -> Transformer (a mixture-of-experts layer's
``SparseMoE``, in the MLP's place, is in ``moe.py``). Each module has two paths:

* fast: the package's ops (``apr_kernels.rms_norm``, ``add_rms_norm``, ``rope``, ``attention``,
  ``swiglu``, ``linear_cross_entropy``), which run the Triton kernels on CUDA and their PyTorch reference
  elsewhere; attention takes K/V with their own (fewer) heads, never expanded, and the loss never
  holds the whole ``[B, T, vocab]`` logits;
* eager (``fast=False``): plain PyTorch written as Hugging Face writes it, the oracle for the fast path.

``fast=None`` picks the fast path when the input is on a CUDA device. Both give the same numbers within
dtype tolerance. The state dict uses exactly the Hugging Face names (``model.layers.N.self_attn.q_proj
.weight``, ...), so it loads into ``Qwen2ForCausalLM``/``LlamaForCausalLM`` and back unchanged.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from typing import NamedTuple

from .config import ModelConfig
from .documents import Documents
from .moe import RemoteExpert, SparseMoE
from .rope import apply_rope, rope_tables


def _ops():
    import apr_kernels  # lazy: the ops module pulls in torch.library registrations

    return apr_kernels


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, normalised in fp32 then cast back (HF Llama numerics)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    # a per-head norm (Qwen3's q/k norms) under tensor parallelism: train/tensor_parallel.py's
    # TensorParallel, whose ranks each normalise their own heads with the whole weight: its
    # gradient is summed over them
    tensor_parallel = None

    def forward(self, x: torch.Tensor, fast: bool = False) -> torch.Tensor:
        w = self.weight if self.tensor_parallel is None else self.tensor_parallel.shared(self.weight)
        if fast:
            return _ops().rms_norm(x, w, self.eps)
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * x32.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class DocumentMask(NamedTuple):
    """Document masking inside the layers (``model/documents.py``): the spans for the fused kernel,
    and for the eager path the ``[B, 1, S, S]`` boolean mask (True: may attend) it builds instead."""

    documents: Documents
    mask: torch.Tensor | None


def window_mask(s: int, window: int, device, offset: int = 0) -> torch.Tensor:
    """``[s, offset + s]`` boolean (True: may attend) for queries at positions ``offset ..``: causal,
    and at most ``window`` keys back (the key itself included)."""
    i = torch.arange(offset, offset + s, device=device)[:, None]
    j = torch.arange(offset + s, device=device)[None, :]
    return (j <= i) & (j > i - window)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; q/k/v bias for Qwen2."""

    # train/context_parallel.py's ContextParallel while this rank holds a share of every sequence's
    # positions (Transformer.set_context_parallel), else None
    context_parallel = None
    # train/tensor_parallel.py's TensorParallel while this rank holds a share of the heads
    # (Transformer.set_tensor_parallel; num_heads and num_kv_heads are then the local counts), else None
    tensor_parallel = None
    # the fast path's q/k/v as one GEMM on the concatenated weights (False under float8: each
    # projection is its own float8 GEMM with its own scale; train/float8.py)
    fused_qkv = True

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.rope_type = cfg.rope_type
        self.window = cfg.layer_window(layer)  # keys per query (None: all before it)
        q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:  # Qwen3: each head of q and k RMS-normalised before RoPE
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def _qkv_fused(self, x: torch.Tensor):
        """q, k, v from one GEMM on the concatenated weights (the parameters stay Hugging Face's three):
        the k/v projections are narrow (Qwen2-0.5B: 128 columns) and run far below the GEMM rate
        alone. q, k, v come out as strided views of one buffer; the kernels read them in place, and
        split's backward concatenates the three gradients in one pass."""
        p = (self.q_proj, self.k_proj, self.v_proj)
        bias = torch.cat([m.bias for m in p]) if self.q_proj.bias is not None else None
        if any(hasattr(m, "base") for m in p):  # a quantised LoRA base: dequantised per GEMM, not kept
            from .lora import FrozenLinear, frozen_weight

            y = FrozenLinear.apply(x, lambda dtype: torch.cat([frozen_weight(m, dtype) for m in p]), bias)
        else:
            y = F.linear(x, torch.cat([m.weight for m in p]), bias)
        parts = y.split([m.out_features for m in p], dim=-1)
        if any(hasattr(m, "adapt") for m in p):  # LoRA (model/lora.py): the low-rank terms added (DoRA's rescaling)
            parts = tuple(m.adapt(y, x) if hasattr(m, "adapt") else y for y, m in zip(parts, p))
        return parts

    def rotated_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fast: bool = False,
                    packed: bool = False):
        """q ``[B, S, Hq, D]`` and k, v ``[B, S, Hkv, D]`` of ``x`` ``[B, S, hidden]``, q and k rotated by
        the tables. ``packed``: all tokens as one row ``[1, B*S, H, D]`` (views), for per-token tables."""
        b, s, _ = x.shape
        if fast and self.fused_qkv:
            q, k, v = self._qkv_fused(x)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, s, self.num_heads, self.head_dim)
        k = k.view(b, s, self.num_kv_heads, self.head_dim)
        v = v.view(b, s, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q, fast), self.k_norm(k, fast)
        if packed:  # the tables and the spans address the tokens of all rows in order
            q, k, v = (t.reshape(1, b * s, t.shape[2], t.shape[3]) for t in (q, k, v))
        if fast:  # q and k rotated in one pass; the backward keeps only the tables
            q, k = _ops().rope(q, k, cos.to(q.dtype), sin.to(q.dtype), self.rope_type)
        else:
            q = apply_rope(q, cos.to(q.dtype), sin.to(q.dtype), self.rope_type)
            k = apply_rope(k, cos.to(k.dtype), sin.to(k.dtype), self.rope_type)
        return q, k, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fast: bool = False,
                docs: DocumentMask | None = None):
        """``cos``/``sin``: ``[S, D/2]`` tables, or with ``docs`` ``[B*S, D/2]``, one row per token
        (positions restart at each document)."""
        tp = self.tensor_parallel
        if tp is not None:  # this rank's heads: the input's gradient summed over the group (sequence
            x = tp.enter(x)  # parallelism: the rows' positions gathered from the group first)
        b, s, _ = x.shape
        q, k, v = self.rotated_qkv(x, cos, sin, fast, packed=docs is not None)
        if self.context_parallel is not None:  # the local chunks against the group's gathered K/V
            if docs is not None:  # (per-token tables: the packed [1, B*S] views back to rows)
                q, k, v = (t.reshape(b, s, t.shape[2], t.shape[3]) for t in (q, k, v))
            o = self.context_parallel.attention(q, k, v, fast=fast, window=self.window, scale=self.head_dim ** -0.5,
                                                documents=docs)
        elif fast and docs is not None:  # packed spans: each document attends only within itself
            d = docs.documents
            o = _ops().attention(q[0], k[0], v[0], causal=True, cu_seqlens=d.cu_seqlens, max_seqlen=d.max_seqlen,
                                 window=self.window)
        elif fast:  # [B, S, Hq, D]; K/V not expanded, v strided
            o = _ops().attention(q, k, v, causal=True, window=self.window)
        elif docs is not None or (self.window is not None and self.window < s):
            # eager with a mask, as Hugging Face's 4-D masks: causal, same document, inside the window
            mask = window_mask(s, self.window, x.device) if self.window is not None else None
            if docs is not None:
                mask = docs.mask if mask is None else docs.mask & mask
            q, k, v = (t.view(b, s, t.shape[2], t.shape[3]).transpose(1, 2) for t in (q, k, v))
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, scale=self.head_dim ** -0.5,
                enable_gqa=self.num_heads != self.num_kv_heads,
            ).transpose(1, 2)
        else:
            # HF layout [B, H, S, D]; each K/V head serves num_heads/num_kv_heads consecutive q heads
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                scale=self.head_dim ** -0.5, enable_gqa=self.num_heads != self.num_kv_heads,
            ).transpose(1, 2)
        out = self.o_proj(o.reshape(b, s, self.num_heads * self.head_dim))
        return out if tp is None else tp.leave(out)  # (the heads' partial sums added up)


def _split_linear(old: nn.Linear, tp, dim: int, name: str) -> nn.Linear:
    """This rank's part of a projection split on ``dim`` (0: rows, 1: columns), a new module of the
    same class (a LoRA projection keeps its adapters: ``lora.split_adapters``; a quantised base, no
    parameter, stays whole: ``lora.QuantizedLoRALinear``)."""
    from .lora import LoRALinear, QuantizedLoRALinear, split_adapters

    quantized = isinstance(old, QuantizedLoRALinear)
    local = tp.local(torch.empty(old.out_features, old.in_features, device="meta"), dim, name).shape
    template = old.bias if quantized and old.bias is not None else old.lora_A if quantized else old.weight
    new = nn.Linear(local[1], local[0], bias=old.bias is not None, device=template.device, dtype=template.dtype)
    if old.bias is not None:
        with torch.no_grad():
            if not old.bias.is_meta:
                new.bias.copy_(tp.local(old.bias, 0, name))
        new.bias.requires_grad_(old.bias.requires_grad)
    if quantized:
        del new.weight
        if hasattr(old, "base"):
            new.base = old.base
    else:
        if not old.weight.is_meta:
            with torch.no_grad():
                new.weight.copy_(tp.local(old.weight, dim, name))
        new.weight.requires_grad_(old.weight.requires_grad)
    if isinstance(old, LoRALinear):
        split_adapters(old, new, tp, dim)
    return new


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    tensor_parallel = None  # as Attention's: this rank holds intermediate / N of the rows

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, fast: bool = False) -> torch.Tensor:
        tp = self.tensor_parallel
        if tp is not None:
            x = tp.enter(x)
        if fast and x.numel():  # one fused pass; silu(gate) is recomputed in the backward instead of kept
            y = self.down_proj(_ops().swiglu(self.gate_proj(x), self.up_proj(x)))
        else:
            y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return y if tp is None else tp.leave(y)


class MixtralExpert(nn.Module):
    """Mixtral's expert: the same SwiGLU under Mixtral's names (w1 gate, w3 up, w2 down)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.w2 = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.w3 = nn.Linear(hidden_size, intermediate_size, bias=False)

    # the Llama names, for MLP.forward and LoRA's targets (the state dict keeps w1/w2/w3)
    gate_proj = property(lambda self: self.w1)
    up_proj = property(lambda self: self.w3)
    down_proj = property(lambda self: self.w2)
    forward = MLP.forward
    tensor_parallel = None  # (MLP.forward's: split experts run inside their layer's enter / leave)


class Block(nn.Module):
    """Pre-norm decoder layer: h += attn(norm(h)); h += mlp(norm(h)).

    The MLP's residual add is left *pending*: ``forward(h, pending, ...) -> (h, mlp_out, stats)``, and
    the next layer (or the final norm) adds it, so the fast path can fuse every residual add with the
    norm that follows it (``add_rms_norm``). The eager path does the same adds in the same order, so
    its numbers are Hugging Face's. ``stats``: a mixture-of-experts layer's routing statistics
    (``SparseMoE``; of the ``routed`` tokens), None for a dense one; returned rather than kept so that
    activation checkpointing and FSDP's hooks see them as the layer's outputs.

    The MLP lives under ``cfg.ffn_name`` (``mlp``; Mixtral's ``block_sparse_moe``); ``ffn`` is it."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self._ffn_name = cfg.ffn_name
        setattr(self, cfg.ffn_name, SparseMoE(cfg) if cfg.moe_layer(layer) else MLP(cfg.hidden_size,
                                                                                      cfg.intermediate_size))
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    @property
    def ffn(self) -> nn.Module:
        return getattr(self, self._ffn_name)

    def mlps(self) -> list[nn.Module]:
        """The SwiGLU MLPs of this layer (LoRA's MLP targets): the dense one, or every expert."""
        return self.ffn.mlps() if isinstance(self.ffn, SparseMoE) else [self.ffn]

    def forward(self, h: torch.Tensor, pending: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                fast: bool = False, docs: DocumentMask | None = None, routed: torch.Tensor | None = None):
        h, y = add_then_norm(self.input_layernorm, h, pending, fast)
        a = self.self_attn(y, cos, sin, fast, docs)
        h, y = add_then_norm(self.post_attention_layernorm, h, a, fast)
        if isinstance(self.ffn, SparseMoE):
            return (h, *self.ffn(y, fast, routed))
        return h, self.ffn(y, fast), None


def _kept_ops() -> frozenset:
    """The ops whose outputs selective checkpointing keeps: matrix products and attention (the
    compute-bound work, and our kernels'), K/V all-gathers and the tensor/sequence-parallel
    all-reduces and reduce-scatters (communication); everything else (norms, RoPE, SwiGLU, residual
    adds, casts, routing) is recomputed from them in the backward."""
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_grouped_mm"]
    ops = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    _ops()  # (the apr:: custom ops are registered on import)
    for name in ("attention_fwd", "attention_varlen_fwd", "grouped_mm", "grouped_mm_stacked"):
        if hasattr(torch.ops.apr, name):
            ops.add(getattr(torch.ops.apr, name).default)
    if hasattr(torch.ops, "_c10d_functional"):
        ops.add(torch.ops._c10d_functional.all_gather_into_tensor.default)
        ops.add(torch.ops._c10d_functional.all_reduce.default)  # (tensor parallelism's sums)
        ops.add(torch.ops._c10d_functional.reduce_scatter_tensor.default)  # (and sequence parallelism's)
        ops.add(torch.ops._c10d_functional.wait_tensor.default)
    return frozenset(ops)


def selective_checkpoint():
    """``torch.utils.checkpoint``'s ``context_fn`` for selective activation checkpointing (torchtitan's
    op-level policy): the outputs of :func:`_kept_ops` are saved in the forward, the rest recomputed
    in the backward; far less memory than keeping everything, without re-running the matmuls."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    kept = _kept_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in kept else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def add_then_norm(norm: RMSNorm, h: torch.Tensor, x: torch.Tensor | None, fast: bool):
    """``(h + x, norm(h + x))`` (``x`` None: ``(h, norm(h))``). Fast: one fused pass. Under autocast x
    is bf16 while the residual stream stays fp32 (as in the eager path, where h + x promotes), so the
    fused add runs in the stream's dtype."""
    if x is None:
        return h, norm(h, fast)
    if fast:
        y, h = _ops().add_rms_norm(x.to(h.dtype), h, norm.weight, norm.eps)
        return h, y
    h = h + x
    return h, norm(h)


class LayerInputs(NamedTuple):
    """What the decoder layers take besides the residual stream (``Transformer.layer_inputs``): the
    path, the RoPE tables (per token with documents or context parallelism), the document mask and
    the routed tokens."""
    fast: bool
    cos: torch.Tensor
    sin: torch.Tensor
    docs: DocumentMask | None
    routed: torch.Tensor | None


class Decoder(nn.Module):
    """The ``model.`` prefix of Hugging Face names: embedding, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    """Causal LM: ``forward(input_ids [B, T]) -> logits [B, T, vocab]``; with ``config.num_labels``
    a sequence classifier (a reward model) instead: ``forward(input_ids, ends=...) -> [N, num_labels]``.

    ``fast``: True = the package's ops, False = eager PyTorch, None = ops when the input is on CUDA.
    New models are initialised as Hugging Face does (normal(0, 0.02) weights, zero biases, unit norms).
    """

    def __init__(self, config: ModelConfig, fast: bool | None = None):
        super().__init__()
        self.config = config
        self.fast = fast
        # True or "full": each layer's activations are recomputed in the backward instead of kept
        # (Hugging Face's gradient_checkpointing; `apr-kernels train --grad-checkpointing`);
        # "selective": only the cheap ones, the matmul and attention outputs kept (selective_checkpoint)
        self.gradient_checkpointing = False
        # NEFTune (Jain et al., 2023; TRL's neftune_noise_alpha): in training mode, uniform noise of
        # magnitude alpha / sqrt(T * hidden) added to the token embeddings (0: off)
        self.neftune_alpha = 0.0
        # mixture of experts: the load-balancing loss's weight in training mode (the config's; the
        # trainer may change it, 0: off)
        self.router_aux_loss_coef = config.router_aux_loss_coef if config.is_moe else 0.0
        # the router z-loss's weight in training mode (ST-MoE, Zoph et al. 2022; OLMoE's 0.001): 0 off,
        # as in the Qwen and Mixtral configs
        self.router_z_loss_coef = 0.0
        self.router_stats: list = []
        self.last_aux_loss: torch.Tensor | None = None
        self.last_expert_load: torch.Tensor | None = None
        self.last_router_z_loss: torch.Tensor | None = None
        self.last_balance_loss: torch.Tensor | None = None  # (the weighted terms, with their graph: forward)
        self.router_aux_sync = False  # count expert choices over every rank (router_aux_loss)
        self.router_aux_group = None  # (those ranks: None for all; a pipeline stage's replicas)
        # a pipeline's earlier parts' routing statistics (``routing_totals``), for the last part's terms
        self.routing_before: torch.Tensor | None = None
        self.aux_targets: float | None = None  # (forward's "sum": the targets the balance term stands for)
        self.model = Decoder(config)
        if config.num_labels:  # Hugging Face's *ForSequenceClassification: no output projection
            self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        elif not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()

    @property
    def output_weight(self) -> torch.Tensor:
        """The output projection [vocab, hidden]: ``lm_head.weight`` or the tied embedding."""
        if self.config.num_labels:
            raise ValueError(f"this model is a sequence classifier (num_labels={self.config.num_labels}, a "
                             f"score head); it has no output projection: expected a causal LM")
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight
        return self.lm_head.weight

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        if self.model.embed_tokens.weight.is_meta:  # built on the meta device (from_apr): nothing to draw,
            return                                  # and tens of thousands of meta normal_ calls cost seconds
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def use_fast(self, x: torch.Tensor) -> bool:
        return x.is_cuda if self.fast is None else bool(self.fast)

    # train/context_parallel.py's ContextParallel, or None: each forward's input_ids are then this
    # rank's positions of every row (ContextParallel.shard), not whole rows
    context_parallel = None

    def set_context_parallel(self, cp) -> None:
        """Train on this rank's share of each sequence's positions (``train/context_parallel.py``);
        None: whole sequences again."""
        self.context_parallel = cp
        for layer in self.model.layers:
            if hasattr(layer, "self_attn"):  # (another pipeline stage's layer: not here)
                layer.self_attn.context_parallel = cp

    @property
    def expert_parallel(self):
        """train/expert_parallel.py's ExpertParallel when the experts are spread over ranks, else None."""
        return next((m.expert_parallel for m in self.modules() if isinstance(m, SparseMoE)), None)

    def set_expert_parallel(self, ep) -> None:
        """Spread every sparse layer's experts over expert-parallel group ``ep`` (``SparseMoE.
        set_expert_parallel``): this rank keeps its share, the others' parameters are freed (on the
        meta device, before loading, they are never allocated)."""
        if not self.config.is_moe:
            raise ValueError(f"--expert-parallel {ep.size}: the model ({self.config.architecture}) has no "
                             f"experts; expected a mixture-of-experts model (qwen2_moe, qwen3_moe, mixtral)")

        for m in self.modules():
            if isinstance(m, SparseMoE):
                m.set_expert_parallel(ep)

    @property
    def tensor_parallel(self):
        """train/tensor_parallel.py's TensorParallel when the layers are split over ranks, else None."""
        # (the first layer this model holds: a pipeline stage holds only its own)
        attn = next((layer.self_attn for layer in self.model.layers if hasattr(layer, "self_attn")), None)
        return attn.tensor_parallel if attn is not None else None

    @torch.no_grad()
    def set_tensor_parallel(self, tp, vocabulary: bool = True) -> None:
        """Split every layer's projections over tensor-parallel group ``tp`` (``train/tensor_parallel.py``):
        this rank keeps its heads' rows of q/k/v and columns of o, its rows of gate/up and columns of
        down; with ``vocabulary`` (and a vocabulary the group divides) the embedding and head by
        vocabulary range too. A materialised model keeps its slices (copies); on the meta device
        nothing is allocated."""
        from apr_kernels.train.tensor_parallel import COLUMN, ROW, check_config

        if self.tensor_parallel is not None:
            raise ValueError("set_tensor_parallel: the model is split already")
        check_config(self.config, tp.size)
        for layer in self.model.layers:
            if not hasattr(layer, "self_attn"):  # (another pipeline stage's layer: not here)
                continue
            attn, ffn = layer.self_attn, layer.ffn
            # a sparse layer: every expert's (and the shared expert's) rows and columns, the experts
            # running inside the layer's one enter / leave
            for m in (attn, *(ffn.mlps() if isinstance(ffn, SparseMoE) else [ffn])):
                # (the registered projections: Mixtral's experts also answer to the Llama names)
                for leaf in [leaf for leaf in m._modules if leaf in COLUMN + ROW]:
                    setattr(m, leaf, _split_linear(getattr(m, leaf), tp, 0 if leaf in COLUMN else 1, leaf))
            attn.tensor_parallel = ffn.tensor_parallel = tp
            for norm in ("q_norm", "k_norm"):  # (each rank's heads: partial gradients, summed)
                if hasattr(attn, norm):
                    getattr(attn, norm).tensor_parallel = tp
            attn.num_heads //= tp.size
            attn.num_kv_heads //= tp.size
        if vocabulary and self.config.vocab_size % tp.size == 0:  # the embedding and head by vocabulary range
            self._split_vocabulary(tp)

    def _split_vocabulary(self, tp) -> None:
        from apr_kernels.train.vocab_parallel import VocabParallelEmbedding

        old = self.model.embed_tokens
        if old is not None:  # (a pipeline stage may hold neither the embedding nor the head)
            w = tp.local(old.weight, 0, "embed_tokens")
            new = VocabParallelEmbedding(w.shape[0], w.shape[1], device=w.device, dtype=w.dtype)
            new.tensor_parallel = tp
            if not w.is_meta:
                with torch.no_grad():
                    new.weight.copy_(w)
            new.weight.requires_grad_(old.weight.requires_grad)
            self.model.embed_tokens = new
        if getattr(self, "lm_head", None) is not None:
            self.lm_head = _split_linear(self.lm_head, tp, 0, "lm_head")
        self._vocabulary_split = tp

    @property
    def vocab_parallel(self):
        """The TensorParallel whose ranks split the embedding and output head by vocabulary range, else None."""
        from apr_kernels.train.vocab_parallel import VocabParallelEmbedding

        embed = self.model.embed_tokens
        if embed is None:  # (a pipeline stage without the embedding: its head's, if it was split)
            return getattr(self, "_vocabulary_split", None)
        return embed.tensor_parallel if isinstance(embed, VocabParallelEmbedding) else None

    def remote_expert_prefixes(self) -> tuple[str, ...]:
        """The name prefixes (``model.layers.L.mlp.experts.E.``) of experts other ranks hold."""
        return tuple(f"{name}." for name, m in self.named_modules() if isinstance(m, RemoteExpert))

    @contextlib.contextmanager
    def whole_sequences(self):
        """Inside: forwards take whole rows even under context or sequence parallelism (work every rank
        does alike on its own, such as multiple-choice scoring); the split is restored after."""
        cp, sp = self.context_parallel, self.sequence_parallel
        self.set_context_parallel(None)
        if sp is not None:  # (the split blocks then sum over the group on whole rows)
            sp.sequence_parallel = False
        try:
            yield self
        finally:
            if sp is not None:
                sp.sequence_parallel = True
            self.set_context_parallel(cp)

    @property
    def sequence_parallel(self):
        """The TensorParallel whose ranks each hold a chunk of every row's positions between the
        split blocks (``--sequence-parallel``), else None."""
        tp = self.tensor_parallel
        return tp if tp is not None and tp.sequence_parallel else None

    def sequence_length(self, input_ids: torch.Tensor) -> int:
        """The rows' length in positions (under context or sequence parallelism, all ranks' shares together)."""
        cp = self.context_parallel
        local = self._context_local_length(input_ids)
        return local if cp is None else cp.global_length(local)

    def _context_local_length(self, input_ids: torch.Tensor) -> int:
        """The positions the split blocks see: this context-parallel rank's (sequence parallelism: its
        group's chunks together)."""
        sp = self.sequence_parallel
        return input_ids.shape[1] * (sp.size if sp is not None else 1)

    def _document_mask(self, input_ids: torch.Tensor, documents: Documents, fast: bool, cos, sin):
        """The layers' :class:`DocumentMask` and the per-token rope tables for ``documents`` (of the
        whole rows: under sequence parallelism the blocks attend over the gathered positions)."""
        B, S = input_ids.shape[0], self.sequence_length(input_ids)
        if documents.cu_seqlens.device != input_ids.device:
            raise ValueError(f"documents: cu_seqlens is on {documents.cu_seqlens.device}; expected the "
                             f"input's device {input_ids.device}")
        # a host read costs nothing on CPU (on CUDA it would be a sync; in a graph it can't be done)
        if not input_ids.is_cuda and not torch.compiler.is_compiling():
            documents.check(B, S)
        doc, pos = documents.token_index(B * S)
        mask = None
        if not fast:
            doc = doc.view(B, S)
            causal = torch.ones(S, S, dtype=torch.bool, device=input_ids.device).tril()
            mask = ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]
        return DocumentMask(documents, mask), cos[pos], sin[pos]

    def hidden_states(self, input_ids: torch.Tensor, documents: Documents | None = None,
                      lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Final normed hidden states [B, T, hidden] (before the output projection); ``lengths``:
        ``forward``'s (the routing statistics' tokens)."""
        ctx = self.layer_inputs(input_ids, documents, lengths)
        h, pending = self.run_layers(self.embed(input_ids), None, self.model.layers, ctx)
        return add_then_norm(self.model.norm, h, pending, ctx.fast)[1]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token embeddings [B, T, hidden] (with NEFTune's noise in training mode)."""
        h = self.model.embed_tokens(input_ids)
        if self.neftune_alpha and self.training:  # as transformers' neftune hook: T is the row length
            mag = self.neftune_alpha / (self.sequence_length(input_ids) * h.shape[2]) ** 0.5
            h = h + torch.zeros_like(h).uniform_(-mag, mag)
        return h

    def run_layers(self, h: torch.Tensor, pending: torch.Tensor | None, layers, ctx: "LayerInputs"):
        """``layers`` (decoder layers of this model, in order) on the residual stream ``h`` and the last
        layer's pending MLP output: ``(h, pending)`` after them, the routing statistics in ``router_stats``."""
        recompute = self.gradient_checkpointing and torch.is_grad_enabled()
        stats = []  # mixture-of-experts layers' routing statistics
        for layer in layers:
            args = (h, pending, ctx.cos, ctx.sin, ctx.fast, ctx.docs, ctx.routed)
            if recompute:
                extra = ({"context_fn": selective_checkpoint} if self.gradient_checkpointing == "selective"
                         else {})
                h, pending, s = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False, **extra)
            else:
                h, pending, s = layer(*args)
            if s is not None:
                stats.append(s)
        self.router_stats, self.routing_before = stats, None
        return h, pending

    def stage_forward(self, h: torch.Tensor | None, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                      documents: Documents | None = None, chunk: int = 0, label_smoothing: float = 0.0,
                      z_loss: float = 0.0, reduction: str = "sum", teacher=None,
                      routing_before: torch.Tensor | None = None) -> torch.Tensor:
        """A pipeline stage's share of ``forward`` (``train/pipeline_parallel.py``; without a pipeline
        the whole model), for the rows ``input_ids``: from their embeddings (``h`` None: the first
        part, which holds the embedding) or the residual stream ``h`` handed on by the previous part,
        through the decoder layers of this stage's model chunk ``chunk``; then, on the pipeline's last
        part, the final norm and the loss of ``targets`` (``reduction`` and ``teacher`` as ``forward``'s;
        summed by default), else the residual stream to hand on
        (the last layer's pending MLP output added: the next part's first add + norm starts from it).
        A mixture-of-experts model's last part adds the balance terms as ``forward`` does, of the whole
        model's routing: its own layers' statistics plus ``routing_before``, the earlier parts'
        (``routing_totals``; a tensor that requires grad: its gradient is what the earlier parts'
        statistics get). One method, so FSDP gathers a stage's own parameters (embedding, final norm,
        head) around it as around ``forward`` (``register_fsdp_forward_method``)."""
        ctx = self.layer_inputs(input_ids, documents)
        if h is None:
            h = self.embed(input_ids)
        pipeline = getattr(self, "pipeline", None)
        layers = pipeline.layers(self, chunk) if pipeline is not None else self.model.layers
        h, pending = self.run_layers(h, None, layers, ctx)
        if pipeline is not None and not pipeline.ends(chunk)[1]:
            return h if pending is None else h + pending.to(h.dtype)
        h = add_then_norm(self.model.norm, h, pending, ctx.fast)[1]
        out = self.output(h, input_ids, targets, reduction=reduction, documents=documents, teacher=teacher,
                          label_smoothing=label_smoothing, z_loss=z_loss)
        self.routing_before = routing_before
        return self._with_balance(out, targets, reduction, teacher)

    def layer_inputs(self, input_ids: torch.Tensor, documents: Documents | None = None,
                     lengths: torch.Tensor | None = None) -> "LayerInputs":
        """What every decoder layer takes besides the residual stream, for the rows ``input_ids``."""
        fast = self.use_fast(input_ids)
        T = self.sequence_length(input_ids)
        cos, sin = rope_tables(T, self.config.head_dim, self.config.rope_theta,
                               scaling=self.config.rope_scaling, device=input_ids.device,
                               max_position_embeddings=self.config.max_position_embeddings)
        docs = None
        cp = self.context_parallel
        if cp is not None and documents is not None:  # spans of the whole rows; RoPE restarts per document
            if not input_ids.is_cuda and not torch.compiler.is_compiling():
                documents.check(input_ids.shape[0], T)
            docs, pos = cp.documents(documents, input_ids.shape[0], T, fast)
            cos, sin = cos[pos], sin[pos]
        elif cp is not None:
            pos = cp.positions(self._context_local_length(input_ids), input_ids.device)
            cos, sin = cos[pos], sin[pos]
        elif documents is not None:
            docs, cos, sin = self._document_mask(input_ids, documents, fast, cos, sin)
        return LayerInputs(fast, cos, sin, docs, self._routed(input_ids, lengths))

    def _routed(self, input_ids: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor | None:
        """``[B, L]`` bool: which tokens of the rows the split blocks see (this context-parallel rank's
        positions; under sequence parallelism its group's chunks together) lie inside ``lengths``; None
        for all of them, or for a dense model (nothing routes)."""
        if lengths is None or not self.config.is_moe:
            return None
        L, cp = self._context_local_length(input_ids), self.context_parallel
        pos = cp.positions(L, input_ids.device) if cp is not None else torch.arange(L, device=input_ids.device)
        return pos[None, :] < lengths.to(input_ids.device)[:, None]

    def router_aux_loss(self) -> torch.Tensor | None:
        """The load-balancing loss of the last forward (None for a dense model): Switch Transformer's
        ``E * sum_e f_e * P_e`` over the tokens of every sparse layer together, f_e the fraction of
        top-k choices that went to expert e and P_e its mean router probability (Hugging Face's
        ``load_balancing_loss_func``; with ``forward``'s ``lengths``, of the tokens inside them, as its
        attention mask does).

        With ``router_aux_sync`` (set by the trainer under DDP/FSDP) f_e counts the choices of every
        rank's tokens (one all-reduce of E numbers), and P_e sums this rank's probabilities over the
        ranks' mean token count (``_counted_tokens``): the mean of the ranks' losses, which is what
        averaging their gradients minimises, is then the loss of the whole global micro-batch as one
        process computes it, equal shares of tokens or not; balance over the global batch is also
        what the Qwen team recommends for MoE training (Qiu et al., 2025)."""
        totals = self.routing_totals()
        if totals is None:
            return None
        k = self.config.num_experts_per_tok
        counts, probs = totals[0], totals[1]  # (counts: every rank's under router_aux_sync; no gradient)
        return self.config.num_experts * torch.sum(counts / (counts.sum() / k).clamp_min(1)
                                                   * (probs / self._counted_tokens(totals)))

    def routing_totals(self) -> torch.Tensor | None:
        """``[4, E]`` fp32: the last forward's routing statistics summed over its sparse layers: row 0
        the top-k choices per expert (``choice_counts``), row 1 the router probabilities (this rank's
        tokens, with their gradient), row 2 the router z-loss's sum (column 0, with its gradient), row 3
        the layers' expert loads summed (column 0) and their number (column 1); plus ``routing_before``
        (a pipeline's earlier parts' totals, every term a sum over layers). None for a dense model."""
        stats, before = getattr(self, "router_stats", None), getattr(self, "routing_before", None)
        if not stats:
            return before
        counts = self.choice_counts()  # [sparse layers, E]
        summed = torch.stack(stats).sum(0)
        layers = torch.zeros_like(summed[0])
        layers[0] = (counts.max(1).values / counts.mean(1).clamp_min(1e-9)).sum()
        layers[1] = counts.shape[0]
        totals = torch.stack([counts.sum(0), summed[1], summed[2], layers])
        return totals if before is None else totals + before

    def _counted_tokens(self, totals: torch.Tensor) -> torch.Tensor:
        """The tokens the routing statistics ``totals`` count, over the sparse layers together: this
        rank's, or under ``router_aux_sync`` the mean over the ranks (a rank's share of the global sums
        then weighs by its own tokens)."""
        total = totals[0].sum() / self.config.num_experts_per_tok
        if self.router_aux_sync:
            import torch.distributed as dist

            total = total / dist.get_world_size(self.router_aux_group)
        return total.clamp_min(1)

    def choice_counts(self) -> torch.Tensor | None:
        """``[sparse layers, E]`` top-k choices per expert in the last forward: this rank's tokens', or
        with ``router_aux_sync`` every rank's (one all-reduce per forward, kept for the other measures)."""
        stats = getattr(self, "router_stats", None)
        if not stats:
            return None
        cached = getattr(self, "_choice_counts", None)
        if cached is not None and cached[0] is stats:
            return cached[1]
        counts = torch.stack([s[0] for s in stats]).detach()
        if self.router_aux_sync:
            import torch.distributed as dist

            counts = counts.clone()
            dist.all_reduce(counts, group=self.router_aux_group)
        self._choice_counts = (stats, counts)
        return counts

    def router_z_loss(self) -> torch.Tensor | None:
        """ST-MoE's router z-loss of the last forward (None for a dense model): the mean over every sparse
        layer's tokens of ``logsumexp(router logits)^2``, which keeps the router logits small (the
        counted tokens and the ranks' shares as in ``router_aux_loss``)."""
        totals = self.routing_totals()
        if totals is None:
            return None
        return totals[2].sum() / self._counted_tokens(totals)

    def expert_load(self) -> torch.Tensor | None:
        """How unevenly the last forward's sparse layers used their experts (None for a dense model):
        per layer the busiest expert's share of the top-k choices over the mean share, averaged over
        the layers. 1 is perfect balance; ``num_experts`` all choices on one expert (router collapse),
        ``num_experts / top_k`` every token on the same k experts. Under ``router_aux_sync`` the
        choices of every rank's tokens (the global micro-batch's balance, as one process sees it)."""
        totals = self.routing_totals()
        if totals is None:
            return None
        return totals[3, 0] / totals[3, 1]

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                reduction: str = "mean", documents: Documents | None = None, teacher=None,
                ends: torch.Tensor | None = None, label_smoothing: float = 0.0, z_loss: float = 0.0,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, T, vocab]``; with ``targets`` the next-token cross entropy instead (fp32;
        ``targets`` already shifted, -100 ignored; ``reduction`` "mean" over counted targets, "sum",
        "sequence": the sum of each row, ``[B]``, the negated log-likelihood of each row's targets; with
        ``documents``, of each document, ``[N]``; or "none": each position's, ``[B, T]``, 0 where
        ignored: negated per-token log-likelihoods, for objectives weighting tokens after the forward).

        ``documents`` (``model/documents.py``): document masking. Each token attends only within its
        document and RoPE positions restart at each document, so every document's logits are those
        of the document alone.

        ``teacher`` (``model/distillation.py``'s ``Teacher``; "mean" or "sum"): knowledge distillation,
        ``[loss, ce, kl]`` with ``loss = (1 - kd_ratio) ce + kd_ratio T^2 KL(teacher || student)``.

        ``label_smoothing`` (as ``F.cross_entropy``'s) and ``z_loss`` (``z_loss * logsumexp(logits)^2``
        per counted position, PaLM's auxiliary loss) change the loss itself (not with a teacher).

        The loss is computed inside ``forward`` so that DDP/FSDP hooks see the output projection. The
        fast path fuses the projection with the loss (``apr_kernels.linear_cross_entropy``: the
        ``[B, T, vocab]`` logits are never held at once); the eager path is Hugging Face's expression.

        A sequence classifier (``config.num_labels``) takes no targets: it returns the ``score`` head
        of the hidden states, fp32 ``[B, T, num_labels]``, or with ``ends`` (indices into the
        ``B * T`` flattened tokens, each sequence's last; ``sequence_ends``) ``[N, num_labels]``, the
        pooled scores of Hugging Face's ``*ForSequenceClassification``.

        A mixture-of-experts model in training mode with ``router_aux_loss_coef`` > 0 adds that
        multiple of the load-balancing loss (``router_aux_loss``), and ``router_z_loss_coef`` times the
        router z-loss (``router_z_loss``), to a "mean" loss, and to a "sum" loss once per counted target
        (so the sum divided by the count is the mean's objective); the
        loss itself is kept, detached, as ``last_aux_loss`` (also with the coefficient 0), with
        ``last_expert_load`` (``expert_load``) and ``last_router_z_loss`` for the logs. The weighted
        terms together are ``last_balance_loss``, with their gradient: in a "mean" or "sum" loss; a
        "sequence" or "none" loss (per row, per token) leaves them out, and an objective built on it
        adds them itself (as TRL's preference and GRPO trainers add the model's ``aux_loss``; these
        two measured only when gradients are on).

        ``lengths`` (``[B]``): right-padded rows, each row's tokens from ``lengths[i]`` on being
        padding, which the routing statistics leave out (as Hugging Face's attention mask does), so
        that padded rows give the balance terms of the same sequences packed without padding."""
        out = self._forward(input_ids, targets, reduction, documents, teacher, ends, label_smoothing, z_loss, lengths)
        return self._with_balance(out, targets, reduction, teacher)

    def _with_balance(self, out: torch.Tensor, targets, reduction: str, teacher) -> torch.Tensor:
        """``forward``'s loss ``out`` with a mixture of experts' balance terms (see ``forward``)."""
        self.last_balance_loss = None
        summed = reduction in ("mean", "sum")
        if targets is None or not self.training or not (summed or torch.is_grad_enabled()):
            return out
        aux = self.router_aux_loss()
        if aux is None:
            return out
        self.last_aux_loss = aux.detach()
        self.last_expert_load = self.expert_load()
        z_router = self.router_z_loss()
        self.last_router_z_loss = z_router.detach()
        coef, z_coef = self.router_aux_loss_coef, self.router_z_loss_coef
        if not coef and not z_coef:
            return out
        per = self.last_balance_loss = coef * aux + z_coef * z_router
        if not summed:
            return out
        # a "sum" counts the term once per target: this call's targets, or under a trainer's parallel
        # run (aux_targets) the global micro-batch's over the equal shares of its token rows, since
        # the ranks' balance terms are each a share of the global one (router_aux_sync) whatever
        # their targets
        count = (targets != -100).sum() if self.aux_targets is None else self.aux_targets
        term = per * (1 if reduction == "mean" else count)
        if teacher is not None:  # [loss, ce, kl]: the objective only
            return torch.cat([out[:1] + term, out[1:]])
        return out + term

    def _forward(self, input_ids, targets, reduction, documents, teacher, ends, label_smoothing, z_loss, lengths):
        if self.sequence_length(input_ids) > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {self.sequence_length(input_ids)} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        if self.config.num_labels:
            if targets is not None or teacher is not None:
                raise ValueError(f"a sequence classifier (num_labels={self.config.num_labels}) scores sequences: "
                                 f"expected forward(input_ids, ends=...) without targets or a teacher")
            h = self.hidden_states(input_ids, documents)
            if ends is not None:  # only the scored tokens go through the head
                h = h.flatten(0, 1)[ends]
            return self.score(h).float()
        if ends is not None:
            raise ValueError("ends: only a sequence classifier (config.num_labels) pools its scores")
        if targets is not None and reduction not in ("mean", "sum", "sequence", "none"):
            raise ValueError(f"reduction {reduction!r}; expected 'mean', 'sum', 'sequence' or 'none'")
        if (self.context_parallel is not None or self.sequence_parallel is not None) \
                and reduction in ("mean", "sequence") and targets is not None:
            raise ValueError(f"reduction {reduction!r} under context or sequence parallelism: this rank holds a "
                             f"share of each row's positions; use 'sum' (or 'none') and combine over the group")
        return self.output(self.hidden_states(input_ids, documents, lengths), input_ids, targets, reduction,
                           documents, teacher, label_smoothing, z_loss)

    def output(self, h: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
               reduction: str = "mean", documents: Documents | None = None, teacher=None,
               label_smoothing: float = 0.0, z_loss: float = 0.0) -> torch.Tensor:
        """``forward``'s result from the final normed hidden states ``h`` of the rows ``input_ids``: the
        logits, or with ``targets`` the loss (the output projection fused with it on the fast path)."""
        vp = self.vocab_parallel
        if vp is not None:
            from apr_kernels.train.vocab_parallel import vocab_parallel_logits, vocab_parallel_losses
        if targets is None:
            return F.linear(h, self.output_weight) if vp is None else vocab_parallel_logits(h, self.output_weight, vp)
        if teacher is not None:
            if label_smoothing or z_loss:
                raise ValueError("label_smoothing and z_loss apply to the cross entropy alone; not with a teacher")
            return self._distillation_loss(h, targets, reduction, teacher)
        if vp is not None:  # (the head split by vocabulary range: per token, reduced as below)
            per = vocab_parallel_losses(h, self.output_weight, targets, vp, label_smoothing, z_loss)
            keep = targets.flatten() != -100
            losses = {"mean": per.sum() / keep.sum(), "sum": per.sum()}.get(reduction, per)
            return self._reduced(losses, targets, reduction, documents)
        if self.use_fast(input_ids):
            ce = functools.partial(_ops().linear_cross_entropy, label_smoothing=label_smoothing, z_loss=z_loss)
            if reduction == "sequence":  # one fused call per sequence: its logits are the most held at once
                if documents is None:
                    spans = [(h[i], targets[i]) for i in range(h.shape[0])]
                else:  # (the bounds are read on the host: one small sync)
                    bounds = documents.cu_seqlens.tolist()
                    hf, tf = h.flatten(0, 1), targets.flatten()
                    spans = [(hf[a:b], tf[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
                return torch.stack([ce(hs, self.output_weight, ts, reduction="sum") for hs, ts in spans])
            return ce(h, self.output_weight, targets, reduction=reduction)
        logits = F.linear(h, self.output_weight)
        if label_smoothing or z_loss:  # per position, then reduced as below
            flat = logits.float().flatten(0, 1)
            keep = targets.flatten() != -100
            per = F.cross_entropy(flat, targets.flatten(), reduction="none", ignore_index=-100,
                                  label_smoothing=label_smoothing) + z_loss * torch.logsumexp(flat, -1) ** 2 * keep
            losses = {"mean": per.sum() / keep.sum(), "sum": per.sum()}.get(reduction, per)
        else:
            losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                     reduction="none" if reduction == "sequence" else reduction, ignore_index=-100)
        return self._reduced(losses, targets, reduction, documents)

    @staticmethod
    def _reduced(losses: torch.Tensor, targets: torch.Tensor, reduction: str, documents) -> torch.Tensor:
        """``losses`` (per token, or already reduced to 'mean'/'sum') as ``reduction`` asks."""
        if reduction == "none":
            return losses.view(targets.shape)
        if reduction != "sequence":
            return losses
        if documents is None:
            return losses.view(targets.shape).sum(1)
        doc, _ = documents.token_index(losses.numel())
        return losses.new_zeros(documents.cu_seqlens.numel() - 1).index_add(0, doc, losses)

    def _distillation_loss(self, h: torch.Tensor, targets: torch.Tensor, reduction: str, teacher) -> torch.Tensor:
        from .distillation import eager_loss

        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction {reduction!r} with a teacher; expected 'mean' or 'sum'")
        settings = {"kd_ratio": teacher.kd_ratio, "temperature": teacher.temperature, "beta": teacher.beta,
                    "reduction": reduction}
        vp = self.vocab_parallel
        if vp is not None:  # (the head split by vocabulary range: no whole logits of either model)
            from apr_kernels.train.vocab_parallel import vocab_parallel_distillation

            per = vocab_parallel_distillation(h, self.output_weight, teacher.hidden, teacher.weight, targets, vp,
                                              kd_ratio=teacher.kd_ratio, temperature=teacher.temperature,
                                              beta=teacher.beta)
            scale = (targets != -100).sum() if reduction == "mean" else 1
            parts = [x.sum() / scale for x in per]
        elif self.use_fast(h):
            parts = _ops().linear_distillation(h, self.output_weight, teacher.hidden, teacher.weight, targets,
                                               **settings)
        else:
            parts = eager_loss(F.linear(h, self.output_weight), F.linear(teacher.hidden, teacher.weight), targets,
                               **settings)
        return torch.stack(parts)

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
             documents: Documents | None = None, teacher=None, label_smoothing: float = 0.0,
             z_loss: float = 0.0, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token cross entropy in fp32 (``targets`` already shifted; -100 is ignored); with
        ``teacher``, ``[loss, ce, kl]`` of knowledge distillation (``forward``)."""
        return self(input_ids, targets, reduction, documents, teacher, label_smoothing=label_smoothing, z_loss=z_loss,
                    lengths=lengths)


def sequence_ends(lengths, width: int | None = None) -> torch.Tensor:
    """Flat indices of each sequence's last token for ``forward(..., ends=)``: of right-padded rows of
    ``width`` tokens (row i holds ``lengths[i]``), or with ``width`` None of sequences back to back in
    one packed row (``Documents``' spans)."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    if width is None:
        return lengths.cumsum(0) - 1
    return torch.arange(len(lengths)) * width + lengths - 1
