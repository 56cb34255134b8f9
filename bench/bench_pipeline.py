"""Pipeline schedules side by side: one model split over N stages (N processes under torchrun: gloo
on CPU, NCCL on N GPUs), the same training steps in each schedule, as ``apr-kernels train
--pipeline-parallel N --pipeline-schedule S`` runs them.

Providers (``provider``): ``gpipe``, ``1f1b`` (the default, the baseline), ``interleaved`` (2 model
chunks a stage), ``zero-bubble`` (ZB-H1: each backward split into the input's and the weights'
halves, ``train/split_backward.py``) and ``zero-bubble-c2`` (its interleaved form, 2 chunks);
``1f1b+checkpoint`` and ``zero-bubble+checkpoint`` add ``--grad-checkpointing`` (under zero-bubble
each half recomputes a layer once, so twice a micro-batch). Row:
op pipeline_step, shape (stages, micro-batches, layers, hidden, seq), provider, ms (a launch's median
step after the first, the best of ``--rounds`` launches run in turn), tokens_per_s, vs_1f1b (1F1B's step time over this one's: above 1 faster), and
model_idle (the schedule's idle share on a model with forward, input and weight halves of equal
cost, ``test_pipeline_parallel._run_schedules``' arithmetic: what the schedule alone would save).

On CPU each stage gets ``cpus / N`` threads, so the step time is compute plus the idle time the
schedule leaves; on a machine with CUDA but fewer GPUs than stages it writes no rows (NCCL wants a
GPU per rank). The model: a Qwen2
shape (GQA, q/k/v bias, tied embeddings) of ``--layers`` layers of width ``--hidden``, random weights,
trained on real text (CPython's standard library, byte tokens). --smoke: the zero-bubble schedule
alone, a tiny model, two steps (the plumbing, not the numbers).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

# provider: (schedule, chunks, extra train options)
PROVIDERS = {"gpipe": ("gpipe", 1, []), "1f1b": ("1f1b", 1, []), "interleaved": ("interleaved", 2, []),
             "zero-bubble": ("zero-bubble", 1, []), "zero-bubble-c2": ("zero-bubble", 2, []),
             "1f1b+checkpoint": ("1f1b", 1, ["--grad-checkpointing"]),
             "zero-bubble+checkpoint": ("zero-bubble", 1, ["--grad-checkpointing"])}


def model_idle(schedule: str, size: int, micro: int, chunks: int) -> float:
    """The schedule's idle share with unit-cost ops (a forward F, and a backward B + W, or B of cost 2
    where it is not split), every stage running its list in order, blocking on what it needs."""
    from apr_kernels.train.pipeline_parallel import schedule as ops_of

    parts, split = size * chunks, schedule == "zero-bubble"
    lists = [ops_of(schedule, size, s, micro, chunks) for s in range(size)]
    done, clock, pos = {}, [0.0] * size, [0] * size
    while any(pos[s] < len(lists[s]) for s in range(size)):
        moved = False
        for s in range(size):
            if pos[s] == len(lists[s]):
                continue
            op, chunk, m = lists[s][pos[s]]
            k = chunk * size + s
            need = {"F": ("F", k - 1, m) if k > 0 else None, "B": ("B", k + 1, m) if k < parts - 1 else ("F", k, m),
                    "W": ("B", k, m)}[op]
            if need is not None and need not in done:
                continue
            start = max(clock[s], done.get(need, 0.0))
            clock[s] = start + (1.0 if op != "B" or split else 2.0)
            done[op, k, m] = clock[s]
            pos[s] += 1
            moved = True
        if not moved:
            raise RuntimeError(f"{schedule}: the model of the schedule deadlocks")
    busy = micro * chunks * 3.0  # (per stage: F, B and W of each of its parts' micro-batches)
    return 1.0 - busy / max(clock)


def make_init(path: Path, layers: int, hidden: int) -> None:
    from apr_kernels.model import Transformer, preset
    from apr_kernels.train.checkpoint import save_checkpoint

    heads = max(2, hidden // 64)
    cfg = preset("tiny_qwen2").replace(num_layers=layers, hidden_size=hidden, num_heads=heads,
                                       num_kv_heads=max(1, heads // 4), head_dim=hidden // heads,
                                       intermediate_size=hidden * 11 // 4 // 16 * 16, vocab_size=512)
    torch.manual_seed(0)
    save_checkpoint(path, model=Transformer(cfg, fast=False))


def run(provider: str, init: Path, data: str, out: Path, args, cpu: bool) -> list[float]:
    schedule, chunks, extra = PROVIDERS[provider]
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.stages}",
            "-m", "apr_kernels", "train", "--init", str(init), "--tokenizer", "bytes", "--data", data,
            "--max-tokens", str(args.seq * args.micro * (args.steps + 2) * 2), "--seq-len", str(args.seq),
            "--batch-size", "1", "--grad-accum", str(args.micro), "--steps", str(args.steps), "--lr", "1e-4",
            "--eval-every", "0", "--eval-tokens", str(args.seq), "--save-every", "0", "--log-every", "1",
            "--pipeline-parallel", str(args.stages),
            "--pipeline-schedule", schedule, *(["--pipeline-chunks", str(chunks)] if chunks > 1 else []),
            "--json", "--no-progress", "--out", str(out / provider), *extra]
    env = dict(os.environ)
    if cpu:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.stages))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{provider}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    recs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return [r["tok_s"] for r in recs if r.get("event") == "train"]


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--stages", type=int, default=2), p.add_argument("--micro", type=int, default=8),
        p.add_argument("--layers", type=int, default=8), p.add_argument("--hidden", type=int, default=512),
        p.add_argument("--seq", type=int, default=256), p.add_argument("--steps", type=int, default=6),
        p.add_argument("--rounds", type=int, default=3, help="each provider's launch repeated, in turn"),
        p.add_argument("--timeout", type=float, default=900),
        p.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=list(PROVIDERS))))
    cpu = not torch.cuda.is_available()
    if not cpu and torch.cuda.device_count() < args.stages and not args.smoke:  # (the one-GPU device check)
        reason = (f"skipped: {args.stages} stages need {args.stages} GPUs (NCCL: one a rank), this machine has "
                  f"{torch.cuda.device_count()}; CUDA_VISIBLE_DEVICES= runs it on the CPU")
        _common.write_results("pipeline", [], args.out, {"skipped": reason})
        print(reason)
        return
    if args.smoke:
        args.micro, args.layers, args.hidden, args.seq, args.steps, args.rounds = 4, 4, 64, 32, 2, 1
        args.providers = ["zero-bubble"]  # (one launch: CI's time)
    elif args.quick:
        args.steps, args.rounds = 4, 1
    data = str(Path(sysconfig.get_paths()["stdlib"]) / "json")  # (real text: a package of the stdlib)
    shape = f"N={args.stages} M={args.micro} L={args.layers} h={args.hidden} T={args.seq}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        init = Path(tmp) / "init.apr"
        make_init(init, args.layers, args.hidden)
        best: dict[str, float] = {}
        for _ in range(args.rounds):  # (in turn, so a slow spell of the machine hits every provider alike)
            for provider in args.providers:
                rates = run(provider, init, data, Path(tmp), args, cpu)
                tok_s = statistics.median(rates[1:] if len(rates) > 1 else rates)  # (the first step warms up)
                best[provider] = max(best.get(provider, 0.0), tok_s)
        for provider in args.providers:
            schedule, chunks, _ = PROVIDERS[provider]
            rows.append({"op": "pipeline_step", "shape": shape, "provider": provider,
                         "ms": 1e3 * args.micro * args.seq / best[provider], "tokens_per_s": best[provider],
                         "model_idle": round(model_idle(schedule, args.stages, args.micro, chunks), 4)})
    base = next((r["ms"] for r in rows if r["provider"] == "1f1b"), None)
    for r in rows:
        r["vs_1f1b"] = base / r["ms"] if base else None
    path = _common.write_results("pipeline", rows, args.out, {"ours": ["zero-bubble"], "stages": args.stages,
                                                              "transport": "gloo (CPU)" if cpu else "nccl"})
    _common.print_table(rows, ["shape", "provider", "ms", "tokens_per_s", "vs_1f1b", "model_idle"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
