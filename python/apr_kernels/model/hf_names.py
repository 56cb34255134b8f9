"""Tensor names: the Hugging Face names the model uses, GGUF names mapped onto them (spec 10.3), and
the shape every parameter must have for a config (spec 10.2)."""

from __future__ import annotations

import re

from .config import ModelConfig

# GGUF (llama.cpp) name -> Hugging Face name; anything else is kept unchanged
_GGUF_RULES = [
    (re.compile(r"^token_embd\.weight$"), "model.embed_tokens.weight"),
    (re.compile(r"^output\.weight$"), "lm_head.weight"),
    (re.compile(r"^output_norm\.weight$"), "model.norm.weight"),
    (re.compile(r"^blk\.(\d+)\.attn_q\.(weight|bias)$"), r"model.layers.\1.self_attn.q_proj.\2"),
    (re.compile(r"^blk\.(\d+)\.attn_k\.(weight|bias)$"), r"model.layers.\1.self_attn.k_proj.\2"),
    (re.compile(r"^blk\.(\d+)\.attn_v\.(weight|bias)$"), r"model.layers.\1.self_attn.v_proj.\2"),
    (re.compile(r"^blk\.(\d+)\.attn_output\.(weight|bias)$"), r"model.layers.\1.self_attn.o_proj.\2"),
    (re.compile(r"^blk\.(\d+)\.attn_norm\.weight$"), r"model.layers.\1.input_layernorm.weight"),
    (re.compile(r"^blk\.(\d+)\.ffn_norm\.weight$"), r"model.layers.\1.post_attention_layernorm.weight"),
    (re.compile(r"^blk\.(\d+)\.ffn_gate\.weight$"), r"model.layers.\1.mlp.gate_proj.weight"),
    (re.compile(r"^blk\.(\d+)\.ffn_up\.weight$"), r"model.layers.\1.mlp.up_proj.weight"),
    (re.compile(r"^blk\.(\d+)\.ffn_down\.weight$"), r"model.layers.\1.mlp.down_proj.weight"),
    (re.compile(r"^blk\.(\d+)\.attn_q_norm\.weight$"), r"model.layers.\1.self_attn.q_norm.weight"),
    (re.compile(r"^blk\.(\d+)\.attn_k_norm\.weight$"), r"model.layers.\1.self_attn.k_norm.weight"),
]

TRAINING_PREFIX = "__training__."  # training-state tensors in checkpoints (spec 10.3): never weights


def hf_name(name: str) -> str:
    """The Hugging Face name of a tensor stored under a Hugging Face or GGUF name."""
    for pattern, repl in _GGUF_RULES:
        if pattern.match(name):
            return pattern.sub(repl, name)
    return name


def expected_count(cfg: ModelConfig) -> int:
    """How many parameters ``expected_shapes(cfg)`` lists, counted without listing them (a hostile
    file's metadata may claim billions of layers or experts: checked against the file first)."""
    step = cfg.decoder_sparse_step
    sparse = 0
    if cfg.is_moe:
        dense = {i for i in cfg.mlp_only_layers if i < cfg.num_layers and (i + 1) % step == 0}
        sparse = cfg.num_layers // step - len(dense)
    attn = 4 + 3 * cfg.attention_bias + 2 * cfg.qk_norm + 2  # projections, biases, q/k norms, the layer's norms
    moe = 1 + 3 * (cfg.num_experts or 0) + (4 if cfg.shared_expert_intermediate_size else 0)
    head = 1 if cfg.num_labels or not cfg.tie_word_embeddings else 0
    return cfg.num_layers * attn + sparse * moe + (cfg.num_layers - sparse) * 3 + 2 + head


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of ``Transformer(cfg)`` with its shape, by Hugging Face name (spec 10.2)."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    out = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = (q, h)
        out[p + "self_attn.k_proj.weight"] = (kv, h)
        out[p + "self_attn.v_proj.weight"] = (kv, h)
        if cfg.attention_bias:
            out[p + "self_attn.q_proj.bias"] = (q,)
            out[p + "self_attn.k_proj.bias"] = (kv,)
            out[p + "self_attn.v_proj.bias"] = (kv,)
        if cfg.qk_norm:
            out[p + "self_attn.q_norm.weight"] = (d,)
            out[p + "self_attn.k_norm.weight"] = (d,)
        out[p + "self_attn.o_proj.weight"] = (h, q)
        out.update(_ffn_shapes(cfg, i, f"{p}{cfg.ffn_name}."))
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    if cfg.num_labels:
        out["score.weight"] = (cfg.num_labels, h)
    elif not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, h)
    return out


def _ffn_shapes(cfg: ModelConfig, layer: int, p: str) -> dict[str, tuple[int, ...]]:
    """Layer ``layer``'s MLP: dense, or a router, experts (Mixtral's named w1/w3/w2) and a shared expert."""
    h = cfg.hidden_size

    def swiglu(prefix, width, names=("gate_proj", "up_proj", "down_proj")):
        return {f"{prefix}{names[0]}.weight": (width, h), f"{prefix}{names[1]}.weight": (width, h),
                f"{prefix}{names[2]}.weight": (h, width)}

    if not cfg.moe_layer(layer):
        return swiglu(p, cfg.intermediate_size)
    out = {f"{p}gate.weight": (cfg.num_experts, h)}
    names = ("w1", "w3", "w2") if cfg.architecture == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for e in range(cfg.num_experts):
        out.update(swiglu(f"{p}experts.{e}.", cfg.moe_intermediate_size, names))
    if cfg.shared_expert_intermediate_size:
        out.update(swiglu(f"{p}shared_expert.", cfg.shared_expert_intermediate_size))
        out[f"{p}shared_expert_gate.weight"] = (1, h)
    return out
