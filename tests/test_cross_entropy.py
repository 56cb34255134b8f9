"""linear_cross_entropy (output projection fused with cross entropy): the Triton kernel (interpreter on
CPU) and the reference path against an fp64 oracle written with F.linear + F.cross_entropy, the eager
autocast expression Hugging Face uses, gradcheck, opcheck and torch.compile."""

import pytest
import torch
import torch.nn.functional as F

import apr_kernels
from apr_kernels.ops import cross_entropy as ops
from apr_kernels.ops.reference import cross_entropy_rows_reference
from kernel_helpers import assert_row_kernel_compiles_for_sm90, kernel_module, spy_launchers

BACKENDS = ["triton", "reference"]
REL = {torch.float32: 2e-5, torch.float16: 3e-3}


@pytest.fixture
def kernel_calls(monkeypatch):
    return spy_launchers(monkeypatch, "cross_entropy", ("cross_entropy_rows",))


def _inputs(n_shape, h, v, dtype, ignore=()):
    hidden = (torch.randn(*n_shape, h) * 1.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, h) / h ** 0.5 * 2).to(dtype).requires_grad_()
    targets = torch.randint(0, v, n_shape)
    flat = targets.view(-1)
    for i in ignore:
        flat[i] = -100
    return hidden, weight, targets


def oracle(hidden, weight, targets, reduction="mean"):
    """fp64 F.linear + F.cross_entropy, and its gradients."""
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    loss = F.cross_entropy(F.linear(h64, w64).flatten(0, -2), targets.flatten(), reduction=reduction)
    loss.backward()
    return loss.detach(), h64.grad, w64.grad


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------- fwd + bwd, fp64 oracle


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", [
    # (leading shape, H, V, chunk_rows, ignored rows, reduction)
    ((37,), 16, 1000, 10, (3, 36), "mean"),   # several chunks, the last one short; V not a power of 2
    ((2, 9), 24, 77, None, (0,), "sum"),      # 3-D hidden, one chunk
    ((5,), 32, 4099, 2, (), "mean"),          # V just past a power of two: a nearly empty last block
], ids=["chunks", "3d-sum", "odd-vocab"])
def test_fwd_bwd_vs_fp64(be, dtype, case, use_backend, kernel_calls):
    use_backend(be)
    shape, h, v, chunk, ignore, reduction = case
    hidden, weight, targets = _inputs(shape, h, v, dtype, ignore)
    loss = apr_kernels.linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_rows=chunk)
    loss.backward()
    want, dh, dw = oracle(hidden, weight, targets, reduction)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert abs(loss.item() - want.item()) <= REL[dtype] * abs(want.item()), (loss.item(), want.item())
    assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype
    assert rel_err(hidden.grad, dh) < REL[dtype] * 10, "d hidden"
    assert rel_err(weight.grad, dw) < REL[dtype] * 10, "d weight"
    for i in ignore:  # an ignored position gets no gradient
        assert torch.all(hidden.grad.view(-1, h)[i] == 0)
    n_chunks = -(-targets.numel() // (chunk or targets.numel()))
    assert kernel_calls == (["cross_entropy_rows"] * n_chunks if be == "triton" else [])


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_per_position_losses_and_their_gradients_vs_fp64(be, dtype, use_backend, kernel_calls):
    """reduction="none": each position's loss (0 where ignored), and gradients for any incoming
    per-position gradient (an RL objective's weights, negative ones included), the logits recomputed
    in the backward chunk by chunk."""
    use_backend(be)
    hidden, weight, targets = _inputs((3, 7), 16, 300, dtype, ignore=(4, 20))
    grad = torch.randn(3, 7, dtype=torch.float64)
    losses = apr_kernels.linear_cross_entropy(hidden, weight, targets, reduction="none", chunk_rows=5)
    assert losses.shape == (3, 7) and losses.dtype == torch.float32
    (losses * grad.float()).sum().backward()
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    want = F.cross_entropy(F.linear(h64, w64).flatten(0, 1), targets.flatten(), reduction="none").view(3, 7)
    (want * grad).sum().backward()
    assert losses.view(-1)[4] == 0 and losses.view(-1)[20] == 0
    assert rel_err(losses, want.detach()) < REL[dtype]
    assert rel_err(hidden.grad, h64.grad) < REL[dtype] * 10, "d hidden"
    assert rel_err(weight.grad, w64.grad) < REL[dtype] * 10, "d weight"
    assert torch.all(hidden.grad.view(-1, 16)[[4, 20]] == 0)
    # the forward computes losses only; the backward runs the row kernel again, gradients written
    assert kernel_calls == (["cross_entropy_rows"] * 5 * 2 if be == "triton" else [])


def smoothed_z_oracle(hidden, weight, targets, smoothing, z, reduction):
    """fp64 F.cross_entropy with torch's label_smoothing plus z * logsumexp^2 over counted positions,
    and its gradients."""
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    logits = F.linear(h64, w64).flatten(0, -2)
    t = targets.flatten()
    keep = t != -100
    per = F.cross_entropy(logits, t, reduction="none", label_smoothing=smoothing)
    per = per + z * torch.logsumexp(logits, -1) ** 2 * keep
    loss = per.view(targets.shape) if reduction == "none" else per.sum() / (keep.sum() if reduction == "mean" else 1)
    return loss, h64, w64


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("smoothing,z,reduction", [(0.1, 0.0, "mean"), (0.0, 1e-2, "sum"), (0.2, 5e-3, "none")],
                         ids=["smoothing-mean", "z-loss-sum", "both-per-position"])
def test_label_smoothing_and_z_loss_vs_fp64(be, dtype, smoothing, z, reduction, use_backend, kernel_calls):
    """Label smoothing as F.cross_entropy's and the z-loss (z lse^2 per counted position): losses and
    gradients against fp64, in every reduction (per position: a weighted sum backpropagated)."""
    use_backend(be)
    hidden, weight, targets = _inputs((3, 7), 16, 300, dtype, ignore=(4, 20))
    got = apr_kernels.linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_rows=5,
                                           label_smoothing=smoothing, z_loss=z)
    want, h64, w64 = smoothed_z_oracle(hidden, weight, targets, smoothing, z, reduction)
    grad = torch.randn(3, 7, dtype=torch.float64) if reduction == "none" else torch.tensor(1.0, dtype=torch.float64)
    (got * grad.float()).sum().backward()
    (want * grad).sum().backward()
    assert rel_err(got, want.detach()) < REL[dtype]
    assert rel_err(hidden.grad, h64.grad) < REL[dtype] * 10, "d hidden"
    assert rel_err(weight.grad, w64.grad) < REL[dtype] * 10, "d weight"
    assert torch.all(hidden.grad.view(-1, 16)[[4, 20]] == 0)
    assert bool(kernel_calls) == (be == "triton")


def test_per_position_losses_sum_to_the_summed_op(use_backend):
    """Summing the per-position losses gives the summed op's loss and gradients (two code paths)."""
    use_backend("triton")
    hidden, weight, targets = _inputs((2, 6), 8, 70, torch.float32, ignore=(1,))
    total = apr_kernels.linear_cross_entropy(hidden, weight, targets, reduction="sum", chunk_rows=4)
    total.backward()
    dh, dw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    rows = apr_kernels.linear_cross_entropy(hidden, weight, targets, reduction="none", chunk_rows=4)
    rows.sum().backward()
    torch.testing.assert_close(rows.sum(), total, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(hidden.grad, dh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weight.grad, dw, rtol=1e-5, atol=1e-7)


def test_kernel_rows_vs_reference_in_place():
    """The row launcher alone: losses, the gradient written over strided rows (padding untouched),
    ignored rows zeroed, several blocks per row."""
    k = kernel_module("cross_entropy")
    v, n = 300, 6
    buf = torch.full((n, v + 5), float("nan"))
    buf[:, :v] = torch.randn(n, v) * 4
    targets = torch.tensor([0, v - 1, -100, 17, 150, 299])
    want_logits = buf[:, :v].clone()
    want = cross_entropy_rows_reference(want_logits, targets, torch.empty(n), -100, True)
    x64 = buf[:, :v].double()
    lse = torch.logsumexp(x64, -1)
    assert torch.allclose(want[[0, 1, 3]].double(), (lse[[0, 1, 3]] - x64[[0, 1, 3], targets[[0, 1, 3]]]), rtol=1e-6)
    logits = buf[:, :v]
    loss = k.cross_entropy_rows(logits, targets, torch.full((n,), 7.0), -100, True, block_v=64)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-7)
    assert torch.all(buf[:, v:].isnan()), "padding past V was written"
    assert torch.all(logits[2] == 0) and loss[2] == 0
    assert abs(logits[0].sum().item()) < 1e-5  # softmax - onehot sums to zero
    # label smoothing and the z-loss over several blocks (the running sum of logits kept per lane)
    logits = buf[:, :v]
    logits.copy_(torch.randn(n, v) * 4)
    want_logits = logits.clone()
    want = cross_entropy_rows_reference(want_logits, targets, torch.empty(n), -100, True, 0.2, 1e-2)
    loss = k.cross_entropy_rows(logits, targets, torch.full((n,), 7.0), -100, True, 0.2, 1e-2, block_v=64)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-7)
    assert torch.all(buf[:, v:].isnan()) and loss[2] == 0 and torch.all(logits[2] == 0)


def test_kernel_out_of_range_target_is_nan_not_a_read():
    k = kernel_module("cross_entropy")
    logits = torch.randn(3, 40)
    loss = k.cross_entropy_rows(logits, torch.tensor([5, 40, -3]), torch.empty(3), -100, True)
    assert not loss[0].isnan() and loss[1].isnan() and loss[2].isnan()
    assert logits[1].isnan().all() and not logits[0].isnan().any()


def test_kernel_loss_only():
    """Without a gradient the logits are left as they were."""
    k = kernel_module("cross_entropy")
    logits = torch.randn(4, 100, dtype=torch.float16)
    before = logits.clone()
    loss = k.cross_entropy_rows(logits, torch.tensor([1, 2, 3, 99]), torch.empty(4), -100, False, block_v=32)
    assert torch.equal(logits, before)
    want = F.cross_entropy(before.double(), torch.tensor([1, 2, 3, 99]), reduction="none")
    torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------- semantics of the public op


def test_autocast_matches_eager_hf_expression(use_backend):
    """Under bf16 autocast: the same loss as F.cross_entropy(F.linear(h, w).float(), t) (bf16 logits,
    fp32 cross entropy), fp32 gradients for fp32 parameters."""
    use_backend("reference")
    hidden, weight, targets = _inputs((4, 8), 32, 500, torch.float32, ignore=(5,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = apr_kernels.linear_cross_entropy(hidden, weight, targets, chunk_rows=8)
        eager = F.cross_entropy(F.linear(hidden, weight).float().flatten(0, 1), targets.flatten())
    assert loss.dtype == torch.float32
    assert abs(loss.item() - eager.item()) < 2e-3 * eager.item()
    loss.backward()
    dh, dw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    eager.backward()
    assert dh.dtype == dw.dtype == torch.float32
    assert rel_err(dh, hidden.grad.double()) < 2e-2 and rel_err(dw, weight.grad.double()) < 2e-2


@pytest.mark.parametrize("be", BACKENDS)
def test_all_ignored_and_empty_like_torch(be, use_backend):
    use_backend(be)
    hidden, weight, _ = _inputs((3,), 8, 20, torch.float32)
    targets = torch.full((3,), -1)
    mean = apr_kernels.linear_cross_entropy(hidden, weight, targets, ignore_index=-1)
    assert mean.isnan() and F.cross_entropy(F.linear(hidden, weight), targets, ignore_index=-1).isnan()
    total = apr_kernels.linear_cross_entropy(hidden, weight, targets, ignore_index=-1, reduction="sum")
    total.backward()
    assert total.item() == 0 and torch.all(hidden.grad == 0) and torch.all(weight.grad == 0)
    empty = apr_kernels.linear_cross_entropy(torch.randn(0, 8), weight, torch.zeros(0, dtype=torch.long),
                                             reduction="sum")
    assert empty.item() == 0


def test_chunking_does_not_change_the_result(use_backend):
    use_backend("triton")
    hidden, weight, targets = _inputs((23,), 16, 130, torch.float32)
    results = []
    for chunk in (1, 7, 23):
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        loss = apr_kernels.linear_cross_entropy(h, w, targets, chunk_rows=chunk)
        loss.backward()
        results.append((loss, h.grad, w.grad))
    for loss, dh, dw in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=0)
        torch.testing.assert_close(dh, results[0][1], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(dw, results[0][2], rtol=1e-5, atol=1e-7)
    again = apr_kernels.linear_cross_entropy(hidden, weight, targets, chunk_rows=7)
    assert torch.equal(again, results[1][0])  # run to run


def test_no_grad_skips_the_gradient_work(use_backend, monkeypatch):
    use_backend("reference")
    seen = []
    real = ops._op
    monkeypatch.setattr(ops, "_op", lambda *a: seen.append(a[5]) or real(*a))
    hidden, weight, targets = _inputs((6,), 8, 30, torch.float32)
    with torch.no_grad():
        a = apr_kernels.linear_cross_entropy(hidden, weight, targets)
    b = apr_kernels.linear_cross_entropy(hidden.detach(), weight.detach(), targets)
    c = apr_kernels.linear_cross_entropy(hidden.detach(), weight, targets)
    assert seen == [False, False, True]
    assert torch.equal(a, b) and torch.equal(a, c)


def test_gradcheck_reference_fp64(use_backend):
    use_backend("reference")
    hidden = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 8, -100, 3, 3])
    assert torch.autograd.gradcheck(
        lambda h, w: apr_kernels.linear_cross_entropy(h, w, targets, chunk_rows=2), (hidden, weight))


@pytest.mark.parametrize("be", BACKENDS)
def test_opcheck(be, use_backend):
    use_backend(be)
    hidden, weight, targets = _inputs((6,), 16, 40, torch.float32, ignore=(2,))
    for with_grad in (True, False):  # with_grad=False is the no-autograd call: no input requires grad
        h, w = (t.detach().requires_grad_(with_grad) for t in (hidden, weight))
        torch.library.opcheck(torch.ops.apr.linear_cross_entropy.default,
                              (h, w, targets, -100, None, with_grad, 4, 0.1, 1e-3))
    h, w = (t.detach().requires_grad_() for t in (hidden, weight))
    torch.library.opcheck(torch.ops.apr.linear_cross_entropy_rows.default, (h, w, targets, -100, None, 4, 0.1, 1e-3))
    torch.library.opcheck(torch.ops.apr.linear_cross_entropy_rows_backward.default,
                          (torch.randn(6), hidden.detach(), weight.detach(), targets, -100, None, 4, 0.1, 1e-3))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(use_backend, reduction):
    use_backend("reference")
    hidden, weight, targets = _inputs((2, 5), 8, 50, torch.float32)
    scale = torch.randn(2, 5)

    def step(h, w):
        out = apr_kernels.linear_cross_entropy(h * 2, w, targets, reduction=reduction)
        return out if reduction == "mean" else (out * scale).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(hidden, weight)
    out.backward()
    dh, dw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    want = step(hidden, weight)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(dh, hidden.grad)
    torch.testing.assert_close(dw, weight.grad)


@pytest.mark.parametrize("bad, message", [
    (dict(weight=torch.randn(10, 7)), r"hidden \[..., H\] and weight \[V, H\] must share H"),
    (dict(targets=torch.zeros(4, dtype=torch.long)), r"targets must have shape hidden.shape\[:-1\] = \(3,\)"),
    (dict(targets=torch.zeros(3)), "targets must be integer token ids"),
    (dict(targets=torch.tensor([1, 10, 2])), r"targets\[1\] = 10 is outside the vocabulary \[0, 10\)"),
    (dict(reduction="token"), "reduction must be 'mean', 'sum' or 'none', got 'token'"),
])
def test_errors_name_the_argument(bad, message):
    args = dict(hidden=torch.randn(3, 8), weight=torch.randn(10, 8), targets=torch.tensor([1, 2, 3]))
    reduction = bad.pop("reduction", "mean")
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        apr_kernels.linear_cross_entropy(args["hidden"], args["weight"], args["targets"], reduction=reduction)


# -------------------------------------------- the vocabulary split's two row passes (tensor parallelism)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("w, block", [(1000, 256), (77, None), (4099, 1024)], ids=["blocks", "one-block", "odd"])
def test_split_vocab_row_passes_equal_their_references(dtype, w, block):
    """``split_vocab_stats`` / ``split_vocab_grad`` (a rank's columns of a row: its statistics for the
    group's all-reduce, then the gradient given the whole row's lse) in Triton's interpreter against
    their PyTorch references, which the multi-rank runs and the group-of-one loss check against
    F.cross_entropy: rows whose target is here, elsewhere (-1) and ignored (scale 0); label
    smoothing and the z-loss; several blocks per row and a last block nearly empty."""
    from apr_kernels.ops import reference as ref

    k = kernel_module("cross_entropy")
    torch.manual_seed(0)
    n = 6
    logits = (torch.randn(n, w) * 3).to(dtype)
    here = torch.tensor([0, w - 1, -1, 5, -1, w // 2])
    for smooth in (False, True):
        got = k.split_vocab_stats(logits, here, torch.empty(4, n), smooth, block_v=block)
        want = ref.split_vocab_stats_reference(logits, here, torch.empty(4, n), smooth)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    lse = torch.logsumexp(logits.float(), -1) + torch.rand(n)  # (the other ranks' columns add to it)
    scale = torch.tensor([1.0, 0.5, 2.0, 0.0, 1.0, 3.0])
    for e, z in [(0.0, 0.0), (0.1, 1e-2)]:
        got = k.split_vocab_grad(logits.clone(), here, lse, scale, 3 * w, e, z, block_v=block)
        want = ref.split_vocab_grad_reference(logits.clone(), here, lse, scale, 3 * w, e, z)
        torch.testing.assert_close(got, want, rtol=REL[dtype], atol=1e-3 if dtype == torch.float16 else 1e-6)
        assert got.dtype == dtype and not got[3].any()


def test_split_vocab_loss_runs_the_row_kernels(use_backend, monkeypatch):
    """The vocabulary-split cross entropy (``train/vocab_parallel.py``) on the Triton backend, on a
    group of one: F.cross_entropy's values and gradients (fp32, label smoothing and z-loss), through
    both kernels."""
    import torch.distributed as dist

    from apr_kernels.train.tensor_parallel import TensorParallel
    from apr_kernels.train.vocab_parallel import vocab_parallel_losses
    from rank_runs import free_port

    use_backend("triton")
    calls = spy_launchers(monkeypatch, "cross_entropy", ("split_vocab_stats", "split_vocab_grad"))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        tp = TensorParallel(dist.group.WORLD, 0, 1)
        torch.manual_seed(2)
        h = torch.randn(1, 9, 16, requires_grad=True)
        w = (torch.randn(300, 16) / 2).requires_grad_()
        targets = torch.tensor([[0, 3, -100, 299, 5, 5, 1, 150, 7]])
        keep = targets.flatten() != -100
        got = vocab_parallel_losses(h, w, targets, tp, 0.1, 1e-2, chunk_rows=4)
        logits = F.linear(h, w).flatten(0, 1)
        want = (F.cross_entropy(logits, targets.flatten(), reduction="none", ignore_index=-100, label_smoothing=0.1)
                + 1e-2 * torch.logsumexp(logits, -1) ** 2 * keep)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(torch.autograd.grad(got.sum(), (h, w)), torch.autograd.grad(want.sum(), (h, w))):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert calls.count("split_vocab_stats") == 3 and calls.count("split_vocab_grad") == 3  # (3 chunks)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ the GPU compiler

@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "label-smoothing"])
def test_kernel_compiles_for_sm90(tmp_path, smooth):
    signature = {"LOGITS": "*DT", "stride_row": "i64", "TARGETS": "*i64", "LOSS": "*fp32", "V": "i32",
                 "ignore_index": "i64", "label_smoothing": "fp32", "z_loss": "fp32", "WRITE_GRAD": "constexpr",
                 "BLOCK_V": "constexpr", "SMOOTH": "constexpr"}
    assert_row_kernel_compiles_for_sm90("cross_entropy", "_cross_entropy_kernel", signature, tmp_path,
                                        {"SMOOTH": smooth}, {"smooth": smooth})


@pytest.mark.parametrize("which", ["stats", "grad"])
def test_split_vocab_kernels_compile_for_sm90(tmp_path, which):
    if which == "stats":
        signature = {"LOGITS": "*DT", "stride_row": "i64", "LOCAL": "*i64", "STATS": "*fp32", "n": "i32", "W": "i32",
                     "BLOCK_V": "constexpr", "SMOOTH": "constexpr"}
        constexprs, config = {"SMOOTH": True}, {"smooth": True}
    else:
        signature = {"LOGITS": "*DT", "stride_row": "i64", "LOCAL": "*i64", "LSE": "*fp32", "SCALE": "*fp32",
                     "W": "i32", "V": "i32", "label_smoothing": "fp32", "z_loss": "fp32", "BLOCK_V": "constexpr"}
        constexprs, config = {}, {}
    # (a rank's columns of Qwen2's and Llama 3's vocabularies, the widths a group of 2 holds: no WRITE_GRAD)
    cases = [[75968, "bf16", True], [64128, "fp16", True], [1000, "fp32", True]]
    assert_row_kernel_compiles_for_sm90("cross_entropy", f"_split_vocab_{which}_kernel", signature, tmp_path,
                                        constexprs, config, cases)


# ----------------------------------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.parametrize("v, h, smoothing, z", [(151936, 896, 0.0, 0.0), (128256, 1024, 0.0, 0.0),
                                               (151936, 896, 0.1, 1e-4)], ids=["qwen2", "llama3", "qwen2-smooth-z"])
def test_cuda_bf16_matches_eager_autocast(v, h, smoothing, z):
    dev = "cuda"
    hidden = torch.randn(2, 1000, h, device=dev, requires_grad=True)
    weight = (torch.randn(v, h, device=dev) * 0.02).requires_grad_()
    targets = torch.randint(0, v, (2, 1000), device=dev)
    targets[0, :7] = -100
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = apr_kernels.linear_cross_entropy(hidden, weight, targets, chunk_rows=512, label_smoothing=smoothing,
                                                z_loss=z)
        logits = F.linear(hidden, weight).float().flatten(0, 1)
        keep = targets.flatten() != -100
        eager = F.cross_entropy(logits, targets.flatten(), label_smoothing=smoothing) + \
            z * (torch.logsumexp(logits, -1) ** 2 * keep).sum() / keep.sum()
    loss.backward()
    dh, dw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    eager.backward()
    assert abs(loss.item() - eager.item()) < 1e-3 * eager.item()
    assert rel_err(dh, hidden.grad.double()) < 1e-2 and rel_err(dw, weight.grad.double()) < 1e-2


@pytest.mark.cuda
def test_cuda_bf16_per_position_matches_eager_autocast():
    dev, v, h = "cuda", 151936, 896
    hidden = torch.randn(2, 1000, h, device=dev, requires_grad=True)
    weight = (torch.randn(v, h, device=dev) * 0.02).requires_grad_()
    targets = torch.randint(0, v, (2, 1000), device=dev)
    targets[0, :7] = -100
    grad = torch.randn(2, 1000, device=dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        rows = apr_kernels.linear_cross_entropy(hidden, weight, targets, reduction="none", chunk_rows=512)
        eager = F.cross_entropy(F.linear(hidden, weight).float().flatten(0, 1), targets.flatten(),
                                reduction="none").view(2, 1000)
    (rows * grad).sum().backward()
    dh, dw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (eager * grad).sum().backward()
    assert rel_err(rows, eager.double()) < 1e-3
    assert rel_err(dh, hidden.grad.double()) < 1e-2 and rel_err(dw, weight.grad.double()) < 1e-2


def test_loss_module_matches_cross_entropy_loss(use_backend):
    use_backend("reference")
    hidden, weight, targets = _inputs((4, 6), 16, 90, torch.float32, ignore=(2,))
    loss = apr_kernels.LinearCrossEntropyLoss(reduction="sum")(hidden, weight, targets)
    want = torch.nn.CrossEntropyLoss(reduction="sum")(F.linear(hidden, weight).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    smooth = apr_kernels.LinearCrossEntropyLoss(label_smoothing=0.2)
    want = torch.nn.CrossEntropyLoss(label_smoothing=0.2)(F.linear(hidden, weight).flatten(0, 1), targets.flatten())
    torch.testing.assert_close(smooth(hidden, weight, targets), want, rtol=1e-5, atol=1e-5)
    assert "label_smoothing=0.2" in repr(smooth)


@pytest.mark.cuda
def test_cuda_bf16_split_vocab_row_passes_match_their_references():
    """The vocabulary split's row kernels on bf16 logits (a rank's half of Qwen2's vocabulary) against
    the PyTorch references' fp32 maths."""
    from apr_kernels.kernels import cross_entropy as k
    from apr_kernels.ops import reference as ref

    dev, n, w = "cuda", 256, 75968
    logits = (torch.randn(n, w, device=dev) * 3).to(torch.bfloat16)
    here = torch.randint(-1, w, (n,), device=dev)
    got = k.split_vocab_stats(logits, here, torch.empty(4, n, device=dev), True)
    want = ref.split_vocab_stats_reference(logits, here, torch.empty(4, n, device=dev), True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-2)
    lse = torch.logsumexp(logits.float(), -1) + 0.5
    scale = torch.rand(n, device=dev)
    got = k.split_vocab_grad(logits.clone(), here, lse, scale, 2 * w, 0.1, 1e-4)
    want = ref.split_vocab_grad_reference(logits.clone(), here, lse, scale, 2 * w, 0.1, 1e-4)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=1e-4)
