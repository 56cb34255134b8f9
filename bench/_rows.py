"""Reading result files leniently: map each bench's rows onto (kernel, shape, provider, metrics).

A result file is ``{"bench": name, "meta": {...}, "rows": [...]}`` (bench/_common.write_results).
Rows are "long" (one provider per row, ``provider`` key) or "wide" (``<provider>_ms`` keys); see
bench/README.md "Result rows" for the keys understood. pytest-benchmark JSON files are read too.
Unknown float keys (errors, ratios a bench computed itself) are ignored; other unknown keys are part
of the row's identity, so rows that differ only by provider line up.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

KERNEL_KEYS = ("op", "kernel", "name")
MODE_KEYS = ("mode", "pass", "direction")
PROVIDER_KEYS = ("provider", "impl", "backend", "method", "variant")
TIME_KEYS = {"ms": 1.0, "time_ms": 1.0, "median_ms": 1.0, "mean_ms": 1.0, "ms_median": 1.0,
             "us": 1e-3, "time_us": 1e-3, "median_us": 1e-3, "s": 1e3, "sec": 1e3, "seconds": 1e3, "time_s": 1e3}
GBS_KEYS = ("gbs", "gb_s", "gbps", "GB/s")
TFLOPS_KEYS = ("tflops", "tflop_s", "TFLOP/s")
MEM_KEYS = ("mem_mb", "peak_mem_mb", "peak_memory_mb", "peak_mb", "memory_mb", "mem_mib", "peak_mib")
BYTES_KEYS = ("bytes", "nbytes")
FLOPS_KEYS = ("flops",)
IGNORED_KEYS = {"device", "bench", "note", "notes", "error"}
# Benches whose rates are not device-kernel rates (host I/O): no "% of ceiling" for them.
NO_CEILING_BENCHES = {"load"}
OURS_NAMES = {"ours", "triton", "fast", "fused"}
_WIDE = re.compile(r"^(?P<p>[A-Za-z0-9]+(?:[-_][A-Za-z0-9]+)*?)_(?P<m>ms|us|gbs|tflops)$")


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _other_rate_key(key: str) -> bool:
    k = key.lower()
    return k.endswith(("per_s", "per_sec", "_per_second")) or k in {"tok_s", "tokens_s", "it_s", "samples_s", "mfu"}


def _shape_text(v) -> str:
    if isinstance(v, dict):
        return ",".join(f"{k}={_shape_text(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return "x".join(_shape_text(x) for x in v)
    return str(v)


@dataclass
class Row:
    kernel: str
    shape: str
    provider: str
    ms: float | None = None
    gbs: float | None = None
    tflops: float | None = None
    mem: float | None = None
    rate: tuple[str, float] | None = None  # another higher-is-better number (tokens/s, ...)
    derived: set = field(default_factory=set)  # rates computed here from bytes/flops and ms
    raw: dict = field(default_factory=dict, repr=False)

    def metric(self, name: str | None) -> float | None:
        if name in ("ms", "gbs", "tflops"):
            return getattr(self, name)
        if name and self.rate and self.rate[0] == name:
            return self.rate[1]
        return None

    def primary_metric(self) -> str | None:
        for name in ("ms", "tflops", "gbs"):
            if getattr(self, name) is not None:
                return name
        return self.rate[0] if self.rate else None

    def other_rate(self) -> float | None:
        return self.rate[1] if self.rate else None

    def mem_mb(self) -> float | None:
        return self.mem

    def is_ours(self, ours: set[str] | None) -> bool:
        p = self.provider.lower()
        if ours:
            return p in ours
        return p in OURS_NAMES or p.startswith("apr") or "apr_kernels" in p or "apr-kernels" in p


def _row_from(d: dict, bench: str, provider: str | None, metrics: dict) -> Row:
    kernel_key = next((k for k in KERNEL_KEYS if d.get(k) is not None), None)
    mode_key = next((k for k in MODE_KEYS if d.get(k) is not None), None)
    kernel = str(d[kernel_key]) if kernel_key else bench
    mode = str(d[mode_key]) if mode_key else None
    ident = []
    if d.get("shape") is not None:
        ident.append(_shape_text(d["shape"]))
    # Every provider-like key leaves the identity (an "impl" detail must not split a group).
    taken = {kernel_key, mode_key, "shape", "dtype", *PROVIDER_KEYS} | IGNORED_KEYS | set(metrics)
    for k, v in d.items():
        if k in taken or k in TIME_KEYS or k in GBS_KEYS + TFLOPS_KEYS + MEM_KEYS + BYTES_KEYS + FLOPS_KEYS:
            continue
        if isinstance(v, float) or _other_rate_key(k) or _WIDE.match(k):
            continue  # a measured number, not part of the identity
        ident.append(f"{k}={_shape_text(v)}")
    if d.get("dtype") is not None:
        ident.append(str(d["dtype"]))
    row = Row(kernel=f"{kernel} {mode}" if mode else kernel, shape=" ".join(ident) or "-",
              provider=provider or "-", raw=d)
    for k, v in metrics.items():
        x = _num(v)
        if x is None:
            continue
        if k in TIME_KEYS and row.ms is None:
            row.ms = x * TIME_KEYS[k]
        elif k in GBS_KEYS:
            row.gbs = x
        elif k in TFLOPS_KEYS:
            row.tflops = x
        elif k in MEM_KEYS:
            row.mem = x
        elif _other_rate_key(k) and row.rate is None:
            row.rate = (k, x)
    # Counted bytes or FLOPs with a time give the rate when the bench did not store it.
    nbytes = next((_num(d[k]) for k in BYTES_KEYS if _num(d.get(k))), None)
    flops = next((_num(d[k]) for k in FLOPS_KEYS if _num(d.get(k))), None)
    if row.ms and row.gbs is None and nbytes:
        row.gbs = nbytes / (row.ms * 1e-3) / 1e9
        row.derived.add("gbs")
    if row.ms and row.tflops is None and flops:
        row.tflops = flops / (row.ms * 1e-3) / 1e12
        row.derived.add("tflops")
    return row


def normalise(d: dict, bench: str) -> list[Row]:
    """One result row (dict) -> Rows, splitting wide rows into one Row per provider."""
    provider = next((str(d[k]) for k in PROVIDER_KEYS if d.get(k) is not None), None)
    if provider is None:
        wide: dict[str, dict] = {}
        for k, v in d.items():
            m = _WIDE.match(k)
            if m and m["p"].lower() not in {"peak", "time", "median", "mean", "mem"}:
                wide.setdefault(m["p"], {})[m["m"]] = v
        if wide:
            rest = {k: v for k, v in d.items() if not (_WIDE.match(k) and k.rsplit("_", 1)[0] in wide)}
            return [_row_from(rest, bench, p, metrics) for p, metrics in wide.items()]
    metrics = {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
               and (k in TIME_KEYS or k in GBS_KEYS + TFLOPS_KEYS + MEM_KEYS or _other_rate_key(k))}
    return [_row_from(d, bench, provider, metrics)]


@dataclass
class Run:
    bench: str
    meta: dict
    path: Path
    rows: list[Row]

    @property
    def device(self) -> str:
        return str(self.meta.get("device") or "unknown device")

    @property
    def ours(self) -> set[str] | None:
        o = self.meta.get("ours")
        if isinstance(o, str):
            return {o.lower()}
        if isinstance(o, (list, tuple)):
            return {str(x).lower() for x in o}
        return None

    def sort_key(self):
        return (str(self.meta.get("date") or ""), self.path.name)

    def groups(self) -> dict[tuple[str, str], list[Row]]:
        out: dict[tuple[str, str], list[Row]] = {}
        for r in self.rows:
            out.setdefault((r.kernel, r.shape), []).append(r)
        return out

    @property
    def is_sweep(self) -> bool:
        """A launch-config sweep (bench_x.py --tune): tuning data, not an ours-vs-baseline result."""
        return self.bench.endswith("_tune") or bool(self.meta.get("sweep"))

    def uses_ceilings(self) -> bool:
        return self.bench not in NO_CEILING_BENCHES and self.meta.get("ceiling", True) is not False

    def ceilings(self) -> dict:
        c = self.meta.get("ceilings") if isinstance(self.meta.get("ceilings"), dict) else {}
        copy = [r.gbs for r in self.rows if r.kernel.startswith("copy") and r.gbs]
        mm = [r.tflops for r in self.rows if r.kernel.startswith("matmul") and r.tflops]
        return {"copy_gbs": _num(c.get("copy_gbs")) or (max(copy) if copy else None),
                "matmul_tflops": _num(c.get("matmul_tflops")) or (max(mm) if mm else None)}


def _from_pytest_benchmark(data: dict, path: Path) -> Run:
    mi = data.get("machine_info") or {}
    meta = {"device": (mi.get("cpu") or {}).get("brand_raw") or "cpu", "date": data.get("datetime"),
            "python": mi.get("python_version"), "git_rev": ((data.get("commit_info") or {}).get("id") or "")[:7]}
    bench = path.stem.split("-")[0].removeprefix("bench_")
    rows = []
    for b in data.get("benchmarks") or []:
        if not isinstance(b, dict) or not isinstance(b.get("stats"), dict):
            continue
        params = dict(b.get("params") or {})
        extra = b.get("extra_info") or {}
        param_provider = params.pop("provider", None)  # never part of the shape
        provider = extra.get("provider") or param_provider or b.get("name", "?")
        d = {"op": b.get("group") or str(b.get("name", bench)).split("[")[0], "shape": params or None,
             "provider": provider, "ms": (_num(b["stats"].get("median")) or math.nan) * 1e3}
        d.update({k: v for k, v in extra.items() if k != "provider"})
        rows += normalise(d, bench)
    return Run(bench, meta, path, rows)


def load_run(path: Path) -> Run:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object with 'rows'")
    if "benchmarks" in data and "rows" not in data:
        return _from_pytest_benchmark(data, path)
    rows = data.get("rows")
    if not isinstance(rows, list):
        raise ValueError("no 'rows' list")
    bench = str(data.get("bench") or path.stem.split("-")[0])
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    out = [r for d in rows if isinstance(d, dict) for r in normalise(d, bench)]
    # A bench that stores its own GB/s (or TFLOP/s) on some rows means the rest have none on purpose
    # (e.g. a zero-copy load, whose "bytes" were never moved): derive nothing for those.
    for name in ("gbs", "tflops"):
        if any(getattr(r, name) is not None and name not in r.derived for r in out):
            for r in out:
                if name in r.derived:
                    setattr(r, name, None)
                    r.derived.discard(name)
    return Run(bench, meta, path, out)


def load_runs(paths, warn=print) -> tuple[list[Run], list[Path]]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.rglob("*.json"))  # per-run subfolders too
        elif p.is_file():
            files.append(p)
        else:
            warn(f"{p}: no such file or folder, skipped")
    runs, used = [], []
    for f in files:
        try:
            run = load_run(f)
        except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            warn(f"{f}: unreadable result file, skipped ({e})")
            continue
        if not run.rows:
            warn(f"{f}: no usable rows, skipped")
            continue
        runs.append(run)
        used.append(f)
    return runs, used


def _better(metric: str) -> int:
    return -1 if metric == "ms" else 1  # time: lower is better; rates: higher is better


def rate_of(ours: Row, metric: str, other: Row) -> float | None:
    """How many times better ours is than ``other`` on ``metric`` (above 1: ours wins)."""
    a, b = ours.metric(metric), other.metric(metric)
    if not a or not b:
        return None
    return b / a if _better(metric) < 0 else a / b


def ours_and_baseline(rows: list[Row], ours_names: set[str] | None):
    """(ours, best baseline, metric, speed-up of ours) for one (kernel, shape) group."""
    ours = next((r for r in rows if r.is_ours(ours_names)), None)
    if ours is None:
        return None, None, None, None
    metric = "ms" if ours.ms is not None else ours.primary_metric()
    bases = [r for r in rows if r is not ours and not r.is_ours(ours_names) and r.metric(metric)]
    if not bases or metric is None:
        return ours, None, metric, None
    best = max(bases, key=lambda r: _better(metric) * r.metric(metric))
    return ours, best, metric, rate_of(ours, metric, best)


def pct_of_ceiling(row: Row, ceilings: dict) -> tuple[float | None, str]:
    """The row's fraction of the binding roof: max(GB/s / copy GB/s, TFLOP/s / matmul TFLOP/s)."""
    cands = []
    if row.gbs and ceilings.get("copy_gbs"):
        cands.append((row.gbs / ceilings["copy_gbs"], "BW"))
    if row.tflops and ceilings.get("matmul_tflops"):
        cands.append((row.tflops / ceilings["matmul_tflops"], "MM"))
    return max(cands) if cands else (None, "")
