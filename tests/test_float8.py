"""``train --float8``: the decoder layers' projections in float8 (torchao's Float8Linear, emulated on CPU).

The reference is written out here, independently of torchao: each converted projection's input,
weight and output gradient cast to float8 with dynamic scales (tensorwise: ``max(e4m3) / amax`` of
the tensor; the gradient in e5m2), the GEMMs on the dequantised values. The model with
``--float8`` must equal a model whose chosen projections run that reference, forward and every
gradient; the runs on two ranks must equal one process with the same micro-batches (a tensorwise
scale is the micro-batch's).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from rank_runs import against_one_process, cli
from train_runs import HELD, losses, records, sixteen_config, sixteen_init, train_args

try:
    import torchao.float8  # noqa: F401
except Exception as exc:  # noqa: BLE001  (not installed, or a torchao built for another torch)
    pytest.skip(f"torchao.float8 is not usable here: {exc}", allow_module_level=True)

from apr_kernels.model import Transformer  # noqa: E402
from apr_kernels.train import float8  # noqa: E402

CPU = torch.device("cpu")
E4, E5 = torch.float8_e4m3fn, torch.float8_e5m2


def _cast(t: torch.Tensor, dtype, dim: int | None = None, power_of_two: bool = False) -> torch.Tensor:
    """``t`` through float8 and back: scale = max(dtype) / amax (of the tensor, or along ``dim``)."""
    amax = (t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)).double().clamp(min=1e-12)
    scale = (torch.finfo(dtype).max / amax).float()
    if power_of_two:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    top = torch.finfo(dtype).max
    return (t.float() * scale).clamp(-top, top).to(dtype).float() / scale


class _TensorwiseReference(torch.autograd.Function):
    """y = x8 @ w8^T; dx = g8 @ w8; dw = g8^T @ x8 (x, w in e4m3, the gradient g in e5m2)."""

    @staticmethod
    def forward(ctx, x, w):
        x8, w8 = _cast(x, E4), _cast(w, E4)
        ctx.save_for_backward(x8, w8)
        return x8 @ w8.t()

    @staticmethod
    def backward(ctx, g):
        x8, w8 = ctx.saved_tensors
        g8 = _cast(g, E5)
        return g8 @ w8, g8.reshape(-1, g8.shape[-1]).t() @ x8.reshape(-1, x8.shape[-1])


def _with_reference(model: nn.Module, names, forward) -> nn.Module:
    """A copy of ``model`` whose projections ``names`` run ``forward(x, module)`` (the reference)."""
    ref = copy.deepcopy(model)
    for name, m in ref.named_modules():
        if name in names:
            m.forward = (lambda m: lambda x: forward(x, m) + (m.bias if m.bias is not None else 0))(m)
            if name.endswith("q_proj"):
                ref.get_submodule(name.rsplit(".", 1)[0]).fused_qkv = False
    return ref


def _grads(model, ids):
    model.zero_grad()
    logits = model(ids)
    (logits.float().pow(2).mean() + logits.float().logsumexp(-1).mean()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("fast", [False, True])
def test_tensorwise_model_equals_an_independent_float8_reference(fast):
    torch.manual_seed(0)
    model = Transformer(sixteen_config(), fast=fast)
    plain = copy.deepcopy(model)
    names = float8.convert(model, "tensorwise", CPU)
    assert set(names) == {f"model.layers.{i}.{p}" for i in range(2) for p in
                          ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    ref = _with_reference(plain, names, lambda x, m: _TensorwiseReference.apply(x, m.weight))
    ids = torch.randint(0, 272, (2, 24))
    (y, g), (y_ref, g_ref), (y_hp, _) = _grads(model, ids), _grads(ref, ids), _grads(plain, ids)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert g.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    # float8 really ran: the high-precision model's logits differ (by about float8's rounding)
    rel = ((y - y_hp).norm() / y_hp.norm()).item()
    assert 1e-3 < rel < 0.2
    # the same parameters, the same names: checkpoints are unchanged
    assert list(model.state_dict()) == list(plain.state_dict())
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_rowwise_forward_scales_each_row():
    """rowwise: one scale per input row and per weight row, rounded down to a power of two."""
    torch.manual_seed(1)
    model = Transformer(sixteen_config(num_layers=1), fast=False)
    plain = copy.deepcopy(model)
    names = float8.convert(model, "rowwise", CPU)
    ref = _with_reference(plain, names, lambda x, m: _cast(x, E4, -1, True) @ _cast(m.weight, E4, -1, True).t())
    ids = torch.randint(0, 272, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids), rtol=1e-5, atol=1e-5)
        tensorwise = _with_reference(plain, names, lambda x, m: _TensorwiseReference.apply(x, m.weight))
        assert not torch.allclose(model(ids), tensorwise(ids), rtol=1e-4, atol=1e-4)


def test_only_eligible_projections_convert():
    """Kept in high precision: the embedding, the head, routers, experts and projections whose
    dimensions are not multiples of 16; the shared expert converts."""
    model = Transformer(sixteen_config(architecture="qwen2_moe", num_experts=4, num_experts_per_tok=2,
                                       moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                       mlp_only_layers=(1,), tie_word_embeddings=False), fast=False)
    names = set(float8.convert(model, "tensorwise", CPU))
    attention = {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"}
    assert names == attention | {f"model.layers.0.mlp.shared_expert.{p}_proj" for p in ("gate", "up", "down")} | {
        f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")}
    odd = Transformer(sixteen_config(intermediate_size=88), fast=False)  # the MLP's 88 is no multiple of 16
    assert not any(".mlp." in n for n in float8.convert(odd, "tensorwise", CPU))
    with pytest.raises(ValueError, match=r"no projection of this model has both dimensions a multiple of 16.*"
                                         r"q_proj \(56 -> 56\)"):
        float8.convert(Transformer(sixteen_config(hidden_size=56, num_heads=7, num_kv_heads=1, head_dim=8),
                                   fast=False), "tensorwise", CPU)


def test_refusals_name_the_reason(monkeypatch):
    with pytest.raises(ValueError, match="--float8 'fp8'; expected one of tensorwise, rowwise"):
        float8.check("fp8", CPU)
    with pytest.raises(ValueError, match="with --lora-rank the base is frozen"):
        float8.check("tensorwise", CPU, lora=True)
    # a rank's part of 24 rows (gate/up) and columns (down) of an intermediate size of 48: the whole
    # converts in one process, the part cannot (float8 GEMMs need multiples of 16)
    from apr_kernels.train.tensor_parallel import TensorParallel

    part = Transformer(sixteen_config(intermediate_size=24), fast=False)
    for layer in part.model.layers:  # (as split: the group on the attention, shapes the part's)
        layer.self_attn.tensor_parallel = TensorParallel(None, 0, 2)
    with pytest.raises(ValueError, match=r"--float8 with --tensor-parallel 2: model.layers.0.mlp.gate_proj's part "
                                         r"\[24, 64\] of \[48, 64\] is no multiple of 16"):
        float8.convert(part, "tensorwise", CPU)
    with pytest.raises(ValueError, match="--float8 with --seq-len 100: .*expected --seq-len a multiple of 16"):
        float8.check("tensorwise", CPU, seq_len=100)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match=r"compute capability >= 8.9.*NVIDIA A100 has 8.0"):
        float8.check("tensorwise", torch.device("cuda", 0))


# ----------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def init(tmp_path_factory) -> Path:
    return sixteen_init(tmp_path_factory.mktemp("float8") / "init.apr")



def test_float8_run_resumes_exactly_and_saves_a_plain_checkpoint(init, tmp_path, capsys):
    code, f8 = cli(train_args(init, tmp_path / "f8", "--float8", "tensorwise"))
    assert code == 0
    code, hp = cli(train_args(init, tmp_path / "hp"))
    assert code == 0
    start = records(f8)[0]
    assert start["event"] == "start" and start["float8"] == "tensorwise"
    # close to the high-precision run (float8 rounding), not equal to it
    assert losses(f8) == pytest.approx(losses(hp), rel=0.02)
    assert losses(f8) != pytest.approx(losses(hp), rel=1e-6)
    # resumed from step 2: the float8 recipe comes back with the run; steps 3 and 4 as uninterrupted
    code, resumed = cli(["train", "--resume", str(tmp_path / "f8" / "step_000002.apr"),
                         "--out", str(tmp_path / "again"), "--json", "--no-progress"])
    assert code == 0
    assert losses(resumed) == pytest.approx(losses(f8)[2:], rel=1e-6)
    # the checkpoint is a plain model, and the run evaluated it in high precision: eval reproduces
    # the run's final eval loss
    code, ev = cli(["eval", "--init", str(tmp_path / "f8" / "model.apr"), "--data", HELD, "--max-tokens", "160"])
    assert code == 0
    key, tokens = ev.strip().splitlines()[-1].split()
    assert tokens == "tokens=160"
    assert float(key.removeprefix("eval_loss=")) == pytest.approx(losses(f8, "eval", "eval_loss")[-1], abs=2e-6)
    capsys.readouterr()
    code, _ = cli(["train", "--resume", str(tmp_path / "f8" / "step_000002.apr"), "--float8", "rowwise",
                   "--out", str(tmp_path / "no")])
    assert code != 0
    assert re.search(r"--float8 rowwise with --resume .*step_000002.apr: the run was trained with --float8 tensorwise",
                     capsys.readouterr().err)


_SPLIT_SCRIPT = """
import copy, json, os, sys
import torch
import torch.distributed as dist

sys.path.insert(0, sys.argv[1])
from train_runs import sixteen_config
from apr_kernels.model import Transformer
from apr_kernels.train import context_parallel, float8, tensor_parallel

dist.init_process_group("gloo")
rank, world, out = dist.get_rank(), dist.get_world_size(), {}
tp_size, cp_size = int(sys.argv[2]), int(sys.argv[3])
tp = tensor_parallel.groups(world, tp_size, rank) if tp_size > 1 else None
cp = context_parallel.groups(world, cp_size, rank, stride=tp_size) if cp_size > 1 else None
if os.environ.get("NO_REDUCTION"):  # (what the test's bounds would see without the reductions)
    float8._install_amax_reduction = float8._mark_splits = float8.split_positions = lambda *a, **k: None
float8.convert(Transformer(sixteen_config(), fast=False), "tensorwise", torch.device("cpu"))
if not os.environ.get("NO_REDUCTION"):
    float8._install_amax_reduction()
f8_linear = sys.modules["torchao.float8.float8_linear"]
tensor_to_scale = sys.modules["torchao.float8.float8_utils"].tensor_to_scale
cast, in_split, scales = f8_linear.hp_tensor_to_float8_dynamic, [False], []


def checked_cast(hp, dtype, mm_config, **kw):
    \"\"\"Context parallelism: each cast of the split model whose scale spans the tokens (a rowwise one
    per column; a tensorwise one without tensor parallelism, which would span its split too) against
    torchao's own scale of the group's whole rows, gathered.\"\"\"
    got = cast(hp, dtype, mm_config, **kw)
    dim = kw.get("axiswise_dim")
    over_tokens = kw["gemm_input_role"].name != "WEIGHT" and (dim is None or dim % hp.dim() != hp.dim() - 1)
    if in_split[0] and cp is not None and over_tokens and (tp is None or dim is not None):
        flat = hp.detach().reshape(-1, hp.shape[-1]).contiguous()
        rows = [torch.empty_like(flat) for _ in range(cp.size)]
        dist.all_gather(rows, flat, group=cp.group)
        want = tensor_to_scale(torch.cat(rows), dtype, False, None, kw["scaling_granularity"],
                               None if dim is None else 0, kw.get("round_scales_to_power_of_2", False))
        scales.append(float(((got._scale.reshape(want.shape) - want) / want).abs().max()))
    return got


checked_cast.reduces_over_split_groups = True  # (wraps the reductions: not wrapped by them again)
f8_linear.hp_tensor_to_float8_dynamic = checked_cast
for recipe in ("tensorwise", "rowwise", "rowwise_with_gw_hp"):
    torch.manual_seed(0)
    whole = Transformer(sixteen_config(), fast=False)
    with torch.no_grad():  # rank 1's heads' values and MLP rows 2^12 x rank 0's (their products with
        # o / down the same): a whole row's scale flushes rank 0's parts of o's and down's inputs
        for layer in whole.model.layers:
            a, m = layer.self_attn, layer.mlp
            for w in (a.v_proj.weight, a.v_proj.bias, m.up_proj.weight):
                w[w.shape[0] // 2:] *= 2.0 ** 12
            for w in (a.o_proj.weight, m.down_proj.weight):
                w[:, w.shape[1] // 2:] *= 2.0 ** -12
    split = copy.deepcopy(whole)
    if tp is not None:
        split.set_tensor_parallel(tp, vocabulary=False)
    for model in (whole, split):
        float8.convert(model, recipe, torch.device("cpu"))
    if cp is not None:
        split.set_context_parallel(cp)
        float8.split_positions(split, cp)
    ids = torch.randint(0, 272, (2, 32))
    shard = cp.shard if cp is not None else (lambda t: t)
    logits, n = {}, ids.numel()
    for name, model, x in (("whole", whole, ids), ("split", split, shard(ids))):
        in_split[0] = name == "split"
        y = model(x).float()  # (a sum over the positions: the context ranks' gradients add up)
        ((y.pow(2).mean(-1) + y.logsumexp(-1)).sum() / n).backward()
        logits[name] = y.detach()
    in_split[0] = False
    want = shard(logits["whole"])
    rel = {"logits": float((logits["split"] - want).abs().max() / want.abs().max())}
    grads, parts = dict(whole.named_parameters()), dict(split.named_parameters())
    dims = tensor_parallel.split_dims(split) if tp is not None else dict.fromkeys(grads)
    for n_, dim in dims.items():
        got = parts[n_].grad
        if cp is not None:
            dist.all_reduce(got, group=cp.group)
        want = tp.local(grads[n_].grad, dim, n_) if tp is not None else grads[n_].grad
        rel[n_] = float((got - want).abs().max() / want.abs().max())
    out[recipe] = {"rel": rel, "scales": scales[:]}
    scales.clear()
print(json.dumps(out))
"""


@pytest.mark.parametrize("tp, cp", [(1, 2), (2, 2)], ids=["context", "tensor_x_context"])
def test_split_projections_cast_as_the_whole_model(tmp_path, tp, cp):
    """Each recipe on a model split over context-parallel ranks, or over tensor- and context-parallel
    ranks both (2 x 2; gloo), equals the whole model in one process, logits and every split
    parameter's gradient (every parameter's under context parallelism alone; tensor parallelism alone
    runs in test_float8_on_two_ranks_matches_one_process): a scale along a split axis (a row-parallel
    input's or weight's rows, a column-parallel output gradient's, any tensorwise one; under context
    parallelism any scale over the tokens) takes the whole row's or tensor's maximum, over one group
    or both in turn. The weights make it matter: rank 1's parts of o's and down's inputs are 2^12 x
    rank 0's, so a scale of a rank's part alone keeps values the whole row's flushes (checked: with
    the reductions left out, the comparison fails the bound). Under context parallelism each cast
    whose scale spans the tokens is also checked against torchao's scale of the group's whole rows
    (left out, they differ by up to 4x)."""
    import json

    from rank_runs import free_port, rank_env, start_script

    script = tmp_path / "split.py"
    script.write_text(_SPLIT_SCRIPT)
    port, world = free_port(), tp * cp
    procs = [start_script([script, Path(__file__).parent, tp, cp], rank_env(r, world, port), tmp_path, f"rank{r}")
             for r in range(world)]
    for p, (out, err) in zip(procs, [p.communicate(timeout=240) for p in procs]):
        assert p.returncode == 0, err[-3000:]
        for recipe, got in json.loads(out.splitlines()[-1]).items():
            rel, scales = got["rel"], got["scales"]
            assert len(rel) == 1 + (2 * 10 if tp > 1 else 2 * 12 + 2), (recipe, list(rel))
            for name, value in rel.items():
                assert value < 1e-5, (recipe, name, value)
            # the casts over the tokens checked (14 projections): the input's and the output
            # gradient's, forward and backward, tensorwise; the weight gradient's two rowwise
            assert len(scales) == {"tensorwise": 4 * 14 * (tp == 1), "rowwise": 2 * 14}.get(recipe, 0) * (cp > 1)
            assert max(scales, default=0.0) < 1e-6, (recipe, max(scales))


def test_float8_on_two_ranks_matches_one_process(init, tmp_path):
    """DDP and FSDP (the weight gathered whole: its scale is the whole weight's) on two ranks, two
    rows each per micro-batch = one process with the same two-row micro-batches in turn (a
    tensorwise input scale is its micro-batch's; a step is 8 rows either way). Expert parallelism
    too: a Qwen2-MoE model whose experts stay in high precision (no balance loss, whose value would
    depend on the grouping). And context parallelism with ``tensorwise`` (an input's or an output
    gradient's scale reduced over the group), and tensor parallelism with ``tensorwise`` (each
    scale's maximum reduced over the group), under FSDP and with sequence parallelism, and with
    ``rowwise`` (each split row's maximum reduced)."""
    moe = sixteen_init(tmp_path / "moe.apr", seed=4, architecture="qwen2_moe", num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, shared_expert_intermediate_size=48, mlp_only_layers=(1,),
                       tie_word_embeddings=False)
    two = ["--batch-size", "4", "--grad-accum", "2", "--float8", "tensorwise"]
    moe_args = ["--router-aux-loss-coef", "0"]
    # context parallelism (each rank half of every row's positions) with tensorwise: each scale of an
    # input or an output gradient takes its maximum over the group, the whole micro-batch's
    cp = ["--float8", "tensorwise"]
    # tensor parallelism (each rank half of every projection) with tensorwise: each scale's maximum
    # over the group, the whole tensor's; the same micro-batches as one process
    tp = ["--float8", "tensorwise"]
    # and with rowwise: a scale along a split axis (a row-parallel input's or weight's rows, a
    # column-parallel output gradient's) takes its row's maximum over the group
    rw = ["--float8", "rowwise"]
    runs = {"ddp": (train_args(init, tmp_path / "ddp", *two, "--parallel", "ddp"), 2),
            "fsdp": (train_args(init, tmp_path / "fsdp", *two, "--parallel", "fsdp"), 2),
            "ep": (train_args(moe, tmp_path / "ep", *two, *moe_args, "--parallel", "ddp", "--expert-parallel", "2"), 2),
            "cp": (train_args(init, tmp_path / "cp", *cp, "--parallel", "fsdp", "--context-parallel", "2"), 2),
            "tp": (train_args(init, tmp_path / "tp", *tp, "--parallel", "fsdp", "--tensor-parallel", "2"), 2),
            "tp_sp": (train_args(init, tmp_path / "tp_sp", *tp, "--parallel", "ddp", "--tensor-parallel", "2",
                                 "--sequence-parallel"), 2),
            "tp_rw": (train_args(init, tmp_path / "tp_rw", *rw, "--parallel", "ddp", "--tensor-parallel", "2",
                                 "--sequence-parallel"), 2)}
    one_args = ["--batch-size", "2", "--grad-accum", "4", "--float8", "tensorwise"]
    references = {"dense": train_args(init, tmp_path / "one", *one_args),
                  "ep": train_args(moe, tmp_path / "one_moe", *one_args, *moe_args),
                  "hp": train_args(init, tmp_path / "hp", *one_args[:-2]),
                  "cp": train_args(init, tmp_path / "one_cp", *cp), "cp_hp": train_args(init, tmp_path / "cp_hp"),
                  "tp": train_args(init, tmp_path / "one_tp", *tp), "tp_rw": train_args(init, tmp_path / "one_rw", *rw)}
    one, out = against_one_process(runs, references, tmp_path / "launch")
    assert losses(one["dense"]) != pytest.approx(losses(one["hp"]), rel=1e-4)  # (float8 changes the run)
    assert losses(one["cp"]) != pytest.approx(losses(one["cp_hp"]), rel=1e-4)
    assert losses(one["tp_rw"]) != pytest.approx(losses(one["hp"]), rel=1e-4)  # (the same global batches)
    for name in runs:
        ref = one["tp" if name == "tp_sp" else name if name in ("ep", "cp", "tp", "tp_rw") else "dense"]
        # (context and tensor parallelism: the attention's or the split GEMMs' other summation order can
        # move a value across a float8 rounding boundary, so past the first step within a looser bound)
        assert losses(out[name])[0] == pytest.approx(losses(ref)[0], rel=1e-5), name
        loose = name in ("cp", "tp", "tp_sp", "tp_rw")
        assert losses(out[name]) == pytest.approx(losses(ref), rel=2e-4 if loose else 1e-5), name
        assert losses(out[name], "eval", "eval_loss") == pytest.approx(losses(ref, "eval", "eval_loss"),
                                                                         rel=2e-4 if loose else 1e-5), name


@pytest.mark.cuda
def test_cuda_float8_training_step_tracks_bf16():
    """float8 GEMMs on the GPU (compute capability >= 8.9): a training step's loss and gradients within
    float8's rounding of the bf16 model's, the parameters untouched in dtype."""
    if torch.cuda.get_device_capability() < float8.MIN_CAPABILITY:
        pytest.skip("no float8 tensor cores on this GPU")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = Transformer(sixteen_config(hidden_size=256, num_heads=4, head_dim=64, intermediate_size=512,
                                       vocab_size=1024), fast=True).to(dev)
    plain = copy.deepcopy(model)
    float8.convert(model, "tensorwise", dev)
    ids = torch.randint(0, 1024, (4, 128), device=dev)
    losses, grads = [], []
    for m in (model, plain):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m.loss(ids[:, :-1], ids[:, 1:])
        loss.backward()
        losses.append(float(loss))
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert losses[0] == pytest.approx(losses[1], rel=0.02)
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()) < 0.25  # (0.11 in the emulation, fp32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
