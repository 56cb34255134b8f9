"""``train --qat KIND``: each step trains on the weights as ``convert --quantize KIND`` will store them.

The reference is the converter itself: ``apr-kernels convert model.apr q.apr --quantize KIND`` writes
the quantised file (``plan_tensor`` -> ``quantize`` -> ``save``), which the loader reads back and
dequantises. Inside ``FakeQuantizer.applied()`` the model must hold exactly those weights (and so
compute that file's logits and gradients); outside, exactly its own.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import apr_kernels
from apr_kernels.model import Transformer
from apr_kernels.model.loading import from_apr
from apr_kernels.train import qat
from apr_kernels.train.checkpoint import save_checkpoint
from rank_runs import against_one_process, cli
from train_runs import HELD, losses, records, sixteen_config, sixteen_init, train_args


def _logits_and_grads(model, ids):
    model.zero_grad()
    logits = model(ids)
    logits.float().logsumexp(-1).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["q4k", "q6k", "q8", "q4", "q4km"])
@pytest.mark.parametrize("hidden", [64, 48])
def test_the_model_holds_the_converted_files_weights_within(kind, hidden, tmp_path):
    torch.manual_seed(0)
    cfg = sixteen_config(hidden_size=hidden, num_heads=4, head_dim=hidden // 4)
    model = Transformer(cfg, fast=False)
    save_checkpoint(tmp_path / "m.apr", model=model)
    code, out = cli(["convert", str(tmp_path / "m.apr"), str(tmp_path / "q.apr"), "--quantize", kind])
    assert code == 0
    deployed = from_apr(tmp_path / "q.apr", fast=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    quantizer = qat.FakeQuantizer(model, kind)
    with apr_kernels.open(tmp_path / "q.apr") as f:
        stored = {n: f.info(n).dtype for n in f.keys() if f.info(n).dtype not in ("F32",)}
    quantised = set(stored)
    counts = {fmt: list(stored.values()).count(fmt) for fmt in set(stored.values())}
    assert all(f"{n} {fmt}" in out.splitlines()[-1] for fmt, n in counts.items())  # (convert's summary)
    if kind == "q4km":  # llama.cpp's mixture: the head (tied: the embedding) and layer 1's v/down in Q6_K
        assert {n for n, fmt in stored.items() if fmt == "Q6_K"} == {
            "model.embed_tokens.weight", "lm_head.weight", "model.layers.1.self_attn.v_proj.weight",
            "model.layers.1.mlp.down_proj.weight"}
    # the targets are the tensors the converter quantised (the tied head is the embedding), each in
    # the format the file stores it in (q4km: a mixture)
    assert {n: fmt for n, _, fmt in quantizer.params} == {n: stored[n] for n in quantised - {"lm_head.weight"}}
    ids = torch.randint(0, 272, (2, 20))
    with quantizer.applied():
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), deployed.get_parameter(name).detach(), rtol=0, atol=0, msg=name)
        logits, grads = _logits_and_grads(model, ids)
    ref_logits, ref_grads = _logits_and_grads(deployed, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    for name in ref_grads:  # the quantised model's gradients (the straight-through estimator)
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=0, msg=name)
    for name, p in model.named_parameters():  # and its own weights back, bit for bit
        assert torch.equal(p.detach(), before[name]), name
    if kind in ("q4", "q4k"):  # (the coarse kinds move every weight matrix)
        assert any(not torch.equal(deployed.get_parameter(n), before[n]) for n in quantised - {"lm_head.weight"})


@pytest.mark.parametrize("kind", ["q4k", "q4", "q8"])
def test_lora_trains_the_merged_weight_the_converted_file_holds(kind, tmp_path):
    """With LoRA the converter merges each adapter into its weight and quantises the merged weight:
    inside the window the model computes that file's logits, the adapters get the merged weight's
    gradient through the merge (dA = s B^T G, dB = s G A^T, G the file's weight gradient), the base
    model (adapters off) is the full-precision one, and after it every weight is its own again."""
    from apr_kernels.model.lora import adapters_disabled, add_lora, lora_modules

    torch.manual_seed(0)
    model = Transformer(sixteen_config(), fast=False)
    add_lora(model, 4, 8.0, ["q_proj", "v_proj", "o_proj", "down_proj"])
    with torch.no_grad():  # (trained adapters: the merge moves the weights)
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.05)
    save_checkpoint(tmp_path / "m.apr", model=model)
    assert cli(["convert", str(tmp_path / "m.apr"), str(tmp_path / "q.apr"), "--quantize", kind])[0] == 0
    deployed = from_apr(tmp_path / "q.apr", fast=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 272, (2, 20))
    with adapters_disabled(model):
        base_logits = model(ids).detach()
    quantizer = qat.FakeQuantizer(model, kind)
    assert not any(".lora_" in n for n, _, _ in quantizer.params)
    with quantizer.applied():
        logits, grads = _logits_and_grads(model, ids)
        with adapters_disabled(model):  # (LoRA's reference model under --qat)
            assert torch.equal(model(ids).detach(), base_logits)
        assert torch.equal(model(ids).detach(), logits)  # (and the quantised weights back after it)
    ref_logits, ref_grads = _logits_and_grads(deployed, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=2e-5)
    assert not torch.allclose(logits, base_logits, atol=1e-3)
    for name, m in lora_modules(model).items():
        g = ref_grads[f"{name}.weight"]
        torch.testing.assert_close(grads[f"{name}.lora_A"], m.scale * m.lora_B.detach().T @ g, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(grads[f"{name}.lora_B"], m.scale * g @ m.lora_A.detach().T, rtol=1e-4, atol=1e-7)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


def _dora_expected_grads(m, g: torch.Tensor, deployed_weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradients DoRA's factors get from the converted file's weight gradient ``g`` (of its weight
    ``q(M)``, ``M = gain (W + s B A)``, ``gain = magnitude / ||W + s B A||_row`` without gradient, as
    DoRA trains): A and B through the merge (the straight-through estimator), the magnitude through
    the quantised rows themselves, ``<g_r, q(M)_r> / magnitude_r`` (the quantisers are equivariant to a
    row's scale, so that is how q(M) moves with it)."""
    frozen = m.weight.detach().float()  # (a quantised base's: its blocks dequantised)
    a, b, mag = m.lora_A.detach().float(), m.lora_B.detach().float(), m.lora_magnitude.detach().float()
    gain = mag / (frozen + m.scale * b @ a).norm(dim=1)
    gm = g * gain[:, None]
    return {"lora_A": m.scale * b.T @ gm, "lora_B": m.scale * gm @ a.T,
            "lora_magnitude": (g * deployed_weight).sum(dim=1) / mag}


@pytest.mark.parametrize("kind", ["q4k", "q8"])
def test_dora_trains_the_rescaled_merged_weight_the_converted_file_holds(kind, tmp_path):
    """DoRA: the converter writes ``q(gain (W + s B A))``; inside the window the frozen weight holds
    ``q(M) / gain - s B A`` and the module takes the full-precision weight's row norms for its gain,
    so the model computes the converted file's logits, the factors get the gradients above, and after
    it every weight is its own again."""
    from apr_kernels.model.lora import adapters_disabled, add_lora, lora_modules

    torch.manual_seed(0)
    model = Transformer(sixteen_config(), fast=False)
    add_lora(model, 4, 8.0, ["q_proj", "v_proj", "o_proj", "down_proj"], dora=True)
    with torch.no_grad():  # (trained adapters and magnitudes: the merge moves and rescales the rows)
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.05)
            m.lora_magnitude.mul_(torch.empty_like(m.lora_magnitude).uniform_(0.8, 1.25))
    save_checkpoint(tmp_path / "m.apr", model=model)
    assert cli(["convert", str(tmp_path / "m.apr"), str(tmp_path / "q.apr"), "--quantize", kind, "-q"])[0] == 0
    deployed = from_apr(tmp_path / "q.apr", fast=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 272, (2, 20))
    with adapters_disabled(model):
        base_logits = model(ids).detach()
    plain_logits = model(ids).detach()
    quantizer = qat.FakeQuantizer(model, kind)
    with quantizer.applied():
        logits, grads = _logits_and_grads(model, ids)
        with adapters_disabled(model):
            assert torch.equal(model(ids).detach(), base_logits)
    ref_logits, ref_grads = _logits_and_grads(deployed, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=2e-5)
    assert not torch.allclose(logits, plain_logits, atol=1e-3)
    for name, m in lora_modules(model).items():
        assert m.qat_norm is None
        expected = _dora_expected_grads(m, ref_grads[f"{name}.weight"], deployed.get_parameter(f"{name}.weight").detach())
        for part, want in expected.items():
            torch.testing.assert_close(grads[f"{name}.{part}"], want, rtol=2e-4, atol=1e-7, msg=f"{name}.{part}")
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
    assert torch.equal(model(ids).detach(), plain_logits)


@pytest.mark.parametrize("kind,arch,dora", [("q4k", "qwen2", False), ("q8", "qwen2", True), ("q4k", "qwen2_moe", False)])
def test_a_quantised_base_trains_for_its_merged_weight_requantised(kind, arch, dora, tmp_path):
    """QLoRA (the adapters on the file's Q4_K blocks): the converter dequantises each base, merges the
    adapters and quantises the merged weight again; inside the window the model computes that file's
    logits, the adapters get the merged weight's gradient (the chain rule from the file's weight
    gradients), the fused q/k/v path and the grouped experts' GEMMs do likewise, and after it every
    base holds its stored blocks."""
    from apr_kernels.model.lora import QuantizedLoRALinear, lora_modules
    from apr_kernels.quant import quantize
    from apr_kernels.train.checkpoint import model_metadata, model_tensors

    torch.manual_seed(0)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256, shared_expert_intermediate_size=256,
               tie_word_embeddings=False) if arch == "qwen2_moe" else {}
    cfg = sixteen_config(architecture=arch, hidden_size=256, intermediate_size=512, num_heads=4, head_dim=64, **moe)
    base = Transformer(cfg, fast=False)
    tensors = {n: (quantize("Q4_K", t.materialize()) if n.endswith("proj.weight") else t.materialize())
               for n, t in model_tensors(base).items()}
    apr_kernels.save(tensors, tmp_path / "q4k.apr", metadata=model_metadata(base))
    lora = {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], "seed": 1,
            "dora": dora}
    ids = torch.randint(0, 272, (2, 20))
    for fast in (False, True):
        model = from_apr(tmp_path / "q4k.apr", fast=fast, lora_init=lora, keep_quantized=True)
        mods = lora_modules(model)
        assert all(isinstance(m, QuantizedLoRALinear) for m in mods.values())
        with torch.no_grad():  # (trained adapters: the merge moves the weights; DoRA's rescales the rows)
            for m in mods.values():
                m.lora_B.normal_(0, 0.05)
                if dora:
                    m.lora_magnitude.mul_(torch.empty_like(m.lora_magnitude).uniform_(0.8, 1.25))
        stored = {n: m.base_weight(torch.float32).clone() for n, m in mods.items()}
        save_checkpoint(tmp_path / "step.apr", model=model)
        assert cli(["convert", str(tmp_path / "step.apr"), str(tmp_path / "q.apr"), "--quantize", kind, "-q"])[0] == 0
        deployed = from_apr(tmp_path / "q.apr", fast=False)
        quantizer = qat.FakeQuantizer(model, kind)
        assert len(quantizer.bases) == len(mods)
        with quantizer.applied():
            logits, grads = _logits_and_grads(model, ids)
        ref_logits, ref_grads = _logits_and_grads(deployed, ids)
        torch.testing.assert_close(logits, ref_logits, rtol=0, atol=2e-5)
        for name, m in mods.items():
            g = ref_grads[f"{name}.weight"]
            if dora:
                expected = _dora_expected_grads(m, g, deployed.get_parameter(f"{name}.weight").detach())
            else:
                expected = {"lora_A": m.scale * m.lora_B.detach().T @ g, "lora_B": m.scale * g @ m.lora_A.detach().T}
            for part, want in expected.items():
                torch.testing.assert_close(grads[f"{name}.{part}"], want, rtol=2e-4, atol=1e-7, msg=f"{name}.{part}")
            assert m.qat_blocks is None and m.qat_norm is None, name
            assert torch.equal(m.base_weight(torch.float32), stored[name]), name


def test_refusals_name_the_reason(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"--qat 'int4': expected one of q4k, q6k, q8, q4, q4km"):
        qat.check("int4")
    with pytest.raises(ValueError, match="--qat gguf:q4km with --lora-quantized-base: a quantised base trains for"):
        qat.check("gguf:q4km", quantized_base=True)
    qat.check("q4", quantized_base=True)
    code, _ = cli(["train", "--init", str(tmp_path / "absent.apr"), "--tokenizer", "bytes", "--data", HELD,
                   "--lora-rank", "2", "--lora-quantized-base", "--qat", "gguf:q8_0", "--out", str(tmp_path / "no")])
    assert code != 0  # (before the file is read)
    assert "--qat gguf:q8_0 with --lora-quantized-base: a quantised base" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def init(tmp_path_factory) -> Path:
    return sixteen_init(tmp_path_factory.mktemp("qat") / "init.apr")


def _train(init: Path, out: Path, *extra: str) -> list[str]:
    return train_args(init, out, "--grad-accum", "2", "--lr", "1e-2", *extra)


def test_a_qat_run_reports_the_quantised_files_loss_and_resumes_exactly(init, tmp_path, capsys):
    code, run = cli(_train(init, tmp_path / "run", "--qat", "q4k"))
    assert code == 0
    code, plain = cli(_train(init, tmp_path / "plain"))
    assert code == 0
    assert records(run)[0]["qat"] == "q4k"
    assert losses(run) != pytest.approx(losses(plain), rel=1e-6)  # the steps saw other weights
    final = [r for r in records(run) if r["event"] == "eval"][-1]
    # the converted checkpoint's loss is the run's eval_loss_quantized; the checkpoint's own, eval_loss
    assert cli(["convert", str(tmp_path / "run" / "model.apr"), str(tmp_path / "q.apr"), "--quantize", "q4k"])[0] == 0
    for path, key in ((tmp_path / "q.apr", "eval_loss_quantized"), (tmp_path / "run" / "model.apr", "eval_loss")):
        code, out = cli(["eval", "--init", str(path), "--data", HELD, "--max-tokens", "160", "--seq-len", "32"])
        assert code == 0
        assert float(out.strip().splitlines()[-1].split()[0].removeprefix("eval_loss=")) == pytest.approx(
            final[key], abs=2e-6), key
    code, resumed = cli(["train", "--resume", str(tmp_path / "run" / "step_000002.apr"), "--out",
                         str(tmp_path / "again"), "--json", "--no-progress"])
    assert code == 0
    assert losses(resumed) == pytest.approx(losses(run)[2:], rel=1e-6)
    capsys.readouterr()
    code, _ = cli(["train", "--resume", str(tmp_path / "run" / "step_000002.apr"), "--qat", "q8",
                   "--out", str(tmp_path / "no")])
    assert code != 0
    assert re.search(r"--qat q8 with --resume .*: the run was trained with --qat q4k", capsys.readouterr().err)


def test_qat_on_two_ranks_matches_one_process(init, tmp_path):
    """FSDP with APR_Q8 (one scale per tensor: each weight gathered to quantise it) and APR_Q4 (rows of
    whole blocks: each rank its own rows), DDP with Q4_K, and a Qwen2-MoE model's experts spread over
    the ranks (expert parallelism under FSDP, APR_Q8), and each row's positions split (context
    parallelism, Q4_K), and each projection split over the ranks (tensor parallelism: Q4_K, whose
    row-parallel columns are not whole 256-value blocks, so each weight is joined to quantise it;
    APR_Q4, o_proj's columns whole 32-value blocks alone and down_proj's 48 joined; APR_Q8 of a
    Qwen2-MoE model, experts and vocabulary split too), and DoRA (the merged weights, their rows
    rescaled, quantised: FSDP, APR_Q8, each rank its rows' norms and the module all of them;
    tensor parallelism, APR_Q4, the row-parallel rows' norms summed over the ranks; and on an APR_Q8
    base for APR_Q4, each rank quantising the whole merged weight: under FSDP keeping its share of the blocks,
    split keeping its part, rows or o_proj's 32 columns, or down_proj's whole blocks, its 48 columns a
    rank not whole blocks; a Qwen2-MoE's experts spread over the ranks, each expert's blocks shared by
    its replicas), and GGUF's types (gguf:q4km under FSDP; gguf:q5km split, its
    Q5_0/Q5_1 rows of 32-value blocks: o_proj's 32 columns a rank alone, down_proj's 48 joined): one
    process's quantised weights (the first
    step's loss and gradient norm, the first evaluation: the same weights quantised alike), then its
    training within a looser tolerance: quantisation is discontinuous, so a weight that the ranks'
    other summation order moves by a rounding error can land on the other side of a level."""
    # (its experts under FSDP: sharded over their replicas, gathered for APR_Q8)
    moe = sixteen_init(tmp_path / "moe.apr", seed=4, architecture="qwen2_moe", num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, shared_expert_intermediate_size=64, tie_word_embeddings=False)
    apr_q8 = _quantised_init(tmp_path / "apr_q8.apr", "APR_Q8")  # (requantised to APR_Q4 from the first step)
    moe_q8 = _quantised_init(tmp_path / "moe_q8.apr", "APR_Q8", architecture="qwen2_moe", num_experts=4,
                             num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                             tie_word_embeddings=False)
    runs = {"fsdp_q8": (init, "q8", "fsdp"), "fsdp_q4": (init, "q4", "fsdp"), "ddp_q4k": (init, "q4k", "ddp"),
            "fsdp_gguf": (init, "gguf:q4km", "fsdp"), "tp_gguf": (init, "gguf:q5km", "ddp"),
            "ep_q8": (moe, "q8", "fsdp"), "cp_q4k": (init, "q4k", "ddp"), "tp_q4k": (init, "q4k", "ddp"),
            "tp_q4": (init, "q4", "ddp"), "tp_q8": (moe, "q8", "ddp"), "lora_fsdp_q8": (init, "q8", "fsdp"),
            "lora_tp_q4": (init, "q4", "ddp"), "qlora_fsdp_q4": (apr_q8, "q4", "fsdp"),
            "qlora_tp_q4": (apr_q8, "q4", "ddp"), "qlora_ep_q4": (moe_q8, "q4", "fsdp")}
    lora = ["--lora-rank", "4", "--lora-targets", "q_proj,v_proj,o_proj,down_proj", "--lora-dora"]
    qlora = [*lora, "--lora-quantized-base"]
    adapters = {"lora_fsdp_q8": lora, "lora_tp_q4": lora, "qlora_fsdp_q4": qlora, "qlora_tp_q4": qlora,
                "qlora_ep_q4": ["--lora-rank", "4", "--lora-quantized-base"]}
    split = {"ep_q8": ["--expert-parallel", "2"], "qlora_ep_q4": ["--expert-parallel", "2"], "cp_q4k": ["--context-parallel", "2"],
             **{name: ["--tensor-parallel", "2"] for name in ("tp_q4k", "tp_q4", "tp_q8", "tp_gguf", "lora_tp_q4",
                                                             "qlora_tp_q4")}}
    launched = {name: (_train(path, tmp_path / name, "--qat", kind, "--parallel", mode, *adapters.get(name, []),
                              *split.get(name, [])), 2)
                for name, (path, kind, mode) in runs.items()}
    references = {name: _train(path, tmp_path / f"one_{name}", "--qat", kind, *adapters.get(name, []))
                  for name, (path, kind, _) in runs.items()}
    one, out = against_one_process(launched, references, tmp_path / "launch")
    for name in runs:
        got, ref = losses(out[name]), losses(one[name])
        assert got[0] == pytest.approx(ref[0], rel=1e-6), name
        assert losses(out[name], key="grad_norm")[0] == pytest.approx(losses(one[name], key="grad_norm")[0],
                                                                        rel=1e-5), name
        for key in ("eval_loss", "eval_loss_quantized"):
            assert losses(out[name], "eval", key)[0] == pytest.approx(losses(one[name], "eval", key)[0],
                                                                        rel=1e-6), name
        assert got == pytest.approx(ref, rel=2e-3), name


def test_a_lora_qat_run_reports_the_converted_files_loss(init, tmp_path):
    """train --lora-rank --qat: the checkpoint's converter output (adapters merged, then quantised) has
    the run's eval_loss_quantized; the first step starts from the quantised base (the adapters' B at 0:
    the full fine-tune's first loss)."""
    lora = ["--lora-rank", "4", "--lora-alpha", "16"]
    code, run = cli(_train(init, tmp_path / "run", "--qat", "q4k", *lora))
    assert code == 0
    code, full = cli(_train(init, tmp_path / "full", "--qat", "q4k", "--steps", "1"))
    assert code == 0
    assert losses(run)[0] == pytest.approx(losses(full)[0], rel=1e-6)
    final = [r for r in records(run) if r["event"] == "eval"][-1]
    assert final["eval_loss"] != pytest.approx(final["eval_loss_quantized"], rel=1e-5)
    assert cli(["convert", str(tmp_path / "run" / "model.apr"), str(tmp_path / "q.apr"), "--quantize", "q4k"])[0] == 0
    code, out = cli(["eval", "--init", str(tmp_path / "q.apr"), "--data", HELD, "--max-tokens", "160", "--seq-len", "32"])
    assert code == 0
    assert float(out.strip().splitlines()[-1].split()[0].removeprefix("eval_loss=")) == pytest.approx(
        final["eval_loss_quantized"], abs=2e-5)


def test_post_training_steps_see_the_quantised_weights(init, tmp_path):
    """dpo and grpo with --qat: the first step (before any update) is the same step as from the converted
    file itself: the same SimPO loss and gradient norm, and for grpo the same rewards and loss, whose
    importance ratios divide by the sampling policy's log-probabilities (so the sampling ran on the
    quantised weights too). No reference model in either (its weights would be the full-precision
    ones under --qat)."""
    assert cli(["convert", str(init), str(tmp_path / "q.apr"), "--quantize", "q4"])[0] == 0
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Is {t} hot? A:", "chosen": " yes", "rejected": " no"}) + "\n"
                             for t in ("fire", "lava", "the sun", "a stove", "an oven", "a kettle", "coal", "ice")))
    (tmp_path / "rewards.py").write_text(
        "def letters(prompts, completions, **kw):\n"
        "    return [sum(c.islower() for c in t) / max(1, len(t)) for t in completions]\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Write:", "Say:", "Go:", "Now:")))
    common = ["--tokenizer", "bytes", "--steps", "2", "--lr", "1e-2", "--json", "--seed", "5", "--fast", "off"]
    dpo = ["dpo", "--data", str(pairs), "--batch-size", "4", "--loss", "simpo", "--max-len", "40",
           "--eval-fraction", "0.25", *common]
    # (grpo: two updates per sampling, so the sampling policy's log-probabilities enter the loss)
    grpo = ["grpo", "--data", str(prompts), "--reward", f"{tmp_path / 'rewards.py'}:letters", "--batch-size", "2",
            "--num-generations", "3", "--max-new-tokens", "6", "--max-prompt-len", "16", "--num-iterations", "2",
            "--eval-data", str(prompts), *common]
    for name, argv in (("dpo", dpo), ("grpo", grpo)):
        code, trained = cli([argv[0], "--init", str(init), "--qat", "q4", *argv[1:], "--out", str(tmp_path / name)])
        assert code == 0, name
        code, converted = cli([argv[0], "--init", str(tmp_path / "q.apr"), *argv[1:],
                               "--out", str(tmp_path / f"{name}_q")])
        assert code == 0, name
        assert records(trained)[0]["qat"] == "q4"
        first, ref = (next(r for r in records(out) if r["event"] == "train") for out in (trained, converted))
        for key in ("loss", "grad_norm", *(("reward",) if name == "grpo" else ())):
            assert first[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (name, key)
        # the evaluation before training: the quantised values are the converted file's
        evals, ref_evals = (next(r for r in records(out) if r["event"] == "eval") for out in (trained, converted))
        measures = [k for k in ref_evals if isinstance(ref_evals[k], float)]
        assert measures, name
        for key in measures:
            assert evals[f"{key}_quantized"] == pytest.approx(ref_evals[key], rel=1e-5, abs=1e-7), (name, key)
        if name == "dpo":  # (and the full-precision ones are the checkpoint's own: other values)
            assert evals["eval_loss"] != pytest.approx(evals["eval_loss_quantized"], rel=1e-7)


def _quantised_init(path: Path, fmt: str, **config) -> Path:
    """``path``: an APR file of a ``sixteen_config(**config)`` model whose projections are stored in ``fmt``."""
    from apr_kernels.quant import quantize
    from apr_kernels.train.checkpoint import model_metadata, model_tensors

    torch.manual_seed(0)
    base = Transformer(sixteen_config(**config), fast=False)
    tensors = {n: (quantize(fmt, t.materialize()) if n.endswith("proj.weight") else t.materialize())
               for n, t in model_tensors(base).items()}
    apr_kernels.save(tensors, path, metadata=model_metadata(base))
    return path


def test_a_qlora_qat_run_reports_the_converted_files_loss(tmp_path):
    """train --lora-quantized-base --qat q4k from a Q4_K file: the converter's output of the checkpoint
    (each base dequantised, merged, quantised again) has the run's eval_loss_quantized."""
    _quantised_init(tmp_path / "q4k.apr", "Q4_K", hidden_size=256, intermediate_size=512, num_heads=4, head_dim=64)
    code, run = cli(_train(tmp_path / "q4k.apr", tmp_path / "run", "--qat", "q4k", "--lora-rank", "4",
                           "--lora-quantized-base"))
    assert code == 0
    final = [r for r in records(run) if r["event"] == "eval"][-1]
    assert cli(["convert", str(tmp_path / "run" / "model.apr"), str(tmp_path / "q.apr"), "--quantize", "q4k"])[0] == 0
    code, out = cli(["eval", "--init", str(tmp_path / "q.apr"), "--data", HELD, "--max-tokens", "160", "--seq-len", "32",
                     "--tokenizer", "bytes"])
    assert code == 0
    assert float(out.strip().splitlines()[-1].split()[0].removeprefix("eval_loss=")) == pytest.approx(
        final["eval_loss_quantized"], abs=2e-5)


def test_lora_grpo_reference_is_the_full_precision_base(init, tmp_path):
    """grpo --beta with LoRA and --qat: the KL penalty's reference is the base model with the adapters
    off, in full precision (as a full fine-tune's reference model is), while the policy samples and
    learns on the quantised merged weights. At the first step (B = 0: the merged weights are the
    base's) the rewards, loss and KL are the full fine-tune's, whose reference is a separate model."""
    (tmp_path / "rewards.py").write_text(
        "def letters(prompts, completions, **kw):\n"
        "    return [sum(c.islower() for c in t) / max(1, len(t)) for t in completions]\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Write:", "Say:", "Go:", "Now:")))
    argv = ["grpo", "--init", str(init), "--data", str(prompts), "--reward", f"{tmp_path / 'rewards.py'}:letters",
            "--batch-size", "2", "--num-generations", "3", "--max-new-tokens", "6", "--max-prompt-len", "16",
            "--beta", "0.5", "--tokenizer", "bytes", "--steps", "1", "--json", "--seed", "5", "--fast", "off",
            "--qat", "q4"]
    firsts = {}
    for name, extra in (("full", []), ("lora", ["--lora-rank", "4"])):
        code, out = cli([*argv, *extra, "--out", str(tmp_path / name)])
        assert code == 0, name
        firsts[name] = next(r for r in records(out) if r["event"] == "train")
    assert firsts["full"]["kl"] > 1e-6  # (the quantised policy is not its reference)
    for key in ("reward", "loss", "kl"):
        assert firsts["lora"][key] == pytest.approx(firsts["full"][key], rel=1e-5, abs=1e-8), key


def test_eval_quantize_scores_the_file_convert_would_write(init, tmp_path):
    """eval --quantize KIND = convert --quantize KIND, then eval (held-out loss and multiple choice), and
    generate --quantize likewise; tensors the file already stores in blocks are left as they are, as
    the converter passes them."""
    def last_line(path, *argv) -> str:
        code, out = cli(["eval", "--init", str(path), "--tokenizer", "bytes", *argv])
        assert code == 0, argv
        return out.strip().splitlines()[-1]

    choices = tmp_path / "choices.jsonl"
    choices.write_text("".join(json.dumps({"context": f"Is {t} hot?", "choices": [" yes", " no", " maybe"],
                                           "answer": i % 3}) + "\n"
                               for i, t in enumerate(("fire", "ice", "lava", "snow", "tea", "steam"))))
    data = ["--data", HELD, "--max-tokens", "160", "--seq-len", "32"]
    for kind in ("q4k", "q8", "q4km"):
        assert cli(["convert", str(init), str(tmp_path / f"{kind}.apr"), "--quantize", kind])[0] == 0
        for what in (data, ["--choices", str(choices), "--json"]):
            assert last_line(init, "--quantize", kind, *what) == last_line(tmp_path / f"{kind}.apr", *what), kind
    assert last_line(init, *data) != last_line(init, "--quantize", "q4k", *data)
    # generate --quantize: the converted file's greedy continuation
    greedy = ["--tokenizer", "bytes", "--prompt", "def ", "--max-new-tokens", "24", "--temperature", "0", "--json"]
    outs = [cli(["generate", "--init", str(path), *greedy, *extra])[1]
            for path, extra in ((init, ["--quantize", "q4k"]), (tmp_path / "q4k.apr", []))]
    assert outs[0] == outs[1] and json.loads(outs[0].strip().splitlines()[-1])
    # a file already in blocks: --quantize leaves them (q8 of a Q4_K file is the Q4_K file)
    assert last_line(tmp_path / "q4k.apr", "--quantize", "q8", *data) == last_line(tmp_path / "q4k.apr", *data)


def test_gguf_kinds_run_the_weights_of_the_gguf_file(init, tmp_path, capsys):
    """eval --quantize gguf:q4km and train --qat gguf:q4km use the weights of the GGUF file `export
    --quantize q4km` writes (llama-quantize's bytes, tests/test_quant_recipe.py): that file, read back
    (``convert``: its Q5_0 / Q8_0 fallbacks of this 64-wide model dequantised by the ``gguf``
    package), holds exactly the weights the model holds inside a --qat step, and gives the held-out loss
    eval --quantize reports. A file already in blocks is refused, as export refuses it."""
    assert cli(["export", str(init), str(tmp_path / "q.gguf"), "--quantize", "q4km", "-q"])[0] == 0
    assert cli(["convert", str(tmp_path / "q.gguf"), str(tmp_path / "back.apr"), "-q"])[0] == 0
    deployed = from_apr(tmp_path / "back.apr", fast=False)
    model = from_apr(init, fast=False)
    quantizer = qat.FakeQuantizer(model, "gguf:q4km")
    assert {fmt for _, _, fmt in quantizer.params} == {"Q5_0", "Q8_0"}  # (rows of 64 and 96 values)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with quantizer.applied():
        for name, p in model.named_parameters():
            assert torch.equal(p.detach(), deployed.get_parameter(name).detach()), name
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    data = ["--data", HELD, "--max-tokens", "160", "--seq-len", "32", "--tokenizer", "bytes"]
    outs = [cli(["eval", "--init", str(path), *data, *extra])[1].strip().splitlines()[-1]
            for path, extra in ((init, ["--quantize", "gguf:q4km"]), (tmp_path / "back.apr", []))]
    assert outs[0] == outs[1] and outs[0].startswith("eval_loss=")
    assert cli(["convert", str(init), str(tmp_path / "q8.apr"), "--quantize", "q8", "-q"])[0] == 0
    code, _ = cli(["eval", "--init", str(tmp_path / "q8.apr"), *data, "--quantize", "gguf:q4km"])
    assert code != 0
    assert "tensors are stored in blocks already" in capsys.readouterr().err


@pytest.mark.cuda
def test_cuda_fake_quantize_matches_the_host():
    """On the GPU (where --qat quantises every weight each step) the quantiser gives the host's blocks:
    the same values for APR_Q8/APR_Q4, and for the searched Q4_K/Q6_K fits all but near-tied blocks."""
    from apr_kernels.quant import fake_quantize

    torch.manual_seed(0)
    w = torch.randn(1024, 896) * 0.02  # Qwen2-0.5B's width: rows of padded blocks
    for kind in ("APR_Q8", "APR_Q4", "Q4_K", "Q6_K"):
        host, gpu = fake_quantize(kind, w), fake_quantize(kind, w.cuda()).cpu()
        same = (host == gpu).reshape(-1, 32).all(dim=1).float().mean()
        assert same == 1.0 if kind.startswith("APR") else same > 0.999, (kind, float(same))
