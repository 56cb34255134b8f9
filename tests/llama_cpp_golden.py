"""Record what llama.cpp's own quantiser does, as the independent reference for ``convert --quantize``
(tests/test_quant_recipe.py reads the records; CI needs no llama.cpp).

    python tests/llama_cpp_golden.py --llama-python VENV/bin/python [--out tests/data/llama_cpp]

``VENV`` holds ``llama-cpp-python`` (its ``llama_model_quantize`` is llama.cpp's ``llama-quantize``;
the version used is recorded) and ``gguf``. For each model below the script writes an APR file of
random weights, exports it to an F32 GGUF (``apr-kernels export``), quantises that with llama.cpp and
records:

* ``recipes.json``: per model, its config and the GGML type llama.cpp's Q4_K_M recipe gave each tensor;
* ``blocks.npz``: rows of a weight matrix (F32) and llama.cpp's Q4_K and Q6_K blocks of them
  (``pure``: every tensor one type), for a byte-for-byte check of ``quant.quantize``.

It also compares every Q4_K / Q6_K tensor llama.cpp wrote (the Q4_K_M files and the pure ones) with
``quant.quantize`` and prints how many blocks agree byte for byte.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# name -> ModelConfig fields; the 2-D tensors hold >= 1024 values (below that APR keeps floats, while
# llama.cpp quantises every matrix) but a shared expert's gate; widths 256 except "qwen2_w384" (rows
# that are not whole 256-value blocks)
MODELS = {
    "qwen2_tied_24": dict(architecture="qwen2", hidden_size=256, num_layers=24, num_heads=4, num_kv_heads=2,
                          head_dim=64, intermediate_size=512, vocab_size=512, attention_bias=True,
                          tie_word_embeddings=True),
    "llama_untied_16": dict(architecture="llama", hidden_size=256, num_layers=16, num_heads=8, num_kv_heads=2,
                            head_dim=32, intermediate_size=512, vocab_size=512, tie_word_embeddings=False),
    "qwen2_w384": dict(architecture="qwen2", hidden_size=384, num_layers=12, num_heads=6, num_kv_heads=2,
                       head_dim=64, intermediate_size=768, vocab_size=512, attention_bias=True,
                       tie_word_embeddings=True),
    "mixtral_8x": dict(architecture="mixtral", hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=2,
                       head_dim=32, intermediate_size=256, vocab_size=512, num_experts=8, num_experts_per_tok=2,
                       moe_intermediate_size=256, tie_word_embeddings=False),
    "qwen2_moe_4x": dict(architecture="qwen2_moe", hidden_size=256, num_layers=8, num_heads=4, num_kv_heads=2,
                         head_dim=64, intermediate_size=512, vocab_size=512, num_experts=4, num_experts_per_tok=2,
                         moe_intermediate_size=256, shared_expert_intermediate_size=512, attention_bias=True,
                         tie_word_embeddings=False),
    "llama_gqa_80": dict(architecture="llama", hidden_size=256, num_layers=80, num_heads=4, num_kv_heads=2,
                         head_dim=64, intermediate_size=256, vocab_size=512, tie_word_embeddings=False),
}
COMMON = dict(max_position_embeddings=512, rope_theta=1e4, rms_norm_eps=1e-6)
FTYPE = {"Q4_K_M": 15, "Q4_K": 15, "Q6_K": 18}  # LLAMA_FTYPE_MOSTLY_*; Q4_K / Q6_K run with pure=True
BLOCK_TENSOR, BLOCK_ROWS = "blk.3.ffn_down.weight", 16  # of qwen2_tied_24: the rows kept in blocks.npz


# ------------------------------------------------------------------ run in the llama.cpp environment
def quantize_with_llama_cpp(src: str, dst: str, kind: str) -> dict:
    """llama.cpp quantises GGUF ``src`` to ``dst``; returns {version, types: {tensor: GGML type name}}."""
    import ctypes

    import gguf
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread, params.ftype, params.pure = 2, FTYPE[kind], kind != "Q4_K_M"
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize {src} -> {dst} ({kind}) failed")
    reader = gguf.GGUFReader(dst)
    return {"version": f"llama-cpp-python {llama_cpp.__version__}",
            "types": {t.name: t.tensor_type.name for t in reader.tensors}}


# ---------------------------------------------------------------------------- run in this project
def _export(name: str, fields: dict, folder: Path, seed: int) -> Path:
    import torch

    from apr_kernels.convert.gguf_out import export_gguf
    from apr_kernels.model import ModelConfig, Transformer
    from apr_kernels.train.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**COMMON, **fields}), fast=False)
    with torch.no_grad():  # (a few large weights, as trained models have: the block searches must place them)
        for p in model.parameters():
            p.mul_(1 + 4 * (torch.rand_like(p) < 0.01))
        if name == "qwen2_tied_24":
            _edge_rows(model.get_parameter(f"model.layers.{BLOCK_TENSOR.split('.')[1]}.mlp.down_proj.weight"))
    save_checkpoint(folder / f"{name}.apr", model=model)
    return export_gguf(folder / f"{name}.apr", folder / f"{name}.f32.gguf", dtype="f32", progress=False)


def _edge_rows(w) -> None:
    """The first rows of ``w``: the blocks a quantiser's corner cases meet."""
    import torch

    cols = w.shape[1]
    w[0] = 0.0  # all zero
    w[1] = 0.25  # constant
    w[2] = -(w[2].abs() + 0.05)  # all negative
    w[3] = w[3] * 1e-18  # below llama.cpp's GROUP_MAX_EPS once squared
    w[4, 7] = 100.0  # one outlier
    w[5] = torch.linspace(-1.0, 1.0, cols)  # a ramp
    w[6] = w[6].abs()  # all positive
    w[7, :32] = 0.0  # a zero sub-block
    w[7, 256:272] = 0.0  # and a zero 16-value group
    w[8] = torch.where(torch.arange(cols) % 2 == 0, 1e-3, -1e-3)  # two values


def _llama(python: str, src: Path, dst: Path, kind: str) -> dict:
    out = subprocess.run([python, __file__, "--quantize", str(src), str(dst), kind], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _compare_blocks(f32: Path, quantised: Path, kind: str) -> tuple[int, int]:
    """(blocks equal byte for byte, blocks) of ``quant.quantize(kind)`` against llama.cpp's file."""
    import gguf
    import numpy as np
    import torch

    from apr_kernels.quant import quantize

    width = {"Q4_K": 144, "Q6_K": 210}[kind]
    src = {t.name: t for t in gguf.GGUFReader(f32).tensors}
    same = total = 0
    for t in gguf.GGUFReader(quantised).tensors:
        if t.tensor_type.name != kind:
            continue
        w = torch.from_numpy(np.array(src[t.name].data, dtype=np.float32)).reshape(-1, int(t.shape[0]))
        ours = quantize(kind, w).data.numpy().reshape(-1, width)
        theirs = np.asarray(t.data).reshape(-1, width)
        same += int((ours == theirs).all(axis=1).sum())
        total += len(theirs)
    return same, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-python", required=True, help="a Python with llama-cpp-python and gguf")
    ap.add_argument("--out", default=str(Path(__file__).parent / "data" / "llama_cpp"))
    args = ap.parse_args()
    import gguf
    import numpy as np

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipes = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for seed, (name, fields) in enumerate(MODELS.items()):
            f32 = _export(name, fields, tmp, seed)
            got = _llama(args.llama_python, f32, tmp / f"{name}.q4_k_m.gguf", "Q4_K_M")
            recipes[name] = {"config": {**COMMON, **fields}, "llama_cpp": got["version"], "types": got["types"]}
            counts = [_compare_blocks(f32, tmp / f"{name}.q4_k_m.gguf", kind) for kind in ("Q4_K", "Q6_K")]
            print(f"{name}: {len(got['types'])} tensors; Q4_K_M's Q4_K and Q6_K blocks byte-identical: "
                  + ", ".join(f"{same} of {total}" for same, total in counts))
        f32 = tmp / "qwen2_tied_24.f32.gguf"
        blocks = {"rows": None}
        for kind in ("Q4_K", "Q6_K"):
            q = tmp / f"pure.{kind}.gguf"
            _llama(args.llama_python, f32, q, kind)
            same, total = _compare_blocks(f32, q, kind)
            print(f"{kind}: {same} of {total} blocks byte-identical to llama.cpp's")
            t = {t.name: t for t in gguf.GGUFReader(q).tensors}[BLOCK_TENSOR]
            cols = int(t.shape[0])
            blocks[kind] = np.asarray(t.data).reshape(-1)[: BLOCK_ROWS * (cols // 256) * {"Q4_K": 144, "Q6_K": 210}[kind]]
            rows = {t.name: t for t in gguf.GGUFReader(f32).tensors}[BLOCK_TENSOR]
            blocks["rows"] = np.array(rows.data, dtype=np.float32).reshape(-1, cols)[:BLOCK_ROWS]
    (out / "recipes.json").write_text(json.dumps(recipes, indent=1, sort_keys=True) + "\n")
    np.savez_compressed(out / "blocks.npz", **blocks)


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--quantize":
        print(json.dumps(quantize_with_llama_cpp(*sys.argv[2:])))
    else:
        main()
