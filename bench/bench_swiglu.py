"""SwiGLU activation ``silu(gate) * up``, forward and backward: GB/s against the device copy.

    python3 bench/bench_swiglu.py [--smoke | --quick] [--out DIR]

Shapes: the MLP widths of Qwen2-0.5B (intermediate 4864) and Llama-3-8B (14336) at 4k / 8k / 16k
tokens, bf16. Providers, in one run on one device:

  apr       apr_kernels.swiglu (the Triton kernels on CUDA)
  eager     F.silu(g) * u, what Hugging Face's MLP computes (autograd keeps silu(g) too)
  compile   torch.compile of the eager expression (CUDA)
  liger     Liger-Kernel's LigerSiLUMulFunction, when importable (CUDA)

Rows: op swiglu, mode fwd | bwd (the backward timed alone, from a kept graph), ms, bytes, gbs,
pct_copy. Bytes are compulsory traffic (n elements of e bytes): forward read g, u + write y = 3·n·e;
backward read dy, g, u + write dg, du = 5·n·e. --quick: 8k tokens only; --smoke: tiny, any device.
"""

from __future__ import annotations


import _common
import torch
import torch.nn.functional as F

import apr_kernels

WIDTHS = {"qwen2-0.5b": 4864, "llama-3-8b": 14336}


def providers(dev: torch.device) -> dict:
    def eager(g, u):
        return F.silu(g) * u

    out = {"apr": apr_kernels.swiglu, "eager": eager}
    if dev.type == "cuda":
        out["compile"] = torch.compile(eager)
        try:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            out["liger"] = LigerSiLUMulFunction.apply
        except Exception as e:  # noqa: BLE001
            print(f"liger: not importable ({type(e).__name__}: {e}); skipped")
    return out


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0])
    dev = _common.device()
    run = _common.MemoryBoundRun(args, providers(dev))
    if args.smoke:
        shapes = [("tiny", 64, 256)]
    else:
        tokens = [8192] if args.quick else [8192, 4096, 16384]
        shapes = [(m, t, w) for t in tokens for m, w in WIDTHS.items()]
    for model, t, w in shapes:
        if run.out_of_time(f"{model} {t}x{w}"):
            continue
        g = (torch.randn(t, w, device=dev, dtype=run.dtype) * 2).requires_grad_()
        u = torch.randn(t, w, device=dev, dtype=run.dtype).requires_grad_()
        dy = torch.randn(t, w, device=dev, dtype=run.dtype)
        n = t * w
        run.measure("swiglu", f"{t}x{w}", lambda fn, g_, u_: fn(g_, u_), (g, u), dy,
                    (3 * n * run.elem, 5 * n * run.elem), f"{model} {t}x{w}", model=model)
        del g, u, dy
    run.finish("swiglu")


if __name__ == "__main__":
    main()
