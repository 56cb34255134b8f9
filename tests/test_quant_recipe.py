"""``--quantize q4km`` against llama.cpp's own Q4_K_M recipe, and ``quant.quantize`` against
llama.cpp's own Q4_K / Q6_K blocks.

The records in tests/data/llama_cpp come from llama.cpp itself: ``tests/llama_cpp_golden.py`` ran
llama-cpp-python's ``llama_model_quantize`` (``llama-quantize``) on F32 GGUF exports of the models
named there and kept the type of every tensor, and the blocks of some rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from apr_kernels.convert import recipe
from apr_kernels.convert.names import EXPERT_PROJ, HF_EXPERT, hf_to_gguf
from apr_kernels.model import ModelConfig
from apr_kernels.model.hf_names import expected_shapes
from apr_kernels.quant import quantize

DATA = Path(__file__).parent / "data" / "llama_cpp"
RECIPES = json.loads((DATA / "recipes.json").read_text())
# llama.cpp's type -> the APR format standing for it (recipe.py: never a less precise one): Q5_0 is
# its Q4_K for rows that are not whole 256-value blocks (APR's Q4_K pads them), Q8_0 and Q5_K are not
# APR formats; F32 is a tensor left unquantised
AS_APR = {"Q4_K": "Q4_K", "Q5_0": "Q4_K", "Q6_K": "Q6_K", "Q8_0": "Q6_K", "Q5_K": "Q6_K", "F32": None}


def _gguf_name(hf: str) -> str:
    m = HF_EXPERT.match(hf)  # (GGUF stacks a layer's experts: one tensor, one type, per projection)
    return f"blk.{m.group(1)}.ffn_{EXPERT_PROJ[m.group(3)]}_exps.weight" if m else hf_to_gguf(hf)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_q4km_gives_every_tensor_llama_cpps_choice(name):
    rec = RECIPES[name]
    cfg = ModelConfig(**rec["config"])
    types = rec["types"]
    shapes = expected_shapes(cfg)
    if cfg.tie_word_embeddings:  # (an APR file of a tied model keeps a copy of the embedding as the head)
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
        types = {**types, "output.weight": types["token_embd.weight"]}
    tensors = {n: SimpleNamespace(dtype="F32", shape=s) for n, s in shapes.items()}
    converted = recipe.plan("q4km", tensors, tied=cfg.tie_word_embeddings)  # convert: from the tensor names
    layout = recipe.Layout.of_config(cfg)  # train --qat / eval --quantize: from the model's config
    assert {_gguf_name(n) for n in shapes} == set(types)  # (every tensor llama.cpp saw, and no other)
    for n, shape in shapes.items():
        # (under 1024 values every kind keeps a tensor as it is, spec 14: here only the shared
        # expert's gate [1, hidden], which llama.cpp keeps in F32 too)
        want = AS_APR[types[_gguf_name(n)]] if np.prod(shape) >= 1024 else None
        assert converted.get(n) == want, (name, n, types[_gguf_name(n)])
        assert recipe.apr_format("q4km", n, shape, layout) == want, (name, n)
        # export --quantize q4km: llama.cpp's own type, its fallbacks for short rows included
        assert (recipe.ggml_type("q4km", n, shape, layout) or "F32") == types[_gguf_name(n)] or len(shape) < 2, \
            (name, n)
    assert {"Q4_K", "Q6_K"} <= set(converted.values())  # (a mixture)


def test_the_uniform_kinds_quantise_every_matrix_alike():
    cfg = ModelConfig(**RECIPES["qwen2_moe_4x"]["config"])
    shapes = expected_shapes(cfg)
    tensors = {n: SimpleNamespace(dtype="F32", shape=s) for n, s in shapes.items()}
    for kind, fmt in (("q4k", "Q4_K"), ("q6k", "Q6_K"), ("q8", "APR_Q8"), ("q4", "APR_Q4")):
        plan = recipe.plan(kind, tensors, tied=False)  # aprender's rule: routers too, nothing 1-D
        assert plan == {n: fmt for n, s in shapes.items() if len(s) == 2 and s[0] * s[1] >= 1024}
    with pytest.raises(ValueError, match=r"--quantize 'q5km': expected one of q4k, q6k, q8, q4, q4km"):
        recipe.plan("q5km", tensors, tied=False)


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
def test_k_quantisers_write_llama_cpps_blocks(kind):
    """The same bytes as llama.cpp's ``quantize_row_q4_K_ref`` / ``quantize_row_q6_K_ref`` (the searches
    without an importance matrix), on rows of a weight matrix with a few large weights."""
    data = np.load(DATA / "blocks.npz")
    ours = quantize(kind, torch.from_numpy(data["rows"])).data.numpy()
    theirs = data[kind]
    width = {"Q4_K": 144, "Q6_K": 210}[kind]
    same = (ours.reshape(-1, width) == theirs.reshape(-1, width)).all(axis=1)
    assert same.all(), f"{int((~same).sum())} of {len(same)} blocks differ"


@pytest.mark.parametrize("name", ["qwen2_tied_24", "mixtral_8x"])
def test_convert_q4km_then_export_writes_the_file_llama_quantize_writes(name, tmp_path):
    """``convert --quantize q4km`` then ``export`` to GGUF: labelled as llama-quantize labels its Q4_K_M
    file (``general.file_type``), every tensor as it wrote it from the F32 export of the same model:
    type, shape and bytes (widths of whole 256-value blocks;
    the tied head and corner-case rows included), but where llama.cpp picked a format APR lacks (the
    8-expert model's Q8_0 / Q5_K attention): there the stand-in Q6_K."""
    import llama_cpp_golden as golden
    from apr_kernels.convert.core import convert
    from apr_kernels.convert.gguf_out import export_gguf

    convert(golden.model_file(name, tmp_path), tmp_path / "q.apr", quantize="q4km", progress=False)
    spec = golden.gguf_spec(export_gguf(tmp_path / "q.apr", tmp_path / "q.gguf", progress=False))
    assert {k: v for k, v in spec["keys"].items() if k.startswith("general.")} == RECIPES[name]["general"]
    ours, theirs = spec["tensors"], RECIPES[name]["tensors"]
    assert set(ours) == set(theirs)
    differ = [n for n in theirs if theirs[n][0] in ("Q4_K", "Q6_K", "F32") and ours[n] != theirs[n]]
    assert not differ, sorted(differ)[:8]
    stand_ins = {n: ours[n][0] for n in theirs if theirs[n][0] not in ("Q4_K", "Q6_K", "F32")}
    assert set(stand_ins.values()) <= {"Q6_K"} and bool(stand_ins) == (name == "mixtral_8x")


MIXTURES = json.loads((DATA / "mixtures.json").read_text())
LLAMA_NAMES = {"q4km": "Q4_K_M", "q4ks": "Q4_K_S", "q5km": "Q5_K_M", "q5ks": "Q5_K_S", "q6k": "Q6_K", "q8_0": "Q8_0"}


def _short(tensors: dict) -> dict[str, str]:  # (as llama_cpp_golden.short_spec records them)
    return {n: f"{t} {'x'.join(map(str, shape))} {digest[:16]}" for n, (t, shape, digest) in tensors.items()}


# (every mixture on the 384-wide tied Qwen2: every fallback; on the rest, for time, Q4_K_M and the
# mixtures their special rules touch: the tied 24-layer Qwen2's per-layer rules (Q4_K_M and Q5_K_M's
# more-bits layers, Q4_K_S's first layers), Mixtral's 8-expert attention (Q5_K output for the Q4_K
# mixtures, Q8_0 v/k for all); the 80-layer GQA model's 70B rule (Q5_K for Q4_K's attn_v) by its types
# alone (test_q4km_gives_every_tensor_llama_cpps_choice; Mixtral's Q5_K bytes stand for its blocks)
KINDS_CHECKED = {"qwen2_tied_24": ("q4km", "q4ks", "q5km"), "mixtral_8x": ("q4km", "q4ks", "q8_0"),
                 "llama_gqa_80": (), "llama_untied_16": ("q4km",), "qwen2_moe_4x": ("q4km",)}


@pytest.mark.parametrize("name", sorted(n for n in RECIPES if KINDS_CHECKED.get(n, LLAMA_NAMES)))
def test_export_quantize_writes_the_files_llama_quantize_writes(name, tmp_path):
    """``export model.apr model.gguf --quantize KIND`` from the float model: for llama-quantize's mixtures
    (Q4_K_M, Q4_K_S, Q5_K_M, Q5_K_S, Q6_K, Q8_0; ``KINDS_CHECKED``) every tensor its file holds, type, shape and
    bytes (SHA-256), its Q5_K, Q8_0 and short-row Q5_0 / Q5_1 / Q8_0 included; for Q4_K_M also the
    general.* keys (the file type label) and the types recipe.ggml_type gives."""
    import llama_cpp_golden as golden
    from apr_kernels.convert.gguf_out import export_gguf

    model = golden.model_file(name, tmp_path)
    assert set(LLAMA_NAMES) == set(recipe.GGUF_KINDS)
    for kind, llama in LLAMA_NAMES.items():
        if kind not in KINDS_CHECKED.get(name, LLAMA_NAMES):
            continue
        spec = golden.gguf_spec(export_gguf(model, tmp_path / f"{kind}.gguf", progress=False, quantize=kind))
        assert spec["keys"]["general.file_type"] == recipe.GGUF_KINDS[kind][1]  # (its label)
        if kind == "q4km":
            assert {k: v for k, v in spec["keys"].items() if k.startswith("general.")} == RECIPES[name]["general"]
            ours, theirs = spec["tensors"], RECIPES[name]["tensors"]
        else:
            ours, theirs = _short(spec["tensors"]), MIXTURES[name][llama]
        assert set(ours) == set(theirs), kind
        differ = sorted(n for n in theirs if ours[n] != theirs[n])
        assert not differ, (kind, [(n, ours[n], theirs[n]) for n in differ[:6]])


def test_export_quantize_refuses_what_it_cannot_write(tmp_path, capsys):
    """A file already in blocks (llama-quantize would requantise; the blocks are kept without
    --quantize), a Hugging Face folder as the target, and a --dtype beside it: refused by name."""
    import llama_cpp_golden as golden
    from rank_runs import cli

    model = golden.model_file("llama_untied_16", tmp_path)
    assert cli(["convert", str(model), str(tmp_path / "q4k.apr"), "--quantize", "q4k", "-q"])[0] == 0
    cases = [([str(tmp_path / "q4k.apr"), str(tmp_path / "a.gguf")], "are stored in blocks already (e.g. "),
             ([str(model), str(tmp_path / "hf")], "export --quantize q4km: quantises a GGUF file"),
             ([str(model), str(tmp_path / "b.gguf"), "--dtype", "f16"], "export --quantize q4km with --dtype f16"),
             ([str(model), str(tmp_path / "b.gguf"), "--device", "tpu"], "--device tpu: expected auto, cpu")]
    for argv, message in cases:
        capsys.readouterr()
        assert cli(["export", *argv, "--quantize", "q4km"])[0] != 0, argv
        assert message in capsys.readouterr().err, argv
    assert not any(p.name.startswith(("a.gguf", "b.gguf", "hf")) for p in tmp_path.iterdir())


@pytest.mark.cuda
def test_export_quantize_on_the_gpu_writes_the_hosts_file(tmp_path):
    """export --quantize with its k-quant searches on a CUDA GPU (Q4_K/Q6_K: the Triton kernels; Q5_K:
    torch) writes the file the host writes, byte for byte."""
    import llama_cpp_golden as golden
    from apr_kernels.convert.gguf_out import export_gguf

    model = golden.model_file("mixtral_8x", tmp_path)  # (Q4_K, Q5_K, Q6_K and Q8_0 tensors)
    files = [export_gguf(model, tmp_path / f"{d}.gguf", progress=False, quantize="q4ks", device=d)
             for d in ("cpu", "cuda")]
    assert files[0].read_bytes() == files[1].read_bytes()
