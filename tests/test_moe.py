"""Mixture-of-experts families (Qwen2-MoE, Qwen3-MoE, Mixtral): the model against transformers'
Qwen2MoeForCausalLM / Qwen3MoeForCausalLM / MixtralForCausalLM built offline with the same weights
(logits, the loss with its load-balancing term, gradients, generation), the fast path against the
eager one, APR files with one tensor per expert (preflight included), LoRA on the experts, and the
trainer."""

import pytest
import torch

import apr_kernels
from apr_kernels.model import ModelConfig, Transformer, from_apr, preset
from apr_kernels.model.generate import generate
from apr_kernels.model.hf_names import expected_shapes
from apr_kernels.model.loading import PreflightError
from test_train_cli import HELD, TRAIN, json_lines, run

try:
    import transformers
except ImportError:  # (a GPU image without it: the comparisons with it skip, the rest still run)
    transformers = None
needs_transformers = pytest.mark.skipif(transformers is None, reason="transformers is not installed")

FAMILIES = ["tiny_qwen3_moe", "tiny_qwen2_moe", "tiny_mixtral"]


def hf_config(cfg: ModelConfig):
    """transformers' config of ``cfg``, routing logits recorded so its loss carries the aux term."""
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
              intermediate_size=cfg.intermediate_size, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
              tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=cfg.max_position_embeddings,
              num_experts_per_tok=cfg.num_experts_per_tok, router_aux_loss_coef=cfg.router_aux_loss_coef,
              output_router_logits=True, attn_implementation="eager")
    if cfg.architecture == "mixtral":
        return transformers.MixtralConfig(**kw, num_local_experts=cfg.num_experts)
    moe = dict(num_experts=cfg.num_experts, moe_intermediate_size=cfg.moe_intermediate_size,
               norm_topk_prob=cfg.norm_topk_prob, mlp_only_layers=list(cfg.mlp_only_layers),
               decoder_sparse_step=cfg.decoder_sparse_step)
    if cfg.architecture == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**kw, **moe, shared_expert_intermediate_size=cfg.shared_expert_intermediate_size)
    return transformers.Qwen3MoeConfig(**kw, **moe, head_dim=cfg.head_dim)


def pair(name: str, tmp_path):
    """(ours, theirs) with the same random weights: ours drawn, saved under its parameter names (the
    on-disk Hugging Face names, one tensor per expert) and loaded by transformers' from_pretrained."""
    from safetensors.torch import save_file

    cfg = preset(name)
    ours = Transformer(cfg, fast=False)
    with torch.no_grad():  # far from the init: norms != 1, biases != 0, a router that prefers some experts
        for n, p in ours.named_parameters():
            p.copy_(torch.empty_like(p).uniform_(0.5, 1.5) if n.endswith("norm.weight") else
                    torch.randn_like(p) * (0.5 if n.endswith(("bias", "gate.weight")) else 0.15))
    folder = tmp_path / name
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    hf_config(cfg).save_pretrained(folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return ours, theirs


def shifted(x):
    """Targets of every position of ``x`` (the last one ignored), as transformers shifts labels=x."""
    return torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)


@needs_transformers
def test_tensor_names_are_the_on_disk_hugging_face_names(tmp_path):
    for name in FAMILIES:
        cfg = preset(name)
        hf = transformers.AutoModelForCausalLM.from_config(hf_config(cfg))
        hf.save_pretrained(tmp_path / name)
        from safetensors import safe_open

        with safe_open(tmp_path / name / "model.safetensors", "pt") as f:
            on_disk = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        ours = {k: tuple(v.shape) for k, v in Transformer(cfg).named_parameters()}
        assert ours == on_disk == expected_shapes(cfg), name
        assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters())
    mixtral = expected_shapes(preset("tiny_mixtral"))
    assert mixtral["model.layers.1.block_sparse_moe.experts.3.w2.weight"] == (48, 40)
    qwen2 = expected_shapes(preset("tiny_qwen2_moe"))  # layer 1 is dense (mlp_only_layers)
    assert "model.layers.1.mlp.gate_proj.weight" in qwen2 and "model.layers.0.mlp.shared_expert_gate.weight" in qwen2


@needs_transformers
@pytest.mark.parametrize("name,hf_class,count", [
    ("qwen3_30b_a3b", "Qwen3MoeForCausalLM", 30_532_122_624),
    ("qwen2_moe_a2_7b", "Qwen2MoeForCausalLM", 14_315_784_192),
    ("mixtral_8x7b", "MixtralForCausalLM", 46_702_792_704)])
def test_published_presets_have_the_published_parameter_counts(name, hf_class, count):
    cfg = preset(name)
    with torch.device("meta"):
        hf = getattr(transformers, hf_class)(hf_config(cfg))
        ours = Transformer(cfg)
    assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters()) == \
        sum(p.numel() for p in ours.parameters()) == count


def test_active_parameters_count_the_routed_experts_only():
    """Qwen3-30B-A3B: 3.3B parameters active per token (the name's "A3B"), and the training FLOPs of a
    token are 6 x the weights it meets (router, 8 of 128 experts, attention, head) + attention."""
    cfg = preset("qwen3_30b_a3b")
    active = 48 * (2048 * 4096 * 2 + 2 * 2048 * 512 + 128 * 2048 + 8 * 3 * 2048 * 768) + 151936 * 2048
    assert active + 151936 * 2048 == pytest.approx(3.3e9, rel=0.03)  # with the input embedding: "A3B"
    assert cfg.flops_per_token(1) == pytest.approx(6 * active + 3 * 48 * 2 * 32 * 128, rel=1e-9)


@needs_transformers
@pytest.mark.parametrize("name", FAMILIES)
def test_logits_loss_aux_loss_and_gradients_match_transformers(name, tmp_path):
    ours, theirs = pair(name, tmp_path)
    ours.train(), theirs.train()
    x = torch.randint(0, ours.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(3))
    want = theirs(x, labels=x)
    got = ours.loss(x, shifted(x))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.last_aux_loss, want.aux_loss.detach(), rtol=1e-5, atol=1e-6)
    assert want.aux_loss > 1.0  # (about num_experts_per_tok when balanced): a term that shows
    torch.testing.assert_close(got, want.loss, rtol=1e-5, atol=1e-6)
    got.backward(), want.loss.backward()
    hf_grads = dict(theirs.named_parameters())
    ffn = ours.config.ffn_name
    for n, p in ours.named_parameters():
        parts = n.split(".")
        if ".experts." not in n:  # the same name on both sides (Mixtral's router is mlp.gate in memory)
            ref = hf_grads[n.replace("block_sparse_moe.", "mlp.")].grad
        else:  # transformers stacks the experts: gate_up_proj [E, 2I, H], down_proj [E, H, I]
            layer, e, proj = parts[2], int(parts[5]), parts[6]
            stacked = f"model.layers.{layer}.mlp.experts."
            inter = ours.config.moe_intermediate_size
            if proj in ("gate_proj", "w1", "up_proj", "w3"):
                rows = slice(0, inter) if proj in ("gate_proj", "w1") else slice(inter, 2 * inter)
                ref = hf_grads[stacked + "gate_up_proj"].grad[e, rows]
            else:
                ref = hf_grads[stacked + "down_proj"].grad[e]
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-6, msg=n)
    assert ffn in ("mlp", "block_sparse_moe")


def assert_same_loss_and_gradients(eager, fast, x) -> list[str]:
    """One loss and backward on each model (the same weights): equal losses and equal gradients of every
    trained parameter; returns those parameters' names."""
    losses = []
    for model in (eager, fast):
        loss = model.loss(x[:, :-1], x[:, 1:])
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    trained = [(n, p, q) for (n, p), q in zip(eager.named_parameters(), fast.parameters()) if p.requires_grad]
    for n, p, q in trained:
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=n)
    return [n for n, _, _ in trained]


@pytest.mark.parametrize("backend,name", [("reference", "tiny_qwen3_moe"), ("reference", "tiny_qwen2_moe"),
                                          ("reference", "tiny_mixtral"), ("triton", "tiny_qwen3_moe")])
def test_fast_path_equals_the_eager_path(backend, name, use_backend, monkeypatch):
    """The package's ops (the experts as grouped GEMMs + swiglu, attention, norms, fused loss) give the
    eager loss and gradients, the load-balancing term included (Qwen2-MoE: its shared expert and a
    dense layer too); with ``triton`` the kernels run in Triton's interpreter (the grouped GEMM's
    launchers seen: 3 forward, 3 dx + 3 dW per MoE layer; the other tiny presets' heads of 8 are
    below the attention kernel's minimum)."""
    use_backend(backend)
    if backend == "triton":
        from kernel_helpers import spy_launchers

        calls = spy_launchers(monkeypatch, "grouped_mm", ["grouped_mm_fwd", "grouped_mm_dw"])
    cfg = preset(name)
    eager = Transformer(cfg, fast=False).train()
    fast = Transformer(cfg, fast=True).train()
    fast.load_state_dict(eager.state_dict())
    assert_same_loss_and_gradients(eager, fast, torch.randint(0, cfg.vocab_size, (2, 16)))
    if backend == "triton":
        assert calls.count("grouped_mm_fwd") == 6 * cfg.num_layers and calls.count("grouped_mm_dw") == 3 * cfg.num_layers


def test_fast_moe_layer_compiles_without_graph_breaks(use_backend):
    """The fast path keeps the group sizes on the device (grouped GEMMs), so a whole Qwen2-MoE layer
    (router, experts, shared expert) compiles as one graph (``fullgraph=True``) and gives eager's
    outputs and gradients."""
    use_backend("reference")
    cfg = preset("tiny_qwen2_moe")
    moe = Transformer(cfg, fast=True).train().model.layers[0].mlp
    x = torch.randn(2, 7, cfg.hidden_size, requires_grad=True)
    y, stats = torch.compile(lambda x: moe(x, True), fullgraph=True)(x)
    y.square().sum().backward()
    got = [p.grad.clone() for p in moe.parameters()]
    moe.zero_grad()
    y2, stats2 = moe(x, True)
    y2.square().sum().backward()
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(stats, stats2)
    for g, (n, p) in zip(got, moe.named_parameters()):
        torch.testing.assert_close(g, p.grad, msg=n)


@pytest.mark.parametrize("fast", [False, True])
def test_every_expert_gets_a_gradient_even_when_no_token_picks_it(fast):
    """DDP needs every parameter in every step's graph: an unused expert gets a zero gradient, not None,
    and the routing is written back without atomics (two runs give identical bits); on both paths (the
    fast one's grouped GEMM writes the idle experts' zeros itself)."""
    cfg = preset("tiny_mixtral")
    model = Transformer(cfg, fast=fast).train()
    moe = model.model.layers[0].block_sparse_moe
    route = moe.route

    def experts_1_and_2(x):  # every token routed to experts 1 and 2; 0 and 3 idle
        r = route(x)
        chosen = torch.tensor([1, 2]).expand(x.shape[0], 2)
        weights = r.probs.gather(1, chosen)
        return r._replace(weights=weights / weights.sum(-1, keepdim=True), chosen=chosen)

    moe.route = experts_1_and_2
    x = torch.randint(0, cfg.vocab_size, (1, 9))
    model.loss(x[:, :-1], x[:, 1:]).backward()
    grads = [moe.experts[e].w1.weight.grad for e in range(cfg.num_experts)]
    assert all(g is not None for g in grads)
    assert [bool(g.abs().sum() > 0) for g in grads] == [False, True, True, False]
    first = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.loss(x[:, :-1], x[:, 1:]).backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(first, model.parameters()))


def test_expert_load_measures_the_busiest_expert_against_the_mean():
    """Every layer routing all tokens to experts 1 and 2 of 4: the busiest expert has twice the mean
    share (E / k); a round-robin routing that gives every expert the same count: 1."""
    cfg = preset("tiny_mixtral")
    model = Transformer(cfg, fast=False).train()
    x = torch.randint(0, cfg.vocab_size, (1, 9))  # 8 positions with targets

    def routed(moe, pick):
        def route(h):
            r = moe.__class__.route(moe, h)
            chosen = pick(h.shape[0])
            weights = r.probs.gather(1, chosen)
            return r._replace(weights=weights / weights.sum(-1, keepdim=True), chosen=chosen)
        return route

    for pick, want in ((lambda t: torch.tensor([1, 2]).expand(t, 2), 2.0),
                       (lambda t: torch.stack([torch.arange(t) % 4, (torch.arange(t) + 1) % 4], 1), 1.0)):
        for layer in model.model.layers:
            layer.block_sparse_moe.route = routed(layer.block_sparse_moe, pick)
        model.loss(x[:, :-1], x[:, 1:])
        assert model.last_expert_load.item() == pytest.approx(want)


def test_aux_loss_is_a_training_term_only_and_follows_its_coefficient():
    cfg = preset("tiny_qwen3_moe")
    model = Transformer(cfg, fast=False)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    args = (x[:, :-1], x[:, 1:])
    with torch.no_grad():
        plain = model.eval().loss(*args)  # evaluation: the cross entropy alone
        model.train()
        mean, total = model.loss(*args), model.loss(*args, reduction="sum")
        aux = model.last_aux_loss
        model.router_aux_loss_coef = 0.0
        off = model.loss(*args)
    torch.testing.assert_close(mean, plain + cfg.router_aux_loss_coef * aux)
    torch.testing.assert_close(total / x[:, 1:].numel(), mean)  # "sum": the term once per target
    torch.testing.assert_close(off, plain)


@pytest.mark.parametrize("fast", [False, True])
def test_router_z_loss_is_the_mean_squared_logsumexp_of_the_router_logits(fast):
    """router_z_loss(): the mean over every sparse layer's tokens of logsumexp(router logits)^2 (the
    logits captured from the routers here); with router_z_loss_coef it is added to a training loss
    ("mean": once; "sum": once per target), on both paths."""
    cfg = preset("tiny_qwen2_moe")  # (layer 1 dense: only layer 0 routes)
    model = Transformer(cfg, fast=fast).train()
    logits = []
    for layer in model.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(lambda m, i, o: logits.append(o.detach().double()))
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    args = (x[:, :-1], x[:, 1:])
    with torch.no_grad():
        model.router_aux_loss_coef = 0.0
        plain = model.loss(*args)
        want = torch.cat([torch.logsumexp(l, -1).square() for l in logits]).mean()
        torch.testing.assert_close(model.router_z_loss().double(), want)
        torch.testing.assert_close(model.last_router_z_loss.double(), want)
        model.router_z_loss_coef = 0.01
        torch.testing.assert_close(model.loss(*args), plain + 0.01 * model.last_router_z_loss)
        total = model.loss(*args, reduction="sum")
        torch.testing.assert_close(total / args[1].numel(), plain + 0.01 * model.last_router_z_loss)


def _router_logits(model) -> list:
    """The routers' logits of each forward of ``model``, captured as they are computed (fp64)."""
    logits = []
    for layer in model.model.layers:
        if hasattr(layer.ffn, "gate"):
            layer.ffn.gate.register_forward_hook(lambda m, i, o: logits.append(o.detach().double()))
    return logits


def _ragged(cfg, lengths=(9, 4, 7), seed=6) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]


@needs_transformers
@pytest.mark.parametrize("name", FAMILIES)
def test_padding_is_left_out_of_the_balance_terms_as_transformers_attention_mask_does(name):
    """Right-padded rows with their ``lengths``: the load-balancing loss is transformers'
    ``load_balancing_loss_func`` of the routers' logits under the attention mask of the tokens inside
    the lengths, and the router z-loss the mean of logsumexp^2 over those tokens only; without the
    lengths the padding counts (a different loss)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from apr_kernels.train.posttrain import padded_inputs

    cfg = preset(name)
    torch.manual_seed(2)
    model = Transformer(cfg, fast=False).train()
    with torch.no_grad():  # (a router that prefers some experts: unequal loads)
        for layer in model.model.layers:
            if hasattr(layer.ffn, "gate"):
                layer.ffn.gate.weight.mul_(8)
    logits = _router_logits(model)
    x, y, lengths = padded_inputs(_ragged(cfg), 0, "cpu")
    mask = (torch.arange(x.shape[1])[None] < lengths[:, None]).long()
    assert not mask.all()
    with torch.no_grad():
        model.loss(x, y, reduction="sum", lengths=lengths)
    want = load_balancing_loss_func(tuple(logits), cfg.num_experts, cfg.num_experts_per_tok, mask)
    torch.testing.assert_close(model.last_aux_loss.double(), want.double(), rtol=1e-5, atol=1e-7)
    lse = torch.cat([torch.logsumexp(l, -1).square() for l in logits])
    kept = mask.flatten().bool().repeat(len(logits))
    torch.testing.assert_close(model.last_router_z_loss.double(), lse[kept].mean(), rtol=1e-5, atol=1e-6)
    logits.clear()
    with torch.no_grad():
        model.loss(x, y, reduction="sum")
    padded_too = load_balancing_loss_func(tuple(logits), cfg.num_experts, cfg.num_experts_per_tok)
    torch.testing.assert_close(model.last_aux_loss.double(), padded_too.double(), rtol=1e-5, atol=1e-7)
    assert abs(padded_too - want) > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_padded_and_packed_rows_give_the_same_balance_terms(name):
    """The post-training layouts of the same sequences: right-padded rows (the eager default) and one
    packed row, each sequence a document (padding-free): the same per-sequence log-likelihoods, the
    same balance terms (``last_balance_loss``, which a "sequence" loss leaves to the objective) and
    the same gradients of an objective holding both."""
    from apr_kernels.train.posttrain import sequence_logps

    cfg = preset(name).replace(router_aux_loss_coef=0.3)
    seqs = _ragged(cfg, (9, 4, 7, 5))
    runs = []
    for padding_free in (False, True):
        torch.manual_seed(3)
        model = Transformer(cfg, fast=False).train()
        model.router_z_loss_coef = 0.05
        logps = sequence_logps(model, seqs, "cpu", eos_id=0, padding_free=padding_free)
        balance = model.last_balance_loss
        (logps.sum() + balance).backward()
        runs.append((logps.detach(), balance.detach(), model.last_aux_loss, {n: p.grad for n, p in model.named_parameters()}))
    (la, ba, aa, ga), (lb, bb, ab, gb) = runs
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bb, ba, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ab, aa, rtol=1e-5, atol=1e-7)
    assert float(ba) > 0.3  # (coef x aux with aux about top_k: a term that shows)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6, msg=n)


@needs_transformers
@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_generation_equals_transformers(name, tmp_path):
    ours, theirs = pair(name, tmp_path)
    ours.eval(), theirs.eval()
    prompt = torch.randint(0, ours.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(5))
    theirs.generation_config.eos_token_id = None
    want = theirs.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(generate(ours, prompt, 8), want)


def save_apr(path, model, **meta):
    apr_kernels.save(dict(model.state_dict()), path, metadata={**model.config.to_apr_config().to_metadata(), **meta})


def test_apr_round_trip_and_preflight(tmp_path):
    cfg = preset("tiny_qwen2_moe")
    model = Transformer(cfg, fast=False).eval()
    path = tmp_path / "moe.apr"
    save_apr(path, model)
    with apr_kernels.open(path) as f:
        assert (f.config.num_experts, f.config.num_experts_per_tok, f.config.moe_intermediate_size) == (5, 2, 20)
        assert f.metadata["shared_expert_intermediate_size"] == 40 and f.metadata["mlp_only_layers"] == [1]
    loaded = from_apr(path, fast=False).eval()
    assert loaded.config == cfg
    x = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    sd = dict(model.state_dict())
    del sd["model.layers.0.mlp.experts.4.down_proj.weight"]
    apr_kernels.save(sd, path, metadata=cfg.to_apr_config().to_metadata())
    with pytest.raises(PreflightError, match=r"num_experts=5, moe_intermediate_size=20\): 1 missing: "
                                             r"model\.layers\.0\.mlp\.experts\.4\.down_proj\.weight"):
        from_apr(path)
    # expert tensors under dense metadata; stacked (GGUF-layout) experts; impossible routing
    dense = preset("tiny_qwen2").to_apr_config().to_metadata()
    apr_kernels.save(dict(model.state_dict()), path, metadata={**dense, "hidden_size": 56})
    with pytest.raises(PreflightError, match=r"metadata says 'qwen2' \(dense\) but the file has mixture-of-experts "
                                             r"tensors \(model\.layers\.0\.mlp\.experts\."):
        from_apr(path)
    apr_kernels.save({**sd, "blk.0.ffn_gate_exps.weight": torch.zeros(5, 20, 56)}, path,
                     metadata=cfg.to_apr_config().to_metadata())
    with pytest.raises(PreflightError, match=r"'blk\.0\.ffn_gate_exps\.weight' holds every expert of a layer stacked"):
        from_apr(path)
    save_apr(path, model, num_experts_per_tok=6)
    with pytest.raises(PreflightError, match=r"num_experts_per_tok=6 exceeds num_experts=5"):
        from_apr(path)
    # metadata claiming far more tensors than the file holds: refused before any list is made
    save_apr(path, model, num_experts=10**9)
    with pytest.raises(PreflightError, match=r"describes a qwen2_moe model of 3000000029 parameter tensors "
                                             r"\(num_layers=2, num_experts=1000000000\) but the file holds 44"):
        from_apr(path)
    meta = cfg.to_apr_config().to_metadata()
    del meta["num_experts"]
    apr_kernels.save(dict(model.state_dict()), path, metadata=meta)
    with pytest.raises(PreflightError, match=r"num_experts=None; expected a positive integer for a qwen2_moe"):
        from_apr(path)


def test_configs_transformers_cannot_hold_are_refused():
    mixtral = preset("tiny_mixtral")
    for change, message in [({"mlp_only_layers": (1,)}, r"mlp_only_layers=\[1\] for mixtral"),
                            ({"moe_intermediate_size": 24}, "moe_intermediate_size=24 for mixtral"),
                            ({"decoder_sparse_step": 2}, "decoder_sparse_step=2 for mixtral"),
                            ({"sliding_window": 8, "max_window_layers": 1}, "max_window_layers=1 for mixtral")]:
        with pytest.raises(ValueError, match=message):
            mixtral.replace(**change)
    with pytest.raises(ValueError, match="max_window_layers=1 for qwen3_moe; its sliding window"):
        preset("tiny_qwen3_moe").replace(sliding_window=8, max_window_layers=1)
    with pytest.raises(ValueError, match=r"num_experts=4 given for architecture='llama', a dense model"):
        preset("tiny_llama").replace(num_experts=4)


def test_gguf_spellings_of_the_families_are_read():
    from apr_kernels.metadata import AprModelConfig
    from apr_kernels.model.config import family_of

    for text, family in [("qwen2moe", "qwen2_moe"), ("Qwen3MoeForCausalLM", "qwen3_moe"), ("mixtral", "mixtral"),
                         ("qwen2", "qwen2")]:
        assert family_of(AprModelConfig(architecture=text)) == family
    with pytest.raises(ValueError, match="unsupported architecture family: architecture='deepseek2'"):
        family_of(AprModelConfig(architecture="deepseek2"))


@pytest.mark.parametrize("fast", [False, True])
def test_lora_adapts_every_expert_and_merges_exactly(fast):
    """Adapted experts and, once merged, plain ones give the same outputs (on the fast path both run
    as grouped GEMMs, the adapters as two more per projection)."""
    from apr_kernels.model.lora import add_lora, lora_modules, merge_into_weights

    cfg = preset("tiny_mixtral")
    model = Transformer(cfg, fast=fast).eval()
    x = torch.randint(0, cfg.vocab_size, (1, 10))
    add_lora(model, rank=2, targets=("q_proj", "gate_proj", "down_proj"))
    names = set(lora_modules(model))
    assert {f"model.layers.1.block_sparse_moe.experts.{e}.w1" for e in range(4)} <= names
    assert "model.layers.0.block_sparse_moe.experts.2.w2" in names and not any(n.endswith("w3") for n in names)
    assert not any(n.endswith(".gate") for n in names)  # the router stays frozen
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.1)
        adapted = model(x)
        merge_into_weights(model)
        torch.testing.assert_close(model(x), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True])
def test_lora_experts_on_the_fast_path_equal_the_eager_path(dora, use_backend, monkeypatch):
    """LoRA on every expert projection, fast path: the base and the adapters run as grouped GEMMs (the
    frozen bases get no weight gradient); DoRA's rescaling falls back to one GEMM chain per expert.
    Loss and every adapter gradient equal the eager path's."""
    from apr_kernels.model.lora import add_lora
    from apr_kernels.ops import reference

    use_backend("reference")  # (tiny heads of 8: the grouped kernels themselves are test_grouped_mm's)
    calls = []
    for name in ("grouped_mm_reference", "grouped_mm_dw_reference"):
        fn = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *a, _fn=fn, _n=name, **kw: calls.append(_n) or _fn(*a, **kw))
    cfg = preset("tiny_mixtral")
    torch.manual_seed(0)
    eager = Transformer(cfg, fast=False).train()
    fast = Transformer(cfg, fast=True).train()
    for model in (eager, fast):
        add_lora(model, rank=4, targets=("gate_proj", "up_proj", "down_proj"), dora=dora)
    with torch.no_grad():
        for p in eager.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)  # B too: a non-zero update on every path
    fast.load_state_dict(eager.state_dict())
    trained = assert_same_loss_and_gradients(eager, fast, torch.randint(0, cfg.vocab_size, (2, 12)))
    assert "model.layers.1.block_sparse_moe.experts.3.w2.lora_B" in trained
    assert all(not q.requires_grad or q.grad is not None for q in fast.parameters())
    moe = fast.model.layers[0].block_sparse_moe
    assert moe.experts._grouped() is not dora
    # per MoE layer: 3 projections x (base + A + B) forward (+ dx where the input needs a gradient);
    # weight gradients for A and B only
    assert calls.count("grouped_mm_reference") >= (0 if dora else 9 * cfg.num_layers)
    assert calls.count("grouped_mm_dw_reference") == (0 if dora else 6 * cfg.num_layers)


@pytest.mark.parametrize("kind", ["APR_Q8", "Q4_K"])
def test_quantised_expert_bases_take_the_grouped_path(kind, tmp_path, use_backend, monkeypatch):
    """QLoRA on an MoE file whose projections are stored in blocks: the fast path dequantises each
    projection's expert bases into one stacked weight per use (Q4_K: in one pass over their bytes) and
    runs grouped GEMMs; loss and every adapter gradient equal the eager path's per-expert chain."""
    from apr_kernels.ops import reference
    from test_lora import _quantised_file

    use_backend("reference")
    cfg = preset("tiny_qwen3_moe")
    if kind == "Q4_K":  # (rows of whole 256-value blocks)
        cfg = cfg.replace(hidden_size=256, moe_intermediate_size=256, intermediate_size=256)
    _quantised_file(tmp_path / "q.apr", cfg, kind)
    lora = {"rank": 4, "alpha": 8.0, "targets": ["gate_proj", "up_proj", "down_proj"], "seed": 1}
    eager, fast = (from_apr(tmp_path / "q.apr", fast=f, lora_init=lora, keep_quantized=True).train()
                   for f in (False, True))
    with torch.no_grad():
        for m in (eager, fast):  # a non-zero update: B from one seed on both
            g = torch.Generator().manual_seed(2)
            for p in m.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    assert fast.model.layers[0].mlp.experts._grouped()
    calls = []
    fn = reference.grouped_mm_reference
    monkeypatch.setattr(reference, "grouped_mm_reference", lambda *a, **kw: calls.append(1) or fn(*a, **kw))
    assert_same_loss_and_gradients(eager, fast, torch.randint(0, cfg.vocab_size, (2, 12)))
    assert len(calls) >= 9 * cfg.num_layers


def test_train_command_logs_the_aux_loss_and_resumes_exactly(capsys, tmp_path):
    common = ["--preset", "tiny_qwen3_moe", "--tokenizer", "bytes", "--data", *TRAIN, "--eval-data", HELD,
              "--max-tokens", "12000", "--batch-size", "2", "--seq-len", "32", "--lr", "3e-3", "--eval-tokens", "96",
              "--json", "--seed", "3", "--no-progress"]
    code, out, err = run(capsys, "train", *common, "--steps", "4", "--save-every", "2", "--out", str(tmp_path / "a"))
    assert code == 0, err
    steps = [r for r in json_lines(out) if r["event"] == "train"]
    assert all(r["aux_loss"] > 1.0 for r in steps) and all(r["router_z_loss"] > 0 for r in steps)
    cfg = preset("tiny_qwen3_moe")  # the expert load: between balance and every token on the same k experts
    assert all(1.0 <= r["expert_load"] <= cfg.num_experts / cfg.num_experts_per_tok for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]
    start = next(r for r in json_lines(out) if r["event"] == "start")
    assert start["params"] == preset("tiny_qwen3_moe").num_parameters()
    code, out, err = run(capsys, "train", "--resume", str(tmp_path / "a" / "step_000002.apr"), "--json",
                         "--no-progress", "--out", str(tmp_path / "b"))
    assert code == 0, err
    resumed = [r for r in json_lines(out) if r["event"] == "train"]
    assert [(r["step"], r["loss"], r["aux_loss"]) for r in resumed] == \
        [(r["step"], r["loss"], r["aux_loss"]) for r in steps[2:]]
    with apr_kernels.open(tmp_path / "a" / "model.apr") as f:
        assert f.metadata["architecture"] == "qwen3_moe" and f.metadata["num_experts"] == 6
        assert "model.layers.1.mlp.experts.5.up_proj.weight" in f.keys()
    # the coefficient: 0 leaves the cross entropy alone (the same first-step loss less coef x aux)
    code, out, err = run(capsys, "train", *common, "--steps", "1", "--router-aux-loss-coef", "0",
                         "--out", str(tmp_path / "c"))
    assert code == 0, err
    first = next(r for r in json_lines(out) if r["event"] == "train")
    assert first["loss"] == pytest.approx(steps[0]["loss"] - 0.001 * steps[0]["aux_loss"], rel=1e-6)
    # the router z-loss: its coefficient x the logged router_z_loss added
    code, out, err = run(capsys, "train", *common, "--steps", "1", "--router-z-loss-coef", "0.01",
                         "--out", str(tmp_path / "e"))
    assert code == 0, err
    first = next(r for r in json_lines(out) if r["event"] == "train")
    assert first["loss"] == pytest.approx(steps[0]["loss"] + 0.01 * steps[0]["router_z_loss"], rel=1e-6)
    for option in ("--router-aux-loss-coef", "--router-z-loss-coef"):
        code, out, err = run(capsys, "train", "--preset", "tiny_llama", "--tokenizer", "bytes", "--data", *TRAIN,
                             "--steps", "1", option, "0.01", "--out", str(tmp_path / "d"))
        name = option[2:].replace("-", "_")
        assert code == 1 and f"{name}=0.01 is the " in err and "mixture-of-experts models; this model is dense" in err


@pytest.mark.cuda
def test_gpu_fast_path_under_bf16_matches_eager():
    """On the GPU under bf16 autocast: the fast path (Triton attention, norms, RoPE, grouped GEMMs and SwiGLU,
    fused loss) against the eager one, loss with its aux term and gradients. The router is drawn large
    so that bf16 rounding rarely changes a token's experts between the two paths."""
    from kernel_helpers import assert_grads_near

    cfg = ModelConfig(architecture="qwen3_moe", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=64, intermediate_size=512, vocab_size=512, qk_norm=True, tie_word_embeddings=False,
                      num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, norm_topk_prob=True,
                      max_position_embeddings=1024, rope_theta=1e6, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    eager = Transformer(cfg, fast=False).cuda().train()
    with torch.no_grad():
        for layer in eager.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    fast = Transformer(cfg, fast=True).cuda().train()
    fast.load_state_dict(eager.state_dict())
    x = torch.randint(0, cfg.vocab_size, (4, 257), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        la = eager.loss(x[:, :-1], x[:, 1:])
        lb = fast.loss(x[:, :-1], x[:, 1:])
    la.backward()
    lb.backward()
    assert lb.item() == pytest.approx(la.item(), rel=2e-2)
    assert fast.last_aux_loss.item() == pytest.approx(eager.last_aux_loss.item(), rel=2e-2)
    assert_grads_near(eager, fast)
