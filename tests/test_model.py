"""The model against Hugging Face transformers (built offline from small configs), configs and presets.

The oracle is transformers' own Qwen2ForCausalLM / LlamaForCausalLM with *eager* attention (explicit
softmax, K/V repeated), given the same random weights: our logits must match to fp32 rounding.
"""

import math

import pytest
import torch

from apr_kernels.model import PRESETS, ModelConfig, Transformer, preset
from apr_kernels.model.hf_names import expected_shapes, hf_name
from apr_kernels.model.rope import permute_rows_for_norm_rope, unpermute_rows_from_norm_rope

transformers = pytest.importorskip("transformers")


def hf_model(cfg: ModelConfig, **extra):
    kw = dict(**extra, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
              intermediate_size=cfg.intermediate_size, rope_theta=cfg.rope_theta,
              rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
              max_position_embeddings=cfg.max_position_embeddings, attn_implementation="eager")
    if cfg.architecture == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    elif cfg.architecture == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw, head_dim=cfg.head_dim))
    elif cfg.architecture == "mistral":
        kw["sliding_window"] = cfg.sliding_window
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**kw))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    with torch.no_grad():  # weights far from the init: norms != 1, biases != 0, larger matrices
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
            else:
                p.normal_(0, 0.15)
    return model.eval()


def convert_and_export_round_trip(tmp_path, hf, vocab_size: int, seq: int = 21) -> dict:
    """hf -> save_pretrained -> ``apr-kernels convert`` -> from_apr and ``export`` -> transformers:
    both give hf's logits. Returns the APR metadata and the exported config.json."""
    import json

    import apr_kernels
    from apr_kernels.cli import main
    from apr_kernels.model import from_apr

    src, apr, out = tmp_path / "hf", tmp_path / "model.apr", tmp_path / "export"
    hf.save_pretrained(src)
    assert main(["convert", str(src), str(apr)]) == 0
    x = torch.randint(0, vocab_size, (1, seq))
    with torch.no_grad():
        torch.testing.assert_close(from_apr(apr)(x), hf(x).logits, rtol=1e-4, atol=1e-4)
    assert main(["export", str(apr), str(out)]) == 0
    again = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, hf(x).logits, rtol=1e-5, atol=1e-5)
    with apr_kernels.open(apr) as f:
        return {"metadata": dict(f.metadata), "config": json.loads((out / "config.json").read_text()),
                "model": from_apr(apr)}


def ours_from_hf(hf, cfg: ModelConfig) -> Transformer:
    model = Transformer(cfg, fast=False).eval()
    sd = {k: v for k, v in hf.state_dict().items() if k in dict(model.named_parameters())}
    model.load_state_dict(sd, strict=True)
    return model


QWEN = ModelConfig(architecture="qwen2", hidden_size=70, num_layers=2, num_heads=7, num_kv_heads=1,
                   intermediate_size=94, vocab_size=97, rope_theta=1e6, rms_norm_eps=1e-6,
                   attention_bias=True, tie_word_embeddings=True)
LLAMA = ModelConfig(architecture="llama", hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=2,
                    intermediate_size=80, vocab_size=101, rope_theta=1e4, rms_norm_eps=1e-5,
                    attention_bias=False, tie_word_embeddings=False)


@pytest.mark.parametrize("cfg", [QWEN, LLAMA], ids=["qwen2-gqa7-bias-tied", "llama-gqa3-untied"])
def test_parameter_names_and_shapes_are_hugging_faces(cfg):
    hf = hf_model(cfg)
    ours = Transformer(cfg)
    hf_shapes = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    if cfg.tie_word_embeddings:  # HF lists the tied head in its state dict; we own no such parameter
        assert hf_shapes.pop("lm_head.weight") == hf_shapes["model.embed_tokens.weight"]
    ours_shapes = {k: tuple(v.shape) for k, v in ours.named_parameters()}
    assert ours_shapes == hf_shapes
    assert expected_shapes(cfg) == hf_shapes


@pytest.mark.parametrize("cfg", [QWEN, LLAMA], ids=["qwen2", "llama"])
def test_logits_match_transformers_rope_split_halves(cfg):
    hf = hf_model(cfg)
    ours = ours_from_hf(hf, cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 37))
    with torch.no_grad():
        want = hf(x).logits
        got = ours(x)
    assert got.shape == (2, 37, cfg.vocab_size)
    assert want.abs().max() > 1.0  # a meaningful comparison, not two near-zero tensors
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


# head_dim 8, theta 1e4: wavelengths 6.3, 63, 628, 6283; with original length 64 and factors 1/4 the
# pairs fall in all three llama3 regimes (kept < 16 <= interpolated <= 64 < slowed)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


# yarn over the same pairs: the pairs turning 32 / 1 times in 64 positions are indices -0.5 and 1.0, so
# the ramp (truncated to 0..2, or not) keeps pair 0, interpolates pair 1 and slows pairs 2 and 3
YARN_SCALING = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("scaling", [
    LLAMA3_SCALING, {"rope_type": "linear", "factor": 4.0}, YARN_SCALING,
    {**YARN_SCALING, "beta_fast": 16, "beta_slow": 2, "truncate": False, "mscale": 0.9, "mscale_all_dim": 0.5},
    {**YARN_SCALING, "attention_factor": 1.3}], ids=["llama3", "linear", "yarn", "yarn-options", "yarn-factor"])
def test_logits_match_transformers_with_rope_scaling(scaling):
    cfg = LLAMA.replace(rope_scaling=scaling, max_position_embeddings=512)
    hf = hf_model(cfg, rope_scaling=dict(scaling))
    ours = ours_from_hf(hf, cfg)
    x = torch.randint(0, cfg.vocab_size, (1, 150))  # positions past the original 64
    with torch.no_grad():
        want = hf(x).logits
        got = ours(x)
        unscaled = ours_from_hf(hf, cfg.replace(rope_scaling=None))(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    assert (unscaled - want).abs().max() > 1e-2  # the scaling matters: ignoring it is detectable


def test_dynamic_ntk_scaling_is_hugging_faces():
    """dynamic (NTK) scaling: the model (which takes at most max_position_embeddings positions) gives
    Hugging Face's logits; the tables past that length raise the base as Hugging Face's
    _compute_dynamic_ntk_parameters does."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from apr_kernels.model.rope import inv_frequencies

    scaling = {"rope_type": "dynamic", "factor": 4.0}
    cfg = LLAMA.replace(rope_scaling=scaling, max_position_embeddings=64)
    hf = hf_model(cfg, rope_scaling=dict(scaling))
    x = torch.randint(0, cfg.vocab_size, (1, 64))
    with torch.no_grad():
        torch.testing.assert_close(ours_from_hf(hf, cfg)(x), hf(x).logits, rtol=1e-5, atol=2e-5)
    for seq_len in (10, 64, 65, 300):
        want, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf.config, "cpu", seq_len=seq_len)
        got = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, seq_len=seq_len, max_position_embeddings=64)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        assert torch.equal(got, inv_frequencies(cfg.head_dim, cfg.rope_theta)) == (seq_len <= 64)


def test_rope_scaling_round_trips_and_unsupported_kinds_are_refused():
    from apr_kernels.metadata import AprModelConfig

    cfg = LLAMA.replace(rope_scaling=LLAMA3_SCALING)
    meta = cfg.to_apr_config().to_metadata()
    assert meta["rope_scaling"] == LLAMA3_SCALING
    assert ModelConfig.from_apr_config(AprModelConfig.from_metadata(meta)) == cfg
    with pytest.raises(ValueError, match=r"f\.apr: rope_scaling type 'longrope' is not supported"):
        LLAMA.replace(rope_scaling={"rope_type": "longrope", "factor": 4.0}, _source="f.apr")
    # as in Hugging Face, the original context of llama3 / yarn defaults to max_position_embeddings
    yarn = LLAMA.replace(rope_scaling={"type": "yarn", "factor": 4.0, "beta_fast": None}, max_position_embeddings=512)
    assert yarn.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}
    with pytest.raises(ValueError, match=r"rope_scaling beta_fast=1 must exceed beta_slow=2"):
        LLAMA.replace(rope_scaling={**YARN_SCALING, "beta_fast": 1, "beta_slow": 2})
    with pytest.raises(ValueError, match=r"rope_scaling\['truncate'\]='no'; expected true or false"):
        LLAMA.replace(rope_scaling={**YARN_SCALING, "truncate": "no"})
    with pytest.raises(ValueError, match=r"rope_scaling\['low_freq_factor'\]=None; expected a positive number"):
        LLAMA.replace(rope_scaling={"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64})


@pytest.mark.parametrize("cfg", [QWEN, LLAMA], ids=["qwen2", "llama"])
def test_logits_match_transformers_rope_adjacent_pairs_on_llama_cpp_ordered_weights(cfg):
    # llama.cpp permutes q/k rows so that adjacent-pair RoPE on the permuted weights equals split-half
    # RoPE on the originals; rope_type 0 on permuted weights must give HF's logits on the originals.
    hf = hf_model(cfg)
    sd = dict(hf.state_dict())
    for name in list(sd):
        heads = cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads if ".k_proj." in name else None
        if heads:
            sd[name] = permute_rows_for_norm_rope(sd[name], heads)
    ours = Transformer(cfg.replace(rope_type=0, head_dim=cfg.head_dim), fast=False).eval()
    ours.load_state_dict({k: v for k, v in sd.items() if k in dict(ours.named_parameters())})
    x = torch.randint(0, cfg.vocab_size, (3, 29))
    with torch.no_grad():
        want = hf(x).logits
        got = ours(x)
        wrong = ours_from_hf(hf, cfg.replace(rope_type=0, head_dim=cfg.head_dim))(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    assert (wrong - want).abs().max() > 1e-2  # the permutation matters: unpermuted rows disagree


def test_row_permutation_inverse_and_layout():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)  # 2 heads of dim 8
    p = permute_rows_for_norm_rope(w, 2)
    # per head, rows (0,4),(1,5),(2,6),(3,7) become adjacent: new order 0,4,1,5,2,6,3,7
    assert p[:8, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21]
    assert torch.equal(unpermute_rows_from_norm_rope(p, 2), w)


def test_sequence_longer_than_positions_is_refused():
    cfg = preset("tiny_llama").replace(max_position_embeddings=16)
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        Transformer(cfg)(torch.zeros(1, 17, dtype=torch.int64))


# ------------------------------------------------------------------------------- configs
def _meta_param_count(cfg):
    with torch.device("meta"):
        return sum(p.numel() for p in Transformer(cfg).parameters())


def test_qwen2_0_5b_preset_is_the_published_model():
    c = PRESETS["qwen2_0_5b"]
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size,
            c.vocab_size, c.max_position_embeddings, c.rope_theta, c.rms_norm_eps, c.attention_bias,
            c.tie_word_embeddings) == (896, 24, 14, 2, 64, 4864, 151936, 32768, 1e6, 1e-6, True, True)
    # Qwen2.5-0.5B's published parameter count (tied embeddings counted once)
    assert _meta_param_count(c) == c.num_parameters() == 494_032_768


def test_llama_370m_preset_and_default():
    from apr_kernels.model import DEFAULT_PRESET

    c = PRESETS[DEFAULT_PRESET]
    assert DEFAULT_PRESET == "llama_370m"
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.intermediate_size, c.vocab_size,
            c.rope_theta, c.rms_norm_eps, c.attention_bias, c.tie_word_embeddings) == (
        1024, 24, 16, 4, 2816, 50257, 1e4, 1e-5, False, True)
    # aprender notes the tied model really has ~322M parameters (the 370M band counts lm_head twice)
    n = _meta_param_count(c)
    assert n == c.num_parameters() and 321e6 < n < 323e6
    assert c.num_parameters() + c.vocab_size * c.hidden_size == pytest.approx(373.7e6, rel=1e-3)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_round_trips_through_apr_metadata(name):
    from apr_kernels.metadata import AprModelConfig

    cfg = preset(name)
    meta = cfg.to_apr_config().to_metadata()
    assert meta["num_layers"] == cfg.num_layers and "num_hidden_layers" not in meta
    back = ModelConfig.from_apr_config(AprModelConfig.from_metadata(meta))
    assert back == cfg


def test_from_apr_config_defaults_and_refusals():
    from apr_kernels.metadata import AprModelConfig

    c = ModelConfig.from_apr_config(AprModelConfig(
        architecture="Qwen2", hidden_size=64, num_layers=1, num_heads=4, vocab_size=50, intermediate_size=96))
    assert (c.architecture, c.num_kv_heads, c.max_position_embeddings, c.rms_norm_eps, c.rope_theta,
            c.attention_bias) == ("qwen2", 4, 32768, 1e-6, 10000.0, True)
    with pytest.raises(ValueError, match=r"f\.apr: metadata lacks intermediate_size"):
        ModelConfig.from_apr_config(AprModelConfig(architecture="llama", hidden_size=64, num_layers=1,
                                                   num_heads=4, vocab_size=50), path="f.apr")
    with pytest.raises(ValueError, match=r"x\.apr: architecture family mismatch.*encoder.*decoder-only"):
        ModelConfig.from_apr_config(AprModelConfig(architecture="bert", hidden_size=64), path="x.apr")
    with pytest.raises(ValueError, match=r"num_heads=6 is not a multiple of num_kv_heads=4"):
        ModelConfig(num_heads=6, num_kv_heads=4, hidden_size=48)


def test_flops_per_token_counts_matmuls_and_attention():
    c = preset("tiny_qwen2")
    h, v, layers = c.hidden_size, c.vocab_size, c.num_layers
    q, kv, inter = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    matmul = layers * (h * q + 2 * h * kv + q * h + 3 * h * inter) + v * h
    attn_fwd = layers * 2 * 2 * 64 * q / 2  # QK^T and PV, causal half, at seq 64
    assert c.flops_per_token(64) == pytest.approx(6 * matmul + 3 * attn_fwd, rel=1e-3)


def test_gguf_names_map_to_hugging_face():
    assert hf_name("blk.3.attn_q.bias") == "model.layers.3.self_attn.q_proj.bias"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("model.norm.weight") == "model.norm.weight"


@pytest.mark.parametrize("cfg", [QWEN, LLAMA], ids=["qwen2-gqa7", "llama-gqa3"])
def test_gqa_equals_multi_head_attention_with_kv_heads_repeated(cfg):
    """aprender's polymorphic falsifier 004: a GQA model computes what the multi-head model computes
    whose K/V projections (and biases) hold each K/V head repeated for its group of query heads."""
    torch.manual_seed(5)
    gqa = Transformer(cfg, fast=False).eval()
    mha = Transformer(cfg.replace(num_kv_heads=cfg.num_heads), fast=False).eval()
    group, d = cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    state = {}
    for name, t in gqa.state_dict().items():
        if ".k_proj." in name or ".v_proj." in name:  # rows [Hkv * D, ...] -> [Hq * D, ...]
            t = t.reshape(cfg.num_kv_heads, d, *t.shape[1:]).repeat_interleave(group, 0).reshape(-1, *t.shape[1:])
        state[name] = t
    mha.load_state_dict(state)
    x = torch.randint(0, cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want, got = mha(x), gqa(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) >= 0.9999


def test_fresh_init_loss_is_about_ln_vocab():
    cfg = preset("tiny_qwen2")
    x = torch.randint(0, cfg.vocab_size, (4, 33))
    loss = Transformer(cfg, fast=False).loss(x[:, :-1], x[:, 1:])
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.2


def test_fast_path_under_bf16_autocast_keeps_an_fp32_residual_stream():
    # autocast makes attention/MLP outputs bf16 while the residual stream stays fp32; the fast path's
    # fused add+norm must take that mix and agree with the eager path (CPU autocast, ops' reference)
    cfg = preset("tiny_qwen2")
    eager = Transformer(cfg, fast=False)
    fast = Transformer(cfg, fast=True)
    fast.load_state_dict(eager.state_dict())
    x = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        la = eager.loss(x[:, :-1], x[:, 1:])
        lb = fast.loss(x[:, :-1], x[:, 1:])
    la.backward()
    lb.backward()
    assert lb.item() == pytest.approx(la.item(), rel=1e-3)
    for (name, p), q in zip(eager.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0.05, atol=5e-3, msg=name)


@pytest.mark.parametrize("name", ["tiny_qwen2", "tiny_llama"])
def test_fast_loss_fuses_the_projection_and_matches_eager(name, monkeypatch):
    """The fast path's loss goes through apr_kernels.linear_cross_entropy (never the full logits) and
    equals the eager HF expression, mean and sum, tied (Qwen2) and untied (Llama) output weights."""
    import apr_kernels

    cfg = preset(name)
    eager = Transformer(cfg, fast=False)
    fast = Transformer(cfg, fast=True)
    fast.load_state_dict(eager.state_dict())
    calls = []
    real = apr_kernels.linear_cross_entropy
    monkeypatch.setattr(apr_kernels, "linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randint(0, cfg.vocab_size, (2, 13))
    y = x[:, 1:].clone()
    y[0, :3] = -100
    for reduction in ("mean", "sum"):
        la, lb = eager.loss(x[:, :-1], y, reduction), fast.loss(x[:, :-1], y, reduction)
        assert lb.item() == pytest.approx(la.item(), rel=1e-5)
    assert len(calls) == 2
    eager.loss(x[:, :-1], y).backward()
    fast.loss(x[:, :-1], y).backward()
    for (pname, p), q in zip(eager.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=pname)


def test_fast_model_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) of the whole fast-path model (every apr:: op opaque to it) gives
    the eager loss and gradients."""
    cfg = preset("tiny_qwen2")
    model = Transformer(cfg, fast=True)
    x = torch.randint(0, cfg.vocab_size, (2, 17))
    want = model(x[:, :-1], x[:, 1:])
    want.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = torch.compile(model, fullgraph=True, backend="aot_eager")(x[:, :-1], x[:, 1:])
    got.backward()
    torch.testing.assert_close(got, want)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("name", ["tiny_llama", "tiny_qwen2_moe"])  # (the MoE layers' routing stats recomputed too)
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(name, fast):
    cfg = preset(name)
    model = Transformer(cfg, fast=fast)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    results = []
    for recompute in (False, True, "selective"):
        model.gradient_checkpointing = recompute
        model.zero_grad()
        loss = model.loss(x[:, :-1], x[:, 1:])
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    for other in results[1:]:
        assert torch.equal(results[0][0], other[0])
        for a, b in zip(results[0][1], other[1]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with torch.no_grad():  # evaluation never recomputes
        assert torch.equal(model.loss(x[:, :-1], x[:, 1:]), results[0][0])


@pytest.mark.parametrize("fast", [False, True])
def test_selective_checkpointing_recomputes_no_matmul_or_attention(fast):
    """The backward's own work is the same with and without selective checkpointing (each layer's
    matmuls and attention are kept, not re-run), while full checkpointing re-runs every one of them;
    the cheap ops (norms, SwiGLU, RoPE) are re-run by both."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.__name__.split(".")[0]
            self.ops[name] = self.ops.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    cfg = preset("tiny_qwen2")
    model = Transformer(cfg, fast=fast)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    counts = {}
    for mode in (False, True, "selective"):
        model.gradient_checkpointing = mode
        loss = model.loss(x[:, :-1], x[:, 1:])
        with Count() as c:
            loss.backward()
        counts[mode] = c.ops
    matmuls = ("mm", "addmm", "bmm", "attention_fwd", "_scaled_dot_product_flash_attention_for_cpu")
    heavy = {m: {k: v for k, v in counts[m].items() if k in matmuls} for m in counts}
    assert heavy["selective"] == heavy[False]
    assert sum(heavy[True].values()) > sum(heavy[False].values())
    def rest(m):  # everything else the backward ran
        return sum(v for k, v in counts[m].items() if k not in matmuls)

    assert rest("selective") > rest(False)  # (the cheap ops re-run)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_smoothing_and_z_loss_fast_equals_eager_and_the_formula(reduction):
    """model.loss(label_smoothing=, z_loss=): the fused path equals the eager path, and both the loss
    written out (F.cross_entropy's label smoothing plus z * logsumexp^2 over counted positions)."""
    cfg = preset("tiny_qwen2")
    eager = Transformer(cfg, fast=False)
    fast = Transformer(cfg, fast=True)
    fast.load_state_dict(eager.state_dict())
    x = torch.randint(0, cfg.vocab_size, (2, 13))
    y = x[:, 1:].clone()
    y[0, :3] = -100
    opts = {"label_smoothing": 0.1, "z_loss": 1e-2}
    la, lb = eager.loss(x[:, :-1], y, reduction, **opts), fast.loss(x[:, :-1], y, reduction, **opts)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        logits = eager(x[:, :-1]).double().flatten(0, 1)
    keep = y.flatten() != -100
    per = torch.nn.functional.cross_entropy(logits, y.flatten(), reduction="none", label_smoothing=0.1) + \
        1e-2 * torch.logsumexp(logits, -1) ** 2 * keep
    want = {"mean": per.sum() / keep.sum(), "sum": per.sum(), "none": per.view(y.shape)}[reduction]
    torch.testing.assert_close(la.double(), want, rtol=1e-5, atol=1e-6)
    assert float(per[~keep].abs().sum()) == 0  # ignored positions add nothing
    with pytest.raises(ValueError, match="not with a teacher"):
        from apr_kernels.model.distillation import Teacher

        eager.loss(x[:, :-1], y, teacher=Teacher.of(eager, x[:, :-1]), z_loss=1e-3)


def test_neftune_noise_is_transformers_hook_in_training_only():
    """model.neftune_alpha: in training mode the first layer sees the embeddings plus the noise
    transformers' neftune_post_forward_hook adds (the same draws from the same seed); in eval mode none."""
    from transformers.integrations.neftune import neftune_post_forward_hook

    cfg = preset("tiny_qwen2")
    model = Transformer(cfg, fast=False)
    model.neftune_alpha = 5.0
    seen = []
    model.model.layers[0].register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    x = torch.randint(0, cfg.vocab_size, (2, 11))
    torch.manual_seed(3)
    model.train()(x)
    emb = model.model.embed_tokens
    emb.neftune_noise_alpha = 5.0
    torch.manual_seed(3)
    with torch.no_grad():
        want = neftune_post_forward_hook(emb.train(), (x,), emb(x))
    torch.testing.assert_close(seen[0], want, rtol=0, atol=0)
    assert (seen[0] - emb(x)).abs().max() > 0  # the noise is there
    model.eval()(x)
    torch.testing.assert_close(seen[1], emb(x).detach(), rtol=0, atol=0)
