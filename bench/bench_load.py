"""Loading an APR file vs safetensors, on the same tensors (Qwen2-0.5B shapes, bf16, ~1 GB, 290).

Rows (op / provider):
  load_warm, load_cold       apr (apr_kernels.load), safetensors_load_file, safetensors_safe_open:
                             open + build every tensor (zero-copy on CPU: no data is read);
                             apr_read (load(mmap=False): the file read into memory by parallel
                             preads, for network filesystems) vs safetensors_read_bytes
                             (safetensors.torch.load(f.read()), the advice for such filesystems)
  touch_warm, touch_cold     the same plus reading one byte of every page of every tensor, so the
                             data really comes from the page cache (warm) or the disk (cold)
  load_small                 apr load of a file with the same 290 names but tiny shapes: warm
                             load should be O(tensors), not O(bytes)
  crc32                      apr_verify (footer check through pread, GIL released) and apr_crc32
                             (the CRC kernel on an in-memory buffer) vs zlib.crc32 on the same bytes
  load_cuda_warm/_cold       (--device cuda) apr load(device="cuda") vs safetensors
                             load_file(device="cuda"), plus pinned host-to-device bandwidth
  save                       apr (apr_kernels.save: temporary file, fsync, rename) vs safetensors
                             save_file (also followed by an fsync, as apr's save does) and
                             torch.save of the same tensors;
                             others_run: how much a Python thread gets done during a save, over what
                             it does alone (1: the save leaves the GIL to other threads, 0: it holds
                             it; safetensors #541)
  checkpoint_stall           how long a training loop is stopped by a checkpoint of these tensors:
                             apr_sync (the save) vs apr_async (train --async-checkpoint: the host
                             snapshot, then a background thread writes) and torch_save
Cold = posix_fadvise(DONTNEED) on the file with no mapping of it alive (checked with mincore).
Use --dir on a real disk for cold numbers: on tmpfs every read is warm.
"""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import shutil
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import apr_kernels  # noqa: E402
from apr_kernels import _apr_ext  # noqa: E402


def qwen2_shapes(vocab=151936, hidden=896, inter=4864, layers=24, heads=14, kv=2) -> dict[str, tuple]:
    hd = hidden // heads
    s = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        s.update({p + "self_attn.q_proj.weight": (heads * hd, hidden), p + "self_attn.q_proj.bias": (heads * hd,),
                  p + "self_attn.k_proj.weight": (kv * hd, hidden), p + "self_attn.k_proj.bias": (kv * hd,),
                  p + "self_attn.v_proj.weight": (kv * hd, hidden), p + "self_attn.v_proj.bias": (kv * hd,),
                  p + "self_attn.o_proj.weight": (hidden, heads * hd),
                  p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                  p + "mlp.down_proj.weight": (hidden, inter),
                  p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)})
    return s


def make_tensors(shapes) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g, dtype=torch.float32).to(torch.bfloat16) for n, s in shapes.items()}


def drop_cache(path: Path) -> float:
    """Evict ``path`` from the page cache; returns the fraction still resident (mincore)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd) if hasattr(os, "fdatasync") else None
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return resident_fraction(path)


def resident_fraction(path: Path) -> float:
    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY)
        try:
            page = mmap.PAGESIZE
            vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
            buf = ctypes.c_char.from_buffer(mm)
            try:
                if libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(size), vec) != 0:
                    return float("nan")
            finally:
                del buf
            return sum(v & 1 for v in vec) / len(vec)
        finally:
            mm.close()


def touch(tensors: dict[str, torch.Tensor]) -> None:
    """Read one byte per 4 KiB page of every tensor (forces the data in)."""
    for t in tensors.values():
        b = t.reshape(-1).view(torch.uint8)
        if b.numel():
            b[::4096].max()


def st_safe_open(path, device="cpu"):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=device) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def timed_cold(path: Path, fn, reps: int) -> tuple[float, float]:
    """Median ms of ``fn()`` with the file evicted before each call; and the residency seen."""
    times, resident = [], []
    for _ in range(reps):
        gc.collect()
        resident.append(drop_cache(path))
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
        del out
    times.sort()
    return times[len(times) // 2], max(resident)


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu",
                      help="cuda: also time loads to the GPU (default when one is present)"),
        p.add_argument("--dir", type=Path, default=None, help="where the test files go (a real disk for cold)")))
    from safetensors.torch import load as st_load_bytes
    from safetensors.torch import load_file, save_file

    if args.smoke:
        shapes = qwen2_shapes(vocab=2048, hidden=64, inter=128, layers=24, heads=4, kv=2)
        reps, cold_reps = 5, 2
    elif args.quick:
        shapes, reps, cold_reps = qwen2_shapes(), 8, 1
    else:
        shapes, reps, cold_reps = qwen2_shapes(), 20, 3
    small = qwen2_shapes(vocab=64, hidden=16, inter=32, layers=24, heads=4, kv=2)
    folder = Path(tempfile.mkdtemp(prefix="bench_load_", dir=args.dir))
    rows: list[dict] = []
    try:
        tensors = make_tensors(shapes)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        apr, st = folder / "m.apr", folder / "m.safetensors"
        apr_kernels.save(tensors, apr)
        save_file(tensors, str(st))
        apr_kernels.save(make_tensors(small), folder / "small.apr")
        case = {"case": "qwen2-0.5b-bf16" if not args.smoke else "smoke", "tensors": len(shapes), "bytes": nbytes}
        rows += save_rows(tensors, folder, nbytes, case, 1 if args.smoke else 2 if args.quick else 3)
        del tensors
        gc.collect()
        cpu = torch.device("cpu")
        providers = {"apr": lambda: apr_kernels.load(apr), "safetensors_load_file": lambda: load_file(str(st)),
                     "safetensors_safe_open": lambda: st_safe_open(st),
                     "apr_read": lambda: apr_kernels.load(apr, mmap=False),
                     "safetensors_read_bytes": lambda: st_load_bytes(st.read_bytes())}
        for name, fn in providers.items():
            path = apr if name.startswith("apr") else st
            ms = _common.time_ms(fn, warmup=2, rep=reps, dev=cpu)
            rows.append({"op": "load_warm", "provider": name, "ms": ms, **case})
            ms = _common.time_ms(lambda: touch(fn()), warmup=1, rep=max(3, reps // 3), dev=cpu)
            rows.append({"op": "touch_warm", "provider": name, "ms": ms, "gbs": nbytes / ms / 1e6, **case})
            ms, res = timed_cold(path, fn, cold_reps)
            rows.append({"op": "load_cold", "provider": name, "ms": ms, "resident_before": res, **case})
            ms, res = timed_cold(path, lambda: touch(fn()), cold_reps)
            rows.append({"op": "touch_cold", "provider": name, "ms": ms, "gbs": nbytes / ms / 1e6,
                         "resident_before": res, **case})
        ms = _common.time_ms(lambda: apr_kernels.load(folder / "small.apr"), warmup=2, rep=reps, dev=cpu)
        rows.append({"op": "load_small", "provider": "apr", "ms": ms, "case": "same names, tiny shapes",
                     "tensors": len(small), "bytes": (folder / "small.apr").stat().st_size})

        # CRC: full-file verify, and the kernel alone vs zlib on the same in-memory bytes.
        size = apr.stat().st_size
        with apr_kernels.open(apr) as f:
            ms = _common.time_ms(f.verify, warmup=1, rep=max(3, reps // 3), dev=cpu)
        rows.append({"op": "crc32", "provider": "apr_verify", "ms": ms, "gbs": size / ms / 1e6, "bytes": size,
                     "impl": _apr_ext.crc32_impl()})
        data = apr.read_bytes()
        for name, fn in (("apr_crc32", lambda: _apr_ext.crc32(data)), ("zlib", lambda: zlib.crc32(data))):
            ms = _common.time_ms(fn, warmup=1, rep=max(3, reps // 3), dev=cpu)
            rows.append({"op": "crc32", "provider": name, "ms": ms, "gbs": size / ms / 1e6, "bytes": size})
        del data

        if args.device == "cuda":
            rows += cuda_rows(apr, st, nbytes, case, reps, cold_reps)
    finally:
        gc.collect()
        shutil.rmtree(folder, ignore_errors=True)

    _common.print_table(rows, ["op", "provider", "ms", "gbs", "resident_before"])
    print_ratios(rows)
    print("wrote", _common.write_results("load", rows, args.out,
                                         {"ours": ["apr", "apr_read", "apr_verify", "apr_crc32", "apr_async"]}))


def others_run(fn, alone: float | None = None) -> tuple[float, float]:
    """(seconds ``fn()`` took, the iterations per second a counting Python thread made meanwhile over its
    rate alone, ``alone`` or measured here): near 1 when ``fn`` leaves the GIL free (I/O, CRC), near 0
    when it holds it."""
    import threading

    def rate(during) -> tuple[float, float]:
        stop, count = threading.Event(), [0]

        def spin():
            n = 0
            while not stop.is_set():
                n += 1
            count[0] = n

        thread = threading.Thread(target=spin)
        t0 = time.perf_counter()
        thread.start()
        during()
        took = time.perf_counter() - t0
        stop.set()
        thread.join()
        return took, count[0] / took

    took, busy = rate(fn)
    if alone is None:
        alone = alone_rate()
    return took, busy / alone


def _timed(fn, after=None) -> float:
    """Seconds ``fn()`` took (then ``after()``, untimed)."""
    t0 = time.perf_counter()
    fn()
    took = time.perf_counter() - t0
    if after is not None:
        after()
    return took


def alone_rate() -> float:
    """Iterations per second of ``others_run``'s counting thread with nothing else running."""
    return others_run(lambda: time.sleep(0.3), alone=1.0)[1]


def save_rows(tensors: dict, folder: Path, nbytes: int, case: dict, reps: int) -> list[dict]:
    """``save`` and ``checkpoint_stall`` rows (module docstring); each save to a fresh file name."""
    from safetensors.torch import save_file

    from apr_kernels.train.async_checkpoint import CheckpointWriter

    rows, n = [], iter(range(1 << 30))
    folder = folder / "saves"
    folder.mkdir()
    def synced(path: Path) -> None:  # (what apr's save does before its rename: the bytes on the disk)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def st_synced():
        path = folder / f"s{next(n)}.safetensors"
        save_file(tensors, str(path))
        synced(path)

    savers = {"apr": lambda: apr_kernels.save(tensors, folder / f"s{next(n)}.apr"),
              "safetensors_save_file": lambda: save_file(tensors, str(folder / f"s{next(n)}.safetensors")),
              "safetensors_save_file_fsync": st_synced,
              "torch_save": lambda: torch.save(tensors, folder / f"s{next(n)}.pt")}
    def clear() -> None:  # (after every save: each writes into freed space, not behind the others' backlog)
        for p in folder.iterdir():
            p.unlink()

    alone = alone_rate()
    for name, fn in savers.items():
        fn()  # (warm-up: the first write of a file system can cost more)
        clear()
        ms = 1e3 * min(_timed(fn, clear) for _ in range(reps))
        # (timed apart: the counting thread holds the GIL for whole switch intervals, which slows a save
        # that needs it between its tensors)
        rows.append({"op": "save", "provider": name, "ms": ms, "gbs": nbytes / ms / 1e6,
                     "others_run": round(others_run(fn, alone)[1], 3), **case})
        clear()
    writer = CheckpointWriter(True, host_state=True)  # (a CPU run's: the snapshot clones every tensor)
    stalls = {"apr_sync": savers["apr"], "torch_save": savers["torch_save"],
              "apr_async": lambda: writer.write(tensors, folder / f"s{next(n)}.apr", metadata={})}
    for name, fn in stalls.items():
        times = []
        for _ in range(reps):
            times.append(_timed(fn))
            writer.wait()  # (outside the timing: the write the loop does not wait for)
            clear()
        ms = 1e3 * min(times)
        rows.append({"op": "checkpoint_stall", "provider": name, "ms": ms, "gbs": nbytes / ms / 1e6, **case})
    return rows


def cuda_rows(apr: Path, st: Path, nbytes: int, case: dict, reps: int, cold_reps: int) -> list[dict]:
    from safetensors.torch import load_file

    dev = torch.device("cuda")
    rows = []
    pinned = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(pinned, device=dev)
    ms = _common.time_ms(lambda: dst.copy_(pinned, non_blocking=True), warmup=3, rep=10, dev=dev)
    rows.append({"op": "h2d_pinned", "provider": "torch_copy", "ms": ms, "gbs": pinned.numel() / ms / 1e6,
                 "bytes": pinned.numel()})
    del pinned, dst
    providers = {"apr": lambda: apr_kernels.load(apr, device="cuda"),
                 "safetensors_load_file": lambda: load_file(str(st), device="cuda")}
    for name, fn in providers.items():
        path = apr if name == "apr" else st
        ms = _common.time_ms(fn, warmup=1, rep=max(3, reps // 3), dev=dev)
        rows.append({"op": "load_cuda_warm", "provider": name, "ms": ms, "gbs": nbytes / ms / 1e6, **case})
        ms, res = timed_cold(path, fn, cold_reps)
        rows.append({"op": "load_cuda_cold", "provider": name, "ms": ms, "gbs": nbytes / ms / 1e6,
                     "resident_before": res, **case})
    return rows


def print_ratios(rows: list[dict]) -> None:
    by = {(r["op"], r["provider"]): r["ms"] for r in rows}
    print("\nratios (how many times faster apr is; > 1: apr wins)")
    for op in ("load_warm", "touch_warm", "load_cold", "touch_cold", "load_cuda_warm", "load_cuda_cold"):
        if (op, "apr") not in by:
            continue
        others = {p: ms for (o, p), ms in by.items()  # apr_read has its own baseline, below
                  if o == op and not p.startswith("apr") and p != "safetensors_read_bytes"}
        if others:
            best = min(others, key=others.get)
            print(f"  {op:15s} vs {best:24s} {others[best] / by[op, 'apr']:6.2f}x   "
                  + "  ".join(f"{p}: {ms / by[op, 'apr']:.2f}x" for p, ms in others.items()))
        if (op, "apr_read") in by and (op, "safetensors_read_bytes") in by:
            print(f"  {op:15s} apr_read vs safetensors_read_bytes "
                  f"{by[op, 'safetensors_read_bytes'] / by[op, 'apr_read']:6.2f}x")
    if ("load_small", "apr") in by:
        print(f"  load_warm (1 GB-class) / load_small (tiny): {by['load_warm', 'apr'] / by['load_small', 'apr']:.2f} "
              "(about 1: O(tensors), not O(bytes))")
    for op, ours in (("save", "apr"), ("checkpoint_stall", "apr_async")):
        others = {p: ms for (o, p), ms in by.items() if o == op and p != ours}
        if (op, ours) in by and others:
            print(f"  {op:15s} {ours} vs " + "  ".join(f"{p}: {ms / by[op, ours]:.2f}x" for p, ms in others.items()))
    if ("crc32", "zlib") in by:
        print(f"  crc32: apr kernel {by['crc32', 'zlib'] / by['crc32', 'apr_crc32']:.2f}x zlib, "
              f"full verify {by['crc32', 'zlib'] / by['crc32', 'apr_verify']:.2f}x zlib")


if __name__ == "__main__":
    main()
