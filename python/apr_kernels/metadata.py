"""Typed model config <-> APR v2 JSON metadata (spec sections 5.2-5.4, 10.4).

``AprModelConfig.from_metadata`` reads the typed keys, accepting the alias spellings that realizar
accepts (spec 5.3) and checking each value's JSON type; ``to_metadata`` writes exactly one
(canonical) spelling of each key, omitting the ones that are None. ``canonical_metadata`` is what
``save`` runs on the metadata it is given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from .errors import AprFormatError

# canonical key -> aliases accepted on read (spec 5.3, realizar's serde aliases)
ALIASES: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_dim", "d_model", "n_embd"),
    "num_layers": ("n_layers", "num_hidden_layers", "n_layer"),
    "num_heads": ("n_heads", "num_attention_heads", "n_head"),
    "num_kv_heads": ("n_kv_heads", "num_key_value_heads"),
    "vocab_size": ("n_vocab",),
    "intermediate_size": ("ffn_dim", "intermediate_dim", "n_inner"),
    "max_position_embeddings": ("max_seq_len", "context_length", "n_ctx"),
    "rms_norm_eps": ("layer_norm_eps", "norm_eps"),
    "num_experts": ("num_local_experts",),  # Mixtral's config.json spelling
}
_ALIAS_TO_CANONICAL = {a: c for c, aliases in ALIASES.items() for a in aliases}

# Typed keys of AprV2Metadata in serialisation order (spec 5.2); custom keys follow them.
TYPED_KEY_ORDER = (
    "model_type", "name", "description", "author", "license", "data_source", "data_license", "version",
    "source", "original_format", "created_at", "total_size", "param_count", "quantization", "sharding",
    "chat_template", "chat_format", "special_tokens", "architecture", "hf_architecture", "hf_model_type",
    "hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size", "intermediate_size",
    "max_position_embeddings", "rope_theta", "rope_type", "rms_norm_eps", "head_dim", "num_experts",
    "num_experts_per_tok", "moe_intermediate_size",
)
# Written even when null (provenance contract FALSIFY-SHIP-022); the other typed keys are omitted.
ALWAYS_WRITTEN = ("license", "data_source", "data_license")

_INT, _FLOAT, _STR, _BOOL, _OBJ, _INTS = "integer", "number", "string", "boolean", "object", "integer array"


@dataclasses.dataclass
class AprModelConfig:
    """The model-shape keys of an APR file. Missing keys are None."""

    architecture: str | None = None
    hf_architecture: str | None = None
    model_type: str | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    vocab_size: int | None = None
    intermediate_size: int | None = None
    max_position_embeddings: int | None = None
    rope_theta: float | None = None
    rope_type: int | None = None
    rms_norm_eps: float | None = None
    head_dim: int | None = None
    num_experts: int | None = None  # mixture of experts (Qwen2-MoE, Qwen3-MoE, Mixtral): experts per layer
    num_experts_per_tok: int | None = None  # experts each token is routed to (top-k)
    moe_intermediate_size: int | None = None  # each expert's SwiGLU width
    tied_embeddings: bool | None = None  # custom key written by apr import (spec 10.4)
    rope_scaling: dict | None = None  # custom key: Hugging Face rope_scaling (e.g. Llama 3's "llama3")
    sliding_window: int | None = None  # custom key: Mistral's attention window (keys per query)
    max_window_layers: int | None = None  # custom key: Qwen2/3's layers before the windowed ones
    num_labels: int | None = None  # custom key: a sequence classifier's (reward model's) score rows
    # custom keys of mixture-of-experts models (Hugging Face's config.json names)
    shared_expert_intermediate_size: int | None = None  # Qwen2-MoE's always-on shared expert
    norm_topk_prob: bool | None = None  # the top-k routing weights renormalised to sum to 1
    decoder_sparse_step: int | None = None  # every n-th layer has experts (Qwen2/3-MoE)
    mlp_only_layers: list | None = None  # layers with a dense MLP instead (Qwen2/3-MoE)
    router_aux_loss_coef: float | None = None  # the load-balancing loss's weight in training

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], path: str | None = None) -> "AprModelConfig":
        """Read the typed keys (aliases accepted; canonical wins over an alias of equal value)."""
        where = f"{path}: metadata" if path else "metadata"
        if not isinstance(meta, Mapping):
            raise AprFormatError(f"{where} is a {type(meta).__name__}, expected a JSON object")
        values = {}
        for f in dataclasses.fields(cls):
            kind = _KINDS[f.name]
            found = [(k, meta[k]) for k in (f.name, *ALIASES.get(f.name, ())) if k in meta and meta[k] is not None]
            if not found:
                continue
            key, value = found[0]
            for other_key, other in found[1:]:
                if other != value:
                    raise AprFormatError(f"{where}: keys {key!r} = {value!r} and its alias {other_key!r} = "
                                         f"{other!r} disagree; expected one spelling (spec 5.3)")
            values[f.name] = _check_type(value, kind, f"{where}: key {key!r}")
        return cls(**values)

    def to_metadata(self) -> dict[str, Any]:
        """Canonical typed keys (None omitted), then the custom keys (``tied_embeddings``,
        ``rope_scaling``, ``sliding_window``, ``max_window_layers``, ``num_labels``, the MoE ones)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return out


_KINDS = {
    "architecture": _STR, "hf_architecture": _STR, "model_type": _STR, "hidden_size": _INT,
    "num_layers": _INT, "num_heads": _INT, "num_kv_heads": _INT, "vocab_size": _INT,
    "intermediate_size": _INT, "max_position_embeddings": _INT, "rope_theta": _FLOAT, "rope_type": _INT,
    "rms_norm_eps": _FLOAT, "head_dim": _INT, "tied_embeddings": _BOOL, "rope_scaling": _OBJ,
    "sliding_window": _INT, "max_window_layers": _INT, "num_labels": _INT, "num_experts": _INT,
    "num_experts_per_tok": _INT, "moe_intermediate_size": _INT, "shared_expert_intermediate_size": _INT,
    "norm_topk_prob": _BOOL, "decoder_sparse_step": _INT, "mlp_only_layers": _INTS, "router_aux_loss_coef": _FLOAT,
}


def _check_type(value, kind: str, where: str):
    ok = {
        _INT: isinstance(value, int) and not isinstance(value, bool) and value >= 0,
        _FLOAT: isinstance(value, (int, float)) and not isinstance(value, bool),
        _STR: isinstance(value, str),
        _BOOL: isinstance(value, bool),
        _OBJ: isinstance(value, dict),
        _INTS: isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                               for v in value),
    }[kind]
    # Integral floats (e.g. 4096.0 from some writers) are accepted for integer keys.
    if not ok and kind == _INT and isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if not ok:
        expected = {_INT: "a non-negative integer", _INTS: "a JSON array of non-negative integers"}.get(
            kind, f"a JSON {kind}")
        raise AprFormatError(f"{where} is {value!r} ({type(value).__name__}), expected {expected}")
    return float(value) if kind == _FLOAT else value


def canonical_metadata(meta: Mapping[str, Any], *, path: str = "", total_size: int = 0,
                       param_count: int = 0) -> dict[str, Any]:
    """The metadata ``save`` writes: aliases folded to canonical names, typed keys in aprender's
    order (null typed keys dropped except the always-written ones), custom keys after them."""
    if isinstance(meta, AprModelConfig):
        meta = meta.to_metadata()
    if not isinstance(meta, Mapping):
        raise TypeError(f"save({path!r}): metadata must be a mapping, got {type(meta).__name__}")
    folded: dict[str, Any] = {}
    for key, value in meta.items():
        if not isinstance(key, str):
            raise TypeError(f"save({path!r}): metadata keys must be strings, got {key!r}")
        canon = _ALIAS_TO_CANONICAL.get(key, key)
        if canon in folded and folded[canon] != value:
            raise ValueError(f"save({path!r}): metadata key {key!r} = {value!r} is an alias of {canon!r} = "
                             f"{folded[canon]!r}; give one spelling (spec 5.3)")
        folded[canon] = value
    folded.setdefault("model_type", "")
    folded.setdefault("total_size", total_size)
    folded.setdefault("param_count", param_count)
    out = {}
    for key in TYPED_KEY_ORDER:
        if key in folded:
            value = folded.pop(key)
            if value is not None or key in ALWAYS_WRITTEN:
                out[key] = value
        elif key in ALWAYS_WRITTEN:
            out[key] = None
    out.update(folded)  # custom keys, in the caller's order
    return out


# What a tokenizer carries through to the files it is saved with. aprender also writes typed
# top-level `chat_template` and `chat_format` keys (spec 5.2): a file with only the typed template
# still renders chats with it, and its named chat format is kept (``train/chat.py`` reads it).
TOKENIZER_CARRIED = ("tokenizer.chat_template", "tokenizer.add_bos_token")


def tokenizer_carried(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of ``meta`` a tokenizer keeps (``TOKENIZER_CARRIED``), the typed ``chat_template``
    standing in for a missing ``tokenizer.chat_template``, plus a typed ``chat_format``."""
    extra = {k: meta[k] for k in TOKENIZER_CARRIED if k in meta}
    typed = meta.get("chat_template")
    if "tokenizer.chat_template" not in extra and isinstance(typed, str) and typed.strip():
        extra["tokenizer.chat_template"] = typed
    if isinstance(meta.get("chat_format"), str):
        extra["chat_format"] = meta["chat_format"]
    return extra
