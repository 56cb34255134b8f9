"""GGUF (llama.cpp) source: the Llama, Mistral (as llama.cpp writes it: ``llama``), Qwen2 and Qwen3
families and their mixture-of-experts kinds: ``qwen2moe``, ``qwen3moe`` and Mixtral (``llama`` with
``llama.expert_count``).

* Experts: llama.cpp stacks each layer's experts in one tensor per projection (``ffn_gate_exps``,
  ``ffn_up_exps``, ``ffn_down_exps``: ``[experts, out, in]``); each expert's slice (contiguous bytes,
  whole rows of blocks, so Q4_K/Q6_K slices stay raw and exact) becomes its own Hugging Face tensor
  (``model.layers.N.mlp.experts.E.gate_proj.weight``; Mixtral's ``block_sparse_moe.experts.E.w1``),
  the router ``ffn_gate_inp`` the ``gate``, Qwen2-MoE's ``*_shexp`` tensors the shared expert and its
  gate. Older Mixtral files with one tensor per expert (``ffn_gate.E``) are read too. The routing
  settings: ``expert_count``, ``expert_used_count``, ``expert_feed_forward_length`` (Mixtral:
  ``feed_forward_length``), ``expert_shared_feed_forward_length``; ``norm_topk_prob`` from
  ``expert_weights_norm`` when present, else as llama.cpp runs each family (Qwen3-MoE and Mixtral
  renormalise, Qwen2-MoE does not); layers without a router are the dense ``mlp_only_layers``.

* Names: ``blk.N.*`` -> Hugging Face names (``names.gguf_to_hf``); shapes reversed (GGUF ``ne`` lists
  the contiguous dimension first), bytes never transposed (spec 10.1).
* Dtypes: F32/F16/BF16/Q4_K/Q6_K pass through raw (I8/I32/I64/F64 too); every other GGML type is
  dequantised to F32 with the ``gguf`` package's reference (``gguf.quants.dequantize``).
* RoPE: for Llama-family files the q/k rows carry llama.cpp's permutation; it is undone here (whole
  rows move, so raw quantised blocks stay bit-exact) and ``rope_type`` 2 is recorded, so every APR
  file this converter writes uses Hugging Face row order. Qwen2 GGUFs are not permuted (NEOX RoPE).
* RoPE scaling -> the custom key ``rope_scaling`` in Hugging Face's form: ``rope.scaling.type`` linear /
  yarn with its factor and original context; Llama 3.1+ files carry no type but a ``rope_freqs``
  tensor of per-pair frequency divisors, from which the ``llama3`` parameters are recovered (and
  checked to reproduce every divisor); the tensor itself is not copied.
* Tokenizer: ``tokenizer.ggml.*`` -> ``tokenizer.*`` (spec 5.5).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from apr_kernels._format import LazyTensor, QuantizedTensor, nbytes_for
from apr_kernels.model.config import HF_ARCHITECTURES, MOE_FAMILIES

from .core import Source, warn
from .names import PERMUTED_ARCHS, gguf_to_hf, rope_permuted_heads, unpermute_rows

_PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "I8": torch.int8, "I32": torch.int32, "I64": torch.int64}
_RAW_QUANT = ("Q4_K", "Q6_K")
# the dense families a GGUF file may hold (its general.architecture spelling is ours)
DENSE_ARCHS = tuple(a for a in HF_ARCHITECTURES if a not in MOE_FAMILIES)
# llama.cpp's names of the mixture-of-experts kinds of our families (Mixtral: "llama" with experts)
_MOE_ARCHS = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
_STACKED = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight$")
_PER_EXPERT = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")  # older Mixtral files
_SHARED = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_shexp\.weight$")
_ROUTER = re.compile(r"^blk\.(\d+)\.ffn_gate_inp(_shexp)?\.weight$")
_GGUF_PRE_TYPES = {"qwen2": "qwen2", "llama-bpe": "llama-bpe", "gpt-2": "gpt2", "gpt2": "gpt2", "default": "gpt2"}


def _open_reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path), "r")
    except Exception as exc:  # the gguf reader raises ValueError/IndexError/KeyError/... on bad bytes
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, IndexError):  # a read past the end of the mapping
            msg = f"the header ends early or declares more entries/bytes than the file holds ({msg})"
        elif "cannot reshape" in msg:
            msg = f"tensor data is truncated ({msg})"
        raise ValueError(f"{path}: not a valid GGUF file: {msg}") from None


def _fields(reader, path: Path) -> dict:
    out = {}
    for key, f in reader.fields.items():
        try:
            out[key] = f.contents()
        except Exception as exc:
            raise ValueError(f"{path}: GGUF metadata key {key!r} cannot be decoded ({exc})") from None
    return out


def _config(kv: dict, arch: str, family: str, path: Path, vocab_rows: int | None) -> dict:
    """The model config of a GGUF file: ``arch`` prefixes its keys, ``family`` is ours (``_family``)."""
    moe = family in MOE_FAMILIES

    def get(key, kind, default=None, required=False):
        value = kv.get(f"{arch}.{key}", default)
        if value is None:
            if required:
                raise ValueError(f"{path}: GGUF key {arch}.{key} is missing (expected {kind.__name__})")
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"{path}: GGUF key {arch}.{key} is {value!r}; expected a number")
        return kind(value)

    hidden, heads = get("embedding_length", int, required=True), get("attention.head_count", int, required=True)
    if heads <= 0:
        raise ValueError(f"{path}: GGUF key {arch}.attention.head_count is {heads}; expected > 0")
    tokens = kv.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size", int) or vocab_rows or (len(tokens) if isinstance(tokens, list) else None)
    return {
        "architecture": family,
        "hf_architecture": HF_ARCHITECTURES[family],
        "hf_model_type": family,
        "model_type": family,
        "hidden_size": hidden,
        "num_layers": get("block_count", int, required=True),
        "num_heads": heads,
        "num_kv_heads": get("attention.head_count_kv", int) or heads,
        "vocab_size": vocab,
        "intermediate_size": get("feed_forward_length", int, required=not moe),  # (MoE: its dense layers')
        "max_position_embeddings": get("context_length", int),
        "rope_theta": get("rope.freq_base", float, 10000.0),
        "rope_type": 2,  # q/k rows are in Hugging Face order after the import (see module docstring)
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", float, 1e-6),
        "head_dim": get("attention.key_length", int) or hidden // heads,
    }


def _moe_config(kv: dict, arch: str, family: str, path: Path, routed_layers: set[int], layers: int) -> dict:
    """The mixture-of-experts keys of a ``family`` file (module docstring)."""
    def get(key, required=True):
        value = kv.get(f"{arch}.{key}")
        if value is None and not required:
            return None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{path}: GGUF key {arch}.{key} is {value!r}; expected a positive number")
        return int(value)

    experts = get("expert_count")
    ff_key = "feed_forward_length" if family == "mixtral" else "expert_feed_forward_length"
    out = {"num_experts": experts, "num_experts_per_tok": get("expert_used_count"),
           "moe_intermediate_size": get(ff_key),
           "mlp_only_layers": [i for i in range(layers) if i not in routed_layers], "decoder_sparse_step": 1}
    norm = kv.get(f"{arch}.expert_weights_norm")
    out["norm_topk_prob"] = bool(norm) if isinstance(norm, bool) else family != "qwen2_moe"
    if family == "qwen2_moe":
        out["shared_expert_intermediate_size"] = get("expert_shared_feed_forward_length")
    if out["num_experts_per_tok"] > experts:
        raise ValueError(f"{path}: GGUF key {arch}.expert_used_count is {out['num_experts_per_tok']}; expected at "
                         f"most {arch}.expert_count ({experts})")
    return out


def _rope_scaling(kv: dict, arch: str, path: Path, cfg: dict, rope_freqs: torch.Tensor | None) -> dict | None:
    """Hugging Face's ``rope_scaling`` for the file's RoPE keys and ``rope_freqs`` tensor (None: none)."""
    head_dim = cfg["head_dim"]
    dims = kv.get(f"{arch}.rope.dimension_count")
    if dims is not None and dims != head_dim:
        raise ValueError(f"{path}: GGUF key {arch}.rope.dimension_count is {dims}; expected the head size "
                         f"{head_dim} (partial rotary embeddings are not supported)")
    kind = str(kv.get(f"{arch}.rope.scaling.type", "none"))
    factor = kv.get(f"{arch}.rope.scaling.factor")
    if kind == "none" and kv.get(f"{arch}.rope.scale_linear", 1.0) != 1.0:  # the key of older files
        kind, factor = "linear", kv[f"{arch}.rope.scale_linear"]
    if rope_freqs is not None:
        if kind != "none":
            raise ValueError(f"{path}: both {arch}.rope.scaling.type {kind!r} and a rope_freqs tensor; expected one")
        return _llama3_from_divisors(rope_freqs.double(), head_dim, cfg["rope_theta"], path)
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        out = {"rope_type": "yarn", "factor": factor,
               "original_max_position_embeddings": kv.get(f"{arch}.rope.scaling.original_context_length")}
        for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if kv.get(f"{arch}.rope.scaling.{key}") is not None:
                out[name] = kv[f"{arch}.rope.scaling.{key}"]
        # llama.cpp's own attention-scale knobs have no Hugging Face equivalent: refuse rather than guess
        for key, neutral in (("attn_factor", 1.0), ("yarn_attn_factor", 1.0), ("yarn_log_multiplier", 0.0)):
            value = kv.get(f"{arch}.rope.scaling.{key}")
            if value is not None and value != neutral:
                raise ValueError(f"{path}: GGUF key {arch}.rope.scaling.{key} is {value}; only {neutral} (yarn's "
                                 f"own attention factor) is supported")
        return out
    warn(f"{path}: RoPE scaling {kind!r} is carried as the custom key 'rope_scaling', but the trainer will "
         f"refuse it")
    return {"rope_type": kind, "factor": factor}


def _llama3_from_divisors(divisors: torch.Tensor, head_dim: int, theta: float, path: Path) -> dict | None:
    """The llama3 ``rope_scaling`` whose per-pair divisors (llama.cpp's ``rope_freqs``) are ``divisors``.

    llama3 keeps pairs of wavelength below orig/high (divisor 1), slows those above orig/low by
    ``factor`` and in between uses 1/d = (1 - s)/factor + s with s = orig/wavelength/(high-low) -
    low/(high-low): linear in 1/wavelength, so two in-between pairs fix orig/(high-low) and
    low/(high-low). Only those ratios matter, so low = 1 is chosen; the result is checked against
    every divisor."""
    from apr_kernels.model.rope import inv_frequencies

    if divisors.shape != (head_dim // 2,) or not torch.isfinite(divisors).all() or not (divisors >= 1 - 1e-6).all():
        raise ValueError(f"{path}: tensor 'rope_freqs.weight' has shape {list(divisors.shape)} and values "
                         f"{divisors.tolist()[:4]}...; expected {head_dim // 2} finite divisors >= 1")
    factor = float(divisors.max())
    if factor <= 1 + 1e-6:
        return None
    wavelen = 2 * math.pi / inv_frequencies(head_dim, theta).double()
    middle = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    s = (1 / divisors[middle] - 1 / factor) / (1 - 1 / factor)
    candidates = [(8192.0, 1.0, 4.0)]  # every Llama 3.1-3.3 release
    if len(s) == 1:  # one equation: keep Llama's low/high = 1/4 and solve for orig
        candidates.insert(0, (round(float((s[0] * 3 + 1) * wavelen[middle][0])), 1.0, 4.0))
    elif len(s) >= 2:
        x = 1 / wavelen[middle]
        a, b = torch.linalg.lstsq(torch.stack([x, -torch.ones_like(x)], 1), s[:, None]).solution.flatten().tolist()
        if a > 0 and b > 0:  # round the fit to the decimals configs are written with, else keep it whole
            candidates[:0] = [(round(a / b), 1.0, round(1.0 + 1.0 / b, 4)), (round(a / b), 1.0, 1.0 + 1.0 / b)]
    for orig, low, high in candidates:
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                   "original_max_position_embeddings": int(orig)}
        got = inv_frequencies(head_dim, theta).double() / inv_frequencies(head_dim, theta, scaling).double()
        if torch.allclose(got, divisors, rtol=1e-4, atol=0):
            return scaling
    raise ValueError(f"{path}: tensor 'rope_freqs.weight' ({[round(v, 4) for v in divisors.tolist()]}) matches no "
                     f"llama3 RoPE scaling; expected the divisors llama.cpp writes for Llama 3.1+")


def _tokenizer(kv: dict, path: Path) -> dict | None:
    tokens = kv.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        return None
    model = kv.get("tokenizer.ggml.model", "gpt2")
    meta: dict = {"tokenizer.model_type": "bpe" if model == "gpt2" else str(model),
                  "tokenizer.vocab_size": len(tokens), "tokenizer.vocabulary": [str(t) for t in tokens]}
    for src, dst in (("tokenizer.ggml.merges", "tokenizer.merges"), ("tokenizer.ggml.scores", "tokenizer.scores"),
                     ("tokenizer.ggml.token_type", "tokenizer.token_type"),
                     ("tokenizer.ggml.bos_token_id", "tokenizer.bos_token_id"),
                     ("tokenizer.ggml.eos_token_id", "tokenizer.eos_token_id"),
                     ("tokenizer.ggml.padding_token_id", "tokenizer.padding_token_id"),
                     ("tokenizer.ggml.add_bos_token", "tokenizer.add_bos_token"),
                     ("tokenizer.ggml.add_space_prefix", "tokenizer.add_space_prefix"),
                     ("tokenizer.chat_template", "tokenizer.chat_template")):
        if src in kv:
            value = kv[src]
            meta[dst] = [v.item() if hasattr(v, "item") else v for v in value] if isinstance(value, list) else value
    pre = kv.get("tokenizer.ggml.pre")
    if model == "gpt2":
        meta.setdefault("tokenizer.merges", [])  # a byte-level vocabulary may have none
        meta["tokenizer.pre_type"] = _GGUF_PRE_TYPES.get(str(pre), str(pre)) if pre else "gpt2"
    elif pre:
        meta["tokenizer.pre_type"] = str(pre)
    if model in ("gpt2", "llama"):  # byte-level BPE; SentencePiece BPE (Llama 1/2, Mistral)
        from apr_kernels.tokenizer import Tokenizer

        try:
            Tokenizer.from_metadata(meta, path=path)
        except ValueError as exc:
            warn(f"embedded the GGUF tokenizer as is, but apr_kernels cannot run it: {exc}")
    else:
        warn(f"{path}: GGUF tokenizer model {model!r} embedded as is; apr_kernels runs 'gpt2' (byte-level "
             "BPE) and 'llama' (SentencePiece BPE) tokenizers only")
    return meta


def _tensor(reader_tensor, file_data, path: Path, arch: str, cfg: dict) -> tuple[str, LazyTensor]:
    t = reader_tensor
    name = gguf_to_hf(t.name)
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ne0 (contiguous) last: [out, in]
    start, size = _extent(t, file_data, path)
    heads = rope_permuted_heads(name, cfg["num_heads"], cfg["num_kv_heads"]) if arch in PERMUTED_ARCHS else None
    return name, _lazy(t, file_data, path, shape, start, size, heads)


def _extent(t, file_data, path: Path) -> tuple[int, int]:
    start, size = int(t.data_offset), int(t.n_bytes)
    if start + size > len(file_data):
        raise ValueError(f"{path}: tensor {t.name!r} data [{start}, {start + size}) lies beyond the end of the "
                         f"file ({len(file_data)} bytes)")
    return start, size


def _lazy(t, file_data, path: Path, shape: tuple, start: int, size: int, heads: int | None) -> LazyTensor:
    """The bytes ``[start, start + size)`` of GGUF tensor ``t`` (all of it, or one expert's slice) as a
    LazyTensor of ``shape``; ``heads``: undo llama.cpp's q/k row permutation."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType(t.tensor_type)
    if heads is not None and (heads <= 0 or not shape or shape[0] % (2 * heads)):  # (here the file can be named)
        raise ValueError(f"{path}: tensor {t.name!r} has shape {list(shape)}; expected heads x head_dim rows "
                         f"({heads} heads from the metadata, an even head_dim) to undo llama.cpp's q/k row order")

    def raw() -> torch.Tensor:  # the bytes, copied out of the read-only mapping
        return torch.from_numpy(np.array(file_data[start : start + size], dtype=np.uint8, copy=True))

    def rows(x: torch.Tensor) -> torch.Tensor:
        return unpermute_rows(x, heads) if heads else x

    kind = qtype.name
    if kind in _PLAIN or kind == "I16":
        tdtype = _PLAIN.get(kind, torch.int16)
        want = math.prod(shape) * tdtype.itemsize
        if size != want:
            raise ValueError(f"{path}: tensor {t.name!r} is {kind} of shape {list(shape)} with {size} bytes; "
                             f"expected {want}")

        def plain() -> torch.Tensor:
            x = raw().view(tdtype).reshape(shape) if size else torch.empty(shape, dtype=tdtype)
            return rows(x.to(torch.int32) if kind == "I16" else x)

        return LazyTensor("I32" if kind == "I16" else kind, shape, plain)
    if kind in _RAW_QUANT:
        if nbytes_for(kind, shape) != size:
            raise ValueError(f"{path}: tensor {t.name!r} is {kind} of shape {list(shape)} with {size} bytes; "
                             f"expected {nbytes_for(kind, shape)} (rows of whole 256-element blocks)")
        nrows = math.prod(shape[:-1]) if len(shape) > 1 else 1

        def quantised():
            data = raw()
            if heads:  # rows are whole blocks: permute them as bytes, exactly
                data = unpermute_rows(data.view(nrows, -1), heads).reshape(-1)
            return QuantizedTensor(kind, shape, data)

        return LazyTensor(kind, shape, quantised)
    if qtype not in GGML_QUANT_SIZES:
        raise ValueError(f"{path}: tensor {t.name!r} has GGML type {kind}, which has no known block size")
    block, type_size = GGML_QUANT_SIZES[qtype]
    if shape and shape[-1] % block:
        raise ValueError(f"{path}: tensor {t.name!r} ({kind}) has a last dimension of {shape[-1]}; expected a "
                         f"multiple of the {block}-element block")

    def dequantised():
        if not math.prod(shape):  # (the gguf package cannot dequantise 0 blocks)
            return torch.empty(shape, dtype=torch.float32)
        data = np.array(file_data[start : start + size], dtype=np.uint8, copy=True)
        data = data.reshape(*shape[:-1], shape[-1] // block * type_size) if shape else data
        try:
            values = dequantize(data, qtype)
        except NotImplementedError:
            raise ValueError(f"{path}: tensor {t.name!r}: the gguf package cannot dequantise {kind}") from None
        return rows(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape))

    return LazyTensor("F32", shape, dequantised)


# llama.cpp projection -> (Hugging Face expert name, Mixtral's); the shared expert's
_EXPERT_NAMES = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}


def _moe_tensors(t, file_data, path: Path, family: str, cfg: dict) -> dict[str, LazyTensor] | None:
    """The Hugging Face tensors of an expert, router or shared-expert GGUF tensor ``t`` (None: not one).
    Stacked experts are cut into one tensor per expert."""
    ffn = "block_sparse_moe" if family == "mixtral" else "mlp"
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    m = _ROUTER.match(t.name)
    if m:
        start, size = _extent(t, file_data, path)
        if m.group(2):  # Qwen2-MoE's shared-expert gate: ne [hidden] -> nn.Linear [1, hidden]
            return {f"model.layers.{m.group(1)}.{ffn}.shared_expert_gate.weight":
                    _lazy(t, file_data, path, (1, shape[-1]), start, size, None)}
        return {f"model.layers.{m.group(1)}.{ffn}.gate.weight": _lazy(t, file_data, path, shape, start, size, None)}
    m = _SHARED.match(t.name)
    if m:
        start, size = _extent(t, file_data, path)
        name = f"model.layers.{m.group(1)}.{ffn}.shared_expert.{m.group(2)}_proj.weight"
        return {name: _lazy(t, file_data, path, shape, start, size, None)}
    proj = _EXPERT_NAMES
    m = _PER_EXPERT.match(t.name) if family == "mixtral" else None
    if m:
        start, size = _extent(t, file_data, path)
        name = f"model.layers.{m.group(1)}.{ffn}.experts.{m.group(3)}.{proj[m.group(2)][1]}.weight"
        return {name: _lazy(t, file_data, path, shape, start, size, None)}
    m = _STACKED.match(t.name)
    if not m:
        return None
    experts = cfg["num_experts"]
    start, size = _extent(t, file_data, path)
    # (an expert of no bytes would let a hostile count of experts become that many tensors for free)
    if len(shape) != 3 or shape[0] != experts or size % experts or not size:
        raise ValueError(f"{path}: tensor {t.name!r} has shape {list(shape)} ({size} bytes); expected "
                         f"[{experts} experts, out, in] stacked experts of whole rows")
    each = size // experts
    leaf = proj[m.group(2)][1 if family == "mixtral" else 0]
    return {f"model.layers.{m.group(1)}.{ffn}.experts.{e}.{leaf}.weight":
            _lazy(t, file_data, path, shape[1:], start + e * each, each, None) for e in range(experts)}


def _family(kv: dict, arch, reader, path: Path) -> str:
    """Our family of a GGUF file: its architecture, or the mixture-of-experts kind it holds."""
    if arch in _MOE_ARCHS:
        return _MOE_ARCHS[arch]
    count = kv.get(f"{arch}.expert_count")
    experts = isinstance(count, (int, float)) and not isinstance(count, bool) and count > 0
    stacked = next((t.name for t in reader.tensors if "_exps." in t.name or ".ffn_gate_inp." in t.name), None)
    if arch == "llama" and experts:
        return "mixtral"
    if experts or stacked:
        why = f"{arch}.expert_count is {count}" if experts else f"tensor {stacked!r} is an expert router or stacked experts"
        raise ValueError(f"{path}: {why}, but general.architecture {arch!r} has no mixture-of-experts kind here; "
                         f"expected llama (Mixtral), qwen2moe or qwen3moe for an MoE model")
    if arch not in DENSE_ARCHS:
        raise ValueError(f"{path}: general.architecture is {arch!r}; expected one of "
                         f"{', '.join(DENSE_ARCHS + tuple(_MOE_ARCHS))}")
    return arch


def read_gguf(path: Path) -> Source:
    reader = _open_reader(path)
    kv = _fields(reader, path)
    arch = kv.get("general.architecture")
    family = _family(kv, arch, reader, path)
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab_rows = int(embd.shape[1]) if embd is not None and len(embd.shape) == 2 else None
    cfg = _config(kv, arch, family, path, vocab_rows)
    if family in MOE_FAMILIES:
        routed = {int(m.group(1)) for t in reader.tensors if (m := _ROUTER.match(t.name)) and not m.group(2)}
        cfg.update(_moe_config(kv, arch, family, path, routed, cfg["num_layers"]))
        if cfg["intermediate_size"] is None:
            cfg["intermediate_size"] = cfg["moe_intermediate_size"]
    tensors: dict[str, LazyTensor] = {}
    for t in reader.tensors:
        found = _moe_tensors(t, reader.data, path, family, cfg) if family in MOE_FAMILIES else None
        if found is None:
            name, lt = _tensor(t, reader.data, path, arch, cfg)
            found = {name: lt}
        for name, lt in found.items():
            if name in tensors:
                raise ValueError(f"{path}: tensors map to the same name {name!r}")
            tensors[name] = lt
    rope_freqs = tensors.pop("rope_freqs.weight", None)
    if rope_freqs is not None:
        if rope_freqs.dtype not in ("F32", "F16", "BF16"):
            raise ValueError(f"{path}: tensor 'rope_freqs.weight' is {rope_freqs.dtype}; expected F32")
        rope_freqs = rope_freqs.materialize().float()
    scaling = _rope_scaling(kv, arch, path, cfg, rope_freqs)
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    meta = {"original_format": "gguf", "source": str(path.resolve()),
            "name": str(kv.get("general.name") or path.stem), **cfg}
    tok = _tokenizer(kv, path)
    if tok is None:
        warn(f"{path}: no tokenizer.ggml.tokens; the APR file will have no tokenizer")
    else:
        meta.update(tok)
    return Source(str(path), tensors, meta, tied="lm_head.weight" not in tensors)
