"""Mistral (Llama with a sliding attention window): the model, its fast path, generation,
conversion and export against transformers' MistralForCausalLM built offline with the same weights."""

import pytest
import torch

from apr_kernels.cli import main
from apr_kernels.model import ModelConfig
from apr_kernels.model.generate import generate
from test_model import LLAMA, convert_and_export_round_trip, hf_model, ours_from_hf

transformers = pytest.importorskip("transformers")

# window 5 over 37 positions: most keys are outside it; head_dim 16 (the kernels' smallest)
MISTRAL = ModelConfig(architecture="mistral", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=96, vocab_size=103, rope_theta=1e4, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, sliding_window=5, max_position_embeddings=256)


def test_config_round_trips_through_apr_metadata():
    meta = MISTRAL.to_apr_config().to_metadata()
    assert meta["architecture"] == "mistral" and meta["sliding_window"] == 5
    assert meta["hf_architecture"] == "MistralForCausalLM"
    from apr_kernels.metadata import AprModelConfig
    assert ModelConfig.from_apr_config(AprModelConfig.from_metadata(meta)).sliding_window == 5
    with pytest.raises(ValueError, match="sliding_window=0; expected a positive integer"):
        MISTRAL.replace(sliding_window=0)


@pytest.mark.parametrize("path", ["eager", "fast-reference", "fast-triton"])
def test_logits_match_transformers(path, use_backend):
    hf = hf_model(MISTRAL)
    ours = ours_from_hf(hf, MISTRAL)
    if path != "eager":
        ours.fast = True
        use_backend("triton" if path == "fast-triton" else "reference")
    x = torch.randint(0, MISTRAL.vocab_size, (2, 37))
    with torch.no_grad():
        want = hf(x).logits
        got = ours(x)
        no_window = ours_from_hf(hf, MISTRAL.replace(sliding_window=None))(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (no_window - want).abs().max() > 1e-2  # the window matters: ignoring it is detectable


def test_window_longer_than_the_sequence_is_llama():
    cfg = LLAMA.replace(architecture="mistral", sliding_window=1000)
    hf = hf_model(LLAMA)
    x = torch.randint(0, cfg.vocab_size, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(ours_from_hf(hf, cfg)(x), hf(x).logits, rtol=1e-5, atol=2e-5)


def test_greedy_generation_past_the_window_equals_transformers():
    hf = hf_model(MISTRAL)
    ours = ours_from_hf(hf, MISTRAL)
    prompt = torch.randint(0, MISTRAL.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    hf.generation_config.eos_token_id = None  # no stop token: 14 new tokens, none suppressed
    want = hf.generate(prompt, max_new_tokens=14, do_sample=False, pad_token_id=0)
    assert want.shape == (2, 23)
    assert torch.equal(generate(ours, prompt, 14), want)


def test_documents_with_a_window_equal_each_document_alone(use_backend):
    """Document masking and the window together, fast (interpreter) and eager paths."""
    from apr_kernels.model import Documents

    hf = hf_model(MISTRAL)
    ours = ours_from_hf(hf, MISTRAL)
    eos = 0
    x = torch.randint(1, MISTRAL.vocab_size, (1, 30))
    x[0, 11] = eos
    docs = Documents.from_eos(x, eos)
    with torch.no_grad():
        want = torch.cat([hf(x[:, :12]).logits, hf(x[:, 12:]).logits], dim=1)
        eager = ours(x, documents=docs)
        use_backend("triton")
        ours.fast = True
        fast = ours(x, documents=docs)
    torch.testing.assert_close(eager, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast, want, rtol=1e-4, atol=1e-4)


def test_convert_from_apr_and_export_keep_the_window(tmp_path):
    got = convert_and_export_round_trip(tmp_path, hf_model(MISTRAL), MISTRAL.vocab_size, seq=25)
    assert got["metadata"]["architecture"] == "mistral" and got["metadata"]["sliding_window"] == 5
    assert got["model"].config.sliding_window == 5
    assert got["config"]["model_type"] == "mistral" and got["config"]["sliding_window"] == 5


@pytest.mark.parametrize("path", ["eager", "fast-triton"])
def test_qwen2_windows_on_the_later_layers_match_transformers(path, use_backend, tmp_path):
    """Qwen2 with use_sliding_window: the first max_window_layers layers attend to everything, the
    rest within the window (Hugging Face's layer_types); through convert and export too."""
    from test_model import QWEN

    cfg = QWEN.replace(hidden_size=112, num_layers=3, sliding_window=6, max_window_layers=1,
                       max_position_embeddings=256)  # head_dim 16: what the kernels take
    hf = hf_model(cfg, use_sliding_window=True, sliding_window=6, max_window_layers=1)
    assert hf.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    ours = ours_from_hf(hf, cfg)
    assert [layer.self_attn.window for layer in ours.model.layers] == [None, 6, 6]
    if path == "fast-triton":
        ours.fast = True
        use_backend("triton")
    x = torch.randint(0, cfg.vocab_size, (2, 30))
    with torch.no_grad():
        want = hf(x).logits
        torch.testing.assert_close(ours(x), want, rtol=1e-4, atol=1e-4)
        everywhere = ours_from_hf(hf, cfg.replace(max_window_layers=None))(x)
    assert (everywhere - want).abs().max() > 1e-2  # which layers are windowed matters
    if path == "eager":
        got = convert_and_export_round_trip(tmp_path, hf, cfg.vocab_size, seq=30)
        assert (got["metadata"]["sliding_window"], got["metadata"]["max_window_layers"]) == (6, 1)
        assert got["config"]["use_sliding_window"] and got["config"]["max_window_layers"] == 1


def test_layer_types_that_are_not_full_then_windowed_are_refused(tmp_path, capsys):
    from test_model import QWEN

    hf = hf_model(QWEN.replace(num_layers=3), use_sliding_window=True, sliding_window=6,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "q.apr")]) != 0
    assert "windowed layers must follow all full-attention ones" in capsys.readouterr().err
    assert not (tmp_path / "q.apr").exists()
