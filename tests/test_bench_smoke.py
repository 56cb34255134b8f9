"""Benchmarks don't rot: every bench/bench_*.py runs at --smoke size on CPU and writes rows that
bench/report.py understands; report.py's arithmetic is checked against hand-computed values; and
bench/gpu_check.sh runs end to end in --smoke mode, failing loudly when a test fails.

Each bench runs once per session (cached), in a subprocess with a 60 s limit.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
import _rows  # noqa: E402  (bench/ is not a package)
import report  # noqa: E402

# The benches the design names, plus any other bench_*.py that appears.
EXPECTED = ["ceilings", "rms_norm", "attention", "load", "train", "cross_entropy", "swiglu", "rope"]
NAMES = list(dict.fromkeys(EXPECTED + sorted(p.stem[len("bench_"):] for p in BENCH.glob("bench_*.py"))))
# (a hung bench fails, a slow machine does not: bench_pipeline's smoke took 52 s, then over 60 s, on a 2-core
# AMD EPYC whose cores run at half the speed of earlier machines)
SMOKE_TIMEOUT_S = 180
_cache: dict = {}  # name -> Future of (CompletedProcess, output folder)
SMOKE_WORKERS = 2  # bench --smoke runs side by side: they check the plumbing, not the numbers


def _env() -> dict:
    # --out decides, not a stray $OUT; a pytest run inside is its own, not a pytest-xdist worker (which
    # pytest-benchmark would take as a reason to switch itself off)
    env = {k: v for k, v in os.environ.items() if k != "OUT" and not k.startswith("PYTEST_XDIST")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # smoke means CPU, even where a GPU exists
    env["PYTHON"] = sys.executable  # gpu_check.sh: the interpreter running the tests (CI's venv)
    return env


def _smoke(name: str, base: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """``python bench/bench_<name>.py --smoke --out <base>/<name>``, forked from the test process's
    rank server where it suits (``rank_runs.start_script``: torch and the package imported once, not by
    every bench)."""
    from rank_runs import start_script

    argv = [BENCH / f"bench_{name}.py", "--smoke", "--out", base / name]
    proc = start_script(argv, _env(), base, f"{name}.proc", cwd=ROOT)
    stdout, stderr = proc.communicate(timeout=SMOKE_TIMEOUT_S)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), base / name


def run_smoke(name: str, base: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """bench_<name>.py --smoke, run once per session (started with the others by ``smoke_base``); its
    JSON goes to a folder of its own."""
    if name not in _cache:
        from concurrent.futures import Future

        done: Future = Future()
        done.set_result(_smoke(name, base))
        _cache[name] = done
    return _cache[name].result()


@pytest.fixture(scope="session")
def smoke_base(tmp_path_factory):
    """The folder of the session's smoke runs, every bench's started here, ``SMOKE_WORKERS`` at a time."""
    from concurrent.futures import ThreadPoolExecutor

    base = tmp_path_factory.mktemp("bench_smoke")
    pool = ThreadPoolExecutor(max_workers=SMOKE_WORKERS)
    for name in NAMES:
        if (BENCH / f"bench_{name}.py").exists():
            _cache[name] = pool.submit(_smoke, name, base)
    yield base
    pool.shutdown(wait=True)


def _result_file(name: str, base: Path) -> Path:
    proc, out = run_smoke(name, base)
    tail = (proc.stdout[-1500:] + "\n--- stderr ---\n" + proc.stderr[-2500:]).strip()
    assert proc.returncode == 0, f"bench/bench_{name}.py --smoke exited {proc.returncode}:\n{tail}"
    files = sorted(out.glob("*.json"))
    assert len(files) == 1, f"bench/bench_{name}.py --smoke: expected one JSON in {out}, found {files}\n{tail}"
    return files[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_bench_smoke_writes_rows(name, smoke_base):
    if not (BENCH / f"bench_{name}.py").exists():
        pytest.skip(f"bench/bench_{name}.py does not exist (yet)")
    path = _result_file(name, smoke_base)
    data = json.loads(path.read_text())
    assert isinstance(data.get("rows"), list) and data["rows"], f"{path}: 'rows' must be a non-empty list"
    assert all(isinstance(r, dict) for r in data["rows"]), f"{path}: every row must be a JSON object"
    for key in ("device", "date", "torch", "git_rev"):
        assert key in data["meta"], f"{path}: meta lacks {key!r} (use _common.write_results)"
    # The row schema contract with report.py: every row yields a finite, positive measurement.
    run = _rows.load_run(path)
    assert run.rows, f"{path}: report.py found no usable rows in {data['rows'][:2]}"
    for row in run.rows:
        metric = row.primary_metric()
        value = row.metric(metric)
        assert value is not None and math.isfinite(value) and value > 0, \
            f"{path}: row {row.raw} has no positive ms/gbs/tflops/<x>_per_s measurement ({metric}={value})"


@pytest.mark.slow
def test_report_on_smoke_outputs(smoke_base, tmp_path):
    names = [n for n in NAMES if (BENCH / f"bench_{n}.py").exists()]
    files = [_result_file(n, smoke_base) for n in names]
    proc = subprocess.run([sys.executable, str(BENCH / "report.py"), *map(str, files), "--write",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"report.py exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stdout.rstrip().splitlines()
    assert any(line.startswith("ceilings: copy ") for line in lines), proc.stdout
    assert "unreadable" not in proc.stderr and "no usable rows" not in proc.stderr, proc.stderr
    md = (tmp_path / "REPORT.md").read_text()
    for f in files:
        assert f"`{f.name}`" in md, f"REPORT.md does not cite {f.name}"
    for f in files[1:]:  # every kernel bench shows up in the printed short table
        kernels = {r.kernel for r in _rows.load_run(f).rows}
        assert any(line.startswith(k) for k in kernels for line in lines), \
            f"{f.name}: none of its kernels {sorted(kernels)} in the short table:\n{proc.stdout}"
    if _has_matplotlib():
        for f in files[1:]:
            assert list(tmp_path.glob(f"{_rows.load_run(f).bench}-*.png")), f"no plot for {f.name}"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
def test_gpu_check_smoke_fails_loudly_and_still_measures(tmp_path):
    """A failing test gives exit 1, yet the benches still run and the short table comes last.

    Two benches (the ceilings and one kernel bench) keep this within the time budget; every bench's
    smoke run and the report over all of them are covered above."""
    tests = tmp_path / "t"
    tests.mkdir()
    (tests / "test_probe.py").write_text("def test_passes():\n    assert True\n\n"
                                         "def test_fails():\n    assert 1 == 2, 'deliberate failure'\n")
    out = tmp_path / "out"
    env = _env() | {"OUT": str(out), "GPU_CHECK_PYTEST": str(tests / "test_probe.py")}
    names = [n for n in ("ceilings", "rms_norm") if (BENCH / f"bench_{n}.py").exists()]
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--smoke", "--only", ",".join(names)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, f"gpu_check.sh should exit 1 on a failing test, got {proc.returncode}:\n{text}"
    assert "1 failed, 1 passed" in text and "SOME STEPS FAILED" in text, text
    assert "deliberate failure" in (out / "pytest.log").read_text()
    assert (out / "gpu_check.log").read_text().strip(), "gpu_check.log is empty"
    lines = text.rstrip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("== summary"))
    table = lines[start:]
    assert any(line.startswith("ceilings: copy ") for line in table), "the report is not last:\n" + text
    for name in names:
        assert any(line.split()[:3] == ["bench", name, "ok"] for line in table), f"bench {name} not ok:\n{text}"
        files = list(out.glob(f"{name}-*.json"))
        assert files, f"bench {name} wrote nothing after the failing test:\n{text}"
        if name != "ceilings":
            kernels = {r.kernel for r in _rows.load_run(files[0]).rows}
            assert any(line.startswith(k) for k in kernels for line in table), \
                f"{name}: none of {sorted(kernels)} in the short table:\n{text}"
    assert len(list(out.iterdir())) <= 8, "more than 8 files in $OUT (the device tool returns only 8)"


@pytest.mark.slow
def test_gpu_check_tests_only_runs_the_tests_and_no_bench(tmp_path):
    """--tests-only runs the tests and no bench (exit 0); --no-tests (the benches and no test):
    test_gpu_check_runs_priority_benches_first_and_leaves_the_rest_when_time_runs_out."""
    tests = tmp_path / "t"
    tests.mkdir()
    (tests / "test_probe.py").write_text("def test_passes():\n    assert True\n")
    env = _env() | {"OUT": str(tmp_path / "a"), "GPU_CHECK_PYTEST": str(tests / "test_probe.py")}
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--smoke", "--tests-only"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=170)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert "1 passed" in text and "--tests-only: no benchmarks run" in text and "== bench_" not in text, text


_FAKE_BENCH = """import json, os, sys, time
from pathlib import Path
time.sleep(max(0.0, float(os.environ["FAKE_START"]) + {until} - time.time()))
out = Path(sys.argv[sys.argv.index("--out") + 1])
row = {{"op": "{name}", "shape": "1", "provider": "apr", "ms": 1.0}}
(out / "{name}-cpu-2026-01-01.json").write_text(json.dumps({{"meta": {{"device": "cpu"}}, "rows": [row]}}))
"""


def test_gpu_check_runs_priority_benches_first_and_leaves_the_rest_when_time_runs_out(tmp_path):
    """A copy of gpu_check.sh over fake benches: the priority benches (ceilings, train) run with their
    reserve; a bench outside the priority list gets only what they leave, and past the budget it is
    noted as not run (naming --only), which is not a failure (exit 0)."""
    import shutil
    import time

    tree = tmp_path / "tree"
    (tree / "bench").mkdir(parents=True)
    for f in ("gpu_check.sh", "report.py", "_rows.py"):
        shutil.copy(BENCH / f, tree / "bench" / f)
    # train ends 33 s after the start whatever the start-up costs: of the 50 s budget (12 kept for the
    # report) it then leaves about 5, under the 10 s a bench needs in --smoke. (The start-up, Python
    # importing torch and the package to check the install, took 15 s beside the rest of the suite on a
    # 2-core machine: a 32 s budget then left the priority train bench no time.)
    for name, until in (("ceilings", 0), ("train", 33), ("zz_extra", 0)):
        (tree / "bench" / f"bench_{name}.py").write_text(_FAKE_BENCH.format(name=name, until=until))
    out = tmp_path / "out"
    env = _env() | {"OUT": str(out), "GPU_CHECK_BUDGET": "50", "FAKE_START": repr(time.time())}
    proc = subprocess.run(["bash", str(tree / "bench" / "gpu_check.sh"), "--smoke", "--no-tests"], cwd=tree,
                          env=env, capture_output=True, text=True, timeout=120)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert "skipped (--no-tests)" in text and "== pytest" not in text, text
    summary = text[text.rindex("== summary"):]
    for name in ("ceilings", "train"):
        assert any(line.split()[:3] == ["bench", name, "ok"] for line in summary.splitlines()), summary
    assert "not run (time budget spent; --only zz_extra runs it)" in summary, summary
    assert sorted(p.name.split("-")[0] for p in out.glob("*.json")) == ["ceilings", "train"]


def test_cross_entropy_cpu_memory_mode_writes_rows(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "bench_cross_entropy.py"), "--cpu-memory", "--smoke",
                           "--out", str(tmp_path)], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(next(tmp_path.glob("cross_entropy-*.json")).read_text())["rows"]
    assert sorted((r["mode"], r["provider"]) for r in rows) == [
        ("distill fwd+bwd", "apr"), ("distill fwd+bwd", "eager"), ("fwd+bwd", "apr"), ("fwd+bwd", "eager"),
        ("per-token fwd+bwd", "apr"), ("per-token fwd+bwd", "eager")]
    assert all(r["peak_mem_mb"] > 0 and r["ms"] > 0 for r in rows)


def test_gpu_check_rejects_unknown_argument():
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--fast"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and "unknown argument '--fast'" in proc.stderr


# ---- report.py arithmetic on hand-built result files -------------------------------------------

def _write(path: Path, bench: str, rows, meta=None) -> Path:
    meta = {"device": "Test GPU", "date": "2026-01-02T00:00:00+00:00", **(meta or {})}
    path.write_text(json.dumps({"bench": bench, "meta": meta, "rows": rows}))
    return path


def test_report_ratios_and_ceilings_by_hand(tmp_path, capsys):
    copy_gbs, mm_tflops = random.uniform(1500, 3000), random.uniform(400, 900)
    _write(tmp_path / "ceilings-test-gpu.json", "ceilings",
           [{"op": "copy", "provider": "torch", "gbs": copy_gbs}, {"op": "matmul", "provider": "torch",
                                                                   "tflops": mm_tflops}])
    m, n = random.choice([(4096, 896), (8191, 4097)])
    nbytes = 4 * m * n
    ms = {"triton": random.uniform(0.01, 0.1), "liger": random.uniform(0.01, 0.1), "torch": random.uniform(0.2, 1)}
    long_rows = [{"op": "rms_norm", "mode": "fwd", "shape": [m, n], "dtype": "bf16", "provider": p, "ms": t,
                  "bytes": nbytes, "max_err": random.random()} for p, t in ms.items()]
    s = random.choice([509, 2048])
    flops = 2 * 14 * s * s * 64
    wide_rows = [{"B": 1, "S": s, "causal": True, "triton_ms": 2.0, "sdpa_ms": 3.0, "flops": flops}]
    _write(tmp_path / "rms_norm-test-gpu.json", "rms_norm", long_rows)
    _write(tmp_path / "attention-test-gpu.json", "attention", wide_rows)
    _write(tmp_path / "train-test-gpu.json", "train", [
        {"preset": "tiny", "provider": "mine", "tokens_per_s": 1000.0},
        {"preset": "tiny", "provider": "eager", "tokens_per_s": 700.0}], meta={"ours": "mine"})
    # An older file of the same bench and device must lose to the newer one.
    _write(tmp_path / "train-test-gpu-old.json", "train", [{"provider": "mine", "tokens_per_s": 1.0}],
           meta={"date": "2025-01-01", "ours": "mine"})

    assert report.main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rms = next(line for line in lines if line.startswith("rms_norm fwd"))
    best = min(ms["liger"], ms["torch"])
    assert f"{m}x{n} bf16" in rms
    assert f"{best / ms['triton']:.2f}x" in rms, rms
    ours_gbs = nbytes / (ms["triton"] * 1e-3) / 1e9
    assert f"{ours_gbs / copy_gbs:.0%} BW" in rms, rms
    att = next(line for line in lines if line.startswith("attention"))
    assert f"S={s}" in att and "1.50x" in att and "sdpa 3 ms" in att, att
    assert f"{flops / 2e-3 / 1e12 / mm_tflops:.0%} MM" in att, att
    train = next(line for line in lines if line.startswith("train"))
    assert f"{1000 / 700:.2f}x" in train and "eager 700" in train, train


def test_report_reads_pytest_benchmark_and_skips_broken_files(tmp_path, capsys):
    (tmp_path / "broken.json").write_text("{not json")
    _write(tmp_path / "empty-x.json", "empty", [])
    bench = {"machine_info": {"cpu": {"brand_raw": "Some CPU"}}, "datetime": "2026-01-01T00:00:00",
             "benchmarks": [
                 {"name": "test_load[apr]", "group": "load", "params": {"provider": "apr", "size": "1GB"},
                  "stats": {"median": 0.5}},
                 {"name": "test_load[safetensors]", "group": "load",
                  "params": {"provider": "safetensors", "size": "1GB"}, "stats": {"median": 0.75}}]}
    (tmp_path / "load-pytest-benchmark.json").write_text(json.dumps(bench))
    assert report.main([str(tmp_path), str(tmp_path / "missing.json")]) == 0
    cap = capsys.readouterr()
    load = next(line for line in cap.out.splitlines() if line.startswith("load"))
    assert "500 ms" in load and "safetensors 750 ms" in load and "1.50x" in load, load
    assert "broken.json: unreadable" in cap.err and "empty-x.json: no usable rows" in cap.err
    assert "missing.json: no such file" in cap.err


def test_report_condenses_shapes_with_geometric_mean(tmp_path, capsys):
    ratios = [random.uniform(0.5, 3) for _ in range(7)]
    rows = []
    for i, r in enumerate(ratios):
        rows += [{"op": "k", "shape": f"s{i}", "provider": "apr", "ms": 1.0},
                 {"op": "k", "shape": f"s{i}", "provider": "torch", "ms": r}]
    _write(tmp_path / "k-test.json", "k", rows)
    assert report.main([str(tmp_path), "--shapes", "3"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("k ")]
    assert [line.split()[1] for line in lines[:3]] == ["s0", "s3", "s6"], lines
    geo = math.prod(ratios) ** (1 / len(ratios))
    assert "(all 7 shapes)" in lines[3] and f"{geo:.2f}x gm" in lines[3], lines[3]
    assert f"{min(ratios):.2f}x to {max(ratios):.2f}x" in lines[3], lines[3]


def test_report_no_ceiling_for_host_io_and_no_invented_rates(tmp_path, capsys):
    _write(tmp_path / "ceilings-t.json", "ceilings", [{"op": "copy", "provider": "torch", "gbs": 100.0}])
    _write(tmp_path / "load-t.json", "load", [
        {"op": "load_warm", "provider": "apr", "ms": 2.0, "bytes": 10**9},      # zero-copy: no GB/s
        {"op": "load_warm", "provider": "safetensors", "ms": 4.0, "bytes": 10**9},
        {"op": "touch", "provider": "apr", "ms": 500.0, "gbs": 2.0, "bytes": 10**9}], meta={"ours": "apr"})
    run = _rows.load_run(tmp_path / "load-t.json")
    assert [r.gbs for r in run.rows] == [None, None, 2.0]
    assert report.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    load = next(line for line in out.splitlines() if line.startswith("load_warm"))
    assert "2.00x" in load and "%" not in load, load


def test_report_falls_back_to_a_bench_own_ceiling(tmp_path, capsys):
    copy = random.uniform(1000, 4000)
    gbs = random.uniform(100, 900)
    _write(tmp_path / "rms_norm-t.json", "rms_norm", [
        {"op": "rms_norm", "shape": "8x8", "provider": "apr", "ms": 1.0, "gbs": gbs},
        {"op": "rms_norm", "shape": "8x8", "provider": "torch", "ms": 2.0}], meta={"ceilings": {"copy_gbs": copy}})
    assert report.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "(measured by the benches themselves)" in out, out
    line = next(line for line in out.splitlines() if line.startswith("rms_norm"))
    assert f"{gbs / copy:.0%} BW" in line, line


def test_report_exits_2_without_results(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "no benchmark results" in capsys.readouterr().err


def test_pytest_benchmark_loader_file_runs_and_reports(tmp_path):
    """bench/pytest_load.py (the pytest-benchmark view of the loader) runs once per case and writes
    JSON that report.py lines up as ours vs the safetensors/zlib baselines."""
    pytest.importorskip("pytest_benchmark")
    out = tmp_path / "load-pytest-benchmark.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(BENCH / "pytest_load.py"),
                           "--benchmark-min-rounds=1", "--benchmark-max-time=0.01", "--benchmark-warmup=off",
                           f"--benchmark-json={out}"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = _rows.load_run(out)
    by = {(r.kernel, r.provider) for r in run.rows}
    assert {("load_warm", "apr"), ("load_warm", "safetensors_load_file"), ("crc32", "zlib")} <= by
