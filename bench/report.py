"""Turn benchmark result files into one short table, a Markdown report and plots.

    python3 bench/report.py [PATH ...] [--write] [--out-dir DIR] [--markdown]

PATH is a result JSON file or a folder of them (default: bench/results). The short table is printed
last: kernel, shape, ours, best baseline, speed-up of ours over it, and % of the card's ceiling.
``--write`` also writes REPORT.md and one PNG per bench and device (ours vs baselines per shape) to
--out-dir (default bench/results); plots need matplotlib and are skipped without it.

Rows are read leniently (see bench/README.md, "Result rows"); files that are missing, unreadable or
partial are reported on stderr and skipped. The ceilings come from bench_ceilings.py's file for the
same device (the newest one), so "% of ceiling" compares numbers measured on the same card.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from _rows import Run, load_runs, ours_and_baseline, pct_of_ceiling, rate_of

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"


def fmt(v, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, float):
        s = f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    else:
        s = str(v)
    return f"{s} {unit}".strip() if unit else s


def metric_text(row, metric: str) -> str:
    value = row.metric(metric)
    return fmt(value, {"ms": "ms"}.get(metric, metric.replace("gbs", "GB/s").replace("tflops", "TFLOP/s")))


def summary_rows(run: Run, ceilings: dict, max_shapes: int | None = None) -> list[list[str]]:
    """One line per (kernel, shape) of a run: ours, best baseline, speed-up, % of ceiling.

    Kernels in order of first appearance, shapes in sweep order. With ``max_shapes``, a kernel with
    more shapes shows that many, evenly spread, plus a line with the geometric mean of all ratios.
    """
    if run.is_sweep:
        return []
    ceilings = ceilings if run.uses_ceilings() else {}
    by_kernel: dict[str, list[tuple[list[str], float | None]]] = {}
    for (kernel, shape), rows in run.groups().items():
        ours, base, metric, speedup = ours_and_baseline(rows, run.ours)
        if ours is None:  # nothing of ours measured for this shape: show the lone provider as is
            ours = rows[0]
            metric = ours.primary_metric()
        pct, roof = pct_of_ceiling(ours, ceilings)
        line = [
            kernel, shape,
            f"{metric_text(ours, metric)}" + ("" if ours.is_ours(run.ours) else f" ({ours.provider})"),
            f"{base.provider} {metric_text(base, metric)}" if base is not None else "",
            f"{speedup:.2f}x" if speedup is not None else "",
            f"{pct:.0%} {roof}" if pct is not None else "",
        ]
        by_kernel.setdefault(kernel, []).append((line, speedup))
    out = []
    for kernel, lines in by_kernel.items():
        n = len(lines)
        if max_shapes is None or n <= max_shapes:
            out += [line for line, _ in lines]
            continue
        keep = sorted({round(i * (n - 1) / (max_shapes - 1)) for i in range(max_shapes)}) if max_shapes > 1 else [n - 1]
        out += [lines[i][0] for i in keep]
        ratios = [s for _, s in lines if s]
        if ratios:
            geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
            out.append([kernel, f"(all {n} shapes)", "", f"ratio {min(ratios):.2f}x to {max(ratios):.2f}x",
                        f"{geo:.2f}x gm", ""])
    return out


SUMMARY_HEAD = ["kernel", "shape", "ours", "baseline", "ratio", "% ceiling"]


def text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def md_table(head: list[str], rows: list[list[str]]) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def describe(meta: dict) -> str:
    keys = [("torch", "torch"), ("triton", "Triton"), ("cuda", "CUDA"), ("driver", "driver"),
            ("git_rev", "rev"), ("date", "date")]
    return ", ".join(f"{label} {meta[k]}" for k, label in keys if meta.get(k))


def ceiling_text(ceilings: dict, meta: dict | None) -> str:
    parts = []
    spec = (meta or {}).get("spec") or {}
    if ceilings.get("copy_gbs"):
        s = f"copy {fmt(ceilings['copy_gbs'])} GB/s"
        if spec.get("hbm_gbs"):
            s += f" ({ceilings['copy_gbs'] / spec['hbm_gbs']:.0%} of the {spec['hbm_gbs']:.0f} datasheet)"
        parts.append(s)
    if ceilings.get("matmul_tflops"):
        s = f"matmul {fmt(ceilings['matmul_tflops'])} TFLOP/s"
        if spec.get("bf16_dense_tflops"):
            s += f" ({ceilings['matmul_tflops'] / spec['bf16_dense_tflops']:.0%} of the " \
                 f"{spec['bf16_dense_tflops']:.0f} datasheet)"
        parts.append(s)
    if not parts:
        return "ceilings: not measured (no bench_ceilings result)"
    return "ceilings: " + ", ".join(parts) + ("" if meta is not None else " (measured by the benches themselves)")


def by_device(runs: list[Run]) -> dict[str, tuple[list[Run], Run | None]]:
    """device -> (bench runs, newest ceilings run); keeps the newest file per (bench, device)."""
    newest: dict[tuple[str, str], Run] = {}
    for run in runs:
        key = (run.bench, run.device)
        if key not in newest or run.sort_key() > newest[key].sort_key():
            newest[key] = run
    out: dict[str, tuple[list[Run], Run | None]] = {}
    for (bench, dev), run in sorted(newest.items(), key=lambda kv: (kv[0][1], bench_order(kv[0][0]))):
        benches, ceil = out.get(dev, ([], None))
        if bench == "ceilings":
            ceil = run
        else:
            benches.append(run)
        out[dev] = (benches, ceil)
    return out


def device_ceilings(benches: list[Run], ceil: Run | None) -> dict:
    """The ceilings run's numbers; without one, the best a bench measured in its own run
    (``meta["ceilings"]``, e.g. bench_rms_norm's copy or bench_train's matmul)."""
    out = ceil.ceilings() if ceil else {}
    for key in ("copy_gbs", "matmul_tflops"):
        if not out.get(key):
            vals = [r.meta["ceilings"].get(key) for r in benches if isinstance(r.meta.get("ceilings"), dict)]
            vals = [v for v in vals if isinstance(v, (int, float)) and v > 0]
            out[key] = max(vals) if vals else None
    return out


def bench_order(name: str):
    order = ["ceilings", "rms_norm", "attention", "rope", "swiglu", "cross_entropy", "train"]
    return (order.index(name) if name in order else len(order), name)


def full_table(run: Run, ceilings: dict) -> list[list[str]]:
    ceilings = ceilings if run.uses_ceilings() else {}
    rows = []
    for (kernel, shape), group in run.groups().items():
        ours, _, metric, _ = ours_and_baseline(group, run.ours)
        for r in group:
            vs = ""
            if ours is not None and r is not ours and metric:
                ratio = rate_of(ours, metric, r)
                vs = f"{ratio:.2f}x" if ratio is not None else ""
            pct, roof = pct_of_ceiling(r, ceilings)
            rows.append([kernel, shape, r.provider + (" (ours)" if r is ours else ""),
                         fmt(r.metric("ms")), fmt(r.metric("gbs")), fmt(r.metric("tflops")),
                         fmt(r.other_rate()), fmt(r.mem_mb()), vs, f"{pct:.0%} {roof}" if pct is not None else ""])
    return rows


FULL_HEAD = ["kernel", "shape", "provider", "ms", "GB/s", "TFLOP/s", "other rate", "peak MiB",
             "ours vs this", "% ceiling"]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower() or "device"


def plot_metric(rows) -> str | None:
    """Rates compare across shapes better than times: TFLOP/s, then GB/s, then another rate, then ms."""
    for name in ("tflops", "gbs"):
        if any(r.metric(name) for r in rows):
            return name
    return next((r.rate[0] for r in rows if r.rate), "ms" if any(r.ms for r in rows) else None)


def plot_run(run: Run, path: Path, ceilings: dict) -> bool:
    """Ours vs baselines per shape: one panel per kernel, one line per provider, the ceiling dotted."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    groups = run.groups()
    kernels = list(dict.fromkeys(k for k, _ in groups))
    series = {k: {r.provider for (kk, _), rows in groups.items() if kk == k for r in rows} for k in kernels}
    if not kernels or max(map(len, series.values())) > 12:
        return False  # nothing to draw, or a panel with too many series to read
    ncols = min(3, len(kernels))
    nrows = math.ceil(len(kernels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 3.8 * nrows), squeeze=False)
    for ax, kernel in zip(axes.flat, kernels):
        shapes = [s for k, s in groups if k == kernel]
        metric = plot_metric([r for s in shapes for r in groups[(kernel, s)]])
        providers = list(dict.fromkeys(r.provider for s in shapes for r in groups[(kernel, s)]))
        width = 0.8 / max(1, len(providers))
        for j, p in enumerate(providers):
            ys = [next((r.metric(metric) for r in groups[(kernel, s)] if r.provider == p), None) for s in shapes]
            xs = [i for i, y in enumerate(ys) if y is not None]
            if not xs:
                continue
            ours = any(r.is_ours(run.ours) for s in shapes for r in groups[(kernel, s)] if r.provider == p)
            if len(shapes) == 1:  # one shape: bars per provider read better than lone points
                ax.bar([x - 0.4 + width * (j + 0.5) for x in xs], [ys[i] for i in xs], width * 0.9, label=p,
                       hatch="" if ours else "//")
            else:
                ax.plot(xs, [ys[i] for i in xs], "-o" if ours else "--s", label=p)
        roof = {"gbs": ceilings.get("copy_gbs"), "tflops": ceilings.get("matmul_tflops")}.get(metric)
        if roof:
            ax.axhline(roof, color="grey", linestyle=":", label="ceiling (same run)")
        values = [r.metric(metric) for s in shapes for r in groups[(kernel, s)] if r.metric(metric)]
        if metric == "ms" and values and max(values) > 20 * min(values):
            ax.set_yscale("log")
        # Tokens shared by every shape of the panel go to the title; the ticks keep what varies.
        common = set.intersection(*(set(s.split()) for s in shapes)) if len(shapes) > 1 else set()
        ticks = [" ".join(t for t in s.split() if t not in common) or s for s in shapes]
        kept = [t for t in shapes[0].split() if t in common]
        ax.set_title(kernel + (f"\n{' '.join(kept)}" if kept else ""), fontsize=9)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(ticks, rotation=30 if max(map(len, ticks)) > 12 else 0, ha="right", fontsize=7)
        ax.set_ylabel({"ms": "ms (lower is better)", "gbs": "GB/s (higher is better)",
                       "tflops": "TFLOP/s (higher is better)"}.get(metric, metric or ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(kernels):]:
        ax.axis("off")
    fig.suptitle(f"{run.bench} on {run.meta.get('device', run.device)}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(devices, out_dir: Path, sources: list[Path]) -> Path:
    lines = ["# Benchmark report", "",
             "Generated by `python3 bench/report.py --write` from: "
             + ", ".join(f"`{p.name}`" for p in sources) + ".", "",
             "*ours* is this package's kernel; *baseline* the fastest other provider measured in the same "
             "run; *ratio* is how many times faster ours is (above 1: ours wins); *% ceiling* divides "
             "ours' GB/s (BW) or TFLOP/s (MM) by the copy and matmul ceilings measured in the same run, "
             "whichever is higher.", ""]
    plotted = False
    for dev, (benches, ceil) in devices.items():
        ceilings = device_ceilings(benches, ceil)
        meta = (ceil or (benches[0] if benches else None)).meta if (ceil or benches) else {}
        lines += [f"## {meta.get('device', dev)}", "", describe(meta), "",
                  ceiling_text(ceilings, ceil.meta if ceil else None), ""]
        summary = [row for run in benches for row in summary_rows(run, ceilings)]
        if summary:
            lines += [md_table(SUMMARY_HEAD, summary), ""]
        for run in benches:
            if run.is_sweep:
                lines += [f"### {run.bench}", "", f"`{run.path.name}`: a launch-config sweep of {len(run.rows)} "
                          "rows, not tabulated here (read the JSON).", ""]
                continue
            lines += [f"### {run.bench}", "", f"`{run.path.name}` ({describe(run.meta)})", ""]
            lines += [md_table(FULL_HEAD, full_table(run, ceilings)), ""]
            png = out_dir / f"{run.bench}-{slug(dev)}.png"
            if plot_run(run, png, ceilings if run.uses_ceilings() else {}):
                plotted = True
                lines += [f"![{run.bench} on {dev}]({png.name})", ""]
    if not plotted:
        lines += ["*(no plots: matplotlib is not installed here, or no rows to plot)*", ""]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "REPORT.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="*", type=Path, help="result JSON files or folders (default bench/results)")
    p.add_argument("--write", action="store_true", help="write REPORT.md and PNG plots to --out-dir")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where --write puts its files")
    p.add_argument("--markdown", action="store_true", help="print the short table as Markdown (for README)")
    p.add_argument("--shapes", type=int, default=3, metavar="N",
                   help="printed table: at most N shapes per kernel plus the geometric-mean ratio "
                        "(0: all; REPORT.md always has all)")
    args = p.parse_args(argv)
    runs, sources = load_runs(args.paths or [RESULTS_DIR], warn=lambda m: print(f"report.py: {m}", file=sys.stderr))
    if not runs:
        print("report.py: no benchmark results found in " + ", ".join(map(str, args.paths or [RESULTS_DIR])),
              file=sys.stderr)
        return 2
    devices = by_device(runs)
    if args.write:
        print(f"wrote {write_report(devices, args.out_dir, sources)}")
    for dev, (benches, ceil) in devices.items():
        ceilings = device_ceilings(benches, ceil)
        meta = ceil.meta if ceil else benches[0].meta
        print(f"\n== {meta.get('device', dev)} ({describe(meta)})")
        print(ceiling_text(ceilings, ceil.meta if ceil else None))
        summary = [row for run in benches for row in summary_rows(run, ceilings, args.shapes or None)]
        if summary:
            print((md_table if args.markdown else text_table)(SUMMARY_HEAD, summary))
        else:
            print("(no kernel rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
