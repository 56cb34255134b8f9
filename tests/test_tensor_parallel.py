"""Tensor parallelism (``train --parallel ddp|fsdp --tensor-parallel N``): every layer's heads and MLP
rows split over groups of N ranks (Megatron-LM's column/row-parallel layout), against one process
training on the same global batch: losses, gradient norms (clipped by the whole model's norm),
held-out losses and the gathered checkpoint's weights and optimizer state.

DDP: Qwen2 (q/k/v bias, tied) on 2 ranks in one group (the fast path in Triton's interpreter, each
layer compiled, activation checkpointing), a dense Qwen3 (q/k norms: whole weights on split heads,
their gradients summed) on 4 ranks in 2 replicated groups of 2. FSDP: an untied Llama on 4 ranks in 2
groups of 2 (each rank's parts sharded over its replica), and on 4 ranks in one group of 4 (selective
activation checkpointing: the kept all-reduces are not redone). LoRA (DDP, the fast path) and DoRA
(FSDP, 4 ranks in 2 groups) adapters split with their projections. Sequence parallelism (DDP, FSDP,
HSDP on 8 ranks). Context parallelism around it (FSDP, 4 ranks; also with sequence parallelism, and so
inside 2 pipeline stages on 8 ranks). Muon (DDP, FSDP). 8-bit AdamW (DDP, FSDP: one process's codes).
QLoRA (Q4_K, DDP; DoRA on APR_Q8 blocks, FSDP). Mixture of experts (Qwen2-MoE on the grouped-GEMM
path, DDP; Mixtral with sequence parallelism, FSDP; and inside 2 pipeline stages with its experts
spread over 2 ranks a stage, 8 ranks). The embedding and head split by vocabulary range (or whole, for
a vocabulary of 321). A one-process step checkpoint resumed split and sharded (also a DoRA, a Muon, an
8-bit AdamW and a QLoRA one), split ones resumed in one process, a DoRA checkpoint as --init folded
into each rank's part. The sampling commands (GRPO, RLOO, online DPO) decoding on split layers,
distillation (GKD, train --teacher). In one process: the split itself against the whole layer's
numbers (forward and every gradient, on a group of one standing in for the exchange), the
vocabulary-split loss against F.cross_entropy, the refusals."""

from __future__ import annotations

import pytest
import torch

from rank_runs import against_one_process, launch_by_world, outputs
from test_distributed import (COMMON, _cli, _losses, _post_training_args, _records, _resumed_here, _same_checkpoint,
                              _same_run, _sampling_args, _tensors)


def _split_run(args, out, tp: int, mode: str) -> list[str]:
    return [*args, "--parallel", mode, "--tensor-parallel", str(tp), "--out", str(out)]


def _config(name: str):
    """A small config by name; ``-odd``: a vocabulary of 321 (no even split: embedding and head whole)."""
    from apr_kernels.model import preset

    if name.endswith("-odd"):
        return _config(name.removesuffix("-odd")).replace(vocab_size=321)
    llama = preset("tiny_llama")
    return {
        # GQA 2:1 on each rank of 2; bias split with its rows
        "qwen2": preset("tiny_qwen2").replace(num_heads=4, num_kv_heads=2, hidden_size=64, intermediate_size=96),
        "qwen3": llama.replace(architecture="qwen3", qk_norm=True, head_dim=16, num_heads=4, num_kv_heads=2,
                               rms_norm_eps=1e-6),
        "llama": llama.replace(tie_word_embeddings=False),  # (6 heads, 2 KV heads, intermediate 104)
        "llama4": llama.replace(num_heads=8, num_kv_heads=4, head_dim=8),  # one K/V head per rank of 4
        # 8-bit AdamW: every split part whole 256-value blocks of its tensor (o_proj's and down_proj's
        # 256 columns a rank; under FSDP over 2 ranks too), so its moments are one process's 8-bit ones
        "wide": preset("tiny_qwen2").replace(num_heads=4, num_kv_heads=2, head_dim=128, hidden_size=64,
                                             intermediate_size=512, vocab_size=320),
        # mixture of experts: every expert's rows and columns split, the router whole (a shared expert
        # and a dense layer in Qwen2-MoE)
        "qwen2moe": preset("tiny_qwen2_moe").replace(num_heads=4, num_kv_heads=2),
        "mixtral": preset("tiny_mixtral"),
        "wide-llama": llama.replace(tie_word_embeddings=False, num_heads=4, num_kv_heads=2, head_dim=128,
                                    intermediate_size=512, vocab_size=320, hidden_size=64),
    }[name]


# name: (config, extra options, world size, tensor-parallel size, --parallel, options of the split run only)
CASES = {
    "qwen2_ddp": ("qwen2", ["--fast", "on", "--grad-checkpointing", "--compile"], 2, 2, "ddp", []),
    # fp16 loss scaling: an overflow in any rank's part skips every rank's step (ShardedGradScaler)
    "qwen3_ddp": ("qwen3-odd", ["--precision", "fp16"], 4, 2, "ddp", []),
    "llama_fsdp": ("llama", [], 4, 2, "fsdp", []),
    "llama_fsdp4": ("llama4", ["--grad-checkpointing", "selective"], 4, 4, "fsdp", []),
    # adapters split with their projections: LoRA on the fast path (the fused q/k/v GEMM's three
    # low-rank terms), DoRA sharded (a row-parallel projection's row norms summed over the group)
    "qwen2_lora": ("qwen2", ["--lora-rank", "4", "--lr", "1e-2", "--fast", "on"], 2, 2, "ddp", []),
    "llama_dora_fsdp": ("llama", ["--lora-rank", "4", "--lora-dora", "--lr", "1e-2"], 4, 2, "fsdp", []),
    # sequence parallelism: each rank its half of the positions outside the split blocks; the fast
    # path with selective checkpointing (the kept reduce-scatters)
    # (the embedding and head whole: their gradients summed over the group), and sharded with label
    # smoothing, z-loss (the vocabulary-split loss's terms), document masks (the spans of the whole
    # rows, gathered) and Qwen3's per-head norms
    "qwen2_sp": ("qwen2-odd", ["--fast", "on", "--grad-checkpointing", "selective"], 2, 2, "ddp",
                 ["--sequence-parallel"]),
    "qwen3_sp_fsdp": ("qwen3", ["--document-mask", "--label-smoothing", "0.1", "--z-loss", "1e-3"], 4, 2, "fsdp",
                      ["--sequence-parallel"]),
    # HSDP: 2 "nodes" of 4 ranks, each 2 groups of 2 splitting the layers, each rank's parts sharded
    # over its node's 2 ranks holding the same parts and replicated across the nodes
    "qwen2_hsdp": ("qwen2", [], 8, 2, "fsdp", ["--fsdp-shard-size", "4", "--sequence-parallel"]),
    # context parallelism around it: 4 ranks = 2 context-parallel ranks (2 apart) x 2 tensor-parallel,
    # each its chunks of the positions and its heads of them, document masks across the chunks
    "llama_cp": ("llama", ["--document-mask"], 4, 2, "fsdp", ["--context-parallel", "2"]),
    # and sequence parallelism inside: each context-parallel rank's positions (2 zigzag chunks) split
    # over its tensor-parallel pair between the blocks (RoPE positions and document spans of the
    # context-parallel rank's, the vocabulary-split loss over them), grouped-query heads of those
    "llama_cp_sp": ("llama", ["--document-mask"], 4, 2, "fsdp", ["--context-parallel", "2", "--sequence-parallel"]),
    # and both inside 2 pipeline stages (the 4-D layout: 8 ranks = 2 stages x 2 context-parallel x 2
    # tensor-parallel; each rank sends on its half of its context-parallel rank's positions)
    "llama_pp_cp_sp": ("llama", ["--document-mask"], 8, 2, "fsdp",
                       ["--context-parallel", "2", "--sequence-parallel", "--pipeline-parallel", "2"]),
    # Muon: each split matrix's update gathered whole, orthogonalised, each rank keeping its part
    "qwen2_muon": ("qwen2", ["--optimizer", "muon"], 2, 2, "ddp", []),
    "llama_muon_fsdp": ("llama", ["--optimizer", "muon"], 4, 2, "fsdp", []),
    # 8-bit AdamW: each rank's part of a tensor its blocks of the whole (rows, or o_proj's and
    # down_proj's columns), under FSDP sharded by rows over the part's replicas
    "qwen2_adam8": ("wide", ["--optimizer", "adamw8bit"], 2, 2, "ddp", []),
    "llama_adam8_fsdp": ("wide-llama", ["--optimizer", "adamw8bit"], 4, 2, "fsdp", []),
    # mixture of experts (the load-balancing and router z-losses weighted up: their gradients, computed
    # alike on every rank, count once); Mixtral's block_sparse_moe under sequence parallelism, sharded
    "qwen2moe_ddp": ("qwen2moe", ["--fast", "on", "--router-aux-loss-coef", "0.5", "--router-z-loss-coef", "0.1"], 2,
                     2, "ddp", []),
    "mixtral_sp_fsdp": ("mixtral", ["--router-aux-loss-coef", "0.5", "--router-z-loss-coef", "0.1"], 4, 2, "fsdp",
                        ["--sequence-parallel"]),
    # LoRA on every expert through the grouped GEMMs (the whole-kept factors' gradients summed there too)
    "qwen2moe_lora": ("qwen2moe", ["--fast", "on", "--lora-rank", "4", "--lr", "1e-2"], 2, 2, "ddp", []),
    # QLoRA: the frozen projections the file's quantised blocks (QUANTISED). Each rank holds its part
    # of a base where it is whole blocks (rows; the wide config's o/down columns, 256 a rank), else
    # the whole base (the small config's 64 columns: one padded Q4_K block a row), each GEMM
    # dequantising and taking its part; under FSDP sharded over its replicas; DoRA's row-parallel
    # magnitudes from the whole base's row norms
    "qwen2_qlora": ("qwen2", ["--lora-rank", "4", "--lora-quantized-base", "--lr", "1e-2"], 2, 2, "ddp", []),
    "llama_qdora_fsdp": ("wide-llama", ["--lora-rank", "4", "--lora-dora", "--lora-quantized-base", "--lr", "1e-2"],
                         4, 2, "fsdp", []),
    # (new cases go last: a case's seed is 40 + its index, and some of the above sit near a rounding edge)
    # Mixtral inside 2 pipeline stages with its experts spread too (8 ranks = 2 stages x 2 expert-parallel
    # x 2 tensor-parallel: each rank its part of its experts; the balance terms' routing totals sent on)
    "mixtral_pp_ep": ("mixtral", ["--router-aux-loss-coef", "0.5", "--router-z-loss-coef", "0.1"], 8, 2, "fsdp",
                      ["--sequence-parallel", "--expert-parallel", "2", "--pipeline-parallel", "2"]),
}
QUANTISED = {"qwen2_qlora": "Q4_K", "llama_qdora_fsdp": "Q4_K"}


# cases whose few near-zero gradients AdamW turns into larger weight differences (another summation
# order of the same gradients: the context- and sequence-parallel exchanges; on some CPUs (an AMD EPYC
# with AVX512-BF16) also one value of a LoRA B matrix (7e-5 at step 2) and of Muon's AdamW-trained
# embedding (1.4e-3): the split sums of their gradients round otherwise there)
AMPLIFIED = {"llama_cp_sp", "llama_pp_cp_sp", "qwen2_lora", "llama_muon_fsdp"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from apr_kernels.cli import main
    from apr_kernels.model import Transformer
    from apr_kernels.train.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("tp")
    args = {}
    for i, (name, (config, extra, *_)) in enumerate(CASES.items()):
        if name in QUANTISED:
            from test_lora import _quantised_file

            _quantised_file(root / f"{name}.apr", _config(config), QUANTISED[name], seed=40 + i)
            args[name] = ["train", "--init", str(root / f"{name}.apr"), *COMMON, *extra]
            continue
        torch.manual_seed(40 + i)
        model = Transformer(_config(config), fast=False)
        with torch.no_grad():  # (biases and norms away from their zeros and ones: a misplaced part shows)
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        save_checkpoint(root / f"{name}.apr", model=model)
        args[name] = ["train", "--init", str(root / f"{name}.apr"), *COMMON, *extra]
    runs = {name: (_split_run([*args[name], *only], root / f"tp_{name}", tp, mode), world)
            for name, (_, _, world, tp, mode, only) in CASES.items()}
    # (plain DDP, no tensor parallelism: compiled layers with selective checkpointing, which dynamo's
    # DDP graph splitting broke)
    args["compiled_selective"] = ["train", "--init", str(root / "qwen2_ddp.apr"), *COMMON, "--grad-checkpointing",
                                  "selective", "--compile"]
    runs["compiled_selective"] = (_split_run(args["compiled_selective"], root / "compiled_selective", 1, "ddp"), 2)
    one = {}
    for name in [*CASES, "compiled_selective"]:
        code, one[name] = _cli(main, [*args[name], "--out", str(root / f"one_{name}")])
        assert code == 0
    resume = ["--json", "--no-progress", "--fast", "off", "--dist-timeout", "60"]
    # the one-process step checkpoint resumed on 4 ranks in 2 groups of 2, sharded; likewise a DoRA one
    runs["resumed_tp"] = (_split_run(["train", "--resume", str(root / "one_llama_fsdp" / "step_000002.apr"), *resume],
                                     root / "resumed_tp", 2, "fsdp"), 4)
    dora = root / "one_llama_dora_fsdp" / "step_000002.apr"
    runs["resumed_dora"] = (_split_run(["train", "--resume", str(dora), *resume], root / "resumed_dora", 2, "fsdp"), 4)
    muon = root / "one_llama_muon_fsdp" / "step_000002.apr"  # (Muon's momentum buffers: each rank its part)
    runs["resumed_muon"] = (_split_run(["train", "--resume", str(muon), *resume], root / "resumed_muon", 2, "fsdp"), 4)
    # the DoRA checkpoint as --init: its adapters folded into each rank's part while loading
    args["dora_init"] = ["train", "--init", str(dora), *COMMON]
    code, one["dora_init"] = _cli(main, [*args["dora_init"], "--out", str(root / "one_dora_init")])
    assert code == 0
    runs["dora_init"] = (_split_run(args["dora_init"], root / "tp_dora_init", 2, "ddp"), 2)
    # 8-bit AdamW: a one-process step checkpoint resumed split and sharded; one of the small Qwen2 whose
    # o_proj and down_proj parts are not whole blocks (resumed as fp32 moments), split
    adam8 = root / "one_llama_adam8_fsdp" / "step_000002.apr"
    runs["resumed_adam8"] = (_split_run(["train", "--resume", str(adam8), *resume], root / "resumed_adam8", 2, "fsdp"),
                             4)
    args["adam8_mixed"] = ["train", "--init", str(root / "qwen2_ddp.apr"), *COMMON, "--optimizer", "adamw8bit"]
    code, one["adam8_mixed"] = _cli(main, [*args["adam8_mixed"], "--out", str(root / "one_adam8_mixed")])
    assert code == 0
    mixed = root / "one_adam8_mixed" / "step_000002.apr"
    runs["resumed_adam8_mixed"] = (_split_run(["train", "--resume", str(mixed), *resume], root / "resumed_adam8_mixed",
                                              2, "ddp"), 2)
    # a one-process QLoRA step checkpoint (its quantised base and adapters) resumed split
    qlora = root / "one_qwen2_qlora" / "step_000002.apr"
    runs["resumed_qlora"] = (_split_run(["train", "--resume", str(qlora), *resume], root / "resumed_qlora", 2, "ddp"),
                             2)
    out = outputs(*launch_by_world(runs, root / "ranks"))
    # a split 8-bit step checkpoint resumed in one process
    out["resumed_adam8_one"] = _resumed_here(root / "tp_qwen2_adam8" / "step_000002.apr", root / "resumed_adam8_one")
    # a split LoRA step checkpoint, and a split, sharded one, resumed in one process
    out["resumed_lora_one"] = _resumed_here(root / "tp_qwen2_lora" / "step_000002.apr", root / "resumed_lora_one")
    out["resumed_one"] = _resumed_here(root / "tp_llama_fsdp4" / "step_000002.apr", root / "resumed_one")
    return root, one, out


@pytest.mark.parametrize("name", list(CASES))
def test_tensor_parallel_matches_one_process(runs, name):
    root, one, out = runs
    # fp16: each rank's partial o/down projections rounded to fp16 before they are summed; Muon: its
    # bf16 Newton-Schulz iteration amplifies the rounding of the reductions (as in test_distributed)
    extra = CASES[name][1]
    rel = 1e-4 if "fp16" in extra else 2e-4 if "muon" in extra else 1e-5
    ref, got = _same_run(one[name], out[name], rel=rel, grad_rel=10 * rel)
    assert _losses(got, "eval", "eval_tokens") == _losses(ref, "eval", "eval_tokens")
    # the whole model counted, each rank holding its share of the layers
    (start,) = [r for r in got if r["event"] == "start"]
    (ref_start,) = [r for r in ref if r["event"] == "start"]
    assert start["params"] == ref_start["params"] and start["tensor_parallel"] == CASES[name][3]
    assert start.get("sequence_parallel", False) == ("--sequence-parallel" in CASES[name][5])
    assert start["vocab_parallel"] == (not CASES[name][0].endswith("-odd"))
    assert start["params_rank"] < start["params"]
    # (fp16: AdamW's normalised step turns rounding noise in a near-zero gradient into a difference of up
    # to the learning rate per step; likewise a moment's 8-bit code flipped by that noise (the codes
    # themselves are checked below); the other cases check the placement of every part tightly)
    atol = 4 * 3e-3 if "fp16" in extra else 1e-3 if {"muon", "adamw8bit"} & set(extra) else 5e-5
    for file in ("model.apr", "step_000002.apr"):
        if name in AMPLIFIED:  # (the step-1 gradients agree to 5e-7 relative: checked by hand)
            _within_rare_amplified_rounding(root / f"tp_{name}" / file, root / f"one_{name}" / file, 4 * 3e-3,
                                            tight=max(atol, 1e-4))
        else:
            _same_checkpoint(root / f"tp_{name}" / file, root / f"one_{name}" / file, name, atol=atol)


def test_muon_checkpoint_resumes_split(runs):
    _, one, out = runs
    _resumed_as(out["resumed_muon"], one["llama_muon_fsdp"], rel=2e-4)


def test_lora_checkpoints_resume_and_initialise_across_tensor_parallelism(runs):
    _, one, out = runs
    _resumed_as(out["resumed_dora"], one["llama_dora_fsdp"])
    _resumed_as(out["resumed_lora_one"], one["qwen2_lora"])
    _resumed_as(out["resumed_qlora"], one["qwen2_qlora"])
    ref, _ = _same_run(one["dora_init"], out["dora_init"])
    # (the folded adapters trained: a merged DoRA model, not the base it started from)
    assert _losses(ref)[0] < _losses(_records(one["llama_dora_fsdp"]))[0]


def test_compiled_layers_with_selective_checkpointing_under_ddp(runs):
    _, one, out = runs
    assert _losses(_records(out["compiled_selective"])) == pytest.approx(_losses(_records(one["compiled_selective"])),
                                                                         rel=1e-5)


def test_adamw8bit_split_keeps_one_process_codes_and_resumes_across_layouts(runs):
    """8-bit AdamW under tensor parallelism: the gathered codes are one process's (a value on a
    rounding edge may take another code; a part joined in the wrong order would not match),
    every split matrix 8-bit, row- and column-split alike; step checkpoints resume across layouts
    with the same losses, including parts that are not whole blocks (fp32 moments of the dequantised
    codes: the next update is the same)."""
    root, one, out = runs
    for name in ("qwen2_adam8", "llama_adam8_fsdp"):
        got, want = _tensors(root / f"tp_{name}" / "model.apr")[0], _tensors(root / f"one_{name}" / "model.apr")[0]
        codes = [k for k in want if k.startswith("__training__.adam8.") and ".codes." in k]
        projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        assert len(codes) == 2 * (2 * len(projections) + 1 + ("llama" in name)), name
        for k in codes:  # (a misplaced part would match about 1 in 256; flips compound over the steps)
            assert (got[k] == want[k]).float().mean() > 0.99, (name, k)
    _resumed_as(out["resumed_adam8"], one["llama_adam8_fsdp"])
    _resumed_as(out["resumed_adam8_one"], one["qwen2_adam8"])
    _resumed_as(out["resumed_adam8_mixed"], one["adam8_mixed"])
    state = _tensors(root / "resumed_adam8_mixed" / "model.apr")[0]
    o_proj, q_proj = "model.layers.0.self_attn.o_proj.weight", "model.layers.0.self_attn.q_proj.weight"
    assert f"__training__.adam.exp_avg.{o_proj}" in state  # (32 columns a rank: fp32)
    assert f"__training__.adam8.exp_avg.codes.{q_proj}" in state  # (32 of 64 rows: 8 whole blocks)


def test_step_checkpoints_resume_across_tensor_parallelism(runs):
    _, one, out = runs
    _resumed_as(out["resumed_tp"], one["llama_fsdp"])
    _resumed_as(out["resumed_one"], one["llama_fsdp4"])


def _resumed_as(resumed: str, uninterrupted: str, rel: float = 1e-5) -> None:
    """A run resumed from step 2 continues with the uninterrupted run's losses (its steps 3 and 4)."""
    assert _losses(_records(resumed)) == pytest.approx(_losses(_records(uninterrupted))[2:], rel=rel)


# ------------------------------------------------------------------------ in one process
def _split(model, rank: int, size: int):
    from apr_kernels.train.tensor_parallel import TensorParallel

    tp = TensorParallel(None, rank, size)
    tp.enter = tp.leave = tp.shared = lambda x: x  # (the exchange: done by hand in the test)
    model.set_tensor_parallel(tp)
    return tp


@pytest.mark.parametrize("config", ["qwen2", "qwen3", "llama4", "qwen2-lora", "qwen2-qlora"])
def test_split_layers_add_up_to_the_whole_layer(config):
    """Each rank's attention and MLP on the same input, their outputs summed (what ``leave``
    does): the whole layer's output; each rank's parameter gradients are its rows or columns of the
    whole layer's, and the input gradients and those of the whole-kept parameters (the per-head
    norms; LoRA's A of column-parallel and B of row-parallel projections) summed (what ``enter``'s
    backward does) the whole ones. ``-qlora``: the projections' frozen weights quantised blocks
    (kept whole on each rank, each GEMM taking its part)."""
    from apr_kernels.model import Transformer
    from apr_kernels.model.lora import QuantizedLoRALinear, add_lora, lora_modules, quantize_base
    from apr_kernels.quant import quantize
    from apr_kernels.train.tensor_parallel import COLUMN, ROW, split_dims

    cfg = _config(config.split("-")[0])
    size = 4 if config == "llama4" else 2
    torch.manual_seed(0)
    whole = Transformer(cfg, fast=False).double()
    if "lora" in config:
        add_lora(whole, 4)
    with torch.no_grad():  # (B away from its zeros: both adapter factors matter)
        for p in whole.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if config.endswith("-qlora"):
        for m in lora_modules(whole).values():
            q = quantize("Q4_K", m.weight.detach().float())
            quantize_base(m).base = q
        assert isinstance(whole.model.layers[0].self_attn.o_proj, QuantizedLoRALinear)
    from apr_kernels.model.rope import rope_tables

    x = torch.randn(2, 9, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_tables(9, cfg.head_dim, cfg.rope_theta)
    layer = whole.model.layers[0]
    want = layer.self_attn(x, cos, sin).sum() + layer.mlp(x).square().sum()
    want_out = (layer.self_attn(x, cos, sin), layer.mlp(x))
    want.backward()
    grads = {n: p.grad for n, p in whole.named_parameters() if p.grad is not None}
    want_x = x.grad.clone()
    outs, x_grad, summed = [0, 0], torch.zeros_like(x), {}
    import copy

    parts = []
    for rank in range(size):
        model = copy.deepcopy(whole)
        model.zero_grad()
        tp = _split(model, rank, size)
        xr = x.detach().clone().requires_grad_()
        part = model.model.layers[0]
        a, m = part.self_attn(xr, cos, sin), part.mlp(xr)
        outs[0], outs[1] = outs[0] + a.detach(), outs[1] + m.detach()
        parts.append((model, tp, xr, a, m))
    for model, tp, xr, a, m in parts:  # (the loss of the summed outputs: its gradient reaches every part)
        (a.sum() + (m * 2 * outs[1]).sum()).backward()
        x_grad += xr.grad
        dims = split_dims(model)
        for n, p in model.named_parameters():
            if n in dims and n in grads:  # (layer 0's)
                torch.testing.assert_close(p.grad, tp.local(grads[n], dims[n]), msg=n)
            elif n in grads:  # a whole weight inside the split (Qwen3's q/k norms): a part per rank
                summed[n] = summed.get(n, 0) + p.grad
        assert model.model.layers[0].self_attn.num_heads == cfg.num_heads // size
    for n, g in summed.items():
        torch.testing.assert_close(g, grads[n], msg=n)
    whole_kept = tuple(f"{leaf}.lora_A" for leaf in COLUMN) + tuple(f"{leaf}.lora_B" for leaf in ROW)
    assert sorted(summed) == sorted(n for n in grads if ("_norm." in n and "layernorm" not in n)
                                    or n.endswith(whole_kept))
    assert summed or config in ("qwen2", "llama4")
    torch.testing.assert_close(outs[0], want_out[0])
    torch.testing.assert_close(outs[1], want_out[1])
    torch.testing.assert_close(x_grad, want_x)


def test_quantised_bases_load_as_each_ranks_part_where_it_is_whole_blocks(tmp_path):
    """QLoRA under tensor parallelism, loaded in one process for each rank of a group of 2: a base
    whose part is whole blocks (every row split; the wide config's o_proj and down_proj columns, 256
    of 512 a rank) holds only that part's bytes, one whose columns would cut blocks (the small
    config's: 64 columns, one padded Q4_K block a row) the whole tensor's; either way the weight
    each GEMM multiplies by is the rank's part of the whole dequantised weight."""
    from apr_kernels.model.lora import lora_modules
    from apr_kernels.model.loading import from_apr
    from apr_kernels.quant import dequantize
    from apr_kernels.train.tensor_parallel import TensorParallel
    from test_lora import _quantised_file

    for config, columns_split in (("wide", True), ("qwen2", False)):
        path = tmp_path / f"{config}.apr"
        stored = _quantised_file(path, _config(config), "Q4_K", seed=3)
        for rank in range(2):
            tp = TensorParallel(None, rank, 2)
            model = from_apr(path, lora_init={"rank": 4, "alpha": 8.0, "targets": ["q_proj", "o_proj", "down_proj"]},
                             keep_quantized=True, shard=lambda m, tp=tp: m.set_tensor_parallel(tp))
            for name, m in lora_modules(model).items():
                q = stored[f"{name}.weight"]
                whole = dequantize(q.dtype, q.shape, q.data)
                split = m.split_dim == 0 or columns_split
                assert m.base_split == split, name
                assert m.base.data.numel() == (q.data.numel() // 2 if split else q.data.numel()), name
                torch.testing.assert_close(m.base_weight(torch.float32), tp.local(whole, m.split_dim), rtol=0, atol=0)


def test_split_dims_name_every_split_parameter():
    from apr_kernels.model import Transformer
    from apr_kernels.train.tensor_parallel import split_dims

    model = Transformer(_config("qwen2"), fast=False)
    assert split_dims(model) == {}
    whole = {n: p.shape for n, p in model.named_parameters()}
    _split(model, 1, 2)
    dims = split_dims(model)
    assert dims["model.layers.1.self_attn.q_proj.weight"] == 0 and dims["model.layers.1.self_attn.q_proj.bias"] == 0
    assert dims["model.layers.0.self_attn.o_proj.weight"] == 1 and dims["model.layers.0.mlp.down_proj.weight"] == 1
    assert dims["model.layers.0.mlp.up_proj.weight"] == 0
    assert not any("norm" in n for n in dims)
    assert dims["model.embed_tokens.weight"] == 0  # (vocabulary 320: split by range)
    for n, p in model.named_parameters():
        shape = list(whole[n])
        if n in dims:
            shape[dims[n]] //= 2
        assert list(p.shape) == shape, n


def test_tensor_parallel_refusals(tmp_path, capsys):
    from apr_kernels.cli import main
    from apr_kernels.model import Transformer, preset
    from apr_kernels.train.tensor_parallel import check

    with pytest.raises(ValueError, match="num_key_value_heads is 1; expected a multiple of 2"):
        _split(Transformer(preset("tiny_qwen2").replace(num_heads=8, hidden_size=64), fast=False), 0, 2)
    with pytest.raises(ValueError, match="num_attention_heads is 6; expected a multiple of 4"):
        _split(Transformer(preset("tiny_llama"), fast=False), 0, 4)
    with pytest.raises(ValueError, match="moe_intermediate_size is 9; expected a multiple of 2"):
        _split(Transformer(preset("tiny_qwen3_moe").replace(moe_intermediate_size=9), fast=False), 0, 2)
    with pytest.raises(ValueError, match="--tensor-parallel 2 needs --parallel ddp or fsdp under torchrun .got none."):
        check(2, "none")
    with pytest.raises(ValueError, match=r"--fsdp-shard-size 3 with --tensor-parallel 2: expected a multiple of 2"):
        check(2, "fsdp", fsdp_shard=3)
    with pytest.raises(ValueError, match=r"--fsdp-shard-size 2 with --tensor-parallel 2 and --expert-parallel 2: "
                                         r"expected a multiple of 4"):
        check(2, "fsdp", fsdp_shard=2, expert_parallel=2)
    for kw, what in [({"compiled_selective": True}, "--compile and --grad-checkpointing selective")]:
        with pytest.raises(ValueError, match=f"--tensor-parallel 2 does not combine with {what}"):
            check(2, kw.pop("mode", "fsdp"), **kw)
    check(2, "ddp", expert_parallel=2)  # (together under DDP, FSDP and HSDP: test_expert_parallel.py)
    check(2, "fsdp", expert_parallel=2, fsdp_shard=4)
    from apr_kernels.train.expert_parallel import groups

    with pytest.raises(ValueError, match="--expert-parallel 2 does not divide the world size 6 into 2 groups of "
                                         "--tensor-parallel 2"):
        groups(6, 2, 0, stride=2)
    from apr_kernels.model.lora import add_lora

    split = Transformer(_config("qwen2"), fast=False)
    _split(split, 0, 2)
    with pytest.raises(ValueError, match="add_lora: the model is split over tensor-parallel ranks already"):
        add_lora(split, 4)
    code, _ = _cli(main, ["train", "--preset", "tiny_llama", *COMMON, "--tensor-parallel", "2",
                          "--out", str(tmp_path / "x")])
    assert code != 0
    assert "--tensor-parallel 2 needs --parallel ddp or fsdp under torchrun (got none)" in capsys.readouterr().err
    code, _ = _cli(main, ["train", "--preset", "tiny_llama", *COMMON, "--sequence-parallel", "--out",
                          str(tmp_path / "y")])
    assert code != 0
    assert "--sequence-parallel splits the positions over a tensor-parallel group; expected --tensor-parallel N" \
        in capsys.readouterr().err

    # a teacher (or reward model) whose heads the group does not divide is held whole, said on stderr
    # (the run goes on)
    from types import SimpleNamespace

    from apr_kernels.train.cli import split_frozen

    group = SimpleNamespace(size=4, rank=0, group=None, replicas="several")
    assert split_frozen("t.apr", preset("tiny_llama"), "--teacher t.apr", None, "ddp", group, fast=False,
                        dtype=None) is None
    assert capsys.readouterr().err.strip() == ("--tensor-parallel 4: --teacher t.apr's num_attention_heads is 6; "
                                               "expected a multiple of 4 (each rank holds an equal share): held "
                                               "whole on every rank")


def test_vocabulary_split_loss_equals_cross_entropy_on_a_group_of_one():
    """The vocabulary-split loss (its all-reduced maxima, sums and target logits, a chunk of rows at a
    time) on a group of one against ``F.cross_entropy(F.linear(h, W))``: plain, with label smoothing,
    with z-loss; values and the gradients of h and W; the logits are never kept for the backward
    (the multi-rank runs above check the split itself against one process)."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from apr_kernels.train.tensor_parallel import TensorParallel
    from apr_kernels.train.vocab_parallel import vocab_parallel_logits, vocab_parallel_losses
    from rank_runs import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        tp = TensorParallel(dist.group.WORLD, 0, 1)
        h = torch.randn(1, 7, 5, dtype=torch.float64, requires_grad=True)
        w = (torch.randn(11, 5, dtype=torch.float64) * 2).requires_grad_()
        targets = torch.tensor([[0, 3, -100, 10, 5, 5, 1]])
        keep = targets.flatten() != -100
        weights = torch.randn(7, dtype=torch.float64)
        for smoothing, z in [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.2, 1e-1)]:
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
                got = vocab_parallel_losses(h, w, targets, tp, smoothing, z, chunk_rows=3)
            assert max(saved) < 7 * 11  # (h, W and per-row values: no logits)
            logits = F.linear(h, w).flatten(0, 1)
            want = (F.cross_entropy(logits, targets.flatten(), reduction="none", ignore_index=-100,
                                    label_smoothing=smoothing) + z * torch.logsumexp(logits, -1) ** 2 * keep)
            torch.testing.assert_close(got, want)
            for a, b in zip(torch.autograd.grad((got * weights).sum(), (h, w)),
                            torch.autograd.grad((want * weights).sum(), (h, w))):
                torch.testing.assert_close(a, b)
        # the whole logits (forward without targets): the group's columns joined
        probe = torch.randn(1, 7, 11, dtype=torch.float64)
        got = vocab_parallel_logits(h, w, tp)
        torch.testing.assert_close(got, F.linear(h, w))
        for a, b in zip(torch.autograd.grad((got * probe).sum(), (h, w)),
                        torch.autograd.grad((F.linear(h, w) * probe).sum(), (h, w))):
            torch.testing.assert_close(a, b)
    finally:
        dist.destroy_process_group()


def test_vocabulary_split_distillation_equals_the_eager_loss_on_a_group_of_one():
    """The vocabulary-split distillation loss (maxima, normalisers and the divergence's sums
    all-reduced per row, a chunk of rows at a time) on a group of one against the row maths on whole
    logits in fp64 (``reference.distillation_rows_reference``, checked against the divergences
    written out) and the eager loss: the
    forward KL, reverse KL and generalized JSD, a teacher vocabulary smaller and larger than the
    student's, ignored targets; values, ce, kl and the gradients of h and W; no logits kept for the
    backward. The multi-rank runs check the split (a rank whose columns pass the teacher's end)."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from apr_kernels.model.distillation import eager_loss
    from apr_kernels.ops.reference import distillation_rows_reference
    from apr_kernels.train.tensor_parallel import TensorParallel
    from apr_kernels.train.vocab_parallel import vocab_parallel_distillation
    from rank_runs import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        tp = TensorParallel(dist.group.WORLD, 0, 1)
        torch.manual_seed(4)
        h = torch.randn(1, 7, 5, dtype=torch.float64, requires_grad=True)
        w = (torch.randn(11, 5, dtype=torch.float64) * 2).requires_grad_()
        th = torch.randn(1, 7, 6, dtype=torch.float64)
        targets = torch.tensor([[0, 3, -100, 10, 5, 5, 1]])
        for beta, vt, kd, temp in [(0.0, 11, 0.5, 1.0), (1.0, 9, 0.7, 2.0), (0.3, 13, 0.4, 1.5), (0.0, 8, 1.0, 3.0)]:
            tw = torch.randn(vt, 6, dtype=torch.float64) * 2
            saved = []
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
                loss, ce, kl = vocab_parallel_distillation(h, w, th, tw, targets, tp, kd_ratio=kd, temperature=temp,
                                                           beta=beta, chunk_rows=3)
            # (the hidden states, the weights and per-row values: no logits)
            assert all(n in {h.numel(), w.numel(), th.numel(), tw.numel()} or n <= 4 * 7 for n in saved), saved
            s = F.linear(h, w).detach().flatten(0, 1)
            want_ce, want_kl, g = distillation_rows_reference(s, F.linear(th, tw).flatten(0, 1), targets.flatten(),
                                                              -100, kd, temp, True, beta)
            torch.testing.assert_close(ce, want_ce)
            torch.testing.assert_close(kl, want_kl)
            torch.testing.assert_close(loss, (1 - kd) * want_ce + kd * want_kl)
            assert not ce.requires_grad and not kl.requires_grad and float(loss[2].detach()) == 0.0
            d_h, d_w = torch.autograd.grad(loss.sum(), (h, w))  # (the rows' gradient through both GEMMs)
            torch.testing.assert_close(d_h.flatten(0, 1), g @ w.detach())
            torch.testing.assert_close(d_w, g.T @ h.detach().flatten(0, 1))
            # and the objective as the eager path computes it (fp32)
            eager = eager_loss(F.linear(h, w), F.linear(th, tw), targets, kd, temp, "sum", beta)
            torch.testing.assert_close(loss.sum().float(), eager[0])
    finally:
        dist.destroy_process_group()


def test_sequence_parallel_refusals_and_chunks():
    """What the split of every row's positions over the group rules out (the trainer's checks, on a
    stand-in for 2 ranks in one group), and each rank's chunk."""
    from types import SimpleNamespace

    from apr_kernels.model import Transformer
    from apr_kernels.train.loop import TrainConfig, Trainer
    from apr_kernels.train.tensor_parallel import TensorParallel

    tp = TensorParallel(None, 1, 2, sequence_parallel=True)
    t = torch.arange(24).view(2, 12)
    assert tp.chunk(t).tolist() == [list(range(6, 12)), list(range(18, 24))]
    with pytest.raises(ValueError, match="rows of 7 positions do not split into 2 equal chunks"):
        tp.chunk(t[:, :7])
    model = Transformer(_config("qwen2"), fast=False)
    par = SimpleNamespace(module=model, world_size=2, data_ranks=1, context=None, tensor=tp, sequence=tp)
    tokens = torch.randint(0, 97, (4000,))
    with pytest.raises(ValueError, match=r"--seq-len 31 does not split into 2 equal chunks of positions; expected a "
                                         r"multiple of --tensor-parallel 2 with --sequence-parallel"):
        Trainer(model, tokens, None, TrainConfig(batch_size=2, seq_len=31), parallel=par)
    # with context parallelism: each context-parallel rank's positions split again
    from apr_kernels.train.context_parallel import ContextParallel

    tp4 = TensorParallel(None, 1, 4, sequence_parallel=True)
    both = SimpleNamespace(module=model, world_size=8, data_ranks=1, context=ContextParallel(None, 0, 2), tensor=tp4,
                           sequence=tp4)
    with pytest.raises(ValueError, match=r"--seq-len 36 does not split into 4 equal chunks of positions per "
                                         r"context-parallel rank \(36 / 2\); expected a multiple of --tensor-parallel "
                                         r"4 with --sequence-parallel x --context-parallel 2"):
        Trainer(model, tokens, None, TrainConfig(batch_size=2, seq_len=36), parallel=both)
    # the model asked for a mean over its share of the positions
    _split(model, 1, 2)
    model.tensor_parallel.sequence_parallel = True
    with pytest.raises(ValueError, match=r"reduction 'mean' under context or sequence parallelism"):
        model.loss(torch.ones(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.long))


# ------------------------------------------------------- post-training commands (no sampling)
@pytest.fixture(scope="module")
def post_runs(tmp_path_factory):
    """DPO (DDP, 4 ranks in 2 groups: 11 training pairs, uneven reference shares), KTO (LoRA, DDP, 2 ranks)
    and a reward model (FSDP, 4 ranks in 2 groups; its score head whole) of a dense Qwen3 split over
    groups of 2, and each in one process."""
    from apr_kernels.model import Transformer
    from apr_kernels.train.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("tp_post")
    torch.manual_seed(31)
    save_checkpoint(root / "init.apr", model=Transformer(_config("qwen3"), fast=False))
    args = _post_training_args(root)
    args["kto"] += ["--lora-rank", "4"]  # (with LoRA: the reference model is the base, the adapters switched off)
    layout = {"dpo": (4, "ddp"), "kto": (2, "ddp"), "reward": (4, "fsdp")}
    one, out = against_one_process(
        {name: (_split_run(a, root / f"tp_{name}", 2, layout[name][1]), layout[name][0]) for name, a in args.items()},
        {name: [*a, "--out", str(root / f"one_{name}")] for name, a in args.items()}, root / "ranks")
    return root, one, out


@pytest.mark.parametrize("name", ["dpo", "kto", "reward"])
def test_post_training_split_matches_one_process(post_runs, name):
    root, one, out = post_runs
    ref, got = _same_run(one[name], out[name], eval_abs=1e-5)
    (start,), (ref_start,) = ([r for r in recs if r["event"] == "start"] for recs in (got, ref))
    assert start["trainable"] == ref_start["trainable"] and start["tensor_parallel"] == 2
    assert start["trainable"] > start["params_rank"] if name != "kto" else start["trainable"] < start["params_rank"]
    # (the reward model's run has one weight in 5000 off by 7e-5: AdamW's normalised step on a near-zero
    # gradient summed in another order)
    _within_rare_amplified_rounding(root / f"tp_{name}" / "model.apr", root / f"one_{name}" / "model.apr", 8 * 1e-2)


def _within_rare_amplified_rounding(path, want, bound: float, tight: float = 1e-4) -> None:
    """Checkpoint ``path`` against one process's ``want``: AdamW's normalised step turns a near-zero
    gradient's rounding (the split sums it in another order) into up to the learning rate per
    update, so a rare value moves by more than the rest: all but one in 1000 within ``tight``, every
    one within ``bound`` (the updates' sum of learning rates)."""
    (a, _), (b, _) = _tensors(path), _tensors(want)
    assert sorted(a) == sorted(b)
    for key in (k for k in b if b[k].is_floating_point() and not k.startswith("__training__.rng")):
        diff = (a[key].double() - b[key].double()).abs()
        assert int((diff > tight).sum()) <= b[key].numel() // 1000 + 1 and float(diff.max()) < bound, key


# ------------------------------------------------------------------ sampling commands
@pytest.fixture(scope="module")
def sampling_runs(tmp_path_factory):
    """GRPO (DDP, 4 ranks in 2 groups; a KL penalty to a split reference copy, two updates per
    generation batch, held-out prompts), RLOO (FSDP, 2 ranks; a reward model sharded too), online DPO
    (DDP, 2 ranks; a reward model split too), GKD (DDP,
    the teacher sampling too) and train --teacher (DDP; the teacher split alike) of a dense Qwen3 split
    over groups of 2: each group decodes its prompts
    together (the KV cache of its heads, the logits' vocabulary columns gathered), and each in one
    process."""
    from apr_kernels.model import Transformer, preset
    from apr_kernels.train.checkpoint import save_checkpoint

    from apr_kernels.train.cli import byte_tokenizer

    root = tmp_path_factory.mktemp("tp_sampling")
    torch.manual_seed(32)
    save_checkpoint(root / "init.apr", model=Transformer(_config("qwen3"), fast=False))
    # a distillation teacher (another shape; its layers split like the student's) for gkd and train
    # --teacher; its 290 output rows (whole on every rank) end inside the second rank's vocabulary
    # range (160 .. 319): the divergence's columns
    save_checkpoint(root / "teacher.apr", model=Transformer(_config("llama").replace(num_layers=1, vocab_size=290),
                                                            fast=False), tokenizer=byte_tokenizer())
    sampling = _sampling_args(root, root / "init.apr", root / "teacher.apr")
    # a reward model beside online DPO's reward function (its layers split like the teacher's, its
    # score head whole)
    save_checkpoint(root / "rm.apr", model=Transformer(_config("llama").replace(num_layers=1, vocab_size=290,
                                                                                num_labels=1), fast=False),
                    tokenizer=byte_tokenizer())
    online, rloo = list(sampling["online"]), list(sampling["rloo"])
    for args in (online, rloo):  # (under FSDP sharded over both ranks instead)
        args.insert(args.index("--reward") + 2, str(root / "rm.apr"))
    cases = {"grpo": (sampling["grpo"], 4, "ddp"), "rloo": (rloo, 2, "fsdp"),
             "online": (online, 2, "ddp"),
             # the divergence over the group's vocabulary columns of both models' logits; the teacher's
             # samples too (--seq-kd: its layers split, its group's ranks decoding in step)
             "gkd": ([*sampling["gkd"], "--seq-kd"], 2, "ddp"),
             "kd": (["train", "--init", str(root / "init.apr"), *COMMON, "--teacher", str(root / "teacher.apr"),
                     "--kd-ratio", "0.6", "--kd-temperature", "2.0"], 2, "ddp")}
    # a mixture-of-experts policy (every expert split, the router whole) sampling and training
    save_checkpoint(root / "moe.apr", model=Transformer(preset("tiny_qwen3_moe"), fast=False))
    (root / "moe").mkdir()  # (rloo's options: 3 generations, a KL to the reference, micro-batches of 2)
    cases["grpo_moe"] = (["grpo", *_sampling_args(root / "moe", root / "moe.apr")["rloo"][1:], "--save-every", "1"],
                         2, "ddp")
    # sequence parallelism: the teacher reads the whole rows, each rank scores its chunk of the positions
    # (the losses of the whole rows' columns, its chunk kept, the incoming gradients summed)
    cases["kd_sp"] = ([*cases["kd"][0], "--kd-beta", "0.5"], 2, "ddp")
    only = {"kd_sp": ["--sequence-parallel"]}
    one, out = against_one_process(
        {name: (_split_run([*args, *only.get(name, [])], root / f"tp_{name}", 2, mode), world)
         for name, (args, world, mode) in cases.items()},
        {name: [*args, "--out", str(root / f"one_{name}")] for name, (args, _, _) in cases.items()}, root / "ranks")
    return root, one, out


@pytest.mark.parametrize("name", ["grpo", "rloo", "online", "gkd", "kd", "kd_sp", "grpo_moe"])
def test_sampling_and_distillation_commands_split_match_one_process(sampling_runs, name):
    root, one, out = sampling_runs
    want, got = _records(one[name]), _records(out[name])
    (start,) = [r for r in got if r["event"] == "start"]
    assert start["tensor_parallel"] == 2 and start["vocab_parallel"]
    keys = {"grpo": ("reward", "completion_len", "loss", "grad_norm", "kl"), "rloo": ("reward", "loss", "grad_norm"),
            "grpo_moe": ("reward", "completion_len", "loss", "grad_norm", "kl"),
            "online": ("reward", "loss", "grad_norm"), "gkd": ("loss", "grad_norm", "on_policy", "teacher_sampled"),
            "kd": ("loss", "ce", "kl", "grad_norm"), "kd_sp": ("loss", "ce", "kl", "grad_norm")}[name]
    assert len(_losses(got, key="loss")) == 4
    for key in keys:
        assert _losses(got, key=key) == pytest.approx(_losses(want, key=key), rel=1e-4, abs=1e-6), key
    if name in ("kd", "kd_sp", "gkd", "online"):  # the teacher (reward model) each rank holds: its layers'
        # projections split over the group (whole rows: also with --sequence-parallel), the embedding,
        # head (score head) and norms whole
        from apr_kernels.model.loading import from_apr, load_classifier

        held, model = ("reward_rm", load_classifier(root / "rm.apr")) if name == "online" else \
            ("teacher", from_apr(root / "teacher.apr"))
        params = dict(model.named_parameters())
        whole = sum(p.numel() for p in params.values())
        split = sum(p.numel() for n, p in params.items() if n.endswith("_proj.weight"))
        assert start[f"{held}_params"] == whole and split > whole / 3
        assert start[f"{held}_params_rank"] == whole - split // 2
    if name == "rloo":  # the reward model under FSDP: rank 0's shards, about half of it
        from apr_kernels.model.loading import load_classifier

        whole = sum(p.numel() for p in load_classifier(root / "rm.apr").parameters())
        assert start["reward_rm_params"] == whole and abs(start["reward_rm_params_rank"] - whole / 2) < whole / 10
    if name == "gkd":  # (both samplers drawn)
        assert 0 < sum(_losses(want, key="teacher_sampled")) < len(_losses(want, key="teacher_sampled"))
    if name == "grpo":  # held-out prompts: 5 split 3 / 2 between the 2 groups, greedy
        assert _losses(got, "eval", "eval_reward") == pytest.approx(_losses(want, "eval", "eval_reward"), rel=1e-9)
    if name == "grpo_moe":
        # the first step's gradients (AdamW's first moments: 0.1 x each): one process's. The weights
        # after 4 steps are not compared: the policy's balance terms give many parameters small
        # gradients whose rounding AdamW's step amplifies, and a top-k choice near a tie then flips
        (a, _), (b, _) = (_tensors(d / "step_000001.apr") for d in (root / "tp_grpo_moe", root / "one_grpo_moe"))
        moments = [k for k in b if k.startswith("__training__.adam.exp_avg.")]
        assert len(moments) == len([n for n in a if not n.startswith("__")])
        for key in moments:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5 * float(b[key].abs().max()), msg=key)
        return
    _within_rare_amplified_rounding(root / f"tp_{name}" / "model.apr", root / f"one_{name}" / "model.apr", 8 * 1e-2)
