"""Mixture-of-experts models through the converters, with `transformers` as the oracle: tiny Qwen3-MoE,
Qwen2-MoE (shared expert, a dense layer) and Mixtral models built offline -> `convert` -> `from_apr`
(logits) -> `export` -> `from_pretrained` (logits, config); llama.cpp-layout MoE GGUF files (stacked and
per-expert, quantised experts) -> `convert` -> the logits of transformers holding the same weights;
GGUF export back to llama.cpp's layout; refusals: expert keys on a dense model_type, an MoE config
without its expert count, experts in a GGUF of another architecture."""

import json

import numpy as np
import pytest
import torch

import apr_kernels
from apr_kernels.cli import main
from apr_kernels.convert.hf import config_metadata
from apr_kernels.convert.hf_tokenizer import write_hf_tokenizer
from apr_kernels.model import from_apr

transformers = pytest.importorskip("transformers")
from test_convert_hf import _randomised, logits, small_tokenizer  # noqa: E402

COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              num_experts_per_tok=2, vocab_size=301, max_position_embeddings=128, rms_norm_eps=1e-6)


def tiny(family: str, **extra):
    """A randomised tiny transformers model of ``family`` (``extra``: config overrides)."""
    if family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**{**COMMON, "head_dim": 8, "num_experts": 4, "moe_intermediate_size": 16,
                                             "norm_topk_prob": True, **extra})
        return _randomised(transformers.Qwen3MoeForCausalLM(cfg))
    if family == "qwen2_moe":
        cfg = transformers.Qwen2MoeConfig(**{**COMMON, "num_experts": 4, "moe_intermediate_size": 16,
                                             "shared_expert_intermediate_size": 24, "mlp_only_layers": [1], **extra})
        return _randomised(transformers.Qwen2MoeForCausalLM(cfg))
    cfg = transformers.MixtralConfig(**{**COMMON, "num_local_experts": 4, **extra})
    return _randomised(transformers.MixtralForCausalLM(cfg))


# the config.json MoE fields that must survive HF -> APR -> HF (read through each config class)
MOE_FIELDS = {
    "qwen3_moe": ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                  "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef", "attention_bias", "sliding_window"),
    "qwen2_moe": ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                  "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef", "qkv_bias",
                  "sliding_window", "layer_types"),
    "mixtral": ("num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "sliding_window"),
}

CASES = {
    "qwen3_moe": ("qwen3_moe", dict(router_aux_loss_coef=0.01)),
    # every second layer sparse (layers 0 and 2 dense), every layer windowed, tied
    "qwen3_moe-step2-window": ("qwen3_moe", dict(num_hidden_layers=3, decoder_sparse_step=2, norm_topk_prob=False,
                                                 use_sliding_window=True, sliding_window=4, tie_word_embeddings=True)),
    "qwen2_moe": ("qwen2_moe", dict(tie_word_embeddings=True)),
    # the second layer windowed (as layer_types says, which transformers writes into config.json)
    "qwen2_moe-window": ("qwen2_moe", dict(mlp_only_layers=[], norm_topk_prob=True, use_sliding_window=True,
                                           sliding_window=4, layer_types=["full_attention", "sliding_attention"])),
    "mixtral-window": ("mixtral", dict(sliding_window=4, router_aux_loss_coef=0.02)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_convert_then_export_round_trip(tmp_path, case, capsys):
    from safetensors import safe_open

    family, extra = CASES[case]
    model = tiny(family, **extra)
    hc = model.config
    src = tmp_path / "hf"
    model.save_pretrained(src)
    write_hf_tokenizer(small_tokenizer(), src)
    apr = tmp_path / "m.apr"
    assert main(["convert", str(src), str(apr), "-q"]) == 0

    # the tensors are the saved ones, one per expert, under their Hugging Face names
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        saved = {name: f.get_tensor(name) for name in f.keys()}
    if hc.tie_word_embeddings:
        saved["lm_head.weight"] = saved["model.embed_tokens.weight"]  # spec 10.4: a physical copy
    got = apr_kernels.load(apr)
    assert sorted(got) == sorted(saved)
    assert all(torch.equal(got[n], t) for n, t in saved.items())
    expert = ("model.layers.1.block_sparse_moe.experts.3.w2.weight" if family == "mixtral"
              else f"model.layers.{1 if family == 'qwen3_moe' else 0}.mlp.experts.3.down_proj.weight")
    assert expert in got

    with apr_kernels.open(apr, verify=True) as f:
        meta = f.metadata
    assert (meta["architecture"], meta["num_experts"], meta["num_experts_per_tok"]) == (family, 4, 2)
    assert meta["moe_intermediate_size"] == (hc.intermediate_size if family == "mixtral" else hc.moe_intermediate_size)
    assert meta["router_aux_loss_coef"] == pytest.approx(hc.router_aux_loss_coef)
    if family != "mixtral":
        assert (meta["norm_topk_prob"], meta["decoder_sparse_step"], meta["mlp_only_layers"]) == (
            hc.norm_topk_prob, hc.decoder_sparse_step, hc.mlp_only_layers)
    assert meta.get("shared_expert_intermediate_size") == (24 if family == "qwen2_moe" else None)
    assert "num_local_experts" not in meta  # one spelling (spec 5.3)

    ids = torch.randint(0, hc.vocab_size, (2, 11))  # longer than the windows
    want = logits(model, ids)
    with torch.no_grad():
        ours = from_apr(apr, fast=False)(ids)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)

    out = tmp_path / "export"
    assert main(["export", str(apr), str(out), "-q"]) == 0
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(again) is type(model)
    # (the same weights; transformers' expert dispatch may add the experts' outputs in another order)
    torch.testing.assert_close(logits(again, ids), want, rtol=1e-6, atol=1e-6)
    for field in MOE_FIELDS[family] + ("tie_word_embeddings", "intermediate_size", "num_hidden_layers"):
        assert getattr(again.config, field) == getattr(hc, field), field

    capsys.readouterr()
    assert main(["inspect", str(apr)]) == 0  # the model config shows the experts
    text = capsys.readouterr().out
    assert "num_experts: 4" in text and "num_experts_per_tok: 2" in text


def test_moe_config_refusals_name_the_file_and_key(tmp_path, capsys):
    path = tmp_path / "config.json"

    def meta(cfg):
        return config_metadata(cfg, path)

    qwen3 = tiny("qwen3_moe").config.to_dict()
    assert "num_local_experts" in qwen3 and "num_experts" not in qwen3  # transformers 5 writes this spelling
    assert meta(qwen3)["num_experts"] == 4
    hub = {k: v for k, v in qwen3.items() if k != "num_local_experts"} | {"num_experts": 4}  # the Hub's spelling
    assert meta(hub)["num_experts"] == 4

    cases = [
        ({k: v for k, v in qwen3.items() if k != "num_local_experts"}, "num_experts is missing"),
        ({k: v for k, v in tiny("mixtral").config.to_dict().items() if k != "num_local_experts"},
         "num_local_experts is missing"),
        ({**qwen3, "num_experts_per_tok": 5}, "num_experts_per_tok is 5, more than the 4 experts"),
        ({**qwen3, "num_experts": 6}, "num_experts is 6 and num_local_experts is 4"),
        ({**qwen3, "moe_intermediate_size": None}, "moe_intermediate_size is None"),
        ({**qwen3, "mlp_only_layers": [1, -1]}, "mlp_only_layers is [1, -1]"),
        ({**tiny("qwen2_moe").config.to_dict(), "shared_expert_intermediate_size": 0},
         "shared_expert_intermediate_size is 0"),
        ({**transformers.Qwen2Config(**{k: v for k, v in COMMON.items() if k != "num_experts_per_tok"}).to_dict(),
          "num_experts": 8}, "num_experts is 8 but model_type 'qwen2' is a dense family"),
        ({**transformers.MistralConfig().to_dict(), "num_local_experts": 8},
         "num_local_experts is 8 but model_type 'mistral' is a dense family"),
        # Qwen2-MoE's own window rule (even-numbered layers below max_window_layers) is not full-then-windowed
        ({**{k: v for k, v in tiny("qwen2_moe").config.to_dict().items() if k != "layer_types"},
          "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2}, "windows the even-numbered layers"),
    ]
    for cfg, message in cases:
        with pytest.raises(ValueError, match="config.json: .*" + message.replace("[", r"\[").replace("]", r"\]")):
            meta(cfg)

    # through the command: one line naming the file and the key, nothing written
    src = tmp_path / "dense"
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        **{k: v for k, v in COMMON.items() if k != "num_experts_per_tok"}))
    model.save_pretrained(src)
    data = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**data, "num_experts": 8}))
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "d.apr"), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{src / 'config.json'}: num_experts is 8" in err[0], err
    assert not (tmp_path / "d.apr").exists()


def test_qwen2_moe_without_qkv_bias_loads_and_exports_as_it_came(tmp_path, capsys):
    """qkv_bias=false: converted as it is, loaded without biases (the tensors decide, as Qwen2-MoE's
    config switch does) with transformers' logits, and exported back with qkv_bias false."""
    model = tiny("qwen2_moe", qkv_bias=False)
    model.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.apr"), "-q"]) == 0
    ids = torch.randint(0, 301, (1, 7))
    ours = from_apr(tmp_path / "m.apr", fast=False).eval()
    assert not ours.config.attention_bias
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    assert main(["export", str(tmp_path / "m.apr"), str(tmp_path / "out"), "-q"]) == 0
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert again.config.qkv_bias is False
    torch.testing.assert_close(logits(again, ids), logits(model, ids), rtol=1e-6, atol=1e-6)


def _gguf(path, arch, expert_count=None, tensors=()):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (("embedding_length", 32), ("block_count", 1), ("attention.head_count", 4),
                       ("feed_forward_length", 64)):
        w.add_uint32(f"{arch}.{key}", value)
    if expert_count is not None:
        w.add_expert_count(expert_count)
        w.add_expert_used_count(min(2, expert_count))
    w.add_token_list(["a", "b", "ab"])
    w.add_tensor("token_embd.weight", np.random.randn(3, 32).astype(np.float32))
    for name, shape in tensors:
        w.add_tensor(name, np.random.randn(*shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_moe_gguf_without_a_moe_architecture_refused(tmp_path, capsys):
    """Experts in a file whose architecture has no mixture-of-experts kind here (qwen2 with an expert
    count, or with stacked experts) are refused by name, nothing written; a llama file that says it
    has no experts converts."""
    exps = [("blk.0.ffn_gate_inp.weight", (4, 32)), ("blk.0.ffn_up_exps.weight", (4, 64, 32))]
    cases = {
        "count.gguf": (_gguf(tmp_path / "count.gguf", "qwen2", 4, exps), "qwen2.expert_count is 4"),
        "stacked.gguf": (_gguf(tmp_path / "stacked.gguf", "qwen2", None, exps), "'blk.0.ffn_gate_inp.weight'"),
    }
    capsys.readouterr()
    for name, (path, needle) in cases.items():
        assert main(["convert", str(path), str(tmp_path / "out.apr"), "-q"]) == 1, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and name in err[0] and needle in err[0], (name, err)
        assert "expected llama (Mixtral), qwen2moe or qwen3moe" in err[0]
        assert not (tmp_path / "out.apr").exists()
    ok = _gguf(tmp_path / "dense.gguf", "llama", 0)
    assert main(["convert", str(ok), str(tmp_path / "dense.apr"), "-q"]) == 0


def test_hostile_moe_gguf_counts_are_refused_at_once(tmp_path, capsys):
    """A billion experts of no bytes each (a stacked tensor [1e9, 0, 0]) is refused in about a second
    with one line, never turned into a billion tensors."""
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "hostile.gguf"
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    for key, value in (("embedding_length", 32), ("block_count", 1), ("attention.head_count", 4),
                       ("expert_feed_forward_length", 8)):
        w.add_uint32(f"qwen3moe.{key}", value)
    w.add_expert_count(10**9)
    w.add_expert_used_count(2)
    w.add_token_list(["a", "b"])
    w.add_tensor("token_embd.weight", np.zeros((2, 32), np.float32))
    w.add_tensor("blk.0.ffn_up_exps.weight", np.zeros((1, 0, 0), np.float32), raw_shape=(10**9, 0, 0),
                 raw_dtype=gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    capsys.readouterr()
    assert main(["convert", str(path), str(tmp_path / "h.apr"), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'blk.0.ffn_up_exps.weight' has shape [1000000000, 0, 0]" in err[0], err
    assert not (tmp_path / "h.apr").exists()


# llama.cpp's spelling of each family and of its MoE tensors (from convert_hf_to_gguf.py / gguf-py's
# tensor table, written out here independently of the converter)
GGUF_ARCH = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "mixtral": "llama"}


def write_moe_gguf(path, model, family, expert_qtype=None, per_expert=False):
    """``model`` (a transformers MoE model) as llama.cpp writes it: experts stacked per projection
    ([experts, out, in]; ``per_expert``: the older one-tensor-per-expert Mixtral layout), the router
    as ffn_gate_inp, Qwen2-MoE's shared expert as *_shexp, Mixtral's q/k rows permuted. Experts in
    ``expert_qtype`` (Q8_0 through gguf, Q4_K through APR's quantiser); returns the weights the file
    holds, dequantised, under the model's own names."""
    from test_convert_gguf import add_model_keys, encode, gguf_name, llama_cpp_permute, small_vocab

    gguf = pytest.importorskip("gguf")
    cfg = model.config
    arch = GGUF_ARCH[family]
    w = gguf.GGUFWriter(str(path), arch)
    add_model_keys(w, cfg)
    experts = cfg.num_local_experts if family == "mixtral" else cfg.num_experts
    w.add_expert_count(experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if family != "mixtral":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if family == "qwen2_moe":
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    tokens, merges = small_vocab(["a b"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([1] * len(tokens))
    reference = {}

    def add(name, arr, qtype=None):
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if qtype is None:
            w.add_tensor(name, arr)
            return arr
        flat = arr.reshape(-1, arr.shape[-1])
        stored, raw = encode(flat, qtype)
        w.add_tensor(name, stored.reshape(*arr.shape[:-1], -1), raw_shape=(*arr.shape[:-1], stored.shape[-1]),
                     raw_dtype=raw)
        return gguf.quants.dequantize(stored, raw).reshape(arr.shape)

    for name, t in model.state_dict().items():
        arr = t.numpy()
        parts = name.split(".")
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if ".experts.gate_up_proj" in name or ".experts.down_proj" in name:
            n = parts[2]
            if name.endswith("gate_up_proj"):
                inter = arr.shape[1] // 2
                stacks = {"gate": arr[:, :inter], "up": arr[:, inter:]}
            else:
                stacks = {"down": arr}
            got = {}
            for proj, stack in stacks.items():
                if per_expert:
                    got[proj] = np.stack([add(f"blk.{n}.ffn_{proj}.{e}.weight", stack[e], expert_qtype)
                                          for e in range(experts)])
                else:
                    got[proj] = add(f"blk.{n}.ffn_{proj}_exps.weight", stack, expert_qtype)
            reference[name] = (np.concatenate([got["gate"], got["up"]], 1) if "gate" in got else got["down"])
        elif name.endswith(".mlp.gate.weight"):
            reference[name] = add(f"blk.{parts[2]}.ffn_gate_inp.weight", arr)
        elif ".shared_expert_gate." in name:
            reference[name] = add(f"blk.{parts[2]}.ffn_gate_inp_shexp.weight", arr)  # [1, hidden], as llama.cpp
        elif ".shared_expert." in name:
            reference[name] = add(f"blk.{parts[2]}.ffn_{parts[5][:-5]}_shexp.weight", arr)
        else:
            stored = arr
            if family == "mixtral" and ".q_proj." in name:
                stored = llama_cpp_permute(arr, cfg.num_attention_heads)
            elif family == "mixtral" and ".k_proj." in name:
                stored = llama_cpp_permute(arr, cfg.num_attention_heads, cfg.num_key_value_heads)
            add(gguf_name(name), stored)
            reference[name] = arr
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return reference


GGUF_CASES = {
    "qwen3_moe": ("qwen3_moe", {}, None, False),
    # shared expert, dequantised experts (rows of whole 32-value Q8_0 blocks); and with a dense layer,
    # which imports but is not exported (llama.cpp's qwen2moe would not load it)
    "qwen2_moe": ("qwen2_moe", dict(moe_intermediate_size=32, mlp_only_layers=[]), "Q8_0", False),
    "qwen2_moe-dense": ("qwen2_moe", dict(moe_intermediate_size=32), "Q8_0", False),
    "mixtral": ("mixtral", {}, None, False),
    "mixtral-per-expert": ("mixtral", {}, "Q8_0", True),
    # Q4_K experts (rows of 256 values) stay raw blocks: each expert's slice of the stacked bytes
    "qwen3_moe-q4k": ("qwen3_moe", dict(hidden_size=256, moe_intermediate_size=256, head_dim=64), "Q4_K", False),
}


@pytest.mark.parametrize("case", GGUF_CASES)
def test_moe_gguf_import_matches_transformers(tmp_path, case):
    """llama.cpp-layout MoE GGUF files -> convert -> from_apr: the logits of transformers' model holding
    the file's (dequantised) weights; every expert under its Hugging Face name; the routing settings
    read from llama.cpp's keys; Q4_K expert slices kept as raw blocks, byte for byte."""
    gguf = pytest.importorskip("gguf")
    family, extra, qtype, per_expert = GGUF_CASES[case]
    model = tiny(family, **extra).eval()
    T = gguf.GGMLQuantizationType
    reference = write_moe_gguf(tmp_path / "m.gguf", model, family, T[qtype] if qtype else None, per_expert)
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "m.apr"), "-q"]) == 0
    want = type(model)(model.config).eval()
    want.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in reference.items()}, strict=False)
    if model.config.tie_word_embeddings:
        want.tie_weights()
    ours = from_apr(tmp_path / "m.apr", fast=False).eval()
    ids = torch.randint(0, 257, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), want(ids).logits, rtol=1e-4, atol=1e-4)
    ffn = "block_sparse_moe" if family == "mixtral" else "mlp"
    up = "w3" if family == "mixtral" else "up_proj"
    with apr_kernels.open(tmp_path / "m.apr") as f:
        meta = f.metadata
        assert meta["architecture"] == family and meta["num_experts"] == 4 and meta["num_experts_per_tok"] == 2
        assert f"model.layers.0.{ffn}.experts.3.{up}.weight" in f.keys()
        assert f"model.layers.0.{ffn}.gate.weight" in f.keys()
        if family == "qwen2_moe":
            assert meta["mlp_only_layers"] == extra.get("mlp_only_layers", [1])
            assert meta["shared_expert_intermediate_size"] == 24
            assert meta["norm_topk_prob"] is False
        if qtype == "Q4_K":  # raw blocks: expert 2's slice of the stacked tensor, byte for byte
            assert f.info(f"model.layers.0.{ffn}.experts.2.{up}.weight").dtype == "Q4_K"
            r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
            stack = next(t for t in r.tensors if t.name == "blk.0.ffn_up_exps.weight")
            each = len(np.asarray(stack.data).reshape(-1).view(np.uint8)) // 4
            raw = np.asarray(stack.data).reshape(-1).view(np.uint8)[2 * each:3 * each]
            np.testing.assert_array_equal(f.get_raw(f"model.layers.0.{ffn}.experts.2.{up}.weight").numpy(), raw)


@pytest.mark.parametrize("case", [c for c in GGUF_CASES if not GGUF_CASES[c][3] and not c.endswith("-dense")])
def test_moe_gguf_export_gives_back_the_llama_cpp_file(tmp_path, case):
    """GGUF -> APR -> export GGUF: llama.cpp's file again, its stacked experts (raw Q4_K blocks
    concatenated byte for byte; dequantised Q8_0 experts as F32 of the same values), router, shared
    expert and every key."""
    from test_convert_gguf import assert_gguf_round_trip

    gguf = pytest.importorskip("gguf")
    family, extra, qtype, _ = GGUF_CASES[case]
    src = tmp_path / "m.gguf"
    write_moe_gguf(src, tiny(family, **extra), family, gguf.GGMLQuantizationType[qtype] if qtype else None)
    assert main(["convert", str(src), str(tmp_path / "m.apr"), "-q"]) == 0
    out = assert_gguf_round_trip(tmp_path, src, tmp_path / "m.apr")
    assert any(t.name == "blk.0.ffn_down_exps.weight" for t in out.tensors)


def test_moe_gguf_export_refuses_dense_layers_llama_cpp_would_not_load(tmp_path):
    """A Qwen2-MoE whose layer 1 is dense (mlp_only_layers): llama.cpp's qwen2moe loads a model only
    when every layer has a router (checked with llama.cpp itself: "tensor 'blk.1.ffn_gate_inp.weight'
    not found"), so no such file is written."""
    from apr_kernels.convert.gguf_out import export_gguf
    from apr_kernels.model import Transformer, preset
    from apr_kernels.train.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "m.apr", model=Transformer(preset("tiny_qwen2_moe"), fast=False))
    with pytest.raises(ValueError, match=r"layers \[1\] are dense .* llama.cpp's qwen2moe loads a model only "
                                         r"when every layer routes to experts"):
        export_gguf(tmp_path / "m.apr", tmp_path / "m.gguf", progress=False)
    assert not (tmp_path / "m.gguf").exists()


def test_moe_gguf_export_of_a_bf16_model_imports_back_exactly(tmp_path):
    """A bf16 Qwen2-MoE APR file (shared expert) -> GGUF: each layer's experts stacked as BF16 (not widened),
    the shared gate a vector; imported again, the same logits. (transformers' own GGUF loader cannot be
    the oracle here: it does not read expert_feed_forward_length.)"""
    gguf = pytest.importorskip("gguf")
    from apr_kernels.model import Transformer, preset
    from apr_kernels.train.checkpoint import save_checkpoint
    from apr_kernels.train.cli import byte_tokenizer

    cfg = preset("tiny_qwen2_moe").replace(mlp_only_layers=())
    torch.manual_seed(0)
    model = Transformer(cfg, fast=False).to(torch.bfloat16).eval()
    save_checkpoint(tmp_path / "m.apr", model=model, tokenizer=byte_tokenizer())
    assert main(["export", str(tmp_path / "m.apr"), str(tmp_path / "m.gguf"), "-q"]) == 0
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    stack = tensors["blk.1.ffn_up_exps.weight"]
    assert gguf.GGMLQuantizationType(stack.tensor_type).name == "BF16"
    assert [int(d) for d in reversed(stack.shape.tolist())] == [cfg.num_experts, cfg.moe_intermediate_size,
                                                                 cfg.hidden_size]
    # the router and shared-expert gate in F32 whatever the model's dtype, [1, hidden] (llama.cpp's converter)
    for name in ("blk.0.ffn_gate_inp.weight", "blk.0.ffn_gate_inp_shexp.weight"):
        assert gguf.GGMLQuantizationType(tensors[name].tensor_type).name == "F32", name
    assert list(tensors["blk.0.ffn_gate_inp_shexp.weight"].shape) == [cfg.hidden_size, 1]
    fields = gguf.GGUFReader(str(tmp_path / "m.gguf")).fields  # labelled as llama.cpp's converter labels it
    assert fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_BF16)
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "back.apr"), "-q"]) == 0
    again = from_apr(tmp_path / "back.apr", fast=False, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 257, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize("preset_name", ["tiny_qwen3_moe", "tiny_mixtral", "tiny_qwen2_moe"])
def test_moe_lora_adapter_export(tmp_path, capsys, preset_name):
    """export --adapter of a LoRA run on an MoE model: PEFT puts the per-expert adapters on transformers'
    stacked experts (Mixtral's w1/w2/w3 named in target_modules) and computes what from_apr computes;
    Qwen2-MoE's expert adapters, which PEFT drops, are refused."""
    peft = pytest.importorskip("peft")
    from apr_kernels.model import Transformer, preset
    from apr_kernels.model.lora import add_lora, lora_modules
    from apr_kernels.train.checkpoint import save_checkpoint
    from apr_kernels.train.cli import byte_tokenizer

    model = Transformer(preset(preset_name), fast=False)
    save_checkpoint(tmp_path / "base.apr", model=model, tokenizer=byte_tokenizer())
    assert main(["export", str(tmp_path / "base.apr"), str(tmp_path / "base"), "-q"]) == 0
    add_lora(model, 4, 8)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.05)
    save_checkpoint(tmp_path / "lora.apr", model=model, tokenizer=byte_tokenizer())
    capsys.readouterr()
    code = main(["export", str(tmp_path / "lora.apr"), str(tmp_path / "adapter"), "--adapter", "-q"])
    if preset_name == "tiny_qwen2_moe":
        assert code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "adapters on the experts" in err[0] and "without --adapter" in err[0], err
        assert not (tmp_path / "adapter").exists()
        return
    assert code == 0
    targets = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert {"w1", "w2", "w3"} <= set(targets) if preset_name == "tiny_mixtral" else "gate_proj" in targets
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        want = from_apr(tmp_path / "lora.apr", fast=False)(x)
        base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
        assert (base(x).logits - want).abs().max() > 1e-2  # the adapters matter
        got = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
