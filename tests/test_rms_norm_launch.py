"""RMSNorm launch path: the tuned launch heuristic, the cached direct launch, the inference path
without rstd, the single-program dweight, and an ahead-of-time sm_90 build of every variant."""

import pytest
import torch

import apr_kernels
from apr_kernels import backend

from kernel_helpers import run_sm90_compile
from test_rms_norm import REL, _inputs, _kernels, assert_rel, oracle


def test_launch_config_tuned_and_sane():
    k = _kernels()
    # the H200 sweep's picks (bench_rms_norm.py --tune, 16384 rows)
    assert k.launch_config(16384, 896) == k.RowConfig(4, 1024, 4, 1)
    assert k.launch_config(16384, 896, True) == k.RowConfig(4, 1024, 2, 2)
    assert k.launch_config(16384, 4096) == k.RowConfig(2, 4096, 8, 1)
    assert k.launch_config(16384, 8192, True) == k.RowConfig(2, 8192, 16, 1)
    for n in (1, 7, 64, 96, 200, 512, 896, 1000, 2048, 3000, 5120, 8192, 12000, 32768, 65536):
        for m in (1, 3, 100, 65536):
            for bwd in (False, True):
                c = k.launch_config(m, n, bwd)
                assert c.block_n >= n and c.block_n & (c.block_n - 1) == 0, (n, c)
                assert 1 <= c.block_m <= max(1, 1 << (m - 1).bit_length()) and c.block_m & (c.block_m - 1) == 0
                assert c.num_warps in (1, 2, 4, 8, 16, 32) and c.programs_per_sm >= 1, (n, m, c)
                assert c.block_m * c.block_n <= 16384 or c.block_m == 1, (n, m, c)
    with pytest.raises(ValueError, match="hidden size 65537 exceeds"):
        k.launch_config(4, 65537)


class _FakeCompiled:
    function, packed_metadata = "fn-handle", "packed"

    def __init__(self, log):
        self.log = log

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *a):
        self.log.append(("direct", a))


class _FakeJit:
    """Stands for a @triton.jit kernel: fn[grid](*args, num_warps=) launches and returns the kernel."""

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def launch(*args, num_warps):
            self.log.append(("jit", grid, args, num_warps))
            return _FakeCompiled(self.log)

        return launch


def test_cached_direct_launch_keys_on_every_specialisation(monkeypatch):
    """The first launch of a specialisation goes through Triton's JIT path; repeats call the compiled
    kernel's launcher with the same arguments; any change Triton specialises on (alignment, an int
    becoming 1 or losing % 16, a constexpr, warps, dtype) goes through the JIT path again."""
    k = _kernels()
    monkeypatch.setattr(k, "_FAST_LAUNCH", True)
    monkeypatch.setattr(k, "_compiled", {})
    monkeypatch.setattr(k, "_stream", lambda dev: 1234)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    fn = _FakeJit()
    buf = torch.zeros(64)
    x = buf[:32]
    args, consts = (x, None, 32, 2.5), (4, True)
    k._launch(fn, 5, args, consts, 4, True)
    k._launch(fn, 6, args, consts, 4, True)
    assert fn.log[0] == ("jit", (5,), args + consts, 4)
    kind, a = fn.log[1]
    assert kind == "direct" and a[:4] == (6, 1, 1, 1234) and a[4:6] == ("fn-handle", "packed")
    assert a[9:] == args + consts
    variants = [
        ((buf[1:33], None, 32, 2.5), consts, 4),  # pointer not 16-byte aligned
        ((x, None, 33, 2.5), consts, 4),  # int not % 16
        ((x, None, 1, 2.5), consts, 4),  # int == 1 (a constexpr for Triton)
        ((x.double(), None, 32, 2.5), consts, 4),  # dtype
        ((x, x, 32, 2.5), consts, 4),  # a tensor where None was
        (args, (8, True), 4),  # constexpr value
        (args, consts, 8),  # warps
    ]
    for v_args, v_consts, warps in variants:
        n = len(fn.log)
        k._launch(fn, 5, v_args, v_consts, warps, True)
        assert fn.log[n][0] == "jit", (v_args, v_consts, warps)
    n = len(fn.log)
    k._launch(fn, 5, args, consts, 4, True)
    k._launch(fn, 5, args, consts, 4, False)  # CPU tensors: always the plain launch
    assert [e[0] for e in fn.log[n:]] == ["direct", "jit"]


@pytest.mark.parametrize("fused", [False, True])
def test_inference_path_skips_rstd_same_output(fused, monkeypatch):
    """Without autograd the public ops launch the forward with need_rstd=False and give bit-identical
    outputs to the autograd path."""
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    k = _kernels()
    seen = []
    for name in ("rms_norm_fwd", "add_rms_norm_fwd"):
        fn = getattr(k, name)
        monkeypatch.setattr(k, name, lambda *a, _fn=fn, **kw: seen.append(kw.get("need_rstd", True)) or _fn(*a, **kw))
    x, w = _inputs((3, 5, 200), torch.float16)
    r = torch.randn(3, 5, 200, dtype=torch.float16)
    call = (lambda *t: apr_kernels.add_rms_norm(t[0], r, t[1])) if fused else (lambda *t: (apr_kernels.rms_norm(*t),))
    with torch.no_grad():
        infer = call(x, w)
    train = call(x.clone().requires_grad_(), w.clone().requires_grad_())
    assert seen == [False, True]
    assert train[0].grad_fn is not None and infer[0].grad_fn is None
    for a, b in zip(infer, train):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)
    y64 = oracle(x, w, 1e-6, residual=r if fused else None)[0]
    assert_rel(infer[0], y64, REL[torch.float16], "y (no grad)")
    y, rstd = k.rms_norm_fwd(x, w, need_rstd=False)
    assert rstd is None and torch.equal(y, infer[0]) if not fused else rstd is None


@pytest.mark.parametrize("wdtype", [torch.float32, torch.float16])
def test_single_program_dweight_equals_partials(wdtype, monkeypatch):
    """Few rows: one program writes dw itself (cast to w's dtype), deterministic, as right as the
    two-kernel path (partials + reduction) against fp64; dx is the same bit for bit."""
    k = _kernels()
    m, n = 7, 100
    cfg = k.RowConfig(block_m=2, block_n=128, num_warps=2, programs_per_sm=1)  # 4 row blocks
    x, w = _inputs((m, n), torch.float32, wdtype)
    dy = torch.randn(m, n)
    rstd = k.rms_norm_fwd(x, w)[1]
    outs = []
    assert k.SINGLE_PROGRAM_DW_BLOCKS >= 4
    for blocks in (k.SINGLE_PROGRAM_DW_BLOCKS, 0):  # one program; then 2 programs + reduction
        monkeypatch.setattr(k, "SINGLE_PROGRAM_DW_BLOCKS", blocks)
        outs.append(k.rms_norm_bwd(dy, x, w, rstd, config=cfg))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    assert outs[0][1].dtype == outs[1][1].dtype == wdtype
    monkeypatch.setattr(k, "SINGLE_PROGRAM_DW_BLOCKS", 4)
    assert torch.equal(k.rms_norm_bwd(dy, x, w, rstd, config=cfg)[1], outs[0][1])  # run to run
    y64, x64, w64 = oracle(x, w.float(), 1e-6)
    y64.backward(dy.double())
    assert_rel(outs[0][1], w64.grad, REL[wdtype], "dw (one program)")
    assert_rel(outs[1][1], w64.grad, REL[wdtype], "dw (partials)")


# The interpreter accepts code the GPU compiler rejects: build every kernel variant the launchers
# use (None pointers, the single-program dw, the tuned configs) for sm_90 and run ptxas on it.
_AOT = r"""
import json, sys
import triton
from triton.compiler import ASTSource
from apr_kernels.kernels import rms_norm as K
out = []
def build(fn, ptrs, const, warps, case):
    sig = {a: "constexpr" if a in const else ptrs.get(a, "fp32" if a == "eps" else "i32") for a in fn.arg_names}
    k, res = compile_sm90(ASTSource(fn=fn, signature=sig, constexprs=const), {"num_warps": warps})
    out.append(dict(case=case, rc=res.returncode, err=res.stderr[-300:]))
FWD = {"X": "*bf16", "R": "*bf16", "Y": "*bf16", "S": "*bf16", "W": "*bf16", "RSTD": "*fp32"}
BWD = {"DY": "*bf16", "X": "*bf16", "W": "*bf16", "RSTD": "*fp32", "DS": "*bf16", "DX": "*bf16", "DW_PART": "*fp32"}
for n in json.loads(sys.argv[1]):
    c, b = K.launch_config(16384, n), K.launch_config(16384, n, True)
    for extra in (False, True):
        const = dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, HAS_RESIDUAL=extra, STORE_RSTD=extra)
        build(K._rms_norm_fwd_kernel, FWD, const if extra else dict(const, R=None, S=None, RSTD=None),
              c.num_warps, [n, "fwd", extra])
        const = dict(BLOCK_M=b.block_m, BLOCK_N=b.block_n, BLOCKS_PER_PROG=4, HAS_DS=extra)
        build(K._rms_norm_bwd_kernel, BWD, const if extra else dict(const, DS=None), b.num_warps, [n, "bwd", extra])
    build(K._rms_norm_bwd_kernel, dict(BWD, DW_PART="*bf16"),
          dict(BLOCK_M=b.block_m, BLOCK_N=b.block_n, BLOCKS_PER_PROG=2, HAS_DS=False, DS=None), b.num_warps,
          [n, "bwd single program", False])
build(K._rms_norm_bwd_dw_kernel, {"DW_PART": "*fp32", "DW": "*bf16"}, dict(BLOCK_P=128, BLOCK_N=32, STEPS=2), 4,
      [0, "dw", False])
print(json.dumps(out))
"""


def test_kernels_compile_for_sm90(tmp_path):
    widths = [96, 896, 8192]  # the narrow rule, a tuned width, the widest tuned (the compile is slow)
    results = run_sm90_compile(_AOT, widths, tmp_path, timeout=300)
    # (each compiling process also builds the width-independent dW kernel once)
    assert len([r for r in results if r["case"][1] != "dw"]) == 5 * len(widths)
    assert any(r["case"][1] == "dw" for r in results)
    for r in results:
        assert r["rc"] == 0, f"ptxas rejected {r['case']}: {r['err']}"
