"""DDP / FSDP2 under torch.distributed (gloo, CPU, 2 processes) against single-process training.

One module fixture launches, side by side: ``torchrun`` running the unchanged CLI with
``--parallel fsdp``; a 2-rank ``env://`` worker (this file run as a script) that measures per-rank
memory while FSDP-loading a ~45 MB APR file, checks sharded evaluation, then runs the CLI twice in
its process group (DDP from scratch; FSDP resuming a 1-process checkpoint); and a 1-rank worker for
the memory baseline. The reference is the same CLI run in this process without any process group.
The init model has odd sizes (vocab 263, intermediate 75), so shards are uneven.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import pytest
import torch

from rank_runs import CRASH_RETRY, cli, crashed, free_port, rank_env, start_script
from text_helpers import write_short_documents

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAIN = [str(STDLIB / "json"), str(STDLIB / "textwrap.py")]
HELD = str(STDLIB / "shlex.py")
STEPS = 4
# global batch 4 = 2 ranks x 2 rows, two micro-batches per step (gradient sync on the last only)
COMMON = ["--tokenizer", "bytes", "--data", *TRAIN, "--eval-data", HELD, "--max-tokens", "20000",
          "--steps", str(STEPS), "--batch-size", "4", "--grad-accum", "2", "--seq-len", "32", "--lr", "3e-3",
          "--eval-tokens", "160", "--save-every", "2", "--json", "--seed", "5", "--no-progress",
          "--fast", "off", "--dist-timeout", "60"]


# ----------------------------------------------------------------------------------- helpers
def _launch(argv: list[str], world: int, env: dict | None = None, **kw) -> list[subprocess.Popen]:
    """``world`` processes joined through env:// (what torchrun sets up, minus its agent); ``env``:
    more variables."""
    port = free_port()
    return [subprocess.Popen(argv, env={**rank_env(r, world, port), **(env or {})}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, **kw) for r in range(world)]


# glibc raises its mmap threshold to the size of each large block freed, up to 32 MiB, and keeps
# blocks under it in the heap once freed: a load's freed temporaries then stay resident (8-12 MiB in
# some runs, in some processes). A fixed threshold returns them, so the worker's RSS is what it holds.
MEASURED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def _records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _losses(recs, event="train", key="loss"):
    return [r[key] for r in recs if r["event"] == event]


def _teacher_held(want: list[dict], got: list[dict], sharded: bool, name: str = "teacher") -> None:
    """The start records' counts of a frozen model (the teacher, or the ``reference``): the one-process
    run holds all of it; rank 0 of the 2-rank run all of it, or (sharded by FSDP) about half: its
    shards of every tensor, freed after each forward whatever ``--fsdp-reshard-after-forward`` says
    of the trained model (a frozen one has no backward); in fp32 (these runs compute in fp32)."""
    one, two = (next(r for r in recs if r["event"] == "start") for recs in (want, got))
    assert one[f"{name}_params_rank"] == one[f"{name}_params"] == two[f"{name}_params"] > 0
    assert one[f"{name}_dtype"] == two[f"{name}_dtype"] == "float32"
    assert f"{name}_fsdp_reshard_after_forward" not in one
    if sharded:
        assert 0.4 * two[f"{name}_params"] < two[f"{name}_params_rank"] <= 0.6 * two[f"{name}_params"], two
        assert two[f"{name}_fsdp_reshard_after_forward"] is True
    else:
        assert two[f"{name}_params_rank"] == two[f"{name}_params"], two


def _cli(main, argv) -> tuple[int, str]:
    """(exit code, stdout) of the CLI run in this process."""
    return cli(argv, main)


def _resumed_here(step_file: Path, out: Path) -> str:
    """The stdout of ``train --resume step_file`` (eager, JSON lines) run in this process."""
    code, stdout = cli(["train", "--resume", str(step_file), "--json", "--no-progress", "--fast", "off", "--out",
                        str(out)])
    assert code == 0, step_file
    return stdout


def _post_training_args(root: Path) -> dict[str, list[str]]:
    """dpo, kto and reward runs (without --out) from ``root / "init.apr"`` on preference data written
    into ``root``: 15 pairs, 11 unpaired KTO examples (uneven shares)."""
    things = ("fire", "lava", "the sun", "a stove", "an oven", "a kettle", "coal", "a candle", "a flame", "magma",
              "a furnace", "a heater", "steam", "a grill", "embers")
    (root / "pairs.jsonl").write_text("".join(json.dumps({"prompt": f"Is {t} hot? A:", "chosen": " yes",
                                                          "rejected": " no"}) + "\n" for t in things))
    (root / "kto.jsonl").write_text("".join(json.dumps({"prompt": f"Is {t} hot? A:", "completion": " yes" if i % 2
                                                        else " no", "label": i % 2 == 1}) + "\n"
                                            for i, t in enumerate(things[:11])))
    common = ["--init", str(root / "init.apr"), "--tokenizer", "bytes", "--steps", "4", "--batch-size", "4",
              "--grad-accum", "2", "--lr", "3e-3", "--max-len", "40", "--json", "--seed", "5", "--eval-fraction",
              "0.25", "--save-every", "2", "--fast", "off", "--dist-timeout", "60"]
    return {"dpo": ["dpo", "--data", str(root / "pairs.jsonl"), "--beta", "0.5", *common],
            "kto": ["kto", "--data", str(root / "kto.jsonl"), "--beta", "0.5", *common],
            "reward": ["reward", "--data", str(root / "pairs.jsonl"), *common]}


def _sampling_args(root: Path, init: Path, teacher: Path | None = None) -> dict[str, list[str]]:
    """grpo, rloo, online-dpo (and with ``teacher`` gkd) runs (without --out) from ``init`` on prompts,
    records and a reward function written into ``root``: 5 prompts, 11 records."""
    (root / "records.jsonl").write_text("".join(json.dumps({"prompt": f"Is {t} hot?", "completion": " yes"}) + "\n"
                                                for t in ("fire", "lava", "the sun", "a stove", "an oven", "a kettle",
                                                          "coal", "a candle", "a flame", "magma", "steam")))
    (root / "rewards.py").write_text("def letters(prompts, completions, **kw):\n"
                                     "    return [sum(c.isascii() and c.islower() for c in t) / max(1, len(t)) "
                                     "for t in completions]\n")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Write:", "Say:", "Go:", "Now:", "Then:")))
    common = ["--init", str(init), "--tokenizer", "bytes", "--data", str(prompts), "--reward",
              f"{root / 'rewards.py'}:letters", "--steps", "4", "--batch-size", "4", "--max-new-tokens", "6",
              "--max-prompt-len", "16", "--lr", "1e-2", "--json", "--seed", "5", "--save-every", "2",
              "--dist-timeout", "60"]
    out = {"grpo": ["grpo", *common, "--num-generations", "4", "--eval-data", str(prompts), "--micro-batch", "3",
                    "--scale-rewards", "batch", "--loss-type", "grpo", "--beta", "0.2", "--num-iterations", "2"],
           "rloo": ["rloo", *common, "--num-generations", "3", "--beta", "0.1", "--micro-batch", "2"],
           "online": ["online-dpo", *common, "--num-generations", "3", "--beta", "0.5", "--micro-batch", "1"]}
    if teacher is not None:
        out["gkd"] = ["gkd", "--init", str(init), "--teacher", str(teacher), "--tokenizer", "bytes", "--data",
                      str(root / "records.jsonl"), "--steps", "4", "--batch-size", "4", "--grad-accum", "2", "--lr",
                      "3e-3", "--max-new-tokens", "5", "--max-prompt-len", "24", "--max-len", "40", "--json", "--seed",
                      "5", "--eval-fraction", "0.25", "--dist-timeout", "60"]
    return out


def _memory_kib() -> dict:
    status = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", status).group(1)) for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}


class _NotingPages:
    """``apr_kernels.open``'s file, noting the file pages mapped in this process (RssFile, KiB) as it
    closes into ``closes``: a load's file pages only grow until its files close."""

    def __init__(self, f, closes: list):
        self._f, self._closes = f, closes

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        self._f.__enter__()
        return self

    def __exit__(self, *exc):
        self._closes.append(_memory_kib()["RssFile"])
        return self._f.__exit__(*exc)


def _odd_config():
    from apr_kernels.model import ModelConfig

    return ModelConfig(architecture="qwen2", hidden_size=42, num_layers=2, num_heads=3, num_kv_heads=1,
                       head_dim=14, intermediate_size=75, vocab_size=263, max_position_embeddings=256,
                       rope_theta=1e4, rms_norm_eps=1e-6, attention_bias=True, tie_word_embeddings=True)


def _aligned_config():
    """Every matrix of at least 4096 values splits over 2 ranks into whole 256-value blocks (8-bit
    AdamW moments under FSDP, adamw8bit.eight_bit_layout); k/v (2048 values) and the vectors keep fp32."""
    from apr_kernels.model import ModelConfig

    return ModelConfig(architecture="qwen2", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=16, intermediate_size=128, vocab_size=320, max_position_embeddings=256,
                       rope_theta=1e4, rms_norm_eps=1e-6, attention_bias=True, tie_word_embeddings=True)


def _big_config():  # ~11M fp32 parameters: a 45 MB file
    from apr_kernels.model import ModelConfig

    return ModelConfig(architecture="llama", hidden_size=256, num_layers=12, num_heads=4, num_kv_heads=2,
                       intermediate_size=704, vocab_size=8192, max_position_embeddings=256)


# ------------------------------------------------------------------------------------ worker
def _worker(spec_path: str) -> int:
    """One rank: memory of an FSDP load, sharded eval vs single-process eval, then CLI runs."""
    from apr_kernels.cli import main
    from apr_kernels.model.loading import from_apr as plain_from_apr
    from apr_kernels.train import distributed as D
    from apr_kernels.train.data import evaluate
    from apr_kernels.train.loop import Trainer, TrainConfig

    spec = json.loads(Path(spec_path).read_text())
    env = D.setup("cpu", timeout_s=60, need_group=True)
    out = Path(spec["out"])
    result = {"rank": env.rank, "world": env.world_size}
    try:
        # first a tiny model, so lazy imports and one-time allocations are not counted below; which of
        # its layers hold gathered parameters (plain tensors, not DTensor shards) after a forward without
        # backward, after resharding, and after a forward and backward, per reshard_after_forward
        for after_forward in (True, False):
            m = D.from_apr(spec["warmup"], env, "fsdp", fast=False, reshard_after_forward=after_forward)
            x = torch.randint(0, 263, (1, 8), generator=torch.Generator().manual_seed(env.rank))
            gathered = []
            for step in ("no_grad", "reshard", "backward"):
                if step == "no_grad":
                    with torch.no_grad():
                        m(x)
                elif step == "reshard":
                    D.reshard(m)
                else:
                    m.loss(x[:, :-1], x[:, 1:]).backward()
                gathered.append([not hasattr(p, "device_mesh") for p in m.model.layers[0].parameters()])
            result[f"gathered_reshard_after_forward_{after_forward}"] = gathered
        # peak-resident-memory delta around the sharded load (VmHWM reset just before it)
        try:
            Path("/proc/self/clear_refs").write_text("5")
            before = _memory_kib()
        except OSError:
            before = None  # no peak reset here: the test skips the memory claim
        import apr_kernels

        opened, closes = apr_kernels.open, []
        apr_kernels.open = lambda *a, **k: _NotingPages(opened(*a, **k), closes)
        try:
            model = D.from_apr(spec["memory"], env, "fsdp", fast=False)
        finally:
            apr_kernels.open = opened
        after = _memory_kib()
        result["load_peak_kib"] = None if before is None else after["VmHWM"] - before["VmRSS"]
        # the file pages mapped at the load's end (shared page cache, in RSS while mapped)
        result["load_file_kib"] = None if before is None else max(closes) - before["RssFile"]
        # private memory kept (the shards); the mapped file pages are shared page cache, gone at close
        result["load_anon_kib"] = None if before is None else after["RssAnon"] - before["RssAnon"]
        result["local_param_bytes"] = sum(p.to_local().numel() * 4 for p in model.parameters())
        # sharded evaluation: 5 sequences, batch 2 -> uneven shares and a padding forward on rank 1
        tokens = torch.randint(0, 8192, (5 * 32 + 1,), generator=torch.Generator().manual_seed(1))
        result["eval_sharded"] = D.parallelize(model, "fsdp", env).evaluate(tokens, 32, batch_size=2)
        if env.rank == 0:
            result["eval_single"] = evaluate(plain_from_apr(spec["memory"], fast=False), tokens, 32,
                                             batch_size=3)
        # one step (AdamW moments exist), then the peak memory of a gathered checkpoint per rank
        par = D.parallelize(model, "fsdp", env)
        trainer = Trainer(model, tokens, None, TrainConfig(steps=1, batch_size=2, seq_len=32), parallel=par,
                          log=lambda *a: None)
        trainer.train_step()
        gc.collect()
        if before is not None:
            Path("/proc/self/clear_refs").write_text("5")
            mark = _memory_kib()
        from apr_kernels.train.gathering import save_checkpoint

        save_checkpoint(out / f"ckpt.world{env.world_size}.apr", trainer, par)
        result["ckpt_peak_kib"] = None if before is None else _memory_kib()["VmHWM"] - mark["VmRSS"]
        del model, trainer, par
        for i, argv in enumerate(spec["runs"] if env.world_size > 1 else []):
            code, stdout = _cli(main, argv)  # reuses this process group (the CLI's setup() sees it)
            result[f"run{i}"] = {"code": code, "stdout": stdout}
    finally:
        (out / f"rank{env.rank}.world{env.world_size}.json").write_text(json.dumps(result))
        D.teardown(env)
    return 0


# ----------------------------------------------------------------------------------- fixture
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from apr_kernels.cli import main
    from apr_kernels.model import Transformer
    from apr_kernels.train.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("dist")
    torch.manual_seed(11)
    init = root / "init.apr"
    save_checkpoint(init, model=Transformer(_odd_config(), fast=False))
    big = root / "big.apr"
    save_checkpoint(big, model=Transformer(_big_config(), fast=False))

    # the reference: one process, no process group, same global batch
    one = root / "one"
    code, one_out = _cli(main, ["train", "--init", str(init), *COMMON, "--out", str(one)])
    assert code == 0
    # document masking: short documents, so that most rows hold a boundary
    train_docs, held_docs = write_short_documents(root / "docs")
    docs = ["--document-mask", "--data", train_docs, "--eval-data", held_docs]
    code, one_docs_out = _cli(main, ["train", "--init", str(init), *COMMON, *docs, "--out", str(root / "one_docs")])
    assert code == 0
    lora = ["--lora-rank", "4", "--lr", "1e-2", "--save-best"]  # (best.apr: gathered and merged under FSDP)
    code, one_lora_out = _cli(main, ["train", "--init", str(init), *COMMON, *lora, "--out", str(root / "one_lora")])
    assert code == 0
    # Muon on the decoder matrices (AdamW on the rest): every rank applies the same update
    code, one_muon_out = _cli(main, ["train", "--init", str(init), *COMMON, "--optimizer", "muon",
                                     "--out", str(root / "one_muon")])
    assert code == 0
    # distillation from a teacher (another shape, the same byte tokenizer), whole on every rank
    from apr_kernels.train.cli import byte_tokenizer

    torch.manual_seed(12)
    teacher = root / "teacher.apr"
    save_checkpoint(teacher, model=Transformer(_odd_config().replace(num_layers=1), fast=False),
                    tokenizer=byte_tokenizer())
    kd = ["--teacher", str(teacher), "--kd-ratio", "0.6", "--kd-temperature", "2.0"]
    code, one_kd_out = _cli(main, ["train", "--init", str(init), *COMMON, *kd, "--out", str(root / "one_kd")])
    assert code == 0

    # DPO (robust loss: its settings must travel into checkpoints), 11 training pairs (uneven reference shares)
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Is {t} hot? A:", "chosen": " yes", "rejected": " no"}) + "\n"
                             for t in ("fire", "lava", "the sun", "a stove", "an oven", "a kettle", "coal", "a candle",
                                       "a flame", "magma", "a furnace", "a heater", "steam", "a grill", "embers")))
    dpo = ["dpo", "--init", str(init), "--tokenizer", "bytes", "--data", str(pairs), "--steps", str(STEPS),
           "--batch-size", "4", "--grad-accum", "2", "--lr", "3e-3", "--beta", "0.5", "--max-len", "40", "--json",
           "--seed", "5", "--eval-fraction", "0.25", "--save-every", "2", "--loss", "robust",
           "--label-smoothing", "0.1", "--dist-timeout", "60"]
    code, one_dpo_out = _cli(main, [*dpo, "--out", str(root / "one_dpo")])
    assert code == 0
    # GRPO: 4 prompts per step (2 per rank), each prompt's 4 completions sampled on its rank
    (root / "rewards.py").write_text("def letters(prompts, completions, **kw):\n"
                                     "    return [sum(c.isascii() and c.islower() for c in t) / max(1, len(t)) "
                                     "for t in completions]\n")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Write:", "Say:", "Go:", "Now:", "Then:")))
    grpo = ["grpo", "--init", str(init), "--tokenizer", "bytes", "--data", str(prompts), "--reward",
            f"{root / 'rewards.py'}:letters", "--steps", str(STEPS), "--batch-size", "4", "--num-generations", "4",
            "--max-new-tokens", "6", "--max-prompt-len", "16", "--lr", "1e-2", "--json", "--seed", "5",
            "--save-every", "2", "--dist-timeout", "60", "--eval-data", str(prompts), "--micro-batch", "3",
            "--scale-rewards", "batch", "--loss-type", "grpo"]  # the step-wide std and counts over both ranks
    code, one_grpo_out = _cli(main, [*grpo, "--out", str(root / "one_grpo")])
    assert code == 0
    # and TRL's per-token loss: a KL penalty to a second copy of the model (sharded under FSDP) and two
    # updates per generation batch (the generating policy's log-probabilities from a no-grad pass)
    grpo_kl = [*grpo, "--beta", "0.2", "--num-iterations", "2"]
    code, one_grpo_kl_out = _cli(main, [*grpo_kl, "--out", str(root / "one_grpo_kl")])
    assert code == 0
    # on-policy distillation: the GRPO run with the distillation teacher's per-token signal added
    grpo_opd = [*grpo, "--teacher", str(teacher), "--teacher-coef", "0.5"]
    code, one_grpo_opd_out = _cli(main, [*grpo_opd, "--out", str(root / "one_grpo_opd")])
    assert code == 0
    # KTO: the same prompts, alternately good " yes" and bad " no" (unpaired), z over the global micro-batch
    examples = root / "kto.jsonl"
    examples.write_text("".join(json.dumps({"prompt": f"Is {t} hot? A:", "completion": " yes" if i % 2 else " no",
                                            "label": i % 2 == 1}) + "\n"
                                for i, t in enumerate(("fire", "lava", "the sun", "a stove", "an oven", "a kettle",
                                                       "coal", "a candle", "a flame", "magma", "steam"))))
    kto = ["kto", "--init", str(init), "--tokenizer", "bytes", "--data", str(examples), "--steps", str(STEPS),
           "--batch-size", "4", "--grad-accum", "2", "--lr", "3e-3", "--beta", "0.5", "--max-len", "40", "--json",
           "--seed", "5", "--eval-fraction", "0.25", "--dist-timeout", "60"]
    code, one_kto_out = _cli(main, [*kto, "--out", str(root / "one_kto")])
    assert code == 0

    # a reward model from the same pairs: a new score head on init's body, the centring term on
    reward = ["reward", "--init", str(init), "--tokenizer", "bytes", "--data", str(pairs), "--steps", str(STEPS),
              "--batch-size", "4", "--grad-accum", "2", "--lr", "3e-3", "--max-len", "40", "--json", "--seed", "5",
              "--eval-fraction", "0.25", "--center-rewards-coefficient", "0.01", "--dist-timeout", "60"]
    code, one_reward_out = _cli(main, [*reward, "--out", str(root / "one_reward")])
    assert code == 0
    # GRPO scored by that reward model too (sharded under FSDP), one held-out prompt: the rank with none
    # to score joins the other's forwards of it
    (root / "one_prompt.jsonl").write_text(json.dumps({"prompt": "Say:"}) + "\n")
    grpo_rm = list(grpo)
    grpo_rm.insert(grpo_rm.index("--reward") + 2, str(root / "one_reward" / "model.apr"))
    grpo_rm[grpo_rm.index("--eval-data") + 1] = str(root / "one_prompt.jsonl")
    code, one_grpo_rm_out = _cli(main, [*grpo_rm, "--out", str(root / "one_grpo_rm")])
    assert code == 0

    # GKD from the distillation teacher: half the micro-batches sampled by the student, the others by
    # the teacher (--seq-kd; FSDP: each gathered whole for its samples)
    records = root / "records.jsonl"
    records.write_text("".join(json.dumps({"prompt": f"Is {t} hot?", "completion": " yes"}) + "\n"
                               for t in ("fire", "lava", "the sun", "a stove", "an oven", "a kettle", "coal",
                                         "a candle", "a flame", "magma", "steam")))
    gkd = ["gkd", "--init", str(init), "--teacher", str(teacher), "--tokenizer", "bytes", "--data", str(records),
           "--steps", str(STEPS), "--batch-size", "4", "--grad-accum", "2", "--lr", "3e-3", "--max-new-tokens", "5",
           "--max-prompt-len", "24", "--max-len", "40", "--json", "--seed", "5", "--eval-fraction", "0.25",
           "--dist-timeout", "60", "--seq-kd"]
    code, one_gkd_out = _cli(main, [*gkd, "--out", str(root / "one_gkd")])
    assert code == 0

    # online DPO on the GRPO prompts: each prompt's best and worst of 3 samples against a frozen copy
    online = ["online-dpo", "--init", str(init), "--tokenizer", "bytes", "--data", str(prompts), "--reward",
              f"{root / 'rewards.py'}:letters", "--steps", str(STEPS), "--batch-size", "4", "--num-generations", "3",
              "--max-new-tokens", "6", "--max-prompt-len", "16", "--lr", "1e-2", "--beta", "0.5", "--json",
              "--seed", "5", "--dist-timeout", "60", "--micro-batch", "1"]
    code, one_online_out = _cli(main, [*online, "--out", str(root / "one_online")])
    assert code == 0

    # RLOO on the same prompts: the KL to a frozen copy in the reward, advantages normalised over the
    # step (sums over both ranks), two updates per generation batch (the clipped completion ratio)
    rloo = ["rloo", "--init", str(init), "--tokenizer", "bytes", "--data", str(prompts), "--reward",
            f"{root / 'rewards.py'}:letters", "--steps", str(STEPS), "--batch-size", "4", "--num-generations", "3",
            "--max-new-tokens", "6", "--max-prompt-len", "16", "--lr", "1e-2", "--beta", "0.1",
            "--normalize-advantages", "--num-iterations", "2", "--json", "--seed", "5", "--dist-timeout", "60",
            "--micro-batch", "2"]
    code, one_rloo_out = _cli(main, [*rloo, "--out", str(root / "one_rloo")])
    assert code == 0
    # --freeze: the embedding and layer 0 stay as loaded (FSDP: sharded parameters without gradients)
    freeze = ["--freeze", "model.embed_tokens.*", "model.layers.0.*"]
    code, one_freeze_out = _cli(main, ["train", "--init", str(init), *COMMON, *freeze, "--out", str(root / "one_freeze")])
    assert code == 0

    # a Qwen2-MoE model (routed experts, a shared expert, one dense layer): the load-balancing loss on
    # each rank's tokens, every expert's gradient synchronised (unused experts too)
    moe_init = root / "moe_init.apr"
    torch.manual_seed(13)
    save_checkpoint(moe_init, model=Transformer(_odd_config().replace(
        architecture="qwen2_moe", num_experts=5, num_experts_per_tok=2, moe_intermediate_size=18,
        shared_expert_intermediate_size=30, mlp_only_layers=(1,), router_aux_loss_coef=0.02), fast=False))
    code, one_moe_out = _cli(main, ["train", "--init", str(moe_init), *COMMON, "--out", str(root / "one_moe")])
    assert code == 0

    # 8-bit AdamW (the same codes on every rank: each applies the same update to its replica)
    code, one_adam8_out = _cli(main, ["train", "--init", str(init), *COMMON, "--optimizer", "adamw8bit",
                                      "--out", str(root / "one_adam8")])
    assert code == 0
    # QLoRA: the odd config's projections stored as APR_Q8 blocks, kept as the frozen base
    from test_lora import _quantised_file

    qinit = root / "q8.apr"
    _quantised_file(qinit, _odd_config(), "APR_Q8", seed=15)
    qlora = ["--lora-rank", "4", "--lora-quantized-base", "--lr", "1e-2"]
    code, one_qlora_out = _cli(main, ["train", "--init", str(qinit), *COMMON, *qlora, "--out", str(root / "one_qlora")])
    assert code == 0
    dora = ["--lora-rank", "4", "--lora-dora", "--lr", "1e-2"]
    code, one_dora_out = _cli(main, ["train", "--init", str(init), *COMMON, *dora, "--out", str(root / "one_dora")])
    assert code == 0
    # --init from a DoRA step checkpoint: its adapters folded into the weights while loading
    dora_init = ["train", "--init", str(root / "one_dora" / "step_000002.apr"), *COMMON]
    code, one_dora_init_out = _cli(main, [*dora_init, "--out", str(root / "one_dora_init")])
    assert code == 0
    torch.manual_seed(14)
    aligned = root / "aligned.apr"
    save_checkpoint(aligned, model=Transformer(_aligned_config(), fast=False))
    adam8 = ["train", "--init", str(aligned), *COMMON, "--optimizer", "adamw8bit"]
    code, one_adam8_aligned_out = _cli(main, [*adam8, "--out", str(root / "one_adam8_aligned")])
    assert code == 0

    env1 = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    # (its periodic checkpoint written in the background: the gathers in the snapshot, then a thread)
    torchrun_args = ["--nproc_per_node=2", "-m", "apr_kernels", "train", "--init", str(init), *COMMON,
                     "--parallel", "fsdp", "--async-checkpoint", "--out", str(root / "fsdp")]
    fast_on = [a if a != "off" else "on" for a in COMMON]
    spec = {"out": str(root), "memory": str(big), "warmup": str(init), "runs": [
        ["train", "--init", str(init), *COMMON, "--parallel", "ddp", "--out", str(root / "ddp")],
        ["train", "--resume", str(one / "step_000002.apr"), "--parallel", "fsdp", "--out", str(root / "r2"),
         "--json", "--no-progress", "--fast", "off"],
        ["train", "--init", str(init), *COMMON, *docs, "--parallel", "ddp", "--out", str(root / "ddp_docs")],
        ["train", "--init", str(init), *COMMON, *lora, "--parallel", "ddp", "--out", str(root / "ddp_lora")],
        # (each layer kept gathered from its forward to its backward; resharded after evaluations)
        ["train", "--init", str(init), *COMMON, *lora, "--parallel", "fsdp", "--fsdp-reshard-after-forward", "never",
         "--out", str(root / "fsdp_lora")],
        ["train", "--resume", str(root / "fsdp_lora" / "step_000002.apr"), "--parallel", "fsdp", "--out",
         str(root / "fsdp_lora_resumed"), "--json", "--no-progress", "--fast", "off"],
        [*dpo, "--parallel", "ddp", "--out", str(root / "ddp_dpo")],
        # the fused path (its CPU reference code) with padding-free batches: each rank's answers packed
        # into one row, each a document
        [*dpo, "--parallel", "fsdp", "--fast", "on", "--out", str(root / "fsdp_dpo")],
        ["dpo", "--resume", str(root / "fsdp_dpo" / "step_000002.apr"), "--parallel", "fsdp", "--json",
         "--out", str(root / "fsdp_dpo_resumed")],
        [*grpo, "--parallel", "ddp", "--out", str(root / "ddp_grpo")],
        # (the policy's layers kept gathered from each forward to its backward, the reference's not)
        [*grpo_kl, "--parallel", "fsdp", "--fsdp-reshard-after-forward", "never", "--out", str(root / "fsdp_grpo_kl")],
        [*kto, "--parallel", "ddp", "--out", str(root / "ddp_kto")],
        [*kto, "--parallel", "fsdp", "--out", str(root / "fsdp_kto")],
        ["train", "--init", str(init), *COMMON, *kd, "--parallel", "fsdp", "--out", str(root / "fsdp_kd")],
        [*grpo_opd, "--parallel", "fsdp", "--out", str(root / "fsdp_grpo_opd")],
        ["train", "--init", str(init), *COMMON, "--optimizer", "muon", "--parallel", "ddp",
         "--out", str(root / "ddp_muon")],
        [*reward, "--parallel", "ddp", "--out", str(root / "ddp_reward")],
        # the fused path's reference code with padding-free rows, the score head sharded
        [*reward, "--parallel", "fsdp", "--fast", "on", "--out", str(root / "fsdp_reward")],
        [*gkd, "--parallel", "ddp", "--out", str(root / "ddp_gkd")],
        [*gkd, "--parallel", "fsdp", "--out", str(root / "fsdp_gkd")],
        [*online, "--parallel", "ddp", "--out", str(root / "ddp_online")],
        [*online, "--parallel", "fsdp", "--out", str(root / "fsdp_online")],
        [*rloo, "--parallel", "ddp", "--out", str(root / "ddp_rloo")],
        [*rloo, "--parallel", "fsdp", "--out", str(root / "fsdp_rloo")],
        ["train", "--init", str(init), *COMMON, *freeze, "--parallel", "fsdp", "--out", str(root / "fsdp_freeze")],
        ["train", "--init", str(moe_init), *COMMON, "--parallel", "ddp", "--out", str(root / "ddp_moe")],
        # (the fast path: the experts as grouped GEMMs, their gradients handed to FSDP as slices)
        ["train", "--init", str(moe_init), *fast_on, "--parallel", "fsdp", "--out", str(root / "fsdp_moe")],
        ["train", "--init", str(init), *COMMON, "--optimizer", "adamw8bit", "--parallel", "ddp",
         "--out", str(root / "ddp_adam8")],
        # 8-bit moments of each rank's rows (run28), resumed exactly (run29); the odd shapes' shards
        # do not start on block boundaries: fp32 moments (run30)
        [*adam8, "--parallel", "fsdp", "--out", str(root / "fsdp_adam8")],
        ["train", "--resume", str(root / "fsdp_adam8" / "step_000002.apr"), "--parallel", "fsdp", "--out",
         str(root / "fsdp_adam8_resumed"), "--json", "--no-progress", "--fast", "off"],
        ["train", "--init", str(init), *COMMON, "--optimizer", "adamw8bit", "--parallel", "fsdp",
         "--out", str(root / "fsdp_adam8_odd")],
        # Muon on row shards: each update orthogonalised whole (run31), resumed exactly (run32)
        ["train", "--init", str(init), *COMMON, "--optimizer", "muon", "--parallel", "fsdp",
         "--out", str(root / "fsdp_muon")],
        ["train", "--resume", str(root / "fsdp_muon" / "step_000002.apr"), "--parallel", "fsdp", "--out",
         str(root / "fsdp_muon_resumed"), "--json", "--no-progress", "--fast", "off"],
        # DoRA on row shards: each magnitude row lives with its weight row (run33), resumed (run34)
        ["train", "--init", str(init), *COMMON, *dora, "--parallel", "fsdp", "--out", str(root / "fsdp_dora")],
        ["train", "--resume", str(root / "fsdp_dora" / "step_000002.apr"), "--parallel", "fsdp", "--out",
         str(root / "fsdp_dora_resumed"), "--json", "--no-progress", "--fast", "off"],
        # QLoRA: the quantised base whole on every rank, the rest sharded (run35), resumed (run36)
        ["train", "--init", str(qinit), *COMMON, *qlora, "--parallel", "fsdp", "--out", str(root / "fsdp_qlora")],
        ["train", "--resume", str(root / "fsdp_qlora" / "step_000002.apr"), "--parallel", "fsdp", "--out",
         str(root / "fsdp_qlora_resumed"), "--json", "--no-progress", "--fast", "off"],
        # fp16 with loss scaling: DDP (run37), FSDP with the sharded scaler (run38), resumed (run39)
        ["train", "--init", str(init), *COMMON, "--precision", "fp16", "--parallel", "ddp", "--out",
         str(root / "ddp_fp16")],
        ["train", "--init", str(init), *COMMON, "--precision", "fp16", "--parallel", "fsdp", "--out",
         str(root / "fsdp_fp16")],
        ["train", "--resume", str(root / "fsdp_fp16" / "step_000002.apr"), "--parallel", "fsdp", "--out",
         str(root / "fsdp_fp16_resumed"), "--json", "--no-progress", "--fast", "off"],
        # a LoRA (DoRA) checkpoint as --init, merged while loading sharded: each rank its rows (run40)
        [*dora_init, "--parallel", "fsdp", "--out", str(root / "fsdp_dora_init")],
        # context parallelism: both ranks on the same rows, each with half of every row's positions;
        # DDP eager (run41), FSDP on the fast path with the layers recomputed in the backward (run42)
        ["train", "--init", str(init), *COMMON, "--parallel", "ddp", "--context-parallel", "2",
         "--out", str(root / "ddp_cp")],
        ["train", "--init", str(init), *fast_on, "--parallel", "fsdp", "--context-parallel", "2",
         "--grad-checkpointing", "--out", str(root / "fsdp_cp")],
        # and with document masking: documents crossing the ranks' chunks (run43)
        ["train", "--init", str(init), *COMMON, *docs, "--parallel", "ddp", "--context-parallel", "2",
         "--out", str(root / "ddp_cp_docs")],
        # the fast path (the package's ops, their CPU reference code here) under FSDP: the fused loss
        # runs inside forward on the unsharded output weight (run44)
        ["train", "--init", str(init), *fast_on, "--parallel", "fsdp", "--out", str(root / "fsdp_fast")],
        # GRPO with a reward model, both sharded (run45)
        [*grpo_rm, "--parallel", "fsdp", "--out", str(root / "fsdp_grpo_rm")],
    ]}
    (root / "spec.json").write_text(json.dumps(spec))
    worker = [sys.executable, __file__, str(root / "spec.json")]

    def launch() -> tuple[list[subprocess.Popen], list[tuple[str, str]]]:
        """torchrun, the 2-rank worker and the 1-rank worker side by side; (processes, their outputs)."""
        torchrun = [sys.executable, "-m", "torch.distributed.run", f"--master_port={free_port()}", *torchrun_args]
        procs = [subprocess.Popen(torchrun, env=env1, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                 *_launch(worker, 2, MEASURED_MALLOC),
                 subprocess.Popen(worker, env={**env1, **MEASURED_MALLOC}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)]
        outputs = []
        try:
            for p in procs:
                outputs.append(p.communicate(timeout=240))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        return procs, outputs

    def report(procs, outputs) -> list[str]:
        # every failed process's output: the first to fail is often not the one listed first
        return [f"{' '.join(map(str, p.args))[-300:]} (exit {p.returncode})\nstdout: {out[-1500:]}\nstderr: {err[-3000:]}"
                for p, (out, err) in zip(procs, outputs) if p.returncode != 0]

    procs, outputs = launch()
    # a process (or torchrun's child) killed by a signal: reported, then everything once more (rank_runs.CRASH_RETRY)
    if crashed(procs) or re.search(r"exitcode\s*:\s*-\d", outputs[0][1]):
        warnings.warn("\n".join([CRASH_RETRY, *report(procs, outputs)]))  # (in pytest's summary, even on a pass)
        procs, outputs = launch()
    failed = report(procs, outputs)
    assert not failed, "\n".join(failed)
    ranks = {(r["rank"], r["world"]): r for r in
             (json.loads(f.read_text()) for f in root.glob("rank*.world*.json"))}
    return {"root": root, "one": one, "one_out": one_out, "one_docs_out": one_docs_out, "one_lora_out": one_lora_out,
            "one_dpo_out": one_dpo_out, "one_grpo_out": one_grpo_out, "one_kto_out": one_kto_out,
            "one_grpo_kl_out": one_grpo_kl_out, "one_kd_out": one_kd_out, "one_grpo_opd_out": one_grpo_opd_out,
            "one_muon_out": one_muon_out, "one_reward_out": one_reward_out, "one_grpo_rm_out": one_grpo_rm_out,
            "one_gkd_out": one_gkd_out,
            "one_online_out": one_online_out, "one_rloo_out": one_rloo_out, "one_freeze_out": one_freeze_out,
            "one_moe_out": one_moe_out, "one_adam8_out": one_adam8_out, "one_adam8_aligned_out": one_adam8_aligned_out,
            "one_dora_out": one_dora_out, "one_qlora_out": one_qlora_out, "one_dora_init_out": one_dora_init_out,
            "torchrun_out": outputs[0][0], "ranks": ranks}


def _same_run(one_text: str, run_text: str, *, rel: float = 1e-5, grad_rel: float | None = 1e-4,
              eval_abs: float | None = None) -> tuple[list, list]:
    """A multi-rank run's log against one process's on the same global batch: 4 steps of the same
    losses, gradient norms (``grad_rel``; None: not compared) and held-out losses (``eval_abs``, else
    ``rel``). Returns both logs' records (reference, run)."""
    ref, got = _records(one_text), _records(run_text)
    assert len(_losses(got)) == len(_losses(ref)) == 4
    assert _losses(got) == pytest.approx(_losses(ref), rel=rel)
    if grad_rel is not None:
        assert _losses(got, "train", "grad_norm") == pytest.approx(_losses(ref, "train", "grad_norm"), rel=grad_rel)
    tol = {"abs": eval_abs} if eval_abs is not None else {"rel": rel}
    assert _losses(got, "eval", "eval_loss") == pytest.approx(_losses(ref, "eval", "eval_loss"), **tol)
    return ref, got


def _tensors(path) -> dict:
    import apr_kernels

    with apr_kernels.open(path) as f:
        return {name: f.get_tensor(name).clone() for name in f.keys()}, dict(f.metadata)


def _same_checkpoint(path, want, what: str, atol: float = 5e-5) -> tuple[dict, dict]:
    """The tensors of checkpoint ``path`` and of ``want`` (a one-process run's): the same names, and every
    floating one (weights, moments; not the ranks' RNG states) close. Returns both."""
    (a, _), (b, _) = _tensors(path), _tensors(want)
    assert sorted(a) == sorted(b)
    for key in b:
        if b[key].is_floating_point() and not key.startswith("__training__.rng"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=atol, msg=f"{what}: {key}")
    return a, b


def test_fsdp_under_torchrun_matches_one_process(runs):
    ref, got = _records(runs["one_out"]), _records(runs["torchrun_out"])
    assert len(_losses(ref)) == STEPS and len(_losses(got)) == STEPS  # rank 0 alone logs
    assert _losses(got) == pytest.approx(_losses(ref), rel=1e-5)
    assert _losses(got, "train", "grad_norm") == pytest.approx(_losses(ref, "train", "grad_norm"), rel=1e-4)
    assert _losses(got, "eval", "eval_loss") == pytest.approx(_losses(ref, "eval", "eval_loss"), abs=1e-5)
    assert _losses(got, "eval", "eval_tokens") == _losses(ref, "eval", "eval_tokens") == [160, 160]
    # the gathered checkpoint: same weights, AdamW moments and data position as one process wrote
    (a, meta_a), (b, meta_b) = _tensors(runs["root"] / "fsdp" / "model.apr"), _tensors(runs["one"] / "model.apr")
    assert sorted(a) == sorted(b) and any(k.startswith("__training__.adam.") for k in a)
    close, total = 0, 0
    for name in b:
        if b[name].is_floating_point():
            # AdamW divides by sqrt(v): where a gradient is ~0, summation-order noise can move single
            # elements by up to ~lr (3e-3); a wrong shard or a lost update would be off everywhere
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=5e-5, msg=name)
            close += int(torch.isclose(a[name], b[name], rtol=1e-4, atol=1e-6).sum())
            total += b[name].numel()
    assert close >= 0.999 * total, (close, total)
    for key in ("training.step", "training.data_position", "training.adam_steps"):
        assert meta_a[key] == meta_b[key], key
    assert not list((runs["root"] / "fsdp").glob(".*.tmp"))  # written atomically, nothing left over


def test_fast_path_under_fsdp_matches_one_process(runs):
    """--fast on (fused RoPE, SwiGLU, add+RMSNorm, GQA attention and the fused linear cross entropy) under
    FSDP2 on 2 ranks against one eager process: the same loss curve."""
    ref, got = _records(runs["one_out"]), _records(runs["ranks"][(0, 2)]["run44"]["stdout"])
    assert len(_losses(got)) == STEPS
    assert _losses(got) == pytest.approx(_losses(ref), rel=1e-5)
    assert _losses(got, "eval", "eval_loss") == pytest.approx(_losses(ref, "eval", "eval_loss"), abs=1e-5)


def test_ddp_matches_one_process(runs):
    ref = _records(runs["one_out"])
    run0, run1 = runs["ranks"][(0, 2)]["run0"], runs["ranks"][(1, 2)]["run0"]
    assert run0["code"] == run1["code"] == 0
    got = _records(run0["stdout"])
    assert _losses(got) == pytest.approx(_losses(ref), rel=1e-5)
    assert _losses(got, "eval", "eval_loss") == pytest.approx(_losses(ref, "eval", "eval_loss"), abs=1e-5)
    assert run1["stdout"] == ""  # only rank 0 logs


@pytest.mark.parametrize("run,ref", [
    ("run2", "one_docs_out"),  # document masking: spans travel with each rank's rows and in evaluation
    ("run3", "one_lora_out"),  # LoRA: only the adapters train (the frozen base has nothing to reduce)
    ("run4", "one_lora_out"),  # LoRA under FSDP: adapters added before sharding, sharded with the base
    # (and the layers not resharded after their forward)
], ids=["document-mask", "lora", "fsdp-lora"])
def test_ddp_variants_match_one_process(runs, run, ref):
    want = _records(runs[ref])
    rank0 = runs["ranks"][(0, 2)][run]
    assert rank0["code"] == runs["ranks"][(1, 2)][run]["code"] == 0
    got = _records(rank0["stdout"])
    # (the start record says how FSDP was asked to shard the layers; nothing without FSDP)
    assert next(r for r in got if r["event"] == "start").get("fsdp_reshard_after_forward") == \
        {"run4": False}.get(run)
    assert _losses(got) == pytest.approx(_losses(want), rel=1e-5)
    assert _losses(got, "eval", "eval_loss") == pytest.approx(_losses(want, "eval", "eval_loss"), abs=1e-5)


def test_fsdp_lora_checkpoints_resume_sharded_and_merge_at_the_end(runs):
    """The LoRA run under FSDP: its step checkpoint (frozen base + gathered adapters) resumes on 2 ranks
    where the one-process run continued, and its final model.apr holds the merged weights (fp32,
    gathered and merged tensor by tensor on rank 0) equal to the one-process run's."""
    ref = _records(runs["one_lora_out"])
    run = runs["ranks"][(0, 2)]["run5"]
    assert run["code"] == 0
    got = _records(run["stdout"])
    assert [r["step"] for r in got if r["event"] == "train"] == [3, 4]
    assert _losses(got) == pytest.approx(_losses(ref)[2:], rel=1e-5)
    step, _ = _tensors(runs["root"] / "fsdp_lora" / "step_000002.apr")
    assert any(k.endswith(".lora_B") for k in step) and any(k.startswith("__training__.adam.") for k in step)
    (a, meta_a), (b, meta_b) = (_tensors(runs["root"] / "fsdp_lora" / "model.apr"),
                                _tensors(runs["root"] / "one_lora" / "model.apr"))
    assert sorted(a) == sorted(b) and not any("lora_" in k for k in a)
    assert meta_a["training.lora"] == meta_b["training.lora"]
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=5e-5, msg=name)
    # --save-best: the eval at the last step is the run's only one after training, so best.apr is that
    # model too, written through the same gather (merged, no optimizer state)
    (best, meta_best), (ref_best, _) = (_tensors(runs["root"] / "fsdp_lora" / "best.apr"),
                                        _tensors(runs["root"] / "one_lora" / "best.apr"))
    assert meta_best["training.step"] == 4 and sorted(best) == sorted(b)
    for name in b:
        torch.testing.assert_close(best[name], ref_best[name], rtol=1e-4, atol=5e-5, msg=name)
        torch.testing.assert_close(best[name], a[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("run", ["run6", "run7"], ids=["ddp", "fsdp"])
def test_dpo_on_two_ranks_matches_one_process(runs, run):
    """DPO with a global batch of 4 pairs x 2 micro-batches: each rank scores its share of the reference
    and held-out pairs (gathered) and trains on half of each batch; losses, rewards and held-out
    accuracy equal the one-process run's, and so does the final model."""
    want = _records(runs["one_dpo_out"])
    rank0, rank1 = runs["ranks"][(0, 2)][run], runs["ranks"][(1, 2)][run]
    assert rank0["code"] == rank1["code"] == 0 and rank1["stdout"] == ""
    got = _records(rank0["stdout"])
    start = next(r for r in got if r["event"] == "start")
    assert (start["world"], start["pairs"], start["eval_pairs"], start["kind"]) == (2, 11, 4, "robust")
    assert start["padding_free"] == (run == "run7")
    assert start.get("fsdp_reshard_after_forward") == (True if run == "run7" else None)
    for key in ("loss", "margin", "reward_chosen", "reward_acc", "grad_norm"):
        assert _losses(got, key=key) == pytest.approx(_losses(want, key=key), rel=1e-5, abs=1e-6), key
    for key in ("eval_loss", "eval_reward_acc"):
        assert _losses(got, "eval", key) == pytest.approx(_losses(want, "eval", key), rel=1e-5, abs=1e-6), key
    assert _losses(want)[-1] < _losses(want)[0]
    (a, _), (b, _) = (_tensors(runs["root"] / ("ddp_dpo" if run == "run6" else "fsdp_dpo") / "model.apr"),
                      _tensors(runs["root"] / "one_dpo" / "model.apr"))
    assert sorted(a) == sorted(b)
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=5e-5, msg=name)


@pytest.mark.parametrize("run", ["run9", "run10"], ids=["ddp", "fsdp-kl-two-iterations"])
def test_grpo_on_two_ranks_matches_one_process(runs, run):
    """GRPO with 4 prompts per step: each rank samples (FSDP: with its shards gathered), scores and
    trains on 2 (in micro-batches of 3 completions); the completions, rewards, losses, gradient norms
    and held-out rewards are the one-process run's, and so is the final model. Under FSDP with the
    per-token loss (KL to a sharded reference copy, two updates per generation batch, the policy's
    layers not resharded after their forwards) likewise, and the KL and clipped share too."""
    kl = run == "run10"
    want = _records(runs["one_grpo_kl_out" if kl else "one_grpo_out"])
    rank0, rank1 = runs["ranks"][(0, 2)][run], runs["ranks"][(1, 2)][run]
    assert rank0["code"] == rank1["code"] == 0 and rank1["stdout"] == ""
    got = _records(rank0["stdout"])
    start = next(r for r in got if r["event"] == "start")
    assert start["world"] == 2 and start.get("fsdp_reshard_after_forward") == (False if kl else None)
    if kl:
        assert max(_losses(want, key="kl")) > 0
        _teacher_held(want, got, sharded=True, name="reference")
    for key in ("reward", "completion_len", "reward_std", "loss", "grad_norm", *(("kl", "clip_ratio") if kl else ())):
        assert _losses(got, key=key) == pytest.approx(_losses(want, key=key), rel=1e-5, abs=1e-7), key
    # held-out prompts: 5 split 3 / 2 between the ranks
    for key in ("eval_reward", "eval_completion_len", "eval_prompts"):
        assert _losses(got, "eval", key) == pytest.approx(_losses(want, "eval", key), rel=1e-9), key
    (a, _), (b, _) = (_tensors(runs["root"] / ("fsdp_grpo_kl" if kl else "ddp_grpo") / "model.apr"),
                      _tensors(runs["root"] / ("one_grpo_kl" if kl else "one_grpo") / "model.apr"))
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=5e-5, msg=name)


@pytest.mark.parametrize("run", ["run11", "run12"], ids=["ddp", "fsdp"])
def test_kto_on_two_ranks_matches_one_process(runs, run):
    """KTO with micro-batches of 4 examples (2 per rank) x 2: the KL estimate of each micro-batch is
    taken over both ranks' mismatched pairs, so losses, KL, rewards, gradient norms and held-out
    values equal the one-process run's."""
    want = _records(runs["one_kto_out"])
    rank0, rank1 = runs["ranks"][(0, 2)][run], runs["ranks"][(1, 2)][run]
    assert rank0["code"] == rank1["code"] == 0 and rank1["stdout"] == ""
    got = _records(rank0["stdout"])
    for key in ("loss", "kl", "reward_desirable", "reward_undesirable", "grad_norm"):
        assert _losses(got, key=key) == pytest.approx(_losses(want, key=key), rel=1e-5, abs=1e-6), key
    for key in ("eval_loss", "eval_kl", "eval_reward_desirable"):
        assert _losses(got, "eval", key) == pytest.approx(_losses(want, "eval", key), rel=1e-5, abs=1e-6), key
    assert max(_losses(want, key="kl")) > 0  # the estimate moved off its clamp


def test_sharded_dpo_checkpoint_resumes_on_two_ranks(runs):
    """The FSDP DPO run's step checkpoint (gathered weights, moments and the reference log-likelihoods)
    resumes sharded where the one-process run continued, with its loss settings."""
    want = _records(runs["one_dpo_out"])
    run = runs["ranks"][(0, 2)]["run8"]
    assert run["code"] == 0
    got = _records(run["stdout"])
    assert [r["step"] for r in got if r["event"] == "train"] == [3, 4]
    assert _losses(got) == pytest.approx(_losses(want)[2:], rel=1e-5)


def test_two_process_checkpoint_resumes_in_one_process(runs, tmp_path):
    """The FSDP run's step-2 checkpoint, written in the background (--async-checkpoint), resumes in one
    process with the uninterrupted losses."""
    from apr_kernels.cli import main

    assert [r.get("background") for r in _records(runs["torchrun_out"]) if r["event"] == "checkpoint"] == [True, None]

    code, out = _cli(main, ["train", "--resume", str(runs["root"] / "fsdp" / "step_000002.apr"), "--out",
                            str(tmp_path), "--json", "--no-progress", "--fast", "off"])
    assert code == 0
    ref, got = _records(runs["one_out"]), _records(out)
    assert [r["step"] for r in got if r["event"] == "train"] == [3, 4]
    assert _losses(got) == pytest.approx(_losses(ref)[2:], rel=1e-5)
    assert _losses(got, "eval", "eval_loss") == pytest.approx(_losses(ref, "eval", "eval_loss")[-1:], abs=1e-5)


def test_one_process_checkpoint_resumes_on_two_ranks_under_fsdp(runs):
    ref = _records(runs["one_out"])
    run = runs["ranks"][(0, 2)]["run1"]
    assert run["code"] == 0
    got = _records(run["stdout"])
    assert [r["step"] for r in got if r["event"] == "train"] == [3, 4]
    assert _losses(got) == pytest.approx(_losses(ref)[2:], rel=1e-5)
    assert _losses(got, "eval", "eval_loss") == pytest.approx(_losses(ref, "eval", "eval_loss")[-1:], abs=1e-5)


def test_sharded_evaluation_matches_one_process(runs):
    r = runs["ranks"]
    loss, count = r[(0, 2)]["eval_single"]
    assert count == 5 * 32
    for key in ((0, 2), (1, 2), (0, 1)):
        assert r[key]["eval_sharded"][1] == count
        assert r[key]["eval_sharded"][0] == pytest.approx(loss, abs=1e-5)


def test_fsdp_loading_peak_memory_per_rank_shrinks_with_ranks(runs):
    """VmHWM growth around ``distributed.from_apr`` (peak reset via /proc/self/clear_refs): one rank
    holds the model (~42 MiB) plus the file pages it read; each of two ranks about half of each.
    Mapped file pages count in RSS though they are shared page cache, and by whole page-cache folios
    (ext4 maps up to 2 MiB at a fault): each of two ranks maps 80-85% of what one rank maps, a share
    the kernel decides, so it is printed, not asserted. The private memory at the peak is at least the
    peak growth less the file pages mapped at the load's end (they only grow while the file is open):
    that is what must halve. The private memory kept is the shards."""
    r = runs["ranks"]
    model_bytes = _big_config().num_parameters() * 4
    model_kib = model_bytes / 1024
    assert r[(0, 1)]["local_param_bytes"] == model_bytes
    halves = [r[(k, 2)]["local_param_bytes"] for k in (0, 1)]
    assert sum(halves) == model_bytes and max(halves) <= 0.52 * model_bytes
    if r[(0, 1)]["load_peak_kib"] is None:
        pytest.skip("/proc/self/clear_refs is not writable here: no peak-memory reset")
    ranks = [(0, 1), (0, 2), (1, 2)]
    peak, pages, kept = ([r[k][f"load_{what}_kib"] for k in ranks] for what in ("peak", "file", "anon"))
    private = [p - f for p, f in zip(peak, pages)]
    def mib(kibs):
        return " / ".join(f"{k / 1024:.1f}" for k in kibs)

    print(f"\nFSDP load of a {model_kib / 1024:.1f} MiB model (MiB; 1 rank, then each of 2): peak RSS growth "
          f"{mib(peak)}; file pages mapped {mib(pages)}; private at the peak >= {mib(private)}; private kept "
          f"{mib(kept)}")
    assert private[0] >= 0.9 * model_kib  # one rank really holds the whole model
    assert max(private[1:]) <= 0.75 * private[0]
    assert kept[0] >= 0.9 * model_kib and max(kept[1:]) <= 0.6 * model_kib


def test_fsdp_layers_stay_gathered_after_a_forward_only_when_asked(runs):
    """``reshard_after_forward=False`` (``--fsdp-reshard-after-forward never``): a layer keeps its
    gathered parameters after a forward, until ``distributed.reshard``; a backward reshards it either
    way. The default frees them after the forward."""
    for rank in (0, 1):
        r = runs["ranks"][(rank, 2)]
        kept, freed = r["gathered_reshard_after_forward_False"], r["gathered_reshard_after_forward_True"]
        assert [set(g) for g in kept] == [{True}, {False}, {False}]
        assert [set(g) for g in freed] == [{False}, {False}, {False}]


def test_fsdp_checkpoint_gathers_one_tensor_at_a_time(runs):
    """Rank 0 writes the gathered checkpoint (weights + two AdamW moments: 12 bytes per parameter)
    while holding about one whole tensor at a time: its peak RSS growth stays far below the state
    it writes. The file equals the sharded state: the same checkpoint from 1 and 2 ranks."""
    r = runs["ranks"]
    state_bytes = _big_config().num_parameters() * 12
    peaks = {w: r[(0, w)]["ckpt_peak_kib"] for w in (1, 2)}
    if peaks[1] is None:
        pytest.skip("/proc/self/clear_refs is not writable here: no peak-memory reset")
    print(f"\ncheckpoint of {state_bytes / 2**20:.0f} MiB of state: rank 0 peak RSS growth "
          f"{peaks[1] / 1024:.1f} MiB (1 rank), {peaks[2] / 1024:.1f} MiB (2 ranks)")
    assert max(peaks.values()) * 1024 < 0.25 * state_bytes
    one, meta1 = _tensors(runs["root"] / "ckpt.world1.apr")
    two, meta2 = _tensors(runs["root"] / "ckpt.world2.apr")
    assert one.keys() == two.keys() and meta1["training.adam_steps"] == meta2["training.adam_steps"]
    assert any(k.startswith("__training__.adam.exp_avg_sq.") for k in one)
    for name in one:
        if not name.startswith("__training__.rng"):
            torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-5, msg=name)  # Adam step noise


# ------------------------------------------------------------------------------------ failure
def _first_train_line(proc: subprocess.Popen, deadline: float) -> None:
    for line in proc.stdout:
        if line.startswith('{"event": "train"'):
            return
        assert time.time() < deadline, "rank 0 logged no training step in time"
    raise AssertionError(f"rank 0 exited before training: {proc.stderr.read()[-2000:]}")


def test_a_dead_or_hung_rank_stops_the_other_with_an_error(tmp_path):
    """SIGKILL (connection closes: fails at once) and SIGSTOP (alive but silent: the process-group
    timeout, here 6 s, must fire): rank 0 exits with status 1 and says why, never hangs."""
    timeout_s = 6
    argv = [sys.executable, "-m", "apr_kernels", "train", "--preset", "tiny_llama", "--tokenizer", "bytes",
            "--data", TRAIN[0], "--max-tokens", "20000", "--steps", "100000", "--batch-size", "2",
            "--seq-len", "32", "--eval-tokens", "64", "--json", "--no-progress", "--fast", "off",
            "--dist-timeout", str(timeout_s)]
    jobs = {"SIGKILL": _launch([*argv, "--parallel", "fsdp", "--out", str(tmp_path / "k")], 2),
            "SIGSTOP": _launch([*argv, "--parallel", "ddp", "--out", str(tmp_path / "s")], 2)}
    try:
        deadline = time.time() + 120
        for procs in jobs.values():
            _first_train_line(procs[0], deadline)
        t0 = time.time()
        for sig, procs in jobs.items():
            os.kill(procs[1].pid, getattr(signal, sig))
        for sig, procs in jobs.items():
            _, err = procs[0].communicate(timeout=60)
            took = time.time() - t0
            assert procs[0].returncode == 1, (sig, err[-2000:])
            assert "apr-kernels train: error: rank 0 of 2 stopped:" in err and "--dist-timeout" in err, err[-2000:]
            if sig == "SIGSTOP":
                assert "Timed out" in err and took >= timeout_s - 1, (took, err[-2000:])
            assert took < timeout_s + 45, (sig, took)
    finally:
        for procs in jobs.values():
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.communicate()


# --------------------------------------------------------------------------------------- units
def test_rank_preload_reaches_every_rank(tmp_path):
    """A forked rank starts with ``rank_runs.PRELOAD`` imported and those objects frozen (the server
    would ignore an ImportError of one, leaving each rank to import it itself)."""
    from rank_runs import _forkserver, _preloaded

    rank = _forkserver().Process(target=_preloaded, args=(str(tmp_path / "err"),))
    rank.start()
    rank.join(120)
    assert rank.exitcode == 0, f"a forked rank lacks PRELOAD's modules or frozen objects (exit {rank.exitcode})"


def test_start_script_forks_only_where_the_rank_server_suits_the_script(tmp_path):
    """``rank_runs.start_script``: a script asking for the test process's Triton mode (without CUDA)
    forks from the rank server, one asking for the other mode starts a fresh interpreter; both give
    the script's stdout, stderr, exit code, arguments, folder and environment as ``subprocess`` would."""
    import subprocess

    from rank_runs import ForkedScript, start_script

    script = tmp_path / "echo.py"
    script.write_text("import os, sys\nprint(sys.argv[1:], os.getcwd(), os.environ.get('ECHO'))\n"
                      "print('to stderr', file=sys.stderr)\nsys.exit(3)\n")
    mode = os.environ.get("TRITON_INTERPRET", "")
    (tmp_path / "here").mkdir()
    runs = {}
    for same in (True, False):
        env = dict(os.environ, ECHO=f"same={same}", TRITON_INTERPRET=mode if same else mode + "x")
        proc = start_script([script, "a", 1], env, tmp_path, f"echo{same}", cwd=tmp_path / "here")
        out, err = proc.communicate(timeout=120)
        runs[same] = (type(proc), out, err, proc.returncode)
    want = "{} " + str(tmp_path / "here") + " same={}\n"
    forked = ForkedScript if not torch.cuda.is_available() else subprocess.Popen
    assert runs[True] == (forked, want.format(["a", "1"], True), "to stderr\n", 3)
    assert runs[False] == (subprocess.Popen, want.format(["a", "1"], False), "to stderr\n", 3)


def test_local_rows_are_disjoint_equal_shares_of_the_global_batch():
    from apr_kernels.train.distributed import local_rows

    index = torch.randperm(1000)[:12]
    shares = [local_rows(index, r, 3) for r in range(3)]
    assert [len(s) for s in shares] == [4, 4, 4]
    assert torch.equal(torch.cat(shares), index)  # disjoint, in order, nothing left out
    with pytest.raises(ValueError, match=r"--batch-size 10 is not a multiple of the world size 3"):
        local_rows(index[:10], 0, 3)


_FULL_TENSOR_SCRIPT = """
import itertools, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from apr_kernels.train.distributed import full_tensor
dist.init_process_group("gloo")
x = torch.randn(7, 5, 3, generator=torch.Generator().manual_seed(3))
checked = 0
for shape in [(2,), (1, 2), (2, 1)]:
    mesh = init_device_mesh("cpu", shape)
    for places in itertools.product([Shard(0), Shard(1), Shard(2), Replicate()], repeat=len(shape)):
        for t in (x, x[:1], x[:, :1]):  # (uneven shards; x[:1]: rank 1's rows empty)
            d = distribute_tensor(t, mesh, list(places))
            got = full_tensor(d)
            assert torch.equal(got, t) and got.is_contiguous(), (shape, places, t.shape)
            assert got.data_ptr() != d.to_local().data_ptr()  # (a copy, never the local shard)
            checked += 1
part = DTensor.from_local(x * (dist.get_rank() + 1), init_device_mesh("cpu", (2,)), [Partial()], run_check=False)
assert torch.equal(full_tensor(part), x * 3)
print(checked + 1)
dist.destroy_process_group()  # (left to interpreter exit, gloo's threads sometimes abort the process)
"""


def test_full_tensor_on_cpu_equals_the_whole_tensor(tmp_path):
    """``distributed.full_tensor`` gathers CPU DTensors with blocking collectives (DTensor's own
    all-gather corrupts gloo's heap now and then): every Shard/Replicate placement on 1-D and 2-D
    meshes, uneven and empty shards, and a Partial sum give back the whole tensor exactly."""
    script = tmp_path / "full_tensor.py"
    script.write_text(_FULL_TENSOR_SCRIPT)
    port = free_port()
    procs = [start_script([script], rank_env(r, 2, port), tmp_path, f"rank{r}") for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert out.split() == ["109"]


def test_parallel_mode_and_setup_without_a_launcher(monkeypatch):
    from apr_kernels.train import distributed as D

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    env = D.setup("cpu")
    assert not env.active and (env.rank, env.world_size) == (0, 1) and env.device == torch.device("cpu")
    assert D.resolve_mode(None, env) == "none"
    two = D.DistEnv(rank=1, world_size=2, backend="gloo")
    assert D.resolve_mode(None, two) == "ddp" and D.resolve_mode("fsdp", two) == "fsdp"
    with pytest.raises(ValueError, match="--parallel none with WORLD_SIZE=2"):
        D.resolve_mode("none", two)
    with pytest.raises(ValueError, match="--parallel 'zero3'; expected one of none, ddp, fsdp"):
        D.resolve_mode("zero3", two)
    with pytest.raises(ValueError, match="needs a process group"):
        D.parallelize(torch.nn.Linear(2, 2), "ddp", env)
    with pytest.raises(ValueError, match="--dist-timeout 0"):
        D.setup("cpu", timeout_s=0)


def test_trainer_takes_only_its_own_parallel_model_and_whole_shares():
    from apr_kernels.model import Transformer, preset
    from apr_kernels.train import TrainConfig, Trainer
    from apr_kernels.train.distributed import DistEnv, Parallel

    model = Transformer(preset("tiny_llama"), fast=False)
    two = DistEnv(rank=0, world_size=2, backend="gloo")
    tokens = torch.randint(0, 320, (400,))
    with pytest.raises(ValueError, match=r"--batch-size 3 is not a multiple of the world size 2"):
        Trainer(model, tokens, None, TrainConfig(batch_size=3, seq_len=16), parallel=Parallel(model, "ddp", two))
    other = Transformer(preset("tiny_llama"), fast=False)
    with pytest.raises(ValueError, match="parallel.module is not the model given"):
        Trainer(model, tokens, None, TrainConfig(batch_size=4, seq_len=16), parallel=Parallel(other, "ddp", two))


@pytest.mark.cuda
def test_fsdp_bf16_mixed_precision_on_one_gpu():
    """FSDP2 with MixedPrecisionPolicy (bf16 compute, fp32 reduce) in a 1-rank NCCL group trains like
    plain bf16-autocast training within bf16 tolerance; master weights stay fp32."""
    from apr_kernels.model import Transformer, preset
    from apr_kernels.train import TrainConfig, Trainer
    from apr_kernels.train import distributed as D

    # Qwen2-0.5B layer shapes (head_dim 64: the attention kernel's), 2 layers; the package kernels run
    mcfg = preset("qwen2_0_5b").replace(num_layers=2, vocab_size=320, head_dim=64)
    tokens = torch.randint(0, 320, (4000,))
    cfg = TrainConfig(steps=3, batch_size=4, seq_len=64, lr=3e-3, eval_tokens=256)
    torch.manual_seed(0)
    plain = Trainer(Transformer(mcfg).cuda(), tokens, tokens[:600], cfg, log=lambda *a: None)
    env = D.setup("cuda", timeout_s=120, need_group=True)
    try:
        torch.manual_seed(0)
        model = Transformer(mcfg).cuda()
        par = D.parallelize(model, "fsdp", env)
        sharded = Trainer(model, tokens, tokens[:600], cfg, parallel=par, log=lambda *a: None)
        for _ in range(3):
            a, b = plain.train_step(), sharded.train_step()
            assert b["loss"] == pytest.approx(a["loss"], rel=2e-2)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert sharded.evaluate()[0] == pytest.approx(plain.evaluate()[0], rel=2e-2)
    finally:
        D.teardown(env)


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))


def test_distillation_on_two_ranks_matches_one_process(runs):
    """train --teacher under FSDP (the student sharded, and the teacher: each rank its shards, each
    layer and the head gathered for its forward): losses, their ce and kl parts, gradient norms,
    held-out losses and the final model equal the one-process run's."""
    want = _records(runs["one_kd_out"])
    rank0, rank1 = runs["ranks"][(0, 2)]["run13"], runs["ranks"][(1, 2)]["run13"]
    assert rank0["code"] == rank1["code"] == 0 and rank1["stdout"] == ""
    got = _records(rank0["stdout"])
    _teacher_held(want, got, sharded=True)
    assert min(_losses(want, key="kl")) > 0
    for key in ("loss", "ce", "kl", "grad_norm"):
        assert _losses(got, key=key) == pytest.approx(_losses(want, key=key), rel=1e-5), key
    assert _losses(got, "eval", "eval_loss") == pytest.approx(_losses(want, "eval", "eval_loss"), abs=1e-5)
    (a, meta), (b, _) = (_tensors(runs["root"] / "fsdp_kd" / "model.apr"),
                         _tensors(runs["root"] / "one_kd" / "model.apr"))
    assert meta["training.config"]["teacher"] == str(runs["root"] / "teacher.apr")
    for name in b:
        if not name.startswith("__training__.rng"):  # (each process's own generator state)
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=5e-5, msg=name)


def test_on_policy_distillation_on_two_ranks_matches_one_process(runs):
    """grpo --teacher under FSDP (the teacher sharded too, scoring its rank's completions): the
    completions, rewards, teacher KL, losses, gradient norms and final model are the one-process run's."""
    want = _records(runs["one_grpo_opd_out"])
    rank0, rank1 = runs["ranks"][(0, 2)]["run14"], runs["ranks"][(1, 2)]["run14"]
    assert rank0["code"] == rank1["code"] == 0 and rank1["stdout"] == ""
    got = _records(rank0["stdout"])
    _teacher_held(want, got, sharded=True)
    assert min(_losses(want, key="teacher_kl")) != 0
    for key in ("reward", "completion_len", "teacher_kl", "loss", "grad_norm"):
        assert _losses(got, key=key) == pytest.approx(_losses(want, key=key), rel=1e-5, abs=1e-7), key
    (a, _), (b, _) = (_tensors(runs["root"] / "fsdp_grpo_opd" / "model.apr"),
                      _tensors(runs["root"] / "one_grpo_opd" / "model.apr"))
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=5e-5, msg=name)


def test_grpo_with_a_sharded_reward_model_on_two_ranks_matches_one_process(runs):
    """grpo --reward letters RM.apr under FSDP (run45): the reward model sharded like the policy (rank
    0 holds about half of it), each rank scoring its completions with it, and the one held-out prompt
    scored by rank 0 alone while rank 1 runs the same forwards for the gathers: the rewards (each
    function's too), losses, gradient norms and held-out rewards are the one-process run's."""
    want = _records(runs["one_grpo_rm_out"])
    rank0, rank1 = runs["ranks"][(0, 2)]["run45"], runs["ranks"][(1, 2)]["run45"]
    assert rank0["code"] == rank1["code"] == 0 and rank1["stdout"] == ""
    got = _records(rank0["stdout"])
    _teacher_held(want, got, sharded=True, name="reward_model")
    assert next(r for r in want if r["event"] == "start")["rewards"] == ["letters", "model"]
    assert len(set(_losses(want, key="reward_model"))) > 1  # (the model's scores, not a constant)
    for key in ("reward", "reward_letters", "reward_model", "completion_len", "loss", "grad_norm"):
        assert _losses(got, key=key) == pytest.approx(_losses(want, key=key), rel=1e-5, abs=1e-7), key
    for key in ("eval_reward", "eval_reward_model", "eval_prompts"):
        assert _losses(got, "eval", key) == pytest.approx(_losses(want, "eval", key), rel=1e-5), key
    assert _losses(want, "eval", "eval_prompts")[0] == 1


@pytest.mark.parametrize("run,out", [("run15", "ddp_muon"), ("run31", "fsdp_muon")], ids=["ddp", "fsdp"])
def test_muon_on_two_ranks_matches_one_process(runs, run, out):
    """train --optimizer muon under DDP, and under FSDP (each rank's rows of the momentum, the update
    gathered and orthogonalised whole): the losses, gradient norms and final weights (and Muon's
    momentum buffers, gathered) are the one-process run's, within what Muon's bf16 Newton-Schulz
    iteration makes of the gradient reduction's rounding (a few 1e-5 by the fourth step)."""
    want = _records(runs["one_muon_out"])
    rank0 = runs["ranks"][(0, 2)][run]
    assert rank0["code"] == 0
    got = _records(rank0["stdout"])
    for key in ("loss", "grad_norm"):
        assert _losses(got, key=key) == pytest.approx(_losses(want, key=key), rel=2e-4), key
    (a, _), (b, _) = (_tensors(runs["root"] / out / "model.apr"), _tensors(runs["root"] / "one_muon" / "model.apr"))
    assert sorted(a) == sorted(b)
    assert any(k.startswith("__training__.muon.momentum_buffer.") for k in b)
    for name in b:  # (relative to each tensor's norm: bf16 orthogonalisation amplifies rounding)
        if not name.startswith("__training__.rng"):
            err = ((a[name].double() - b[name].double()).norm() / b[name].double().norm().clamp_min(1e-12)).item()
            assert err < 3e-3, f"{name}: relative error {err:.2g}"


@pytest.mark.parametrize("run,out", [("run16", "ddp_reward"), ("run17", "fsdp_reward")], ids=["ddp", "fsdp-fast"])
def test_reward_model_on_two_ranks_matches_one_process(runs, run, out):
    """reward with micro-batches of 4 pairs (2 per rank) x 2, a new score head drawn from the seed on
    every rank (sharded under FSDP): losses, accuracies, margins, gradient norms, held-out values and
    the final reward model equal the one-process run's."""
    want = _records(runs["one_reward_out"])
    rank0, rank1 = runs["ranks"][(0, 2)][run], runs["ranks"][(1, 2)][run]
    assert rank0["code"] == rank1["code"] == 0 and rank1["stdout"] == ""
    got = _records(rank0["stdout"])
    for key in ("loss", "accuracy", "margin", "reward_chosen", "grad_norm"):
        assert _losses(got, key=key) == pytest.approx(_losses(want, key=key), rel=1e-5, abs=1e-6), key
    for key in ("eval_loss", "eval_accuracy", "eval_margin"):
        assert _losses(got, "eval", key) == pytest.approx(_losses(want, "eval", key), rel=1e-5, abs=1e-6), key
    (a, meta), (b, _) = (_tensors(runs["root"] / out / "model.apr"), _tensors(runs["root"] / "one_reward" / "model.apr"))
    assert meta["num_labels"] == 1 and "score.weight" in a and a.keys() == b.keys()
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=5e-5, msg=name)


@pytest.mark.parametrize("run", ["run18", "run19"], ids=["ddp", "fsdp"])
def test_gkd_on_two_ranks_matches_one_process(runs, run):
    """gkd with micro-batches of 4 records (2 per rank) x 2, the coin drawn alike on every rank, the
    student's and (--seq-kd) the teacher's samples decoded on each rank for its share (under FSDP
    each model sharded, gathered whole to sample): the losses, token counts, gradient norms and
    held-out values equal the one-process run's."""
    want = _records(runs["one_gkd_out"])
    rank0, rank1 = runs["ranks"][(0, 2)][run], runs["ranks"][(1, 2)][run]
    assert rank0["code"] == rank1["code"] == 0 and rank1["stdout"] == ""
    got = _records(rank0["stdout"])
    _teacher_held(want, got, sharded=run == "run19")
    for key in ("loss", "ce", "tokens", "on_policy", "teacher_sampled", "grad_norm"):
        assert _losses(got, key=key) == pytest.approx(_losses(want, key=key), rel=1e-5, abs=1e-6), key
    for key in ("eval_loss", "eval_ce"):
        assert _losses(got, "eval", key) == pytest.approx(_losses(want, "eval", key), rel=1e-5, abs=1e-6), key
    on, by_teacher = _losses(want, key="on_policy"), _losses(want, key="teacher_sampled")
    assert 0 < sum(on) < len(on) and [a + b for a, b in zip(on, by_teacher)] == [1] * len(on)  # both samplers


@pytest.mark.parametrize("run", ["run20", "run21"], ids=["ddp", "fsdp"])
def test_online_dpo_on_two_ranks_matches_one_process(runs, run):
    """online-dpo with 4 prompts per step (2 per rank), pairs in micro-batches of one: each rank samples,
    ranks and trains on its share against the frozen copy (sharded under FSDP); the losses, rewards,
    implicit rewards and gradient norms equal the one-process run's."""
    want = _records(runs["one_online_out"])
    rank0, rank1 = runs["ranks"][(0, 2)][run], runs["ranks"][(1, 2)][run]
    assert rank0["code"] == rank1["code"] == 0 and rank1["stdout"] == ""
    got = _records(rank0["stdout"])
    for key in ("loss", "reward", "score_chosen", "margin", "completion_len", "grad_norm"):
        assert _losses(got, key=key) == pytest.approx(_losses(want, key=key), rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("run", ["run22", "run23"], ids=["ddp", "fsdp"])
def test_rloo_on_two_ranks_matches_one_process(runs, run):
    """rloo with 4 prompts per step (2 per rank): each rank samples and scores its share, the KL to the
    frozen copy (sharded under FSDP) in the reward, the advantages normalised with sums over both
    ranks, two updates per generation batch; losses, rewards, KL, clipping and gradient norms equal the
    one-process run's."""
    want = _records(runs["one_rloo_out"])
    rank0, rank1 = runs["ranks"][(0, 2)][run], runs["ranks"][(1, 2)][run]
    assert rank0["code"] == rank1["code"] == 0 and rank1["stdout"] == ""
    got = _records(rank0["stdout"])
    assert _losses(want, key="kl")[0] == pytest.approx(0.0, abs=1e-6) and _losses(want, key="kl")[-1] > 0
    for key in ("loss", "reward", "kl", "clip_ratio", "completion_len", "grad_norm"):
        assert _losses(got, key=key) == pytest.approx(_losses(want, key=key), rel=1e-5, abs=1e-6), key


def test_freeze_under_fsdp_matches_one_process(runs):
    """train --freeze under FSDP (run24): the frozen shards get no gradient and no optimizer state; the
    losses equal the one-process run's, the frozen tensors come out as they went in, the rest as the
    one-process run's."""
    want = _records(runs["one_freeze_out"])
    run = runs["ranks"][(0, 2)]["run24"]
    assert run["code"] == runs["ranks"][(1, 2)]["run24"]["code"] == 0
    assert _losses(_records(run["stdout"])) == pytest.approx(_losses(want), rel=1e-5)
    (got, _), (ref, _), (init, _) = (_tensors(runs["root"] / "fsdp_freeze" / "model.apr"),
                                     _tensors(runs["root"] / "one_freeze" / "model.apr"),
                                     _tensors(runs["root"] / "init.apr"))
    for name in ref:
        if name.startswith(("model.embed_tokens.", "model.layers.0.", "lm_head")) and name in init:
            assert torch.equal(got[name], init[name]) and torch.equal(ref[name], init[name]), name
        else:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=5e-5, msg=name)



@pytest.mark.parametrize("run,out", [("run25", "ddp_moe"), ("run26", "fsdp_moe")], ids=["ddp", "fsdp"])
def test_mixture_of_experts_on_two_ranks_matches_one_process(runs, run, out):
    """A Qwen2-MoE model under DDP and FSDP (run25/26; FSDP on the fast path, whose experts run as
    grouped GEMMs): the load-balancing loss counts expert choices over both ranks' tokens, so the losses
    (load-balancing term and logged aux loss included), the logged expert load and the weights equal the
    one-process eager run's, every expert's gradient synchronised."""
    want = _records(runs["one_moe_out"])
    got = runs["ranks"][(0, 2)][run]
    assert got["code"] == runs["ranks"][(1, 2)][run]["code"] == 0
    recs = _records(got["stdout"])
    assert _losses(recs) == pytest.approx(_losses(want), rel=1e-5)
    assert _losses(recs, "eval", "eval_loss") == pytest.approx(_losses(want, "eval", "eval_loss"), rel=1e-5)
    assert _losses(recs, key="aux_loss") == pytest.approx(_losses(want, key="aux_loss"), rel=1e-5)
    assert all(a > 1.0 for a in _losses(recs, key="aux_loss"))
    # the balance measure of the global micro-batch (the choices counted over both ranks)
    assert _losses(recs, key="expert_load") == pytest.approx(_losses(want, key="expert_load"), rel=1e-5)
    (mine, meta), (ref, _) = _tensors(runs["root"] / out / "model.apr"), _tensors(runs["root"] / "one_moe" / "model.apr")
    assert meta["architecture"] == "qwen2_moe" and meta["num_experts"] == 5
    assert "model.layers.0.mlp.experts.4.down_proj.weight" in mine
    for name in ref:
        if not name.startswith("__training__.rng"):  # (weights and AdamW moments: not each rank's RNG)
            torch.testing.assert_close(mine[name], ref[name], rtol=1e-4, atol=5e-5, msg=name)


@pytest.mark.parametrize("run", ["run41", "run42", "run43"], ids=["ddp", "fsdp-fast-checkpointed", "document-mask"])
def test_context_parallel_matches_one_process(runs, run):
    """Each of the 2 ranks holds 2 of the 4 chunks of every row (the same rows on both): the losses,
    gradient norms and held-out losses of one process holding whole rows, and its final weights."""
    one = "one_docs" if run == "run43" else "one"
    ref = _records(runs[one + "_out"])
    rank0 = runs["ranks"][(0, 2)][run]
    assert rank0["code"] == runs["ranks"][(1, 2)][run]["code"] == 0
    got = _records(rank0["stdout"])
    assert _losses(got) == pytest.approx(_losses(ref), rel=1e-5)
    assert _losses(got, "train", "grad_norm") == pytest.approx(_losses(ref, "train", "grad_norm"), rel=1e-4)
    assert _losses(got, "eval", "eval_loss") == pytest.approx(_losses(ref, "eval", "eval_loss"), abs=1e-5)
    assert _losses(got, "eval", "eval_tokens") == _losses(ref, "eval", "eval_tokens")
    out = {"run41": "ddp_cp", "run42": "fsdp_cp", "run43": "ddp_cp_docs"}[run]
    (a, _), (b, _) = _tensors(runs["root"] / out / "model.apr"), _tensors(runs["root"] / one / "model.apr")
    for name in b:
        if b[name].is_floating_point() and not name.startswith("__training__"):
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=5e-5, msg=name)


def test_adamw8bit_under_ddp_matches_one_process(runs):
    """--optimizer adamw8bit on two DDP ranks (run27): the losses and weights of one process."""
    got = runs["ranks"][(0, 2)]["run27"]
    assert got["code"] == runs["ranks"][(1, 2)]["run27"]["code"] == 0
    assert _losses(_records(got["stdout"])) == pytest.approx(_losses(_records(runs["one_adam8_out"])), rel=1e-5)
    (mine, _), (ref, _) = _tensors(runs["root"] / "ddp_adam8" / "model.apr"), _tensors(runs["root"] / "one_adam8" / "model.apr")
    for name in ref:
        if not name.startswith("__training__"):
            torch.testing.assert_close(mine[name], ref[name], rtol=1e-4, atol=5e-5, msg=name)


def test_adamw8bit_under_fsdp_matches_one_process_and_resumes_exactly(runs):
    """--optimizer adamw8bit under FSDP (run28): each rank keeps 8-bit moments of its rows, whose blocks
    are the whole tensor's, so the losses, weights and the gathered checkpoint's codes and scales are
    one process's; resumed from step 2 (run29) it continues exactly, and in one process as one process
    would (the same checkpoint format). Shards that do not start on
    block boundaries (the odd config, run30) keep fp32 moments: AdamW's own numbers, no 8-bit state."""
    r0, r1 = runs["ranks"][(0, 2)], runs["ranks"][(1, 2)]
    assert r0["run28"]["code"] == r1["run28"]["code"] == r0["run29"]["code"] == r0["run30"]["code"] == 0
    got, want = _records(r0["run28"]["stdout"]), _records(runs["one_adam8_aligned_out"])
    assert _losses(got) == pytest.approx(_losses(want), rel=1e-5)
    root = runs["root"]
    (mine, _), (ref, _) = _tensors(root / "fsdp_adam8" / "model.apr"), _tensors(root / "one_adam8_aligned" / "model.apr")
    assert sorted(mine) == sorted(ref)
    codes = [n for n in ref if n.startswith("__training__.adam8.") and ".codes." in n]
    assert "__training__.adam8.exp_avg.codes.model.embed_tokens.weight" in codes and len(codes) == 2 * (1 + 2 * 5)
    for name in ref:
        if name in codes:  # (a value on a rounding boundary may take the neighbouring code)
            assert (mine[name] == ref[name]).float().mean() > 0.999, name
        elif not name.startswith("__training__.rng"):
            torch.testing.assert_close(mine[name], ref[name], rtol=1e-4, atol=5e-5, msg=name)
    resumed = _records(r0["run29"]["stdout"])
    assert _losses(resumed) == pytest.approx(_losses(got)[2:], rel=1e-6)
    (again, _) = _tensors(root / "fsdp_adam8_resumed" / "model.apr")
    for name in ref:
        if not name.startswith("__training__.rng"):
            torch.testing.assert_close(again[name], mine[name], rtol=1e-6, atol=1e-7, msg=name)
    # the gathered 8-bit moments are one process's format: that checkpoint resumes in one process too
    from apr_kernels.cli import main

    code, out = _cli(main, ["train", "--resume", str(root / "fsdp_adam8" / "step_000002.apr"), "--out",
                            str(root / "one_adam8_from_fsdp"), "--json", "--no-progress", "--fast", "off"])
    assert code == 0 and _losses(_records(out)) == pytest.approx(_losses(got)[2:], rel=1e-5)
    odd = _records(r0["run30"]["stdout"])
    assert _losses(odd) == pytest.approx(_losses(_records(runs["one_out"])), rel=1e-4)
    (odd_state, _) = _tensors(root / "fsdp_adam8_odd" / "model.apr")
    assert not any(n.startswith("__training__.adam8.") for n in odd_state)
    assert "__training__.adam.exp_avg.model.embed_tokens.weight" in odd_state


def test_muon_under_fsdp_resumes_exactly(runs):
    """The FSDP Muon run resumed from its step-2 checkpoint (run32: momentum rows restored from the
    gathered buffers) continues with the uninterrupted run's losses and weights."""
    r0 = runs["ranks"][(0, 2)]
    assert r0["run31"]["code"] == r0["run32"]["code"] == 0
    assert _losses(_records(r0["run32"]["stdout"])) == pytest.approx(_losses(_records(r0["run31"]["stdout"]))[2:],
                                                                      rel=1e-6)
    (a, _), (b, _) = (_tensors(runs["root"] / "fsdp_muon_resumed" / "model.apr"),
                      _tensors(runs["root"] / "fsdp_muon" / "model.apr"))
    for name in b:
        if not name.startswith("__training__.rng"):
            torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)


def _matches_one_process_and_resumes(runs, run: str, resumed: str, one: str) -> None:
    """Rank 0's losses of ``run`` equal the one-process run ``one``'s, and ``resumed`` (from its step-2
    checkpoint) continues with the uninterrupted steps 3 and 4."""
    r0 = runs["ranks"][(0, 2)]
    assert r0[run]["code"] == r0[resumed]["code"] == 0
    got = _records(r0[run]["stdout"])
    assert _losses(got) == pytest.approx(_losses(_records(runs[one])), rel=1e-5)
    assert _losses(_records(r0[resumed]["stdout"])) == pytest.approx(_losses(got)[2:], rel=1e-6)


def test_dora_under_fsdp_matches_one_process_and_resumes(runs):
    """--lora-dora under FSDP (run33): the magnitudes start from each rank's own weight rows (row shards
    hold whole rows), so losses, the step checkpoint's adapters and moments, and the final merged model
    equal one process's; resumed from step 2 (run34) it continues with the same losses."""
    _matches_one_process_and_resumes(runs, "run33", "run34", "one_dora_out")
    root = runs["root"]
    for ckpt in ("step_000002.apr", "model.apr"):  # (model.apr: the adapters merged, magnitudes included)
        (a, _), (b, _) = _tensors(root / "fsdp_dora" / ckpt), _tensors(root / "one_dora" / ckpt)
        assert sorted(a) == sorted(b)
        assert (ckpt == "model.apr") != any(k.endswith(".lora_magnitude") for k in b), ckpt
        for name in b:
            if not name.startswith("__training__.rng"):
                torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=5e-5, msg=f"{ckpt}: {name}")


def test_quantised_lora_base_under_fsdp_matches_one_process_and_resumes(runs):
    """--lora-quantized-base under FSDP (run35): each rank keeps its blocks of every quantised base
    (gathered per GEMM) and FSDP shards the rest; the losses, the step checkpoint (the base's blocks,
    gathered, byte for byte, adapters, moments) and the final merged model equal one process's;
    resumed (run36)."""
    import apr_kernels

    _matches_one_process_and_resumes(runs, "run35", "run36", "one_qlora_out")
    root = runs["root"]
    for ckpt in ("step_000002.apr", "model.apr"):
        with apr_kernels.open(root / "fsdp_qlora" / ckpt) as a, apr_kernels.open(root / "one_qlora" / ckpt) as b:
            assert sorted(a.keys()) == sorted(b.keys())
            blocks = [k for k in b.keys() if b.info(k).dtype == "APR_Q8"]
            assert bool(blocks) == (ckpt == "step_000002.apr"), ckpt  # (the merged model: fp32)
            for name in b.keys():
                if name in blocks:
                    assert torch.equal(a.get_raw(name), b.get_raw(name)), name
                elif not name.startswith("__training__.rng"):
                    torch.testing.assert_close(a.get_tensor(name), b.get_tensor(name), rtol=1e-4, atol=5e-5,
                                               msg=f"{ckpt}: {name}")


def test_fp16_loss_scaling_under_fsdp_matches_ddp_and_resumes(runs):
    """--precision fp16 under FSDP (run38, torch's ShardedGradScaler: an overflow on any rank's shard
    skips every rank's step) takes DDP's steps (run37: the same per-rank loss scaling, the same
    skipped steps and scale), and resumes exactly with its scale (run39)."""
    r0 = runs["ranks"][(0, 2)]
    assert r0["run37"]["code"] == r0["run38"]["code"] == r0["run39"]["code"] == 0
    ddp, fsdp = _records(r0["run37"]["stdout"]), _records(r0["run38"]["stdout"])
    assert _losses(fsdp) == pytest.approx(_losses(ddp), rel=1e-5)
    norms = [(n, m) for n, m in zip(_losses(ddp, key="grad_norm"), _losses(fsdp, key="grad_norm"))]
    assert all((n == m == math.inf) or m == pytest.approx(n, rel=1e-4) for n, m in norms), norms
    assert _losses(_records(r0["run39"]["stdout"])) == pytest.approx(_losses(fsdp)[2:], rel=1e-6)


def test_lora_checkpoint_as_init_is_merged_row_by_row_under_fsdp(runs):
    """--init of a DoRA step checkpoint under FSDP (run40): each rank folds the adapters into its own
    rows of every weight (A whole, its rows of B and of the magnitudes), so the run takes one process's
    losses from the merged model."""
    got = runs["ranks"][(0, 2)]["run40"]
    assert got["code"] == 0
    assert _losses(_records(got["stdout"])) == pytest.approx(_losses(_records(runs["one_dora_init_out"])), rel=1e-5)


def _same_record(got: dict, want: dict, name: str, abs: float = 0.0) -> None:
    """A command's JSON result line against one process's: the same keys, numbers within 1e-6 (and
    ``abs``: a difference of two scores, such as a margin, whose terms were summed in another order),
    the rest equal."""
    assert got.keys() == want.keys(), name
    for k, v in want.items():
        assert got[k] == (pytest.approx(v, rel=1e-6, abs=abs) if isinstance(v, float) else v), (name, k)


def test_tensor_parallel_groups_share_the_batches_as_ranks_do(monkeypatch):
    """``rank_share`` on 4 ranks split into 2 tensor-parallel groups (``--tensor-parallel 2``): each
    group is one worker, both its ranks taking the same batches (5 batches: ranks 0 and 1 batches 0,
    2, 4, ranks 2 and 3 batches 1, 3, three rounds); only each group's first rank's results count:
    rank 0 gathers those in batch order, every rank gets every batch's result once, and a sum counts
    each group once. (The collectives stood in for by the four ranks' calls, as gloo would join them;
    test_generate_and_eval_shared_among_ranks_match_one_process runs them on 2 ranks.)"""
    import torch.distributed as dist

    from apr_kernels.train import rank_share
    from apr_kernels.train.distributed import DistEnv
    from apr_kernels.train.tensor_parallel import TensorParallel

    envs = [DistEnv(rank=r, world_size=4, model_split=TensorParallel(None, r % 2, 2)) for r in range(4)]
    starts = [rank_share.rank_batches(5, 1, env) for env in envs]
    assert starts == [(range(0, 5, 2), 3)] * 2 + [(range(1, 5, 2), 3)] * 2
    made = [[f"batch{b} by rank{r}" for b in s] for r, (s, _) in enumerate(starts)]
    sent = {}

    def gather_object(obj, every, dst=0):  # (rank 0's call last: the others' already sent)
        sent[current] = obj
        if every is not None:
            every[:] = [sent[r] for r in range(4)]

    monkeypatch.setattr(dist, "gather_object", gather_object)
    monkeypatch.setattr(dist, "all_gather_object", lambda every, obj: gather_object(obj, every))
    for current in (3, 2, 1, 0):
        got = rank_share.gathered(envs[current], made[current])
    assert got == ["batch0 by rank0", "batch2 by rank0", "batch4 by rank0", "batch1 by rank2", "batch3 by rank2"]
    for current in (3, 2, 1, 0):
        got = rank_share.every_batch(envs[current], made[current])
    assert got == ["batch0 by rank0", "batch1 by rank2", "batch2 by rank0", "batch3 by rank2", "batch4 by rank0"]
    values = {}
    monkeypatch.setattr(dist, "all_reduce", lambda t: values.setdefault(current, t.clone()))
    for current in range(4):
        rank_share.summed(envs[current], torch.tensor([1.0 + current], dtype=torch.float64))
    assert [float(v) for v in values.values()] == [1.0, 0.0, 3.0, 0.0]  # (ranks 1 and 3 add nothing)


def test_generate_and_eval_shared_among_ranks_match_one_process(tmp_path, monkeypatch):
    """``generate --prompts`` and ``eval --prompts`` under torchrun (2 ranks): each rank samples and
    scores its share of the batches (5 prompts in batches of 2: rank 0 the first and last, rank 1
    the second), a reward function and a reward model held whole on each; rank 0 writes every line
    in one process's order (the same lines, byte for byte: each prompt's generator is seeded by its
    place in the file; the reward model's scores within float32 rounding, the ranks' threads summing in
    another order) and prints the sums of both ranks' rewards and pass@k. And ``eval --data``,
    ``--choices`` and ``--pairs`` alike: each rank its share of the batches, rank 0 the totals; and
    each of those three with ``--parallel fsdp``, the model sharded over the ranks; and every one
    of them with ``--tensor-parallel 2``, the model (and the reward model) split over the ranks,
    which run the same batches, rank 0 alone handing on their results; and so split, ``generate
    --prompt`` and ``chat`` (rank 0 reading the lines, handing each on), rank 0 printing one
    process's sampled answers."""
    import io

    from apr_kernels.model import Transformer, pad_vocab, preset
    from apr_kernels.tokenizer import Tokenizer
    from apr_kernels.train.checkpoint import save_checkpoint
    from apr_kernels.train.cli import byte_tokenizer
    from rank_runs import against_one_process

    torch.manual_seed(9)
    save_checkpoint(tmp_path / "init.apr", model=Transformer(preset("tiny_llama"), fast=False))
    save_checkpoint(tmp_path / "rm.apr", model=Transformer(preset("tiny_llama").replace(num_labels=1), fast=False),
                    tokenizer=byte_tokenizer())
    args = _sampling_args(tmp_path, tmp_path / "init.apr")["grpo"]  # (its prompts and reward function)
    prompts, letters = args[args.index("--data") + 1], args[args.index("--reward") + 1]
    common = ["--init", str(tmp_path / "init.apr"), "--tokenizer", "bytes", "--prompts", prompts, "--reward", letters,
              str(tmp_path / "rm.apr"), "--reward-weights", "1", "0.5", "--batch-size", "2", "--max-new-tokens", "6",
              "--temperature", "1.0", "--seed", "3"]
    runs = {"generate": ["generate", *common, "--num-return-sequences", "2"],
            "pairs": ["generate", *common, "--num-return-sequences", "3", "--keep", "pairs"],
            "eval": ["eval", *common, "--num-samples", "3", "--pass-k", "1", "2", "--pass-threshold", "0.5", "--json"]}
    (tmp_path / "choices.jsonl").write_text("".join(
        json.dumps({"context": f"{t} is", "choices": [" hot", " cold", " warm"], "answer": i % 3}) + "\n"
        for i, t in enumerate(("fire", "ice", "tea", "snow", "lava", "soup", "rain"))))
    (tmp_path / "pairs.jsonl").write_text("".join(
        json.dumps({"prompt": f"Is {t} hot? A:", "chosen": " yes", "rejected": " no" * (1 + i % 2)}) + "\n"
        for i, t in enumerate(("fire", "lava", "the sun", "a stove", "an oven"))))
    model = ["eval", "--init", str(tmp_path / "init.apr"), "--tokenizer", "bytes", "--json"]
    runs.update({"data": [*model, "--data", HELD, "--seq-len", "32", "--max-tokens", "2000", "--batch-size", "5"],
                 "choices": [*model, "--choices", str(tmp_path / "choices.jsonl"), "--batch-size", "5"],
                 "rm_pairs": ["eval", "--init", str(tmp_path / "rm.apr"), "--json", "--pairs", str(tmp_path / "pairs.jsonl"),
                              "--batch-size", "2"]})
    # and the models sharded over the ranks (FSDP): the data's sequences in contiguous shares; the
    # choices (5 batches) and pairs (3 batches) as above, rank 1 running a padding forward last (the
    # sharded layers' gathers are collectives)
    sharded = {f"{name}_fsdp": runs[name] for name in ("data", "choices", "rm_pairs")}
    # and every one of them with the model split over the 2 ranks (--tensor-parallel 2: one copy, each
    # rank its heads and MLP rows; the reward model split alike), the two running the same batches
    split = {f"{name}_tp": runs[name] for name in runs}
    # and one prompt, and a conversation (rank 0 reading the lines, handing each to rank 1), on the
    # model split over both ranks, sampled: each rank draws the same tokens from the same generator
    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)},
                               {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}, eos_id=256)
    save_checkpoint(tmp_path / "chat.apr", tokenizer=tok,
                    model=Transformer(preset("tiny_llama").replace(vocab_size=pad_vocab(259)), fast=False))
    sampled = ["--init", str(tmp_path / "chat.apr"), "--temperature", "1.0", "--max-new-tokens", "12", "--seed", "4",
               "--json"]
    lines = "hi\nand then?\n/reset\nhi\n\nignored\n"
    alone = {"prompt": ["generate", *sampled, "--prompt", "Once"], "chat": ["chat", *sampled]}
    split.update({f"{name}_tp": argv for name, argv in alone.items()})
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))  # (the one-process chat's)
    one, out = against_one_process(
        {**{name: (argv, 2) for name, argv in runs.items()},
         **{name: ([*argv, "--parallel", "fsdp"], 2) for name, argv in sharded.items()},
         **{name: ([*argv, "--tensor-parallel", "2"], 2) for name, argv in split.items() if name != "chat_tp"},
         "chat_tp": ({"argv": [*alone["chat"], "--tensor-parallel", "2"], "stdin": lines}, 2)},
        {**runs, **sharded, **alone}, tmp_path / "ranks")
    one.update({name: one[name.removesuffix("_tp")] for name in split})
    for name in ("prompt", "chat"):  # (rank 0 prints each answer once; the texts sampled, one process's)
        assert out[f"{name}_tp"] == one[name] and one[name].count("\n") == (3 if name == "chat" else 1), name

    def same(got: str, want: str) -> list[dict]:
        (a, b) = ([json.loads(line) for line in text.splitlines()] for text in (got, want))
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):  # (a line's "rewards": each function's score)
            x, y = ({**{k: v for k, v in line.items() if k != "rewards"},
                     **{f"rewards.{k}": v for k, v in line.get("rewards", {}).items()}} for line in (x, y))
            scores = [k for k in y if "reward" in k]
            assert {k: v for k, v in x.items() if k not in scores} == {k: v for k, v in y.items() if k not in scores}
            assert {k: x[k] for k in scores} == pytest.approx({k: y[k] for k in scores}, rel=1e-5, abs=1e-6)
        return a

    for tp in ("", "_tp"):
        lines = same(out["generate" + tp], one["generate"])
        assert [(line["prompt"], line["sample"]) for line in lines] == \
            [(p, s) for p in ("Write:", "Say:", "Go:", "Now:", "Then:") for s in range(2)]
        assert len({line["completion"] for line in lines}) > 5  # (sampled: the completions differ)
        assert len(same(out["pairs" + tp], one["pairs"])) >= 3
        got, want = (json.loads(text.splitlines()[-1]) for text in (out["eval" + tp], one["eval"]))
        assert got["prompts"] == 5 and got["samples"] == 3
        _same_record(got, want, "eval" + tp)
    err = (tmp_path / "ranks" / "world2" / "rank0.err").read_text()
    notes = re.findall(r"sharded over 2 ranks \(FSDP\): rank 0 holds (\d+) of (\d+) parameters", err)
    assert len(notes) == 3 and all(abs(int(a) - int(b) / 2) < int(b) / 10 for a, b in notes)  # (its shards)
    # (split: every layer's projections halved, the embedding, head and norms whole on each rank)
    notes = re.findall(r"(generate|eval|chat): \S+/(\w+).apr split over 2 tensor-parallel ranks \(1 copy\): rank "
                       r"0 holds (\d+) of (\d+) parameters", err)
    assert [n[:2] for n in notes] == [*[("generate", "init")] * 2, *[("eval", "init")] * 3, ("eval", "rm"),
                                      ("generate", "chat"), ("chat", "chat")]
    assert all(int(b) / 2 < int(a) < int(b) * 0.9 for _, _, a, b in notes), notes
    counts = {"data": ("tokens", 62 * 32), "choices": ("questions", 7), "rm_pairs": ("pairs", 5)}
    counts.update({f"{name}{suffix}": counts[name] for name in list(counts) for suffix in ("_fsdp", "_tp")})
    for name, (key, n) in counts.items():
        (got,), (want,) = ([json.loads(line) for line in text.splitlines()] for text in (out[name], one[name]))
        assert got[key] == want[key] == n, name
        # (a reward model's scores about 1e-8 apart: split, summed over the group in another order; shared,
        # each rank's pairs batched otherwise, which changes the GEMMs' blocking on some CPUs; a margin
        # of them, near 0, is off by more than 1e-6 of itself)
        _same_record(got, want, name, abs=1e-7)
