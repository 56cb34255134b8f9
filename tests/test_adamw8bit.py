"""``--optimizer adamw8bit``: AdamW with block-wise 8-bit moments (``train/adamw8bit.py``), against
torchao's AdamW8bit (the same paper, written independently) and torch's fp32 AdamW, and in the
trainer: the loss curve, exact resume from the checkpoint's 8-bit moments, the refusals."""

import pytest
import torch

from apr_kernels.train.adamw8bit import BLOCK, AdamW8bit, Blockwise8bit, dequantize, dynamic_map, quantize
from test_train_cli import HELD, TRAIN, json_lines, run


def test_dynamic_maps_are_256_sorted_codes_from_a_millionth_to_one():
    for signed in (True, False):
        q = dynamic_map(signed)
        assert q.shape == (256,) and torch.all(q[1:] > q[:-1])
        assert q.max() == 1.0 and (0.0 in q.tolist())
        positive = q[q > 0]
        # the first midpoint of (0.1, 1] split in 1 (signed) or 2 pieces, at 10^-6
        assert positive.min() == pytest.approx(0.55e-6 if signed else 0.325e-6)
    assert dynamic_map(True).min() == pytest.approx(-dynamic_map(True)[-2])  # symmetric but for +1
    assert dynamic_map(False).min() == 0.0


def test_quantisation_error_is_bounded():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, generator=g) * torch.logspace(-2, 0, 10_000)
    for signed, values in ((True, x), (False, x.abs())):
        qmap = dynamic_map(signed)
        codes, absmax = quantize(values, qmap)
        assert codes.dtype == torch.uint8 and codes.numel() == 40 * BLOCK and absmax.numel() == 40
        back = dequantize(codes, absmax, qmap, values.shape)
        # each value lands on the nearest code: at most half the widest gap of the map, times its block's absmax
        scale = torch.nn.functional.pad(values.abs(), (0, 40 * BLOCK - 10_000)).view(40, BLOCK).amax(1)
        err = (back - values).abs().view(-1)
        bound = (qmap[1:] - qmap[:-1]).max() / 2 * scale.repeat_interleave(BLOCK)[:10_000]
        assert torch.all(err <= bound * (1 + 1e-5))
        assert (back - values).norm() / values.norm() < 0.02


def _three_optimizers(w0, **kw):
    from torchao.optim import AdamW8bit as TorchaoAdamW8bit

    ps = [torch.nn.Parameter(w0.clone()) for _ in range(3)]
    return ps, [AdamW8bit([ps[0]], **kw), TorchaoAdamW8bit([ps[1]], block_size=256, **kw),
                torch.optim.AdamW([ps[2]], **kw)]


def test_steps_equal_torchaos_adamw8bit_and_track_fp32_adamw():
    pytest.importorskip("torchao")
    torch.manual_seed(0)
    w0 = torch.randn(64, 256) * 0.1
    ps, opts = _three_optimizers(w0, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(8):
        grad = torch.randn(64, 256, generator=g) * torch.logspace(-1, 0, 256) * 0.01
        for p, opt in zip(ps, opts):
            p.grad = grad.clone()
            opt.step()
    moved = (ps[2].data - w0).norm()
    assert (ps[0].data - ps[1].data).norm() / moved < 1e-5  # the same algorithm, the same codes
    assert (ps[0].data - ps[2].data).norm() / moved < 0.05  # and close to full-precision AdamW
    ours, theirs = opts[0].state[ps[0]], opts[1].state[ps[1]]
    torch.testing.assert_close(ours["exp_avg_sq"].dequantize(), theirs["exp_avg_sq"].dequantize(),
                               rtol=1e-5, atol=1e-12)
    assert opts[0].state_bytes() == 2 * (64 * 256 + 4 * 64)  # a byte per moment value + a scale per block


def test_small_tensors_keep_fp32_moments_and_step_as_adamw():
    w0 = torch.randn(1000)
    a, b = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    ours = AdamW8bit([a], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        grad = torch.randn(1000)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step(), ref.step()
    assert torch.is_tensor(ours.state[a]["exp_avg"])
    torch.testing.assert_close(a.data, b.data, rtol=1e-6, atol=1e-7)
    assert not isinstance(ours.state[a]["exp_avg"], Blockwise8bit)


def test_train_command_tracks_adamw_and_resumes_exactly(capsys, tmp_path):
    common = ["--preset", "tiny_llama", "--tokenizer", "bytes", "--data", *TRAIN, "--eval-data", HELD,
              "--max-tokens", "12000", "--batch-size", "2", "--seq-len", "32", "--lr", "3e-3", "--eval-tokens", "96",
              "--json", "--seed", "3", "--no-progress", "--steps", "4"]
    runs = {}
    for opt in ("adamw", "adamw8bit"):
        code, out, err = run(capsys, "train", *common, "--optimizer", opt, "--save-every", "2",
                             "--out", str(tmp_path / opt))
        assert code == 0, err
        runs[opt] = [r["loss"] for r in json_lines(out) if r["event"] == "train"]
    assert runs["adamw8bit"][0] == runs["adamw"][0]  # (the first step's loss comes before any update)
    assert runs["adamw8bit"] == pytest.approx(runs["adamw"], rel=2e-3)
    assert runs["adamw8bit"] != runs["adamw"]
    code, out, err = run(capsys, "train", "--resume", str(tmp_path / "adamw8bit" / "step_000002.apr"), "--json",
                         "--no-progress", "--out", str(tmp_path / "resumed"))
    assert code == 0, err
    assert [r["loss"] for r in json_lines(out) if r["event"] == "train"] == runs["adamw8bit"][2:]
    import apr_kernels

    with apr_kernels.open(tmp_path / "adamw8bit" / "step_000002.apr") as f:
        codes = f.info("__training__.adam8.exp_avg.codes.model.layers.0.mlp.up_proj.weight")
        # a byte per value, the 104 x 48 = 4992 values padded to whole blocks of 256, and a scale per block
        assert codes.dtype == "U8" and tuple(codes.shape) == (20 * 256,)
        assert tuple(f.info("__training__.adam8.exp_avg.absmax.model.layers.0.mlp.up_proj.weight").shape) == (20,)


class _Mesh:  # what FSDP's 1-D device mesh answers
    ndim = 1

    def __init__(self, world: int, rank: int):
        self.world, self.rank = world, rank

    def size(self) -> int:
        return self.world

    def get_local_rank(self) -> int:
        return self.rank

    def get_group(self):  # (no process group behind these facts)
        return None


class _Shard:  # an FSDP parameter's facts: its global shape, Shard(0) on that mesh
    def __init__(self, shape, world: int, rank: int):
        from torch.distributed.tensor import Shard

        self.shape, self.ndim = torch.Size(shape), len(shape)
        self.device_mesh, self.placements = _Mesh(world, rank), (Shard(0),)

    def numel(self) -> int:
        return self.shape.numel()


def test_fsdp_shards_keep_8_bit_moments_only_where_their_rows_start_on_block_boundaries():
    """Under FSDP a rank holds torch.chunk rows: 8-bit moments where every rank's share is whole
    blocks (the whole tensor's blocks, split), fp32 elsewhere; plain tensors by size alone."""
    from apr_kernels.train.adamw8bit import eight_bit_layout
    from apr_kernels.train.distributed import shard_rows

    assert [shard_rows(_Shard((320, 64), 2, r)) for r in (0, 1)] == [(0, 160), (160, 160)]
    assert eight_bit_layout(_Shard((320, 64), 2, 0))  # 160 x 64 = 40 blocks a rank
    assert eight_bit_layout(_Shard((75, 896), 2, 1))  # 38 rows x 896 = 133 blocks
    assert not eight_bit_layout(_Shard((263, 42), 2, 0))  # 132 x 42 = 5544 values: 21.66 blocks
    assert not eight_bit_layout(_Shard((75, 42), 2, 0))  # 3150 values: fp32 in any case
    assert shard_rows(_Shard((3, 4096), 4, 3)) == (3, 0) and eight_bit_layout(_Shard((3, 4096), 4, 3))
    assert eight_bit_layout(torch.empty(64, 64)) and not eight_bit_layout(torch.empty(63, 64))
    assert shard_rows(torch.empty(64, 64)) is None


def test_tensor_parallel_parts_keep_8_bit_moments_only_where_they_are_whole_blocks():
    """A tensor-parallel part (``split``: its dim and the group size): rows in whole blocks, columns
    in rows of whole blocks; the 4096-value floor counts the whole tensor; FSDP's rule on the part."""
    from apr_kernels.train.adamw8bit import eight_bit_layout, split_block_views

    assert eight_bit_layout(torch.empty(32, 64), (0, 2))  # q_proj 64 x 64 split by rows: 8 blocks a rank
    assert not eight_bit_layout(torch.empty(32, 64), None)  # (the same 2048 values whole: fp32)
    assert not eight_bit_layout(torch.empty(16, 64), (0, 2))  # whole 2048 values: fp32 in any case
    assert not eight_bit_layout(torch.empty(33, 200), (0, 2))  # 6600 values: blocks straddle the parts
    assert eight_bit_layout(torch.empty(64, 256), (1, 2)) and eight_bit_layout(torch.empty(7, 512), (1, 4))
    assert not eight_bit_layout(torch.empty(64, 32), (1, 2))  # each row's 32 columns: part of a block
    assert not eight_bit_layout(torch.empty(128, 384), (1, 2))  # 384 columns: blocks cross the rows
    # FSDP's rule on the part: 10 x 128 (5 blocks) sharded over 4 ranks: 3 rows, 1.5 blocks
    assert eight_bit_layout(_Shard((128, 64), 2, 1), (0, 2)) and not eight_bit_layout(_Shard((10, 128), 4, 0), (0, 4))
    assert eight_bit_layout(_Shard((9, 512), 2, 0), (1, 2))  # (5 rows x 512 columns: whole blocks)
    assert split_block_views((64, 512), 1) == ((64, 512), (64, 2))
    assert split_block_views((32, 64), 0) == ((2048,), (8,))


def test_column_parts_of_whole_blocks_quantise_as_the_whole_tensor():
    """The premise of 8-bit moments under tensor parallelism: each rank's columns (rows of whole
    blocks), quantised alone, give the whole tensor's codes and scales at those places."""
    from apr_kernels.train.adamw8bit import split_block_views

    torch.manual_seed(3)
    x = torch.randn(6, 1024) * torch.logspace(-4, 0, 1024)
    qmap = dynamic_map(True)
    codes, absmax = quantize(x, qmap)
    code_view, scale_view = split_block_views(x.shape, 1)
    parts = [quantize(x[:, r * 256:(r + 1) * 256], qmap) for r in range(4)]
    assert torch.equal(torch.cat([c.view(6, 256) for c, _ in parts], 1).reshape(-1), codes)
    assert torch.equal(torch.cat([a.view(6, 1) for _, a in parts], 1).reshape(-1), absmax)
    assert codes.view(code_view).shape == x.shape and absmax.view(scale_view).shape == (6, 4)


def _steps(backend_name, use_backend, w0, grads, **kw):
    use_backend(backend_name)
    p = torch.nn.Parameter(w0.clone())
    opt = AdamW8bit([p], **kw)
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
    return p.detach(), opt.state[p]


@pytest.mark.parametrize("n", [5000, 4096 * 2])
def test_fused_kernel_equals_the_pytorch_step(n, use_backend, monkeypatch):
    """The fused Triton step (in Triton's interpreter here) against the PyTorch reference: the same
    parameters, and the same codes but for values on a rounding edge between two codes."""
    from kernel_helpers import spy_launchers

    torch.manual_seed(0)
    w0 = torch.randn(n) * 0.1
    grads = [torch.randn(n) * torch.linspace(0.001, 0.01, n) for _ in range(4)]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    want, ref = _steps("reference", use_backend, w0, grads, **kw)
    got, fused = _steps("triton", use_backend, w0, grads, **kw)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for key in ("exp_avg", "exp_avg_sq"):
        a, b = fused[key], ref[key]
        assert (a.codes == b.codes).float().mean() > 0.999, key
        torch.testing.assert_close(a.absmax, b.absmax, rtol=1e-6, atol=0)
        assert torch.equal(a.codes[n:], b.codes[n:])  # the padding: zero moments, code of 0.0
    # (and the fused path did run)
    use_backend("triton")
    calls = spy_launchers(monkeypatch, "adamw8bit", ["adamw8bit_step"])
    p = torch.nn.Parameter(w0.clone())
    opt = AdamW8bit([p], **kw)
    p.grad = grads[0].clone()
    opt.step()
    assert calls == ["adamw8bit_step"]


_AOT = r"""
import json, sys
import triton
from triton.compiler import ASTSource
from apr_kernels.kernels import adamw8bit as K
out = []
for dt in json.loads(sys.argv[1]):
    sig = {"P": "*" + dt, "G": "*" + dt, "MC": "*u8", "MA": "*fp32", "VC": "*u8", "VA": "*fp32", "MMIDS": "*fp32",
           "MMAP": "*fp32", "VMIDS": "*fp32", "VMAP": "*fp32", "n": "i64", "lr": "fp32", "beta1": "fp32",
           "beta2": "fp32", "eps": "fp32", "decay": "fp32", "step_size": "fp32", "bias2": "fp32", "BLOCK": "constexpr"}
    k, res = compile_sm90(ASTSource(fn=K._adamw8bit_kernel, signature=sig, constexprs=dict(BLOCK=K.BLOCK)),
                          {"num_warps": 2})
    out.append(dict(case=dt, rc=res.returncode, err=res.stderr[-400:]))
print(json.dumps(out))
"""


def test_fused_kernel_compiles_for_sm90(tmp_path):
    """What the interpreter accepts and a GPU compiler may not: compiled ahead of time for sm_90
    (fp32 master weights, and bf16 parameters) and assembled by ptxas."""
    from kernel_helpers import run_sm90_compile

    results = run_sm90_compile(_AOT, ["fp32", "bf16"], tmp_path, timeout=300)
    assert [r["rc"] for r in results] == [0, 0], results


@pytest.mark.cuda
def test_cuda_fused_step_matches_the_pytorch_step(use_backend):
    torch.manual_seed(0)
    w0 = torch.randn(4096, 1000, device="cuda") * 0.1
    grads = [torch.randn(4096, 1000, device="cuda") * 0.01 for _ in range(3)]
    kw = dict(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    want, ref = _steps("reference", use_backend, w0, grads, **kw)
    got, fused = _steps("auto", use_backend, w0, grads, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for key in ("exp_avg", "exp_avg_sq"):
        assert (fused[key].codes == ref[key].codes).float().mean() > 0.999, key
