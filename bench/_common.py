"""Shared benchmark plumbing: argument parsing, timing, device facts and result files.

Every bench script uses the same three flags:
  --smoke   tiny sizes on whatever device is there (CI runs this on CPU so no script rots);
  --quick   a reduced GPU sweep (the GPU check's 2-minute mode);
  --out DIR where the JSON result goes (default: $OUT when set, else bench/results/).
and writes one JSON file ``<name>-<device>-<date>.json`` holding ``meta`` and a list of ``rows``.
Ratios are always computed between providers measured in the same run on the same device.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None):
    p = argparse.ArgumentParser(description=description)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="tiny sizes, any device (CI)")
    mode.add_argument("--quick", action="store_true", help="reduced sweep (about a third of the time)")
    p.add_argument("--out", type=Path, default=None, help="result folder (default $OUT or bench/results)")
    if extra:
        extra(p)
    return p.parse_args()


def run_children(argvs: list[list[str]], *, smoke: bool, timeout: float, env: dict | None = None):
    """Each argv as a fresh process (a provider's own peak memory), their ``CompletedProcess``es in
    order: one at a time when measuring, so none disturbs another's timing; with ``smoke`` (CI checks
    the plumbing, not the numbers) as many at once as there are CPUs."""
    from concurrent.futures import ThreadPoolExecutor

    def one(argv):
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)

    with ThreadPoolExecutor(max_workers=(os.cpu_count() or 1) if smoke else 1) as pool:
        return list(pool.map(one, argvs))


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync(dev: torch.device | None = None) -> None:
    if (dev or device()).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], *, warmup: int = 3, rep: int = 10, dev=None) -> float:
    """Median milliseconds of ``fn()`` over ``rep`` runs after ``warmup`` runs.

    On CUDA, timed with events around each call (device time, launch overhead included, as a user
    sees it in a training step); on CPU with a host clock.
    """
    dev = dev or device()
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    if dev.type == "cuda":
        for _ in range(rep):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fwd_bwd_ms(fn: Callable[..., object], inputs: tuple, grads, *, rep: int = 10, dev=None) -> tuple[float, float]:
    """``(forward ms, backward ms)`` of ``fn(*inputs)``: the backward is timed alone, as
    ``torch.autograd.grad`` from one kept graph with output gradients ``grads`` (a tensor or a tuple
    matching fn's outputs)."""
    fwd = time_ms(lambda: fn(*inputs), rep=rep, dev=dev)
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    gs = grads if isinstance(grads, tuple) else (grads,)
    bwd = time_ms(lambda: torch.autograd.grad(outs, inputs, gs, retain_graph=True), rep=rep, dev=dev)
    return fwd, bwd


class MemoryBoundRun:
    """The shared setup of a memory-bound op's bench: device, dtype (bf16 on CUDA, fp32 on CPU), the
    copy ceiling measured now, the providers, and rows in GB/s and % of that copy."""

    def __init__(self, args, providers: dict, budget_s: float = 30.0):
        self.args = args
        self.rep = 3 if args.smoke else 20
        # seconds before no new shape starts (--quick: half; --smoke: no limit)
        self.budget_s = 1e9 if args.smoke else budget_s / 2 if args.quick else budget_s
        self.start = time.perf_counter()
        self.dev = device()
        self.dtype = torch.bfloat16 if self.dev.type == "cuda" else torch.float32
        self.elem = torch.empty((), dtype=self.dtype).element_size()
        self.copy_gbs = copy_bandwidth_gbs((512 << 20) if self.dev.type == "cuda" else (8 << 20), dev=self.dev)
        self.providers = providers
        self.rows: list[dict] = []
        self.meta = {"ours": "apr", "copy_gbs": self.copy_gbs, "ceilings": {"copy_gbs": self.copy_gbs},
                     "providers": list(providers), "skipped": [], "failed": []}

    def out_of_time(self, what: str) -> bool:
        """True (and ``what`` noted as skipped) once the time budget is spent."""
        if time.perf_counter() - self.start <= self.budget_s:
            return False
        self.meta["skipped"].append(what)
        return True

    def add(self, op: str, mode: str, shape: str, provider: str, ms: float, nbytes: int, **extra) -> None:
        gbs = nbytes / (ms * 1e-3) / 1e9
        self.rows.append({"op": op, "mode": mode, "shape": shape, **extra, "dtype": str(self.dtype)[6:],
                          "provider": provider, "ms": ms, "bytes": nbytes, "gbs": gbs,
                          "pct_copy": gbs / self.copy_gbs})

    def measure(self, op: str, shape: str, call, inputs: tuple, grads, nbytes: tuple[int, int], what: str,
                **extra) -> None:
        """Every provider's forward and backward on ``inputs`` (``call(provider_fn, *inputs)``), as a
        fwd and a bwd row moving ``nbytes`` = (forward bytes, backward bytes); a provider that fails
        is recorded and skipped."""
        for name, fn in self.providers.items():
            try:
                fwd, bwd = fwd_bwd_ms(lambda *xs, fn=fn: call(fn, *xs), inputs, grads, rep=self.rep, dev=self.dev)
            except Exception as e:  # noqa: BLE001  (recorded; the bench goes on)
                self.fail(f"{name} {what}", e)
                continue
            self.add(op, "fwd", shape, name, fwd, nbytes[0], **extra)
            self.add(op, "bwd", shape, name, bwd, nbytes[1], **extra)

    def fail(self, what: str, e: Exception) -> None:
        self.meta["failed"].append(f"{what}: {type(e).__name__}: {str(e)[:200]}")
        print(f"FAILED {self.meta['failed'][-1]}")

    def finish(self, name: str) -> None:
        print_table(self.rows, ["shape", "mode", "provider", "ms", "gbs", "pct_copy"])
        print(f"wrote {write_results(name, self.rows, self.args.out, self.meta)}")


def peak_memory_mb(fn: Callable[[], object], dev=None) -> float | None:
    """Peak CUDA memory allocated during ``fn()`` above what was allocated before (MiB)."""
    dev = dev or device()
    if dev.type != "cuda":
        return None
    sync(dev)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync(dev)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth_gbs(nbytes: int = 1 << 30, dev=None) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    dev = dev or device()
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=3, rep=10, dev=dev)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def matmul_tflops(n: int = 8192, dev=None) -> float:
    """Dense bf16 (CUDA) or fp32 (CPU) matrix-product rate on random data, in TFLOP/s."""
    dev = dev or device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    ms = time_ms(lambda: a @ b, warmup=3, rep=10, dev=dev)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def device_meta() -> dict:
    dev = device()
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
        "device_type": dev.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_rev": _git_rev(),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception:
        meta["triton"] = None
    if dev.type == "cuda":
        meta["cuda"] = torch.version.cuda
        meta["sm_count"] = torch.cuda.get_device_properties(0).multi_processor_count
        meta["driver"] = _driver_version()
    else:
        meta["cpu_threads"] = torch.get_num_threads()
    return meta


def _git_rev() -> str | None:
    # The GPU machine gets a copy of the working tree without .git: APR_GIT_REV carries the revision.
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        rev = out.stdout.strip()
    except Exception:
        rev = ""
    return rev or os.environ.get("APR_GIT_REV") or None


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except Exception:
        return None


def write_results(name: str, rows: list[dict], out: Path | None = None, extra_meta: dict | None = None) -> Path:
    """Write ``{"bench": name, "meta": ..., "rows": rows}`` as JSON and return the path."""
    meta = device_meta()
    if extra_meta:
        meta.update(extra_meta)
    folder = Path(out) if out else Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", meta["device"]).strip("-").lower() or "device"
    stamp = meta["date"][:10]
    path = folder / f"{name}-{slug}-{stamp}.json"
    path.write_text(json.dumps({"bench": name, "meta": meta, "rows": rows}, indent=1))
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A plain aligned text table of the given columns (floats to 3 significant digits)."""

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
