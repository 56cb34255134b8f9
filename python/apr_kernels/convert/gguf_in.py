"""GGUF (llama.cpp) source: the dense Llama, Mistral (as llama.cpp writes it: ``llama``), Qwen2 and Qwen3
families; mixture-of-experts files (``expert_count`` > 0, ``qwen2moe``/``qwen3moe``) are refused.

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
# llama.cpp's (and Hugging Face's) names of the mixture-of-experts kinds of our families
_MOE_ARCHS = ("qwen2moe", "qwen3moe", *MOE_FAMILIES)
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


def _config(kv: dict, arch: str, path: Path, vocab_rows: int | None) -> dict:
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
        "architecture": arch,
        "hf_architecture": HF_ARCHITECTURES[arch],
        "hf_model_type": arch,
        "model_type": arch,
        "hidden_size": hidden,
        "num_layers": get("block_count", int, required=True),
        "num_heads": heads,
        "num_kv_heads": get("attention.head_count_kv", int) or heads,
        "vocab_size": vocab,
        "intermediate_size": get("feed_forward_length", int, required=True),
        "max_position_embeddings": get("context_length", int),
        "rope_theta": get("rope.freq_base", float, 10000.0),
        "rope_type": 2,  # q/k rows are in Hugging Face order after the import (see module docstring)
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", float, 1e-6),
        "head_dim": get("attention.key_length", int) or hidden // heads,
    }


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
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    t = reader_tensor
    qtype = GGMLQuantizationType(t.tensor_type)
    name = gguf_to_hf(t.name)
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ne0 (contiguous) last: [out, in]
    start, size = int(t.data_offset), int(t.n_bytes)
    if start + size > len(file_data):
        raise ValueError(f"{path}: tensor {t.name!r} data [{start}, {start + size}) lies beyond the end of the "
                         f"file ({len(file_data)} bytes)")
    heads = None
    if arch in PERMUTED_ARCHS:
        heads = rope_permuted_heads(name, cfg["num_heads"], cfg["num_kv_heads"])

    def raw() -> torch.Tensor:  # one tensor's bytes, copied out of the read-only mapping
        return torch.from_numpy(np.array(file_data[start : start + size], dtype=np.uint8, copy=True))

    def rows(x: torch.Tensor) -> torch.Tensor:
        return unpermute_rows(x, heads) if heads else x

    kind = qtype.name
    if kind in _PLAIN:
        tdtype = _PLAIN[kind]
        return name, LazyTensor(kind, shape, lambda: rows(raw().view(tdtype).reshape(shape)))
    if kind == "I16":
        return name, LazyTensor("I32", shape, lambda: rows(raw().view(torch.int16).reshape(shape).to(torch.int32)))
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

        return name, LazyTensor(kind, shape, quantised)
    if qtype not in GGML_QUANT_SIZES:
        raise ValueError(f"{path}: tensor {t.name!r} has GGML type {kind}, which has no known block size")
    block, type_size = GGML_QUANT_SIZES[qtype]
    if shape and shape[-1] % block:
        raise ValueError(f"{path}: tensor {t.name!r} ({kind}) has a last dimension of {shape[-1]}; expected a "
                         f"multiple of the {block}-element block")

    def dequantised():
        data = np.array(file_data[start : start + size], dtype=np.uint8, copy=True)
        data = data.reshape(*shape[:-1], shape[-1] // block * type_size) if shape else data
        try:
            values = dequantize(data, qtype)
        except NotImplementedError:
            raise ValueError(f"{path}: tensor {t.name!r}: the gguf package cannot dequantise {kind}") from None
        return rows(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape))

    return name, LazyTensor("F32", shape, dequantised)


def _refuse_experts(kv: dict, arch, reader, path: Path) -> None:
    """A mixture-of-experts GGUF (llama.cpp writes Mixtral as ``llama`` with ``llama.expert_count``, and
    Qwen2/3-MoE as ``qwen2moe``/``qwen3moe``; each layer's experts stacked in ``ffn_*_exps`` tensors)."""
    count = kv.get(f"{arch}.expert_count")
    stacked = next((t.name for t in reader.tensors if "_exps." in t.name or ".ffn_gate_inp." in t.name), None)
    why = (f"general.architecture is {arch!r}" if arch in _MOE_ARCHS else
           f"{arch}.expert_count is {count}" if isinstance(count, (int, float)) and count > 0 else
           f"tensor {stacked!r} is an expert router or stacked experts" if stacked else None)
    if why:
        raise ValueError(f"{path}: {why}: a mixture-of-experts model; MoE GGUF import is not supported (GGUF "
                         f"stacks each layer's experts): convert the model's Hugging Face folder instead")


def read_gguf(path: Path) -> Source:
    reader = _open_reader(path)
    kv = _fields(reader, path)
    arch = kv.get("general.architecture")
    _refuse_experts(kv, arch, reader, path)
    if arch not in DENSE_ARCHS:
        raise ValueError(f"{path}: general.architecture is {arch!r}; expected one of {', '.join(DENSE_ARCHS)}")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    vocab_rows = int(embd.shape[1]) if embd is not None and len(embd.shape) == 2 else None
    cfg = _config(kv, arch, path, vocab_rows)
    tensors: dict[str, LazyTensor] = {}
    for t in reader.tensors:
        name, lt = _tensor(t, reader.data, path, arch, cfg)
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
