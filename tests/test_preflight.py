"""``from_apr`` preflight: each check made to fail on purpose, with its message asserted; plus the
cases that must pass (extra tensors, GGUF names, tokenizer vocab == model vocab, quantised weights)."""

import pytest
import torch

import apr_kernels
from apr_kernels.model import ModelConfig, Transformer, from_apr, preset
from apr_kernels.model.loading import PreflightError, check_tokenizer_vocab
from apr_kernels.train.checkpoint import model_metadata, model_tensors
from apr_kernels.train.cli import byte_tokenizer


def save_model(path, model, *, tokenizer=None, drop=(), replace=None, extra=None, meta=None):
    tensors = dict(model_tensors(model))
    for name in drop:
        tensors.pop(name)
    tensors.update(replace or {})
    tensors.update(extra or {})
    metadata = model_metadata(model, tokenizer)
    metadata.update(meta or {})
    apr_kernels.save(tensors, path, metadata=metadata)
    return path


def logits(model, seed=0):
    x = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture
def qwen():
    torch.manual_seed(1)
    return Transformer(preset("tiny_qwen2"), fast=False)


def test_round_trip_extra_tensors_ignored(tmp_apr, qwen):
    # the tied lm_head copy and unrelated / training-state tensors are not model parameters
    save_model(tmp_apr, qwen, extra={"junk.scale": torch.ones(3), "__training__.foo": torch.zeros(2)})
    with apr_kernels.open(tmp_apr) as f:
        assert "lm_head.weight" in f and f.metadata["tied_embeddings"] is True
    model = from_apr(tmp_apr)
    assert model.config == qwen.config
    assert all(p.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(logits(model), logits(qwen), rtol=0, atol=0)


def test_encoder_file_is_refused(tmp_apr):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=37)
    bert = transformers.BertModel(cfg)
    meta = {"architecture": "bert", "hf_architecture": "BertModel", "model_type": "bert", "hidden_size": 32,
            "num_layers": 2, "num_heads": 4, "vocab_size": 99, "intermediate_size": 37}
    apr_kernels.save({k: v.contiguous() for k, v in bert.state_dict().items()}, tmp_apr, metadata=meta)
    with pytest.raises(PreflightError) as e:
        from_apr(tmp_apr)
    msg = str(e.value)
    assert str(tmp_apr) in msg and "architecture family mismatch" in msg
    assert "encoder" in msg and "decoder-only" in msg and "'BertModel'" in msg


def test_unsupported_family_and_family_tensor_disagreement_are_refused(tmp_apr, qwen):
    save_model(tmp_apr, qwen, meta={"architecture": "phi", "hf_architecture": None, "model_type": "phi"})
    with pytest.raises(PreflightError, match=r"model\.apr: unsupported architecture family: "
                                             r"architecture='phi'.*expected a decoder-only llama, mistral, qwen2, qwen3, qwen2_moe, qwen3_moe or mixtral"):
        from_apr(tmp_apr)
    # metadata says llama, but q/k/v biases are there: Qwen2 tensors (aprender section 86)
    save_model(tmp_apr, qwen, meta={"architecture": "llama", "hf_architecture": "LlamaForCausalLM",
                                    "model_type": "llama"})
    with pytest.raises(PreflightError, match=r"metadata says 'llama' but the file has q/k/v biases "
                                             r"\(model\.layers\.0\.self_attn\.k_proj\.bias"):
        from_apr(tmp_apr)


def test_missing_and_misshapen_tensors_are_listed_by_name(tmp_apr, qwen):
    save_model(tmp_apr, qwen, drop=["model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.v_proj.bias"],
               replace={"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 56),
                        "model.norm.weight": torch.ones(55)})
    with pytest.raises(PreflightError) as e:
        from_apr(tmp_apr)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_apr}: tensors do not fit the qwen2 config")
    assert "2 missing: model.layers.0.self_attn.v_proj.bias, model.layers.1.mlp.up_proj.weight" in msg
    assert "2 misshapen: model.layers.0.self_attn.k_proj.weight: file has [16, 56], expected [8, 56]" in msg
    assert "model.norm.weight: file has [55], expected [56]" in msg


def test_untied_file_without_lm_head_is_reported(tmp_apr):
    llama = Transformer(preset("tiny_llama").replace(tie_word_embeddings=False), fast=False)
    save_model(tmp_apr, llama, drop=["lm_head.weight"])
    with pytest.raises(PreflightError, match=r"1 missing: lm_head\.weight"):
        from_apr(tmp_apr)


def test_tokenizer_vocabulary_must_fit_the_model(tmp_path):
    tok = byte_tokenizer()  # 257 tokens
    fits = save_model(tmp_path / "fits.apr", Transformer(preset("tiny_llama").replace(vocab_size=257)), tokenizer=tok)
    assert from_apr(fits).config.vocab_size == 257  # equal passes: the bound is <=
    small = save_model(tmp_path / "small.apr", Transformer(preset("tiny_llama").replace(vocab_size=256)),
                       tokenizer=tok)
    with pytest.raises(PreflightError, match=r"small\.apr: embedded tokenizer: tokenizer vocabulary mismatch: "
                                             r"the tokenizer has 257 tokens but the model vocab_size is 256; "
                                             r"expected tokenizer vocab <= model vocab"):
        from_apr(small)
    # aprender's numbers: the Qwen2.5 tokenizer (151665) fits Qwen2's 151936, not Llama-370M's 50257
    check_tokenizer_vocab(151665, preset("qwen2_0_5b").vocab_size, "qwen")
    with pytest.raises(PreflightError, match="151665 tokens but the model vocab_size is 50257"):
        check_tokenizer_vocab(151665, preset("llama_370m").vocab_size, "llama")
    with pytest.raises(PreflightError, match="151937 tokens"):
        check_tokenizer_vocab(151937, 151936, "qwen + 1")


def test_quantised_weights_are_dequantised_to_the_training_dtype(tmp_apr):
    from apr_kernels.quant import dequantize, quantize

    cfg = ModelConfig(architecture="llama", hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                      intermediate_size=256, vocab_size=96, tie_word_embeddings=True)
    torch.manual_seed(2)
    model = Transformer(cfg)
    kinds = {"model.layers.0.mlp.down_proj.weight": "Q4_K", "model.layers.0.mlp.gate_proj.weight": "Q6_K",
             "model.layers.0.self_attn.q_proj.weight": "APR_Q8", "model.layers.0.self_attn.o_proj.weight": "APR_Q4"}
    q = {name: quantize(kind, dict(model.named_parameters())[name]) for name, kind in kinds.items()}
    save_model(tmp_apr, model, replace=q)
    for dtype in (torch.float32, torch.bfloat16):
        loaded = dict(from_apr(tmp_apr, dtype=dtype).named_parameters())
        assert {p.dtype for p in loaded.values()} == {dtype}
        for name, qt in q.items():
            want = dequantize(qt.dtype, qt.shape, qt.data).to(dtype)
            assert torch.equal(loaded[name], want), name
            orig = dict(model.named_parameters())[name].detach()
            # really dequantised floats (close to the originals), not reinterpreted bytes
            assert (loaded[name].float() - orig).abs().max() < 0.25 * orig.abs().max()
        assert torch.equal(loaded["model.layers.0.mlp.up_proj.weight"],
                           model.model.layers[0].mlp.up_proj.weight.detach().to(dtype))


def test_non_finite_weights_are_refused(tmp_apr, qwen):
    bad = qwen.model.layers[1].mlp.down_proj.weight.detach().clone()
    bad[3, 4] = float("nan")
    save_model(tmp_apr, qwen, replace={"model.layers.1.mlp.down_proj.weight": bad})
    with pytest.raises(PreflightError, match=r"model\.apr: tensor 'model\.layers\.1\.mlp\.down_proj\.weight' "
                                             r"has 1 non-finite value\(s\)"):
        from_apr(tmp_apr)


def test_weights_with_an_impossible_mean_are_refused(tmp_apr, qwen):
    """aprender's loader refuses a tensor whose |mean| exceeds 100 (validate_tensor_values): so does
    preflight, naming the tensor and its mean."""
    big = torch.full_like(qwen.model.norm.weight.detach(), 250.0)
    save_model(tmp_apr, qwen, replace={"model.norm.weight": big})
    with pytest.raises(PreflightError, match=r"model\.apr: tensor 'model\.norm\.weight' has mean 250; expected "
                                             r"\|mean\| <= 100"):
        from_apr(tmp_apr)


def test_an_embedding_stored_in_another_dtype_than_its_tag_is_warned_about(tmp_apr, qwen, recwarn):
    """aprender's H4 falsifier: BF16 bytes tagged as F16 read as finite values of a wrong scale. The
    embedding's statistics outside its bounds are a warning naming the tensor; an honest file gives
    none."""
    import warnings

    save_model(tmp_apr, qwen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no warning at all)
        from_apr(tmp_apr)
    emb = qwen.model.embed_tokens.weight.detach()
    mistagged = emb.to(torch.bfloat16).view(torch.int16).view(torch.float16)  # the bytes of BF16, tagged F16
    assert torch.isfinite(mistagged).all()
    save_model(tmp_apr, qwen, replace={"model.embed_tokens.weight": mistagged})
    with pytest.warns(UserWarning, match=r"model\.apr: tensor 'model\.embed_tokens\.weight' has mean -?[0-9.e-]+ "
                                         r"and std [0-9.]+, outside aprender's sanity bounds for an embedding"):
        from_apr(tmp_apr)


def test_a_llama_file_from_gguf_without_rope_type_rotates_adjacent_pairs(tmp_apr):
    """aprender's GGUF import keeps llama.cpp's permuted q/k rows (spec 10.5): a Llama file whose
    metadata says ``original_format`` "gguf" and no ``rope_type`` computes the original model's logits
    with adjacent-pair RoPE; without the provenance, or with an explicit rope_type, the file's word holds."""
    from apr_kernels.convert.names import permute_rows

    torch.manual_seed(3)
    model = Transformer(preset("tiny_llama"), fast=False)
    cfg = model.config
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i in range(cfg.num_layers):
        for proj, heads in (("q_proj", cfg.num_heads), ("k_proj", cfg.num_kv_heads)):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            tensors[name] = permute_rows(tensors[name], heads)
    meta = {k: v for k, v in model_metadata(model, None).items() if k != "rope_type"}
    want = logits(model)
    apr_kernels.save(tensors, tmp_apr, metadata={**meta, "original_format": "gguf"})
    loaded = from_apr(tmp_apr, fast=False)
    assert loaded.config.rope_type == 0
    torch.testing.assert_close(logits(loaded), want, rtol=1e-5, atol=1e-5)
    for extra in ({}, {"original_format": "gguf", "rope_type": 2}):
        apr_kernels.save(tensors, tmp_apr, metadata={**meta, **extra})
        loaded = from_apr(tmp_apr, fast=False)
        assert loaded.config.rope_type == 2
        assert (logits(loaded) - want).abs().max() > 1e-3  # (100x the agreement above)


def test_one_shard_of_a_split_model_is_named_as_such(tmp_path, qwen):
    """A file of a model split over several (spec 12: metadata 'sharding', flag 0x0010) is refused as
    a shard, not reported as a model with missing tensors."""
    from apr_build import build, patch_header

    half = dict(list(model_tensors(qwen).items())[:5])
    save_model(tmp_path / "s.apr", qwen, drop=[n for n in dict(model_tensors(qwen)) if n not in half],
               meta={"sharding": {"shard_count": 3, "shard_index": 1, "total_size": 1000, "pattern": None}})
    with pytest.raises(PreflightError, match=r"s\.apr: shard 1 of 3 of a model split over several APR files"):
        from_apr(tmp_path / "s.apr")
    flagged = tmp_path / "f.apr"  # the flag alone
    flagged.write_bytes(patch_header(build([("a.weight", "F32", (2,), bytes(8))]), flags=0x0410))
    with pytest.raises(PreflightError, match=r"f\.apr: one shard of a model split over several APR files"):
        from_apr(flagged)


def test_init_falsifiers_bad_files_and_repeatable_loads(tmp_path, qwen):
    """aprender's init falsifiers 004/005/010 through from_apr: a file with a bad magic and one with
    bogus metadata fail with the reader's AprFormatError naming the file; loading one file twice gives
    bit-identical weights."""
    from apr_build import build

    from apr_kernels.errors import AprFormatError

    magic = tmp_path / "magic.apr"
    magic.write_bytes(build([("a.weight", "F32", (2,), bytes(8))], magic=b"GGUF"))
    with pytest.raises(AprFormatError, match=r"magic\.apr: bad magic"):
        from_apr(magic)
    bogus = tmp_path / "bogus.apr"
    bogus.write_bytes(build([("a.weight", "F32", (2,), bytes(8))], meta=b"{not json"))
    with pytest.raises(AprFormatError, match=r"bogus\.apr: .*metadata"):
        from_apr(bogus)
    path = save_model(tmp_path / "m.apr", qwen)
    one, two = (from_apr(path, fast=False).state_dict() for _ in range(2))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert all(torch.equal(one[k], v) for k, v in qwen.state_dict().items())


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent\.apr: init file does not exist"):
        from_apr(tmp_path / "absent.apr")


def test_gguf_tensor_names_load(tmp_apr, qwen):
    gguf = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    tensors = {}
    for name, t in model_tensors(qwen).items():
        if name == "lm_head.weight":
            continue
        new = gguf.get(name) or (name.replace("model.layers.", "blk.").replace("self_attn.q_proj", "attn_q")
                                 .replace("self_attn.k_proj", "attn_k").replace("self_attn.v_proj", "attn_v")
                                 .replace("self_attn.o_proj", "attn_output").replace("mlp.gate_proj", "ffn_gate")
                                 .replace("mlp.up_proj", "ffn_up").replace("mlp.down_proj", "ffn_down")
                                 .replace("post_attention_layernorm", "ffn_norm")
                                 .replace("input_layernorm", "attn_norm"))
        tensors[new] = t
    assert not any(k.startswith("model.") for k in tensors)
    apr_kernels.save(tensors, tmp_apr, metadata=model_metadata(qwen))
    torch.testing.assert_close(logits(from_apr(tmp_apr)), logits(qwen), rtol=0, atol=0)


def test_metadata_claiming_billions_of_layers_is_refused_at_once(tmp_apr, qwen):
    """Hostile metadata: a billion layers in a 27-tensor file is refused from counts, before any per-layer
    list (which would take minutes and gigabytes) is made."""
    save_model(tmp_apr, qwen, meta={"num_layers": 10**9})
    with pytest.raises(PreflightError, match=r"model\.apr: the metadata describes a qwen2 model of 12000000002 "
                                             r"parameter tensors \(num_layers=1000000000\) but the file holds 27 "
                                             r"weight tensors"):
        from_apr(tmp_apr)


# Values for a damaged metadata key: the right type and size or not (zero, negative, huge, NaN, the
# wrong JSON type, an unknown family, a rope_scaling of each kind with a bad factor).
DAMAGE = [0, 1, -1, 2, 3, 7, 64, 2**31, 2**63, 10**30, 0.0, 0.5, -0.5, 1e308, float("nan"), float("inf"), "",
          "x", "llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen2_moe", None, True, False, [], {}, [1, 2],
          {"type": "linear"}, {"type": "yarn", "factor": 0}, {"rope_type": "llama3", "factor": 8},
          {"type": "dynamic", "factor": -1}]
SHAPE_KEYS = ["hidden_size", "num_heads", "num_kv_heads", "head_dim", "num_layers", "vocab_size", "intermediate_size",
              "sliding_window", "max_window_layers", "rope_scaling", "num_experts", "num_experts_per_tok",
              "moe_intermediate_size", "max_position_embeddings", "tokenizer.eos_token_id"]


def damaged(rng, meta: dict, tensors: dict) -> tuple[dict, dict]:
    """One to three of: a metadata key dropped or set to another value (``DAMAGE``, or its own doubled,
    halved, plus or minus one), a shape key set, a tensor dropped, cut by a row, flattened, cast to
    another dtype or filled with NaN."""
    import copy

    meta, tensors = copy.deepcopy(meta), dict(tensors)
    for _ in range(rng.randint(1, 3)):
        r = rng.random()
        if r < 0.5:
            key = rng.choice(sorted(meta))
            value = meta[key]
            own = [value * 2, value + 1, value - 1, value // 2] if type(value) is int else []
            meta[key] = rng.choice(DAMAGE + own)
            if rng.random() < 0.15:
                del meta[key]
        elif r < 0.7:
            meta[rng.choice(SHAPE_KEYS)] = rng.choice(DAMAGE)
        else:
            key = rng.choice(sorted(tensors))
            t = tensors.pop(key)
            how = rng.randrange(5)
            if how == 1 and t.dim() and len(t) > 1:
                tensors[key] = t[:-1].contiguous()
            elif how == 2:
                tensors[key] = t.reshape(-1)
            elif how == 3:
                tensors[key] = t.to(rng.choice([torch.float16, torch.bfloat16, torch.int32, torch.int8, torch.float64]))
            elif how == 4 and t.is_floating_point():
                tensors[key] = torch.full_like(t, float("nan"))
    return meta, tensors


def test_damaged_model_files_are_refused_by_name_or_load_and_run(tmp_path):
    """Randomly damaged model files (``damaged``) of each tiny family: ``from_apr`` refuses each with a
    ``PreflightError`` or ``AprFormatError`` naming the file, or gives a model whose forward runs and
    returns a row of logits per position. (A crash in the forward means a check the format needs is
    missing; 2,600 loaded and 12,500 refused files passed so in a longer run by hand.)"""
    import random

    from apr_kernels.errors import AprFormatError

    rng = random.Random(2026)
    base = {}
    for name in ("tiny_llama", "tiny_qwen2", "tiny_qwen2_moe"):
        torch.manual_seed(0)
        path = save_model(tmp_path / f"{name}.apr", Transformer(preset(name), fast=False), tokenizer=byte_tokenizer())
        with apr_kernels.open(path) as f:
            base[name] = (dict(f.metadata), {k: f.get_tensor(k).clone() for k in f.keys()})
    path, outcomes = tmp_path / "damaged.apr", {"loaded": 0, "refused": 0}
    for i in range(150):
        meta, tensors = damaged(rng, *base[rng.choice(sorted(base))])
        try:
            apr_kernels.save(tensors, path, metadata=meta)
        except (ValueError, TypeError):  # (metadata save itself refuses: not a file to load)
            continue
        try:
            model = from_apr(path)
        except (PreflightError, AprFormatError) as exc:
            assert str(path) in str(exc), exc
            outcomes["refused"] += 1
            continue
        cfg = model.config
        x = torch.randint(0, cfg.vocab_size, (1, max(1, min(5, cfg.max_position_embeddings))))
        with torch.no_grad():
            logits = model(x)
        assert logits.shape[:2] == x.shape and logits.shape[-1] >= cfg.vocab_size, (i, meta)
        outcomes["loaded"] += 1
    assert outcomes["loaded"] > 10 and outcomes["refused"] > 50, outcomes
