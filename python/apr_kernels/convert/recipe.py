"""Which APR block format each tensor gets under ``--quantize KIND``: one rule shared by
``convert --quantize``, ``eval``/``generate``/``chat --quantize`` and ``train --qat``, so all of them
mean the same file.

* ``q4k``, ``q6k``, ``q8``, ``q4``: one format for every quantisable tensor (2-D floating point, at
  least ``MIN_QUANT_ELEMENTS`` values: projections, experts, routers, embedding and head), as
  aprender's ``apr convert --quantize`` writes them (spec 14).
* ``q4km``: llama.cpp's Q4_K_M mixture (``llama_tensor_get_type`` in ``src/llama-quant.cpp``, the
  recipe of most published GGUF files): Q4_K, with Q6_K for the output head (and for the embedding
  when it is tied to the head, as llama.cpp quantises a tied ``token_embd`` like ``output``), and for
  ``attn_v`` and ``ffn_down`` (dense, expert and shared-expert) in the layers ``use_more_bits``
  picks: the first and last eighth and every third layer between. Routers (``ffn_gate_inp``) stay in
  floating point, as llama.cpp leaves them. Where llama.cpp picks a format APR cannot store, the
  next more precise APR format stands in, never a less precise one: Q6_K for llama.cpp's Q8_0 (the
  ``attn_v``/``attn_k`` of 8-expert models, and a head whose width is not whole 256-value blocks) and
  Q5_K (``attn_output`` of 8-expert models, the other ``attn_v`` of 80-layer GQA models: its 70B rule).
  llama.cpp also falls back from Q4_K to Q5_0 for rows that are not whole 256-value blocks; APR's
  Q4_K pads each row instead (GH-370), and ``export`` to GGUF turns such rows into Q8_0.
  ``ggml_type`` gives llama.cpp's own type, fallbacks included, for Q4_K_M and its other mixtures
  (``GGUF_KINDS``: Q4_K_S, Q5_K_M, Q5_K_S, Q6_K, Q8_0): ``export --quantize`` writes those (GGUF has
  them all).

The layer and expert counts come from the model's config (``Layout.of_config``) or, for a file being
converted, from its tensor names (``Layout.of_tensors``); both give the same plan (tested).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

QUANT_CHOICES = {"q4k": "Q4_K", "q6k": "Q6_K", "q8": "APR_Q8", "q4": "APR_Q4", "q4km": "Q4_K"}  # kind -> base format
QUANT_META = {"q4k": (4, 256, False), "q6k": (6, 256, True), "q8": (8, None, True), "q4": (4, 32, True),
              "q4km": (4, 256, False)}  # (bits, block_size, symmetric) of the file's ``quantization`` entry
MIXTURES = frozenset({"q4km"})
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
MIN_QUANT_ELEMENTS = 1024  # norms, biases and small tensors stay unquantised (spec 14)
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_V_PROJ = re.compile(r"^model\.layers\.\d+\.self_attn\.v_proj\.weight$")
_K_PROJ = re.compile(r"^model\.layers\.\d+\.self_attn\.k_proj\.weight$")
_O_PROJ = re.compile(r"^model\.layers\.\d+\.self_attn\.o_proj\.weight$")
# ffn_down of llama.cpp: a dense layer's, each expert's (Mixtral's w2) and the shared expert's
_DOWN = re.compile(r"^model\.layers\.\d+\.(mlp|block_sparse_moe)\.(.*\.)?(down_proj|w2)\.weight$")
_ROUTER = re.compile(r"^model\.layers\.\d+\.(mlp|block_sparse_moe)\.gate\.weight$")
_SHARED_GATE = re.compile(r"^model\.layers\.\d+\.mlp\.shared_expert_gate\.weight$")  # (ffn_gate_inp_shexp)
_EXPERT = re.compile(r"^model\.layers\.\d+\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.")


def check_kind(kind: str, flag: str = "--quantize", *, gguf: bool = False) -> None:
    """``kind`` is an APR kind of ``QUANT_CHOICES`` (or, where ``gguf`` allows, of ``RUN_CHOICES``)."""
    choices = RUN_CHOICES if gguf else QUANT_CHOICES
    if kind not in choices:
        raise ValueError(f"{flag} {kind!r}: expected one of {', '.join(choices)}")


def quantisable(shape, dtype: str = "F32") -> bool:
    """Whether a tensor is one that ``--quantize`` stores in blocks (aprender's rule)."""
    return dtype in FLOAT_DTYPES and len(shape) == 2 and math.prod(shape) >= MIN_QUANT_ELEMENTS


@dataclass(frozen=True)
class Layout:
    """What llama.cpp's recipe reads of a model besides a tensor's name."""
    n_layer: int
    n_expert: int = 0
    gqa: bool = True  # fewer K/V heads than query heads (llama.cpp's 70B rule needs it)
    tied: bool = False  # the output head is the embedding

    @classmethod
    def of_config(cls, cfg) -> "Layout":
        return cls(cfg.num_layers, cfg.num_experts or 0, cfg.num_kv_heads != cfg.num_heads, bool(cfg.tie_word_embeddings))

    @classmethod
    def of_tensors(cls, shapes: dict, *, tied: bool) -> "Layout":
        layers = [int(m.group(1)) for m in map(_LAYER.match, shapes) if m]
        experts = [int(m.group(1)) for m in map(_EXPERT.match, shapes) if m]
        q, k = shapes.get("model.layers.0.self_attn.q_proj.weight"), shapes.get("model.layers.0.self_attn.k_proj.weight")
        return cls(max(layers, default=-1) + 1, max(experts, default=-1) + 1,
                   q is None or k is None or tuple(q) != tuple(k), tied)


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers that get more bits: first and last eighth, every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def apr_format(kind: str, name: str, shape, layout: Layout | None = None, dtype: str = "F32") -> str | None:
    """The APR block format ``--quantize kind`` stores tensor ``name`` (Hugging Face name) of ``shape``
    in, or None where it stays as it is (``layout``: needed by the mixtures only)."""
    if not quantisable(shape, dtype):
        return None
    if kind not in MIXTURES:
        return QUANT_CHOICES[kind]
    target = _llama_target(kind, name, layout)
    return None if target is None else _APR_STAND_IN[target]


# llama.cpp's type -> the APR format that stands for it: itself, or the next more precise one
_APR_STAND_IN = {"Q4_K": "Q4_K", "Q6_K": "Q6_K", "Q5_K": "Q6_K", "Q8_0": "Q6_K"}
# llama.cpp's fallback for rows that are not whole 256-value blocks (llama-quant.cpp's
# tensor_type_fallback); F16 where the rows are not whole 32-value blocks either
_GGML_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# export --quantize KIND: llama-quantize's mixture -> (its base type, LLAMA_FTYPE_MOSTLY_*)
GGUF_KINDS = {"q4km": ("Q4_K", 15), "q4ks": ("Q4_K", 14), "q5km": ("Q5_K", 17), "q5ks": ("Q5_K", 16),
              "q6k": ("Q6_K", 18), "q8_0": ("Q8_0", 7)}


def _llama_target(kind: str, name: str, layout: Layout) -> str | None:
    """llama.cpp's choice for tensor ``name`` under its mixture ``kind`` (``GGUF_KINDS``), before its
    fallback for short rows (``llama_tensor_get_type_impl``); None for a router (kept float)."""
    if _ROUTER.match(name):
        return None
    base = GGUF_KINDS[kind][0]
    if name == LM_HEAD or (layout.tied and name == EMBED):
        return "Q8_0" if base == "Q8_0" else "Q6_K"  # (Q8_0 after the fallback where a row is not whole blocks)
    m = _LAYER.match(name)
    layer = int(m.group(1)) if m else -1
    eight_experts = layout.n_expert == 8
    more_bits = kind in ("q4km", "q5km") and _use_more_bits(layer, layout.n_layer)
    if _V_PROJ.match(name):  # (llama.cpp counts attn_v tensors, one a layer: its index is the layer's)
        t = "Q6_K" if more_bits else "Q5_K" if kind == "q4ks" and layer < 4 else base
        if t == "Q4_K" and layout.n_layer == 80 and layout.gqa:  # (its LLM_TYPE_70B rule)
            t = "Q5_K"
        return "Q8_0" if eight_experts else t
    if eight_experts and _K_PROJ.match(name):
        return "Q8_0"
    if eight_experts and _O_PROJ.match(name) and kind in ("q4km", "q4ks"):
        return "Q5_K"
    if _DOWN.match(name):
        return "Q6_K" if more_bits else "Q5_K" if kind == "q4ks" and layer < layout.n_layer // 8 else base
    return base


def ggml_type(kind: str, name: str, shape, layout: Layout) -> str | None:
    """The GGML type ``llama-quantize`` writes tensor ``name`` (a 2-D matrix of ``shape``, Hugging Face
    name; an expert's, for its layer's stacked tensor) in for its mixture ``kind`` (``GGUF_KINDS``:
    ``q4km`` its Q4_K_M, ...), its fallback for rows that are not whole blocks included (Q5_0, Q5_1,
    Q8_0, F16); None for a tensor it keeps in float32 (routers, Qwen2-MoE's shared-expert gate).
    ``export --quantize`` writes these."""
    if kind not in GGUF_KINDS:
        raise ValueError(f"GGUF quantisation {kind!r}: expected one of {', '.join(GGUF_KINDS)}")
    target = None if _SHARED_GATE.match(name) else _llama_target(kind, name, layout)  # (every ffn_gate_inp*)
    if target is None or shape[-1] % 256 == 0:
        return target
    return _GGML_FALLBACK.get(target, target) if shape[-1] % 32 == 0 else "F16"


# eval/generate/chat --quantize and train --qat: the APR kinds (the file `convert --quantize KIND`
# writes) and "gguf:KIND" (the GGUF file `export --quantize KIND` writes for llama.cpp)
GGUF_PREFIX = "gguf:"
RUN_CHOICES = (*QUANT_CHOICES, *(GGUF_PREFIX + k for k in GGUF_KINDS))


def run_format(kind: str, name: str, shape, layout: Layout, dtype: str = "F32") -> str | None:
    """The format ``eval --quantize kind`` / ``train --qat kind`` gives tensor ``name``: its APR format
    (``apr_format``), or for ``gguf:KIND`` the GGML type ``export --quantize KIND`` writes (every
    float matrix but the routers and shared-expert gates, whatever its size, as llama.cpp quantises);
    None where the tensor stays as it is."""
    if not kind.startswith(GGUF_PREFIX):
        return apr_format(kind, name, shape, layout, dtype)
    if dtype not in FLOAT_DTYPES or len(shape) != 2:
        return None
    return ggml_type(kind[len(GGUF_PREFIX):], name, shape, layout)


def plan(kind: str | None, tensors: dict, *, tied: bool) -> dict[str, str]:
    """``{name: APR format}`` of the tensors ``--quantize kind`` stores in blocks; ``tensors`` maps
    names to objects with ``.dtype`` (APR dtype name) and ``.shape`` (``LazyTensor``s)."""
    if kind is None:
        return {}
    check_kind(kind)
    layout = Layout.of_tensors({n: t.shape for n, t in tensors.items()}, tied=tied)
    out = {n: apr_format(kind, n, t.shape, layout, t.dtype) for n, t in tensors.items()}
    return {n: f for n, f in out.items() if f is not None}


__all__ = ["QUANT_CHOICES", "MIXTURES", "GGUF_KINDS", "RUN_CHOICES", "Layout", "apr_format", "ggml_type", "run_format",
           "plan", "quantisable", "check_kind"]
