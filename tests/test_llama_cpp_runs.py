"""``apr-kernels export`` to GGUF against llama.cpp itself.

tests/llama_cpp_golden.py recorded (tests/data/llama_cpp/runs.json), for seven seeded models with
real tokenizers (Qwen2 dense with yarn scaling, Qwen2-MoE with a shared expert, Qwen3-MoE, Llama
untied, Llama 3.1 rope scaling, Llama with adjacent-pair rope and linear scaling, Mixtral): the GGUF
file our export wrote and llama.cpp ran, the logits llama.cpp computed on it, the file llama.cpp's own
``convert_hf_to_gguf.py`` wrote from our Hugging Face export of the same model, and llama.cpp's
tokenisation of two texts. Here, without llama.cpp: the same models exported again give that file,
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
