"""Launch configurations of the attention kernels (``kernels/attention.py``).

* ``default_config``: the fixed, deterministic table every call uses unless told otherwise.
* ``candidates``: the short list per (head_dim, kernel) that the opt-in autotune times; the default
  is always the first entry.
* ``pick``: the autotune. Only with ``APR_KERNELS_AUTOTUNE=1`` on CUDA tensors, never in the
  interpreter; it times every candidate once per shape key (the first call of a shape pays the
  compiles and timings), caches the winner in this process and records every timing in
  ``tuned_log()`` (the bench writes it out). Not for use under CUDA-graph capture.

A config is ``{"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}``. BLOCK_M tiles query rows, BLOCK_N
key rows. ``fwd``/``dq`` need BLOCK_M % BLOCK_N == 0 (the causal diagonal band is BLOCK_M rows wide),
``dkdv`` needs BLOCK_N % BLOCK_M == 0; every tile dim >= 16 (tl.dot).
"""

from __future__ import annotations

import math
import os
from typing import Callable

import torch

AUTOTUNE_ENV = "APR_KERNELS_AUTOTUNE"
KINDS = ("fwd", "dkdv", "dq")


def cfg(bm: int, bn: int, warps: int, stages: int) -> dict:
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}


def config_name(c: dict) -> str:
    return "{BLOCK_M}x{BLOCK_N}w{num_warps}s{num_stages}".format(**c)


# fp16/bf16 on sm_90, per head_dim bucket (<= 64, else padded to 128) and kernel; entry 0 is the
# default. Defaults are the winners of the H200 sweep (bench/results/h200-2026-11-28-probe,
# qwen2-0.5b S=2048 and llama-3-8b S=4096, bf16 causal): fwd D64 128x64w8s3 244 TF/s, D128 64x64w4s3
# 457; whole backward with dkdv 32x64w4s3 231 (D64) / 317 (D128) and dq 64x32w4s3 233 / 157.
# 8 warps lose wherever the dots' M side (BLOCK_M in fwd/dq, BLOCK_N in dkdv) is < 128 rows: two
# warpgroups then split a 64-row wgmma tile. The others are untested neighbours (more stages, the
# other warp count, the tutorial's 128-row dq tile, fewer stages where shared memory limits blocks
# per SM); each compiles for sm_90a with ptxas with no more spills than its kernel's default
# (test_attention.py's AOT check, given the JIT's 16-byte alignment facts: sm_90a, bf16, causal).
_SM90 = {
    64: {
        "fwd": [cfg(128, 64, 8, 3), cfg(128, 64, 8, 4), cfg(128, 64, 8, 5), cfg(128, 64, 4, 4),
                cfg(128, 128, 8, 2)],
        "dkdv": [cfg(32, 64, 4, 3), cfg(32, 64, 4, 4), cfg(32, 128, 8, 3), cfg(64, 128, 8, 3)],
        "dq": [cfg(64, 32, 4, 3), cfg(64, 32, 4, 4), cfg(64, 64, 4, 3), cfg(128, 64, 8, 3)],
    },
    128: {
        "fwd": [cfg(64, 64, 4, 3), cfg(64, 64, 4, 2), cfg(64, 64, 4, 4), cfg(64, 32, 4, 3),
                cfg(128, 64, 8, 3)],
        "dkdv": [cfg(32, 64, 4, 3), cfg(32, 64, 4, 2), cfg(32, 128, 8, 3), cfg(16, 64, 4, 3)],
        "dq": [cfg(64, 32, 4, 3), cfg(64, 32, 4, 2), cfg(64, 64, 4, 2), cfg(128, 64, 8, 3),
               cfg(128, 32, 8, 3)],
    },
}
# fp32 ("ieee" dots on the FMA units: accepted, not fast): small tiles, larger ones spill heavily.
_FP32 = {"fwd": cfg(32, 16, 8, 2), "dq": cfg(32, 16, 8, 2), "dkdv": cfg(16, 32, 4, 1)}
# Triton interpreter: small tiles so tests with S <= 100 still cross several blocks.
_INTERP = {"fwd": cfg(64, 32, 4, 1), "dq": cfg(64, 32, 4, 1), "dkdv": cfg(32, 64, 4, 1)}


def _np2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _fit(kind: str, c: dict, seqlen: int) -> dict:
    # Short sequences: don't compute (and mask) mostly empty tiles. tl.dot needs every dim >= 16.
    cap = max(16, _np2(seqlen))
    bm, bn = c["BLOCK_M"], c["BLOCK_N"]
    if kind == "dkdv":
        bn = min(bn, cap)
        bm = min(bm, bn)
    else:
        bm = min(bm, cap)
        bn = min(bn, bm)
    return dict(c, BLOCK_M=bm, BLOCK_N=bn)


def candidates(kind: str, head_dim: int, dtype: torch.dtype, seqlen: int, device: torch.device) -> list[dict]:
    """Launch configs worth timing for ``kind`` in ``fwd | dkdv | dq``; entry 0 is the default."""
    if kind not in KINDS:
        raise ValueError(f"kernels/attention_tuning.py: kind must be one of {KINDS}; got {kind!r}")
    if device.type != "cuda":
        raw = [_INTERP[kind]]
    elif dtype == torch.float32:
        raw = [_FP32[kind]]
    else:
        raw = _SM90[64 if head_dim <= 64 else 128][kind]
    out: list[dict] = []
    for c in raw:
        c = _fit(kind, c, seqlen)
        if c not in out:  # the seqlen cap can merge candidates
            out.append(c)
    return out


def default_config(kind: str, head_dim: int, dtype: torch.dtype, seqlen: int, device: torch.device) -> dict:
    """The fixed launch config for ``kind`` in ``fwd | dkdv | dq`` (no timing, deterministic)."""
    return candidates(kind, head_dim, dtype, seqlen, device)[0]


# ------------------------------------------------------------------------------------ autotune

_tuned: dict[tuple, dict] = {}
_log: list[dict] = []


def autotune_requested(t: torch.Tensor) -> bool:
    """APR_KERNELS_AUTOTUNE=1, a CUDA tensor, and not the interpreter (which cannot time kernels)."""
    return (t.is_cuda and os.environ.get(AUTOTUNE_ENV, "") == "1"
            and os.environ.get("TRITON_INTERPRET", "") != "1")


def _gpu_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    # Short: a shape's first call pays this for every candidate (and each one's compile).
    return float(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median"))


def pick(kind: str, key: tuple, cands: list[dict], launch: Callable[[dict], object],
         bench: Callable[[Callable[[], object]], float] | None = None) -> dict:
    """The fastest of ``cands`` for ``(kind, key)``, timing ``launch(config)`` with ``bench`` on the
    first call of that key only. A candidate that fails (does not compile, out of shared memory or
    registers) counts as infinitely slow; if all fail, RuntimeError with each error."""
    full_key = (kind,) + tuple(key)
    hit = _tuned.get(full_key)
    if hit is not None:
        return hit
    bench = bench or _gpu_ms
    times, errors = [], {}
    for c in cands:
        try:
            ms = float(bench(lambda c=c: launch(c)))
        except Exception as e:  # noqa: BLE001 -- any failure of one tile shape only disqualifies it
            ms = math.inf
            errors[config_name(c)] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        times.append(ms)
    best = min(range(len(cands)), key=times.__getitem__)
    if math.isinf(times[best]):
        raise RuntimeError(f"kernels/attention_tuning.py: every {kind} launch config failed for key {key}: {errors}")
    _tuned[full_key] = cands[best]
    _log.append({"kind": kind, "key": list(key), "default": config_name(cands[0]),
                 "best": config_name(cands[best]),
                 "ms": {config_name(c): t for c, t in zip(cands, times)}, "errors": errors})
    return cands[best]


def tuned_log() -> list[dict]:
    """One record per tuned (kind, key): default and best config names, ms of every candidate."""
    return [dict(r) for r in _log]


def clear_tuned() -> None:
    _tuned.clear()
    _log.clear()
