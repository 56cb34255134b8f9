"""Causal GQA attention, forward and forward+backward: TFLOP/s and peak memory against PyTorch SDPA.

    python3 bench/bench_attention.py [--smoke | --quick] [--out DIR]
    python3 bench/bench_attention.py --tune      # GPU: time alternative launch configs of the kernels

Shapes: the head layouts of Qwen2-0.5B (Hq 14, Hkv 2, D 64) and Llama-3-8B (32/8, D 128), bf16,
S = 512 .. 8192 with B·S = 16384 tokens per batch, causal, layout [B, S, H, D] (what the projections
produce; SDPA gets [B, H, S, D] views of the same storage). Providers, timed in one run on one device:

  apr                 apr_kernels.attention (the Triton kernels on CUDA; K/V never expanded)
  sdpa_flash_gqa      F.scaled_dot_product_attention(enable_gqa=True), FLASH backend forced
  sdpa_flash_expand   the same on K/V expanded to Hq heads (repeat_interleave inside the timed step)
  sdpa_cudnn_gqa      CUDNN_ATTENTION backend with enable_gqa (skipped where it refuses the input)
  sdpa_cudnn_expand   CUDNN_ATTENTION on expanded K/V
  sdpa_math           (--smoke / CPU only) the default SDPA on CPU

FLOPs (reference/kernels.md 1.2): fwd = 4·B·Hq·S²·D / 2 (causal), fwd+bwd = 3.5 × fwd. The fwd+bwd step
is ``o = attn(q, k, v); torch.autograd.grad(o, (q, k, v), do)``; its peak memory (MiB above the
inputs) is recorded on the fwd+bwd rows. ``vs_best_sdpa`` on apr rows = best SDPA ms / apr ms.
"""

from __future__ import annotations

import contextlib

import _common
import torch
import torch.nn.functional as F

import apr_kernels

MODELS = {"qwen2-0.5b": (14, 2, 64), "llama-3-8b": (32, 8, 128)}
TOKENS = 16384


def sweep(args) -> list[tuple[str, int, int]]:
    """(model, B, S) triples for the chosen mode."""
    if args.smoke:
        return [("qwen2-0.5b", 1, 64), ("llama-3-8b", 1, 48)]
    seqs = [1024, 4096] if args.quick else [512, 1024, 2048, 4096, 8192]
    return [(m, TOKENS // s, s) for m in MODELS for s in seqs]


# --------------------------------------------------------------------------------- providers


def _sdpa(backend, expand: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = getattr(SDPBackend, backend) if backend else None

    def attn(q, k, v):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        if expand:
            g = q.shape[2] // k.shape[2]
            kt, vt = kt.repeat_interleave(g, dim=1), vt.repeat_interleave(g, dim=1)
        ctx = sdpa_kernel([chosen]) if chosen is not None else contextlib.nullcontext()
        with ctx:
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=not expand)
        return o.transpose(1, 2)

    return attn


def providers(dev: torch.device) -> dict:
    out = {"apr": lambda q, k, v: apr_kernels.attention(q, k, v, causal=True)}
    if dev.type == "cuda":
        for name, be in (("flash", "FLASH_ATTENTION"), ("cudnn", "CUDNN_ATTENTION")):
            out[f"sdpa_{name}_gqa"] = _sdpa(be, expand=False)
            out[f"sdpa_{name}_expand"] = _sdpa(be, expand=True)
    else:
        out["sdpa_math"] = _sdpa(None, expand=False)
    return out


# ------------------------------------------------------------------------------------ timing


def inputs(B, S, hq, hkv, d, dtype, dev):
    def t(h):
        return (torch.randn(B, S, h, d, device=dev) * 0.5).to(dtype).requires_grad_()

    return t(hq), t(hkv), t(hkv)


def flops_fwd(B, S, hq, d) -> float:
    return 4 * B * hq * S * S * d / 2  # causal


def measure(fn, q, k, v, dev, rep) -> dict:
    """fwd ms, fwd+bwd ms and the fwd+bwd step's peak memory for one provider."""
    fn(q, k, v)  # compile / pick kernels, and fail early if the backend refuses the input
    do = torch.randn(q.shape, device=dev, dtype=q.dtype)

    def step():
        o = fn(q, k, v)
        return torch.autograd.grad(o, (q, k, v), do)

    fwd = _common.time_ms(lambda: fn(q, k, v), warmup=3, rep=rep, dev=dev)
    both = _common.time_ms(step, warmup=3, rep=rep, dev=dev)
    return {"fwd": fwd, "fwd+bwd": both, "mem": _common.peak_memory_mb(step, dev)}


def run_shapes(args, dev, dtype, rows: list) -> None:
    rep = 3 if args.smoke else 10
    provs = providers(dev)
    for model, B, S in sweep(args):
        hq, hkv, d = MODELS[model]
        q, k, v = inputs(B, S, hq, hkv, d, dtype, dev)
        f1 = flops_fwd(B, S, hq, d)
        shape_rows = []
        for name, fn in provs.items():
            try:
                m = measure(fn, q, k, v, dev, rep)
            except RuntimeError as e:  # e.g. "No available kernel" for a forced SDPA backend
                print(f"  {model} S={S} {name}: skipped ({str(e).splitlines()[0][:100]})")
                continue
            for mode, flops in (("fwd", f1), ("fwd+bwd", 3.5 * f1)):
                row = {"op": "attention", "mode": mode, "model": model, "B": B, "S": S, "Hq": hq, "Hkv": hkv,
                       "D": d, "causal": True, "dtype": str(dtype).replace("torch.", ""), "provider": name,
                       "ms": m[mode], "flops": flops, "tflops": flops / (m[mode] * 1e-3) / 1e12}
                if mode == "fwd+bwd" and m["mem"] is not None:
                    row["peak_mem_mb"] = m["mem"]
                shape_rows.append(row)
        for mode in ("fwd", "fwd+bwd"):
            sdpa = [r["ms"] for r in shape_rows if r["mode"] == mode and r["provider"].startswith("sdpa")]
            for r in shape_rows:
                if r["mode"] == mode and r["provider"] == "apr" and sdpa:
                    r["vs_best_sdpa"] = min(sdpa) / r["ms"]
        rows.extend(shape_rows)
        if args.out or not args.smoke:  # keep what was measured if the run is cut short
            _common.write_results("attention", rows, args.out)


# -------------------------------------------------------------------------------------- tune


def tune(args, dev, dtype, rows: list) -> None:
    """Time the kernel launchers with alternative configs (the heuristic's candidates)."""
    kern = __import__("apr_kernels.kernels.attention", fromlist=["x"])

    def cfg(bm, bn, w, s):
        return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": s}

    cands = {
        64: {"fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4)],
             "dkdv": [(64, 128, 8, 3), (32, 128, 8, 3), (32, 128, 4, 3), (64, 64, 4, 3), (32, 64, 4, 3)],
             "dq": [(128, 64, 8, 3), (128, 32, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3)]},
        128: {"fwd": [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3)],
              "dkdv": [(32, 64, 8, 2), (64, 64, 8, 2), (32, 128, 8, 2), (16, 64, 4, 2), (32, 64, 4, 3)],
              "dq": [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (64, 64, 8, 2)]},
    }
    for model, S in (("qwen2-0.5b", 2048), ("llama-3-8b", 4096)):
        hq, hkv, d = MODELS[model]
        B = TOKENS // S
        q, k, v = (t.detach() for t in inputs(B, S, hq, hkv, d, dtype, dev))
        sc = d**-0.5
        o, lse = kern.attention_fwd(q, k, v, True, sc)
        do = torch.randn_like(o)
        f1 = flops_fwd(B, S, hq, d)
        for kind, options in cands[d].items():
            for c in options:
                c = cfg(*c)
                if kind == "fwd":
                    fn = lambda c=c: kern.attention_fwd(q, k, v, True, sc, config=c)  # noqa: E731
                    flops = f1
                else:
                    fn = lambda c=c, kind=kind: kern.attention_bwd(do, q, k, v, o, lse, True, sc,  # noqa: E731
                                                                    config={kind: c})
                    flops = 2.5 * f1
                try:
                    ms = _common.time_ms(fn, warmup=2, rep=10, dev=dev)
                except Exception as e:  # out of resources for this tile shape
                    print(f"  {model} {kind} {c}: failed ({type(e).__name__}: {str(e)[:80]})")
                    continue
                rows.append({"op": f"attention_tune_{kind}", "mode": "fwd" if kind == "fwd" else "bwd",
                             "model": model, "B": B, "S": S, "config": "{BLOCK_M}x{BLOCK_N}w{num_warps}s{num_stages}".format(**c),
                             "provider": "apr", "ms": ms, "flops": flops, "tflops": flops / (ms * 1e-3) / 1e12})
                print(f"  {model} S={S} {kind:4s} {rows[-1]['config']:14s} {ms:8.3f} ms {rows[-1]['tflops']:6.1f} TFLOP/s")


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0], lambda p: p.add_argument(
        "--tune", action="store_true", help="GPU: time alternative launch configs instead"))
    dev = _common.device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows: list[dict] = []
    if args.tune:
        if dev.type != "cuda":
            raise SystemExit("bench_attention.py --tune needs a CUDA GPU")
        tune(args, dev, dtype, rows)
        path = _common.write_results("attention_tune", rows, args.out)
    else:
        run_shapes(args, dev, dtype, rows)
        path = _common.write_results("attention", rows, args.out)
        cols = ["model", "S", "mode", "provider", "ms", "tflops", "peak_mem_mb", "vs_best_sdpa"]
        _common.print_table(rows, cols)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
