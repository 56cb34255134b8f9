"""LoRA fine-tuning memory and speed: adapters on a quantised base vs on a full-precision base vs
full fine-tuning, from the same APR file, one ``Trainer`` step at a time.

Providers (rows ``op`` lora_step, ``provider``):

* ``full``: every parameter trains (fp32 master weights, AdamW state for all);
* ``lora``: rank-16 adapters on all seven projections, the base frozen (bf16 on CUDA as
  ``apr-kernels train --lora-rank`` holds it, fp32 on CPU);
* ``qlora``: the same adapters on a base whose projections stay in the file's 4-bit blocks
  (``--lora-quantized-base``: Q4_K, or APR_Q4 with ``--quant APR_Q4``), dequantised per GEMM.

Each provider runs in a fresh process: peak memory is the peak over the training steps (model,
optimizer state, activations; one warmup step and the timed steps) above what the process held
before loading the model: ``torch.cuda.max_memory_allocated`` on CUDA, on CPU the resident-memory
high-water mark (VmHWM, reset after loading, so the transient of copying weights out of the mapped
file is left out), with glibc's mmap threshold fixed at 64 KiB in the workers so that freed large
blocks leave the resident set at once instead of lingering in the heap. Model: ``qwen2_0_5b`` (all 24
layers, 494M parameters) unless ``--preset`` / ``--layers``; ``--smoke``: tiny_qwen2, a code-path check.
Rows: ms (median step), tokens_per_s, peak_mem_mb, trainable_m (millions of trained parameters), loss.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

PROVIDERS = ("full", "lora", "qlora")
LORA = {"rank": 16, "alpha": 32.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"], "seed": 0}


def make_files(cfg, folder: Path, quant: str, dev: torch.device) -> tuple[Path, Path]:
    """The same random model as a plain fp32 APR file and with its projections in ``quant`` blocks."""
    import apr_kernels
    from apr_kernels.io import QuantizedTensor
    from apr_kernels.model import Transformer
    from apr_kernels.quant import quantize
    from apr_kernels.train.checkpoint import model_metadata, model_tensors

    torch.manual_seed(0)
    model = Transformer(cfg, fast=False)
    meta = model_metadata(model)
    plain, quantised = folder / "plain.apr", folder / "quantised.apr"
    apr_kernels.save(model_tensors(model), plain, metadata=meta)
    tensors = {}
    for name, lazy in model_tensors(model).items():
        t = lazy.materialize()
        if name.endswith("proj.weight"):  # quantised where the model is (a GPU is fast at it)
            q = quantize(quant, t.to(dev))
            t = QuantizedTensor(quant, q.shape, q.data.cpu())
        tensors[name] = t
    apr_kernels.save(tensors, quantised, metadata=meta)
    return plain, quantised


def _vm_kib() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0])
    return out


def measure(provider: str, plain: str, quantised: str, batch: int, seq: int, warmup: int, steps: int,
            device: str) -> dict:
    """One provider in this (fresh) process."""
    from apr_kernels.model import from_apr
    from apr_kernels.train.loop import Trainer, TrainConfig

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    base_dtype = torch.bfloat16 if cuda else None
    start = torch.cuda.memory_allocated() if cuda else _vm_kib()["VmRSS"]
    if provider == "full":
        model = from_apr(plain, device=dev)
    elif provider == "lora":
        model = from_apr(plain, device=dev, lora_init=LORA, lora_base_dtype=base_dtype)
    else:
        model = from_apr(quantised, device=dev, lora_init=LORA, keep_quantized=True, lora_base_dtype=base_dtype)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, model.config.vocab_size, ((warmup + steps) * batch * seq + 1,), generator=g)
    trainer = Trainer(model, tokens, None, TrainConfig(steps=warmup + steps, batch_size=batch, seq_len=seq,
                                                       lr=1e-4, warmup=0), device=dev, log=lambda *a: None)
    # the peak over the training steps (loading's transient, e.g. file pages mapped while weights
    # are copied out, excluded), above what the process held before the model existed
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")
    times, loss = [], None
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        loss = trainer.train_step()["loss"]  # ends in a device sync
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if cuda:
        peak = (torch.cuda.max_memory_allocated() - start) / 2**20
    else:
        peak = (_vm_kib()["VmHWM"] - start) / 1024
    s = statistics.median(times)
    return {"ms": s * 1e3, "tokens_per_s": batch * seq / s, "peak_mem_mb": peak, "trainable_m": trainable / 1e6,
            "loss": loss}


def main() -> None:
    args = _common.parse_args(
        __doc__.splitlines()[0],
        lambda p: (p.add_argument("--preset", default=None, help="model preset (default qwen2_0_5b)"),
                   p.add_argument("--layers", type=int, default=None, help="override the number of layers"),
                   p.add_argument("--batch", type=int, default=None), p.add_argument("--seq", type=int, default=None),
                   p.add_argument("--quant", default="Q4_K", choices=["Q4_K", "APR_Q4"],
                                  help="block format of the quantised base (default Q4_K)")))
    from apr_kernels.model import preset

    dev = _common.device()
    if args.smoke:
        name, batch, seq, warmup, steps = "tiny_qwen2", 2, 64, 1, 2
    else:
        name = args.preset or "qwen2_0_5b"
        batch, seq = (4, 2048) if dev.type == "cuda" else (1, 256)
        warmup, steps = (2, 5 if not args.quick else 3) if dev.type == "cuda" else (1, 2)
    cfg = preset(name)
    if args.smoke:
        cfg = cfg.replace(hidden_size=256, intermediate_size=512)  # whole 256-element blocks for Q4_K
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers, head_dim=cfg.head_dim)
    batch, seq = args.batch or batch, args.seq or seq
    print(f"{name}: {cfg.num_layers} layers, {cfg.num_parameters() / 1e6:.0f}M parameters, batch {batch} x seq {seq}, "
          f"base {args.quant} for qlora, on {dev}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_lora_") as folder:
        plain, quantised = make_files(cfg, Path(folder), args.quant, dev)
        ctx = mp.get_context("spawn")  # a fresh process per provider: its peak memory is its own
        if dev.type == "cpu":  # glibc then returns freed large blocks at once: resident memory tracks live memory
            os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
        for provider in PROVIDERS:
            with ctx.Pool(1) as pool:
                r = pool.apply(measure, (provider, str(plain), str(quantised), batch, seq, warmup, steps, str(dev)))
            rows.append({"op": "lora_step", "preset": name, "layers": cfg.num_layers, "B": batch, "S": seq,
                         "quant": args.quant, "provider": provider, **r})
    _common.print_table(rows, ["provider", "ms", "tokens_per_s", "peak_mem_mb", "trainable_m", "loss"])
    by = {r["provider"]: r for r in rows}
    print(f"qlora peak memory: {by['qlora']['peak_mem_mb'] / by['lora']['peak_mem_mb']:.2f}x of lora, "
          f"{by['qlora']['peak_mem_mb'] / by['full']['peak_mem_mb']:.2f}x of full fine-tuning; step time "
          f"{by['qlora']['ms'] / by['lora']['ms']:.2f}x of lora")
    print("wrote", _common.write_results("lora", rows, args.out, {"ours": "qlora"}))


if __name__ == "__main__":
    main()
