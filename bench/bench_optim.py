"""Optimizer step: time and state memory of AdamW with 8-bit moments against the AdamW users run.

    python3 bench/bench_optim.py [--smoke | --quick] [--out DIR]

One ``optimizer.step()`` over every parameter of a model (fp32 master weights, random gradients;
moments already created), in one run on one device:

  apr-adamw8bit        apr_kernels' AdamW8bit (``--optimizer adamw8bit``): the fused Triton step on CUDA
  pytorch-adamw8bit    the same optimizer's PyTorch path (what runs off CUDA)
  torch-adamw          torch.optim.AdamW with fp32 moments (fused=True on CUDA; the trainer's default)
  torchao-adamw8bit    torchao.optim.AdamW8bit, when importable (CUDA)
  bnb-adamw8bit        bitsandbytes' AdamW8bit, when importable (CUDA)

Models: Qwen2-0.5B's parameters (494M, 290 tensors), and one 8192 x 8192 matrix (per-tensor costs
apart). Rows: op optimizer_step, shape, provider, ms, bytes (the step's compulsory traffic: fp32
weight read and written, gradient read, moments read and written: 28 bytes per value for fp32
moments, 18 for 8-bit ones with their block scales), state_mb (``mem_mb``: memory the moments hold,
measured as CUDA memory held after the first step; on CPU counted from the state tensors).
--quick: Qwen2-0.5B only; --smoke: a tiny model on any device.
"""

from __future__ import annotations

import _common
import torch

from apr_kernels.model import Transformer, preset
from apr_kernels.train.adamw8bit import AdamW8bit


def _state_bytes(opt) -> int | None:
    if isinstance(opt, AdamW8bit):
        return opt.state_bytes()
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if not torch.is_tensor(v) or v.numel() <= 1:
                continue
            if type(v) is not torch.Tensor:  # a tensor subclass (torchao's 8-bit state): not counted here
                return None
            total += v.numel() * v.element_size()
    return total


def providers(dev: torch.device) -> dict:
    import os

    def ours(params):
        os.environ["APR_KERNELS_BACKEND"] = "auto"
        return AdamW8bit(params, lr=1e-4, weight_decay=0.1)

    def pytorch(params):
        os.environ["APR_KERNELS_BACKEND"] = "reference"
        return AdamW8bit(params, lr=1e-4, weight_decay=0.1)

    out = {"apr-adamw8bit": ours, "pytorch-adamw8bit": pytorch,
           "torch-adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.1, fused=dev.type == "cuda" or None)}
    if dev.type == "cuda":
        try:
            from torchao.optim import AdamW8bit as TorchaoAdamW8bit

            out["torchao-adamw8bit"] = lambda ps: TorchaoAdamW8bit(ps, lr=1e-4, weight_decay=0.1)
        except Exception as e:  # noqa: BLE001
            print(f"torchao: not importable ({type(e).__name__}: {e}); skipped")
        try:
            import bitsandbytes as bnb

            out["bnb-adamw8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4, weight_decay=0.1)
        except Exception as e:  # noqa: BLE001
            print(f"bitsandbytes: not importable ({type(e).__name__}: {e}); skipped")
    return out


def models(args, dev):
    if args.smoke:
        return [("tiny_qwen2", lambda: list(Transformer(preset("tiny_qwen2")).to(dev).parameters()))]
    out = [("qwen2-0.5b", lambda: list(Transformer(preset("qwen2_0_5b")).to(dev).parameters()))]
    if not args.quick:
        out.append(("8192x8192", lambda: [torch.nn.Parameter(torch.randn(8192, 8192, device=dev) * 0.02)]))
    return out


def main() -> None:
    import os

    args = _common.parse_args(__doc__.splitlines()[0])
    dev = _common.device()
    saved = os.environ.get("APR_KERNELS_BACKEND")
    rows = []
    for shape, make in models(args, dev):
        for name, build in providers(dev).items():
            params = make()
            n = sum(p.numel() for p in params)
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            _common.sync(dev)
            before = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
            try:
                opt = build(params)
                opt.step()  # the moments exist from here on
                _common.sync(dev)
                held = (torch.cuda.memory_allocated() - before) if dev.type == "cuda" else _state_bytes(opt)
                ms = _common.time_ms(opt.step, warmup=1 if dev.type == "cpu" else 2,
                                     rep=3 if args.smoke or dev.type == "cpu" else 10, dev=dev)
            except Exception as e:  # noqa: BLE001  (a baseline that fails on this device: say so, go on)
                print(f"{name} on {shape}: failed ({type(e).__name__}: {e}); skipped")
                continue
            finally:
                if saved is None:
                    os.environ.pop("APR_KERNELS_BACKEND", None)
                else:
                    os.environ["APR_KERNELS_BACKEND"] = saved
            eight_bit = "8bit" in name
            rows.append({"op": "optimizer_step", "shape": shape, "params": n, "provider": name, "ms": ms,
                         "bytes": n * (18 if eight_bit else 28),
                         "mem_mb": held / 2**20 if held is not None else None})
            print(f"{shape} {name}: {ms:.3f} ms, state {rows[-1]['mem_mb'] or float('nan'):.1f} MiB")
            del opt, params
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    path = _common.write_results("optim", rows, args.out)
    _common.print_table(rows, ["shape", "provider", "ms", "mem_mb"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
