"""``apr-kernels export`` to GGUF against llama.cpp itself.

tests/llama_cpp_golden.py recorded (tests/data/llama_cpp/runs.json), for seven seeded models with
real tokenizers (Qwen2 dense with yarn scaling, Qwen2-MoE with a shared expert, Qwen3-MoE, Llama
untied, Llama 3.1 rope scaling, Llama with adjacent-pair rope and linear scaling, Mixtral): the GGUF
file our export wrote and llama.cpp ran, the logits llama.cpp computed on it, the file llama.cpp's own
``convert_hf_to_gguf.py`` wrote from our Hugging Face export of the same model, and llama.cpp's
tokenisation of two texts; and (adapters.json) for four of them (two mixtures of experts) the LoRA
adapter GGUF ``export --adapter`` wrote from a step checkpoint and the logits llama.cpp computed with it on the base's
export. Here, without llama.cpp: the same models exported again give that file,
byte for byte (so the records still speak for it), whose keys and tensors equal the converter's; our
logits are llama.cpp's; our tokenizers split the texts as llama.cpp does. A change to the exporter
that alters the file fails here: rerun the script (its docstring says how) and look at what it prints.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import llama_cpp_golden as golden

RECORD = json.loads((Path(__file__).parent / "data" / "llama_cpp" / "runs.json").read_text())
ADAPTERS = json.loads((Path(__file__).parent / "data" / "llama_cpp" / "adapters.json").read_text())
golden.RUN_TEXTS = RECORD["texts"]

pytest.importorskip("gguf")


def _tokenizer(kind: str):
    if kind == "mistral":
        pytest.importorskip("mistral_common")  # (ships Mistral 7B's tokenizer.model)
    return golden.run_tokenizer(kind)


def _spec_diff(ours: dict, want: dict) -> list[str]:
    return [f"{part} {name}: {ours[part].get(name)} != {want[part].get(name)}"
            for part in ("keys", "tensors") for name in sorted(set(ours[part]) | set(want[part]))
            if ours[part].get(name) != want[part].get(name)]


@pytest.mark.parametrize("name", sorted(RECORD["models"]))
def test_export_is_the_file_llama_cpp_ran_and_computes_its_logits(name, tmp_path):
    from apr_kernels.convert.gguf_out import export_gguf

    rec = RECORD["models"][name]
    _tokenizer(golden.RUNS[name][2])
    apr, tok = golden.run_model(name, tmp_path)
    path = export_gguf(apr, tmp_path / f"{name}.gguf", progress=False)
    if golden.file_sha256(path) != rec["export_sha256"]:  # (the file llama.cpp ran, byte for byte)
        diff = _spec_diff(golden.gguf_spec(path), rec["export"])
        pytest.fail(f"the export changed ({diff[:5]}): rerun tests/llama_cpp_golden.py")
    assert not _spec_diff(rec["export"], rec["converter"])  # what llama.cpp's convert_hf_to_gguf.py writes
    ids = golden.run_ids(tok)
    assert ids == rec["ids"]
    ours = golden.our_logits(apr, ids)
    tol = 1e-5 * float(np.abs(ours).max())  # (llama.cpp's float32 sums in another order: ~1e-6 of it)
    top = np.array(rec["logits"]["top"])
    np.testing.assert_allclose(np.take_along_axis(ours, top, 1), np.array(rec["logits"]["values"]), rtol=0, atol=tol)
    lse = np.log(np.exp(ours - ours.max(1, keepdims=True)).sum(1)) + ours.max(1)
    np.testing.assert_allclose(lse, np.array(rec["logits"]["logsumexp"]), rtol=0, atol=tol)


@pytest.mark.parametrize("kind", sorted(RECORD["tokens"]))
def test_tokenizers_split_text_as_llama_cpp_does(kind):
    tok = _tokenizer(kind)
    for text, want in zip(RECORD["texts"], RECORD["tokens"][kind]):
        assert tok.encode(text, special=False) == want


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_adapter_export_is_the_file_llama_cpp_applied_and_computes_its_logits(name, tmp_path):
    """``export STEP.apr adapter.gguf --adapter``: the file llama.cpp loaded beside the base's export (its
    ``--lora``), byte for byte, and our LoRA model's logits are those llama.cpp computed with it."""
    from apr_kernels.convert.gguf_out import export_adapter_gguf, export_gguf

    rec = ADAPTERS[name]
    step, base, tok = golden.adapter_model(name, tmp_path)
    assert golden.file_sha256(export_gguf(base, tmp_path / "base.gguf", progress=False)) == rec["base_sha256"]
    adapter = export_adapter_gguf(step, tmp_path / "adapter.gguf")
    assert golden.file_sha256(adapter) == rec["adapter_sha256"], "the adapter export changed: rerun llama_cpp_golden.py"
    ids = golden.run_ids(tok)
    assert ids == rec["ids"]
    ours = golden.our_logits(step, ids)  # (the adapters merged into the base: W + (alpha / r) B A)
    tol = 1e-5 * float(np.abs(ours).max())
    top = np.array(rec["logits"]["top"])
    np.testing.assert_allclose(np.take_along_axis(ours, top, 1), np.array(rec["logits"]["values"]), rtol=0, atol=tol)
    lse = np.log(np.exp(ours - ours.max(1, keepdims=True)).sum(1)) + ours.max(1)
    np.testing.assert_allclose(lse, np.array(rec["logits"]["logsumexp"]), rtol=0, atol=tol)


def test_adapter_export_writes_rslora_as_its_alpha_and_refuses_dora(tmp_path):
    """rsLoRA's scale alpha / sqrt(r) goes out as the alpha llama.cpp's alpha / r turns into it; DoRA is
    refused by name (llama.cpp's adapters are plain LoRA)."""
    import gguf
    import torch

    from apr_kernels.convert.gguf_out import export_adapter_gguf
    from apr_kernels.model import Transformer, preset
    from apr_kernels.model.lora import add_lora
    from apr_kernels.train.checkpoint import save_checkpoint

    for case, arch, extra in (("rslora", "tiny_qwen2", {"rslora": True}), ("dora", "tiny_qwen2", {"dora": True})):
        torch.manual_seed(0)
        model = Transformer(preset(arch), fast=False)
        add_lora(model, 4, 6.0, **extra)
        save_checkpoint(tmp_path / f"{case}.apr", model=model)
        if case == "rslora":
            r = gguf.GGUFReader(str(export_adapter_gguf(tmp_path / f"{case}.apr", tmp_path / f"{case}.gguf")))
            assert float(r.fields["adapter.lora.alpha"].parts[-1][0]) == pytest.approx(6.0 * 2.0)  # (sqrt(4) = 2)
            assert r.fields["general.type"].parts[-1].tobytes().decode() == "adapter"
        else:
            with pytest.raises(ValueError, match="cannot be written as a llama.cpp LoRA adapter"):
                export_adapter_gguf(tmp_path / f"{case}.apr", tmp_path / f"{case}.gguf")
            assert not (tmp_path / f"{case}.gguf").exists()
