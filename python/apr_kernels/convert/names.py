"""Tensor names and row orders: GGUF (llama.cpp) <-> Hugging Face (spec 10.3, 10.5).

llama.cpp's ``convert_hf_to_gguf`` permutes the rows of the q and k projections of Llama-family
models (not Qwen2) so that its adjacent-pair (NORM) RoPE on the permuted rows equals Hugging Face's
split-half (NEOX) RoPE on the original rows. Our GGUF import undoes it (rows only: quantised rows
move as whole blocks, so raw Q4_K/Q6_K bytes stay bit-exact) and records ``rope_type`` 2.
"""

from __future__ import annotations

import re

import torch

# (GGUF pattern, HF template); {n} is the layer number, {p} is weight/bias
_TABLE = (
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output.weight", "lm_head.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("blk.{n}.attn_q.{p}", "model.layers.{n}.self_attn.q_proj.{p}"),
    ("blk.{n}.attn_k.{p}", "model.layers.{n}.self_attn.k_proj.{p}"),
    ("blk.{n}.attn_v.{p}", "model.layers.{n}.self_attn.v_proj.{p}"),
    ("blk.{n}.attn_output.{p}", "model.layers.{n}.self_attn.o_proj.{p}"),
    ("blk.{n}.attn_norm.weight", "model.layers.{n}.input_layernorm.weight"),
    ("blk.{n}.ffn_norm.weight", "model.layers.{n}.post_attention_layernorm.weight"),
    ("blk.{n}.ffn_gate.weight", "model.layers.{n}.mlp.gate_proj.weight"),
    ("blk.{n}.ffn_up.weight", "model.layers.{n}.mlp.up_proj.weight"),
    ("blk.{n}.ffn_down.weight", "model.layers.{n}.mlp.down_proj.weight"),
    ("blk.{n}.attn_q_norm.weight", "model.layers.{n}.self_attn.q_norm.weight"),
    ("blk.{n}.attn_k_norm.weight", "model.layers.{n}.self_attn.k_norm.weight"),
    # mixture of experts (the experts themselves are stacked per projection: gguf_in / gguf_out)
    ("blk.{n}.ffn_gate_inp.weight", "model.layers.{n}.mlp.gate.weight"),
    ("blk.{n}.ffn_gate_inp.weight", "model.layers.{n}.block_sparse_moe.gate.weight"),
    ("blk.{n}.ffn_gate_shexp.weight", "model.layers.{n}.mlp.shared_expert.gate_proj.weight"),
    ("blk.{n}.ffn_up_shexp.weight", "model.layers.{n}.mlp.shared_expert.up_proj.weight"),
    ("blk.{n}.ffn_down_shexp.weight", "model.layers.{n}.mlp.shared_expert.down_proj.weight"),
    ("blk.{n}.ffn_gate_inp_shexp.weight", "model.layers.{n}.mlp.shared_expert_gate.weight"),
)
# a Hugging Face expert tensor: (layer, expert, projection); Mixtral's w1/w3/w2 are gate/up/down
HF_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
                       r"(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
EXPERT_PROJ = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}


def _regex(template: str) -> re.Pattern:
    body = re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(f"^{body}$")


_G2H = [(_regex(g), h) for g, h in _TABLE]
_H2G = [(_regex(h), g) for g, h in _TABLE]
# GGUF architectures whose q/k rows llama.cpp permutes (LlamaModel and its subclasses)
PERMUTED_ARCHS = frozenset({"llama", "mistral", "granite"})


def _map(rules, name: str) -> str | None:
    for pattern, template in rules:
        m = pattern.match(name)
        if m:
            return template.format(**m.groupdict())
    return None


def gguf_to_hf(name: str) -> str:
    """The Hugging Face name of a GGUF tensor (unknown names are kept unchanged)."""
    return _map(_G2H, name) or name


def hf_to_gguf(name: str) -> str:
    """The GGUF name of a Hugging Face tensor (unknown names are kept unchanged)."""
    return _map(_H2G, name) or name


def rope_permuted_heads(hf_name: str, num_heads: int, num_kv_heads: int) -> int | None:
    """Head count used by llama.cpp's permutation for this tensor, or None if it is not permuted."""
    if re.search(r"\.self_attn\.q_proj\.(weight|bias)$", hf_name):
        return num_heads
    if re.search(r"\.self_attn\.k_proj\.(weight|bias)$", hf_name):
        return num_kv_heads
    return None


def permute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's ``permute``: per head, split-half row order -> adjacent-pair order. ``w``: [rows, ...]."""
    _check(w, n_heads)
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of :func:`permute_rows` (works on raw quantised rows too: [rows, bytes_per_row])."""
    _check(w, n_heads)
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check(w: torch.Tensor, n_heads: int) -> None:
    if n_heads <= 0 or w.shape[0] % (2 * n_heads):
        raise ValueError(f"q/k rows {w.shape[0]} are not a multiple of 2 x heads ({n_heads}); "
                         "expected heads x head_dim rows with an even head_dim")
