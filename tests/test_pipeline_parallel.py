"""Pipeline parallelism (``train --pipeline-parallel N``): the decoder layers split into stages, each
micro-batch's activations handed stage to stage, against one process training on the same global
batch: losses, gradient norms (the whole model's, the tied embedding counted once), held-out losses,
the gathered checkpoint's weights and optimizer state, and resuming across layouts.

On 2 ranks (one pipeline of 2 stages): an untied Llama of 3 layers (2 + 1) in the 1F1B schedule
with document masks and fp16 loss scaling; a tied Qwen2 (q/k/v bias; its head a copy of the embedding on the last stage)
in GPipe with label smoothing, z-loss, activation checkpointing and a background step checkpoint;
a one-process step checkpoint resumed on 2 stages under FSDP. On 4 ranks (2 stages x 2 data-parallel
replicas): the tied Qwen2 with Muon, each replica averaging its stage's gradients, and under FSDP
(each stage sharded over its replicas) with 3 micro-batches in 1F1B. In one process: the split of the
layers and of the model (on the meta device, and loaded from a file: only a stage's tensors, the
file's values), the refusals."""

from __future__ import annotations

import pytest
import torch

from rank_runs import against_one_process, cli
from test_distributed import COMMON, _records, _resumed_here, _same_checkpoint, _same_run


def _configs():
    from apr_kernels.model import preset

    llama = preset("tiny_llama")
    return {"llama": llama.replace(tie_word_embeddings=False, num_layers=3),
            "qwen2": preset("tiny_qwen2").replace(num_layers=4)}


# name: (config, options of both runs, world, options of the pipeline run only)
CASES = {
    # (fp16 loss scaling: an overflow on any stage skips every stage's step)
    "llama_1f1b": ("llama", ["--document-mask", "--grad-accum", "3", "--precision", "fp16"], 2, []),
    "qwen2_gpipe": ("qwen2", ["--label-smoothing", "0.1", "--z-loss", "1e-3", "--grad-checkpointing"], 2,
                    ["--pipeline-schedule", "gpipe", "--async-checkpoint"]),
    "qwen2_muon_4": ("qwen2", ["--optimizer", "muon"], 4, []),
    # (each stage sharded over its 2 replicas: FSDP gathers around every micro-batch, reduce-scatters
    # after the last; the tied embedding's two copies summed shard by shard)
    "qwen2_fsdp_4": ("qwen2", ["--grad-accum", "3"], 4, ["--parallel", "fsdp"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from apr_kernels.model import Transformer
    from apr_kernels.train.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("pp")
    for i, (name, config) in enumerate(_configs().items()):
        torch.manual_seed(60 + i)
        model = Transformer(config, fast=False)
        with torch.no_grad():  # (biases and norms away from their zeros and ones: a misplaced tensor shows)
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        save_checkpoint(root / f"{name}.apr", model=model)
    args = {name: ["train", "--init", str(root / f"{config}.apr"), *COMMON, *extra]
            for name, (config, extra, _, _) in CASES.items()}
    pipelined = {name: ([*args[name], *only, "--pipeline-parallel", "2", "--out", str(root / f"pp_{name}")], world)
                 for name, (_, _, world, only) in CASES.items()}
    # a one-process step checkpoint resumed on 2 stages (its reference run first: the file must exist)
    code, first = cli([*args["qwen2_gpipe"], "--out", str(root / "one_qwen2_gpipe")])
    assert code == 0
    pipelined["resumed"] = (["train", "--resume", str(root / "one_qwen2_gpipe" / "step_000002.apr"),
                             "--pipeline-parallel", "2", "--parallel", "fsdp", "--json", "--no-progress", "--fast", "off",
                             "--dist-timeout", "60", "--out", str(root / "pp_resumed")], 2)
    one, out = against_one_process(pipelined, {name: [*a, "--out", str(root / f"one_{name}")]
                                               for name, a in args.items() if name != "qwen2_gpipe"}, root / "ranks")
    return root, {**one, "qwen2_gpipe": first}, out


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_matches_one_process(runs, name):
    root, one, out = runs
    # (Muon: its bf16 Newton-Schulz iteration amplifies the rounding of the replicas' gradient average,
    # as in test_distributed and test_tensor_parallel)
    # (fp16 autocast: the rounding differs with the CPU's fp16 kernels and the sharding: losses within
    # 3e-5 relative, and AdamW's steps move a weight whose gradient is tiny by up to its rate, 3e-3: 2e-4)
    muon, fp16 = "muon" in CASES[name][1], "fp16" in CASES[name][1]
    ref, got = _same_run(one[name], out[name], rel=2e-4 if muon else 3e-5 if fp16 else 1e-5,
                         grad_rel=2e-3 if muon else 1e-4,
                         eval_abs=None if muon or fp16 else 1e-5)
    (start,), (ref_start,) = ([r for r in recs if r["event"] == "start"] for recs in (got, ref))
    assert start["params"] == ref_start["params"] and start["trainable"] == ref_start["trainable"]
    assert start["pipeline_parallel"] == 2 and 0 < start["params_rank"] < start["params"]
    # the gathered checkpoint: one process's tensors (weights, moments), names and training state
    _same_checkpoint(root / f"pp_{name}" / "model.apr", root / f"one_{name}" / "model.apr", name,
                     atol=1e-3 if muon else 2e-4 if fp16 else 5e-5)
    from test_distributed import _tensors

    (_, meta_a), (_, meta_b) = (_tensors(root / d / "model.apr") for d in (f"pp_{name}", f"one_{name}"))
    for key in ("training.step", "training.data_position", "training.adam_steps", "tie_word_embeddings"):
        assert meta_a.get(key) == meta_b.get(key), key


def test_fsdp_shards_each_stage_over_its_replicas(runs):
    """Under --parallel fsdp a rank holds its rows of its stage: about half of what a replica of the
    same stage holds under DDP (same model, same 2 x 2 layout)."""
    _, _, out = runs
    held = {name: next(r for r in _records(out[name]) if r["event"] == "start")["params_rank"]
            for name in ("qwen2_fsdp_4", "qwen2_muon_4")}
    assert held["qwen2_muon_4"] * 0.45 < held["qwen2_fsdp_4"] < held["qwen2_muon_4"] * 0.6


def test_pipeline_step_checkpoints_resume_in_one_process_and_the_other_way(runs, tmp_path):
    """A step checkpoint of the 2-stage GPipe run (written in the background) continues in one process
    with the uninterrupted losses, and a one-process one continues on 2 stages."""
    root, one, out = runs
    marks = [r.get("background") for r in _records(out["qwen2_gpipe"]) if r["event"] == "checkpoint"]
    assert marks == [True, None]
    ref = [r["loss"] for r in _records(one["qwen2_gpipe"]) if r["event"] == "train"]
    here = _resumed_here(root / "pp_qwen2_gpipe" / "step_000002.apr", tmp_path)
    assert [r["loss"] for r in _records(here) if r["event"] == "train"] == pytest.approx(ref[2:], rel=1e-5)
    resumed = _records(out["resumed"])
    assert [r["step"] for r in resumed if r["event"] == "train"] == [3, 4]
    assert [r["loss"] for r in resumed if r["event"] == "train"] == pytest.approx(ref[2:], rel=1e-5)


# ----------------------------------------------------------------------------------- one process
def test_stage_layers_are_consecutive_and_even():
    from apr_kernels.train.pipeline_parallel import stage_layers

    assert stage_layers(3, 2) == [range(0, 2), range(2, 3)]
    assert [len(r) for r in stage_layers(24, 5)] == [5, 5, 5, 5, 4]
    assert [i for r in stage_layers(24, 5) for i in r] == list(range(24))


@pytest.mark.parametrize("tied", [True, False])
def test_a_stage_holds_its_layers_and_loads_only_them_from_a_file(tmp_path, tied):
    """``PipelineParallel.split`` on the meta device (as the loader calls it): stage 0 keeps the
    embedding and its layers, the last stage its layers, the final norm and the head (tied: the
    embedding as its head); loading the file that way fills exactly those tensors with the file's values."""
    from apr_kernels.model import Transformer
    from apr_kernels.model.loading import from_apr
    from apr_kernels.train.checkpoint import save_checkpoint
    from apr_kernels.train.pipeline_parallel import PipelineParallel

    config = _configs()["qwen2" if tied else "llama"].replace(num_layers=3)
    torch.manual_seed(3)
    whole = Transformer(config, fast=False)
    save_checkpoint(tmp_path / "m.apr", model=whole)
    want = dict(whole.named_parameters())
    layer = {0: ("model.layers.0.", "model.layers.1."), 1: ("model.layers.2.",)}
    for stage in (0, 1):
        pp = PipelineParallel(size=2, stage=stage, replicas=1, replica=0)
        model = from_apr(tmp_path / "m.apr", shard=pp.split)
        names = {n for n, _ in model.named_parameters()}
        ends = {0: {"model.embed_tokens.weight"},
                1: {"model.norm.weight"} | ({"model.embed_tokens.weight"} if tied else {"lm_head.weight"})}[stage]
        assert names == {n for n in want if n.startswith(layer[stage])} | ends
        for n, p in model.named_parameters():
            assert torch.equal(p, want[n]), n
        assert {n for n, _ in pp.owned(model)} == names - ({"model.embed_tokens.weight"} if tied and stage else set())
        absent = set(model.pipeline_absent)
        assert all(any(n.startswith(a) for a in absent) for n in set(want) - names)
        with pytest.raises(RuntimeError, match="runs on pipeline stage"):
            next(m for m in model.model.layers if type(m).__name__ == "PipelineHole")()


def test_refusals_name_the_reason():
    from apr_kernels.train.pipeline_parallel import check

    check(1, world=1, mode="none")  # (off)
    for kwargs, message in (
            ({"world": 4, "mode": "none"}, "expected --parallel ddp or fsdp"),
            ({"world": 4, "mode": "fsdp", "fsdp_shard": 2}, "expected no --fsdp-shard-size"),
            ({"world": 3, "mode": "ddp"}, "does not divide the world size 3"),
            ({"world": 2, "mode": "ddp", "num_layers": 1}, "the model has 1 decoder layers"),
            ({"world": 2, "mode": "ddp", "--lora-rank": True}, "--pipeline-parallel with --lora-rank is not supported")):
        with pytest.raises(ValueError, match=message):
            check(2, **kwargs)
