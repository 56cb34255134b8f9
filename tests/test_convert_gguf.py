"""GGUF -> APR with the `gguf` package as writer and dequantisation oracle and `transformers` as the model
oracle: a Llama file whose q/k rows carry llama.cpp's permutation, quantised tensors of many GGML
types, a tied Qwen2 file without output.weight; hostile GGUF bytes."""

import math
import os

import numpy as np
import pytest
import torch

import apr_kernels
from apr_kernels.cli import main
from apr_kernels.convert.core import convert
from apr_kernels.quant import quantize as apr_quantize
from apr_kernels.tokenizer import Tokenizer, byte_to_unicode

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
T = gguf.GGMLQuantizationType

GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
              "model.norm.weight": "output_norm.weight"}
LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}


def gguf_name(hf: str) -> str:  # written here from llama.cpp's tensor table, independent of names.py
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    _, _, n, *rest = hf.split(".")
    module, suffix = ".".join(rest[:-1]), rest[-1]
    return f"blk.{n}.{LAYER_NAMES[module]}.{suffix}"


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# byte offsets of the f16 super-block scales (d, and dmin where there is one) in GGML K-quant blocks
_K_SCALES = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q5_K: (0, 2)}


def random_k_blocks(rows: int, cols: int, qtype) -> np.ndarray:
    """Random but valid K-quant bytes (gguf cannot quantise Q2_K/Q3_K/Q5_K): finite small scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = np.random.randint(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for off in _K_SCALES[qtype]:
        data[:, off : off + 2] = np.random.uniform(1e-3, 1e-2, len(data)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return data.reshape(rows, -1)


def encode(arr: np.ndarray, qtype):
    """(bytes to write, raw dtype) for a float array [rows, cols] in GGML type qtype."""
    if qtype == T.F32:
        return arr.astype(np.float32), None
    if qtype == T.F16:
        return arr.astype(np.float16), None
    if qtype in (T.Q4_K, T.Q6_K):  # gguf cannot quantise these: APR's quantiser writes the GGML layout
        q = apr_quantize(qtype.name, torch.from_numpy(arr))
        return q.data.numpy().reshape(arr.shape[0], -1), qtype
    return gguf.quants.quantize(arr.astype(np.float32), qtype), qtype


def add_model_keys(w, cfg) -> None:
    """The ``{arch}.*`` model keys convert_hf_to_gguf.py writes for a transformers config."""
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    if getattr(cfg, "head_dim", None) and cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)


def write_gguf(path, model, arch, qtypes, tokens, merges, pre, permute, extra=None):
    """``extra(writer)`` adds more keys or tensors before the file is written."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    if extra is not None:
        extra(w)
    w.add_name(f"tiny-{arch}")
    add_model_keys(w, cfg)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_eos_token_id(len(tokens) - 1)
    reference = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: llama.cpp writes no output.weight
        arr = t.numpy().astype(np.float32)
        qtype = qtypes.get(name, T.F32)
        if qtype in _K_SCALES:
            raw = random_k_blocks(*arr.shape, qtype)
            reference[name] = gguf.quants.dequantize(raw, qtype).reshape(arr.shape)
            stored, raw_dtype = raw, qtype
        else:
            stored, raw_dtype = encode(arr, qtype)
            if raw_dtype is None:
                reference[name] = stored.astype(np.float32)
            else:  # blocks never straddle rows, so quantising the permuted rows == permuting quantised rows
                reference[name] = gguf.quants.dequantize(encode(arr, qtype)[0], qtype).reshape(arr.shape)
        heads = None
        if permute and ".q_proj." in name:
            heads = (cfg.num_attention_heads, None)
        elif permute and ".k_proj." in name:
            heads = (cfg.num_attention_heads, cfg.num_key_value_heads)
        if heads:
            if qtype in _K_SCALES:  # random bytes are the stored (permuted) rows: the model sees them unpermuted
                stored = raw
                perm = llama_cpp_permute(np.arange(arr.shape[0]), *heads)
                reference[name] = reference[name][np.argsort(perm)]
            else:
                stored, raw_dtype = encode(llama_cpp_permute(arr, *heads), qtype)
        if raw_dtype is None:
            w.add_tensor(gguf_name(name), stored)
        else:
            w.add_tensor(gguf_name(name), stored, raw_shape=stored.shape, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return reference


def small_vocab(extra_merges):
    b2u = byte_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    for m in extra_merges:
        tokens.append(m.replace(" ", ""))
    return tokens + ["<|endoftext|>"], list(extra_merges)


def reference_logits(model, reference, ids):
    ref_model = type(model)(model.config).eval()
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in reference.items()}
    missing, unexpected = ref_model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    with torch.no_grad():
        return ref_model(ids).logits


def check_model(tmp_path, apr, model, reference, vocab, seq_len=13):
    ids = torch.randint(0, vocab, (2, seq_len))
    want = reference_logits(model, reference, ids)
    out = tmp_path / "export"
    assert main(["export", str(apr), str(out), "-q"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, want, rtol=1e-4, atol=1e-4)
    from apr_kernels.model import from_apr

    ours = from_apr(apr).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).float(), want, rtol=1e-4, atol=1e-4)


_EXACT = ("F32", "F16", "BF16", "Q4_K", "Q6_K")  # kept as is through APR (others are dequantised)


def assert_gguf_round_trip(tmp_path, src, apr):
    """``apr-kernels export`` of ``apr`` (converted from the llama.cpp-style ``src``) gives back ``src``:
    every tensor of an exact type byte for byte (names, types, shapes; llama's q/k permutation
    redone), the dequantised ones as F32 of the same values, and every key of ``src`` with its value
    (the token list padded to the model's vocabulary with [PAD{i}], as llama.cpp's converter does)."""
    out = tmp_path / f"{apr.stem}.out.gguf"
    assert main(["export", str(apr), str(out), "-q"]) == 0
    a, b = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
    theirs = {t.name: t for t in a.tensors}
    ours = {t.name: t for t in b.tensors}
    assert theirs.keys() == ours.keys()
    for name, t in theirs.items():
        o = ours[name]
        assert list(o.shape) == list(t.shape), name
        if T(t.tensor_type).name in _EXACT:
            assert T(o.tensor_type) == T(t.tensor_type), name
            np.testing.assert_array_equal(np.asarray(o.data).view(np.uint8), np.asarray(t.data).view(np.uint8),
                                          err_msg=name)
        else:
            assert T(o.tensor_type) == T.F32, name
            want = gguf.quants.dequantize(np.asarray(t.data), T(t.tensor_type)).reshape(np.asarray(o.data).shape)
            np.testing.assert_array_equal(np.asarray(o.data), want, err_msg=name)
    vocab = None
    for key, field in a.fields.items():
        if key.startswith(("GGUF.", "general.")) and key != "general.architecture":
            continue
        assert key in b.fields, key
        want, got = field.contents(), b.fields[key].contents()
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
            vocab = len(got)
            assert got[:len(want)] == want, key
            pad = [f"[PAD{i}]" for i in range(len(want), len(got))] if key.endswith("tokens") \
                else [int(gguf.TokenType.UNUSED)] * (len(got) - len(want))
            assert got[len(want):] == pad, key
        else:
            assert got == (pytest.approx(want) if isinstance(want, float) else want), key
    embd = ours["token_embd.weight"]
    assert vocab == int(embd.shape[1])  # one token per embedding row
    return b


def random_model(model):
    """Fresh small random weights everywhere (norms and biases too), in eval mode."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_llama_gguf_permuted_and_quantised(tmp_path):
    cfg = transformers.LlamaConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=512, vocab_size=300, tie_word_embeddings=False,
                                   max_position_embeddings=64, rope_theta=5e5, rms_norm_eps=1e-5)
    model = random_model(transformers.LlamaForCausalLM(cfg))
    L = "model.layers.{}."
    qtypes = {
        "model.embed_tokens.weight": T.F16, "lm_head.weight": T.Q6_K,
        L.format(0) + "self_attn.q_proj.weight": T.Q4_K, L.format(0) + "self_attn.k_proj.weight": T.Q6_K,
        L.format(0) + "self_attn.v_proj.weight": T.Q8_0, L.format(0) + "self_attn.o_proj.weight": T.F16,
        L.format(0) + "mlp.gate_proj.weight": T.Q4_0, L.format(0) + "mlp.up_proj.weight": T.Q5_1,
        L.format(0) + "mlp.down_proj.weight": T.Q4_1,
        L.format(1) + "self_attn.q_proj.weight": T.Q8_0, L.format(1) + "self_attn.k_proj.weight": T.BF16,
        L.format(1) + "self_attn.v_proj.weight": T.Q5_0, L.format(1) + "self_attn.o_proj.weight": T.Q5_K,
        L.format(1) + "mlp.gate_proj.weight": T.Q3_K, L.format(1) + "mlp.up_proj.weight": T.Q2_K,
        L.format(1) + "mlp.down_proj.weight": T.Q4_K,
    }
    tokens, merges = small_vocab(["Ġ t", "h e", "Ġt he"])
    src = tmp_path / "llama.gguf"
    reference = write_gguf(src, model, "llama", qtypes, tokens, merges, "llama-bpe", permute=True)
    apr = tmp_path / "llama.apr"
    assert main(["convert", str(src), str(apr), "-q"]) == 0

    with apr_kernels.open(apr, verify=True) as f:
        meta = f.metadata
        assert meta["rope_type"] == 2 and meta["original_format"] == "gguf" and meta["tied_embeddings"] is False
        assert (meta["num_heads"], meta["num_kv_heads"], meta["head_dim"]) == (4, 2, 64)
        for name, qtype in qtypes.items():
            info = f.info(name)
            assert info.shape == tuple(model.state_dict()[name].shape), name
            if qtype.name in ("Q4_K", "Q6_K", "F16", "BF16"):
                assert info.dtype == qtype.name, name  # raw passthrough
            else:
                assert info.dtype == "F32", name  # dequantised with gguf's reference
        for name in (L.format(0) + "self_attn.q_proj.weight", L.format(0) + "self_attn.k_proj.weight"):
            # the permutation is undone on the raw blocks: gguf's own dequantiser sees HF row order
            raw = f.get_raw(name).numpy().reshape(f.info(name).shape[0], -1)
            np.testing.assert_array_equal(gguf.quants.dequantize(raw, qtypes[name]), reference[name])
    tok = Tokenizer.from_metadata(meta)
    assert tok.pre_type == "llama-bpe" and tok.eos_id == len(tokens) - 1
    assert tok.encode(" the<|endoftext|>") == [258, 259]
    check_model(tmp_path, apr, model, reference, cfg.vocab_size)
    assert_gguf_round_trip(tmp_path, src, apr)


def test_qwen2_gguf_tied_with_bias(tmp_path):
    cfg = transformers.Qwen2Config(hidden_size=224, num_hidden_layers=2, num_attention_heads=7, num_key_value_heads=1,
                                   intermediate_size=96, vocab_size=270, tie_word_embeddings=True,
                                   max_position_embeddings=64, rope_theta=1e6, rms_norm_eps=1e-6)
    model = random_model(transformers.Qwen2ForCausalLM(cfg))
    qtypes = {"model.embed_tokens.weight": T.Q8_0, "model.layers.0.self_attn.q_proj.weight": T.Q8_0,
              "model.layers.1.self_attn.k_proj.weight": T.F16, "model.layers.1.mlp.up_proj.weight": T.BF16,
              "model.layers.0.mlp.down_proj.weight": T.Q4_0}
    tokens, merges = small_vocab(["i n", "Ġ in"])
    src = tmp_path / "qwen.gguf"
    reference = write_gguf(src, model, "qwen2", qtypes, tokens, merges, "qwen2", permute=False)
    apr = tmp_path / "qwen.apr"
    convert(src, apr, progress=False)
    with apr_kernels.open(apr) as f:
        meta = f.metadata
        assert meta["tied_embeddings"] is True and meta["architecture"] == "qwen2"
        assert torch.equal(f.get_tensor("lm_head.weight"), f.get_tensor("model.embed_tokens.weight"))
        assert torch.equal(f.get_tensor("model.layers.1.self_attn.q_proj.bias"),
                           model.state_dict()["model.layers.1.self_attn.q_proj.bias"])
    assert Tokenizer.from_metadata(meta).encode("in in") == [256, 257]
    check_model(tmp_path, apr, model, reference, cfg.vocab_size)
    assert_gguf_round_trip(tmp_path, src, apr)


def test_qwen3_gguf_head_norms_and_explicit_head_dim(tmp_path):
    cfg = transformers.Qwen3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=32, intermediate_size=96, vocab_size=270, tie_word_embeddings=True,
                                   max_position_embeddings=64, rope_theta=1e6, rms_norm_eps=1e-6)
    model = random_model(transformers.Qwen3ForCausalLM(cfg))
    qtypes = {"model.layers.0.self_attn.q_proj.weight": T.Q8_0, "model.layers.1.self_attn.k_norm.weight": T.F32}
    tokens, merges = small_vocab(["i n", "Ġ in"])
    src = tmp_path / "qwen3.gguf"
    reference = write_gguf(src, model, "qwen3", qtypes, tokens, merges, "qwen2", permute=False)
    apr = tmp_path / "qwen3.apr"
    convert(src, apr, progress=False)
    with apr_kernels.open(apr) as f:
        meta = f.metadata
        assert meta["architecture"] == "qwen3" and meta["head_dim"] == 32
        assert torch.equal(f.get_tensor("model.layers.1.self_attn.k_norm.weight"),
                           model.state_dict()["model.layers.1.self_attn.k_norm.weight"])
    check_model(tmp_path, apr, model, reference, cfg.vocab_size)
    assert_gguf_round_trip(tmp_path, src, apr)


def llama_cpp_rope_freqs(head_dim, base, scaling):
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors (Llama 3.1+ rope_freqs), verbatim."""
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low_freq_factor, high_freq_factor = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(rope_factors, dtype=np.float32)


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    """A Llama 3.1-style GGUF carries no scaling keys, only llama.cpp's rope_freqs divisors: the converter
    recovers the llama3 parameters, so the APR model (and its export) computes Hugging Face's logits."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    cfg = transformers.LlamaConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=96, vocab_size=270, tie_word_embeddings=True,
                                   max_position_embeddings=512, rope_theta=1e4, rms_norm_eps=1e-5,
                                   rope_scaling=dict(scaling))
    model = random_model(transformers.LlamaForCausalLM(cfg))
    tokens, merges = small_vocab(["i n", "Ġ in"])
    src = tmp_path / "llama31.gguf"

    def rope_freqs(w):
        w.add_rope_dimension_count(32)
        w.add_tensor("rope_freqs.weight", llama_cpp_rope_freqs(32, 1e4, scaling))

    reference = write_gguf(src, model, "llama", {}, tokens, merges, "llama-bpe", permute=True, extra=rope_freqs)
    apr = tmp_path / "llama31.apr"
    convert(src, apr, progress=False)
    with apr_kernels.open(apr) as f:
        assert f.metadata["rope_scaling"] == scaling
        assert "rope_freqs.weight" not in f.keys()
    check_model(tmp_path, apr, model, reference, cfg.vocab_size, seq_len=150)
    assert_gguf_round_trip(tmp_path, src, apr)  # rope_freqs written again, equal to llama.cpp's


def test_qwen2_yarn_rope_scaling_keys(tmp_path):
    cfg = transformers.Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=96, vocab_size=270, tie_word_embeddings=True,
                                   max_position_embeddings=256, rope_theta=1e4, rms_norm_eps=1e-6,
                                   rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 64})
    model = random_model(transformers.Qwen2ForCausalLM(cfg))
    tokens, merges = small_vocab(["i n", "Ġ in"])
    src = tmp_path / "qwen-yarn.gguf"

    def yarn(w):  # what convert_hf_to_gguf.py writes for a Qwen2 config with yarn
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(64)

    reference = write_gguf(src, model, "qwen2", {}, tokens, merges, "qwen2", permute=False, extra=yarn)
    apr = tmp_path / "qwen-yarn.apr"
    convert(src, apr, progress=False)
    with apr_kernels.open(apr) as f:
        assert f.metadata["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 64}
    check_model(tmp_path, apr, model, reference, cfg.vocab_size, seq_len=150)
    assert_gguf_round_trip(tmp_path, src, apr)


@pytest.mark.parametrize("extra, message", [
    (lambda w: w.add_rope_dimension_count(8), r"rope\.dimension_count is 8; expected the head size 16 \(partial"),
    (lambda w: w.add_tensor("rope_freqs.weight", np.array([1, 1, 3, 2, 5, 8, 8, 8], np.float32)),
     r"rope_freqs\.weight' \(\[1\.0, 1\.0, 3\.0, 2\.0, 5\.0, 8\.0, 8\.0, 8\.0\]\) matches no llama3"),
    (lambda w: w.add_tensor("rope_freqs.weight", np.ones(3, np.float32)),
     r"rope_freqs\.weight' has shape \[3\].*expected 8 finite divisors >= 1"),
    (lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.YARN), w.add_rope_scaling_factor(4.0),
                w.add_rope_scaling_orig_ctx_len(64), w.add_rope_scaling_attn_factors(0.5)),
     r"rope\.scaling\.attn_factor is 0\.5; only 1\.0"),
], ids=["partial-rotary", "odd-divisors", "divisor-shape", "attn-factor"])
def test_rope_keys_that_cannot_be_honoured_are_refused(tmp_path, extra, message):
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                   intermediate_size=64, vocab_size=270, max_position_embeddings=64)
    tokens, merges = small_vocab([])
    src = tmp_path / "bad.gguf"
    write_gguf(src, random_model(transformers.LlamaForCausalLM(cfg)), "llama", {}, tokens, merges, "llama-bpe",
               permute=True, extra=extra)
    with pytest.raises(ValueError, match=message):
        convert(src, tmp_path / "bad.apr", progress=False)
    assert not (tmp_path / "bad.apr").exists()


@pytest.fixture(scope="module")
def valid_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("g") / "ok.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("embedding_length", 32), ("block_count", 1), ("attention.head_count", 4),
                       ("feed_forward_length", 64)):
        w.add_uint32(f"llama.{key}", value)
    w.add_token_list(["a", "b", "ab"])
    w.add_tensor("token_embd.weight", np.random.randn(3, 32).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(np.random.randn(32, 32).astype(np.float32), T.Q8_0),
                 raw_shape=(32, 34), raw_dtype=T.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def _mutations(data: bytes) -> dict:
    def patch(offset, new):
        return data[:offset] + new + data[offset + len(new):]

    return {
        "empty": b"",
        "magic": patch(0, b"GGUX"),
        "version": patch(4, b"\x63\x00\x00\x00"),
        "huge_kv_count": patch(16, b"\xff" * 8),
        "huge_string_len": patch(24, b"\xff" * 7 + b"\x7f"),
        "header_cut": data[:40],
        "tensor_info_cut": data[: len(data) // 3],
        "tensor_data_cut": data[:-100],
    }


def test_hostile_gguf_one_line_no_output(tmp_path, capsys, valid_gguf):
    ok = tmp_path / "ok.gguf"
    ok.write_bytes(valid_gguf)
    assert main(["convert", str(ok), str(tmp_path / "ok.apr"), "-q"]) == 0
    (tmp_path / "ok.apr").unlink()
    capsys.readouterr()
    for case, data in _mutations(valid_gguf).items():
        bad = tmp_path / f"bad_{case}.gguf"
        bad.write_bytes(data)
        dst = tmp_path / "out.apr"
        assert main(["convert", str(bad), str(dst), "-q"]) == 1, case
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and bad.name in err[0], (case, err)
        assert not dst.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")], case


def _small_gguf(path, heads: int = 4, extra=()) -> None:
    """valid_gguf's layout with ``heads`` attention heads and ``extra`` (name, array) tensors."""
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("embedding_length", 32), ("block_count", 1), ("attention.head_count", heads),
                       ("feed_forward_length", 64)):
        w.add_uint32(f"llama.{key}", value)
    w.add_token_list(["a", "b", "ab"])
    w.add_tensor("token_embd.weight", np.random.randn(3, 32).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.random.randn(32, 32).astype(np.float32))
    for name, arr, *raw in extra:  # (raw: the GGML type of bytes ``arr``)
        w.add_tensor(name, arr, raw_shape=arr.shape if raw else None, raw_dtype=raw[0] if raw else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_empty_tensor_converts_and_q_rows_that_do_not_fit_the_heads_are_named(tmp_path):
    """A tensor with a 0-long dimension converts to an empty tensor (was a RuntimeError viewing its 0 bytes,
    or the gguf package's error dequantising 0 blocks, neither naming the file); q rows that are not
    heads x an even head_dim raise naming the file and the tensor (was an error naming neither, once
    the tensor was read)."""
    _small_gguf(tmp_path / "empty.gguf", extra=[("output_norm.weight", np.zeros((0, 32), np.float32)),
                                                ("blk.0.attn_v.weight", np.zeros((0, 34), np.uint8), T.Q8_0)])
    convert(tmp_path / "empty.gguf", tmp_path / "empty.apr", progress=False)
    tensors = apr_kernels.load(tmp_path / "empty.apr")
    assert tensors["model.norm.weight"].shape == tensors["model.layers.0.self_attn.v_proj.weight"].shape == (0, 32)
    _small_gguf(tmp_path / "heads.gguf", heads=5)
    with pytest.raises(ValueError, match=r"heads\.gguf: tensor 'blk\.0\.attn_q\.weight' has shape \[32, 32\]; "
                                         r"expected heads x head_dim rows \(5 heads"):
        convert(tmp_path / "heads.gguf", tmp_path / "heads.apr", progress=False)


def test_randomly_damaged_gguf_is_refused_by_name_or_converts(tmp_path, valid_gguf):
    """valid_gguf with one to four random edits, mostly in its header, metadata and tensor infos (bits,
    bytes, 8-byte counts and sizes, a cut): ``convert`` raises a ``ValueError`` naming the file, or
    writes an APR file that opens. (Found: the two cases of the test above.)"""
    import random

    rng, outcomes = random.Random(11), {"refused": 0, "converted": 0}
    src, dst = tmp_path / "damaged.gguf", tmp_path / "damaged.apr"
    head = len(valid_gguf) - 32 * 34 - 3 * 32 * 4  # (the bytes before the tensor data, about)
    for _ in range(600):
        data = bytearray(valid_gguf)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(max(1, min(len(data), head) if rng.random() < 0.8 else len(data)))
            how = rng.random()
            if how < 0.4:
                data[at] ^= 1 << rng.randrange(8)
            elif how < 0.6:
                data[at] = rng.randrange(256)
            elif how < 0.9:
                data[at:at + 8] = rng.choice([0, 1, 7, 255, 2**31, 2**32 - 1, 2**63, 2**64 - 1]).to_bytes(8, "little")
            else:
                data = data[:at]
        src.write_bytes(bytes(data))
        dst.unlink(missing_ok=True)
        try:
            convert(src, dst, progress=False)
        except ValueError as exc:
            assert "damaged.gguf" in str(exc), exc
            outcomes["refused"] += 1
            continue
        apr_kernels.open(dst).close()
        outcomes["converted"] += 1
    assert outcomes["refused"] > 200 and outcomes["converted"] > 20, outcomes


def test_unsupported_architecture_named(tmp_path, capsys):
    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((3, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert main(["convert", str(path), str(tmp_path / "o.apr"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "general.architecture is 'gpt2'" in err and "gpt2.gguf" in err


def test_export_merges_lora_and_casts_to_the_asked_dtype(tmp_path):
    """A LoRA checkpoint exported to GGUF holds the merged weights (read back, the model computes what
    from_apr's merge computes); --dtype f16 writes 2-D tensors as F16 and keeps norms F32; a
    bf16 file keeps BF16."""
    from apr_kernels.model import Transformer, from_apr, preset
    from apr_kernels.model.lora import add_lora, lora_modules
    from apr_kernels.train.checkpoint import save_checkpoint
    from apr_kernels.train.cli import byte_tokenizer

    cfg = preset("tiny_llama")
    torch.manual_seed(0)
    model = Transformer(cfg, fast=False)
    add_lora(model, 4, 8)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.05)
    ck = tmp_path / "lora.apr"
    save_checkpoint(ck, model=model, tokenizer=byte_tokenizer())
    x = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        want = from_apr(ck, fast=False)(x)
    for dtype, matrix_type in (("keep", T.F32), ("f16", T.F16)):
        out = tmp_path / f"lora-{dtype}.gguf"
        assert main(["export", str(ck), str(out), "--dtype", dtype, "-q"]) == 0
        types = {t.name: T(t.tensor_type) for t in gguf.GGUFReader(str(out)).tensors}
        assert types["blk.0.attn_q.weight"] == matrix_type and types["blk.0.attn_norm.weight"] == T.F32
        assert not any("lora" in n for n in types)
        back = tmp_path / f"back-{dtype}.apr"
        convert(out, back, progress=False)
        with torch.no_grad():
            tol = 1e-5 if dtype == "keep" else 2e-2
            torch.testing.assert_close(from_apr(back, fast=False)(x), want, rtol=tol, atol=tol)
    bf = tmp_path / "bf16.apr"
    with apr_kernels.open(back) as f:
        apr_kernels.save({k: f.get_tensor(k).to(torch.bfloat16) for k in f.keys()}, bf, metadata=f.metadata)
    out = tmp_path / "bf16.gguf"
    assert main(["export", str(bf), str(out), "-q"]) == 0
    types = {t.name: T(t.tensor_type) for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.1.ffn_up.weight"] == T.BF16
    assert main(["export", str(bf), str(out), "-q"]) == 1  # never overwrites


def test_export_writes_aprenders_typed_chat_template(tmp_path):
    """An APR file whose chat template is only aprender's typed top-level ``chat_template`` (spec
    5.2) exports it as the GGUF file's ``tokenizer.chat_template``."""
    from apr_kernels.model import Transformer, preset
    from apr_kernels.train.checkpoint import save_checkpoint
    from apr_kernels.train.cli import byte_tokenizer

    ck = tmp_path / "m.apr"
    save_checkpoint(ck, model=Transformer(preset("tiny_llama"), fast=False), tokenizer=byte_tokenizer())
    with apr_kernels.open(ck) as f:
        meta, tensors = dict(f.metadata), {k: f.get_tensor(k) for k in f.keys()}
    assert "tokenizer.chat_template" not in meta
    for name, extra in (("plain", {}), ("typed", {"chat_template": "{{ messages[0]['content'] }}"})):
        apr_kernels.save(tensors, tmp_path / f"{name}.apr", metadata={**meta, **extra})
        assert main(["export", str(tmp_path / f"{name}.apr"), str(tmp_path / f"{name}.gguf"), "-q"]) == 0
    fields = {n: gguf.GGUFReader(str(tmp_path / f"{n}.gguf")).fields for n in ("plain", "typed")}
    assert "tokenizer.chat_template" not in fields["plain"]
    field = fields["typed"]["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == "{{ messages[0]['content'] }}"
