"""The card's two ceilings, measured in the same run as the kernels they judge.

* copy: device-to-device ``dst.copy_(src)``, GB/s counting bytes read plus bytes written; the
  practical roof of a memory-bound kernel (RMSNorm).
* matmul: a large dense bf16 matrix product (fp32 on CPU), TFLOP/s at 2·n³ FLOPs; the practical
  roof of a compute-bound kernel (attention).

``report.py`` divides each kernel's GB/s and TFLOP/s by these (the "% of ceiling" column). The
datasheet peaks of known cards go into ``meta["spec"]`` for context only: measured ceilings are what
a kernel can actually reach, and they move with clocks, power limits and drivers.

    python3 bench/bench_ceilings.py [--smoke | --quick] [--out DIR]
"""

from __future__ import annotations

import _common
import torch

# Datasheet figures (dense, no sparsity) for the cards the GPU check is lent; see
# /work/shared/reference/kernels.md section 1.1 (H100 SXM5) and NVIDIA's H200 datasheet.
SPECS = {
    "H100 80GB HBM3": {"name": "H100 SXM5", "hbm_gbs": 3350.0, "bf16_dense_tflops": 989.4},
    "H200": {"name": "H200 SXM", "hbm_gbs": 4800.0, "bf16_dense_tflops": 989.4},
}


def spec_for(device_name: str) -> dict | None:
    for key, spec in SPECS.items():
        if key in device_name:
            return dict(spec)
    return None


def sizes(args) -> tuple[list[int], list[int]]:
    """(copy sizes in bytes, matmul sizes n) for the chosen mode."""
    if args.smoke:
        return [4 << 20], [256]
    if args.quick:
        return [512 << 20], [8192]
    return [256 << 20, 1 << 30], [4096, 8192]


def main() -> None:
    args = _common.parse_args("Device-to-device copy GB/s and dense matmul TFLOP/s (the ceilings)")
    dev = _common.device()
    copy_sizes, mm_sizes = sizes(args)
    dtype = "bf16" if dev.type == "cuda" else "fp32"
    rows = []
    for nbytes in copy_sizes:
        gbs = _common.copy_bandwidth_gbs(nbytes, dev=dev)
        # copy_bandwidth_gbs moves nbytes/2 of source into nbytes/2 of destination: nbytes in all.
        rows.append({"op": "copy", "shape": f"{nbytes >> 20} MiB", "dtype": "bf16", "provider": "torch",
                     "bytes": nbytes, "ms": nbytes / (gbs * 1e9) * 1e3, "gbs": gbs})
    for n in mm_sizes:
        tflops = _common.matmul_tflops(n, dev=dev)
        flops = 2 * n**3
        rows.append({"op": "matmul", "shape": f"{n}x{n}x{n}", "dtype": dtype, "provider": "torch",
                     "flops": flops, "ms": flops / (tflops * 1e12) * 1e3, "tflops": tflops})
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    ceilings = {"copy_gbs": max(r["gbs"] for r in rows if r["op"] == "copy"),
                "matmul_tflops": max(r["tflops"] for r in rows if r["op"] == "matmul")}
    extra = {"ceilings": ceilings, "mode": "smoke" if args.smoke else "quick" if args.quick else "full"}
    if dev.type == "cuda":
        spec = spec_for(torch.cuda.get_device_name())
        if spec:
            extra["spec"] = spec
    path = _common.write_results("ceilings", rows, args.out, extra_meta=extra)
    _common.print_table(rows, ["op", "shape", "dtype", "ms", "gbs", "tflops"])
    spec = extra.get("spec")
    if spec:
        print(f"datasheet {spec['name']}: {spec['hbm_gbs']:.0f} GB/s, {spec['bf16_dense_tflops']:.0f} TFLOP/s; "
              f"measured {ceilings['copy_gbs'] / spec['hbm_gbs']:.0%} and "
              f"{ceilings['matmul_tflops'] / spec['bf16_dense_tflops']:.0%} of them")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
