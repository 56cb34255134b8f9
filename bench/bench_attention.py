"""Causal GQA attention, forward and forward+backward: TFLOP/s and peak memory against PyTorch SDPA.

    python3 bench/bench_attention.py [--smoke | --quick] [--out DIR] [--budget SECONDS]
    python3 bench/bench_attention.py --tune      # GPU: time every candidate launch config per kernel

Shapes: the head layouts of Qwen2-0.5B (Hq 14, Hkv 2, D 64) and Llama-3-8B (32/8, D 128), bf16,
S = 512 .. 8192 with B·S = 16384 tokens per batch, causal, layout [B, S, H, D] (what the projections
produce; SDPA gets [B, H, S, D] views of the same storage). Providers, timed in one run on one device:

  apr                 apr_kernels.attention (the Triton kernels on CUDA; K/V never expanded)
  sdpa_flash_gqa      F.scaled_dot_product_attention(enable_gqa=True), FLASH backend forced
  sdpa_flash_expand   the same on K/V expanded to Hq heads (repeat_interleave inside the timed step)
  sdpa_cudnn_gqa      CUDNN_ATTENTION backend with enable_gqa (skipped where it refuses the input)
  sdpa_cudnn_expand   CUDNN_ATTENTION on expanded K/V
  sdpa_math           (--smoke / CPU only) the default SDPA on CPU
  apr_autotuned       (full mode, two shapes, time permitting) apr with APR_KERNELS_AUTOTUNE=1: every
                      candidate launch config timed per kernel; the winners and all timings go to
                      attention_tune-*.json (kinds fwd / dkdv / dq; per-kernel FLOPs: 2, 4, 3 matmuls)

Packed documents (document masking, ``attention(..., cu_seqlens=)``): the Qwen2-0.5B heads over 8 rows
of 2048 tokens holding documents of random lengths (mean ~500, seeded), forward+backward. Providers:

  apr_varlen          apr_kernels.attention on the packed [T, H, D] tokens with cu_seqlens
  apr_unmasked        the same tokens as dense causal rows (what training without the mask costs)
  sdpa_mask_expand    SDPA with the [B, 1, S, S] same-document causal mask (what eager code does;
                      expanded K/V, as the masked SDPA backends need)
  flex_document       FlexAttention with a document block mask (compiled; skipped if unavailable)

FLOPs of the packed rows: the sum over documents of 4·Hq·L²·D/2 (what is needed), for every provider.

Sliding window (``attention(..., window=W)``, Mistral's ``sliding_window``): the Mistral-7B heads
(32/8, D 128), B 2, S 8192, W 4096, forward+backward. Providers:

  apr_window          apr_kernels.attention with window=W (key blocks before the window skipped)
  apr_causal          the same without the window (what attending to everything costs)
  sdpa_mask_gqa       SDPA with the [S, S] causal band mask and enable_gqa (what eager code does)
  flex_window         FlexAttention with a sliding-window block mask (compiled; skipped if unavailable)

FLOPs of the window rows: 4·B·Hq·D·Σ_i min(i + 1, W) (the visible pairs), for every provider.

A chunk against its prefix (``attention(q, k, v)`` with k/v longer than q, causal bottom-right: what
each rank of ``train --context-parallel`` computes per chunk): the Llama-3-8B heads, the last of 4
chunks of a 16384-token row, 4096 queries against 16384 keys, B 1, forward+backward. Providers:

  apr_prefix          apr_kernels.attention(q, k, v) with Sk > Sq
  sdpa_lower_right    SDPA with torch.nn.attention.bias.causal_lower_right (K/V expanded: the bias
                      takes no enable_gqa)
  sdpa_mask_gqa       SDPA with the explicit [Sq, Sk] boolean mask and enable_gqa

FLOPs of the prefix rows: 4·B·Hq·D·Σ_i (Sk - Sq + i + 1) (the visible pairs), for every provider.

--quick keeps apr and the two enable_gqa SDPA backends (no expanded K/V) with fewer repetitions.
A time budget (--budget, default 30 s quick / 95 s full, from the start of the run) is checked
before each shape: what does not fit is skipped with a note. Order: S 1024 and 4096 (both models),
then (full, CUDA) the autotune comparison, then S 2048, 8192, 512.

FLOPs (reference/kernels.md 1.2): fwd = 4·B·Hq·S²·D / 2 (causal), fwd+bwd = 3.5 × fwd. The fwd+bwd step
is ``o = attn(q, k, v); torch.autograd.grad(o, (q, k, v), do)``; its peak memory (MiB above the
inputs) is recorded on the fwd+bwd rows. ``vs_best_sdpa`` on apr rows = best SDPA ms / apr ms.
"""

from __future__ import annotations

import contextlib
import os
import time

import _common
import torch
import torch.nn.functional as F

import apr_kernels
from apr_kernels import backend

MODELS = {"qwen2-0.5b": (14, 2, 64), "llama-3-8b": (32, 8, 128)}
TOKENS = 16384


TUNE_SHAPES = (("qwen2-0.5b", 2048), ("llama-3-8b", 4096))  # those of the H200 sweep (2026-11-28)
T0 = time.monotonic()


def sweep(args) -> list[tuple[str, int, int]]:
    """(model, B, S) triples for the chosen mode, most important first (a spent budget drops the tail)."""
    if args.smoke:
        return [("qwen2-0.5b", 1, 64), ("llama-3-8b", 1, 48)]
    first = [1024, 4096]
    seqs = first if args.quick else first + [2048, 8192, 512]
    return [(m, TOKENS // s, s) for s in seqs for m in MODELS]


def budget_s(args) -> float:
    if args.budget is not None:
        return args.budget
    return 1e9 if args.smoke else 30.0 if args.quick else 95.0


def left_s(args) -> float:
    return budget_s(args) - (time.monotonic() - T0)


# --------------------------------------------------------------------------------- providers


def _sdpa(be_name, expand: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = getattr(SDPBackend, be_name) if be_name else None

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


def _apr(q, k, v):
    return apr_kernels.attention(q, k, v, causal=True)


def providers(dev: torch.device, quick: bool = False) -> dict:
    out = {"apr": _apr}
    if dev.type == "cuda":
        for name, be in (("cudnn", "CUDNN_ATTENTION"), ("flash", "FLASH_ATTENTION")):
            out[f"sdpa_{name}_gqa"] = _sdpa(be, expand=False)
        if not quick:  # the expanded-K/V baselines matter for peak memory, not for speed
            for name, be in (("cudnn", "CUDNN_ATTENTION"), ("flash", "FLASH_ATTENTION")):
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
    """fwd ms, fwd+bwd ms and the fwd+bwd step's peak memory for one provider. One untimed step
    first compiles (or autotunes) every kernel and fails early if a backend refuses the input;
    its wall time is reported as ``warm_s``."""
    do = torch.randn(q.shape, device=dev, dtype=q.dtype)

    def step():
        o = fn(q, k, v)
        return torch.autograd.grad(o, (q, k, v), do)

    t0 = time.monotonic()
    step()
    _common.sync(dev)
    warm_s = time.monotonic() - t0
    fwd = _common.time_ms(lambda: fn(q, k, v), warmup=1, rep=rep, dev=dev)
    both = _common.time_ms(step, warmup=1, rep=rep, dev=dev)
    return {"fwd": fwd, "fwd+bwd": both, "mem": _common.peak_memory_mb(step, dev), "warm_s": warm_s}


def shape_rows(model, B, S, provs: dict, dev, dtype, rep) -> list[dict]:
    """Rows (fwd and fwd+bwd per provider) for one shape; vs_best_sdpa on the apr rows."""
    hq, hkv, d = MODELS[model]
    q, k, v = inputs(B, S, hq, hkv, d, dtype, dev)
    f1 = flops_fwd(B, S, hq, d)
    out = []
    for name, fn in provs.items():
        try:
            m = measure(fn, q, k, v, dev, rep)
        except RuntimeError as e:  # e.g. "No available kernel" for a forced SDPA backend
            print(f"  {model} S={S} {name}: skipped ({str(e).splitlines()[0][:100]})")
            continue
        for mode, flops in (("fwd", f1), ("fwd+bwd", 3.5 * f1)):
            row = {"op": "attention", "mode": mode, "model": model, "B": B, "S": S, "Hq": hq, "Hkv": hkv,
                   "D": d, "causal": True, "dtype": str(dtype).replace("torch.", ""), "provider": name,
                   "ms": m[mode], "flops": flops, "tflops": flops / (m[mode] * 1e-3) / 1e12,
                   "warm_s": m["warm_s"]}
            if mode == "fwd+bwd" and m["mem"] is not None:
                row["peak_mem_mb"] = m["mem"]
            out.append(row)
    for mode in ("fwd", "fwd+bwd"):
        sdpa = [r["ms"] for r in out if r["mode"] == mode and r["provider"].startswith("sdpa")]
        for r in out:
            if r["mode"] == mode and r["provider"].startswith("apr") and sdpa:
                r["vs_best_sdpa"] = min(sdpa) / r["ms"]
    return out


def run_shapes(args, dev, dtype, rows: list, shapes=None) -> None:
    rep = 3 if args.smoke else 5 if args.quick else 10
    provs = providers(dev, quick=args.quick)
    for model, B, S in shapes or sweep(args):
        if left_s(args) <= 0:
            print(f"  {model} S={S}: skipped (time budget of {budget_s(args):.0f} s spent)")
            continue
        t0 = time.monotonic()
        rows.extend(shape_rows(model, B, S, provs, dev, dtype, rep))
        print(f"  {model} B={B} S={S}: {time.monotonic() - t0:.1f} s", flush=True)
        if args.out or not args.smoke:  # keep what was measured if the run is cut short
            _common.write_results("attention", rows, args.out)


# ---------------------------------------------------------------------------- packed documents


def document_lengths(B: int, S: int, seed: int = 0) -> list[list[int]]:
    """Per row, document lengths summing to S (exponential-like lengths, mean ~S/4, seeded)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        lengths, left = [], S
        while left > 0:
            n = min(left, 1 + int(torch.empty(1).exponential_(1.0, generator=g).item() * S / 4))
            lengths.append(n)
            left -= n
        rows.append(lengths)
    return rows


def document_providers(dev: torch.device, B: int, S: int, rows: list[list[int]], flex: bool) -> tuple[dict, float]:
    """Providers over [B, S, H, D] inputs and the FLOPs-per-head-dim factor sum(L^2). ``flex``: add
    FlexAttention (its first call compiles for tens of seconds)."""
    lengths = [n for r in rows for n in r]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    doc = torch.repeat_interleave(torch.arange(len(lengths), device=dev), torch.tensor(lengths, device=dev))
    doc = doc.view(B, S)
    mask = ((doc[:, :, None] == doc[:, None, :]) & torch.ones(S, S, dtype=torch.bool, device=dev).tril())[:, None]
    longest = max(lengths)

    def apr_varlen(q, k, v):
        flat = [t.view(B * S, t.shape[2], t.shape[3]) for t in (q, k, v)]
        return apr_kernels.attention(*flat, cu_seqlens=cu, max_seqlen=longest).view(q.shape)

    def sdpa_mask_expand(q, k, v):
        g = q.shape[2] // k.shape[2]
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        kt, vt = kt.repeat_interleave(g, dim=1), vt.repeat_interleave(g, dim=1)
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)

    provs = {"apr_varlen": apr_varlen, "apr_unmasked": _apr, "sdpa_mask_expand": sdpa_mask_expand}
    if dev.type == "cuda" and flex:
        flat_doc = doc.flatten()

        def same_doc_causal(b, h, qi, ki):
            return (flat_doc[b * S + qi] == flat_doc[b * S + ki]) & (ki <= qi)

        flex_provider(provs, "flex_document", same_doc_causal, B, S, dev)
    return provs, float(sum(n * n for n in lengths))


def flex_provider(provs: dict, name: str, mask_mod, B: int | None, S: int, dev) -> None:
    """Add FlexAttention with ``mask_mod``'s block mask as provider ``name`` (compiled; an optional
    baseline: skipped with a note where unavailable)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block = create_block_mask(mask_mod, B, None, S, S, device=dev)
        flex = torch.compile(flex_attention)

        def fn(q, k, v):
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            return flex(qt, kt, vt, block_mask=block, enable_gqa=True).transpose(1, 2)

        provs[name] = fn
    except Exception as e:  # noqa: BLE001 -- an optional baseline
        print(f"  {name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})")


def document_rows(args, dev, dtype, rows: list) -> None:
    if args.smoke:
        B, S = 2, 96
    else:
        B, S = 8, 2048
    if left_s(args) < (0 if args.smoke else 20):
        print(f"  packed documents: skipped ({left_s(args):.0f} s of the budget left)")
        return
    model = "qwen2-0.5b"
    hq, hkv, d = MODELS[model]
    t0 = time.monotonic()
    docs = document_lengths(B, S)
    provs, sum_sq = document_providers(dev, B, S, docs, flex=left_s(args) > 60)
    q, k, v = inputs(B, S, hq, hkv, d, dtype, dev)
    f1 = 4 * hq * d * sum_sq / 2
    rep = 3 if args.smoke else 5 if args.quick else 10
    fields = {"op": "attention_documents", "model": model, "B": B, "S": S, "Hq": hq, "Hkv": hkv, "D": d,
              "docs": sum(map(len, docs))}
    masked_rows(args, provs, (q, k, v), f1, fields, dev, dtype, rep, rows, "apr_varlen",
                ("sdpa_mask_expand", "flex_document"))
    print(f"  packed documents B={B} S={S} ({sum(map(len, docs))} documents): {time.monotonic() - t0:.1f} s",
          flush=True)


def masked_rows(args, provs: dict, qkv, f1: float, fields: dict, dev, dtype, rep: int, rows: list, ours: str,
                baselines: tuple) -> None:
    """Time each provider (fwd and fwd+bwd rows with ``fields``; ``f1``: forward FLOPs); ``ours`` rows
    get ``vs_best_masked`` = the fastest of ``baselines`` / ours."""
    new = []
    for name, fn in provs.items():
        try:
            m = measure(fn, *qkv, dev, rep)
        except Exception as e:  # noqa: BLE001 -- a backend refusing the input skips its row
            print(f"  {fields['op']} {name}: skipped ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:100] if str(e) else ''})")
            continue
        for mode, flops in (("fwd", f1), ("fwd+bwd", 3.5 * f1)):
            row = {**fields, "mode": mode, "dtype": str(dtype).replace("torch.", ""), "provider": name,
                   "ms": m[mode], "flops": flops, "tflops": flops / (m[mode] * 1e-3) / 1e12, "warm_s": m["warm_s"]}
            if mode == "fwd+bwd" and m["mem"] is not None:
                row["peak_mem_mb"] = m["mem"]
            new.append(row)
    for mode in ("fwd", "fwd+bwd"):
        others = [r["ms"] for r in new if r["mode"] == mode and r["provider"] in baselines]
        for r in new:
            if r["mode"] == mode and r["provider"] == ours and others:
                r["vs_best_masked"] = min(others) / r["ms"]
    rows.extend(new)
    if args.out or not args.smoke:  # keep what was measured if the run is cut short
        _common.write_results("attention", rows, args.out)


# ---------------------------------------------------------------------------- sliding window


def window_providers(dev: torch.device, S: int, W: int, flex: bool) -> dict:
    band = torch.ones(S, S, dtype=torch.bool, device=dev).tril() & ~torch.ones(S, S, dtype=torch.bool,
                                                                                 device=dev).tril(-W)

    def apr_window(q, k, v):
        return apr_kernels.attention(q, k, v, window=W)

    def sdpa_mask_gqa(q, k, v):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=band, enable_gqa=True).transpose(1, 2)

    provs = {"apr_window": apr_window, "apr_causal": _apr, "sdpa_mask_gqa": sdpa_mask_gqa}
    if dev.type == "cuda" and flex:
        flex_provider(provs, "flex_window", lambda b, h, qi, ki: (ki <= qi) & (qi - ki < W), None, S, dev)
    return provs


def window_rows(args, dev, dtype, rows: list) -> None:
    B, S, W = (1, 96, 24) if args.smoke else (2, 8192, 4096)
    if left_s(args) < (0 if args.smoke else 20):
        print(f"  sliding window: skipped ({left_s(args):.0f} s of the budget left)")
        return
    model = "mistral-7b"
    hq, hkv, d = MODELS["llama-3-8b"]  # Mistral 7B has the same heads: 32 query, 8 key/value, D 128
    t0 = time.monotonic()
    provs = window_providers(dev, S, W, flex=left_s(args) > 60)
    pairs = sum(min(i + 1, W) for i in range(S))
    fields = {"op": "attention_window", "model": model, "B": B, "S": S, "Hq": hq, "Hkv": hkv, "D": d, "window": W}
    rep = 3 if args.smoke else 5 if args.quick else 10
    masked_rows(args, provs, inputs(B, S, hq, hkv, d, dtype, dev), 4 * B * hq * d * pairs, fields, dev, dtype,
                rep, rows, "apr_window", ("sdpa_mask_gqa", "flex_window"))
    print(f"  sliding window B={B} S={S} W={W}: {time.monotonic() - t0:.1f} s", flush=True)


# ------------------------------------------------------------------------ a chunk against its prefix


def prefix_providers(dev: torch.device, sq: int, sk: int) -> dict:
    i = torch.arange(sq, device=dev)[:, None] + (sk - sq)
    visible = torch.arange(sk, device=dev)[None, :] <= i

    def apr_prefix(q, k, v):
        return apr_kernels.attention(q, k, v)

    def sdpa_lower_right(q, k, v):
        from torch.nn.attention.bias import causal_lower_right

        g = q.shape[2] // k.shape[2]
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        kt, vt = kt.repeat_interleave(g, dim=1), vt.repeat_interleave(g, dim=1)
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=causal_lower_right(sq, sk)).transpose(1, 2)

    def sdpa_mask_gqa(q, k, v):
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=visible, enable_gqa=True).transpose(1, 2)

    return {"apr_prefix": apr_prefix, "sdpa_lower_right": sdpa_lower_right, "sdpa_mask_gqa": sdpa_mask_gqa}


def prefix_rows(args, dev, dtype, rows: list) -> None:
    B, sq, sk = (1, 32, 96) if args.smoke else (1, 4096, 16384)
    if left_s(args) < (0 if args.smoke else 20):
        print(f"  chunk against its prefix: skipped ({left_s(args):.0f} s of the budget left)")
        return
    hq, hkv, d = MODELS["llama-3-8b"]
    t0 = time.monotonic()
    q = inputs(B, sq, hq, hkv, d, dtype, dev)[0]
    _, k, v = inputs(B, sk, hq, hkv, d, dtype, dev)
    pairs = sum(sk - sq + i + 1 for i in range(sq))
    fields = {"op": "attention_prefix", "model": "llama-3-8b", "B": B, "S": sq, "Sk": sk, "Hq": hq, "Hkv": hkv, "D": d}
    rep = 3 if args.smoke else 5 if args.quick else 10
    masked_rows(args, prefix_providers(dev, sq, sk), (q, k, v), 4 * B * hq * d * pairs, fields, dev, dtype, rep,
                rows, "apr_prefix", ("sdpa_lower_right", "sdpa_mask_gqa"))
    print(f"  chunk against its prefix B={B} Sq={sq} Sk={sk}: {time.monotonic() - t0:.1f} s", flush=True)


# -------------------------------------------------------------------------------------- tune


@contextlib.contextmanager
def _autotune_on():
    prev = os.environ.get("APR_KERNELS_AUTOTUNE")
    os.environ["APR_KERNELS_AUTOTUNE"] = "1"
    try:
        yield
    finally:
        if prev is None:
            del os.environ["APR_KERNELS_AUTOTUNE"]
        else:
            os.environ["APR_KERNELS_AUTOTUNE"] = prev


def tune_rows(log: list[dict]) -> list[dict]:
    """Rows of the per-kernel candidate timings the autotune recorded (tuned_log())."""
    out = []
    for rec in log:
        dtype, B, S, hq, hkv, d, causal = rec["key"][:7]  # (then: varlen)
        model = next((m for m, h in MODELS.items() if h == (hq, hkv, d)), f"{hq}/{hkv}/{d}")
        flops = flops_fwd(B, S, hq, d) * {"fwd": 1.0, "dkdv": 2.0, "dq": 1.5}[rec["kind"]] * (1 if causal else 2)
        for name, ms in rec["ms"].items():
            if ms == float("inf"):
                print(f"  {model} S={S} {rec['kind']} {name}: failed ({rec['errors'].get(name, '?')})")
                continue
            out.append({"op": f"attention_tune_{rec['kind']}", "mode": "fwd" if rec["kind"] == "fwd" else "bwd",
                        "model": model, "B": B, "S": S, "D": d, "causal": causal, "dtype": dtype,
                        "config": name, "default": name == rec["default"], "best": name == rec["best"],
                        "provider": "apr", "ms": ms, "flops": flops, "tflops": flops / (ms * 1e-3) / 1e12})
    for r in out:
        flag = " default" if r["default"] else ""
        flag += " BEST" if r["best"] else ""
        print(f"  {r['model']} S={r['S']} {r['op'][15:]:4s} {r['config']:12s} {r['ms']:8.3f} ms "
              f"{r['tflops']:6.1f} TFLOP/s{flag}")
    return out


def tune(args, dev, dtype, rows: list) -> None:
    """Every candidate launch config of each kernel, timed by the autotune on the sweep's shapes."""
    kern = backend.kernels("attention_tuning")
    kern.clear_tuned()
    for model, S in TUNE_SHAPES:
        hq, hkv, d = MODELS[model]
        q, k, v = inputs(TOKENS // S, S, hq, hkv, d, dtype, dev)
        with _autotune_on():
            o = _apr(q, k, v)
            torch.autograd.grad(o, (q, k, v), torch.randn_like(o))
    _common.sync(dev)
    rows.extend(tune_rows(kern.tuned_log()))


def autotune_vs_default(args, dev, dtype, rows: list, tune_log_rows: list) -> None:
    """Full mode, time permitting: apr with the autotune against the default table (same shapes as
    the default-table rows, so report.py puts them side by side)."""
    kern = backend.kernels("attention_tuning")
    rep = 10
    for model, S in TUNE_SHAPES:
        if left_s(args) < 30:  # the autotune compiles ~13 configs per head_dim (~1-2 s each)
            print(f"  autotune {model} S={S}: skipped ({left_s(args):.0f} s of the budget left)")
            continue
        t0 = time.monotonic()
        n0 = len(kern.tuned_log())
        with _autotune_on():
            new = shape_rows(model, TOKENS // S, S, {"apr_autotuned": _apr}, dev, dtype, rep)
        rows.extend(new)
        tune_log_rows.extend(tune_rows(kern.tuned_log()[n0:]))
        print(f"  autotune {model} S={S}: {time.monotonic() - t0:.1f} s", flush=True)
        _common.write_results("attention", rows, args.out)
        _common.write_results("attention_tune", tune_log_rows, args.out)


def main() -> None:
    def extra(p):
        p.add_argument("--tune", action="store_true", help="GPU: time every candidate launch config")
        p.add_argument("--budget", type=float, default=None,
                       help="seconds for the whole run (default 30 quick, 95 full, none smoke)")

    args = _common.parse_args(__doc__.splitlines()[0], extra)
    dev = _common.device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows: list[dict] = []
    if args.tune:
        if dev.type != "cuda":
            raise SystemExit("bench_attention.py --tune needs a CUDA GPU")
        tune(args, dev, dtype, rows)
        path = _common.write_results("attention_tune", rows, args.out)
    else:
        shapes = sweep(args)
        if dev.type == "cuda" and not args.quick and not args.smoke:
            # the core shapes, packed documents, the autotune comparison (what the next table should
            # be), then the rest
            run_shapes(args, dev, dtype, rows, shapes[:4])
            document_rows(args, dev, dtype, rows)
            window_rows(args, dev, dtype, rows)
            prefix_rows(args, dev, dtype, rows)
            autotune_vs_default(args, dev, dtype, rows, [])
            run_shapes(args, dev, dtype, rows, shapes[4:])
        else:
            run_shapes(args, dev, dtype, rows, shapes)
            document_rows(args, dev, dtype, rows)
            window_rows(args, dev, dtype, rows)
            prefix_rows(args, dev, dtype, rows)
        path = _common.write_results("attention", rows, args.out)
        cols = ["op", "model", "S", "mode", "provider", "ms", "tflops", "peak_mem_mb", "vs_best_sdpa",
                "vs_best_masked"]
        _common.print_table(rows, cols)
    print(f"wrote {path} ({time.monotonic() - T0:.0f} s)")


if __name__ == "__main__":
    main()
