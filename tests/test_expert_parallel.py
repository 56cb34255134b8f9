"""Expert parallelism (``train --parallel ddp|fsdp --expert-parallel N``): a mixture-of-experts
model's experts spread over groups of N ranks, rows exchanged by all-to-all, against one process
training on the same global batch: losses, gradient norms (clipped by the global norm), held-out
losses and the gathered checkpoint's weights and optimizer state.

DDP: Qwen3-MoE on 2 ranks (AdamW; activation checkpointing: the recomputed forward exchanges again;
the fast path: each rank's experts as grouped GEMMs in Triton's interpreter), Qwen2-MoE (a shared
expert, a dense layer) on 4 ranks in 2 replicated groups of 2 (8-bit AdamW; expert gradients
reduced over the replicas). FSDP (the rest sharded over every rank, each expert over its
replicas): Qwen3-MoE on 4 ranks in 2 groups of 2 (AdamW; with context parallelism over the same
pairs of ranks), Mixtral on 4 ranks holding one expert each (Muon); HSDP on 8 ranks (2 "nodes" of
4, each expert sharded over its node's 2 holders). LoRA on every expert (DDP)
and DoRA (FSDP; Qwen2-MoE), their final files merged; QLoRA on APR_Q8 blocks (DDP; each expert's
blocks written as stored); a LoRA step checkpoint resumed spread. A one-process step checkpoint resumed sharded with the experts spread (each rank reads
only its rows of its experts and their moments), and a sharded expert-parallel one resumed in one
process. The post-training commands (DPO, KTO, a reward model) and the sampling ones (GRPO, RLOO,
online DPO, GKD: each rank decoding its own prompts, the group stepping together)."""

from __future__ import annotations

import pytest
import torch

from rank_runs import against_one_process, free_port, launch_by_world, outputs
from test_distributed import (COMMON, _cli, _losses, _post_training_args, _records, _resumed_here, _same_checkpoint,
                              _same_run)


def _spread(args, out, ep: int, mode: str) -> list[str]:
    return [*args, "--parallel", mode, "--expert-parallel", str(ep), "--out", str(out)]


def _moe_config(architecture: str, **kw):
    from apr_kernels.model import preset

    return preset({"qwen3_moe": "tiny_qwen3_moe", "qwen2_moe": "tiny_qwen2_moe",
                   "mixtral": "tiny_mixtral"}[architecture]).replace(**kw)


# name: (architecture and config changes, extra options, world size, expert-parallel size, --parallel,
#        options of the torchrun run only)
CASES = {
    "qwen3": (("qwen3_moe", {}), ["--grad-checkpointing", "--fast", "on"], 2, 2, "ddp", []),
    "qwen2": (("qwen2_moe", {"num_experts": 4}), ["--optimizer", "adamw8bit"], 4, 2, "ddp", []),
    # with context parallelism too: groups of 2 ranks share rows (each half of every row's positions)
    # and exchange their tokens' rows with their experts
    "qwen3_fsdp": (("qwen3_moe", {}), [], 4, 2, "fsdp", ["--context-parallel", "2"]),
    "mixtral_fsdp": (("mixtral", {}), ["--optimizer", "muon"], 4, 4, "fsdp", []),
    # HSDP: 2 nodes of 4 ranks; in each node 2 expert groups of 2, each expert sharded over its node's 2
    # holders and replicated across the nodes
    "hsdp": (("qwen3_moe", {}), ["--batch-size", "8"], 8, 2, "fsdp", ["--fsdp-shard-size", "4"]),
    # adapters on every expert, drawn in the whole model's order; the final file merged
    "lora": (("qwen3_moe", {}), ["--lora-rank", "4", "--lr", "1e-2"], 2, 2, "ddp", []),
    "dora_fsdp": (("qwen2_moe", {"num_experts": 4}), ["--lora-rank", "4", "--lora-dora", "--lr", "1e-2"], 2, 2,
                  "fsdp", []),
    # with tensor parallelism (groups of 2 consecutive ranks; the expert-parallel groups ranks 2
    # apart): each rank holds half of each of its experts (sequence parallelism and 8-bit AdamW
    # too); on 8 ranks with LoRA on every expert and a shared expert (the replicas 4 apart); and
    # sharded (FSDP on 8 ranks: each expert's part over its 2 replicas), with context parallelism
    # too (each pair of tensor-parallel pairs sharing rows by position: 4-D parallelism)
    "qwen3_tp": (("qwen3_moe", {}), ["--optimizer", "adamw8bit"], 4, 2, "ddp",
                 ["--tensor-parallel", "2", "--sequence-parallel"]),
    "qwen2_tp_lora": (("qwen2_moe", {"num_experts": 4, "num_heads": 4, "num_kv_heads": 2}),
                      ["--lora-rank", "4", "--lr", "1e-2"], 8, 2, "ddp", ["--tensor-parallel", "2"]),
    "qwen3_tp_fsdp": (("qwen3_moe", {}), ["--grad-checkpointing"], 8, 2, "fsdp",
                      ["--tensor-parallel", "2", "--sequence-parallel", "--context-parallel", "2"]),
    # and HSDP: 2 nodes of 4 ranks, each node one expert-parallel pair of tensor-parallel pairs
    "qwen3_tp_hsdp": (("qwen3_moe", {}), ["--batch-size", "8"], 8, 2, "fsdp",
                      ["--tensor-parallel", "2", "--fsdp-shard-size", "4"]),
    # QLoRA: every projection stored in APR_Q8 blocks, each rank holding its experts' blocks (with
    # tensor parallelism too: its rows of gate/up, whose parts are whole blocks, and down whole)
    "qlora": (("qwen3_moe", {"hidden_size": 64, "moe_intermediate_size": 32, "intermediate_size": 128}),
              ["--lora-rank", "4", "--lora-quantized-base", "--lr", "1e-2"], 2, 2, "ddp", []),
    "qlora_tp": (("qwen3_moe", {"hidden_size": 64, "moe_intermediate_size": 32, "intermediate_size": 128}),
                 ["--lora-rank", "4", "--lora-quantized-base", "--lr", "1e-2"], 4, 2, "ddp", ["--tensor-parallel", "2"]),
    # and sharded: each expert's blocks split between its 2 replicas (FSDP on 4 ranks)
    "qlora_fsdp": (("qwen3_moe", {"hidden_size": 64, "moe_intermediate_size": 32, "intermediate_size": 128}),
                   ["--lora-rank", "4", "--lora-quantized-base", "--lr", "1e-2"], 4, 2, "fsdp", []),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from apr_kernels.cli import main
    from apr_kernels.model import Transformer
    from apr_kernels.train.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("ep")
    args = {}
    for i, (name, ((arch, changes), extra, *_)) in enumerate(CASES.items()):
        torch.manual_seed(20 + i)
        if "--lora-quantized-base" in extra:
            from test_lora import _quantised_file

            _quantised_file(root / f"{name}.apr", _moe_config(arch, **changes), "APR_Q8", seed=20 + i)
        else:
            save_checkpoint(root / f"{name}.apr", model=Transformer(_moe_config(arch, **changes), fast=False))
        args[name] = ["train", "--init", str(root / f"{name}.apr"), *COMMON, *extra]
    one = {}
    for name in CASES:
        code, one[name] = _cli(main, [*args[name], "--out", str(root / f"one_{name}")])
        assert code == 0
    runs = {name: (_spread([*args[name], *only], root / f"ep_{name}", ep, mode), world)
            for name, (_, _, world, ep, mode, only) in CASES.items()}
    resume = ["--json", "--no-progress", "--fast", "off", "--dist-timeout", "60"]
    # a LoRA run's step checkpoint (its adapters kept) resumed with the experts spread
    runs["resumed_lora"] = (_spread(["train", "--resume", str(root / "one_lora" / "step_000002.apr"), *resume],
                                    root / "resumed_lora", 2, "ddp"), 2)
    # the one-process step checkpoint resumed on 4 ranks in 2 groups of 2, sharded
    runs["resumed_ep"] = (_spread(["train", "--resume", str(root / "one_qwen3" / "step_000002.apr"), *resume],
                                  root / "resumed_ep", 2, "fsdp"), 4)
    # and with each of them split over tensor-parallel pairs (sharded)
    runs["resumed_ep_tp"] = (_spread(["train", "--resume", str(root / "one_qwen3" / "step_000002.apr"), *resume,
                                      "--tensor-parallel", "2"], root / "resumed_ep_tp", 2, "fsdp"), 4)
    out = outputs(*launch_by_world(runs, root / "ranks"))
    # an expert-parallel sharded step checkpoint resumed in one process
    out["resumed_one"] = _resumed_here(root / "ep_qwen3_fsdp" / "step_000002.apr", root / "resumed_one")
    return root, one, out


@pytest.mark.parametrize("name", list(CASES))
def test_expert_parallel_matches_one_process(runs, name):
    root, one, out = runs
    ref, got = _same_run(one[name], out[name])
    # the load-balancing loss and the balance measure over the global batch's choices (the loss from
    # fp32 router probabilities summed in another order: DoRA's runs differ at 1.5e-5)
    assert _losses(got, "train", "aux_loss") == pytest.approx(_losses(ref, "train", "aux_loss"), rel=5e-5)
    assert _losses(got, "train", "expert_load") == pytest.approx(_losses(ref, "train", "expert_load"), rel=1e-5)
    # the whole model counted, each rank holding only its share of the experts
    (start,) = [r for r in got if r["event"] == "start"]
    (ref_start,) = [r for r in ref if r["event"] == "start"]
    assert start["params"] == ref_start["params"] and start["expert_parallel"] == CASES[name][3]
    assert start["params_rank"] < start["params"]
    # Muon orthogonalises each update (every singular value to about 1): the router's tiny gradient
    # (1e-4, summed in another order here: relative rounding noise 1e-4) has near-zero singular
    # directions whose noise comes out at full size (the momentum buffers themselves agree to 1e-8)
    atol = 2e-4 if "muon" in CASES[name][1] else 5e-5
    a, b = _same_checkpoint(root / f"ep_{name}" / "model.apr", root / f"one_{name}" / "model.apr", name, atol)
    for key in b:
        if not b[key].is_floating_point() and not key.startswith("__training__.rng"):  # 8-bit codes: nearly all equal
            assert (a[key] != b[key]).float().mean() < 0.01, f"{name}: {key}"


@pytest.mark.parametrize("name", ["qlora", "qlora_tp", "qlora_fsdp"])
def test_quantised_expert_bases_written_block_for_block(runs, name):
    """The QLoRA runs' step checkpoints hold every expert's base as stored (each broadcast from its
    holder; split over tensor-parallel ranks: joined there first): the same raw blocks as the
    one-process run's."""
    import apr_kernels

    root, _, _ = runs
    with apr_kernels.open(root / f"ep_{name}" / "step_000002.apr") as a, \
            apr_kernels.open(root / f"one_{name}" / "step_000002.apr") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        blocks = [k for k in b.keys() if b.info(k).dtype == "APR_Q8"]
        assert "model.layers.1.mlp.experts.5.down_proj.weight" in blocks
        for k in blocks:
            assert a.info(k).dtype == "APR_Q8" and torch.equal(a.get_raw(k), b.get_raw(k)), k


def test_step_checkpoints_resume_across_expert_parallelism(runs):
    _, one, out = runs
    assert _losses(_records(out["resumed_lora"])) == pytest.approx(_losses(_records(one["lora"]))[2:], rel=1e-5)
    assert _losses(_records(out["resumed_ep"])) == pytest.approx(_losses(_records(one["qwen3"]))[2:], rel=1e-5)
    assert _losses(_records(out["resumed_ep_tp"])) == pytest.approx(_losses(_records(one["qwen3"]))[2:], rel=1e-5)
    assert _losses(_records(out["resumed_one"])) == pytest.approx(_losses(_records(one["qwen3_fsdp"]))[2:],
                                                                  rel=1e-5)


# ------------------------------------------------------------------------ in one process
def _stub(rank: int, size: int):
    from apr_kernels.train.expert_parallel import ExpertParallel

    return ExpertParallel(None, rank, size)


def test_each_rank_keeps_its_consecutive_experts_under_their_names():
    from apr_kernels.model import Transformer
    from apr_kernels.model.moe import RemoteExpert
    from apr_kernels.train.expert_parallel import expert_parameters, global_parameters

    cfg = _moe_config("qwen2_moe", num_experts=4)
    torch.manual_seed(0)
    whole = Transformer(cfg, fast=False)
    torch.manual_seed(0)
    model = Transformer(cfg, fast=False)
    model.set_expert_parallel(_stub(1, 2))
    moe = model.model.layers[0].mlp
    assert [type(e).__name__ for e in moe.experts] == ["RemoteExpert", "RemoteExpert", "MLP", "MLP"]
    assert [e.owner for e in moe.experts if isinstance(e, RemoteExpert)] == [0, 0]
    assert model.remote_expert_prefixes() == ("model.layers.0.mlp.experts.0.", "model.layers.0.mlp.experts.1.")
    mine = dict(model.named_parameters())
    assert "model.layers.0.mlp.experts.2.gate_proj.weight" in mine
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" not in mine
    torch.testing.assert_close(mine["model.layers.0.mlp.experts.3.up_proj.weight"],
                               dict(whole.named_parameters())["model.layers.0.mlp.experts.3.up_proj.weight"])
    # the whole model's names in its own order on every rank, each expert's owner, shapes to receive into
    listed = list(global_parameters(model))
    assert [n for n, _, _, _ in listed] == [n for n, _ in whole.named_parameters()]
    owners = {n: o for n, _, o, _ in listed}
    assert [h for n, _, _, h in listed if ".experts.1." in n or ".experts.2." in n] == [False] * 3 + [True] * 3
    assert owners["model.layers.0.mlp.experts.1.down_proj.weight"] == 0
    assert owners["model.layers.0.mlp.experts.2.down_proj.weight"] == 1
    assert owners["model.layers.0.mlp.shared_expert.down_proj.weight"] is None  # replicated, as the router
    assert owners["model.layers.0.mlp.gate.weight"] is None
    for n, t, _, _ in listed:
        assert tuple(t.shape) == tuple(dict(whole.named_parameters())[n].shape), n
    assert len(expert_parameters(model)) == 2 * 3  # two experts of the one sparse layer, three projections each


def test_expert_parallel_refusals(tmp_path, capsys):
    from apr_kernels.cli import main
    from apr_kernels.model import Transformer, preset
    from apr_kernels.train.expert_parallel import check

    with pytest.raises(ValueError, match=r"the model \(qwen2\) has no experts; expected a mixture-of-experts"):
        Transformer(preset("tiny_qwen2"), fast=False).set_expert_parallel(_stub(0, 2))
    with pytest.raises(ValueError, match="--expert-parallel 4 does not divide num_experts 6"):
        Transformer(_moe_config("qwen3_moe"), fast=False).set_expert_parallel(_stub(0, 4))
    with pytest.raises(ValueError, match="--expert-parallel 2 needs --parallel ddp or fsdp under torchrun .got none."):
        check(2, "none")
    with pytest.raises(ValueError, match="--expert-parallel 2 does not divide --fsdp-shard-size 3"):
        check(2, "fsdp", fsdp_shard=3)
    code, _ = _cli(main, ["train", "--preset", "tiny_qwen3_moe", *COMMON, "--expert-parallel", "2",
                          "--out", str(tmp_path / "x")])
    assert code != 0
    assert "--expert-parallel 2 needs --parallel ddp or fsdp under torchrun (got none)" in capsys.readouterr().err


def test_dispatch_regroups_rows_by_expert_and_back():
    """The exchange on a group of one (no peers): the rows reach ``run`` sorted by local expert with
    their counts, and the outputs come back in the rows' order."""
    import torch.distributed as dist

    from apr_kernels.train.expert_parallel import ExpertParallel

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        ep = ExpertParallel(dist.group.WORLD, 0, 1)
        xs = torch.randn(7, 3, requires_grad=True)
        counts = torch.tensor([2, 0, 5])
        seen = {}

        def run(rows, offs, c):
            seen.update(offs=offs.tolist(), counts=c.tolist())
            return rows * torch.arange(1.0, 8.0)[:, None]

        out = ep.dispatch(xs, counts, run)
        assert seen == {"offs": [2, 2, 7], "counts": [2, 0, 5]}
        torch.testing.assert_close(out, xs * torch.arange(1.0, 8.0)[:, None])
        out.sum().backward()
        torch.testing.assert_close(xs.grad, torch.arange(1.0, 8.0)[:, None].expand(7, 3))
    finally:
        dist.destroy_process_group()


def test_reduce_and_clip_on_a_group_of_one():
    """One rank: the experts' gradients divided by the world size (1, unchanged) and every gradient
    clipped by the norm of all of them, as ``torch.nn.utils.clip_grad_norm_`` clips."""
    import torch.distributed as dist

    from apr_kernels.train.expert_parallel import ExpertParallel

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        ep = ExpertParallel(dist.group.WORLD, 0, 1)
        params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
        params[0].grad, params[1].grad = torch.tensor([3.0, 0.0, 4.0]), torch.full((2, 2), 6.0)
        ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for r, p in zip(ref, params):
            r.grad = p.grad.clone()
        ep.reduce_grads(params[1:])
        norm = ep.clip_grad_norm(params, params[1:], 1.0)
        want = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        torch.testing.assert_close(norm, want)
        for r, p in zip(ref, params):
            torch.testing.assert_close(p.grad, r.grad)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------- post-training commands (no sampling)
@pytest.fixture(scope="module")
def post_runs(tmp_path_factory):
    """DPO (DDP, 11 training pairs: uneven reference shares), KTO (DDP) and a reward model (FSDP) of a
    Qwen3-MoE model on 2 ranks with its experts spread, and each in one process."""
    from apr_kernels.model import Transformer
    from apr_kernels.train.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("ep_post")
    torch.manual_seed(31)
    save_checkpoint(root / "init.apr", model=Transformer(_moe_config("qwen3_moe"), fast=False))
    args = _post_training_args(root)
    modes = {"dpo": "ddp", "kto": "ddp", "reward": "fsdp"}
    one, out = against_one_process(
        {name: (_spread(a, root / f"ep_{name}", 2, modes[name]), 2) for name, a in args.items()},
        {name: [*a, "--out", str(root / f"one_{name}")] for name, a in args.items()}, root / "ranks")
    return root, one, out


@pytest.mark.parametrize("name", ["dpo", "kto", "reward"])
def test_post_training_with_experts_spread_matches_one_process(post_runs, name):
    root, one, out = post_runs
    ref, got = _same_run(one[name], out[name], eval_abs=1e-5)
    (start,), (ref_start,) = ([r for r in recs if r["event"] == "start"] for recs in (got, ref))
    assert start["trainable"] == ref_start["trainable"] > start["params_rank"] and start["expert_parallel"] == 2
    if name != "reward":  # (the policy's balance terms, in its objective; a reward model's scores have none)
        for key in ("aux_loss", "router_z_loss", "expert_load"):
            assert _losses(got, key=key) == pytest.approx(_losses(ref, key=key), rel=1e-5), key
    _same_checkpoint(root / f"ep_{name}" / "model.apr", root / f"one_{name}" / "model.apr", name)


def test_balance_loss_on_masked_records_matches_one_process(tmp_path):
    """Supervised records (the prompts no loss targets, so the ranks' shares of a micro-batch hold
    different numbers of targets) with the load-balancing loss weighted up, on 2 ranks (DDP, and
    with the experts spread): each rank's balance term, a share of the global micro-batch's, counts
    the micro-batch's targets over the equal shares, so the losses and gradients are one process's
    (counting each rank's own targets instead was off by about 1e-4)."""
    from apr_kernels.model import Transformer
    from apr_kernels.train.checkpoint import save_checkpoint
    from test_distributed import _sampling_args

    torch.manual_seed(34)
    save_checkpoint(tmp_path / "init.apr", model=Transformer(_moe_config("qwen3_moe", router_aux_loss_coef=0.5),
                                                              fast=False))
    _sampling_args(tmp_path, tmp_path / "init.apr")  # (records.jsonl: prompt + completion)
    args = ["train", "--init", str(tmp_path / "init.apr"), "--tokenizer", "bytes", "--data",
            str(tmp_path / "records.jsonl"), "--steps", "4", "--batch-size", "4", "--grad-accum", "2", "--seq-len",
            "16", "--lr", "3e-3", "--json", "--seed", "5", "--no-progress", "--fast", "off", "--dist-timeout", "60",
            "--eval-fraction", "0.25", "--save-every", "0"]
    runs = {"ddp": ([*args, "--parallel", "ddp", "--out", str(tmp_path / "ddp")], 2),
            "ep": (_spread(args, tmp_path / "ep", 2, "ddp"), 2)}
    one, out = against_one_process(runs, {name: [*args, "--out", str(tmp_path / f"one_{name}")] for name in runs},
                                   tmp_path / "ranks")
    for name in runs:
        _same_run(one[name], out[name])


# ------------------------------------------------------------ the sampling commands (decoding in step)
@pytest.fixture(scope="module")
def sampling_runs(tmp_path_factory):
    """GRPO (DDP; a KL to a reference copy spread alike; one held-out prompt, so one rank decodes
    nothing and steps along), RLOO (FSDP), online DPO and GKD (DDP, the student sampling) of a
    Qwen3-MoE policy on 2 ranks with its experts spread: each rank decodes its own prompts, every
    step's forward exchanging rows with the other's experts, until both are done; and each in one
    process."""
    import json

    from apr_kernels.model import Transformer
    from apr_kernels.train.checkpoint import save_checkpoint
    from apr_kernels.train.cli import byte_tokenizer
    from test_distributed import _sampling_args

    root = tmp_path_factory.mktemp("ep_sampling")
    torch.manual_seed(33)
    save_checkpoint(root / "init.apr", model=Transformer(_moe_config("qwen3_moe"), fast=False))
    save_checkpoint(root / "teacher.apr", model=Transformer(_moe_config("qwen3_moe", num_layers=1), fast=False),
                    tokenizer=byte_tokenizer())
    # (GKD's student with its load-balancing loss weighted up: the ranks' sampled completions differ
    # in length, so their padded rows do, and padding stays out of the balance terms)
    save_checkpoint(root / "student.apr", model=Transformer(_moe_config("qwen3_moe", router_aux_loss_coef=0.5),
                                                            fast=False))
    # (RLOO's and online DPO's policy without it: with --micro-batch each forward's balance term is of
    # its micro-batch, and a rank's k-th micro-batch and one process's are different completions)
    save_checkpoint(root / "plain.apr", model=Transformer(_moe_config("qwen3_moe", router_aux_loss_coef=0.0),
                                                          fast=False))
    args = _sampling_args(root, root / "init.apr", root / "teacher.apr")
    (root / "eval.jsonl").write_text(json.dumps({"prompt": "Hot:"}) + "\n")
    args["grpo"][args["grpo"].index("--eval-data") + 1] = str(root / "eval.jsonl")
    # (GRPO: one forward of each rank's completions, together one process's one forward; the balance terms
    # compared)
    at = args["grpo"].index("--micro-batch")
    del args["grpo"][at:at + 2]
    args["gkd"][args["gkd"].index("--init") + 1] = str(root / "student.apr")
    for name in ("rloo", "online"):
        args[name][args[name].index("--init") + 1] = str(root / "plain.apr")
    args["gkd"] += ["--lmbda", "1.0"]  # (every micro-batch's completions sampled by the student)
    modes = {"grpo": "ddp", "rloo": "fsdp", "online": "ddp", "gkd": "ddp"}
    runs = {name: (_spread(a, root / f"ep_{name}", 2, modes[name]), 2) for name, a in args.items()}
    # GRPO with tensor parallelism too: 2 pairs of ranks, each pair decoding its prompts together,
    # the experts spread over the pairs
    runs["grpo_tp"] = (_spread([*args["grpo"], "--tensor-parallel", "2"], root / "ep_grpo_tp", 2, "ddp"), 4)
    one, out = against_one_process(runs, {name: [*a, "--out", str(root / f"one_{name}")] for name, a in args.items()},
                                   root / "ranks")
    one["grpo_tp"] = one["grpo"]
    return root, one, out


@pytest.mark.parametrize("name", ["grpo", "rloo", "online", "gkd", "grpo_tp"])
def test_sampling_commands_with_experts_spread_match_one_process(sampling_runs, name):
    root, one, out = sampling_runs
    want, got = _records(one[name]), _records(out[name])
    (start,) = [r for r in got if r["event"] == "start"]
    assert start["expert_parallel"] == 2 and start.get("tensor_parallel") == (2 if name == "grpo_tp" else None)
    name = name.removesuffix("_tp")
    keys = {"grpo": ("reward", "completion_len", "loss", "grad_norm", "kl"), "rloo": ("reward", "loss", "grad_norm"),
            "online": ("reward", "loss", "grad_norm"), "gkd": ("loss", "grad_norm")}[name]
    if name in ("grpo", "gkd"):  # (the policy's balance terms, in its objective)
        keys += ("aux_loss", "router_z_loss", "expert_load")
    assert len(_losses(got, key="loss")) == 4
    for key in keys:
        assert _losses(got, key=key) == pytest.approx(_losses(want, key=key), rel=1e-4, abs=1e-6), key
    if name == "grpo":  # the held-out prompt: decoded by the first rank while the second steps along
        assert _losses(got, "eval", "eval_reward") == pytest.approx(_losses(want, "eval", "eval_reward"), rel=1e-9)
        assert _losses(got, "eval", "eval_prompts") == [1, 1]
