"""Knowledge distillation (ops/distillation.py, model/distillation.py, train --teacher): the fused op
against the loss written out in fp64 with log_softmax, gradcheck, opcheck and torch.compile; the
model's fast and eager paths; one Trainer step equal to the objective written out; the CLI pulling a
student towards its teacher, resuming exactly, and refusing a teacher with another tokenizer."""

import json
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import apr_kernels
from apr_kernels.model import Transformer, pad_vocab, preset
from apr_kernels.model.distillation import Teacher
from apr_kernels.train.checkpoint import save_checkpoint
from apr_kernels.ops.reference import distillation_rows_reference
from apr_kernels.train.cli import byte_tokenizer
from kernel_helpers import ROW_KERNEL_CASES, assert_row_kernel_compiles_for_sm90, kernel_module, spy_launchers

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def written_out(s, t, targets, kd_ratio, temperature, beta=0.0):
    """Per-position (ce, kl) from student logits ``s`` and teacher logits ``t`` in fp64: the cross
    entropy as -log_softmax at the target; over the shared columns the divergence TRL's
    ``generalized_jsd_loss`` names by ``beta``: sum p (log p - log q) (0), sum q (log q - log p) (1),
    else beta KL(p || m) + (1 - beta) KL(q || m) with the mixture m = beta p + (1 - beta) q."""
    s, t = s.double(), t.double()
    v = min(s.shape[-1], t.shape[-1])
    mask = targets != -100
    ce = -torch.log_softmax(s, -1).gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
    log_q = torch.log_softmax(s[..., :v] / temperature, -1)
    log_p = torch.log_softmax(t[..., :v] / temperature, -1)
    p, q = log_p.exp(), log_q.exp()
    if beta == 0:
        kl = (p * (log_p - log_q)).sum(-1)
    elif beta == 1:
        kl = (q * (log_q - log_p)).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        kl = beta * (p * (log_p - m.log())).sum(-1) + (1 - beta) * (q * (log_q - m.log())).sum(-1)
    return ce * mask, kl * temperature ** 2 * mask


def _inputs(n, h, ht, v, vt, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 1.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h ** 0.5 * 2).to(dtype).requires_grad_()
    t_hidden = torch.randn(n, ht, generator=g).to(dtype)
    t_weight = (torch.randn(vt, ht, generator=g) / ht ** 0.5 * 2).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[[1, n - 2]] = -100
    return hidden, weight, t_hidden, t_weight, targets


# ------------------------------------------------------------------- the Triton row kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("v,vt", [(300, 300), (300, 333), (333, 300)], ids=["same", "teacher-wider", "student-wider"])
@pytest.mark.parametrize("write_grad", [True, False], ids=["grad", "loss-only"])
def test_kernel_rows_vs_reference(dtype, v, vt, write_grad):
    """The row launcher (interpreter on CPU) against the reference row maths: ce, kl and the gradient
    written over strided student rows (the padding past V untouched), several blocks per row, an
    ignored row zeroed, temperature and ratio applied."""
    k = kernel_module("distillation")
    n = 5
    g = torch.Generator().manual_seed(0)
    buf = torch.full((n, v + 7), float("nan"), dtype=dtype)
    buf[:, :v] = (torch.randn(n, v, generator=g) * 3).to(dtype)
    teacher = (torch.randn(n, vt, generator=g) * 3).to(dtype)
    targets = torch.tensor([0, v - 1, -100, 17, 150])
    want_ce, want_kl, want_grad = distillation_rows_reference(buf[:, :v], teacher, targets, -100, 0.3, 1.7, True)
    ce, kl = torch.full((n,), 7.0), torch.full((n,), 7.0)
    student = buf[:, :v]
    k.distillation_rows(student, teacher, targets, ce, kl, -100, 0.3, 1.7, write_grad, block_v=64)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(ce, want_ce.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(kl, want_kl.float(), rtol=tol, atol=tol)
    assert ce[2] == 0 and kl[2] == 0 and kl[[0, 1, 3, 4]].min() > 0
    if write_grad:
        torch.testing.assert_close(student.float(), want_grad.to(dtype).float(), rtol=tol, atol=tol * 1e-2)
        assert torch.all(student[2] == 0)
    else:
        assert not student.isnan().any()  # left as it was
    assert torch.all(buf[:, v:].isnan()), "padding past V was written"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("beta", [1.0, 0.4], ids=["reverse-kl", "jsd"])
@pytest.mark.parametrize("v,vt", [(300, 333), (333, 300)], ids=["teacher-wider", "student-wider"])
def test_kernel_rows_other_divergences_vs_reference(dtype, beta, v, vt):
    """The reverse KL (a cross term kept online) and the generalized JSD (a second read for the
    mixture) in the row launcher (interpreter) against the reference row maths, gradient included."""
    k = kernel_module("distillation")
    n = 5
    g = torch.Generator().manual_seed(1)
    student = (torch.randn(n, v, generator=g) * 3).to(dtype)
    teacher = (torch.randn(n, vt, generator=g) * 3).to(dtype)
    targets = torch.tensor([0, v - 1, -100, 17, 150])
    want_ce, want_kl, want_grad = distillation_rows_reference(student, teacher, targets, -100, 0.3, 1.7, True, beta)
    ce, kl = torch.full((n,), 7.0), torch.full((n,), 7.0)
    k.distillation_rows(student, teacher, targets, ce, kl, -100, 0.3, 1.7, True, beta, block_v=64)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(ce, want_ce.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(kl, want_kl.float(), rtol=tol, atol=tol)
    assert kl[2] == 0 and kl[[0, 1, 3, 4]].min() > 0
    torch.testing.assert_close(student.float(), want_grad.to(dtype).float(), rtol=tol, atol=tol * 1e-2)


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5, 0.1])
def test_reference_rows_are_trls_generalized_jsd(beta):
    """The reference row maths against the divergence written out in fp64, and its gradient against
    autograd of that expression."""
    g = torch.Generator().manual_seed(2)
    s = (torch.randn(6, 40, generator=g, dtype=torch.float64) * 2).requires_grad_()
    t = torch.randn(6, 44, generator=g, dtype=torch.float64) * 2
    targets = torch.tensor([3, -100, 0, 39, 7, 11])
    ce, kl, grad = distillation_rows_reference(s.detach(), t, targets, -100, 0.25, 1.5, True, beta)
    want_ce, want_kl = written_out(s, t, targets, 0.25, 1.5, beta)
    torch.testing.assert_close(ce, want_ce.detach())
    torch.testing.assert_close(kl, want_kl.detach())
    (0.75 * want_ce + 0.25 * want_kl).sum().backward()
    torch.testing.assert_close(grad, s.grad)


def test_kernel_out_of_range_target_is_nan_not_a_read():
    k = kernel_module("distillation")
    student, teacher = torch.randn(3, 40), torch.randn(3, 40)
    ce, kl = torch.empty(3), torch.empty(3)
    k.distillation_rows(student, teacher, torch.tensor([5, 40, -3]), ce, kl, -100, 0.5, 1.0, True)
    assert not ce[0].isnan() and ce[1].isnan() and kl[2].isnan() and student[1].isnan().all()


def test_fused_op_runs_the_kernel_and_matches_the_reference(use_backend, monkeypatch):
    calls = spy_launchers(monkeypatch, "distillation", ("distillation_rows",))
    hidden, weight, t_hidden, t_weight, targets = _inputs(11, 16, 24, 300, 330, torch.float32)
    got = {}
    for be in ("triton", "reference"):
        use_backend(be)
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        out = apr_kernels.linear_distillation(h, w, t_hidden, t_weight, targets, kd_ratio=0.4, temperature=2.0,
                                              chunk_rows=4)
        out[0].backward()
        got[be] = (torch.stack(out).detach(), h.grad, w.grad)
    assert calls == ["distillation_rows"] * 3
    for a, b in zip(got["triton"], got["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_kernel_compiles_for_sm90(tmp_path):
    """Every row-kernel case with MODE 2 (JSD: the most live values, both distributions and their
    mixture), and the largest vocabulary in bf16 with MODE 0 (forward KL) and 1 (reverse KL); one
    launch of compiles."""
    signature = {"STUDENT": "*DT", "stride_s": "i64", "TEACHER": "*DT", "stride_t": "i64", "TARGETS": "*i64",
                 "CE": "*fp32", "KL": "*fp32", "V": "i32", "VS": "i32", "ignore_index": "i64", "kd_ratio": "fp32",
                 "inv_temp": "fp32", "beta": "fp32", "WRITE_GRAD": "constexpr", "BLOCK_V": "constexpr",
                 "MODE": "constexpr"}
    cases = [[*case, {"MODE": 2}] for case in ROW_KERNEL_CASES] + [[*ROW_KERNEL_CASES[0], {"MODE": m}] for m in (0, 1)]
    assert_row_kernel_compiles_for_sm90("distillation", "_distillation_kernel", signature, tmp_path, cases=cases)


@pytest.mark.cuda
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5], ids=["forward-kl", "reverse-kl", "jsd"])
def test_cuda_bf16_matches_the_eager_expression(beta):
    from apr_kernels.model.distillation import eager_loss

    dev, v, h = "cuda", 151936, 896
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(2, 700, h, device=dev, generator=g).requires_grad_()
    weight = (torch.randn(v, h, device=dev, generator=g) * 0.02).requires_grad_()
    t_hidden = torch.randn(2, 700, 1024, device=dev, generator=g)
    t_weight = torch.randn(v + 128, 1024, device=dev, generator=g) * 0.02
    targets = torch.randint(0, v, (2, 700), device=dev, generator=g)
    targets[0, :9] = -100
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = apr_kernels.linear_distillation(hidden, weight, t_hidden, t_weight, targets, temperature=2.0,
                                              chunk_rows=256, beta=beta)
        want = eager_loss(F.linear(hidden, weight), F.linear(t_hidden, t_weight), targets, 0.5, 2.0, "mean", beta)
    got[0].backward()
    dh, dw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    want[0].backward()
    for a, b in zip(got, want):
        assert a.item() == pytest.approx(b.item(), rel=2e-3)
    for a, b in ((dh, hidden.grad), (dw, weight.grad)):
        assert ((a - b).norm() / b.norm()).item() < 2e-2


# --------------------------------------------------------------------------------- the fused op
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", [
    # (V, V_teacher, kd_ratio, temperature, chunk_rows, reduction, beta)
    (300, 300, 0.5, 1.0, 7, "mean", 0.0),
    (300, 340, 0.3, 2.0, None, "sum", 0.0),    # the teacher's head padded further (Qwen2.5-7B vs 0.5B)
    (310, 300, 1.0, 0.7, 5, "mean", 0.0),      # the student's padded further; KL only
    (300, 300, 0.0, 1.0, 4, "sum", 0.0),       # cross entropy only
    (300, 340, 0.5, 2.0, 7, "mean", 1.0),      # reverse KL
    (310, 300, 0.8, 1.0, None, "sum", 0.5),    # generalized JSD
], ids=["half", "teacher-padded-T2", "student-padded-kl-only", "ce-only", "reverse-kl", "jsd"])
def test_fused_loss_and_gradients_vs_the_loss_written_out(dtype, case):
    v, vt, r, temp, chunk, reduction, beta = case
    hidden, weight, t_hidden, t_weight, targets = _inputs(23, 16, 24, v, vt, dtype)
    loss, ce, kl = apr_kernels.linear_distillation(hidden, weight, t_hidden, t_weight, targets, kd_ratio=r,
                                                   temperature=temp, reduction=reduction, chunk_rows=chunk, beta=beta)
    loss.backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ce64, kl64 = written_out(h64 @ w64.T, t_hidden.double() @ t_weight.double().T, targets, r, temp, beta)
    n = (targets != -100).sum() if reduction == "mean" else 1
    want = ((1 - r) * ce64 + r * kl64).sum() / n
    want.backward()
    tol = {torch.float32: 1e-5, torch.float16: 3e-3}[dtype]
    assert loss.dtype == torch.float32 and not ce.requires_grad and not kl.requires_grad
    assert loss.item() == pytest.approx(want.item(), rel=tol)
    assert ce.item() == pytest.approx((ce64.sum() / n).item(), rel=tol)
    assert kl.item() == pytest.approx((kl64.sum() / n).item(), rel=tol, abs=tol)
    for got, ref in ((hidden.grad, h64.grad), (weight.grad, w64.grad)):
        assert got.dtype == dtype
        assert ((got.double() - ref).norm() / ref.norm()).item() < tol * 10
    assert torch.all(hidden.grad[[1, 21]] == 0)  # ignored positions


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.3])
def test_same_teacher_and_student_give_zero_kl(beta):
    hidden, weight, _, _, targets = _inputs(9, 8, 8, 40, 40, torch.float32)
    loss, ce, kl = apr_kernels.linear_distillation(hidden, weight, hidden.detach(), weight.detach(), targets,
                                                   kd_ratio=0.5, beta=beta)
    assert abs(kl.item()) < 1e-6 and loss.item() == pytest.approx(0.5 * ce.item(), rel=1e-6)


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.7])
def test_autocast_matches_the_eager_expression(beta):
    """Under bf16 autocast both heads' logits are bf16 GEMMs, the row maths fp32, as the eager path
    (TRL's generalized JSD expression for each divergence)."""
    from apr_kernels.model.distillation import eager_loss

    hidden, weight, t_hidden, t_weight, targets = _inputs(12, 32, 16, 200, 200, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = apr_kernels.linear_distillation(hidden, weight, t_hidden, t_weight, targets, kd_ratio=0.4,
                                              temperature=2.0, chunk_rows=5, beta=beta)
        want = eager_loss(F.linear(hidden, weight), F.linear(t_hidden, t_weight), targets, 0.4, 2.0, "mean", beta)
    for a, b in zip(got, want):
        assert a.item() == pytest.approx(b.item(), rel=1e-3)


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.4])
def test_gradcheck_fp64(beta):
    hidden, weight, t_hidden, t_weight, targets = _inputs(7, 5, 6, 11, 13, torch.float64)
    assert torch.autograd.gradcheck(lambda h, w: apr_kernels.linear_distillation(
        h, w, t_hidden, t_weight, targets, kd_ratio=0.3, temperature=1.5, chunk_rows=3, beta=beta)[0],
        (hidden, weight))


def test_opcheck_and_no_grad():
    hidden, weight, t_hidden, t_weight, targets = _inputs(6, 16, 8, 40, 40, torch.float32)
    for with_grad in (True, False):
        h, w = (t.detach().requires_grad_(with_grad) for t in (hidden, weight))
        torch.library.opcheck(torch.ops.apr.linear_distillation.default,
                              (h, w, t_hidden, t_weight, targets, -100, None, with_grad, 4, 0.5, 2.0, 0.3))
    with torch.no_grad():
        a = apr_kernels.linear_distillation(hidden, weight, t_hidden, t_weight, targets)
    b = apr_kernels.linear_distillation(hidden, weight, t_hidden, t_weight, targets)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_torch_compile_fullgraph():
    hidden, weight, t_hidden, t_weight, targets = _inputs(8, 8, 8, 50, 50, torch.float32)

    def step(h, w):
        return apr_kernels.linear_distillation(h * 2, w, t_hidden, t_weight, targets, temperature=2.0)[0]

    out = torch.compile(step, fullgraph=True, backend="aot_eager")(hidden, weight)
    out.backward()
    dh = hidden.grad.clone()
    hidden.grad = weight.grad = None
    want = step(hidden, weight)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(dh, hidden.grad)


@pytest.mark.parametrize("bad, message", [
    (dict(kd_ratio=1.5), r"kd_ratio=1.5, temperature=1.0, beta=0.0; expected 0 <= kd_ratio <= 1, temperature > 0 "
                         r"and 0 <= beta <= 1"),
    (dict(temperature=0.0), "expected 0 <= kd_ratio <= 1, temperature > 0 and 0 <= beta <= 1"),
    (dict(beta=-0.1), r"beta=-0.1; expected"),
    (dict(reduction="none"), "reduction must be 'mean' or 'sum', got 'none'"),
    (dict(t_weight=torch.randn(40, 9)), r"teacher_hidden \[..., Ht\] and teacher_weight \[Vt, Ht\] must share Ht"),
    (dict(t_hidden=torch.randn(5, 8)), r"must cover the student's positions \(6,\)"),
    (dict(targets=torch.tensor([0, 1, 2, 3, 4, 40])), r"targets\[5\] = 40 is outside the vocabulary \[0, 40\)"),
])
def test_errors_name_the_argument(bad, message):
    hidden, weight, t_hidden, t_weight, targets = _inputs(6, 16, 8, 40, 40, torch.float32)
    args = dict(t_hidden=t_hidden, t_weight=t_weight, targets=targets)
    kw = {k: bad.pop(k) for k in ("kd_ratio", "temperature", "reduction", "beta") if k in bad}
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        apr_kernels.linear_distillation(hidden, weight, args["t_hidden"], args["t_weight"], args["targets"], **kw)


def test_loss_module_is_the_function():
    hidden, weight, t_hidden, t_weight, targets = _inputs(6, 16, 8, 40, 44, torch.float32)
    module = apr_kernels.LinearDistillationLoss(kd_ratio=0.2, temperature=3.0, reduction="sum", beta=0.5)
    got = module(hidden, weight, t_hidden, t_weight, targets)
    want = apr_kernels.linear_distillation(hidden, weight, t_hidden, t_weight, targets, kd_ratio=0.2,
                                           temperature=3.0, reduction="sum", beta=0.5)
    assert all(torch.equal(a, b) for a, b in zip(got, want)) and "kd_ratio=0.2" in repr(module)
    assert "beta=0.5" in repr(module)


# ------------------------------------------------------------------------------------ the model
def _pair(vocab=300, seed=0):
    torch.manual_seed(seed)
    student = Transformer(preset("tiny_qwen2").replace(vocab_size=vocab), fast=False)
    teacher = Transformer(preset("tiny_llama").replace(vocab_size=vocab + 20), fast=False)  # another shape
    return student, teacher.requires_grad_(False)


@pytest.mark.parametrize("documents", [False, True], ids=["rows", "documents"])
def test_model_fast_path_equals_eager_and_the_loss_written_out(documents, use_backend):
    from apr_kernels.model import Documents

    use_backend("reference")
    student, teacher = _pair()
    x = torch.randint(0, 256, (2, 12))
    x[:, 5] = 7
    y = torch.randint(0, 300, (2, 12))
    y[0, :3] = -100
    docs = Documents.from_eos(x, 7) if documents else None
    got = {}
    for fast in (False, True):
        student.fast = teacher.fast = fast
        student.zero_grad()
        out = student.loss(x, y, reduction="sum", documents=docs,
                           teacher=Teacher.of(teacher, x, docs, kd_ratio=0.6, temperature=1.5))
        out[0].backward()
        got[fast] = (out.detach(), [p.grad.clone() for p in student.parameters()])
    torch.testing.assert_close(got[True][0], got[False][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[True][1], got[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        ce, kl = written_out(student(x, documents=docs), teacher(x, documents=docs), y, 0.6, 1.5)
    want = torch.stack([(0.4 * ce + 0.6 * kl).sum(), ce.sum(), kl.sum()]).float()
    torch.testing.assert_close(got[False][0], want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("beta", [0.0, 0.5], ids=["forward-kl", "jsd"])
def test_one_trainer_step_is_adamw_on_the_distillation_objective(use_backend, beta):
    """Trainer with a teacher: the step's loss, ce and kl are the means over the step's targets (two
    micro-batches), and the clipped gradients are those of the objective written out."""
    from apr_kernels.train.data import BatchStream, batch, sequences
    from apr_kernels.train.loop import TrainConfig, Trainer

    use_backend("reference")
    student, teacher = _pair()
    student.fast = teacher.fast = True
    oracle = Transformer(student.config, fast=False)
    oracle.load_state_dict(student.state_dict())
    tokens = torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(3))
    cfg = TrainConfig(steps=1, batch_size=2, grad_accum=2, seq_len=16, lr=1e-3, warmup=1, kd_ratio=0.7,
                      kd_temperature=2.0, kd_beta=beta)
    rec = Trainer(student, tokens, None, cfg, teacher=teacher).train_step()
    seqs = sequences(tokens, 16)
    stream = BatchStream(len(seqs), seed=cfg.seed)
    ce_sum = kl_sum = 0.0
    n = 0
    for _ in range(2):
        x, y, _ = batch(seqs, stream.next(2))
        with torch.no_grad():
            t_logits = teacher(x)
        ce, kl = written_out(oracle(x), t_logits, y, 0.7, 2.0, beta)
        ce_sum, kl_sum, n = ce_sum + ce.sum(), kl_sum + kl.sum(), n + int((y != -100).sum())
    objective = (0.3 * ce_sum + 0.7 * kl_sum) / n
    objective.backward()
    assert rec["loss"] == pytest.approx(objective.item(), rel=1e-5)
    assert rec["ce"] == pytest.approx(ce_sum.item() / n, rel=1e-5)
    assert rec["kl"] == pytest.approx(kl_sum.item() / n, rel=1e-5)
    norm = torch.nn.utils.clip_grad_norm_(oracle.parameters(), cfg.grad_clip)
    assert rec["grad_norm"] == pytest.approx(norm.item(), rel=1e-4)
    for (name, p), q in zip(oracle.named_parameters(), student.parameters()):
        torch.testing.assert_close(q.grad, p.grad.float(), rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------------------- the CLI
def _run(capsys, *argv, code=0):
    from apr_kernels.cli import main

    got = main(list(argv))
    out, err = capsys.readouterr()
    assert got == code, err
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")], err


def test_cli_distillation_pulls_the_student_to_the_teacher_and_resumes_exactly(tmp_path, capsys):
    tok = byte_tokenizer()
    vocab = pad_vocab(tok.vocab_size)
    torch.manual_seed(1)
    teacher = Transformer(preset("tiny_llama").replace(vocab_size=vocab))
    with torch.no_grad():  # a confident teacher (random models are near uniform: little to learn)
        teacher.model.embed_tokens.weight.mul_(5)
    save_checkpoint(tmp_path / "teacher.apr", model=teacher, tokenizer=tok)
    torch.manual_seed(2)
    save_checkpoint(tmp_path / "student.apr", model=Transformer(preset("tiny_qwen2").replace(vocab_size=vocab)),
                    tokenizer=tok)
    # a few sequences seen again and again: the student can match the teacher on them within 20 steps
    data = tmp_path / "small.txt"
    data.write_text((STDLIB / "textwrap.py").read_text()[:400])
    base = ["train", "--init", str(tmp_path / "student.apr"), "--teacher", str(tmp_path / "teacher.apr"),
            "--kd-ratio", "1.0", "--kd-temperature", "1.0", "--data", str(data),
            "--eval-data", str(STDLIB / "shlex.py"), "--steps", "20", "--batch-size", "2", "--seq-len", "32",
            "--eval-tokens", "64", "--lr", "1e-2", "--save-every", "10", "--json", "--no-token-cache"]
    recs, _ = _run(capsys, *base, "--out", str(tmp_path / "a"))
    train = [r for r in recs if r["event"] == "train"]
    assert max(r["kl"] for r in train[-3:]) < train[0]["kl"] / 2  # the student moves towards the teacher
    assert all(r["loss"] == pytest.approx(r["kl"]) for r in train)  # kd_ratio 1: the KL only
    resumed, _ = _run(capsys, "train", "--resume", str(tmp_path / "a" / "step_000010.apr"), "--json",
                      "--out", str(tmp_path / "b"))
    assert [r["loss"] for r in resumed if r["event"] == "train"] == [r["loss"] for r in train[10:]]
    # the generalized JSD: the divergence falls too, and its beta travels into the checkpoint
    recs, _ = _run(capsys, *base, "--kd-beta", "0.5", "--out", str(tmp_path / "jsd"))
    jsd = [r for r in recs if r["event"] == "train"]
    assert max(r["kl"] for r in jsd[-3:]) < jsd[0]["kl"] / 2 and jsd[0]["kl"] < train[0]["kl"]
    resumed, _ = _run(capsys, "train", "--resume", str(tmp_path / "jsd" / "step_000010.apr"), "--json",
                      "--out", str(tmp_path / "jsd_b"))
    assert [r["loss"] for r in resumed if r["event"] == "train"] == [r["loss"] for r in jsd[10:]]
    # a teacher with another tokenizer, or none, is refused before training
    from apr_kernels.tokenizer import Tokenizer

    other = Tokenizer.from_ranks({bytes([i]): i for i in range(256)}, {"<|end|>": 256}, eos_id=256)
    save_checkpoint(tmp_path / "other.apr", model=Transformer(preset("tiny_llama").replace(vocab_size=vocab)),
                    tokenizer=other)
    _, err = _run(capsys, *base[:4], str(tmp_path / "other.apr"), *base[5:], "--out", str(tmp_path / "c"), code=1)
    assert "other.apr: its tokenizer (257 tokens) is not the student's (257 tokens)" in err
    save_checkpoint(tmp_path / "bare.apr", model=Transformer(preset("tiny_llama").replace(vocab_size=vocab)))
    _, err = _run(capsys, *base[:4], str(tmp_path / "bare.apr"), *base[5:], "--out", str(tmp_path / "d"), code=1)
    assert "bare.apr: no embedded tokenizer (tokenizer.vocabulary)" in err
    _, err = _run(capsys, *base, "--kd-ratio", "2", "--out", str(tmp_path / "e"), code=1)
    assert "kd_ratio=2.0, kd_temperature=1.0, kd_beta=0.0; expected 0 <= kd_ratio <= 1" in err
    _, err = _run(capsys, *base[:3], *base[5:], "--out", str(tmp_path / "f"), code=1)  # no --teacher
    assert "--kd-ratio 1.0 needs --teacher" in err
    _, err = _run(capsys, *base[:3], *base[9:], "--kd-beta", "0.5", "--out", str(tmp_path / "g"), code=1)
    assert "--kd-beta 0.5 needs --teacher" in err
