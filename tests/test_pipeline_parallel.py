"""Pipeline parallelism (``train --pipeline-parallel N``): the decoder layers split into stages, each
micro-batch's activations handed stage to stage, against one process training on the same global
batch: losses, gradient norms (the whole model's, the tied embedding counted once), held-out losses,
the gathered checkpoint's weights and optimizer state, and resuming across layouts.

On 2 ranks (one pipeline of 2 stages): an untied Llama of 3 layers (2 + 1) in the 1F1B schedule with
document masks, fp16 loss scaling and stage 0 frozen, and with LoRA and DoRA (the final checkpoint
merged) distilled from a one-layer teacher; a tied Qwen2 (q/k/v bias; its head a copy of the embedding
on the last stage) in GPipe with label smoothing, z-loss, activation checkpointing and a background
step checkpoint; a tied Qwen2 of 4 heads in the interleaved schedule (2 chunks of one layer per stage)
under FSDP with document masks and float8 attention projections; the tied Qwen2 with LoRA under FSDP
in the zero-bubble schedule (the gradients reduce-scattered after the last weight half), and the
Qwen2 of 4 heads so with 2 chunks a stage and float8 projections (FSDP's gathered weights kept for the
weight halves);
a Qwen2-MoE interleaved with its load-balancing and router z-losses (the whole model's routing), with
DoRA on every expert (a sparse layer's adapters drawn on the other stage); in the zero-bubble schedule
(each backward's weight half run apart from its input half) the tied Qwen2 with activation
checkpointing and, interleaved, the Qwen2-MoE with DoRA; a one-process step checkpoint resumed on 2
stages under FSDP. On 4 ranks (2 stages x 2): the tied Qwen2 under FSDP (each stage sharded over a
context-parallel group) with 3 micro-batches in 1F1B and --qat q8; tensor parallelism inside the
stages (the untied Llama under FSDP, each rank's parts sharded over its replicas, with sequence
parallelism and document masks; the Qwen2 of 4 heads interleaved, with Muon); context parallelism with
8-bit AdamW in the zero-bubble schedule, the group's ranks averaging their gradients like replicas;
8-bit AdamW on tensor-parallel parts under FSDP (one process's codes); a Mixtral on 2 replicas a stage
under HSDP (groups of one rank), which count their expert choices together, and with its experts
spread over each stage's 2 ranks (expert parallelism, FSDP); QLoRA with DoRA on a Mixtral's Q4_K
blocks (attention and experts), the experts spread over each stage's 2 ranks (FSDP). In one process:
the split of the layers and of the model (on the meta device, and loaded from a file: only a stage's
tensors, the file's values), every schedule run on a model of the stages (order, deadlock freedom,
idle share, activations held), the refusals."""

from __future__ import annotations

import json

import pytest
import torch

from rank_runs import against_one_process, cli
from test_distributed import COMMON, _records, _resumed_here, _same_checkpoint, _same_run


def _configs():
    from apr_kernels.model import preset

    llama = preset("tiny_llama")
    qwen2 = preset("tiny_qwen2").replace(num_layers=4)
    return {"llama": llama.replace(tie_word_embeddings=False, num_layers=3), "qwen2": qwen2,
            # (heads that split over 2 tensor-parallel ranks)
            "qwen2_tp": qwen2.replace(hidden_size=32, num_heads=4, num_kv_heads=2),
            # mixtures of experts (Qwen2-MoE's layer 1 dense: a part without routing of its own)
            "qwen2moe": preset("tiny_qwen2_moe").replace(num_layers=4), "mixtral": preset("tiny_mixtral"),
            # 8-bit AdamW split and sharded: every part whole 256-value blocks (o_proj's and down_proj's 256
            # columns a rank of 2)
            "wide": qwen2.replace(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=128, hidden_size=64,
                                  intermediate_size=512, vocab_size=320),
            # (stored in Q4_K blocks: rows of whole 256-value blocks)
            "quantised": preset("tiny_mixtral").replace(hidden_size=256, intermediate_size=256,
                                                        moe_intermediate_size=256, num_heads=4, num_kv_heads=2)}


# name: (config, options of both runs, world, options of the pipeline run only)
CASES = {
    # (fp16 loss scaling: an overflow on any stage skips every stage's step; --freeze leaving stage 0
    # (the embedding, layers 0 and 1) nothing to train: it runs no backward, and stage 1 sends none)
    "llama_1f1b": ("llama", ["--document-mask", "--grad-accum", "3", "--precision", "fp16", "--freeze",
                             "model.embed_tokens.weight", "model.layers.[01].*"], 2, []),
    # (LoRA with DoRA: every stage draws the whole model's adapters in order, keeps its own; the final
    # checkpoint merged from the stages' weights, adapters and magnitudes; distilled from a one-layer
    # Llama: the teacher loaded and its hidden states asked on the last stage alone)
    "llama_lora": ("llama", ["--lora-rank", "4", "--lora-dora", "--lr", "1e-2", "--teacher", "TEACHER",
                             "--kd-ratio", "0.6", "--kd-temperature", "2.0"], 2, []),
    # (and under FSDP: the adapters added on the meta device before the split, drawn once loaded; in the
    # zero-bubble schedule, the gradients reduce-scattered after the last weight half)
    "qwen2_lora_fsdp": ("qwen2", ["--lora-rank", "4", "--lr", "1e-2", "--grad-accum", "3"], 2,
                        ["--parallel", "fsdp", "--pipeline-schedule", "zero-bubble"]),
    "qwen2_gpipe": ("qwen2", ["--label-smoothing", "0.1", "--z-loss", "1e-3", "--grad-checkpointing"], 2,
                    ["--pipeline-schedule", "gpipe", "--async-checkpoint"]),
    # (each stage sharded over its 2 ranks, a context-parallel group that splits the positions: kept
    # gathered through the step, reduce-scattered after the last backward; the tied embedding's two copies
    # summed shard by shard; the distillation teacher loaded on the last stage only, sharded over its 2
    # ranks, each reading the whole rows and scoring its positions)
    "qwen2_fsdp_4": ("qwen2", ["--grad-accum", "3", "--qat", "q8", "--teacher", "TEACHER", "--kd-ratio", "0.5"], 4,
                     ["--parallel", "fsdp", "--context-parallel", "2"]),
    # (2 stages x 2 chunks of one layer: stage 0 runs layers 0 and 2, stage 1 layers 1 and 3; stage 1's
    # chunk 0 hands on to stage 0's chunk 1; under FSDP gathered around every micro-batch's forward and
    # backward, each chunk's last backward reduce-scattering; the attention's projections, of multiples
    # of 16, in float8)
    "qwen2_interleaved": ("qwen2_tp", ["--grad-accum", "4", "--document-mask", "--float8", "tensorwise"], 2,
                          ["--pipeline-schedule", "interleaved", "--parallel", "fsdp", "--fsdp-reshard-after-forward",
                           "always"]),
    # (2 stages x 2 tensor-parallel ranks, ranks 0-1 stage 0 and 2-3 stage 1: every layer's heads and
    # MLP rows split, the untied head by vocabulary range on stage 1 alone, the Llama's parts FSDP-sharded
    # (over one replica here: 8 ranks cost too much on 2 cores; a wrong mesh dimension still mixes parts),
    # under sequence parallelism each rank's half of the positions sent on; the tied Qwen2 interleaved,
    # both embedding copies split, distilled from a teacher whose layers the last stage's group splits)
    "llama_tp_4": ("llama", ["--document-mask"], 4, ["--tensor-parallel", "2", "--sequence-parallel", "--parallel",
                                                     "fsdp"]),
    "qwen2_tp_4": ("qwen2_tp", ["--optimizer", "muon", "--teacher", "TEACHER", "--kd-ratio", "0.5"], 4,
                   ["--tensor-parallel", "2", "--pipeline-schedule", "interleaved"]),
    # (2 stages x a context-parallel group of 2: each rank of a group holds 2 of the 4 chunks of every
    # row's positions, its activations of them sent on; the group's gradients averaged like replicas';
    # in the zero-bubble schedule, each backward's weight half run apart from its input half)
    "qwen2_cp_4": ("qwen2", ["--document-mask", "--optimizer", "adamw8bit"], 4, ["--context-parallel", "2",
                                                                                 "--pipeline-schedule", "zero-bubble"]),
    # (8-bit AdamW on tensor-parallel parts under FSDP: each moment's codes and scales joined as the whole
    # tensor's blocks for the checkpoint, the tied embedding's copies split by vocabulary range)
    "wide_adam8_tp_4": ("wide", ["--optimizer", "adamw8bit"], 4, ["--tensor-parallel", "2", "--parallel", "fsdp"]),
    # (mixtures of experts: the load-balancing and router z-losses of every sparse layer together, each
    # part's routing totals sent on after its activations and their gradient back after the activation
    # gradients; interleaved, one layer a part, a dense one among them, with DoRA on every expert (each
    # stage draws the adapters of the other stage's layers from a layer of their own kind, a sparse one's
    # every expert, so they are one process's: the terms' gradients reach the adapters through the
    # hidden states, the routers frozen); and on 2 replicas a stage (the weights themselves), which
    # count their expert choices together, under HSDP: FSDP groups of one rank replicating (8 ranks for
    # real shard groups cost too much on 2 cores; the clipping norm counts a replicated row once))
    "qwen2moe_interleaved": ("qwen2moe", ["--grad-accum", "4", "--document-mask", "--router-aux-loss-coef", "0.5",
                                          "--router-z-loss-coef", "0.1", "--lora-rank", "4", "--lora-dora", "--lr",
                                          "1e-2"], 2, ["--pipeline-schedule", "interleaved"]),
    # (zero-bubble: each backward split into its input's gradient, sent back at once, and its weights',
    # run where the stage would idle (split_backward.py); the tied Qwen2 with activation checkpointing
    # and document masks, and interleaved (2 chunks of one layer per stage) a Qwen2-MoE (the routing
    # totals' gradients among the inputs' half) with DoRA on every expert)
    "qwen2_zero_bubble": ("qwen2", ["--grad-accum", "4", "--document-mask", "--grad-checkpointing",
                                    "--label-smoothing", "0.1"], 2, ["--pipeline-schedule", "zero-bubble"]),
    "qwen2moe_zero_bubble": ("qwen2moe", ["--grad-accum", "4", "--router-aux-loss-coef", "0.5", "--router-z-loss-coef",
                                          "0.1", "--lora-rank", "4", "--lora-dora", "--lr", "1e-2"], 2,
                             ["--pipeline-schedule", "zero-bubble", "--pipeline-chunks", "2"]),
    # (under FSDP, float8 projections: their weight halves' backward reads the weights, which stay
    # gathered through the step)
    "qwen2_float8_zero_bubble": ("qwen2_tp", ["--grad-accum", "4", "--float8", "tensorwise"], 2,
                                 ["--parallel", "fsdp", "--pipeline-schedule", "zero-bubble", "--pipeline-chunks",
                                  "2"]),
    "mixtral_hsdp_4": ("mixtral", ["--router-aux-loss-coef", "0.5", "--router-z-loss-coef", "0.1"], 4,
                       ["--parallel", "fsdp", "--fsdp-shard-size", "1"]),
    # (expert parallelism inside the stages: each stage's experts spread over its 2 ranks, FSDP-sharded)
    "mixtral_ep_4": ("mixtral", ["--router-aux-loss-coef", "0.5", "--router-z-loss-coef", "0.1"], 4,
                     ["--expert-parallel", "2", "--parallel", "fsdp"]),
    # (QLoRA with DoRA: the attention projections and the experts the file's Q4_K blocks, under FSDP the
    # attention's sharded over a stage's 2 ranks, the experts spread over them; the checkpoints hold the
    # blocks bit for bit, gathered from their stage and holder)
    "mixtral_qdora_ep_4": ("quantised", ["--lora-rank", "4", "--lora-dora", "--lora-quantized-base", "--lr", "1e-2",
                                         "--router-aux-loss-coef", "0.5"], 4,
                           ["--parallel", "fsdp", "--expert-parallel", "2"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from apr_kernels.model import Transformer
    from apr_kernels.train.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("pp")
    for i, (name, config) in enumerate(_configs().items()):
        if name == "quantised":  # (the projections' and experts' matrices in Q4_K blocks, the router not)
            import apr_kernels
            from apr_kernels.quant import quantize
            from apr_kernels.train.checkpoint import model_metadata, model_tensors

            torch.manual_seed(60 + i)
            model = Transformer(config, fast=False)
            tensors = {n: t.materialize() for n, t in model_tensors(model).items()}
            blocks = ("proj.weight", "w1.weight", "w2.weight", "w3.weight")
            apr_kernels.save({n: quantize("Q4_K", t) if n.endswith(blocks) else t for n, t in tensors.items()},
                             root / f"{name}.apr", metadata=model_metadata(model))
            continue
        torch.manual_seed(60 + i)
        model = Transformer(config, fast=False)
        with torch.no_grad():  # (biases and norms away from their zeros and ones: a misplaced tensor shows)
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        save_checkpoint(root / f"{name}.apr", model=model)
    # a distillation teacher (another shape: one layer; the byte tokenizer the runs use embedded)
    from apr_kernels.train.cli import byte_tokenizer

    torch.manual_seed(59)
    save_checkpoint(root / "teacher.apr", model=Transformer(_configs()["llama"].replace(num_layers=1), fast=False),
                    tokenizer=byte_tokenizer())
    # multiple-choice questions scored at each eval (--eval-choices), through the stages in the GPipe case
    questions = root / "questions.jsonl"
    questions.write_text("".join(json.dumps({"context": f"The {w} is", "choices": [" red", " blue", " green"],
                                             "answer": i % 3}) + "\n"
                                 for i, w in enumerate(("sky", "sea", "leaf", "rose", "grass", "sun", "plum", "moss"))))
    args = {name: ["train", "--init", str(root / f"{config}.apr"), *COMMON,
                   *[str(root / "teacher.apr") if a == "TEACHER" else a for a in extra],
                   *(["--eval-choices", str(questions)] if name == "qwen2_gpipe" else [])]
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
    muon, fp16, eight_bit = ("muon" in CASES[name][1], "fp16" in CASES[name][1], "adamw8bit" in CASES[name][1])
    ref, got = _same_run(one[name], out[name], rel=2e-4 if muon else 3e-5 if fp16 else 1e-5,
                         grad_rel=2e-3 if muon else 1e-4,
                         eval_abs=None if muon or fp16 else 1e-5)
    (start,), (ref_start,) = ([r for r in recs if r["event"] == "start"] for recs in (got, ref))
    assert start["params"] == ref_start["params"] and start["trainable"] == ref_start["trainable"]
    assert start["pipeline_parallel"] == 2 and 0 < start["params_rank"] < start["params"]
    # (distillation: the cross entropy and the KL of every step; a mixture of experts: its measures)
    keys = [*(("ce", "kl") if "--teacher" in CASES[name][1] else ()),
            *(("aux_loss", "expert_load", "router_z_loss") if "moe" in name or "mixtral" in name else ())]
    for key in keys:
        assert [r[key] for r in got if r["event"] == "train"] == \
            pytest.approx([r[key] for r in ref if r["event"] == "train"], rel=1e-5)
    if "--teacher" in CASES[name][1]:  # (rank 0, the first stage, never asks the teacher: it holds none; its
        # pipeline's last-stage rank all of it, or under FSDP its shards over the stage's 2 ranks)
        assert start["teacher_params_rank"] == 0 < ref_start["teacher_params_rank"] == ref_start["teacher_params"]
        assert start["teacher_params"] == ref_start["teacher_params"]
        held = start["teacher_params_last_stage"]
        if "fsdp" in CASES[name][3]:
            assert held == start["teacher_params"] // 2
        elif "--tensor-parallel" in CASES[name][3]:  # (its layers' projections split over the group)
            assert start["teacher_params"] * 0.5 < held < start["teacher_params"]
        else:
            assert held == start["teacher_params"]
    # (--eval-choices: the questions' log-likelihoods through the stages pick the same answers)
    evals = [r for r in got if r["event"] == "eval"]
    assert [(r.get("eval_acc"), r.get("eval_acc_norm")) for r in evals] == \
        [(r.get("eval_acc"), r.get("eval_acc_norm")) for r in ref if r["event"] == "eval"]
    assert all((r.get("eval_questions") == 8) == (name == "qwen2_gpipe") for r in evals)
    only = CASES[name][3]
    schedule = only[only.index("--pipeline-schedule") + 1] if "--pipeline-schedule" in only else "1f1b"
    chunks = int(only[only.index("--pipeline-chunks") + 1]) if "--pipeline-chunks" in only else None
    assert (start["pipeline_schedule"], start["pipeline_chunks"]) == \
        (schedule, chunks or (2 if schedule == "interleaved" else 1))
    # the gathered checkpoint: one process's tensors (weights, moments), names and training state
    got_t, want_t = _same_checkpoint(root / f"pp_{name}" / "model.apr", root / f"one_{name}" / "model.apr", name,
                                     atol=1e-3 if muon or eight_bit else 2e-4 if fp16 else 5e-5)
    if CASES[name][0] == "quantised":  # (QLoRA's frozen bases: the file's blocks, bit for bit)
        import apr_kernels

        with apr_kernels.open(root / f"pp_{name}" / "step_000002.apr") as f, \
                apr_kernels.open(root / "quantised.apr") as src:
            bases = [n for n in src.keys() if src.info(n).dtype == "Q4_K"]
            assert any(".experts." in n for n in bases)
            assert all(f.info(n).dtype == "Q4_K" and torch.equal(f.get_raw(n), src.get_raw(n)) for n in bases)
    if eight_bit:  # (8-bit codes: one process's, but a value on a rounding edge; a misplaced block matches ~1/256)
        codes = [k for k in want_t if k.startswith("__training__.adam8.") and ".codes." in k]
        assert codes and all((got_t[k] == want_t[k]).float().mean() > 0.99 for k in codes), name
    from test_distributed import _tensors

    (_, meta_a), (_, meta_b) = (_tensors(root / d / "model.apr") for d in (f"pp_{name}", f"one_{name}"))
    for key in ("training.step", "training.data_position", "training.adam_steps", "tie_word_embeddings"):
        assert meta_a.get(key) == meta_b.get(key), key


def test_a_stage_is_shared_by_its_fsdp_replicas_or_tensor_parallel_ranks(runs):
    """Under --parallel fsdp a rank holds its rows of its stage: about half of what a replica of the
    same stage holds under DDP (same model, 2 ranks a stage); with --tensor-parallel 2 rank 0 holds
    its part of stage 0 (half of each layer's projections and of the embedding, the norms whole)."""
    _, _, out = runs
    held = {name: next(r for r in _records(out[name]) if r["event"] == "start")["params_rank"]
            for name in ("qwen2_fsdp_4", "qwen2_cp_4", "llama_tp_4", "llama_1f1b")}
    assert held["qwen2_cp_4"] * 0.45 < held["qwen2_fsdp_4"] < held["qwen2_cp_4"] * 0.6
    # and under FSDP a stage stays gathered through the step but with --fsdp-reshard-after-forward always
    gathered = {name: next(r for r in _records(out[name]) if r["event"] == "start").get("fsdp_gathered_through_step")
                for name in ("qwen2_fsdp_4", "qwen2_interleaved", "qwen2_lora_fsdp", "qwen2_cp_4")}
    assert gathered == {"qwen2_fsdp_4": True, "qwen2_interleaved": False, "qwen2_lora_fsdp": True, "qwen2_cp_4": None}
    assert held["llama_1f1b"] * 0.5 < held["llama_tp_4"] < held["llama_1f1b"] * 0.55


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
def _run_schedules(kind: str, size: int, micro: int, chunks: int = 1):
    """Every stage's ``schedule`` run together, each op taking 1 (forward) or 2 (backward) units of
    time per chunk's share of a stage's layers (a split backward: 1 for its input's half ``B``, 1 for
    its weights' ``W``, which waits for nothing): a receive waits for the message, a send never
    waits. Checks that each stage runs every forward and backward once (``W`` after its ``B``), that
    every message arrives in the order its receiver expects it, and that nothing deadlocks. Returns
    (the step's time over the time without idling, each stage's peak of chunks' activations held:
    from a forward to its backward's end)."""
    from collections import deque

    from apr_kernels.train.pipeline_parallel import schedule

    parts, split = size * chunks, kind == "zero-bubble"
    ops = [schedule(kind, size, s, micro, chunks) for s in range(size)]
    for s in range(size):
        assert sorted(ops[s]) == sorted((d, c, m) for d in ("BFW" if split else "BF") for c in range(chunks)
                                        for m in range(micro))
        if split:
            assert all(ops[s].index(("B", c, m)) < ops[s].index(("W", c, m)) for _, c, m in ops[s])
    queues: dict = {}  # (kind, from, to) -> messages (the sender's part, micro-batch, time sent)
    done, clock = [0] * size, [0.0] * size
    held, peak = [set() for _ in range(size)], [0] * size
    while any(done[s] < len(ops[s]) for s in range(size)):
        moved = False
        for s in range(size):
            if done[s] == len(ops[s]):
                continue
            op, c, m = ops[s][done[s]]
            k, start = c * size + s, clock[s]
            if op == "W":  # (the weights' half: its activations released after it)
                held[s].remove((c, m))
                clock[s] = start + 1 / chunks
                done[s] += 1
                moved = True
                continue
            if op == "F" and k > 0 or op == "B" and k < parts - 1:  # (a message to wait for)
                q = queues.setdefault(("acts", (s - 1) % size, s) if op == "F" else ("grads", (s + 1) % size, s),
                                      deque())
                if not q:
                    continue
                part, mb, sent = q.popleft()
                assert (part, mb) == ((k - 1, m) if op == "F" else (k + 1, m)), (kind, s, op, c, m)
                start = max(start, sent)
            if op == "B":
                assert (c, m) in held[s]
                if not split:
                    held[s].remove((c, m))
            else:
                held[s].add((c, m))
                peak[s] = max(peak[s], len(held[s]))
            clock[s] = start + (1 if op == "F" or split else 2) / chunks
            if op == "F" and k < parts - 1 or op == "B" and k > 0:
                dest = ("acts", s, (s + 1) % size) if op == "F" else ("grads", s, (s - 1) % size)
                queues.setdefault(dest, deque()).append((k, m, clock[s]))
            done[s] += 1
            moved = True
        assert moved, f"{kind}: deadlock with {size} stages, {micro} micro-batches, {chunks} chunks at {done}"
    assert not any(queues.values())
    return max(clock) / (3 * micro), peak


@pytest.mark.parametrize("size", [2, 3, 4])
def test_schedules_run_without_deadlock_in_order_with_their_idle_share(size):
    """Each schedule's ops on every stage, run together (``_run_schedules``): no deadlock, messages in
    order, the idle share GPipe's and 1F1B's (N - 1) / (M + N - 1), the interleaved schedule's
    smaller, (N - 1) / (C M + N - 1) of its chunk-sized ops, and 1F1B holding at most N - s
    micro-batches' activations on stage s (GPipe all of them; the interleaved schedule, in chunks of
    1/C of a stage, N C + N - 1 on stage 0)."""
    for micro in (1, 2, 3, 5, 8):
        for kind in ("gpipe", "1f1b"):
            span, peak = _run_schedules(kind, size, micro)
            assert span == pytest.approx((micro + size - 1) / micro)
            assert peak == ([micro] * size if kind == "gpipe" else [min(size - s, micro) for s in range(size)])
    for chunks in (2, 3):
        for micro in (size, 2 * size, 4 * size):
            span, peak = _run_schedules("interleaved", size, micro, chunks)
            assert span == pytest.approx((chunks * micro + size - 1) / (chunks * micro))
            assert span < _run_schedules("1f1b", size, micro)[0]
            if micro > size:  # stage 0: N C + N - 1 chunks' activations, 1 + (N - 1) / (N C) times 1F1B's N
                assert peak[0] == size * chunks + size - 1


@pytest.mark.parametrize("size", [2, 3, 4, 8])
def test_zero_bubble_schedule_fills_the_idle_time_with_weight_gradients(size):
    """``zero-bubble`` (each backward split into B and W, ``_run_schedules``): no deadlock, messages in
    order, at most N micro-batches held on every stage (stage 0's 1F1B peak), and ZB-H1's idle share
    (N - 1) / (3 M + N - 1) for M >= N, a third of 1F1B's (the held-back weight gradients fill the
    warm-up and cool-down); below 1F1B's with fewer micro-batches. And its interleaved form."""
    for micro in (1, 2, size, size + 1, 2 * size, 4 * size):
        span, peak = _run_schedules("zero-bubble", size, micro)
        assert peak == [min(size, micro)] * size
        assert span < (micro + size - 1) / micro
        if micro >= size:
            assert span == pytest.approx((3 * micro + size - 1) / (3 * micro))
    # interleaved (--pipeline-chunks C): (N - 1) / (3 C M + N - 1) in ops of a chunk, a third of
    # interleaved 1F1B's, holding no more chunks' activations than its stage 0
    for chunks in (2, 3):
        for micro in (size, 2 * size, 4 * size):
            span, peak = _run_schedules("zero-bubble", size, micro, chunks)
            assert span == pytest.approx((3 * chunks * micro + size - 1) / (3 * chunks * micro))
            assert max(peak) == max(_run_schedules("interleaved", size, micro, chunks)[1])


def test_stage_layers_are_consecutive_and_even():
    from apr_kernels.train.pipeline_parallel import stage_layers

    assert stage_layers(3, 2) == [range(0, 2), range(2, 3)]
    assert [len(r) for r in stage_layers(24, 5)] == [5, 5, 5, 5, 4]
    assert [i for r in stage_layers(24, 5) for i in r] == list(range(24))


def test_an_interleaved_stage_holds_every_nth_part():
    """With 2 chunks on 2 stages, 5 layers split into parts [0, 1], [2], [3], [4]: stage 0 holds parts 0
    and 2 (layers 0, 1, 3), stage 1 parts 1 and 3 (layers 2, 4); the first part has the embedding,
    the last the final norm."""
    from apr_kernels.model import Transformer
    from apr_kernels.train.pipeline_parallel import PipelineHole, PipelineParallel

    config = _configs()["llama"].replace(num_layers=5)
    held = {}
    for stage in (0, 1):
        pp = PipelineParallel(size=2, stage=stage, replicas=1, replica=0, schedule="interleaved", chunks=2)
        with torch.device("meta"):
            model = Transformer(config, fast=False)
        pp.split(model)
        held[stage] = [i for i, m in enumerate(model.model.layers) if not isinstance(m, PipelineHole)]
        assert [[list(model.model.layers).index(m) for m in pp.layers(model, c)] for c in (0, 1)] == \
            ([[0, 1], [3]] if stage == 0 else [[2], [4]])
        assert [pp.ends(c) for c in (0, 1)] == ([(True, False), (False, False)] if stage == 0
                                                else [(False, False), (False, True)])
        assert (model.model.embed_tokens is not None, model.model.norm is not None) == (stage == 0, stage == 1)
    assert held == {0: [0, 1, 3], 1: [2, 4]}
    assert PipelineHole(2, 1).stage == pp.stage_of_layer(2, 5) == 1


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


def test_freeze_counts_matches_over_the_stages_and_muon_refuses_a_frozen_stage(monkeypatch):
    """``--freeze`` under pipeline parallelism: the patterns' matches and the stages left nothing to
    train are summed over the pipeline (here one stage's view: the sum is its own); a stage with
    nothing to train runs no backward (the 1F1B run above), but Muon refuses it by name."""
    from apr_kernels.model import Transformer
    from apr_kernels.train.loop import freeze_parameters
    from apr_kernels.train.pipeline_parallel import PipelineParallel

    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, group=None: None)
    pp = PipelineParallel(size=2, stage=1, replicas=1, replica=0)
    model = Transformer(_configs()["llama"], fast=False)
    pp.split(model)
    every = ["model.layers.2.*", "model.norm.weight", "lm_head.weight"]
    with pytest.raises(ValueError, match=r"pipeline stage\(s\) 1; --optimizer muon expects a matrix to train"):
        freeze_parameters(model, every, pp, "muon")
    with pytest.raises(ValueError, match="'model.embed_tokens.weight': matches no trainable parameter"):
        freeze_parameters(model, ["model.embed_tokens.weight"], pp)  # (this view: no other stage adds its match)
    assert freeze_parameters(model, every, pp) == [n for n, _ in model.named_parameters()]


def test_fsdp_reshard_after_forward_needs_fsdp(tmp_path, capsys):
    code, _ = cli(["train", "--preset", "tiny_llama", *COMMON, "--fsdp-reshard-after-forward", "never", "--out",
                   str(tmp_path / "x")])
    assert code != 0
    assert ("--fsdp-reshard-after-forward never with --parallel none: expected --parallel fsdp"
            in capsys.readouterr().err)


def test_refusals_name_the_reason():
    from apr_kernels.train.pipeline_parallel import check

    check(1, world=1, mode="none")  # (off)
    for kwargs, message in (
            ({"world": 4, "mode": "none"}, "expected --parallel ddp or fsdp"),
            ({"world": 8, "mode": "fsdp", "fsdp_shard": 3}, "expected a divisor of 4"),
            ({"world": 8, "mode": "fsdp", "fsdp_shard": 1, "tensor": 2}, "and a multiple of --tensor-parallel 2"),
            ({"world": 3, "mode": "ddp"}, "does not divide the world size 3"),
            ({"world": 8, "mode": "ddp", "tensor": 3}, "2 x --tensor-parallel 3 does not divide the world size 8"),
            ({"world": 12, "mode": "ddp", "tensor": 2, "context": 2},
             "2 x --tensor-parallel 2 x --context-parallel 2 does not divide the world size 12"),
            ({"world": 6, "mode": "ddp", "context": 2}, "2 x --context-parallel 2 does not divide the world size 6"),
            ({"world": 2, "mode": "ddp", "num_layers": 1}, "the model has 1 decoder layers"),
            ({"world": 2, "mode": "ddp", "num_layers": 3, "chunks": 2}, "at least one per model chunk"),
            ({"world": 2, "mode": "ddp", "chunks": 2, "micro": 3}, "expected a multiple of --pipeline-parallel 2"),
            ({"world": 2, "mode": "ddp", "--lora-rank": True}, "--pipeline-parallel with --lora-rank is not supported"),
            ({"world": 2, "mode": "ddp", "schedule": "zero-bubble", "compiled": True},
             "--pipeline-schedule zero-bubble with --compile: a compiled layer's backward is one node"),
            ({"world": 2, "mode": "fsdp", "schedule": "zero-bubble", "selective": True},
             "zero-bubble with --grad-checkpointing selective: .* expected --grad-checkpointing full"),
            ({"world": 4, "mode": "fsdp", "schedule": "zero-bubble", "reshard_after_forward": True},
             "zero-bubble with --fsdp-reshard-after-forward always: .* stays gathered through the step")):
        with pytest.raises(ValueError, match=message):
            check(2, **kwargs)
