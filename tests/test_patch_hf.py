"""``apr_kernels.patch_hf_model``: the package's kernels inside transformers' own Llama, Mistral, Qwen2,
Qwen3 and MoE models (Liger-Kernel's use case). The oracle is the same model unpatched: loss, every
gradient, evaluation logits and generation must not change; the kernels must actually run."""

import contextlib
import copy
import importlib

import pytest
import torch

import apr_kernels
from kernel_helpers import spy_launchers

transformers = pytest.importorskip("transformers")
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "mixtral")
ORIGINAL_ROPE = {kind: importlib.import_module(f"transformers.models.{kind}.modeling_{kind}").apply_rotary_pos_emb
                 for kind in FAMILIES}
assert not any(getattr(f, "__name__", None) == "apr_apply_rotary_pos_emb" for f in ORIGINAL_ROPE.values())

COMMON = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa")


def hf_model(kind: str, **extra):
    torch.manual_seed(0)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
           "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
           "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
           "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM)}[kind]
    kw = dict(COMMON, **extra)
    if kind == "qwen3_moe":
        kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16)
    elif kind == "qwen2_moe":  # a shared expert (its MLP patched), layer 1 dense
        kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                  mlp_only_layers=[1])
    elif kind == "mixtral":
        kw.update(num_local_experts=4, num_experts_per_tok=2)
    model = cls[1](cls[0](**kw))
    with torch.no_grad():  # away from the init: norms != 1, biases != 0
        for name, p in model.named_parameters():
            p.copy_(torch.empty_like(p).uniform_(0.5, 1.5) if name.endswith("norm.weight") else torch.randn_like(p) * 0.1)
    return model


def _modeling(kind: str):
    return importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")


@pytest.fixture(autouse=True)
def rope_restored():
    """``rope`` patches the modeling modules' ``apply_rotary_pos_emb`` for the whole process (as Liger
    does): each test puts transformers' own back, so other test files keep their oracle."""
    saved = {kind: _modeling(kind).apply_rotary_pos_emb for kind in FAMILIES}
    yield
    for kind, fn in saved.items():
        _modeling(kind).apply_rotary_pos_emb = fn


@contextlib.contextmanager
def unpatched(kind: str):
    """transformers' own rotary embedding for the reference model's calls."""
    mod = _modeling(kind)
    patched_fn, mod.apply_rotary_pos_emb = mod.apply_rotary_pos_emb, ORIGINAL_ROPE[kind]
    try:
        yield
    finally:
        mod.apply_rotary_pos_emb = patched_fn


def both(kind: str, **patch):
    ref = hf_model(kind)
    patched = apr_kernels.patch_hf_model(copy.deepcopy(ref), **patch)
    assert _modeling(kind).apply_rotary_pos_emb is not ORIGINAL_ROPE[kind]
    return ref, patched


@pytest.mark.parametrize("kind", FAMILIES)
def test_training_loss_and_gradients_equal_the_unpatched_model(kind, use_backend):
    use_backend("reference")
    ref, patched = both(kind)
    ref.train(), patched.train()
    x = torch.randint(0, 211, (2, 19), generator=torch.Generator().manual_seed(1))
    labels = x.clone()
    labels[0, :5] = -100  # a prompt not trained on
    with unpatched(kind):
        want = ref(x, labels=labels)
    got = patched(x, labels=labels)
    assert got.logits is None  # the fused loss never made them
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    want.loss.backward()
    got.loss.backward()
    for (n, p), q in zip(ref.named_parameters(), patched.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)
    # the trainer's token-count normalisation (HF Trainer passes num_items_in_batch)
    items = torch.tensor(23)
    with unpatched(kind):
        want = ref(x, labels=labels, num_items_in_batch=items).loss
    torch.testing.assert_close(patched(x, labels=labels, num_items_in_batch=items).loss, want, rtol=1e-5, atol=1e-6)


def test_the_kernels_run_in_the_patched_model(use_backend, monkeypatch):
    """With the Triton backend (the interpreter here) each patched piece calls its kernel launcher."""
    use_backend("triton")
    ref, patched = both("qwen3")
    calls = []
    for name, launchers in (("rms_norm", ["rms_norm_fwd"]), ("swiglu", ["swiglu_fwd"]), ("rope", ["rope_fwd"]),
                            ("attention", ["attention_fwd"])):
        calls += [spy_launchers(monkeypatch, name, launchers)]
    patched.train()
    x = torch.randint(0, 211, (1, 16))
    loss = patched(x, labels=x).loss
    assert all(c for c in calls), calls
    use_backend("reference")
    with unpatched("qwen3"):
        torch.testing.assert_close(loss, ref.train()(x, labels=x).loss, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_moe_experts_run_as_grouped_gemms(kind, use_backend, monkeypatch):
    """experts=True: transformers' stacked experts run through the "apr_kernels" experts implementation
    (the grouped GEMM kernels, in the interpreter here: two forward, their dx and dW), with the
    unpatched model's loss and every gradient."""
    use_backend("triton")
    calls = spy_launchers(monkeypatch, "grouped_mm", ["grouped_mm_fwd", "grouped_mm_dw"])
    ref, patched = both(kind, experts=True)
    assert patched.config._experts_implementation == "apr_kernels"
    ref.train(), patched.train()
    x = torch.randint(0, 211, (2, 13), generator=torch.Generator().manual_seed(2))
    got = patched(x, labels=x)
    got.loss.backward()
    sparse = sum(1 for m in patched.modules() if hasattr(m, "gate_up_proj"))
    assert calls.count("grouped_mm_fwd") == 4 * sparse and calls.count("grouped_mm_dw") == 2 * sparse
    use_backend("reference")
    with unpatched(kind):
        want = ref(x, labels=x)
    want.loss.backward()
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(ref.named_parameters(), patched.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_experts_are_patched_by_default_only_where_transformers_loops_over_them():
    """experts=None keeps torch's grouped_mm where transformers chose it, and replaces the per-expert
    loop ("eager")."""
    assert apr_kernels.patch_hf_model(hf_model("qwen3_moe")).config._experts_implementation == "grouped_mm"
    eager = hf_model("qwen3_moe")
    eager.set_experts_implementation("eager")
    assert apr_kernels.patch_hf_model(eager).config._experts_implementation == "apr_kernels"
    off = hf_model("qwen3_moe")
    off.set_experts_implementation("eager")
    assert apr_kernels.patch_hf_model(off, experts=False).config._experts_implementation == "eager"


def test_evaluation_padding_and_generation_keep_the_models_numbers(use_backend):
    use_backend("reference")
    ref, patched = both("qwen2")
    ref.eval(), patched.eval()
    x = torch.randint(0, 211, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(x)
    mask[1, :4] = 0  # left padding: the kernel path hands this call to SDPA with the mask
    with torch.no_grad(), unpatched("qwen2"):
        want = [ref(x).logits, ref(x, attention_mask=mask).logits[1, 4:], ref(x, labels=x).loss]
    with torch.no_grad():
        torch.testing.assert_close(patched(x).logits, want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(patched(x, attention_mask=mask).logits[1, 4:], want[1], rtol=1e-5, atol=1e-5)
        out = patched(x, labels=x)  # evaluation with labels: the model's own loss, with logits
        assert out.logits is not None
        torch.testing.assert_close(out.loss, want[2], rtol=1e-5, atol=1e-6)
    for m in (ref, patched):
        m.generation_config.eos_token_id = None
    with unpatched("qwen2"):
        want = ref.generate(x[:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(x[:, :5], max_new_tokens=6, do_sample=False, pad_token_id=0), want)


def test_packed_sequences_take_the_varlen_kernel(use_backend, monkeypatch):
    """transformers' padding-free batches (one row, documents back to back, position_ids restarting):
    the attention is the packed-sequence kernel's, and equals each document run alone."""
    use_backend("reference")
    _, patched = both("llama")
    patched.eval()
    seen = []
    attention = apr_kernels.attention
    monkeypatch.setattr(apr_kernels, "attention", lambda *a, **kw: seen.append(kw.get("cu_seqlens")) or attention(*a, **kw))
    a, b = torch.randint(0, 211, (1, 7)), torch.randint(0, 211, (1, 9))
    row = torch.cat([a, b], dim=1)
    pos = torch.cat([torch.arange(7), torch.arange(9)])[None]
    cu = torch.tensor([0, 7, 16], dtype=torch.int32)
    with torch.no_grad():
        packed = patched(row, position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9,
                         max_length_k=9).logits
        assert len(seen) == 2 and all(torch.equal(c, torch.tensor([0, 7, 16], dtype=torch.int32)) for c in seen)
        alone = torch.cat([patched(a).logits, patched(b).logits], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_other_model_types_are_refused():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="patch_hf_model: model_type 'gpt2'; expected one of llama, mistral"):
        apr_kernels.patch_hf_model(gpt2)


def test_hugging_face_trainer_takes_the_same_steps(use_backend, tmp_path):
    """transformers' Trainer (gradient accumulation, prompt tokens masked, its num_items_in_batch
    normalisation) logs the same losses and ends at the same weights with the model patched."""
    use_backend("reference")

    class Records(torch.utils.data.Dataset):
        x = torch.randint(0, 211, (8, 17), generator=torch.Generator().manual_seed(3))

        def __len__(self):
            return 8

        def __getitem__(self, i):
            labels = self.x[i].clone()
            labels[: i % 5] = -100
            return {"input_ids": self.x[i], "labels": labels}

    def train(patch: bool):
        model = hf_model("qwen2")
        if patch:
            apr_kernels.patch_hf_model(model)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(patch)), max_steps=3, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True,
            save_strategy="no", seed=0, data_seed=0, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Records())
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h], model

    want, ref = train(False)
    got, patched = train(True)
    assert len(got) == 3 and got == pytest.approx(want, rel=1e-5)
    for (n, p), q in zip(ref.named_parameters(), patched.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=n)


def test_padding_free_trainer_and_peft_take_the_same_steps(use_backend, tmp_path, monkeypatch):
    """transformers' padding-free collator (documents back to back in one row, cu_seq_lens for the
    attention) and a PEFT LoRA model in its Trainer: the patched model's steps (through the
    packed-sequence kernel) equal the unpatched model's (SDPA masked per document)."""
    peft = pytest.importorskip("peft")
    use_backend("reference")
    seen = []
    attention = apr_kernels.attention
    monkeypatch.setattr(apr_kernels, "attention", lambda *a, **kw: seen.append(kw.get("cu_seqlens")) or attention(*a, **kw))
    g = torch.Generator().manual_seed(4)
    records = [{"input_ids": torch.randint(0, 211, (int(n),), generator=g).tolist()}
               for n in torch.randint(5, 20, (12,), generator=g)]

    def train(patch: bool):
        model = hf_model("llama")
        if patch:
            apr_kernels.patch_hf_model(model)
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                               "gate_proj"]))
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(patch)), max_steps=3, per_device_train_batch_size=3, learning_rate=1e-2,
            logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0, data_seed=0,
            disable_tqdm=True, remove_unused_columns=False)
        collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=records, data_collator=collator)
        with contextlib.nullcontext() if patch else unpatched("llama"):
            trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    want = train(False)
    assert not seen  # (the unpatched model never calls the package)
    got = train(True)
    assert seen and all(c is not None and c.numel() == 4 for c in seen)  # 3 documents per packed row
    assert len(got) == 3 and got == pytest.approx(want, rel=1e-5)


def test_sequence_classifiers_keep_their_scores_and_gradients(use_backend):
    """A reward model (``Qwen2ForSequenceClassification``): norms, MLPs, RoPE and attention patched (it
    has no output head to fuse a loss with); scores and gradients unchanged."""
    use_backend("reference")
    torch.manual_seed(0)
    ref = transformers.Qwen2ForSequenceClassification(transformers.Qwen2Config(num_labels=1, pad_token_id=0, **COMMON))
    patched = apr_kernels.patch_hf_model(copy.deepcopy(ref))
    x = torch.randint(1, 211, (2, 11), generator=torch.Generator().manual_seed(5))
    with unpatched("qwen2"):
        want = ref(x).logits
        want.sum().backward()
    got = patched(x).logits
    got.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(ref.named_parameters(), patched.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.cuda
def test_gpu_patched_training_step_under_bf16_matches_the_model():
    """On the GPU under bf16 autocast, Qwen2-0.5B's layer shapes (2 layers): the patched model's loss
    and gradients against the unpatched model's (the Triton kernels against transformers' SDPA path)."""
    from kernel_helpers import assert_grads_near

    torch.manual_seed(0)
    ref = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=2, num_attention_heads=14, num_key_value_heads=2,
        vocab_size=1024, max_position_embeddings=4096, rope_theta=1e6, attn_implementation="sdpa")).cuda().train()
    patched = apr_kernels.patch_hf_model(copy.deepcopy(ref))
    x = torch.randint(0, 1024, (2, 1024), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with unpatched("qwen2"):
            want = ref(x, labels=x).loss
        got = patched(x, labels=x).loss
    with unpatched("qwen2"):
        want.backward()
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=2e-2)
    assert_grads_near(ref, patched)
