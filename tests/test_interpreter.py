"""The fixes ``apr_kernels.kernels`` makes to Triton's interpreter (CPU, ``TRITON_INTERPRET=1``): loop
bounds derived from ``tl.program_id`` (NumPy >= 2.4 rejects int() of a 1-element array), and the
language patched once a launch, not again at each call of a ``@triton.jit`` helper. Each kernel here
against the same sum in PyTorch."""

import pytest
import torch

from kernel_helpers import kernel_module

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's interpreter (CPU) only")

if not torch.cuda.is_available():
    kernel_module("rms_norm")  # (the interpreter set up and apr_kernels.kernels' fixes applied)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _scaled(x, scale):
    return x * scale


@triton.jit
def _row_sums(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
    # row r sums its first r + 1 blocks: a loop bound from tl.program_id, a helper called per block
    row = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for b in range(row + 1):
        offs = b * BLOCK + tl.arange(0, BLOCK)
        acc += _scaled(tl.load(x_ptr + row * n_cols + offs, mask=offs < n_cols, other=0.0), 0.5)
    tl.store(out_ptr + row, tl.sum(acc, axis=0))


def test_program_id_loop_bound_and_helpers_match_torch():
    rows, block = 4, 8
    x = torch.randn(rows, rows * block)
    out = torch.empty(rows)
    _row_sums[(rows,)](x, out, x.shape[1], BLOCK=block)
    want = torch.stack([0.5 * x[r, :(r + 1) * block].sum() for r in range(rows)])
    torch.testing.assert_close(out, want)


def test_language_patched_once_a_launch_and_restored_after(monkeypatch):
    from triton.runtime import interpreter

    patched = []
    real = interpreter._patch_builtin
    monkeypatch.setattr(interpreter, "_patch_builtin", lambda pkg, *a: patched.append(pkg) or real(pkg, *a))
    block = 8
    x = torch.randn(4, 4 * block)
    counts = []
    for rows in (1, 1, 4):  # the helper called once, once, then 10 times
        patched.clear()
        out = torch.empty(rows)
        _row_sums[(rows,)](x, out, x.shape[1], BLOCK=block)
        counts.append(len(patched))
        torch.testing.assert_close(out, torch.stack([0.5 * x[r, :(r + 1) * block].sum() for r in range(rows)]))
        assert tl.core.is_builtin(tl.load)  # (the launch's patches undone after it)
    # the launch's patches (tl, tl.tensor, tl.math, tensor descriptors) whatever the helper's calls
    # (Triton alone: 20 and 92, four more at each jitted call, tl.sum's too; the first launch may add
    # tl.core's for tl.sum, which Triton's helpers leave in place)
    assert counts[1] == counts[2] == 4, counts
