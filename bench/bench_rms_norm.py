"""RMSNorm and fused residual-add RMSNorm, forward and backward: GB/s against the copy ceiling.

    python3 bench/bench_rms_norm.py [--smoke | --quick] [--out DIR] [--no-compile] [--budget-s S]
    python3 bench/bench_rms_norm.py --tune        # GPU: sweep the kernels' launch configs instead

Providers, all bf16 on the GPU and timed in one run on one device:
  apr            apr_kernels.rms_norm / add_rms_norm (the Triton kernels on CUDA)
  torch          torch.nn.functional.rms_norm (PyTorch's fused kernel; fused add = x + r, then it)
  hf             the Hugging Face LlamaRMSNorm forward in eager mode (the numerics apr matches)
  torch_compile  torch.compile of the same HF function (rows dynamic, hidden static)
  liger          Liger-Kernel's LigerRMSNorm / LigerFusedAddRMSNorm, when importable

Bytes are the compulsory traffic of bench/README.md (M rows, N hidden, e bytes per element):
fwd 2·M·N·e, bwd 3·M·N·e (read dy, x; write dx), fused-add fwd 4·M·N·e (read x, r; write y, s),
fused-add bwd 4·M·N·e (read dy, s, ds; write dx). The backward is timed alone
(``torch.autograd.grad`` on a retained graph). Each row stores ms, GB/s, the fraction of the copy
bandwidth measured in this run (``pct_copy``), and apr rows the speed-up over each baseline.
The JSON is rewritten after every shape, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import time

import _common
import torch
import torch.nn.functional as F

import apr_kernels

try:  # after apr_kernels: it turns Triton's interpreter on first where it must
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001  (the launch floor is then not measured)
    triton = tl = None

EPS = 1e-6

if triton is not None:

    @triton.jit
    def _empty_fwd(X, R, Y, S, W, RSTD, stride_x, stride_r, stride_y, stride_s, M, N, eps,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                   STORE_RSTD: tl.constexpr):  # fmt: skip
        # apr's forward signature with nothing to do: the launch floor
        pass


def sweep(args) -> tuple[list[int], list[int]]:
    """(hidden sizes, row counts) for the chosen mode."""
    if args.smoke:
        return [96, 1000], [64]
    if args.quick:
        return [896, 4096, 8192], [16384]
    return [896, 2048, 4096, 5120, 8192], [4096, 16384, 65536]


# --------------------------------------------------------------------------------- providers
# Each provider builds (norm, add_norm) callables: norm(x, w) -> y, add_norm(x, r, w) -> (y, s).


def _hf(x, w):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    return w * h.to(x.dtype)


def _hf_add(x, r, w):
    s = x + r
    return _hf(s, w), s


def _torch(x, w):
    return F.rms_norm(x, (x.shape[-1],), w, EPS)


def _torch_add(x, r, w):
    s = x + r
    return _torch(s, w), s


def _compiled():
    cfg = torch._dynamo.config
    cfg.automatic_dynamic_shapes = False  # hidden stays static; rows are marked dynamic below
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, 64)
    # the bench re-runs one backward on a retained graph, which donated buffers forbid
    torch._functorch.config.donated_buffer = False
    norm, add = torch.compile(_hf), torch.compile(_hf_add)

    def dyn(fn):
        def call(*ts):
            for t in ts[:-1]:
                torch._dynamo.mark_dynamic(t, 0)
            return fn(*ts)

        return call

    return dyn(norm), dyn(add)


def _liger():
    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
    except Exception:
        return None
    try:
        from liger_kernel.transformers.fused_add_rms_norm import LigerFusedAddRMSNorm
    except Exception:
        LigerFusedAddRMSNorm = None
    cache: dict = {}

    def module(cls, w):
        key = (cls, w.shape[0], w.dtype, w.device)
        if key not in cache:
            cache[key] = cls(w.shape[0], eps=EPS).to(w.device, w.dtype)
        m = cache[key]
        # the bench's own w, not nn.Parameter(w) (a new leaf that autograd.grad w.r.t. w never
        # reaches: "One of the differentiated Tensors appears to not have been used")
        m._parameters["weight"] = w
        return m

    def norm(x, w):
        return module(LigerRMSNorm, w)(x)

    def add(x, r, w):
        return module(LigerFusedAddRMSNorm, w)(x, r)

    return norm, (add if LigerFusedAddRMSNorm is not None else None)


def providers(args) -> dict:
    out = {"apr": (apr_kernels.rms_norm, apr_kernels.add_rms_norm), "torch": (_torch, _torch_add),
           "hf": (_hf, _hf_add)}
    liger = _liger()
    if liger is not None and _common.device().type == "cuda":
        out["liger"] = liger
    if not args.no_compile and not args.smoke:
        out["torch_compile"] = _compiled()
    return out


# ------------------------------------------------------------------------------------ timing


def measure(fn_pair, op: str, m: int, n: int, dtype, dev, rep: int) -> dict[str, float]:
    """ms of the forward and of the backward alone for one provider and shape."""
    norm, add = fn_pair
    fn = norm if op == "rms_norm" else add
    if fn is None:
        return {}
    x = torch.randn(m, n, device=dev, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(n, device=dev)).to(dtype).requires_grad_()
    args = (x, w) if op == "rms_norm" else (x, torch.randn_like(x, requires_grad=True), w)
    # forward with autograd recording, as in training (and one compiled graph per shape class)
    fwd_ms = _common.time_ms(lambda: fn(*args), warmup=3, rep=rep, dev=dev)
    outs = fn(*args)
    outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
    grads = [torch.randn_like(o) for o in outs]
    bwd_ms = _common.time_ms(lambda: torch.autograd.grad(outs, args, grads, retain_graph=True),
                             warmup=3, rep=rep, dev=dev)
    return {"fwd": fwd_ms, "bwd": bwd_ms}


def graph_ms(fn, rep: int, dev) -> float:
    """Kernel-only ms of ``fn()``: captured once in a CUDA graph, replayed ``rep`` times between two
    events (no Python, no launcher: what the GPU itself spends)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles, caches) off the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(rep):
        g.replay()
    end.record()
    end.synchronize()
    del g
    return start.elapsed_time(end) / rep


def measure_graph(fn_pair, op: str, m: int, n: int, dtype, dev, rep: int) -> dict[str, float]:
    """Graph-replay ms of the forward (autograd recording, as in training) and of the backward
    (forward + backward graph minus the forward graph: the backward is captured with its forward)."""
    norm, add = fn_pair
    fn = norm if op == "rms_norm" else add
    x = torch.randn(m, n, device=dev, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(n, device=dev)).to(dtype).requires_grad_()
    args = (x, w) if op == "rms_norm" else (x, torch.randn_like(x, requires_grad=True), w)
    grads = [torch.randn_like(x) for _ in range(1 if op == "rms_norm" else 2)]

    def fwd_bwd():
        outs = fn(*args)
        outs = (outs,) if isinstance(outs, torch.Tensor) else tuple(outs)
        torch.autograd.grad(outs, args, grads)

    fwd = graph_ms(lambda: fn(*args), rep, dev)
    return {"fwd": fwd, "bwd": max(graph_ms(fwd_bwd, rep, dev) - fwd, 0.0)}


def launch_floor(m: int, n: int, dtype, dev, rep: int) -> dict[str, float]:
    """ms of an empty Triton kernel with apr's forward signature and grid (same tensors, ints,
    constexprs), timed like the eager rows: Triton's JIT launch path, and apr's cached launch."""
    from apr_kernels import backend

    k = backend.kernels("rms_norm")
    cfg = k.launch_config(m, n)
    x = torch.randn(m, n, device=dev, dtype=dtype)
    y, w = torch.empty_like(x), torch.ones(n, device=dev, dtype=dtype)
    rstd = torch.empty(m, device=dev, dtype=torch.float32)
    args = (x, None, y, None, w, rstd, n, 0, n, 0, m, n, 1e-6)
    consts = (cfg.block_m, cfg.block_n, False, True)
    grid = -(-m // cfg.block_m)
    floor = {"triton_jit": _common.time_ms(lambda: _empty_fwd[(grid,)](*args, *consts, num_warps=cfg.num_warps),
                                           rep=rep, dev=dev)}
    saved, k._FAST_LAUNCH = k._FAST_LAUNCH, True  # the opt-in cached launch (APR_KERNELS_FAST_LAUNCH=1)
    try:
        floor["apr_launch"] = _common.time_ms(lambda: k._launch(_empty_fwd, grid, args, consts, cfg.num_warps, True),
                                              rep=rep, dev=dev)
    finally:
        k._FAST_LAUNCH = saved
    return floor


def nbytes(op: str, mode: str, m: int, n: int, elem: int) -> int:
    per = {("rms_norm", "fwd"): 2, ("rms_norm", "bwd"): 3, ("add_rms_norm", "fwd"): 4,
           ("add_rms_norm", "bwd"): 4}[(op, mode)]
    return per * m * n * elem


def main() -> None:
    args = _common.parse_args(
        __doc__.splitlines()[0],
        lambda p: (p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider"),
                   p.add_argument("--budget-s", type=float, default=None,
                                  help="stop starting new shapes after this many seconds "
                                       "(default 60 full, 20 quick, 30 smoke: the shape under way "
                                       "still finishes, so full stays under ~75 s and quick ~30 s)"),
                   p.add_argument("--tune", action="store_true",
                                  help="time apr's kernels over launch configs (block_m, warps, "
                                       "programs/SM) next to launch_config's pick; ~90 s on a GPU")),
    )
    if args.tune:
        return tune(args)
    dev = _common.device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elem = torch.empty((), dtype=dtype).element_size()
    budget = args.budget_s or (30 if args.smoke else 20 if args.quick else 60)
    start = time.perf_counter()
    copy_gbs = _common.copy_bandwidth_gbs((512 << 20) if dev.type == "cuda" else (8 << 20), dev=dev)
    provs = providers(args)
    hidden, row_counts = sweep(args)
    rep = 3 if args.smoke else 20
    rows: list[dict] = []
    meta = {"ours": "apr", "copy_gbs": copy_gbs, "ceilings": {"copy_gbs": copy_gbs}, "providers": list(provs),
            "eps": EPS, "skipped": [], "failed": [],
            "timing": "rows of op rms_norm/add_rms_norm: eager, CUDA events around each call (host "
                      "launch overhead included: the headline); op ...[graph]: CUDA graph replay, "
                      "kernel time only; op launch_floor: an empty Triton kernel with apr's forward "
                      "signature (triton_jit: Triton's launch path; apr_launch: apr's cached launch)"}
    print(f"copy bandwidth {copy_gbs:.0f} GB/s; providers {', '.join(provs)}; dtype {dtype}")
    # Provider by provider (torch.compile last: its compiles are the slow part), so a spent time
    # budget drops the tail of one provider rather than whole shapes of all of them.
    for name, pair in provs.items():
        for n in hidden:
            for m in row_counts:
                if time.perf_counter() - start > budget:
                    meta["skipped"].append(f"{name} {m}x{n}")
                    continue
                graph = dev.type == "cuda" and name in ("apr", "torch")
                for op in ("rms_norm", "add_rms_norm"):
                    for how, fn in (("", measure), ("[graph]", measure_graph if graph else None)):
                        if fn is None:
                            continue
                        try:  # a provider that fails is recorded and skipped, never ends the bench
                            res = fn(pair, op, m, n, dtype, dev, rep)
                        except Exception as e:  # noqa: BLE001
                            meta["failed"].append(f"{name} {op}{how} {m}x{n}: {type(e).__name__}: {str(e)[:200]}")
                            print(f"FAILED {meta['failed'][-1]}")
                            continue
                        for mode, ms in res.items():
                            b = nbytes(op, mode, m, n, elem)
                            gbs = b / (ms * 1e-3) / 1e9 if ms > 0 else None
                            rows.append({"op": op + how, "mode": mode, "shape": f"{m}x{n}", "dtype": str(dtype)[6:],
                                         "provider": name, "ms": ms, "bytes": b, "gbs": gbs,
                                         "pct_copy": gbs / copy_gbs if gbs else None})
                if name == "apr" and dev.type == "cuda":
                    try:
                        for prov, ms in launch_floor(m, n, dtype, dev, rep).items():
                            rows.append({"op": "launch_floor", "mode": "fwd", "shape": f"{m}x{n}",
                                         "dtype": str(dtype)[6:], "provider": prov, "ms": ms})
                    except Exception as e:  # noqa: BLE001
                        meta["failed"].append(f"launch_floor {m}x{n}: {type(e).__name__}: {str(e)[:200]}")
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            _speedups(rows)
            path = _common.write_results("rms_norm", rows, args.out, meta)  # rewritten as it goes
    _speedups(rows)
    path = _common.write_results("rms_norm", rows, args.out, meta)
    _print(rows, list(provs))
    if meta["failed"]:
        print("failed (skipped):\n  " + "\n  ".join(meta["failed"]))
    if meta["skipped"]:
        print(f"time budget {budget:.0f}s spent, not measured: {', '.join(meta['skipped'])}")
    print(f"wrote {path} ({time.perf_counter() - start:.1f}s)")


def _speedups(rows: list[dict]) -> None:
    """On apr rows: ``x_vs_<provider>`` = provider ms / apr ms for the same op, mode and shape."""
    by_key = {}
    for r in rows:
        by_key.setdefault((r["op"], r["mode"], r["shape"]), []).append(r)
    for group in by_key.values():
        for r in group:
            if r["provider"] == "apr":
                r.update({f"x_vs_{o['provider']}": o["ms"] / r["ms"] for o in group if o["provider"] != "apr"})


def tune(args) -> None:
    """Time the launchers directly over a small grid of RowConfigs (bf16, M = 16384 rows) and print
    the best next to launch_config's choice: the data for retuning the one heuristic."""
    from apr_kernels import backend

    dev = _common.device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    k = backend.kernels("rms_norm")
    m = 64 if args.smoke else 16384
    rows = []
    for n in ([96] if args.smoke else [896, 2048, 4096, 8192]):
        x = torch.randn(m, n, device=dev, dtype=dtype)
        w = torch.randn(n, device=dev, dtype=dtype)
        dy = torch.randn_like(x)
        base, bbase = k.launch_config(m, n), k.launch_config(m, n, True)
        fwd_cfgs = {base} | {k.RowConfig(bm, base.block_n, nw, base.programs_per_sm)
                             for bm in (1, 2, 4, 8, 16) for nw in (2, 4, 8, 16, 32)
                             if 1024 <= bm * base.block_n <= 16384 and 32 * nw <= bm * base.block_n // 2}
        for cfg in sorted(fwd_cfgs, key=lambda c: (c.block_m, c.num_warps)):
            ms = _common.time_ms(lambda: k.rms_norm_fwd(x, w, config=cfg), rep=20, dev=dev)
            rows.append(_tune_row("fwd", m, n, cfg, cfg == base, ms, nbytes("rms_norm", "fwd", m, n, x.element_size())))
        best = min((r for r in rows if r["mode"] == "fwd" and r["N"] == n), key=lambda r: r["ms"])
        rstd = k.rms_norm_fwd(x, w)[1]
        bwd_cfgs = {bbase} | {k.RowConfig(bm, base.block_n, nw, pps) for bm in {best["block_m"], bbase.block_m}
                              for nw in {best["num_warps"], bbase.num_warps} for pps in (1, 2, 4, 8)}
        for cfg in sorted(bwd_cfgs, key=lambda c: (c.block_m, c.num_warps, c.programs_per_sm)):
            ms = _common.time_ms(lambda: k.rms_norm_bwd(dy, x, w, rstd, config=cfg), rep=20, dev=dev)
            rows.append(_tune_row("bwd", m, n, cfg, cfg == bbase, ms, nbytes("rms_norm", "bwd", m, n, x.element_size())))
    for r in sorted(rows, key=lambda r: (r["mode"], r["N"], r["ms"])):
        r["rank"] = 1 + sum(o["mode"] == r["mode"] and o["N"] == r["N"] and o["ms"] < r["ms"] for o in rows)
    _common.print_table([r for r in rows if r["rank"] <= 3 or r["heuristic"]],
                        ["mode", "shape", "block_m", "num_warps", "programs_per_sm", "heuristic", "rank", "ms", "gbs"])
    print(f"wrote {_common.write_results('rms_norm_tune', rows, args.out, {'ours': 'apr'})}")


def _tune_row(mode, m, n, cfg, is_base, ms, b) -> dict:
    return {"op": "rms_norm_tune", "mode": mode, "shape": f"{m}x{n}", "N": n, "block_m": cfg.block_m,
            "num_warps": cfg.num_warps, "programs_per_sm": cfg.programs_per_sm, "heuristic": is_base,
            "provider": "apr" if is_base else f"apr[bm{cfg.block_m} w{cfg.num_warps} p{cfg.programs_per_sm}]",
            "ms": ms, "bytes": b, "gbs": b / (ms * 1e-3) / 1e9}


def _print(rows: list[dict], names: list[str]) -> None:
    """One line per (op, mode, shape): GB/s per provider, apr's % of copy, apr's speed-up vs each."""
    table = {}
    for r in rows:
        key = (r["op"], r["mode"], r["shape"])
        table.setdefault(key, {"op": r["op"], "mode": r["mode"], "shape": r["shape"]})
        table[key][f"{r['provider']} GB/s"] = r.get("gbs")
        table[key][f"{r['provider']} ms"] = r["ms"]
        if r["provider"] == "apr":
            table[key]["apr %copy"] = 100 * r["pct_copy"]
            for k, v in r.items():
                if k.startswith("x_vs_"):
                    table[key][k] = v
    cols = ["op", "mode", "shape", "apr %copy"] + [f"{p} GB/s" for p in names] + ["apr ms", "torch ms"]
    cols += [f"x_vs_{p}" for p in names if p != "apr"] + ["triton_jit ms", "apr_launch ms"]
    _common.print_table(list(table.values()), cols)


if __name__ == "__main__":
    main()
