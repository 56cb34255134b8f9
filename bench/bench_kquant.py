"""Quantising weights to Q4_K, Q6_K and Q5_K: what ``convert``/``export --quantize`` cost once and
``train --qat`` costs every optimizer step (each targeted weight quantised and dequantised).

    python3 bench/bench_kquant.py [--smoke | --quick] [--out DIR]

Weights (float32, as the quantiser reads them): a Qwen2-0.5B MLP projection [4864, 896] and a
Llama-3-8B one [14336, 4096] (quick: the first). Providers, in one run on one device, both writing
llama-quantize's blocks byte for byte (checked here: equal results):

  apr     ggml_quant.fake_quantize where the weight is: on CUDA the Triton searches
          (kernels/kquant.py), one launch per chunk (Q5_K, GGUF's: rows of whole 256-value blocks only)
  torch   the same searches as torch operations (APR_KERNELS_BACKEND=reference), which a CPU runs

Rows: op q4_k | q6_k | q5_k, shape, provider, ms, gbs (the float32 weight read once per ms).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import torch  # noqa: E402

from apr_kernels.ggml_quant import fake_quantize  # noqa: E402

SHAPES = {"qwen2-0.5b mlp": (4864, 896), "llama-3-8b mlp": (14336, 4096)}


def run_with(backend: str, fn):
    before = os.environ.get("APR_KERNELS_BACKEND")
    os.environ["APR_KERNELS_BACKEND"] = backend
    try:
        return fn()
    finally:
        if before is None:
            os.environ.pop("APR_KERNELS_BACKEND")
        else:
            os.environ["APR_KERNELS_BACKEND"] = before


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0])
    dev = _common.device()
    shapes = {"smoke": (64, 512)} if args.smoke else dict(list(SHAPES.items())[:1] if args.quick else SHAPES)
    rows = []
    for name, shape in shapes.items():
        torch.manual_seed(0)
        w = (torch.randn(shape) * 0.02).to(dev)
        for kind in ("Q4_K", "Q6_K", "Q5_K")[: 2 + (shape[1] % 256 == 0)]:
            results = {}
            for provider, backend in (("apr", "auto"), ("torch", "reference")):
                results[provider] = run_with(backend, lambda: fake_quantize(kind, w))
                ms = run_with(backend, lambda: _common.time_ms(lambda: fake_quantize(kind, w), warmup=1,
                                                                rep=3 if not args.smoke else 1, dev=dev))
                rows.append(dict(op=kind.lower(), shape=f"{name} {shape[0]}x{shape[1]}", provider=provider, ms=ms,
                                 gbs=w.numel() * 4 / ms / 1e6))
            assert torch.equal(results["apr"], results["torch"]), f"{kind} {name}: the providers' blocks differ"
    _common.print_table(rows, ["op", "shape", "provider", "ms", "gbs"])
    print(f"wrote {_common.write_results('kquant', rows, args.out)}")


if __name__ == "__main__":
    main()
