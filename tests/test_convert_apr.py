"""``apr-kernels convert SRC.apr DST.apr``: a training checkpoint or any APR file as a conversion source.

References: the source file's own tensors, ``apr_kernels.quant.quantize`` of them for ``--quantize``,
and a LoRA update ``W + (alpha / r) B A`` written out here from the checkpoint's adapter tensors.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

import apr_kernels
from apr_kernels.quant import quantize
from rank_runs import cli

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A full and a LoRA run of two steps, each with a step-1 checkpoint (training state, adapters)."""
    root = tmp_path_factory.mktemp("convert_apr")
    common = ["train", "--preset", "tiny_llama", "--tokenizer", "bytes", "--data", str(STDLIB / "json"),
              "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "64", "--save-every", "1",
              "--no-progress", "--lr", "1e-2"]
    assert cli([*common, "--out", str(root / "full")])[0] == 0
    assert cli([*common, "--out", str(root / "lora"), "--lora-rank", "4"])[0] == 0
    return root


def _read(path: Path) -> tuple[dict, dict]:
    with apr_kernels.open(path) as f:
        return {n: f.get_tensor(n).clone() for n in f.keys()}, dict(f.metadata)


def test_a_checkpoint_converts_to_its_model_alone(runs, tmp_path):
    src = runs / "full" / "step_000001.apr"
    code, _ = cli(["convert", str(src), str(tmp_path / "m.apr")])
    assert code == 0
    source, source_meta = _read(src)
    out, meta = _read(tmp_path / "m.apr")
    assert any(n.startswith("__training__.") for n in source)  # the optimizer state was there
    assert set(out) == {n for n in source if not n.startswith("__training__.")}
    for name, t in out.items():
        assert torch.equal(t, source[name]), name
    assert not any(k.startswith("training.") for k in meta)
    assert meta["original_format"] == "apr" and meta["source"] == str(src.resolve())
    assert meta["param_count"] == sum(t.numel() for t in out.values())
    for key in ("architecture", "hidden_size", "tokenizer.vocabulary", "tokenizer.merges"):
        assert meta[key] == source_meta[key], key
    # and it is the same model: eval on it gives the checkpoint's loss
    held = str(STDLIB / "shlex.py")
    losses = [cli(["eval", "--init", str(p), "--data", held, "--max-tokens", "64", "--seq-len", "32"])[1].strip().splitlines()[-1]
              for p in (src, tmp_path / "m.apr")]
    assert losses[0] == losses[1]


def test_quantize_writes_the_quantisers_blocks(runs, tmp_path):
    src = runs / "full" / "model.apr"
    assert cli(["convert", str(src), str(tmp_path / "q.apr"), "--quantize", "q4k"])[0] == 0
    source, _ = _read(src)
    source = {n: t for n, t in source.items() if not n.startswith("__training__.")}
    with apr_kernels.open(tmp_path / "q.apr") as f:
        kinds = {n: f.info(n).dtype for n in f.keys()}
        assert set(kinds) == set(source)
        for name, t in source.items():
            if t.dim() == 2 and t.numel() >= 1024:
                assert kinds[name] == "Q4_K", name
                assert torch.equal(f.get_raw(name), quantize("Q4_K", t).data), name
            else:
                assert kinds[name] == "F32" and torch.equal(f.get_tensor(name), t), name
        assert f.metadata["quantization"]["quant_type"] == "q4k"
    # quantised blocks pass through a second conversion byte for byte
    assert cli(["convert", str(tmp_path / "q.apr"), str(tmp_path / "again.apr")])[0] == 0
    with apr_kernels.open(tmp_path / "q.apr") as a, apr_kernels.open(tmp_path / "again.apr") as b:
        assert set(a.keys()) == set(b.keys())
        for name in a.keys():
            assert torch.equal(a.get_raw(name), b.get_raw(name)), name


def test_quantize_device_is_checked_by_name(runs, tmp_path, capsys):
    """--device: where --quantize runs; a device this machine lacks, or no device at all, is refused by
    name before anything is written."""
    src = runs / "full" / "model.apr"
    assert cli(["convert", str(src), str(tmp_path / "cpu.apr"), "--quantize", "q6k", "--device", "cpu", "-q"])[0] == 0
    assert cli(["convert", str(src), str(tmp_path / "auto.apr"), "--quantize", "q6k", "-q"])[0] == 0
    assert (tmp_path / "cpu.apr").read_bytes() == (tmp_path / "auto.apr").read_bytes()
    capsys.readouterr()
    wrong = ["tpu"] + ([] if torch.cuda.is_available() else ["cuda"])
    for name in wrong:
        assert cli(["convert", str(src), str(tmp_path / "no.apr"), "--quantize", "q4k", "--device", name])[0] != 0
        assert f"--device {name}" in capsys.readouterr().err, name
    assert not (tmp_path / "no.apr").exists()


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["q4km", "q8", "q4"])
def test_quantize_on_the_gpu_writes_the_hosts_file(runs, tmp_path, kind):
    """convert --quantize on a CUDA GPU (the Triton Q4_K/Q6_K searches, torch for APR_Q8/APR_Q4) writes
    the file the CPU writes, byte for byte."""
    src = runs / "full" / "model.apr"
    for device in ("cpu", "cuda"):
        assert cli(["convert", str(src), str(tmp_path / f"{device}.apr"), "--quantize", kind, "--device", device,
                    "-q"])[0] == 0
    assert (tmp_path / "cpu.apr").read_bytes() == (tmp_path / "cuda.apr").read_bytes()


def test_a_lora_checkpoint_converts_with_its_adapters_merged(runs, tmp_path):
    src = runs / "lora" / "step_000001.apr"
    source, source_meta = _read(src)
    lora = source_meta["lora"]
    scale = lora["alpha"] / lora["rank"]
    assert cli(["convert", str(src), str(tmp_path / "m.apr"), "--dtype", "f32"])[0] == 0
    out, meta = _read(tmp_path / "m.apr")
    assert meta["lora_merged"] == lora and "lora" not in meta
    assert not any(".lora_" in n for n in out)
    merged = 0
    for name, t in out.items():
        module = name.removesuffix(".weight")
        if f"{module}.lora_A" in source:
            a, b = source[f"{module}.lora_A"].double(), source[f"{module}.lora_B"].double()
            assert b.abs().max() > 0, name  # one step trained it: the update is not zero
            expected = (source[name].double() + scale * b @ a).float()
            torch.testing.assert_close(t, expected, rtol=1e-6, atol=1e-7, msg=name)
            merged += 1
        else:
            assert torch.equal(t, source[name]), name
    assert merged == 14  # seven projections in each of two layers


def _gguf_values(t, shape) -> torch.Tensor:
    import gguf

    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(shape)


def test_gguf_export_of_q4k_rows_that_are_not_whole_blocks(runs, tmp_path):
    """An APR file pads each Q4_K row to whole 256-value blocks; GGUF cannot (its k-quant rows are whole
    blocks), so such tensors go out, in their true shape and with a warning, as Q8_0 where rows are whole
    32-value blocks (as llama.cpp falls back to another type), else dequantised F32 (they were written
    as [rows, 256] tensors before). Checked with the gguf package's reader; a Qwen2-MoE model's stacked
    experts too."""
    import gguf

    from train_runs import sixteen_init

    q8 = gguf.GGMLQuantizationType.Q8_0
    moe = sixteen_init(tmp_path / "moe_source.apr", architecture="qwen2_moe", num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=32, shared_expert_intermediate_size=64, tie_word_embeddings=False)
    cases = {  # source, warning, (APR name, GGUF name, expert, GGUF type) to check
        "llama": (runs / "full" / "model.apr", "11 Q4_K/Q6_K tensors have rows of 48, 104 values",
                  [("model.embed_tokens.weight", "token_embd.weight", None, gguf.GGMLQuantizationType.F32),
                   ("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight", None,
                    gguf.GGMLQuantizationType.F32),
                   ("model.layers.1.self_attn.o_proj.weight", "blk.1.attn_output.weight", None,
                    gguf.GGMLQuantizationType.F32)]),
        "moe": (moe, r"Q4_K/Q6_K tensors have rows of 32, 64 values",
                [("model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight", None, q8),
                 ("model.layers.1.mlp.shared_expert.down_proj.weight", "blk.1.ffn_down_shexp.weight", None, q8),
                 ("model.layers.0.mlp.experts.2.down_proj.weight", "blk.0.ffn_down_exps.weight", 2, q8),
                 ("model.layers.1.mlp.experts.3.gate_proj.weight", "blk.1.ffn_gate_exps.weight", 3, q8)]),
    }
    for name, (src, warning, checks) in cases.items():
        assert cli(["convert", str(src), str(tmp_path / f"{name}.apr"), "--quantize", "q4k"])[0] == 0
        with pytest.warns(UserWarning, match=warning):
            assert cli(["export", str(tmp_path / f"{name}.apr"), str(tmp_path / f"{name}.gguf")])[0] == 0
        written = {t.name: t for t in gguf.GGUFReader(str(tmp_path / f"{name}.gguf")).tensors}
        with apr_kernels.open(tmp_path / f"{name}.apr") as f:
            for hf, gname, expert, kind in checks:
                t, shape = written[gname], list(f.info(hf).shape)
                assert t.tensor_type == kind, gname
                dims = [int(d) for d in t.shape][::-1]
                assert dims == (shape if expert is None else [dims[0], *shape]), gname
                got = _gguf_values(t, dims)
                got = got if expert is None else got[expert]
                want = f.get_tensor(hf)
                if kind == q8:  # the gguf package's Q8_0 of the Q4_K values: within half a step of each
                    # 32-value block's scale (plus the f16 rounding of that scale: 127 x 2^-11 steps)
                    reference = gguf.quants.dequantize(gguf.quants.quantize(want.numpy(), q8), q8)
                    assert torch.equal(got, torch.from_numpy(reference.copy()).reshape(want.shape)), gname
                    step = want.reshape(-1, 32).abs().amax(dim=1, keepdim=True) / 127
                    assert ((got - want).reshape(-1, 32).abs() <= step * (0.5 + 127 / 2048) + 1e-7).all(), gname
                    assert not torch.equal(got, want), gname
                else:
                    assert torch.equal(got, want), gname
