"""``from_apr``: build a Transformer from an APR v2 file, after checks that fail before any training.

Preflight (aprender's ``build_shared_trainer_with_init`` steps), each a ``PreflightError`` (a
ValueError) naming the file and the mismatch:

1. architecture family: decoder-only ``llama``/``mistral``/``qwen2``/``qwen3`` and the mixture-of-experts
   ``qwen2_moe``/``qwen3_moe``/``mixtral`` accepted; encoders (BERT, RoBERTa, ...) and other families
   refused; the metadata family must agree with the tensors (a q/k/v bias is Qwen2(-MoE) evidence,
   ``q_norm`` is Qwen3(-MoE)'s, ``experts`` a mixture of experts');
2. shapes: every model parameter present with its exact shape (extra tensors such as a tied
   ``lm_head`` copy or ``__training__.*`` state are ignored); all missing or misshapen ones listed;
3. tokenizer vs model vocabulary: an embedded tokenizer's vocabulary must fit (<=) the model's;
4. values: every weight finite, and no tensor's mean beyond +-100 (aprender's loader refuses those
   too: ``validate_tensor_values``, spec 14). The embedding's statistics outside aprender's sanity
   bounds (|mean| < 0.05, std in [0.005, 0.5]: its H4 falsifier, which caught BF16 bytes tagged as
   F16) are a warning, not an error: a real model may lie outside them. Under FSDP or tensor
   parallelism each rank checks the part it reads. Quantised weights (Q4_K, Q6_K, APR_Q4, APR_Q8)
   are dequantised straight to the training dtype.

Tensors may be stored under Hugging Face or GGUF names (spec 10.3). RoPE: the file's ``rope_type``,
else 2 (split halves, Hugging Face row order), but 0 (adjacent pairs) for a Llama-family file from
GGUF (``gguf_row_order``). Tying: ``tied_embeddings`` in the
metadata decides; without it the model is tied when ``lm_head.weight`` is absent or a 0-byte
placeholder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from apr_kernels._format import FLAG_SHARDED, QuantizedTensor

from .config import ModelConfig, family_of
from .hf_names import TRAINING_PREFIX, expected_count, expected_shapes, hf_name
from .lora import META_KEY as LORA_META
from .transformer import Transformer

_SHOW = 8  # names listed per problem kind in an error message


class PreflightError(ValueError):
    """An init file that cannot initialise the model (message names the file and the mismatch)."""


MAX_ABS_MEAN = 100.0  # aprender's validate_tensor_values: a weight's |mean| above this is refused
EMBED_BOUNDS = (0.05, 0.005, 0.5)  # aprender's H4 falsifier: embedding |mean| <, std in [lo, hi]
EMBEDDING = "model.embed_tokens.weight"


def check_values(t: torch.Tensor, path, stored: str, name: str) -> None:
    """PreflightError for non-finite values or a mean beyond +-``MAX_ABS_MEAN`` in weight ``stored``
    (parameter ``name``) of file ``path``; a warning for an embedding outside ``EMBED_BOUNDS``."""
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise PreflightError(f"{path}: tensor {stored!r} has {bad} non-finite value(s); expected finite weights")
    if not t.numel() or not t.is_floating_point():
        return
    mean = float(t.mean(dtype=torch.float32))
    if abs(mean) > MAX_ABS_MEAN:
        raise PreflightError(f"{path}: tensor {stored!r} has mean {mean:.6g}; expected |mean| <= {MAX_ABS_MEAN:g} "
                             f"(aprender refuses it too: weights stored in another dtype than their tag read so)")
    if name == EMBEDDING:
        std = _std(t, mean)
        most, lo, hi = EMBED_BOUNDS
        if abs(mean) >= most or not lo <= std <= hi:
            import warnings

            warnings.warn(f"{path}: tensor {stored!r} has mean {mean:.4g} and std {std:.4g}, outside aprender's "
                          f"sanity bounds for an embedding (|mean| < {most}, std in [{lo}, {hi}]); a file whose "
                          f"bytes are in another dtype than its tag (BF16 written as F16) loads like this",
                          stacklevel=2)


def _std(t: torch.Tensor, mean: float, chunk_values: int = 1 << 20) -> float:
    """The sample standard deviation of ``t`` in float32, whole rows of about ``chunk_values`` values
    at a time, in one float32 buffer (4 MiB), not a float32 copy of the tensor: a 7B model's bf16
    embedding is 2 GiB, and the memory a load peaks at is what a rank must have free."""
    flat = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)
    rows = max(1, chunk_values // max(1, flat.shape[1]))
    acc = sum(float(chunk.to(torch.float32, copy=True).sub_(mean).square_().sum()) for chunk in flat.split(rows))
    return (acc / max(1, t.numel() - 1)) ** 0.5


@dataclass
class InitPlan:
    """What preflight found: the config, and for each parameter the stored tensor that fills it."""

    path: str
    config: ModelConfig
    sources: dict[str, str]         # parameter name -> tensor name in the file
    metadata: dict
    tokenizer_vocab: int | None     # size of the embedded tokenizer, if any
    new_score: bool = False         # a classifier's score head the file lacks (made from a causal LM)


def tokenizer_vocab_size(meta: dict) -> int | None:
    """Size of the tokenizer embedded in APR metadata (None when there is none)."""
    vocab = meta.get("tokenizer.vocabulary")
    if isinstance(vocab, list) and vocab:
        return len(vocab)
    size = meta.get("tokenizer.vocab_size")
    return int(size) if isinstance(size, int) and size > 0 else None


def check_tokenizer_vocab(tokenizer_vocab: int, model_vocab: int, where: str) -> None:
    """Tokenizer ids must index the embedding: tokenizer vocab <= model vocab (aprender falsifiers
    009/010: 151665 <= 151936 passes, model_vocab + 1 fails; a Qwen tokenizer vs Llama-370M fails)."""
    if tokenizer_vocab > model_vocab:
        raise PreflightError(
            f"{where}: tokenizer vocabulary mismatch: the tokenizer has {tokenizer_vocab} tokens but the "
            f"model vocab_size is {model_vocab}; expected tokenizer vocab <= model vocab")


def _refuse_a_shard(path: str, meta: dict, flagged: int) -> None:
    """PreflightError for one file of a model split over several (spec 12: flag 0x0010 and metadata
    ``sharding`` = {shard_count, shard_index, ...}), whose other tensors are in the other files."""
    sharding = meta.get("sharding")
    count = sharding.get("shard_count") if isinstance(sharding, dict) else None
    if not flagged and not (isinstance(count, int) and count > 1):
        return
    index = sharding.get("shard_index") if isinstance(sharding, dict) else None
    which = f"shard {index} of {count}" if isinstance(index, int) and isinstance(count, int) else "one shard"
    raise PreflightError(f"{path}: {which} of a model split over several APR files (flag SHARDED, metadata "
                         f"'sharding'); expected a whole model in one file (sharded files are not read)")


# the families whose q/k rows llama.cpp's converter permutes for its adjacent-pair RoPE (spec 10.5)
GGUF_PERMUTED = frozenset({"llama", "mistral", "mixtral"})


def gguf_row_order(family: str, meta: dict, names) -> bool:
    """Whether a file without ``rope_type`` holds q/k rows in llama.cpp's permuted order: a Llama-family
    model imported from GGUF (``original_format`` "gguf", or tensors still under GGUF names), which
    aprender's import keeps as it is (spec 10.5). Adjacent-pair RoPE (``rope_type`` 0) on those rows
    computes what split-half RoPE computes on Hugging Face's."""
    return family in GGUF_PERMUTED and (str(meta.get("original_format", "")).lower() == "gguf"
                                        or any(n.startswith("blk.") for n in names))


def plan(path: str | os.PathLike, num_labels: int | None = None) -> InitPlan:
    """Run the metadata and shape checks of an init file without reading any weight.

    ``num_labels``: the model is to be a sequence classifier with that many labels (``from_apr``):
    the file's ``score`` head when it is one, else (a causal LM) a new head, its output head ignored."""
    import apr_kernels

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: init file does not exist")
    with apr_kernels.open(path) as f:
        meta = dict(f.metadata)
        sharded = f.header["flags"] & FLAG_SHARDED
        _refuse_a_shard(path, meta, sharded)
        apr_cfg = f.config
        infos = {name: f.info(name) for name in f.keys()}

    try:
        family = family_of(apr_cfg, path)
        cfg = ModelConfig.from_apr_config(apr_cfg, path)
    except PreflightError:
        raise
    except ValueError as exc:
        raise PreflightError(str(exc)) from None
    if apr_cfg.rope_type is None and gguf_row_order(family, meta, infos):
        cfg = cfg.replace(rope_type=0)
    stored_labels = cfg.num_labels
    if num_labels is not None:
        if stored_labels not in (None, num_labels):
            raise PreflightError(f"{path}: a sequence classifier with num_labels={stored_labels}; expected "
                                 f"{num_labels} labels")
        cfg = cfg.replace(num_labels=num_labels)

    # stored name -> HF name (GGUF names mapped); training state never counts as weights
    by_hf: dict[str, str] = {}
    for name in infos:
        if not name.startswith(TRAINING_PREFIX):
            by_hf.setdefault(hf_name(name), name)

    # family vs tensor evidence (aprender section 86)
    base = cfg.base_family  # a mixture-of-experts family's attention is its dense family's
    q_norm = next((n for n in by_hf if n.endswith("self_attn.q_norm.weight")), None)
    if q_norm and base != "qwen3":
        raise PreflightError(f"{path}: architecture family mismatch: metadata says {family!r} but the file has "
                             f"per-head q/k norms ({q_norm}, ...), which only qwen3 and qwen3_moe models have")
    bias = sorted(n for n in by_hf if n.endswith(("self_attn.q_proj.bias", "self_attn.k_proj.bias")))
    if family == "qwen2_moe" and not bias:  # Qwen2-MoE's config has a switch for them (qkv_bias)
        cfg = cfg.replace(attention_bias=False, head_dim=cfg.head_dim)
    if base != "qwen2" and bias:
        raise PreflightError(f"{path}: architecture family mismatch: metadata says {family!r} but the "
                             f"file has q/k/v biases ({bias[0]}, ...), which only qwen2 and qwen2_moe models have")
    stacked = next((n for n in by_hf if n.endswith(("_exps.weight", "_exps.bias"))), None)
    if stacked:
        raise PreflightError(f"{path}: tensor {stacked!r} holds every expert of a layer stacked (GGUF's layout); "
                             f"expected one tensor per expert under Hugging Face names (model.layers.N.mlp."
                             f"experts.E.gate_proj.weight, ...), as `apr-kernels convert` of a Hugging Face folder writes")
    experts = next((n for n in by_hf if ".experts." in n), None)
    if experts and not cfg.is_moe:
        raise PreflightError(f"{path}: architecture family mismatch: metadata says {family!r} (dense) but the file "
                             f"has mixture-of-experts tensors ({experts}, ...); expected architecture "
                             f"qwen2_moe, qwen3_moe or mixtral with num_experts")

    # tying: metadata first, then whether a real lm_head is stored
    head = by_hf.get("lm_head.weight")
    head_real = head is not None and not getattr(infos[head], "placeholder", False) and infos[head].nbytes > 0
    if apr_cfg.tied_embeddings is None:
        cfg = cfg.replace(tie_word_embeddings=not head_real, head_dim=cfg.head_dim)

    new_score = bool(cfg.num_labels) and stored_labels is None and "score.weight" not in by_hf
    # counted before they are listed: hostile metadata may claim billions of layers or experts (a few
    # missing tensors are listed by name below)
    if expected_count(cfg) > 2 * len(by_hf) + 1000:
        raise PreflightError(
            f"{path}: the metadata describes a {family} model of {expected_count(cfg)} parameter tensors "
            f"(num_layers={cfg.num_layers}" + (f", num_experts={cfg.num_experts}" if cfg.is_moe else "")
            + f") but the file holds {len(by_hf)} weight tensors; expected metadata that fits the file")
    missing, misshapen = [], []
    for name, shape in expected_shapes(cfg).items():
        stored = by_hf.get(name)
        if stored is None and not (name == "score.weight" and new_score):
            missing.append(name)
        elif stored is None:
            continue
        elif tuple(infos[stored].shape) != tuple(shape):
            misshapen.append(f"{name}: file has {list(infos[stored].shape)}, expected {list(shape)}")
    if missing or misshapen:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: " + ", ".join(missing[:_SHOW])
                         + (f" (+{len(missing) - _SHOW} more)" if len(missing) > _SHOW else ""))
        if misshapen:
            parts.append(f"{len(misshapen)} misshapen: " + "; ".join(misshapen[:_SHOW])
                         + (f" (+{len(misshapen) - _SHOW} more)" if len(misshapen) > _SHOW else ""))
        raise PreflightError(
            f"{path}: tensors do not fit the {family} config read from its metadata (hidden_size="
            f"{cfg.hidden_size}, num_layers={cfg.num_layers}, num_heads={cfg.num_heads}, num_kv_heads="
            f"{cfg.num_kv_heads}, head_dim={cfg.head_dim}, vocab_size={cfg.vocab_size}"
            + (f", num_experts={cfg.num_experts}, moe_intermediate_size={cfg.moe_intermediate_size}" if cfg.is_moe else "")
            + "): " + "; ".join(parts))

    tok_vocab = tokenizer_vocab_size(meta)
    if tok_vocab is not None:
        check_tokenizer_vocab(tok_vocab, cfg.vocab_size, f"{path}: embedded tokenizer")
    sources = {name: by_hf[name] for name in expected_shapes(cfg) if name in by_hf}
    return InitPlan(path, cfg, sources, meta, tok_vocab, new_score)


def from_apr(path: str | os.PathLike, *, device="cpu", dtype: torch.dtype | None = None,
             fast: bool | None = None, shard=None, lora: str = "merge", lora_base_dtype=None,
             lora_init: dict | None = None, keep_quantized: bool = False, num_labels: int | None = None,
             score_seed: int = 0) -> Transformer:
    """A ``Transformer`` initialised from an APR file (every parameter trainable).

    ``num_labels``: a sequence classifier (a reward model: 1; ``Transformer``'s ``config.num_labels``):
    the file's when it is one, or a causal LM's body with a new ``score`` head drawn as Hugging Face
    draws it (normal, std 0.02) from a generator seeded with ``score_seed``, as TRL's reward
    training starts. None: the file must be a causal LM (a classifier is refused by name).

    A file with LoRA adapters (metadata ``lora``, ``model/lora.py``): ``lora="merge"`` folds them into
    the weights (a plain model), ``"keep"`` restores the adapters on a frozen base (resuming a LoRA
    run; ``lora_base_dtype`` as in ``add_lora``). ``lora_init``: ``add_lora`` keyword arguments
    (rank, alpha, targets, seed) for new adapters on a file without them; added before ``shard``,
    so FSDP shards the adapters with the rest. ``keep_quantized``: adapted projections the file
    stores quantised keep their raw blocks as a frozen base (``lora.QuantizedLoRALinear``; copied
    out, so the file's mapping, with every other weight's pages, is released), dequantised per GEMM;
    with ``shard`` each rank keeps only its whole blocks of each base (``ShardedBlocks``, gathered per
    GEMM as FSDP gathers the parameters it shards).

    ``dtype``: the parameter dtype (default float32, the training dtype; quantised weights are
    dequantised straight to it). ``fast``: see ``Transformer``. The returned module carries
    ``apr_path`` and ``apr_metadata`` (the file's metadata, tokenizer keys included).

    ``shard``: called with the model while it is still on the meta device (FSDP's ``fully_shard``,
    see ``apr_kernels.train.distributed``); parameters it turned into DTensors get storage for their
    local shard only, filled from a slice of the file's zero-copy view. Experts it spread over an
    expert-parallel group (``Transformer.set_expert_parallel``) are read only by the ranks that hold them.
    """
    import apr_kernels
    from apr_kernels.train.tensor_parallel import split_dims

    from .lora import add_lora, init_adapters, merge_into_weights

    p = plan(path, num_labels)
    if num_labels is None and p.config.num_labels:
        raise PreflightError(f"{path}: a sequence classifier (hf_architecture {p.config.hf_architecture}, "
                             f"num_labels={p.config.num_labels}: a reward model's score head, no output head); "
                             f"expected a causal LM (from_apr(..., num_labels={p.config.num_labels}) loads it as "
                             f"the classifier)")
    dtype = dtype or torch.float32
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(p.config, fast=fast).to(dtype)  # nothing allocated yet
    settings = p.metadata.get(LORA_META)
    if settings and lora_init:
        raise PreflightError(f"{path}: the file already has LoRA adapters (metadata 'lora'); expected "
                             f"a plain model for new ones")
    # adapters that must exist before sharding: new ones, or the file's kept for resuming
    kept = bool(settings) and lora == "keep"
    if lora_init:
        add_lora(model, base_dtype=lora_base_dtype, **{k: v for k, v in lora_init.items() if k != "seed"})
    elif kept:
        _add_stored_lora(model, path, settings, lora_base_dtype)
    quantized = _quantize_bases(model, p) if keep_quantized and (lora_init or kept) else {}
    if shard is not None:
        shard(model)  # on meta: shards are created in their final dtypes
        # (tensor parallelism replaced the split projections: their bases go to the new modules;
        # expert parallelism dropped other ranks' experts, left out below)
        modules = dict(model.named_modules())
        quantized = {name: modules.get(name.removesuffix(".weight"), m) for name, m in quantized.items()}
    # experts other ranks hold (expert parallelism: dropped by ``shard``) and the parts of other
    # pipeline stages (pipeline parallelism: likewise): not read here
    remote = model.remote_expert_prefixes() + getattr(model, "pipeline_absent", ())
    quantized = {name: m for name, m in quantized.items() if not (remote and name.startswith(remote))}
    model = model.to_empty(device=device)
    params = dict(model.named_parameters())
    sharded = any(hasattr(t, "device_mesh") for t in params.values())  # (FSDP: DTensor parameters)
    with apr_kernels.open(p.path) as f, torch.no_grad():
        for name, m in quantized.items():
            stored = p.sources[name]
            info = f.info(stored)
            shape, raw = info.shape, f.get_raw(stored)
            if m.tensor_parallel is not None:  # this rank's part of the blocks, where it is whole blocks
                from apr_kernels.quant import split_blocks

                tp = m.tensor_parallel
                part = split_blocks(info.dtype, info.shape, raw, m.split_dim, tp.rank, tp.size)
                if part is not None:
                    (shape, raw), m.base_split = part, True
            if sharded:  # FSDP: this rank's blocks only, checked where they are
                from apr_kernels.quant import blocks_finite
                from apr_kernels.train.distributed import ShardedBlocks

                from apr_kernels.train.distributed import shard_axis

                # the ranks that shard the module's parameters (HSDP: this node's; an expert's: its
                # replicas, expert parallelism) share the blocks too
                group = next((a[2] for a in map(shard_axis, [*m.parameters(), *params.values()]) if a is not None),
                             None)
                m.base = ShardedBlocks(info.dtype, shape, raw, device, group)
                finite = blocks_finite(info.dtype, m.base.local, raw[:4])
            else:
                m.base = QuantizedTensor(info.dtype, shape, raw.to(device, copy=True))
                finite = bool(torch.isfinite(m.base_weight(torch.float32)).all())
            if not finite:
                raise PreflightError(f"{p.path}: tensor {stored!r} ({info.dtype}) dequantises to non-finite "
                                     f"values; expected finite weights")
        tp, split = model.tensor_parallel, split_dims(model)
        for name, stored in p.sources.items():
            if name in quantized or (remote and name.startswith(remote)):
                continue
            view = None  # tensor parallelism: this rank's rows or columns of the zero-copy view
            if name in split:
                view = tp.local(f.get_tensor(stored), split[name], f"{p.path}: tensor {stored!r}")
            if shard is not None and hasattr(params[name], "device_mesh"):  # a DTensor shard
                from apr_kernels.train.distributed import local_shard

                # the zero-copy view, sliced: only this rank's rows are read (and converted)
                t = local_shard(f.get_tensor(stored) if view is None else view, params[name],
                                f"{p.path}: tensor {stored!r}")
                check_values(t, p.path, stored, name)
                params[name].to_local().copy_(t)
                continue
            # CUDA: staged through pinned buffers
            t = f.get_tensor(stored, device=device, dtype=dtype) if view is None else view.to(device, dtype)
            check_values(t, p.path, stored, name)
            params[name].copy_(t.reshape(params[name].shape))
    if p.new_score:
        from apr_kernels.train.distributed import copy_into

        g = torch.Generator().manual_seed(score_seed)
        with torch.no_grad():  # drawn whole, so every rank and sharding holds the same head
            copy_into(model.score.weight, torch.empty(tuple(model.score.weight.shape)).normal_(0.0, 0.02, generator=g),
                      f"{path}: new score head")
    if lora_init:
        with apr_kernels.open(p.path) as f:  # (DoRA under tensor parallelism: some rows' norms from the file)
            init_adapters(model, lora_init.get("seed", 0), lambda name: f.get_tensor(p.sources[f"{name}.weight"]))
    elif kept:
        _copy_stored_lora(model, p.path)
    elif settings:
        if lora != "merge":
            raise ValueError(f"from_apr: lora={lora!r}; expected 'merge' or 'keep'")
        if shard is not None:  # each rank folds the adapters into its own rows
            _merge_stored_lora_rows(model, p, settings)
        else:
            _add_stored_lora(model, path, settings, None)
            _copy_stored_lora(model, p.path)
            merge_into_weights(model)
    model.apr_path = p.path
    model.apr_metadata = p.metadata
    return model


def _quantize_bases(model, p: InitPlan) -> dict:
    """HF weight name -> adapted projection turned into a QuantizedLoRALinear, for each one whose
    weight the file stores in a block format."""
    import apr_kernels
    from apr_kernels._format import QUANTIZED

    from .lora import lora_modules, quantize_base

    with apr_kernels.open(p.path) as f:
        found = {f"{name}.weight": m for name, m in lora_modules(model).items()
                 if f.info(p.sources[f"{name}.weight"]).dtype in QUANTIZED}
    return {name: quantize_base(m) for name, m in found.items()}


def _merge_stored_lora_rows(model, p: InitPlan, settings) -> None:
    """A LoRA checkpoint's adapters folded into a sharded model's weights: a rank holds whole rows of
    each weight, so its rows of ``W + scale B A`` (DoRA: rescaled to their magnitudes) need only A
    whole and its rows of B and of the magnitude. Under tensor parallelism the rows are merged whole
    from the file's weight (a DoRA row's norm spans every column) and a row-parallel projection keeps
    its columns of them."""
    import apr_kernels
    from apr_kernels.train.distributed import shard_rows
    from apr_kernels.train.tensor_parallel import split_dims

    from .lora import check_settings, lora_scale, merged

    path = p.path
    rank, alpha, _ = check_settings(settings["rank"], settings["alpha"], settings["targets"])
    scale = lora_scale(rank, alpha, bool(settings.get("rslora", False)))
    params = dict(model.named_parameters())
    tp, split = model.tensor_parallel, split_dims(model)
    remote = model.remote_expert_prefixes()  # (expert parallelism: another rank's to fold)
    with apr_kernels.open(path) as f, torch.no_grad():
        for key in [k for k in f.keys() if k.endswith(".lora_A") and not k.startswith(TRAINING_PREFIX)]:
            name = key.removesuffix(".lora_A")
            if remote and f"{name}.".startswith(remote):
                continue
            w = params.get(f"{name}.weight")
            if w is None:
                raise PreflightError(f"{path}: tensor {key!r} adapts {name!r}, which the model does not have")
            first, n = shard_rows(w) or (0, w.shape[0])
            dim = split.get(f"{name}.weight")
            out, inp = tp.whole_shape(w.shape, dim) if dim is not None else tuple(w.shape)
            if dim == 0:  # (this rank's heads or MLP rows of the whole weight)
                first += tp.rank * w.shape[0]
            parts = {part: f.get_tensor(f"{name}.{part}") for part in ("lora_A", "lora_B", "lora_magnitude")
                     if f"{name}.{part}" in f}
            if "lora_B" not in parts:
                raise PreflightError(f"{path}: tensor {name}.lora_B is missing; expected one beside {key!r}")
            a, b = parts["lora_A"], parts["lora_B"]
            if tuple(a.shape) != (rank, inp) or tuple(b.shape) != (out, rank):
                raise PreflightError(f"{path}: adapters of {name!r} are {list(a.shape)} and {list(b.shape)}; "
                                     f"expected [{rank}, {inp}] and [{out}, {rank}]")
            mag = parts.get("lora_magnitude")
            local = w.to_local() if hasattr(w, "to_local") else w
            # the weight's rows: as loaded, or whole from the file when the ranks split its columns
            base = local if dim is None else f.get_tensor(p.sources[f"{name}.weight"])[first:first + n]
            rows = merged(base.to(local.device), a.to(local.device), b[first:first + n].to(local.device), scale,
                          local.dtype, mag[first:first + n].to(local.device) if mag is not None else None)
            local.copy_(rows if dim != 1 else tp.local(rows, 1, f"{path}: tensor {name}.weight"))


def _add_stored_lora(model, path, settings, base_dtype) -> None:
    """Adapters shaped as the file's metadata ``lora`` says (values come from ``_copy_stored_lora``)."""
    from .lora import add_lora, check_settings

    try:
        rank, alpha, targets = check_settings(settings["rank"], settings["alpha"], settings["targets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PreflightError(f"{path}: metadata 'lora' = {settings!r:.200} is not valid LoRA settings ({exc})") from None
    add_lora(model, rank, alpha, targets, base_dtype=base_dtype, rslora=bool(settings.get("rslora", False)),
             dora=bool(settings.get("dora", False)))


def _copy_stored_lora(model, path) -> None:
    """The file's ``<module>.lora_A`` / ``.lora_B`` into the model's adapters (a sharded one takes
    its rows of each)."""
    import apr_kernels
    from apr_kernels.train.distributed import copy_into

    from .lora import lora_modules

    with apr_kernels.open(path) as f, torch.no_grad():
        for name, m in lora_modules(model).items():
            for part in ("lora_A", "lora_B") + (("lora_magnitude",) if hasattr(m, "lora_magnitude") else ()):
                tname = f"{name}.{part}"
                param = getattr(m, part)
                if tname not in f:
                    raise PreflightError(f"{path}: LoRA tensor {tname!r} is missing (metadata 'lora' names "
                                         f"targets {model.lora['targets']})")
                shape, want = f.info(tname).shape, m.whole_adapter_shape(part)
                if tuple(shape) != want:
                    raise PreflightError(f"{path}: LoRA tensor {tname!r} has shape {list(shape)}; expected "
                                         f"{list(want)} (rank {model.lora['rank']})")
                # (tensor parallelism: this rank's part; an FSDP shard: its rows of that)
                copy_into(param, m.local_adapter(part, f.get_tensor(tname)), f"{path}: tensor {tname!r}")


def preflight(path: str | os.PathLike) -> ModelConfig:
    """The config an init file describes, after every check that needs no weight data."""
    return plan(path).config


def classifier_labels(path: str | os.PathLike) -> int:
    """The ``num_labels`` of a sequence classifier file (a reward model); a causal LM is refused by
    name."""
    labels = plan(path).config.num_labels
    if not labels:
        raise PreflightError(f"{path}: a causal LM (no score head, no num_labels in its metadata); expected a "
                             f"sequence classifier such as a reward model written by `apr-kernels reward`")
    return labels


def load_classifier(path: str | os.PathLike, **kwargs) -> Transformer:
    """``from_apr`` of a sequence classifier file (a reward model) with its own ``num_labels``
    (``classifier_labels``)."""
    return from_apr(path, num_labels=classifier_labels(path), **kwargs)
