"""The package's kernels inside a Hugging Face ``transformers`` model (what Liger-Kernel's
``apply_liger_kernel_to_*`` does), for users who train with transformers, TRL or their own loops.

    import apr_kernels
    model = AutoModelForCausalLM.from_pretrained(...)
    apr_kernels.patch_hf_model(model)          # in place; returns the model

Llama, Mistral, Qwen2, Qwen3 and their mixture-of-experts relatives (Qwen2-MoE, Qwen3-MoE, Mixtral):

* ``rms_norm``: every RMSNorm module (the q/k norms of Qwen3 too) runs ``apr_kernels.rms_norm`` (the
  same numerics: normalise in fp32, cast, multiply by the weight);
* ``swiglu``: every dense SwiGLU MLP runs ``apr_kernels.swiglu`` between its projections;
* ``experts``: the routed experts of MoE layers (transformers' stacked ``gate_up_proj``/``down_proj``)
  run as an experts implementation ``"apr_kernels"`` (transformers' ``ExpertsInterface``): two
  ``apr_kernels.grouped_mm`` calls on the stacked weights in place and one ``swiglu``, the group
  sizes kept on the device. ``None`` (default): only where the model would otherwise loop over its
  experts (``experts_implementation="eager"``), leaving torch's ``grouped_mm`` where transformers
  chose it until the two have been timed on a GPU (``bench/bench_moe.py``); True: always; False:
  never;
* ``rope``: the modeling modules' ``apply_rotary_pos_emb`` runs ``apr_kernels.rope`` on q and k in one
  pass (per-token tables, so any ``position_ids`` work; a module-level patch, as Liger's, so it holds
  for every model of those families in the process);
* ``attention``: an attention implementation ``"apr_kernels"`` (transformers' ``AttentionInterface``)
  runs ``apr_kernels.attention`` (GQA without expanding K/V, causal, the layer's sliding window, packed
  sequences through ``cu_seq_lens_q`` as transformers' padding-free collators pass them); a call the
  kernel does not cover (a padding mask, a KV-cache step whose queries are fewer than its keys,
  dropout, ``output_attentions``) goes to transformers' SDPA implementation unchanged;
* ``cross_entropy``: in training mode with ``labels``, the causal LM's loss is
  ``apr_kernels.linear_cross_entropy`` of the last hidden states and the output weight: the
  ``[tokens, vocab]`` logits are never materialised, and ``logits`` comes back None (as Liger does);
  labels are shifted and ``num_items_in_batch`` honoured as transformers' ``ForCausalLMLoss`` does.
  Evaluation and generation keep the model's own forward.

Off CUDA the ops run their PyTorch reference (``APR_KERNELS_BACKEND``), so a patched model gives the
unpatched model's numbers everywhere: that is what the tests check, against the model itself.
"""

from __future__ import annotations

import importlib
import types

import torch

# model_type -> the transformers modeling module whose apply_rotary_pos_emb is patched
FAMILIES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "qwen2_moe": "qwen2_moe",
            "qwen3_moe": "qwen3_moe", "mixtral": "mixtral"}
ATTENTION = "apr_kernels"


def patch_hf_model(model, *, rms_norm: bool = True, swiglu: bool = True, rope: bool = True,
                   attention: bool = True, cross_entropy: bool = True, experts: bool | None = None):
    """Put the package's kernels into ``model`` (a transformers ``*ForCausalLM`` of a supported
    family, or its base model) in place and return it (module docstring). ValueError for another
    model type."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"patch_hf_model: model_type {model_type!r}; expected one of {', '.join(FAMILIES)} (a "
                         f"Llama/Mistral/Qwen2/Qwen3-family transformers model)")
    for module in model.modules():
        name = type(module).__name__
        if rms_norm and name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm_forward, module)
        elif swiglu and name.endswith("MLP") and all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")):
            if getattr(config, "hidden_act", "silu") != "silu":
                raise ValueError(f"patch_hf_model: hidden_act {config.hidden_act!r}; the swiglu kernel computes "
                                 f"silu(gate) * up (pass swiglu=False)")
            module.forward = types.MethodType(_swiglu_forward, module)
    if rope:
        modeling = importlib.import_module(f"transformers.models.{FAMILIES[model_type]}.modeling_{FAMILIES[model_type]}")
        if getattr(modeling.apply_rotary_pos_emb, "__name__", "") != "apr_apply_rotary_pos_emb":
            modeling.apply_rotary_pos_emb = apr_apply_rotary_pos_emb
    if attention:
        _register_attention()
        model.set_attn_implementation(ATTENTION)
    current = getattr(config, "_experts_implementation", None)
    if (experts or (experts is None and current == "eager")) and hasattr(model, "set_experts_implementation") \
            and any(hasattr(m, "gate_up_proj") for m in model.modules()):
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        ALL_EXPERTS_FUNCTIONS.register(ATTENTION, apr_experts_forward)
        model.set_experts_implementation(ATTENTION)
    if cross_entropy and hasattr(model, "lm_head"):
        original = type(model).forward
        model.forward = types.MethodType(_fused_loss_forward(original), model)
    return model


# ------------------------------------------------------------------------------------ the pieces

def _ops():
    import apr_kernels

    return apr_kernels


def _rms_norm_forward(self, hidden_states):
    return _ops().rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _swiglu_forward(self, x):
    return self.down_proj(_ops().swiglu(self.gate_proj(x), self.up_proj(x)))


def apr_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1, **_):
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin)`` (q ``[B, Hq, S, D]``, k ``[B, Hkv, S, D]``,
    cos/sin ``[B, S, D]`` with both halves equal) through ``apr_kernels.rope``: every token its own
    table row, so per-row positions (packed documents, left padding) come out right."""
    if unsqueeze_dim != 1 or q.dim() != 4 or cos.dim() != 3:
        raise ValueError(f"apr_apply_rotary_pos_emb: q {tuple(q.shape)}, cos {tuple(cos.shape)}, unsqueeze_dim "
                         f"{unsqueeze_dim}; expected [B, H, S, D] heads, [B, S, D] tables and unsqueeze_dim 1")
    b, _, s, d = q.shape
    half = d // 2
    cos = cos.expand(b, s, d)[..., :half].reshape(b * s, half).to(q.dtype)
    sin = sin.expand(b, s, d)[..., :half].reshape(b * s, half).to(q.dtype)
    # [B, H, S, D] -> all tokens in one row [1, B*S, H, D] (a view of the projections' layout)
    qt, kt = (t.transpose(1, 2).reshape(1, b * s, t.shape[1], d) for t in (q, k))
    qr, kr = _ops().rope(qt, kt, cos, sin, 2)
    return (qr.reshape(b, s, q.shape[1], d).transpose(1, 2), kr.reshape(b, s, k.shape[1], d).transpose(1, 2))


def apr_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          is_causal=None, **kwargs):
    """An attention implementation for transformers' ``AttentionInterface`` (q ``[B, Hq, S, D]``,
    k/v ``[B, Hkv, S, D]``; returns ``[B, S, Hq, D]``, no weights)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    # a padding-free batch (cu_seq_lens, one row, no padding): the mask transformers may build from its
    # position_ids says only what cu_seq_lens says, so the packed-sequence kernel stands in for it
    plain = ((attention_mask is None or (cu is not None and query.shape[0] == 1))
             and not dropout and not kwargs.get("output_attentions")
             and kwargs.get("softcap") is None and query.shape[2] == key.shape[2]
             and getattr(module, "is_causal", True) and is_causal is not False)
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None)) or None
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, S, H, D] views
    if cu is not None:  # padding-free batches: one row of documents back to back
        if q.shape[0] != 1:
            raise ValueError(f"apr_kernels attention: cu_seq_lens_q with a batch of {q.shape[0]} rows; expected the "
                             f"packed row of a padding-free collator (batch 1)")
        max_len = kwargs.get("max_length_q")
        o = _ops().attention(q[0], k[0], v[0], causal=True, scale=scaling, window=window,
                             cu_seqlens=cu.to(torch.int32),
                             max_seqlen=int(max_len) if max_len is not None else None)[None]
    else:
        o = _ops().attention(q, k, v, causal=True, scale=scaling, window=window)
    return o, None


def apr_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """An experts implementation for transformers' ``ExpertsInterface`` (``hidden_states`` [T, hidden],
    ``top_k_index``/``top_k_weights`` [T, k]; returns [T, hidden]): the tokens sorted by expert, the
    stacked ``gate_up_proj`` and ``down_proj`` [E, out, in] as two grouped GEMMs around ``swiglu``, the
    weighted outputs put back in token order and summed per token (as transformers' ``grouped_mm``
    implementation sums them). Experts of another form (biases, transposed or interleaved weights, no
    gate, a custom gate or activation, expert parallelism) take the module's own forward."""
    from transformers.integrations.moe import _default_apply_gate

    act = getattr(self, "act_fn", None)
    plain = (not self.has_bias and not self.is_transposed and self.has_gate and self.is_concatenated
             and not self.has_post_expert_norm and not getattr(self, "_is_expert_parallel", False)
             and getattr(type(self), "_apply_gate", _default_apply_gate) is _default_apply_gate
             and type(act).__name__ in ("SiLU", "SiLUActivation"))
    if not plain:
        return type(self).forward.__wrapped__(self, hidden_states, top_k_index, top_k_weights)
    from apr_kernels.model.moe import combine_experts, sort_by_expert

    ops = _ops()
    order, offs = sort_by_expert(top_k_index, self.num_experts)
    xs = hidden_states[order // top_k_index.shape[1]]
    gate_up = ops.grouped_mm(xs, self.gate_up_proj, offs)
    inter = gate_up.shape[1] // 2
    out = ops.grouped_mm(ops.swiglu(gate_up[:, :inter], gate_up[:, inter:]), self.down_proj, offs)
    return combine_experts(out, top_k_weights, order).to(hidden_states.dtype)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, apr_attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # None without padding: the kernel masks itself


def _fused_loss_forward(original):
    """The causal LM's forward with the loss fused into the output projection in training."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                logits_to_keep=0, **kwargs):
        if labels is None or not self.training:
            return original(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds, labels=labels, logits_to_keep=logits_to_keep, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        num_items = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             inputs_embeds=inputs_embeds, **kwargs)
        hidden = outputs[0]
        if shift_labels is None:  # as ForCausalLMLoss: position t predicts labels[t + 1]
            shift_labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
        shift_labels = shift_labels.to(hidden.device)
        reduction = "sum" if num_items is not None else "mean"
        loss = _ops().linear_cross_entropy(hidden, self.lm_head.weight, shift_labels, reduction=reduction)
        if num_items is not None:
            loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
        return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=getattr(outputs, "hidden_states", None),
                                      attentions=getattr(outputs, "attentions", None))

    return forward
