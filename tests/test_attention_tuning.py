"""Attention launch configs: every tile the GPU may run (default table and autotune candidates)
computed by the interpreter against the fp64 oracle, the candidates' tile rules, the opt-in autotune
(APR_KERNELS_AUTOTUNE=1, CUDA only) with its GPU-only parts faked, and an sm_90 ahead-of-time
compile of the default kernels through ptxas (no GPU needed)."""

import math

import pytest
import torch

import apr_kernels
from apr_kernels import backend
from kernel_helpers import run_sm90_compile
from test_attention import REL, _kernels, assert_close, make, oracle


def _gpu_tile_rounds(D):
    """Round i runs the i-th distinct (BLOCK_M, BLOCK_N) of each kernel's sm_90 candidates (the
    default in round 0; warps/stages don't change the interpreter's result)."""
    tiles = {}
    for kind in ("fwd", "dkdv", "dq"):
        cands = tuning().candidates(kind, D, torch.float16, 4096, torch.device("cuda"))
        tiles[kind] = list(dict.fromkeys((c["BLOCK_M"], c["BLOCK_N"]) for c in cands))
    n = max(map(len, tiles.values()))
    return [{kind: dict(zip(("BLOCK_M", "BLOCK_N"), t[i % len(t)]), num_warps=4, num_stages=1)
             for kind, t in tiles.items()} for i in range(n)]


def tuning():
    _kernels()
    return backend.kernels("attention_tuning")


@pytest.mark.parametrize("D,causal,rounds", [(64, True, None), (96, True, None), (128, False, 1)])
def test_gpu_tile_configs_in_interpreter(D, causal, rounds):
    """Every tile shape the H100/H200 may run (the default table and the autotune's candidates),
    computed by the interpreter on a ragged length longer than the largest tile: the block logic
    (diagonal bands of several sub-blocks, boundary masks, padded head_dim) is right for each."""
    k_mod = _kernels()
    S = 200
    q, k, v = (t.detach() for t in make(1, S, 2, 1, D, torch.float16))
    want, _, leaves = oracle(q, k, v, causal, D**-0.5)
    do = torch.randn(want.shape, dtype=torch.float16)
    want.backward(do.double())
    for cfg in _gpu_tile_rounds(D)[:rounds]:
        o, lse = k_mod.attention_fwd(q, k, v, causal, D**-0.5, config=cfg["fwd"])
        grads = k_mod.attention_bwd(do, q, k, v, o, lse, causal, D**-0.5, config=cfg)
        assert_close(o, want, REL[torch.float16], f"o {cfg['fwd']}")
        for name, got, ref in zip("qkv", grads, leaves):
            assert_close(got, ref.grad, 2 * REL[torch.float16], f"d{name} {cfg}")


def test_tile_candidates_valid_and_default_first():
    """Every candidate respects the kernels' tile rules; the default is entry 0; short sequences
    shrink the tiles (and merge duplicates); off CUDA there is one (interpreter) config."""
    t = tuning()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for D in (32, 64, 80, 128):
        for dt in (torch.float16, torch.bfloat16, torch.float32):
            for S in (1, 17, 100, 4096):
                for kind in ("fwd", "dkdv", "dq"):
                    cands = t.candidates(kind, D, dt, S, cuda)
                    assert cands[0] == t.default_config(kind, D, dt, S, cuda)
                    assert len(cands) == len({t.config_name(c) for c in cands}), cands
                    for c in cands:
                        bm, bn = c["BLOCK_M"], c["BLOCK_N"]
                        assert min(bm, bn) >= 16 and c["num_warps"] in (4, 8) and c["num_stages"] >= 1
                        big, small = (bn, bm) if kind == "dkdv" else (bm, bn)
                        assert big % small == 0, f"{kind} {c}: the band logic needs {big} % {small} == 0"
                        assert big <= max(16, 1 << (S - 1).bit_length()), f"{kind} {c} too big for S={S}"
                    if dt != torch.float32 and S == 4096:
                        assert len(cands) >= 3, f"{kind} D={D}: the autotune needs alternatives"
                    assert len(t.candidates(kind, D, dt, S, cpu)) == 1
    with pytest.raises(ValueError, match="kind must be one of"):
        t.candidates("bwd", 64, torch.float16, 64, cuda)


def test_autotune_pick_times_once_and_skips_failures():
    t = tuning()
    t.clear_tuned()
    cands = [t.cfg(64, 32, 4, 3), t.cfg(128, 64, 8, 3), t.cfg(32, 32, 4, 2)]
    fake_ms = {"64x32w4s3": 2.0, "128x64w8s3": None, "32x32w4s2": 1.5}  # None: fails to compile
    launched, benched = [], []

    def launch(c):
        launched.append(t.config_name(c))
        if fake_ms[t.config_name(c)] is None:
            raise RuntimeError("out of resources: shared memory")

    def bench(fn):
        fn()
        benched.append(launched[-1])
        return fake_ms[launched[-1]]

    key = ("bfloat16", 2, 1024, 14, 2, 64, True)
    try:
        best = t.pick("fwd", key, cands, launch, bench)
        assert best == cands[2] and benched == ["64x32w4s3", "32x32w4s2"]
        assert t.pick("fwd", key, cands, launch, bench) == cands[2] and len(launched) == 3  # cached
        log = t.tuned_log()
        assert len(log) == 1 and log[0]["best"] == "32x32w4s2" and log[0]["default"] == "64x32w4s3"
        assert log[0]["ms"]["128x64w8s3"] == math.inf and "out of resources" in log[0]["errors"]["128x64w8s3"]
        with pytest.raises(RuntimeError, match="every dq launch config failed"):
            t.pick("dq", key, cands[1:2], launch, bench)
    finally:
        t.clear_tuned()


def test_autotune_path_end_to_end_in_interpreter(monkeypatch, use_backend):
    """The launcher's autotune wiring (the GPU-only part faked: the request check, the candidate
    list, the timer): every kernel times each candidate on the real buffers, the winner's launch
    writes the result, and the numbers are right whichever config wins."""
    t = tuning()
    t.clear_tuned()
    two = {"fwd": [t.cfg(32, 16, 4, 1), t.cfg(16, 16, 4, 1)], "dq": [t.cfg(32, 16, 4, 1), t.cfg(16, 16, 4, 1)],
           "dkdv": [t.cfg(16, 32, 4, 1), t.cfg(16, 16, 4, 1)]}
    # calls in order: fwd x2, dkdv x2, dq x2 -> the second fwd, first dkdv and second dq "win"
    times = iter([2.0, 1.0, 1.0, 2.0, 2.0, 1.0])
    timed = []

    def fake_ms(fn):
        fn()
        timed.append(1)
        return next(times)

    monkeypatch.setattr(t, "autotune_requested", lambda x: True)
    monkeypatch.setattr(t, "candidates", lambda kind, *a: two[kind])
    monkeypatch.setattr(t, "_gpu_ms", fake_ms)
    use_backend("triton")
    try:
        q, k, v = make(1, 37, 4, 2, 16, torch.float32)
        o = apr_kernels.attention(q, k, v, causal=True)
        do = torch.randn_like(o)
        o.backward(do)
        log = {r["kind"]: r for r in t.tuned_log()}
        assert sorted(log) == ["dkdv", "dq", "fwd"] and len(timed) == 6
        assert log["fwd"]["best"] == "16x16w4s1" and log["dkdv"]["best"] == "16x32w4s1"
        assert log["dq"]["best"] == "16x16w4s1" and log["fwd"]["key"] == ["float32", 1, 37, 4, 2, 16, True, False]
        want, _, leaves = oracle(q, k, v, True, 0.25)
        want.backward(do.double())
        assert_close(o, want, REL[torch.float32], "o (autotuned)")
        for name, g, ref in zip("qkv", (q.grad, k.grad, v.grad), leaves):
            assert_close(g, ref.grad, 2 * REL[torch.float32], f"d{name} (autotuned)")
    finally:
        t.clear_tuned()


def test_autotune_env_ignored_off_cuda(monkeypatch, use_backend):
    """APR_KERNELS_AUTOTUNE=1 never times anything in the interpreter: the default table runs."""
    t = tuning()
    monkeypatch.setenv(t.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(t, "pick", lambda *a, **kw: pytest.fail("autotune ran on CPU"))
    use_backend("triton")
    q, k, v = make(1, 20, 2, 1, 16, torch.float32)
    o = apr_kernels.attention(q, k, v)
    o.sum().backward()
    assert not t.autotune_requested(q)
    assert_close(o, oracle(q, k, v, True, 0.25)[0], REL[torch.float32], "o")


# The interpreter accepts code the GPU compiler rejects (tl.dot with K < 16, math on fp16, ...).
# Compile every kernel for sm_90 (H100/H200) ahead of time, in a clean process without
# TRITON_INTERPRET, and run the PTX through the ptxas that ships with Triton: no GPU needed.
_AOT = r"""
import json, re, sys
import triton
from triton.compiler import ASTSource
from apr_kernels.kernels import attention as A
import torch
PTRS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
out = []
for dt, D, causal, varlen, sliding, *rest in json.loads(sys.argv[1]):
    varlen_k = bool(rest and rest[0])  # packed keys with their own spans (cu_seqlens_k)
    tdt = getattr(torch, dt)
    tname = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[dt]
    bd = max(16, 1 << (D - 1).bit_length())
    base = dict(HEAD_DIM=D, BLOCK_D=bd, EVEN_D=bd == D)
    jobs = [("delta", A._attn_bwd_delta, dict(base, BLOCK_M=64), 4, 1)]
    for kind, fn in (("fwd", A._attn_fwd), ("dkdv", A._attn_bwd_dkdv), ("dq", A._attn_bwd_dq)):
        c = A.default_config(kind, D, tdt, 4096, torch.device("cuda"))
        const = dict(base, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], CAUSAL=causal,
                     DOT_PREC="ieee" if tname == "fp32" else "tf32", VARLEN=varlen, SLIDING=sliding,
                     VARLEN_K=varlen_k)
        if kind == "dkdv":
            const["MASK_M"] = True
            if varlen_k and D > 64:  # (attention_bwd's register rule for per-sequence key spans)
                c = dict(c, num_warps=max(c["num_warps"], 8))
        jobs.append((kind, fn, const, c["num_warps"], c["num_stages"]))
    for kind, fn, const, warps, stages in jobs:
        sig = {n: "constexpr" if n in const else ("*" + tname) if n in PTRS else "*i32" if n in ("CU", "CU_K") else
               "*fp32" if n in ("LSE", "DELTA") else "fp32" if n.endswith("_scale") else "i32"
               for n in fn.arg_names}
        # What the JIT knows at a real launch: 16-byte aligned pointers, and (for [B, S, H, D]
        # tensors with D % 8 == 0 and S % 16 == 0) strides and S divisible by 16. Without these
        # facts loads are not vectorised nor pipelined and ptxas reports misleading registers.
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n not in const
                 and (n in PTRS or n in ("LSE", "DELTA", "S", "SK") or re.fullmatch(r"s[a-z]{2,3}", n))}
        k, res = compile_sm90(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                              {"num_warps": warps, "num_stages": stages})
        spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", res.stderr))
        out.append(dict(case=[dt, D, causal, varlen, sliding, kind], rc=res.returncode, err=res.stderr[-300:], spill=spills,
                        wgmma="wgmma.mma_async" in k.asm["ptx"], smem=k.metadata.shared,
                        cp_async="cp.async" in k.asm["ptx"]))
print(json.dumps(out))
"""


def test_kernels_compile_for_sm90_with_tensor_cores(tmp_path):
    # (dtype, head_dim, causal, varlen, sliding window[, cu_seqlens_k])
    cases = [["bfloat16", 64, True, False, False], ["bfloat16", 128, False, False, False],
             ["float16", 80, True, False, False], ["float32", 64, True, False, False],
             ["bfloat16", 128, True, False, False], ["bfloat16", 64, True, True, False],
             ["bfloat16", 128, True, True, False], ["bfloat16", 128, True, False, True],
             ["bfloat16", 64, True, True, True],
             # packed queries against their own key spans (cu_seqlens_k): context parallelism's documents
             ["bfloat16", 128, True, True, False, True], ["bfloat16", 64, True, True, True, True]]
    results = run_sm90_compile(_AOT, cases, tmp_path, timeout=300)
    assert len(results) == 4 * len(cases)
    dense_spill = {(r["case"][0], r["case"][1], r["case"][2], r["case"][5]): r["spill"] for r in results
                   if not r["case"][3] and not r["case"][4]}
    for r in results:
        dt, D, causal, varlen, sliding, kind = r["case"]
        assert r["rc"] == 0, f"ptxas rejected {r['case']}: {r['err']}"
        assert r["smem"] <= 227 * 1024, f"{r['case']}: {r['smem']} B shared memory > the sm_90 limit"
        if kind != "delta" and dt != "float32":
            assert r["wgmma"], f"{r['case']}: no wgmma in the PTX (not on Hopper tensor cores)"
            assert r["cp_async"], f"{r['case']}: no cp.async in the PTX (K/V loads not pipelined)"
            # the default tiles were picked for few spills; many more means a register blow-up. The
            # varlen and sliding-window variants hold a few more (sequence bounds, window spans): at
            # most 128 B over the plain dense kernel.
            limit = dense_spill.get((dt, D, causal, kind), 128) + 128 if varlen or sliding else 256
            assert r["spill"] <= limit, f"{r['case']}: {r['spill']} bytes of register spill stores"


@pytest.mark.cuda
def test_gpu_autotune_picks_a_candidate_and_stays_correct(monkeypatch, use_backend):
    """The real timer (triton.testing.do_bench) on the GPU, two candidates per kernel to keep the
    compiles few: a winner is recorded for each kernel and the result matches fp32 SDPA."""
    t = tuning()
    t.clear_tuned()
    real = t.candidates
    monkeypatch.setattr(t, "candidates", lambda *a: real(*a)[:2])
    monkeypatch.setenv(t.AUTOTUNE_ENV, "1")
    use_backend("auto")
    q, k, v = make(2, 1024, 14, 2, 64, torch.bfloat16, device="cuda")
    try:
        o = apr_kernels.attention(q, k, v, causal=True)
        do = torch.randn_like(o)
        o.backward(do)
        log = {r["kind"]: r for r in t.tuned_log()}
        assert sorted(log) == ["dkdv", "dq", "fwd"], log
        for r in log.values():
            assert len(r["ms"]) == 2 and all(0 < ms < math.inf for ms in r["ms"].values()), r
    finally:
        t.clear_tuned()
    qt, kt, vt = (x.detach().float().transpose(1, 2).requires_grad_() for x in (q, k, v))
    want = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
    want.backward(do.float().transpose(1, 2))
    assert_close(o, want.transpose(1, 2), REL[torch.bfloat16], "o (autotuned)")
    for name, x, ref in zip("qkv", (q, k, v), (qt, kt, vt)):
        assert_close(x.grad, ref.grad.transpose(1, 2), 2 * REL[torch.bfloat16], f"d{name} (autotuned)")
