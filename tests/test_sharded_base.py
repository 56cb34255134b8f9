"""A quantised LoRA base under FSDP (QLoRA, ``train/distributed.py``'s ``ShardedBlocks``): 2 gloo
ranks each keep only their whole blocks of every base (about half its bytes, in rank order the
file's bytes), and a forward + backward gives one process's loss and adapter gradients (each base
gathered per GEMM, the fused q/k/v path, the grouped-GEMM experts and DoRA included); a file with a
non-finite block is refused on every rank, whichever rank holds the block."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

LORA = {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"], "seed": 3}


def _lora(case):
    return {**LORA, "dora": True} if "dora" in case else LORA  # (DoRA: magnitudes from the gathered base)


def _config(kind):
    from apr_kernels.model import preset

    cfg = preset("tiny_qwen2").replace(hidden_size=256, intermediate_size=512)  # whole 256-element blocks
    if kind == "moe":
        cfg = preset("tiny_qwen3_moe").replace(hidden_size=256, moe_intermediate_size=256, head_dim=64)
    return cfg


def _inputs(cfg):
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, cfg.vocab_size, (2, 17), generator=g)
    return x[:, :-1], x[:, 1:]


def _step(model, cfg):
    x, y = _inputs(cfg)
    loss = model.loss(x, y, reduction="sum")
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _worker(spec_path: str) -> int:
    from apr_kernels.model.lora import QuantizedLoRALinear
    from apr_kernels.train import distributed as D

    spec = json.loads(Path(spec_path).read_text())
    env = D.setup("cpu", timeout_s=60, need_group=True)
    out = {}
    for case, path in spec["files"].items():
        fast = spec["fast"][case]
        model = D.from_apr(path, env, "fsdp", fast=fast, lora_init=_lora(case), keep_quantized=True)
        bases = {n: m.base for n, m in model.named_modules() if isinstance(m, QuantizedLoRALinear)}
        loss, grads = _step(model, _config("moe" if "moe" in case else "dense"))
        out[case] = {"local": {n: b.local.numel() for n, b in bases.items()},
                     "total": {n: b.nbytes for n, b in bases.items()},
                     "first": {n: b.first for n, b in bases.items()},
                     "bytes": {n: b.local.tolist()[:64] for n, b in bases.items()},
                     "loss": float(loss),
                     "grads": {n: D.full_tensor(g).tolist() for n, g in grads.items()}}
    try:
        D.from_apr(spec["bad"], env, "fsdp", fast=False, lora_init=LORA, keep_quantized=True)
        out["bad"] = "loaded"
    except (ValueError, RuntimeError) as e:  # (its own error on the failing rank, a pointer on the other)
        out["bad"] = str(e)
    Path(spec["out"]).joinpath(f"rank{env.rank}.json").write_text(json.dumps(out))
    D.teardown(env)
    return 0


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from rank_runs import free_port, rank_env, start_script
    from test_lora import _quantised_file

    root = tmp_path_factory.mktemp("qbase")
    files = {"q4k-eager": ("Q4_K", "dense"), "q6k-fused": ("Q6_K", "dense"), "apr_q4": ("APR_Q4", "dense"),
             "q4k-moe-grouped": ("Q4_K", "moe"), "q4k-dora": ("Q4_K", "dense")}
    spec = {"out": str(root), "files": {}, "fast": {}}
    for case, (kind, shape) in files.items():
        path = root / f"{case}.apr"
        _quantised_file(path, _config(shape), kind, seed=5)
        spec["files"][case] = str(path)
        spec["fast"][case] = "fused" in case or "grouped" in case
    # a non-finite Q4_K super-block scale in the second half of the last layer's down_proj: rank 1's
    import apr_kernels

    bad = root / "bad.apr"
    with apr_kernels.open(spec["files"]["q4k-eager"]) as f:
        tensors = {n: (f.get_raw(n).clone() if f.info(n).dtype == "Q4_K" else f.get_tensor(n).clone()) for n in f.keys()}
        infos = {n: f.info(n) for n in f.keys()}
        meta = dict(f.metadata)
    from apr_kernels.io import QuantizedTensor

    name = "model.layers.1.mlp.down_proj.weight"
    raw = tensors[name]
    raw[-144:-142] = torch.tensor([0x00, 0x7C], dtype=torch.uint8)  # f16 +inf as the last block's d
    tensors = {n: QuantizedTensor("Q4_K", infos[n].shape, t) if infos[n].dtype == "Q4_K" else t
               for n, t in tensors.items()}
    apr_kernels.save(tensors, bad, metadata=meta)
    spec["bad"] = str(bad)
    (root / "spec.json").write_text(json.dumps(spec))
    port = free_port()
    procs = [start_script([__file__, root / "spec.json"], rank_env(r, 2, port), root, f"rank{r}") for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    return spec, [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("case", ["q4k-eager", "q6k-fused", "apr_q4", "q4k-moe-grouped", "q4k-dora"])
def test_each_rank_keeps_half_of_every_base_and_trains_as_one_process(ranks, case):
    import apr_kernels
    from apr_kernels.model.loading import from_apr

    spec, (r0, r1) = ranks
    unit = {"q4k": 144, "q6k": 210, "apr": 18}[case.split("-")[0].split("_")[0]]
    with apr_kernels.open(spec["files"][case]) as f:
        for name, total in r0[case]["total"].items():
            whole = f.get_raw(f"{name}.weight")
            assert total == whole.numel()
            a, b = r0[case]["local"][name], r1[case]["local"][name]
            assert a + b == total and a % unit == 0 and abs(a - b) <= unit, name  # whole blocks, halves
            assert r1[case]["first"][name] == a
            assert r0[case]["bytes"][name] == whole[:64].tolist()[:min(64, a)]
            assert r1[case]["bytes"][name] == whole[a:a + 64].tolist()
    cfg = _config("moe" if "moe" in case else "dense")
    one = from_apr(spec["files"][case], fast=spec["fast"][case], lora_init=_lora(case), keep_quantized=True)
    loss, grads = _step(one, cfg)
    for r in (r0, r1):  # (each rank computed the loss of the same rows)
        assert r[case]["loss"] == pytest.approx(float(loss), rel=1e-5)
        assert sorted(r[case]["grads"]) == sorted(grads)
    for n, g in grads.items():  # FSDP averages each rank's gradient of the same loss: the same gradient
        torch.testing.assert_close(torch.tensor(r0[case]["grads"][n]), g, rtol=1e-4, atol=1e-6, msg=n)


def test_a_non_finite_block_is_refused_on_every_rank(ranks):
    _, (r0, r1) = ranks
    assert "model.layers.1.mlp.down_proj.weight" in r1["bad"] and "non-finite" in r1["bad"]
    assert "failed on 1 other rank" in r0["bad"], r0["bad"]


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
