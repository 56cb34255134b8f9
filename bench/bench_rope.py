"""Rotary embedding of q and k, forward and backward: GB/s against the device copy.

    python3 bench/bench_rope.py [--smoke | --quick] [--out DIR]

Shapes: the head layouts of Qwen2-0.5B (Hq 14, Hkv 2, D 64) and Llama-3-8B (32/8, D 128) at 8k and
16k tokens (B x S = 4 x 2048, 8 x 2048), bf16, layout [B, S, H, D] as the projections produce it.
Providers, in one run on one device:

  apr       apr_kernels.rope (one Triton pass over q and k; the backward is the inverse rotation)
  eager     the model's Hugging Face-form apply_rope on q and on k (x * cos + rotate_half(x) * sin)
  compile   torch.compile of the eager pair (CUDA)

Rows: op rope, mode fwd | bwd (timed alone from a kept graph), ms, bytes, gbs, pct_copy. Bytes:
read q, k + write both = 2·B·S·(Hq + Hkv)·D·e, the same for the backward (tables not counted).
"""

from __future__ import annotations


import _common
import torch

import apr_kernels
from apr_kernels.model.rope import apply_rope, rope_tables

MODELS = {"qwen2-0.5b": (14, 2, 64), "llama-3-8b": (32, 8, 128)}


def providers(dev: torch.device) -> dict:
    def eager(q, k, cos, sin):
        return apply_rope(q, cos, sin, 2), apply_rope(k, cos, sin, 2)

    out = {"apr": lambda q, k, cos, sin: apr_kernels.rope(q, k, cos, sin, 2), "eager": eager}
    if dev.type == "cuda":
        out["compile"] = torch.compile(eager)
    return out


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0])
    dev = _common.device()
    run = _common.MemoryBoundRun(args, providers(dev))
    if args.smoke:
        shapes = [("qwen2-0.5b", 1, 32)]
    else:
        shapes = [(m, b, 2048) for b in ([4] if args.quick else [4, 8]) for m in MODELS]
    for model, b, s in shapes:
        hq, hkv, d = MODELS[model]
        if run.out_of_time(f"{model} B={b} S={s}"):
            continue
        q = torch.randn(b, s, hq, d, device=dev, dtype=run.dtype, requires_grad=True)
        k = torch.randn(b, s, hkv, d, device=dev, dtype=run.dtype, requires_grad=True)
        cos, sin = (t.to(run.dtype) for t in rope_tables(s, d, 1e6, device=dev))
        grads = (torch.randn_like(q), torch.randn_like(k))
        nbytes = 2 * b * s * (hq + hkv) * d * run.elem
        run.measure("rope", f"{b}x{s}x{hq}/{hkv}x{d}", lambda fn, q_, k_: fn(q_, k_, cos, sin), (q, k), grads,
                    (nbytes, nbytes), f"{model} B={b}", model=model)
    run.finish("rope")


if __name__ == "__main__":
    main()
