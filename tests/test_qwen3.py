"""Qwen3 (Qwen2 without the q/k/v bias, with an RMSNorm over each head of q and k before RoPE): the
model, its fast path, generation, conversion, export and preflight against transformers'
Qwen3ForCausalLM built offline with the same weights."""

import pytest
import torch

import apr_kernels
from apr_kernels.model import PRESETS, ModelConfig, Transformer, from_apr
from apr_kernels.model.generate import generate
from apr_kernels.model.loading import PreflightError
from test_model import convert_and_export_round_trip, hf_model, ours_from_hf

transformers = pytest.importorskip("transformers")

# head_dim 32 with 4 heads over hidden 48: q is wider than the hidden state, as in Qwen3-0.6B
QWEN3 = ModelConfig(architecture="qwen3", hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                    intermediate_size=80, vocab_size=107, rope_theta=1e6, rms_norm_eps=1e-6, qk_norm=True,
                    tie_word_embeddings=True, max_position_embeddings=256)


def test_preset_is_the_published_model():
    c = PRESETS["qwen3_0_6b"]
    with torch.device("meta"):
        ours = sum(p.numel() for p in Transformer(c).parameters())
        hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
            intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True))
        theirs = sum(p.numel() for p in hf.parameters())
    assert ours == theirs == c.num_parameters() == 596_049_920  # Qwen3-0.6B, tied embeddings counted once


@pytest.mark.parametrize("path", ["eager", "fast-reference", "fast-triton"])
def test_logits_match_transformers(path, use_backend):
    hf = hf_model(QWEN3)
    ours = ours_from_hf(hf, QWEN3)
    assert {n for n, _ in ours.named_parameters()} >= {"model.layers.0.self_attn.q_norm.weight",
                                                          "model.layers.1.self_attn.k_norm.weight"}
    if path != "eager":
        ours.fast = True
        use_backend("triton" if path == "fast-triton" else "reference")
    x = torch.randint(0, QWEN3.vocab_size, (2, 29))
    with torch.no_grad():
        want = hf(x).logits
        got = ours(x)
    assert want.abs().max() > 1.0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fast_path_trains_the_head_norms(use_backend):
    """Gradients reach q_norm/k_norm through the fast path's rms_norm op, as through eager code."""
    use_backend("reference")
    hf = hf_model(QWEN3)
    x = torch.randint(0, QWEN3.vocab_size, (2, 17))
    grads = []
    for fast in (False, True):
        model = ours_from_hf(hf, QWEN3)
        model.fast = fast
        model(x, x).backward()
        grads.append(model.model.layers[0].self_attn.q_norm.weight.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_greedy_generation_equals_transformers():
    hf = hf_model(QWEN3)
    ours = ours_from_hf(hf, QWEN3)
    prompt = torch.randint(0, QWEN3.vocab_size, (2, 7), generator=torch.Generator().manual_seed(11))
    hf.generation_config.eos_token_id = None
    want = hf.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(ours, prompt, 10), want)


def test_convert_from_apr_and_export(tmp_path):
    got = convert_and_export_round_trip(tmp_path, hf_model(QWEN3), QWEN3.vocab_size)
    assert got["metadata"]["architecture"] == "qwen3" and got["metadata"]["head_dim"] == 32
    assert got["model"].config.qk_norm and not got["model"].config.attention_bias
    assert got["config"]["model_type"] == "qwen3"


def test_preflight_family_and_tensor_evidence(tmp_path):
    hf = hf_model(QWEN3)
    tensors = {k: v.contiguous() for k, v in hf.state_dict().items()}
    meta = QWEN3.to_apr_config().to_metadata()
    path = tmp_path / "m.apr"
    apr_kernels.save(tensors, path, metadata={**meta, "architecture": "qwen2", "model_type": "qwen2",
                                              "hf_architecture": "Qwen2ForCausalLM"})
    with pytest.raises(PreflightError, match=r"m\.apr: architecture family mismatch: metadata says 'qwen2'.*"
                                             r"q_norm.*only qwen3"):
        from_apr(path)
    no_norms = {k: v for k, v in tensors.items() if "_norm.weight" not in k or "layernorm" in k or k.startswith(
        "model.norm")}
    apr_kernels.save(no_norms, path, metadata=meta)
    with pytest.raises(PreflightError, match=r"missing.*self_attn\.k_norm\.weight"):
        from_apr(path)
