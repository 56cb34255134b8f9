"""Output projection + cross entropy (the LM loss), forward+backward: time and peak memory.

    python3 bench/bench_cross_entropy.py [--smoke | --quick] [--out DIR]

The last step of every causal-LM training step: ``loss = CE(hidden @ W.T, targets)`` and its
gradients for hidden and W, at the vocabularies where it hurts: Qwen2 (H 896, V 151,936) and
Llama-3 (H 4096, V 128,256), N = 4096 / 8192 / 16384 tokens, bf16 hidden and weight. Providers, in one
run on one device:

  apr       apr_kernels.linear_cross_entropy (chunked GEMMs + the Triton row kernel; logits never whole)
  eager     F.cross_entropy(F.linear(h, W).float(), t), what Hugging Face's loss computes
  compile   torch.compile of the eager expression (CUDA)
  liger     Liger-Kernel's LigerFusedLinearCrossEntropyLoss, when importable (CUDA)

Rows: op linear_cross_entropy, mode fwd+bwd, shape NxHxV, ms (median, CUDA events), tflops (the three
GEMMs: 6·N·H·V FLOPs), peak_mem_mb (allocated during the step above the inputs). ``vs_eager`` on apr
rows = eager ms / apr ms. --smoke: tiny shapes on any device (CI); --quick: N 8192 only.

Mode ``per-token fwd+bwd``: ``reduction="none"`` and a weighted sum of the per-token losses (what an
RL objective such as GRPO's with a KL term or clipping backpropagates), apr (the logits recomputed in
the backward: four GEMMs, 8·N·H·V FLOPs counted) vs eager.

Mode ``distill fwd+bwd``: knowledge distillation from a teacher head of the same shape (``train
--teacher``): apr ``linear_distillation`` (both heads' logits chunked; 8·N·H·V FLOPs) vs eager
(``model/distillation.py``'s ``eager_loss`` on the two whole logit blocks).

Mode ``smooth+z fwd+bwd``: the loss with label smoothing 0.1 and z-loss 1e-4 (``train --label-smoothing
--z-loss``), apr vs eager (``F.cross_entropy(label_smoothing=)`` plus the z term) vs Liger-Kernel's
fused linear cross entropy with the same ``label_smoothing`` and ``lse_square_scale`` (CUDA).

Mode ``jsd fwd+bwd``: the generalized JSD at beta 0.5 alone (``train --teacher --kd-ratio 1 --kd-beta
0.5``: the divergence's extra read per row), apr vs eager (TRL's expression) vs Liger-Kernel's
LigerFusedLinearJSD when importable (CUDA).

--cpu-memory: on a machine without a GPU, the Qwen2 shape at N = 4096 in fp32, each provider (and
mode) in a fresh process: the process's peak resident memory over two forward+backward steps (inputs, the fp32
weight and its gradient, about 1.1 GB, included) and the time of the second step. The memory claim,
checked where no CUDA allocator statistics exist.
"""

from __future__ import annotations

import json
import sys
import time

import _common
import torch
import torch.nn.functional as F

import apr_kernels

VOCABS = {"qwen2": (896, 151936), "llama3": (4096, 128256)}


def providers(dev: torch.device) -> dict:
    def eager(h, w, t):
        return F.cross_entropy(F.linear(h, w).float(), t)

    out = {"apr": lambda h, w, t: apr_kernels.linear_cross_entropy(h, w, t), "eager": eager}
    if dev.type == "cuda":  # (on CPU, --smoke in CI, an inductor C++ build would dominate the run)
        out["compile"] = torch.compile(eager)
        out.update(liger_cross_entropy("liger"))
    return out


def liger_cross_entropy(what: str, **options) -> dict:
    """``{"liger": fn(h, w, t)}``: Liger-Kernel's fused linear cross entropy with ``options``, or ``{}``
    (with a line saying why) when it is not importable."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(**options)
    except Exception as e:  # noqa: BLE001
        print(f"{what}: not importable ({type(e).__name__}: {e}); skipped")
        return {}

    def liger_fn(h, w, t):
        loss = liger(w, h, t)
        return loss[0] if isinstance(loss, tuple) else loss

    return {"liger": liger_fn}


_CPU_MEMORY_CHILD = r"""
import json, resource, sys, time
import torch, torch.nn.functional as F
import apr_kernels
which, n, h, v = sys.argv[1], *map(int, sys.argv[2:5])
torch.manual_seed(0)
hid = torch.randn(n, h, requires_grad=True)
w = (torch.randn(v, h) * 0.02).requires_grad_()
t = torch.randint(0, v, (n,))
g = torch.randn(n)  # per-token weights ("-none": reduction="none", a weighted sum backpropagated)
th, tw = torch.randn(n, h), torch.randn(v, h) * 0.02  # a teacher head ("-distill")
def step():
    hid.grad = w.grad = None
    if which == "apr-distill":
        apr_kernels.linear_distillation(hid, w, th, tw, t)[0].backward()
    elif which == "eager-distill":
        from apr_kernels.model.distillation import eager_loss
        eager_loss(F.linear(hid, w), F.linear(th, tw), t, 0.5, 1.0, "mean")[0].backward()
    elif which == "apr":
        apr_kernels.linear_cross_entropy(hid, w, t).backward()
    elif which == "eager":
        F.cross_entropy(F.linear(hid, w).float(), t).backward()
    elif which == "apr-none":
        (apr_kernels.linear_cross_entropy(hid, w, t, reduction="none") * g).sum().backward()
    else:
        (F.cross_entropy(F.linear(hid, w).float(), t, reduction="none") * g).sum().backward()
step()  # warm-up
t0 = time.perf_counter()
step()
ms = (time.perf_counter() - t0) * 1e3
print(json.dumps({"ms": ms, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def cpu_memory(args) -> None:
    n, (h, v) = (64, (32, 1000)) if args.smoke else (4096, VOCABS["qwen2"])
    rows = []
    names = ("apr", "eager", "apr-none", "eager-none", "apr-distill", "eager-distill")
    procs = _common.run_children([[sys.executable, "-c", _CPU_MEMORY_CHILD, name, str(n), str(h), str(v)]
                                  for name in names], smoke=args.smoke, timeout=600,
                                 env={**__import__("os").environ, "APR_KERNELS_BACKEND": "reference"})
    for name, proc in zip(names, procs):
        if proc.returncode != 0:
            raise SystemExit(f"{name}: {proc.stderr[-2000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        provider, _, variant = name.partition("-")
        mode = {"": "fwd+bwd", "none": "per-token fwd+bwd", "distill": "distill fwd+bwd"}[variant]
        rows.append({"op": "linear_cross_entropy", "mode": mode, "shape": f"{n}x{h}x{v}", "model": "qwen2",
                     "dtype": "float32", "provider": provider, "ms": r["ms"], "peak_mem_mb": r["peak_mb"]})
    _common.print_table(rows, ["mode", "shape", "provider", "ms", "peak_mem_mb"])
    meta = {"ours": "apr", "mode": "cpu-memory",
            "note": "fresh process per provider; peak_mem_mb = process peak RSS over two steps (inputs, "
                    "the fp32 weight and its gradient, and the step's temporaries)"}
    print(f"wrote {_common.write_results('cross_entropy', rows, args.out, meta)}")


def per_token_providers() -> dict:
    """reduction="none" (each token's loss), ours and the eager expression."""
    return {"apr": lambda h, w, t: apr_kernels.linear_cross_entropy(h, w, t, reduction="none"),
            "eager": lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t, reduction="none")}


def distill_providers(teacher_hidden, teacher_weight) -> dict:
    """Distillation from a teacher head (kd_ratio 0.5, T 1), ours and the eager expression."""
    from apr_kernels.model.distillation import eager_loss

    return {"apr": lambda h, w, t: apr_kernels.linear_distillation(h, w, teacher_hidden, teacher_weight, t)[0],
            "eager": lambda h, w, t: eager_loss(F.linear(h, w), F.linear(teacher_hidden, teacher_weight), t, 0.5, 1.0,
                                                "mean")[0]}


def smooth_z_providers(dev: torch.device, smoothing: float = 0.1, z: float = 1e-4) -> dict:
    """Label smoothing and the z-loss: ours, the eager expression, Liger's fused loss with both."""
    def eager(h, w, t):
        logits = F.linear(h, w).float()
        keep = t != -100
        return F.cross_entropy(logits, t, label_smoothing=smoothing) + \
            z * (torch.logsumexp(logits, -1) ** 2 * keep).sum() / keep.sum()

    out = {"apr": lambda h, w, t: apr_kernels.linear_cross_entropy(h, w, t, label_smoothing=smoothing, z_loss=z),
           "eager": eager}
    if dev.type == "cuda":
        out.update(liger_cross_entropy("liger smooth+z", label_smoothing=smoothing, lse_square_scale=z))
    return out


def jsd_providers(teacher_hidden, teacher_weight, dev: torch.device) -> dict:
    """The generalized JSD (beta 0.5, T 1, no cross entropy): ours, the eager expression, Liger's."""
    from apr_kernels.model.distillation import eager_loss

    out = {"apr": lambda h, w, t: apr_kernels.linear_distillation(h, w, teacher_hidden, teacher_weight, t,
                                                                  kd_ratio=1.0, beta=0.5)[0],
           "eager": lambda h, w, t: eager_loss(F.linear(h, w), F.linear(teacher_hidden, teacher_weight), t, 1.0, 1.0,
                                               "mean", 0.5)[0]}
    if dev.type == "cuda":
        try:
            from liger_kernel.transformers import LigerFusedLinearJSD

            liger = LigerFusedLinearJSD(jsd_beta=0.5, temperature=1.0)

            def liger_fn(h, w, t):
                try:
                    return liger(h, w, teacher_hidden, teacher_weight, t)
                except TypeError:  # versions without labels
                    return liger(h, w, teacher_hidden, teacher_weight)

            out["liger"] = liger_fn
        except Exception as e:  # noqa: BLE001
            print(f"liger jsd: not importable ({type(e).__name__}: {e}); skipped")
    return out


def sweep(args) -> list[tuple[str, int]]:
    if args.smoke:
        return [("tiny", 64)]
    ns = [8192] if args.quick else [8192, 4096, 16384]
    return [(model, n) for n in ns for model in VOCABS]


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--budget-s", type=float, default=None,
                       help="stop starting new shapes after this many seconds (default 40 full, 20 quick)"),
        p.add_argument("--cpu-memory", action="store_true",
                       help="CPU: peak memory of apr vs eager at the Qwen2 shape, a process each")))
    if args.cpu_memory:
        return cpu_memory(args)
    dev = _common.device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    budget = args.budget_s or (1e9 if args.smoke else 20 if args.quick else 40)
    rep = 3 if args.smoke else 10
    provs = providers(dev)
    start = time.perf_counter()
    rows, meta = [], {"ours": "apr", "providers": list(provs), "skipped": [], "failed": []}
    for model, n in sweep(args):
        h, v = VOCABS.get(model, (32, 1000))
        if time.perf_counter() - start > budget:
            meta["skipped"].append(f"{model} N={n}")
            continue
        gen = torch.Generator(device=dev).manual_seed(0)
        hidden = torch.randn(n, h, device=dev, dtype=dtype, generator=gen).requires_grad_()
        weight = (torch.randn(v, h, device=dev, dtype=dtype, generator=gen) * 0.02).requires_grad_()
        targets = torch.randint(0, v, (n,), device=dev, generator=gen)
        token_weights = torch.randn(n, device=dev, generator=gen)
        teacher = (torch.randn(n, h, device=dev, dtype=dtype, generator=gen),
                   torch.randn(v, h, device=dev, dtype=dtype, generator=gen) * 0.02)
        for mode, fns, flops in (("fwd+bwd", provs, 6 * n * h * v),
                                 ("per-token fwd+bwd", per_token_providers(), 8 * n * h * v),
                                 ("smooth+z fwd+bwd", smooth_z_providers(dev), 6 * n * h * v),
                                 ("distill fwd+bwd", distill_providers(*teacher), 8 * n * h * v),
                                 ("jsd fwd+bwd", jsd_providers(*teacher, dev), 8 * n * h * v)):
            per = {}
            for name, fn in fns.items():
                def step():
                    hidden.grad = weight.grad = None
                    out = fn(hidden, weight, targets)
                    (out if out.dim() == 0 else (out * token_weights).sum()).backward()

                try:
                    ms = _common.time_ms(step, warmup=2, rep=rep, dev=dev)
                    mem = _common.peak_memory_mb(step, dev=dev)
                except Exception as e:  # noqa: BLE001  (a failing provider is recorded, never ends the bench)
                    meta["failed"].append(f"{name} {mode} {model} N={n}: {type(e).__name__}: {str(e)[:200]}")
                    print(f"FAILED {meta['failed'][-1]}")
                    continue
                per[name] = ms
                rows.append({"op": "linear_cross_entropy", "mode": mode, "shape": f"{n}x{h}x{v}",
                             "model": model, "dtype": str(dtype)[6:], "provider": name, "ms": ms,
                             "tflops": flops / (ms * 1e-3) / 1e12, "peak_mem_mb": mem})
            if "apr" in per and "eager" in per:
                rows[-len(per)]["vs_eager"] = per["eager"] / per["apr"]
        hidden.grad = weight.grad = None
        del hidden, weight, targets, teacher
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    _common.print_table(rows, ["mode", "shape", "provider", "ms", "tflops", "peak_mem_mb"])
    print(f"wrote {_common.write_results('cross_entropy', rows, args.out, meta)}")


if __name__ == "__main__":
    main()
