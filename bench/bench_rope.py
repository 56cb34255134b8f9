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

import time

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
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elem = torch.empty((), dtype=dtype).element_size()
    copy_gbs = _common.copy_bandwidth_gbs((512 << 20) if dev.type == "cuda" else (8 << 20), dev=dev)
    provs = providers(dev)
    if args.smoke:
        shapes = [("qwen2-0.5b", 1, 32)]
    else:
        shapes = [(m, b, 2048) for b in ([4] if args.quick else [4, 8]) for m in MODELS]
    rep = 3 if args.smoke else 20
    budget, start = (1e9 if args.smoke else 15 if args.quick else 30), time.perf_counter()
    rows, meta = [], {"ours": "apr", "copy_gbs": copy_gbs, "ceilings": {"copy_gbs": copy_gbs},
                      "providers": list(provs), "skipped": [], "failed": []}
    for model, b, s in shapes:
        hq, hkv, d = MODELS[model]
        if time.perf_counter() - start > budget:
            meta["skipped"].append(f"{model} B={b} S={s}")
            continue
        q = torch.randn(b, s, hq, d, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(b, s, hkv, d, device=dev, dtype=dtype, requires_grad=True)
        cos, sin = (t.to(dtype) for t in rope_tables(s, d, 1e6, device=dev))
        grads = (torch.randn_like(q), torch.randn_like(k))
        nbytes = 2 * b * s * (hq + hkv) * d * elem
        for name, fn in provs.items():
            try:
                fwd, bwd = _common.fwd_bwd_ms(lambda q_, k_: fn(q_, k_, cos, sin), (q, k), grads, rep=rep, dev=dev)
            except Exception as e:  # noqa: BLE001
                meta["failed"].append(f"{name} {model} B={b}: {type(e).__name__}: {str(e)[:200]}")
                print(f"FAILED {meta['failed'][-1]}")
                continue
            for mode, ms in (("fwd", fwd), ("bwd", bwd)):
                gbs = nbytes / (ms * 1e-3) / 1e9
                rows.append({"op": "rope", "mode": mode, "shape": f"{b}x{s}x{hq}/{hkv}x{d}", "model": model,
                             "dtype": str(dtype)[6:], "provider": name, "ms": ms, "bytes": nbytes, "gbs": gbs,
                             "pct_copy": gbs / copy_gbs})
    _common.print_table(rows, ["shape", "mode", "provider", "ms", "gbs", "pct_copy"])
    print(f"wrote {_common.write_results('rope', rows, args.out, meta)}")


if __name__ == "__main__":
    main()
