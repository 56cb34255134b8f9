"""LoRA (model/lora.py): adapters start as the identity, train alone, agree on the fast and eager
paths, merge exactly, and survive checkpoints (merged for every reader, kept for --resume)."""

import json
import sysconfig
from pathlib import Path

import pytest
import torch

import apr_kernels
from apr_kernels.model import Transformer, from_apr, preset
from apr_kernels.model.lora import LoRALinear, adapters_disabled, add_lora, lora_modules, merge_into_weights
from apr_kernels.train.checkpoint import save_checkpoint

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def _randomise_adapters(model, std=0.05):
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, std)


def test_adapters_start_as_the_base_model_and_only_they_train():
    cfg = preset("tiny_qwen2")
    model = Transformer(cfg, fast=False)
    x = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        base = model(x)
    settings = add_lora(model, 4, 16, ["q_proj", "v_proj", "down_proj"])
    assert settings == {"rank": 4, "alpha": 16.0, "targets": ["q_proj", "v_proj", "down_proj"]}
    with torch.no_grad():
        assert torch.equal(model(x), base)  # B starts at zero
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_kv_heads * cfg.head_dim
    per_layer = 4 * (h + cfg.num_heads * cfg.head_dim) + 4 * (h + kv) + 4 * (i + h)
    assert sum(trainable.values()) == cfg.num_layers * per_layer
    assert all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    # Hugging Face names of the base weights are unchanged
    assert "model.layers.0.self_attn.q_proj.weight" in dict(model.named_parameters())


def test_lora_linear_is_the_low_rank_update():
    lin = torch.nn.Linear(6, 5)
    x = torch.randn(3, 6)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    lin.__class__ = LoRALinear
    lin.rank, lin.scale = 2, 1.5
    lin.lora_A = torch.nn.Parameter(torch.randn(2, 6))
    lin.lora_B = torch.nn.Parameter(torch.randn(5, 2))
    want = x @ w.T + b + 1.5 * (x @ lin.lora_A.T) @ lin.lora_B.T
    torch.testing.assert_close(lin(x), want)
    torch.testing.assert_close(lin.merged_weight(), w + 1.5 * lin.lora_B @ lin.lora_A)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_fast_path_with_adapters_matches_eager(use_backend, backend_name):
    """The fused q/k/v GEMM plus the three low-rank terms equals the eager per-module path: loss and
    adapter gradients (triton: the kernels in the interpreter)."""
    use_backend(backend_name)
    cfg = preset("tiny_qwen2").replace(hidden_size=112)  # head_dim 16 for the Triton kernels
    torch.manual_seed(0)
    eager = Transformer(cfg, fast=False)
    fast = Transformer(cfg, fast=True)
    fast.load_state_dict(eager.state_dict())
    for m in (eager, fast):
        torch.manual_seed(1)
        add_lora(m, 4)
        _randomise_adapters(m)
    x = torch.randint(0, cfg.vocab_size, (2, 17))
    la, lb = eager.loss(x[:, :-1], x[:, 1:]), fast.loss(x[:, :-1], x[:, 1:])
    assert lb.item() == pytest.approx(la.item(), rel=1e-5)
    la.backward()
    lb.backward()
    for (name, p), q in zip(eager.named_parameters(), fast.parameters()):
        assert (p.grad is None) == (q.grad is None) == (not name.endswith(("lora_A", "lora_B"))), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_merge_gives_the_same_model():
    cfg = preset("tiny_llama")
    model = Transformer(cfg, fast=False)
    add_lora(model, 3)
    _randomise_adapters(model)
    x = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        want = model(x)
        merge_into_weights(model)
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())
    assert not any("lora" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "fused-qkv"])
def test_adapters_disabled_is_the_base_model_until_the_block_ends(fast, use_backend):
    """GRPO's reference under LoRA: inside the block the logits are exactly the base model's (moved
    adapters contribute nothing, also to the fused q/k/v GEMM), after it (an error included) the
    adapters act again."""
    if fast:
        use_backend("reference")
    cfg = preset("tiny_llama")
    torch.manual_seed(0)
    base = Transformer(cfg, fast=fast)
    model = Transformer(cfg, fast=fast)
    model.load_state_dict(base.state_dict())
    add_lora(model, 3)
    _randomise_adapters(model)
    x = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        adapted = model(x)
        with adapters_disabled(model):
            assert torch.equal(model(x), base(x))
        with pytest.raises(RuntimeError), adapters_disabled(model):
            raise RuntimeError("inside")
        assert torch.equal(model(x), adapted) and not torch.allclose(adapted, base(x))


def test_checkpoints_merge_for_readers_keep_for_resume_and_export_merged(tmp_path):
    transformers = pytest.importorskip("transformers")
    from apr_kernels.convert.export import export

    cfg = preset("tiny_qwen2")
    model = Transformer(cfg, fast=False)
    add_lora(model, 4, 8)
    _randomise_adapters(model)
    x = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        want = model(x)
    step = tmp_path / "step.apr"
    save_checkpoint(step, model=model)
    with apr_kernels.open(step) as f:
        assert f.metadata["lora"] == {"rank": 4, "alpha": 8.0, "targets": list(model.lora["targets"])}
        assert "model.layers.1.mlp.down_proj.lora_B" in f.keys()
        # the stored base weight is the frozen one, not the merged one
        assert torch.equal(f.get_tensor("model.layers.0.self_attn.q_proj.weight"),
                           model.model.layers[0].self_attn.q_proj.weight.detach())
    merged = from_apr(step)  # default: adapters folded in, a plain model
    assert not lora_modules(merged)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), want, rtol=1e-5, atol=1e-5)
    kept = from_apr(step, lora="keep")
    assert len(lora_modules(kept)) == cfg.num_layers * 7
    with torch.no_grad():
        torch.testing.assert_close(kept(x), want, rtol=1e-6, atol=1e-6)
    # the final-checkpoint form: merged weights, no adapters, readable by anything
    final = tmp_path / "final.apr"
    save_checkpoint(final, model=model, merge_lora=True)
    with apr_kernels.open(final) as f:
        assert "lora" not in f.metadata and not any("lora" in k for k in f.keys())
    with torch.no_grad():
        torch.testing.assert_close(from_apr(final)(x), want, rtol=1e-5, atol=1e-5)
    # export folds the adapters of a step checkpoint into the Hugging Face weights
    export(step, tmp_path / "hf", progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, want, rtol=1e-4, atol=1e-4)


def test_bad_lora_metadata_is_refused(tmp_path):
    cfg = preset("tiny_llama")
    model = Transformer(cfg, fast=False)
    add_lora(model, 2)
    path = tmp_path / "m.apr"
    save_checkpoint(path, model=model, extra_metadata={"lora": {"rank": 0, "alpha": 4, "targets": ["q_proj"]}})
    with pytest.raises(ValueError, match=r"m.apr: metadata 'lora' = .* is not valid LoRA settings \(lora: rank=0"):
        from_apr(path)
    save_checkpoint(path, model=model, extra_metadata={"lora": {"rank": 3, "alpha": 4.0,
                                                                "targets": ["q_proj"]}})
    with pytest.raises(ValueError, match=r"LoRA tensor 'model.layers.0.self_attn.q_proj.lora_A' has shape "
                                         r"\[2, 48\]; expected \[3, 48\] \(rank 3\)"):
        from_apr(path)


def _cli_runner(capsys):
    """``run(*argv)``: the CLI in this process; asserts success, returns its JSON log records."""
    from apr_kernels.cli import main

    def run(*argv):
        code = main(list(argv))
        out, err = capsys.readouterr()
        assert code == 0, err
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    return run


def test_cli_lora_run_resumes_exactly_and_ends_with_a_plain_model(capsys, tmp_path):
    run = _cli_runner(capsys)
    held = str(STDLIB / "shlex.py")
    base = ["--preset", "tiny_llama", "--tokenizer", "bytes", "--data", str(STDLIB / "textwrap.py"),
            "--eval-data", held, "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "64", "--lr", "1e-2",
            "--save-every", "1", "--json", "--no-token-cache", "--lora-rank", "4"]
    recs = run("train", *base, "--out", str(tmp_path / "a"))
    losses = [r["loss"] for r in recs if r["event"] == "train"]
    with apr_kernels.open(tmp_path / "a" / "step_000001.apr") as f1, \
            apr_kernels.open(tmp_path / "a" / "step_000003.apr") as f3:
        name = "model.layers.1.mlp.up_proj"
        assert torch.equal(f1.get_tensor(f"{name}.weight"), f3.get_tensor(f"{name}.weight"))  # frozen
        assert not torch.equal(f1.get_tensor(f"{name}.lora_B"), f3.get_tensor(f"{name}.lora_B"))  # trained
    resumed = run("train", "--resume", str(tmp_path / "a" / "step_000002.apr"), "--out", str(tmp_path / "b"), "--json")
    assert [r["loss"] for r in resumed if r["event"] == "train"] == losses[2:]
    assert run("train", *base, "--resume", "auto", "--out", str(tmp_path / "a")) == []  # finished: nothing to do
    with apr_kernels.open(tmp_path / "a" / "model.apr") as f:
        assert "lora" not in f.metadata and not any("lora" in k for k in f.keys())
        assert f.metadata["training.lora"]["rank"] == 4
    # the merged model scores the held-out text as the adapters did at the end of training
    final = [r["eval_loss"] for r in recs if r["event"] == "eval"][-1]
    out = run("eval", "--init", str(tmp_path / "a" / "model.apr"), "--data", held, "--max-tokens", "64", "--json")
    assert out[-1]["eval_loss"] == pytest.approx(final, abs=1e-5)


# ------------------------------------------------------------------------ quantised base (QLoRA-style)
def _quantised_file(path, cfg, kind="Q4_K", seed=0):
    """A model file whose seven projections of every layer are stored in ``kind`` blocks."""
    from apr_kernels.quant import quantize
    from apr_kernels.train.checkpoint import model_metadata, model_tensors

    torch.manual_seed(seed)
    model = Transformer(cfg, fast=False)
    tensors = {}
    for name, lazy in model_tensors(model).items():
        t = lazy.materialize()
        tensors[name] = quantize(kind, t) if name.endswith("proj.weight") else t
    apr_kernels.save(tensors, path, metadata=model_metadata(model))
    return tensors


QCFG = preset("tiny_qwen2").replace(hidden_size=256, intermediate_size=512)  # whole 256-element blocks
LORA = {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"], "seed": 3}


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "fused-qkv"])
@pytest.mark.parametrize("kind", ["Q4_K", "APR_Q8"])
def test_quantised_base_trains_like_its_dequantised_copy_without_keeping_weights(tmp_path, fast, kind):
    """A LoRA model on the file's raw blocks (dequantised per GEMM) against the same adapters on the
    dequantised weights held as parameters: the same losses and adapter gradients over three AdamW
    steps (on the fused q/k/v path too), a fraction of the weight memory, the stored blocks untouched,
    and no dequantised weight saved for the backward (they are made again there)."""
    from apr_kernels.model.lora import QuantizedLoRALinear
    from apr_kernels.train.loop import make_optimizer, TrainConfig

    path = tmp_path / "q.apr"
    stored = _quantised_file(path, QCFG, kind)
    q = from_apr(path, fast=fast, lora_init=LORA, keep_quantized=True)
    ref = from_apr(path, fast=fast, lora_init=LORA)
    mods = lora_modules(q)
    assert len(mods) == 7 * QCFG.num_layers and all(isinstance(m, QuantizedLoRALinear) for m in mods.values())
    name = "model.layers.1.mlp.down_proj"
    assert mods[name].base.dtype == kind and torch.equal(mods[name].base.data, stored[f"{name}.weight"].data)
    proj_params = sum(m.weight.numel() for m in lora_modules(ref).values())
    base_bytes = sum(m.base.data.numel() for m in mods.values())
    assert base_bytes < 0.3 * proj_params * 4  # Q4_K ~0.56 bytes, APR_Q8 ~1 byte per weight vs 4 (fp32)
    assert not any(n.endswith("proj.weight") for n, _ in q.named_parameters())

    cfg = TrainConfig(steps=3, lr=1e-2)
    opts = [make_optimizer(m, cfg) for m in (q, ref)]
    x = torch.randint(0, QCFG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    fused_qkv = ((QCFG.num_heads + 2 * QCFG.num_kv_heads) * QCFG.head_dim, QCFG.hidden_size)
    weight_shapes = {tuple(m.base.shape) for m in mods.values()} | {fused_qkv}
    weight_shapes |= {s[::-1] for s in weight_shapes}  # a GEMM may save the transposed view
    for step in range(3):
        saved = []

        def pack(t):
            saved.append((tuple(t.shape), t.dtype))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            lq = q.loss(x[:, :-1], x[:, 1:])
        lr_ = ref.loss(x[:, :-1], x[:, 1:])
        assert not [s for s in saved if s[0] in weight_shapes and s[1].is_floating_point], saved
        assert lq.item() == pytest.approx(lr_.item(), rel=1e-5), step
        lq.backward()
        lr_.backward()
        for (n, p), p2 in zip(q.named_parameters(), (p for n2, p in ref.named_parameters()
                                                       if not n2.endswith("proj.weight"))):
            if p.grad is not None:
                torch.testing.assert_close(p.grad, p2.grad, rtol=1e-4, atol=1e-7, msg=n)
        for o in opts:
            o.step()
            o.zero_grad()
    assert torch.equal(mods[name].base.data, stored[f"{name}.weight"].data)  # frozen: bit for bit


def test_quantised_base_checkpoints_store_the_blocks_and_merge_at_the_end(tmp_path):
    from apr_kernels.model.lora import QuantizedLoRALinear

    path = tmp_path / "q.apr"
    stored = _quantised_file(path, QCFG, "Q6_K")
    model = from_apr(path, lora_init=LORA, keep_quantized=True, fast=False)
    _randomise_adapters(model)
    x = torch.randint(0, QCFG.vocab_size, (2, 13))
    with torch.no_grad():
        want = model(x)
    ck = tmp_path / "ck.apr"
    save_checkpoint(ck, model=model)
    name = "model.layers.0.self_attn.k_proj.weight"
    with apr_kernels.open(ck) as f:
        assert f.info(name).dtype == "Q6_K" and torch.equal(f.get_raw(name), stored[name].data)
    kept = from_apr(ck, lora="keep", keep_quantized=True, fast=False)  # what --resume does
    assert isinstance(lora_modules(kept)["model.layers.0.self_attn.k_proj"], QuantizedLoRALinear)
    merged = from_apr(ck, fast=False)  # what eval / export / --init do: a plain model
    with torch.no_grad():
        torch.testing.assert_close(kept(x), want, rtol=0, atol=0)
        torch.testing.assert_close(merged(x), want, rtol=1e-5, atol=1e-5)
    final = tmp_path / "final.apr"
    save_checkpoint(final, model=model, merge_lora=True)
    with apr_kernels.open(final) as f:
        assert f.info(name).dtype == "F32" and not any("lora" in k for k in f.keys())
    merge_into_weights(kept)
    with torch.no_grad():
        torch.testing.assert_close(kept(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(from_apr(final, fast=False)(x), want, rtol=1e-5, atol=1e-5)


def test_quantised_base_refusals(tmp_path):
    from apr_kernels.cli import main

    path = tmp_path / "q.apr"
    _quantised_file(path, QCFG)
    assert main(["train", "--preset", "tiny_llama", "--lora-quantized-base", "--data", str(STDLIB / "shlex.py"),
                 "--tokenizer", "bytes"]) == 1


def test_cli_quantised_base_run_resumes_exactly(capsys, tmp_path):
    run = _cli_runner(capsys)
    path = tmp_path / "q.apr"
    _quantised_file(path, QCFG.replace(vocab_size=384))
    base = ["--tokenizer", "bytes", "--data", str(STDLIB / "textwrap.py"), "--eval-data", str(STDLIB / "shlex.py"),
            "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "64", "--lr", "1e-2",
            "--save-every", "1", "--json", "--no-token-cache", "--lora-rank", "4", "--fast", "off"]
    recs = run("train", "--init", str(path), *base, "--lora-quantized-base", "--out", str(tmp_path / "a"))
    losses = [r["loss"] for r in recs if r["event"] == "train"]
    resumed = run("train", "--resume", str(tmp_path / "a" / "step_000001.apr"), "--out", str(tmp_path / "b"), "--json")
    assert [r["loss"] for r in resumed if r["event"] == "train"] == losses[1:]
    with apr_kernels.open(tmp_path / "a" / "step_000002.apr") as f:
        assert f.info("model.layers.0.mlp.up_proj.weight").dtype == "Q4_K"


def test_adapter_export_is_a_peft_adapter_for_the_exported_base(tmp_path):
    """`export CKPT --adapter`: PEFT's PeftModel.from_pretrained puts the adapters on the Hugging Face
    export of the base and computes what our LoRA model computes; an export of a file without
    adapters is refused by name."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from apr_kernels.cli import main

    torch.manual_seed(0)
    model = Transformer(preset("tiny_qwen2"), fast=False)
    save_checkpoint(tmp_path / "base.apr", model=model)
    add_lora(model, 4, 12.0, ["q_proj", "k_proj", "down_proj"])
    _randomise_adapters(model, std=0.2)
    save_checkpoint(tmp_path / "step.apr", model=model)
    assert main(["export", str(tmp_path / "base.apr"), str(tmp_path / "hf"), "-q"]) == 0
    assert main(["export", str(tmp_path / "step.apr"), str(tmp_path / "adapter"), "--adapter", "-q"]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 12.0, ["q_proj", "k_proj", "down_proj"])
    x = torch.randint(0, model.config.vocab_size, (2, 13))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        plain = hf(x).logits  # the base alone
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        want = model.eval()(x)
        got = peft_model(x).logits
    assert (want - plain).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert main(["export", str(tmp_path / "base.apr"), str(tmp_path / "nothing"), "--adapter", "-q"]) == 1


def test_rslora_scale_survives_checkpoints_merges_and_peft(tmp_path):
    """rslora: the scale is alpha / sqrt(rank); a checkpoint keeps it (resumed adapters, merged from_apr),
    and the exported adapter is a use_rslora PEFT adapter that computes the same logits."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from apr_kernels.cli import main

    torch.manual_seed(0)
    model = Transformer(preset("tiny_qwen2"), fast=False)
    save_checkpoint(tmp_path / "base.apr", model=model)
    settings = add_lora(model, 4, 6.0, ["q_proj", "up_proj"], rslora=True)
    assert settings["rslora"] is True and model.model.layers[0].mlp.up_proj.scale == pytest.approx(6.0 / 2)
    _randomise_adapters(model, std=0.2)
    save_checkpoint(tmp_path / "step.apr", model=model)
    x = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        want = model.eval()(x)
        kept = from_apr(tmp_path / "step.apr", lora="keep", fast=False)
        assert kept.model.layers[1].self_attn.q_proj.scale == pytest.approx(3.0)
        torch.testing.assert_close(kept(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(from_apr(tmp_path / "step.apr", fast=False)(x), want, rtol=1e-5, atol=1e-5)
    assert main(["export", str(tmp_path / "base.apr"), str(tmp_path / "hf"), "-q"]) == 0
    assert main(["export", str(tmp_path / "step.apr"), str(tmp_path / "adapter"), "--adapter", "-q"]) == 0
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["use_rslora"] is True
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cli_rslora_reaches_the_checkpoint(tmp_path, capsys):
    import apr_kernels
    from apr_kernels.cli import main

    base = ["--preset", "tiny_llama", "--tokenizer", "bytes", "--data", str(STDLIB / "textwrap.py"), "--steps", "1",
            "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "64", "--save-every", "1", "--no-token-cache",
            "--lora-rank", "4", "--lora-rslora", "--json"]
    assert main(["train", *base, "--steps", "2", "--out", str(tmp_path / "a")]) == 0
    with apr_kernels.open(tmp_path / "a" / "step_000001.apr") as f:
        assert f.metadata["lora"]["rslora"] is True
    assert from_apr(tmp_path / "a" / "step_000001.apr", lora="keep").model.layers[0].self_attn.q_proj.scale == 4.0


def test_dora_is_pefts_and_merges_resumes_and_disables(tmp_path, use_backend):
    """DoRA (use_dora): starts as the base model with magnitudes = the rows' norms; with moved adapters
    and magnitudes the exported adapter is a use_dora PEFT adapter computing the same logits (q/k/v
    biases included), the fused path equals the eager one, the merged file equals the adapted model,
    a checkpoint resumes the same adapters, and adapters_disabled gives the base model; gradients
    reach the magnitudes; FSDP is refused by name."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from apr_kernels.cli import main
    from apr_kernels.model.lora import adapters_disabled

    torch.manual_seed(0)
    model = Transformer(preset("tiny_qwen2"), fast=False)
    save_checkpoint(tmp_path / "base.apr", model=model)
    x = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        base = model.eval()(x)
    settings = add_lora(model, 4, 8.0, ["q_proj", "v_proj", "down_proj"], dora=True)
    assert settings["dora"] is True
    q = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q.lora_magnitude, q.weight.norm(dim=1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), base, rtol=1e-5, atol=1e-5)  # B = 0, m = ||W||: the base
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.2)
            m.lora_magnitude.mul_(torch.empty_like(m.lora_magnitude).uniform_(0.5, 1.5))
        want = model(x)
        with adapters_disabled(model):
            torch.testing.assert_close(model(x), base, rtol=0, atol=0)
    assert (want - base).abs().max() > 1e-2
    model.train()
    model(x).sum().backward()
    assert q.lora_magnitude.grad is not None and q.lora_magnitude.grad.abs().sum() > 0
    model.zero_grad()
    use_backend("reference")
    model.fast = True
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), want, rtol=1e-5, atol=1e-5)  # the fused q/k/v GEMM
    model.fast = False
    save_checkpoint(tmp_path / "step.apr", model=model)
    with torch.no_grad():
        torch.testing.assert_close(from_apr(tmp_path / "step.apr", lora="keep", fast=False)(x), want,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(from_apr(tmp_path / "step.apr", fast=False)(x), want, rtol=1e-5, atol=1e-5)
    assert main(["export", str(tmp_path / "base.apr"), str(tmp_path / "hf"), "-q"]) == 0
    assert main(["export", str(tmp_path / "step.apr"), str(tmp_path / "adapter"), "--adapter", "-q"]) == 0
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        got = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()(x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_dora_on_a_quantised_base_is_dora_on_its_dequantised_copy(tmp_path):
    """QDoRA: DoRA's magnitudes start at the dequantised rows' norms and the adapted model, its loss
    gradients and its merged checkpoint equal DoRA on the dequantised weights held as parameters."""
    path = tmp_path / "q.apr"
    _quantised_file(path, QCFG, "Q4_K")
    dora = {**LORA, "dora": True}
    q = from_apr(path, fast=False, lora_init=dora, keep_quantized=True)
    ref = from_apr(path, fast=False, lora_init=dora)
    for model in (q, ref):
        torch.manual_seed(5)
        for m in lora_modules(model).values():
            with torch.no_grad():
                m.lora_B.normal_(0, 0.1)
                m.lora_magnitude.mul_(1.2)
    x = torch.randint(0, QCFG.vocab_size, (2, 13))
    lq, lr = q(x).float().square().mean(), ref(x).float().square().mean()
    torch.testing.assert_close(lq, lr, rtol=1e-5, atol=1e-6)
    lq.backward()
    lr.backward()
    for (name, a), b in zip(lora_modules(q).items(), lora_modules(ref).values()):
        torch.testing.assert_close(a.lora_magnitude.grad, b.lora_magnitude.grad, rtol=1e-4, atol=1e-7, msg=name)
    save_checkpoint(tmp_path / "ck.apr", model=q, merge_lora=True)
    with torch.no_grad():
        torch.testing.assert_close(from_apr(tmp_path / "ck.apr", fast=False)(x), q(x), rtol=1e-5, atol=1e-5)


def test_cli_dora_run_resumes_exactly_and_writes_a_plain_model(tmp_path, capsys):
    import apr_kernels
    from apr_kernels.cli import main

    args = ["train", "--preset", "tiny_llama", "--tokenizer", "bytes", "--data", str(STDLIB / "textwrap.py"),
            "--eval-data", str(STDLIB / "shlex.py"), "--steps", "3", "--batch-size", "2", "--seq-len", "32",
            "--eval-tokens", "64", "--lr", "1e-2", "--save-every", "1", "--no-token-cache", "--lora-rank", "4",
            "--lora-dora", "--json"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    losses = [json.loads(x)["loss"] for x in capsys.readouterr().out.splitlines() if '"event": "train"' in x]
    with apr_kernels.open(tmp_path / "a" / "step_000001.apr") as f:
        assert f.metadata["lora"]["dora"] is True and "model.layers.0.mlp.up_proj.lora_magnitude" in f
    assert main(["train", "--resume", str(tmp_path / "a" / "step_000001.apr"), "--json", "--out",
                 str(tmp_path / "b")]) == 0
    resumed = [json.loads(x)["loss"] for x in capsys.readouterr().out.splitlines() if '"event": "train"' in x]
    assert resumed == losses[1:]
    with apr_kernels.open(tmp_path / "a" / "model.apr") as f:
        assert not any("lora" in k for k in f.keys())


def test_lora_plus_steps_b_at_the_ratio_and_resumes(tmp_path, capsys):
    """LoRA+: a Trainer's steps equal torch AdamW built by hand with the B matrices' group at ratio x the
    scheduled rate (and weight decay on the matrices); the ratio is refused without adapters, stored in
    checkpoints, and a resumed run repeats the uninterrupted one."""
    from apr_kernels.cli import main
    from apr_kernels.train.loop import TrainConfig, Trainer, make_optimizer

    torch.manual_seed(0)
    tokens = torch.randint(0, 320, (4000,), generator=torch.Generator().manual_seed(2))
    cfg = TrainConfig(steps=3, batch_size=2, seq_len=16, lr=1e-2, warmup=1, weight_decay=0.1, lora_plus_ratio=16.0,
                      grad_clip=0.0)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        m = Transformer(preset("tiny_qwen2"), fast=False)
        add_lora(m, 4, 8.0, seed=3)
        models.append(m)
    trainer = Trainer(models[0], tokens, None, cfg, log=lambda *a: None)
    assert [g.get("lr_scale", 1.0) for g in trainer.optimizer.param_groups] == [1.0, 1.0, 16.0]
    by_hand, named = models[1], dict(models[1].named_parameters())
    trainable = [(n, p) for n, p in named.items() if p.requires_grad]
    adamw = torch.optim.AdamW([{"params": [p for n, p in trainable if n.endswith(".lora_A")], "weight_decay": 0.1},
                               {"params": [p for n, p in trainable if n.endswith(".lora_B")], "weight_decay": 0.1,
                                "lr_scale": 16.0}], lr=1e-2, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
    from apr_kernels.train.data import BatchStream, batch, sequences

    seqs, stream = sequences(tokens, 16), BatchStream(len(sequences(tokens, 16)), seed=cfg.seed)
    for step in range(3):
        trainer.train_step()
        for group in adamw.param_groups:
            group["lr"] = cfg.lr_at_step(step) * group.get("lr_scale", 1.0)
        adamw.zero_grad()
        x, y, _ = batch(seqs, stream.next(2))
        by_hand.loss(x, y).backward()
        adamw.step()
    for n, p in models[0].named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, named[n], rtol=1e-5, atol=1e-7, msg=n)
    with pytest.raises(ValueError, match="--lora-plus-ratio 4.0 needs LoRA adapters"):
        make_optimizer(Transformer(preset("tiny_qwen2")), TrainConfig(lora_plus_ratio=4.0))
    args = ["train", "--preset", "tiny_llama", "--tokenizer", "bytes", "--data", str(STDLIB / "textwrap.py"),
            "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "64", "--save-every", "1",
            "--no-token-cache", "--lora-rank", "4", "--lora-plus-ratio", "16", "--json"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    losses = [json.loads(x)["loss"] for x in capsys.readouterr().out.splitlines() if '"event": "train"' in x]
    assert main(["train", "--resume", str(tmp_path / "a" / "step_000001.apr"), "--json", "--out",
                 str(tmp_path / "b")]) == 0
    resumed = [json.loads(x)["loss"] for x in capsys.readouterr().out.splitlines() if '"event": "train"' in x]
    assert resumed == losses[1:]
