"""Training throughput: tokens/s and model FLOPs utilisation, fast (Triton) path vs reference path.

One training step of ``apr_kernels.train.loop.Trainer`` (forward, fp32 cross entropy over the full
vocabulary, backward, clipping, fused AdamW; bf16 autocast with fp32 master weights on CUDA), on the
``qwen2_0_5b`` preset (all 24 layers, 151,936 vocabulary, GQA 7:1) with random tokens:

* ``fast``: ``Transformer(fast=True)``, RMSNorm / fused add+RMSNorm / GQA attention from the package's
  Triton kernels (K/V never expanded);
* ``reference``: ``Transformer(fast=False)``, eager PyTorch as Hugging Face writes it (fp32 RMSNorm,
  ``scaled_dot_product_attention`` with ``enable_gqa``).

Model FLOPs per token = ``ModelConfig.flops_per_token(S)``: 6 x matmul parameters (output projection
included, embedding lookup excluded) + causal attention (3 x 2 x 2 x S x Hq x D / 2 per layer).
MFU = achieved model FLOP/s / the dense bf16 matmul rate ``_common.matmul_tflops`` measured in the same
run (a measured roof, lower than the datasheet peak); ``mfu_datasheet`` divides by the card's datasheet
dense bf16 rate instead (the usual MFU, e.g. 989 TFLOP/s for H100/H200 SXM; bench_ceilings.SPECS), where
the card is known. Row: op train_step, provider fast|reference, ms (median step), tokens_per_s, tflops,
mfu, mfu_datasheet, peak_mem_mb.

--documents MEAN: also ``fast+documents`` (and ``reference+documents``): document masking on a token
stream whose documents end every MEAN tokens on average (random lengths; the model FLOPs counted
stay those of full causal rows, so its MFU shows the cost of masking, not the saving).

--distill: also ``fast+distill`` and ``reference+distill``: knowledge distillation (``train --teacher``)
from a teacher of the same preset (random weights; its forward is part of the step, its FLOPs are not
counted in the MFU), through ``linear_distillation`` on the fast path and the eager expression on the
reference path.

--checkpointing: also ``fast+checkpoint`` (every layer recomputed in the backward, ``train
--grad-checkpointing``) and ``fast+selective`` (``--grad-checkpointing selective``: the matmul and
attention outputs kept, the rest recomputed): the step time and peak memory each costs and saves.

--preset NAME: another model preset on CUDA (``qwen3_0_6b``: Qwen3's per-head q/k norms in the fast
path; ``llama_370m``; a mixture of experts, e.g. ``qwen3_30b_a3b --layers 2``: its MFU counts the
routed experts' FLOPs only). --smoke: the tiny_qwen2 preset on CPU for three steps (code path only: on CPU both paths run PyTorch).
--float8: also ``fast+compile`` and ``fast+float8+compile`` (``train --float8 tensorwise --compile``: the
decoder layers' projections in float8 through torchao, on cards of compute capability 8.9 or more; the
MFU still divides model FLOPs by the bf16 roof, as torchtitan reports it).
--qat: also ``fast+qat`` (``train --qat q4k``: every step on the weights as Q4_K will store them; the
row shows what the per-step quantisation of every weight costs).
--quick: 4 timed steps instead of 10. --compile: also ``fast+compile`` and ``reference+compile`` (each
decoder layer's forward under torch.compile, as ``apr-kernels train --compile``; not in gpu_check's run). The whole GPU run is about 30-60 s on an H100 (kernel compiles
included).
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from bench_ceilings import spec_for  # noqa: E402

from apr_kernels.model import Transformer, preset  # noqa: E402
from apr_kernels.train.cli import compile_layers  # noqa: E402
from apr_kernels.train.loop import Trainer, TrainConfig  # noqa: E402


def measure(cfg, provider: str, batch: int, seq: int, warmup: int, steps: int, dev: torch.device,
            doc_len: int | None = None) -> dict:
    torch.manual_seed(0)
    with torch.device(dev):
        model = Transformer(cfg, fast=provider.startswith("fast"))
    if provider.endswith("+checkpoint") or provider.endswith("+selective"):
        model.gradient_checkpointing = "selective" if provider.endswith("+selective") else "full"
    if "+float8" in provider:  # as `apr-kernels train --float8 tensorwise` (emulated off CUDA)
        from apr_kernels.train import float8

        float8.convert(model, "tensorwise", dev)
    if provider.endswith("+compile"):
        compile_layers(model)  # as `apr-kernels train --compile`; the warmup steps pay the compile
    n_tokens = (warmup + steps) * batch * seq + 1
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size - 1, (n_tokens,), generator=g)
    masked = provider.endswith("+documents")
    teacher = None
    if provider.endswith("+distill"):
        with torch.device(dev):
            teacher = Transformer(cfg, fast=provider.startswith("fast")).requires_grad_(False)
        if dev.type == "cuda":
            teacher = teacher.to(torch.bfloat16)  # as load_teacher: bf16 where the run computes in bf16
    eos = cfg.vocab_size - 1  # used only as the end-of-document id
    if masked:  # documents of random lengths, mean doc_len
        gaps = torch.empty(n_tokens // doc_len * 2).exponential_(1.0 / doc_len, generator=g).long() + 1
        ends = gaps.cumsum(0)
        tokens[ends[ends < n_tokens]] = eos
    tcfg = TrainConfig(steps=warmup + steps, batch_size=batch, seq_len=seq, lr=1e-4, warmup=0,
                       document_mask=masked, teacher="random" if teacher is not None else None,
                       qat="q4k" if provider.endswith("+qat") else None)
    trainer = Trainer(model, tokens, None, tcfg, device=dev, log=lambda *a: None, eos_id=eos, teacher=teacher)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        rec = trainer.train_step()  # ends in a device sync
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            losses.append(rec["loss"])
    mem = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
    profile = kernel_profile(trainer, cuda=dev.type == "cuda")
    del trainer, model, teacher
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    s = statistics.median(times)
    return {"ms": s * 1e3, "tokens_per_s": batch * seq / s, "peak_mem_mb": mem, "last_loss": losses[-1],
            "profile": profile}


def kernel_profile(trainer, cuda: bool, top: int = 20) -> list[dict]:
    """Where one more step's time goes: the ``top`` GPU kernels by total time (torch.profiler; on CPU
    the ops by self time), so a tuning session sees what to fuse or tune next without a profiling
    run of its own."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        trainer.train_step()

    def us(e):
        if not cuda:
            return e.self_cpu_time_total
        return getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)

    events = [e for e in prof.key_averages() if us(e) > 0]
    total = sum(us(e) for e in events) or 1.0
    out = [{"kernel": e.key[:120], "calls": e.count, "ms": us(e) / 1e3, "share": us(e) / total}
           for e in sorted(events, key=us, reverse=True)[:top]]
    return out


def main() -> None:
    args = _common.parse_args(
        __doc__.splitlines()[0],
        lambda p: (p.add_argument("--layers", type=int, default=None, help="override the number of layers"),
                   p.add_argument("--preset", default=None,
                                  help="model preset on CUDA (default qwen2_0_5b; e.g. qwen3_0_6b, llama_370m)"),
                   p.add_argument("--batch", type=int, default=None), p.add_argument("--seq", type=int, default=None),
                   p.add_argument("--compile", action="store_true",
                                  help="also time both paths with each layer torch.compiled (+compile rows)"),
                   p.add_argument("--documents", type=int, default=None, metavar="MEAN",
                                  help="also time both paths with document masking, documents of MEAN tokens"),
                   p.add_argument("--distill", action="store_true",
                                  help="also time both paths distilling from a teacher of the same preset"),
                   p.add_argument("--float8", action="store_true",
                                  help="also time the compiled fast path with and without float8 projections"),
                   p.add_argument("--qat", action="store_true",
                                  help="also time the fast path with quantisation-aware training for Q4_K"),
                   p.add_argument("--checkpointing", action="store_true",
                                  help="also time the fast path with full and with selective activation "
                                       "checkpointing")),
    )
    dev = _common.device()
    if args.smoke or dev.type != "cuda":
        name = "tiny_llama" if args.float8 else "tiny_qwen2"  # (tiny_qwen2 has no float8-sized projection)
        cfg, batch, seq, warmup, steps = preset(name), 2, 64, 2, 3
        peak = _common.matmul_tflops(256, dev=dev)
    else:
        name = args.preset or "qwen2_0_5b"
        cfg, batch, seq = preset(name), 4, 2048
        warmup, steps = 3, (4 if args.quick else 10)
        peak = _common.matmul_tflops(8192, dev=dev)
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers, head_dim=cfg.head_dim)
    batch, seq = args.batch or batch, args.seq or seq
    flops_tok = cfg.flops_per_token(seq)
    spec = spec_for(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
    datasheet = spec["bf16_dense_tflops"] if spec else None
    dtype = "bf16" if dev.type == "cuda" else "fp32"
    print(f"{name}: {cfg.num_layers} layers, {cfg.num_parameters() / 1e6:.0f}M parameters, batch {batch} x seq "
          f"{seq}, {flops_tok * batch * seq / 1e12:.2f} TFLOP per step; measured {dtype} matmul peak "
          f"{peak:.1f} TFLOP/s on {dev}")
    rows = []
    providers = ["fast", "reference"] + (["fast+compile", "reference+compile"] if args.compile else [])
    providers += ["fast+documents", "reference+documents"] if args.documents else []
    providers += ["fast+distill", "reference+distill"] if args.distill else []
    providers += ["fast+checkpoint", "fast+selective"] if args.checkpointing else []
    providers += ["fast+qat"] if args.qat else []
    if args.float8:
        from apr_kernels.train import float8

        try:
            float8.check("tensorwise", dev)
            providers += [p for p in ("fast+compile", "fast+float8+compile") if p not in providers]
        except ValueError as exc:
            print(f"float8 rows not run: {exc}")
    for provider in providers:
        r = measure(cfg, provider, batch, seq, warmup, steps, dev, args.documents)
        tflops = flops_tok * r["tokens_per_s"] / 1e12
        rows.append({"op": "train_step", "preset": name, "layers": cfg.num_layers, "B": batch, "S": seq,
                     "dtype": dtype, "provider": provider, "ms": r["ms"], "tokens_per_s": r["tokens_per_s"],
                     "tflops": tflops, "mfu": tflops / peak,
                     "mfu_datasheet": tflops / datasheet if datasheet else None, "peak_mem_mb": r["peak_mem_mb"],
                     "loss": r["last_loss"], "profile": r["profile"]})
    fast, ref = rows[0], rows[1]
    profiles = {row["provider"]: row.pop("profile") for row in rows}
    _common.print_table(rows, ["provider", "ms", "tokens_per_s", "tflops", "mfu", "mfu_datasheet", "peak_mem_mb"])
    for provider, prof in profiles.items():
        if prof:
            print(f"{provider}: where one step's time goes ({'GPU kernels' if dev.type == 'cuda' else 'CPU ops'})")
            _common.print_table(prof[:8], ["kernel", "calls", "ms", "share"])
    print(f"fast / reference: {ref['ms'] / fast['ms']:.2f}x tokens/s; MFU {fast['mfu']:.1%} vs {ref['mfu']:.1%} "
          f"(of the measured matmul peak)"
          + (f", {fast['mfu_datasheet']:.1%} vs {ref['mfu_datasheet']:.1%} of the {datasheet:.0f} TFLOP/s "
             f"datasheet" if datasheet else ""))
    path = _common.write_results("train", rows, args.out,
                                 {"ours": "fast", "peak_tflops": peak, "datasheet_tflops": datasheet,
                                  "ceilings": {"matmul_tflops": peak},
                                  "flops_per_token": flops_tok, "preset": name, "kernel_profile": profiles})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
