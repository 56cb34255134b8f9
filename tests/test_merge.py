"""apr-kernels merge (convert/merge.py): each method against its formula written out per tensor
(linear, slerp with its parallel fallback, task arithmetic, TIES with trimming, sign election and the
disjoint mean), dtypes kept, the refusals naming what differs, and the CLI writing a loadable model."""

import math

import pytest
import torch

import apr_kernels
from apr_kernels.convert.merge import merge
from apr_kernels.model import Transformer, from_apr, pad_vocab, preset
from apr_kernels.train.checkpoint import save_checkpoint
from apr_kernels.train.cli import byte_tokenizer


def _models(tmp_path, n, dtype=torch.float32, names=("a", "b", "c", "d")):
    tok = byte_tokenizer()
    cfg = preset("tiny_qwen2").replace(vocab_size=pad_vocab(tok.vocab_size))
    paths = []
    for i in range(n):
        torch.manual_seed(i)
        model = Transformer(cfg, fast=False).to(dtype)
        path = tmp_path / f"{names[i]}.apr"
        save_checkpoint(path, model=model, tokenizer=tok)
        paths.append(path)
    return paths


def _load(path):
    with apr_kernels.open(path) as f:
        return {n: f.get_tensor(n).clone() for n in f.keys()}, dict(f.metadata)


def test_linear_is_the_weighted_mean_in_the_inputs_dtype(tmp_path):
    a, b = _models(tmp_path, 2, torch.bfloat16)
    meta = merge([a, b], tmp_path / "m.apr", weights=[1.0, 3.0])
    (ta, _), (tb, _), (tm, mm) = _load(a), _load(b), _load(tmp_path / "m.apr")
    assert set(tm) == set(ta) and mm["merge"] == meta["merge"] == {"method": "linear", "models": [str(a), str(b)],
                                                                    "weights": [1.0, 3.0]}
    assert mm["tokenizer.vocabulary"] == _load(a)[1]["tokenizer.vocabulary"]
    for n in ta:
        assert tm[n].dtype == torch.bfloat16
        want = ((ta[n].float() + 3 * tb[n].float()) / 4).to(torch.bfloat16)
        assert torch.equal(tm[n], want), n


def test_slerp_is_spherical_and_falls_back_to_linear_for_parallel_tensors(tmp_path):
    a, b = _models(tmp_path, 2)
    merge([a, b], tmp_path / "m.apr", method="slerp", t=0.3)
    (ta, _), (tb, _), (tm, _) = _load(a), _load(b), _load(tmp_path / "m.apr")
    n = "model.layers.0.mlp.up_proj.weight"
    x, y = ta[n].double().flatten(), tb[n].double().flatten()
    omega = math.acos(float(x @ y / (x.norm() * y.norm())))
    want = (math.sin(0.7 * omega) * x + math.sin(0.3 * omega) * y) / math.sin(omega)
    torch.testing.assert_close(tm[n].double().flatten(), want, rtol=1e-6, atol=1e-7)
    # a norm weight of ones in both models: parallel, so plain interpolation (ones again)
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(ta[norm], tb[norm]) and torch.allclose(tm[norm], ta[norm])


def test_task_arithmetic_adds_the_weighted_task_vectors(tmp_path):
    base, a, b = _models(tmp_path, 3)
    merge([a, b], tmp_path / "m.apr", method="task_arithmetic", base=base, weights=[0.5, 0.7])
    (t0, _), (ta, _), (tb, _), (tm, _) = (_load(p) for p in (base, a, b, tmp_path / "m.apr"))
    for n in t0:
        want = t0[n] + 0.5 * (ta[n] - t0[n]) + 0.7 * (tb[n] - t0[n])
        torch.testing.assert_close(tm[n], want, rtol=1e-6, atol=1e-6, msg=n)


def test_ties_trims_elects_signs_and_averages_the_agreeing_entries(tmp_path):
    base, a, b, c = _models(tmp_path, 4)
    merge([a, b, c], tmp_path / "m.apr", method="ties", base=base, weights=[1.0, 0.5, 2.0], density=0.3)
    tensors = [_load(p)[0] for p in (base, a, b, c)]
    tm, _ = _load(tmp_path / "m.apr")
    n = "model.layers.1.self_attn.o_proj.weight"
    b0 = tensors[0][n].flatten().tolist()
    deltas = []
    for t in tensors[1:]:  # keep the 30% largest magnitudes of each task vector
        d = [x - y for x, y in zip(t[n].flatten().tolist(), b0)]
        k = round(0.3 * len(d))
        cut = sorted((abs(v) for v in d), reverse=True)[k - 1]
        deltas.append([v if abs(v) >= cut else 0.0 for v in d])
    w = [1.0, 0.5, 2.0]
    want = []
    for j, x0 in enumerate(b0):
        total = sum(wi * d[j] for wi, d in zip(w, deltas))
        sign = (total > 0) - (total < 0)
        agree = [(wi, d[j]) for wi, d in zip(w, deltas) if d[j] != 0 and ((d[j] > 0) - (d[j] < 0)) == sign]
        want.append(x0 + (sum(wi * v for wi, v in agree) / sum(wi for wi, _ in agree) if agree else 0.0))
    assert tm[n].flatten().tolist() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_dare_keeps_a_random_share_of_each_task_vector_rescaled(tmp_path):
    """dare_linear with one model: every entry of (merged - base) is either 0 (dropped) or the task
    vector's entry / density (kept), about a density share of them kept; the same seed gives the same
    file, another seed other drops. dare_ties with two models agreeing in sign equals their
    weighted mean of the rescaled entries where both kept them."""
    base, a, b = _models(tmp_path, 3)
    merge([a], tmp_path / "m.apr", method="dare_linear", base=base, weights=[0.8], density=0.3, seed=7)
    (t0, _), (ta, _), (tm, meta) = _load(base), _load(a), _load(tmp_path / "m.apr")
    assert meta["merge"]["seed"] == 7 and meta["merge"]["density"] == 0.3
    kept_total = count = 0
    for n in t0:
        delta = ta[n] - t0[n]
        moved = tm[n] - t0[n]
        full = 0.8 * delta / 0.3
        kept = (moved - full).abs() <= 1e-5 * full.abs().max().clamp_min(1e-6)
        assert torch.all(kept | (moved == 0)), n
        kept_total, count = kept_total + int((kept & (delta != 0)).sum()), count + int((delta != 0).sum())
    assert abs(kept_total / count - 0.3) < 0.02
    merge([a], tmp_path / "again.apr", method="dare_linear", base=base, weights=[0.8], density=0.3, seed=7)
    merge([a], tmp_path / "other.apr", method="dare_linear", base=base, weights=[0.8], density=0.3, seed=8)
    again, other = _load(tmp_path / "again.apr")[0], _load(tmp_path / "other.apr")[0]
    n = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(again[n], tm[n]) and not torch.equal(other[n], tm[n])
    # dare_ties of a model with itself: the kept entries of each copy, rescaled, averaged (same sign)
    merge([a, a], tmp_path / "t.apr", method="dare_ties", base=base, weights=[1.0, 1.0], density=0.5, seed=3)
    tt = _load(tmp_path / "t.apr")[0]
    delta, moved = ta[n] - t0[n], tt[n] - t0[n]
    ratio = moved[delta.abs() > 1e-4] / (delta[delta.abs() > 1e-4] / 0.5)
    assert torch.all(((ratio - 1).abs() < 1e-4) | (ratio.abs() < 1e-6))  # kept by either copy, or by none
    assert abs(((ratio - 1).abs() < 1e-4).double().mean().item() - 0.75) < 0.03  # each copy its own drops


def test_refusals_name_what_differs(tmp_path):
    a, b, c = _models(tmp_path, 3)
    cases = [
        (dict(models=[a, b, c], method="slerp"), "slerp interpolates exactly two models"),
        (dict(models=[a, b], method="ties"), "--base is required with --method ties"),
        (dict(models=[a, b], base=c), "--base is only for the task-vector methods"),
        (dict(models=[a, b], weights=[1.0]), "1 --weights for 2 models"),
        (dict(models=[a, b], method="ties", base=c, density=0.0), "0 < density <= 1"),
        (dict(models=[a], method="linear"), "needs two models or more"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            merge(kw.pop("models"), tmp_path / "m.apr", **kw)
    # another shape, another tokenizer
    tok = byte_tokenizer()
    wide = preset("tiny_qwen2").replace(vocab_size=pad_vocab(tok.vocab_size), intermediate_size=96)
    save_checkpoint(tmp_path / "wide.apr", model=Transformer(wide, fast=False), tokenizer=tok)
    with pytest.raises(ValueError, match=r"wide.apr: tensor 'model.layers.0.mlp.down_proj.weight' has shape \[56, 96\], .*a.apr has \[56, 88\]"):
        merge([a, tmp_path / "wide.apr"], tmp_path / "m.apr")
    from apr_kernels.tokenizer import Tokenizer

    other = Tokenizer.from_ranks({bytes([i]): i for i in range(256)}, {"<|end|>": 256}, eos_id=256)
    torch.manual_seed(9)
    save_checkpoint(tmp_path / "other.apr", model=Transformer(wide.replace(intermediate_size=preset(
        "tiny_qwen2").intermediate_size), fast=False), tokenizer=other)
    with pytest.raises(ValueError, match="other.apr: metadata tokenizer.vocabulary differs from .*a.apr's"):
        merge([a, tmp_path / "other.apr"], tmp_path / "m.apr")
    with pytest.raises(ValueError, match="the output .* is one of the inputs"):
        merge([a, b], a)


def test_cli_merge_writes_a_model_that_loads(tmp_path, capsys):
    from apr_kernels.cli import main

    a, b = _models(tmp_path, 2)
    assert main(["merge", str(a), str(b), "--out", str(tmp_path / "m.apr"), "--method", "slerp", "--t", "0.5",
                 "--dtype", "bf16"]) == 0
    assert "slerp of 2 models" in capsys.readouterr().out
    tensors, _ = _load(tmp_path / "m.apr")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    model = from_apr(tmp_path / "m.apr")  # preflight-checked: a complete model
    logits = model(torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(logits).all()
    assert main(["merge", str(a), "--out", str(tmp_path / "x.apr")]) == 1
    assert "needs two models or more" in capsys.readouterr().err
