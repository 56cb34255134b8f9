"""Record what llama.cpp itself does with this project's files, as independent references that CI
checks without llama.cpp (tests/test_quant_recipe.py, tests/test_llama_cpp_runs.py read the records).

    python tests/llama_cpp_golden.py --llama-python VENV/bin/python --llama-src LLAMA_CPP [--out DIR]

``VENV`` holds ``llama-cpp-python`` (the llama.cpp build it bundles runs the files: its
``llama_model_quantize`` is ``llama-quantize``) and ``gguf``; ``LLAMA_CPP`` is a llama.cpp source
tree (``convert_hf_to_gguf.py``; the ``vendor/llama.cpp`` folder of the llama-cpp-python sdist is the
same version). The versions are recorded. As made (about 8 minutes of building on 2 cores; a build
for the baseline x86-64, as release builds are, so no fused multiply-add changes llama.cpp's
float32 results)::

    pip download --no-deps llama-cpp-python==0.3.36 -d SDIST && tar xzf SDIST/*.tar.gz -C SDIST
    python -m venv VENV && CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF" \
        VENV/bin/pip install numpy gguf SDIST/llama_cpp_python-0.3.36.tar.gz
    # then --llama-python VENV/bin/python --llama-src SDIST/llama_cpp_python-0.3.36/vendor/llama.cpp

Written to ``DIR`` (default tests/data/llama_cpp):

* ``recipes.json``: for each model of ``MODELS`` (``model_file``: seeded weights, exported to an F32
  GGUF), the GGML type llama.cpp's Q4_K_M recipe gave each tensor, and the tensors of its file
  (``gguf_spec``);
* ``mixtures.json``: for the same models, the tensors (type, shape, SHA-256 prefix) of the files
  llama-quantize writes for its other k-quant mixtures and Q8_0 (``MIXES``; ``--only mixtures``
  records this file alone);
* ``adapters.json``: for four of ``RUNS`` (``ADAPTER_RUNS``), the LoRA adapter GGUF ``export --adapter``
  wrote from a step checkpoint (``adapter_model``) and the logits llama.cpp computed with it on the
  base's export (``--only adapters`` records this file alone);
* ``blocks.npz``: rows of a weight matrix (F32, corner cases first) and llama.cpp's Q4_K and Q6_K
  blocks of them, for a byte-for-byte check of ``quant.quantize``;
* ``runs.json``: for each model of ``RUNS`` (``run_model``: seeded weights and a real tokenizer), the
  file ``apr-kernels export`` wrote and llama.cpp ran (its SHA-256, and ``gguf_spec``: keys, tensor
  types, shapes and digests), the logits llama.cpp computed for a token sequence (its 16 largest at
  each position and the log-sum-exp), and what llama.cpp's ``convert_hf_to_gguf.py`` wrote from
  ``apr-kernels export``'s Hugging Face folder of the same model (``gguf_spec``, which the script
  compares with the export's); per tokenizer, llama.cpp's tokenisation of two texts.

It also prints what the records do not hold: how many of the Q4_K / Q6_K blocks llama.cpp wrote
(Q4_K_M and pure files) ``quant.quantize`` gives byte for byte, the largest logit difference, and
whether this project's import of the converter's file gives the model's logits again.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
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
# LLAMA_FTYPE_MOSTLY_* of llama-quantize's mixtures (its recipe per tensor), and of "pure" files (one
# type for every matrix: the blocks compared with quant.quantize)
MIXES = {"Q4_K_M": 15, "Q4_K_S": 14, "Q5_K_M": 17, "Q5_K_S": 16, "Q6_K": 18, "Q8_0": 7}
PURE = {"Q4_K": 15, "Q6_K": 18}
BLOCK_TENSOR, BLOCK_ROWS = "blk.3.ffn_down.weight", 16  # of qwen2_tied_24: the rows kept in blocks.npz

# models llama.cpp runs: name -> (preset, overrides, tokenizer); weights from seed 0, scaled (``run_model``)
RUNS = {
    "qwen2_yarn": ("tiny_qwen2", dict(max_position_embeddings=131072, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}), "qwen2"),
    "qwen2_moe": ("tiny_qwen2_moe", dict(mlp_only_layers=()), "qwen2"),
    "qwen3_moe": ("tiny_qwen3_moe", {}, "qwen2"),
    "llama_untied": ("tiny_llama", dict(tie_word_embeddings=False), "mistral"),
    "llama3_rope": ("tiny_llama", dict(max_position_embeddings=131072, rope_theta=5e5, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}), "mistral"),
    "llama_rope0_linear": ("tiny_llama", dict(rope_type=0, rope_scaling={"rope_type": "linear", "factor": 2.0}),
                           "mistral"),
    "mixtral": ("tiny_mixtral", {}, "mistral"),
}
RUN_TOKENS, TOP = 40, 16  # tokens of the logits sequence; logits kept per position


@functools.lru_cache(maxsize=None)
def run_tokenizer(kind: str):
    """The real tokenizers the runs use: Qwen2.5's (byte-level BPE), Mistral 7B's (SentencePiece)."""
    from apr_kernels.tokenizer import Tokenizer

    if kind == "qwen2":
        return Tokenizer.qwen2()
    from apr_kernels.spm_model import read_spm_model

    return Tokenizer.from_metadata(read_spm_model(mistral_model()))


def mistral_model() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("mistral_common").origin).parent / "data" / "tokenizer.model.v1"


def run_model(name: str, folder: Path) -> tuple[Path, object]:
    """``(APR file, tokenizer)`` of run ``name``: the preset with the tokenizer's vocabulary, weights from
    seed 0 scaled up (so attention is far from uniform and the logits spread over several units)."""
    from apr_kernels.model import preset
    from apr_kernels.train.checkpoint import save_checkpoint

    base, overrides, kind = RUNS[name]
    tok = run_tokenizer(kind)
    cfg = preset(base).replace(vocab_size={"qwen2": 151680, "mistral": 32000}[kind], **overrides)
    path = folder / f"{name}.apr"
    save_checkpoint(path, model=scaled_model(cfg), tokenizer=tok)
    return path, tok


def scaled_model(cfg):
    """A model of ``cfg`` with weights from seed 0, its matrices scaled up (embedding x20, the rest x8)."""
    import torch

    from apr_kernels.model import Transformer

    torch.manual_seed(0)
    model = Transformer(cfg, fast=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(20.0 if "embed" in n else 8.0)
    return model


def run_ids(tok) -> list[int]:
    return tok.encode(RUN_TEXTS[0], special=False)[:RUN_TOKENS]


# texts tokenised by llama.cpp (recorded verbatim: real Python source, then mixed scripts and spacing)
RUN_TEXTS = None  # filled from runs.json by the test, or by main() from the standard library


def _stdlib_texts() -> list[str]:
    import sysconfig

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    text = "".join(f.read_text(encoding="utf-8", errors="replace") for f in files[7:9])[:3000]
    return [text, "Hello world! 12345 \u00e9\u00e8\u00fc \u4e2d\u6587 \U0001f642  spaces\n\ttabs  x"]


def _key(field) -> object:
    """A key's value as recorded: numbers and short strings as they are, arrays and long strings as
    the SHA-256 of their bytes in the file."""
    import gguf
    import numpy as np

    value = None if field.types[0] == gguf.GGUFValueType.ARRAY else field.contents()
    if isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 64):
        return value
    return "sha256:" + hashlib.sha256(b"".join(np.asarray(p).tobytes() for p in field.parts)).hexdigest()


_GENERAL_KEPT = ("general.architecture", "general.file_type", "general.quantization_version")


def gguf_spec(path: Path) -> dict:
    """What a GGUF file holds, compactly: every key but ``general.*`` (names, authorship; but the
    architecture and the file and quantisation versions) and each tensor's type, shape and the SHA-256
    of its bytes."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(str(path))
    keys = {k: _key(f) for k, f in r.fields.items()
            if not k.startswith(("GGUF.", "general.")) or k in _GENERAL_KEPT}
    tensors = {t.name: [t.tensor_type.name, [int(d) for d in t.shape],
                        hashlib.sha256(np.ascontiguousarray(t.data).tobytes()).hexdigest()] for t in r.tensors}
    return {"keys": keys, "tensors": tensors}


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def our_logits(apr: Path, ids: list[int]):
    import torch

    from apr_kernels.model.loading import from_apr

    with torch.no_grad():
        return from_apr(apr, fast=False)(torch.tensor([ids]))[0].float().numpy()


def _record_runs(args, tmp: Path) -> dict:
    """runs.json (module docstring)."""
    import numpy as np

    from apr_kernels.convert.export import export
    from apr_kernels.convert.gguf_out import export_gguf
    from apr_kernels.convert.core import convert

    global RUN_TEXTS
    RUN_TEXTS = _stdlib_texts()
    record = {"texts": RUN_TEXTS, "tokens": {}, "models": {}}
    for name in RUNS:
        apr, tok = run_model(name, tmp)
        gguf_path = export_gguf(apr, tmp / f"{name}.gguf", progress=False)
        ids = run_ids(tok)
        req = tmp / f"{name}.request.json"
        req.write_text(json.dumps({"gguf": str(gguf_path), "ids": ids, "texts": RUN_TEXTS,
                                   "out": str(tmp / f"{name}.logits.npy")}))
        ran = _in_llama_env(args.llama_python, "--run", str(req))
        theirs = np.load(tmp / f"{name}.logits.npy")
        ours = our_logits(apr, ids)
        top = np.argsort(-theirs, axis=1, kind="stable")[:, :TOP]
        lse = np.log(np.exp(theirs - theirs.max(1, keepdims=True)).sum(1)) + theirs.max(1)
        kind = RUNS[name][2]
        tokens = record["tokens"].setdefault(kind, ran["tokens"])
        assert tokens == ran["tokens"], name
        # llama.cpp's converter on our Hugging Face export (SentencePiece models: with the
        # tokenizer.model the export writes, which the converter reads)
        hf = tmp / f"{name}.hf"
        export(apr, hf, progress=False)
        assert (hf / "tokenizer.model").exists() == (kind == "mistral")
        converted = tmp / f"{name}.converted.gguf"
        subprocess.run([sys.executable, str(Path(args.llama_src) / "convert_hf_to_gguf.py"), str(hf),
                        "--outfile", str(converted), "--outtype", "f32"], check=True, capture_output=True)
        back = tmp / f"{name}.back.apr"
        convert(converted, back, progress=False)
        reimport = float(np.abs(our_logits(back, ids) - ours).max() / np.abs(ours).max())
        record["models"][name] = {
            "llama_cpp": ran["version"], "ids": ids, "export": gguf_spec(gguf_path),
            "converter": gguf_spec(converted), "export_sha256": file_sha256(gguf_path),
            "logits": {"top": top.tolist(), "values": np.take_along_axis(theirs, top, 1).tolist(),
                       "logsumexp": lse.tolist()}}
        spec_ours, spec_conv = record["models"][name]["export"], record["models"][name]["converter"]
        differ = sorted(k for k in set(spec_ours["keys"]) | set(spec_conv["keys"])
                        if spec_ours["keys"].get(k) != spec_conv["keys"].get(k))
        differ += sorted(t for t in set(spec_ours["tensors"]) | set(spec_conv["tensors"])
                         if spec_ours["tensors"].get(t) != spec_conv["tensors"].get(t))
        print(f"{name}: llama.cpp's logits within {np.abs(ours - theirs).max() / np.abs(ours).max():.1e} "
              f"(relative to the largest), tokenisations equal: "
              f"{[tok.encode(t, special=False) == x for t, x in zip(RUN_TEXTS, ran['tokens'])]}; converter's file "
              f"vs export: {differ or 'equal'}; import of the converter's file: logits within {reimport:.1e}")
    return record


def _in_llama_env(python: str, *argv: str) -> dict:
    out = subprocess.run([python, __file__, *argv], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ run in the llama.cpp environment
def quantize_with_llama_cpp(src: str, dst: str, kind: str) -> dict:
    """llama.cpp quantises GGUF ``src`` to ``dst`` (``kind``: a mixture of ``MIXES``, or ``pure:TYPE``);
    returns {version, types: {tensor: GGML type name}}."""
    import ctypes

    import gguf
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    pure = kind.startswith("pure:")
    params.nthread, params.ftype, params.pure = 2, PURE[kind[5:]] if pure else MIXES[kind], pure
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize {src} -> {dst} ({kind}) failed")
    reader = gguf.GGUFReader(dst)
    return {"version": f"llama-cpp-python {llama_cpp.__version__}",
            "types": {t.name: t.tensor_type.name for t in reader.tensors}}


def run_with_llama_cpp(request: str) -> dict:
    """llama.cpp loads ``request["gguf"]``, computes the logits of ``request["ids"]`` (float32 K/V cache)
    and tokenises ``request["texts"]``; the logits go to ``request["out"]`` (.npy)."""
    import llama_cpp
    import numpy as np

    req = json.loads(Path(request).read_text())
    llm = llama_cpp.Llama(model_path=req["gguf"], n_ctx=256, n_batch=256, logits_all=True, n_threads=2,
                          verbose=False, type_k=0, type_v=0,  # (GGML_TYPE_F32: the default f16 cache rounds)
                          **({"lora_path": req["lora"]} if req.get("lora") else {}))
    llm.eval(req["ids"])
    np.save(req["out"], np.array(llm.scores[: len(req["ids"])], dtype=np.float32))
    return {"version": f"llama-cpp-python {llama_cpp.__version__}",
            "tokens": [llm.tokenize(t.encode(), add_bos=False, special=False) for t in req["texts"]]}


# ---------------------------------------------------------------------------- run in this project
def model_file(name: str, folder: Path) -> Path:
    """The APR file of ``MODELS[name]``: weights from its seed (its place in ``MODELS``), a few of them
    large, corner-case rows in one matrix of the first."""
    import torch

    from apr_kernels.model import ModelConfig, Transformer
    from apr_kernels.train.checkpoint import save_checkpoint

    torch.manual_seed(list(MODELS).index(name))
    model = Transformer(ModelConfig(**{**COMMON, **MODELS[name]}), fast=False)
    with torch.no_grad():  # (a few large weights, as trained models have: the block searches must place them)
        for p in model.parameters():
            p.mul_(1 + 4 * (torch.rand_like(p) < 0.01))
        if name == "qwen2_tied_24":
            _edge_rows(model.get_parameter(f"model.layers.{BLOCK_TENSOR.split('.')[1]}.mlp.down_proj.weight"))
    save_checkpoint(folder / f"{name}.apr", model=model)
    return folder / f"{name}.apr"


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
    return _in_llama_env(python, "--quantize", str(src), str(dst), kind)


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


def short_spec(path: Path) -> dict[str, str]:
    """tensor -> "TYPE SHAPE SHA-256[:16]" of a GGUF file: ``mixtures.json``'s compact record."""
    return {n: f"{t} {'x'.join(map(str, shape))} {digest[:16]}" for n, (t, shape, digest) in gguf_spec(path)["tensors"].items()}


def _record_mixtures(args, out: Path) -> None:
    """mixtures.json: for each model of ``MODELS`` and each llama-quantize mixture of ``MIXES`` but
    Q4_K_M (recipes.json's), the tensors of the file it writes from the F32 export (``short_spec``)."""
    from apr_kernels.convert.gguf_out import export_gguf

    record = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in MODELS:
            f32 = export_gguf(model_file(name, tmp), tmp / f"{name}.f32.gguf", dtype="f32", progress=False)
            record[name] = {}
            for kind in MIXES:
                if kind == "Q4_K_M":
                    continue
                got = _llama(args.llama_python, f32, tmp / f"{name}.{kind}.gguf", kind)
                record[name][kind] = short_spec(tmp / f"{name}.{kind}.gguf")
                record["llama_cpp"] = got["version"]
                print(f"{name} {kind}: " + ", ".join(f"{n} {t}" for t, n in sorted(
                    __import__("collections").Counter(got["types"].values()).items())))
    (out / "mixtures.json").write_text(json.dumps(record, indent=0, sort_keys=True) + "\n")


# (Qwen2: rows as stored; Llama: q/k rows permuted for llama.cpp; the MoE models: the experts' adapters
# stacked per layer and projection, Qwen2-MoE's shared expert's not)
ADAPTER_RUNS = ("qwen2_yarn", "llama_untied", "qwen2_moe", "mixtral")
ADAPTER_LORA = {"rank": 4, "alpha": 8.0, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"], "seed": 1}


def adapter_model(name: str, folder: Path) -> tuple[Path, Path, object]:
    """``(step checkpoint with LoRA adapters, its base APR file, tokenizer)`` for run ``name``: the base of
    ``run_model``, adapters from ``ADAPTER_LORA`` with B drawn from a seeded generator (so they move the
    logits)."""
    import torch

    from apr_kernels.model.lora import lora_modules
    from apr_kernels.model.loading import from_apr
    from apr_kernels.train.checkpoint import save_checkpoint

    base, tok = run_model(name, folder)
    model = from_apr(base, fast=False, lora_init=ADAPTER_LORA)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.5)
    step = folder / f"{name}.lora.apr"
    save_checkpoint(step, model=model, tokenizer=tok)
    return step, base, tok


def _record_adapters(args, out: Path) -> None:
    """adapters.json: for each model of ``ADAPTER_RUNS``, the adapter GGUF ``export --adapter`` wrote
    (its SHA-256) and the logits llama.cpp computed with it on the base's GGUF export (``runs.json``'s
    file for that model)."""
    import numpy as np

    from apr_kernels.convert.gguf_out import export_adapter_gguf, export_gguf

    global RUN_TEXTS
    RUN_TEXTS = _stdlib_texts()
    record = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in ADAPTER_RUNS:
            step, base, tok = adapter_model(name, tmp)
            base_gguf = export_gguf(base, tmp / f"{name}.gguf", progress=False)
            adapter = export_adapter_gguf(step, tmp / f"{name}.lora.gguf")
            ids = run_ids(tok)
            req = tmp / f"{name}.request.json"
            req.write_text(json.dumps({"gguf": str(base_gguf), "lora": str(adapter), "ids": ids, "texts": [],
                                       "out": str(tmp / f"{name}.logits.npy")}))
            ran = _in_llama_env(args.llama_python, "--run", str(req))
            theirs = np.load(tmp / f"{name}.logits.npy")
            ours, plain = our_logits(step, ids), our_logits(base, ids)
            top = np.argsort(-theirs, axis=1, kind="stable")[:, :TOP]
            lse = np.log(np.exp(theirs - theirs.max(1, keepdims=True)).sum(1)) + theirs.max(1)
            record[name] = {"llama_cpp": ran["version"], "ids": ids, "adapter_sha256": file_sha256(adapter),
                            "base_sha256": file_sha256(base_gguf),
                            "logits": {"top": top.tolist(), "values": np.take_along_axis(theirs, top, 1).tolist(),
                                       "logsumexp": lse.tolist()}}
            scale = np.abs(ours).max()
            print(f"{name}: llama.cpp with the adapter within {np.abs(ours - theirs).max() / scale:.1e} of our LoRA "
                  f"model's logits (the adapter moves them by {np.abs(ours - plain).max() / scale:.1e})")
    (out / "adapters.json").write_text(json.dumps(record, indent=0, sort_keys=True) + "\n")


def _check_quantised_logits(args) -> None:
    """Print how well ``eval --quantize gguf:KIND`` predicts llama.cpp running ``export --quantize KIND``'s
    file: for Qwen2-shaped models with the Qwen2.5 tokenizer (widths 256 and 384: whole k-quant blocks,
    and the Q5_0/Q5_1 fallbacks), the shift quantisation gives llama.cpp's logits against its F32 run,
    and ours (``qat.quantize_as_converted``) against ours; llama.cpp also rounds the activations of its
    quantised products to 8 bits, which ours leave, so the two agree closely, not exactly."""
    import numpy as np
    import torch

    from apr_kernels.convert.gguf_out import export_gguf
    from apr_kernels.model import preset
    from apr_kernels.model.loading import from_apr
    from apr_kernels.train.checkpoint import save_checkpoint
    from apr_kernels.train.qat import quantize_as_converted

    global RUN_TEXTS
    RUN_TEXTS = _stdlib_texts()
    tok = run_tokenizer("qwen2")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for width in (256, 384):
            cfg = preset("tiny_qwen2").replace(vocab_size=151680, hidden_size=width, intermediate_size=2 * width,
                                               head_dim=64, num_heads=width // 64, num_kv_heads=2, num_layers=4)
            apr = tmp / f"w{width}.apr"
            save_checkpoint(apr, model=scaled_model(cfg), tokenizer=tok)
            ids = run_ids(tok)
            llama, ours = {}, {}
            for kind in ("f32", "q4km", "q5km", "q8_0"):
                options = {"dtype": "f32"} if kind == "f32" else {"quantize": kind}
                g = export_gguf(apr, tmp / f"{width}.{kind}.gguf", progress=False, **options)
                req = tmp / "req.json"
                req.write_text(json.dumps({"gguf": str(g), "ids": ids, "texts": [], "out": str(tmp / "l.npy")}))
                _in_llama_env(args.llama_python, "--run", str(req))
                llama[kind] = np.load(tmp / "l.npy")
                with torch.no_grad():
                    m = from_apr(apr, fast=False)
                    if kind != "f32":
                        quantize_as_converted(m, f"gguf:{kind}", apr)
                    ours[kind] = m(torch.tensor([ids]))[0].float().numpy()
            print(f"width {width}: F32 logits within {np.abs(llama['f32'] - ours['f32']).max() / np.abs(ours['f32']).max():.1e}")
            for kind in ("q4km", "q5km", "q8_0"):
                dl, do = llama[kind] - llama["f32"], ours[kind] - ours["f32"]
                print(f"  {kind}: quantisation moves llama.cpp's logits by {np.abs(dl).mean():.3f} (mean), ours by "
                      f"{np.abs(do).mean():.3f}; correlation {np.corrcoef(dl.ravel(), do.ravel())[0, 1]:.4f}; "
                      f"the rest {np.abs(dl - do).mean() / np.abs(dl).mean():.3f} of llama.cpp's shift")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-python", required=True, help="a Python with llama-cpp-python and gguf")
    ap.add_argument("--llama-src", required=True, help="a llama.cpp source tree (convert_hf_to_gguf.py)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "data" / "llama_cpp"))
    ap.add_argument("--only", choices=["mixtures", "adapters", "quantised-logits"], default=None,
                    help="record mixtures.json alone (the other records stay as they are), or print how "
                         "eval --quantize gguf:KIND predicts llama.cpp's logits (no record)")
    args = ap.parse_args()
    import gguf
    import numpy as np

    from apr_kernels.convert.gguf_out import export_gguf

    if args.only == "quantised-logits":
        _check_quantised_logits(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "adapters"):
        _record_adapters(args, out)
    if args.only in (None, "mixtures"):
        _record_mixtures(args, out)
    if args.only is not None:
        return
    recipes = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, fields in MODELS.items():
            f32 = export_gguf(model_file(name, tmp), tmp / f"{name}.f32.gguf", dtype="f32", progress=False)
            got = _llama(args.llama_python, f32, tmp / f"{name}.q4_k_m.gguf", "Q4_K_M")
            spec = gguf_spec(tmp / f"{name}.q4_k_m.gguf")
            recipes[name] = {"config": {**COMMON, **fields}, "llama_cpp": got["version"], "types": got["types"],
                             "tensors": spec["tensors"], "general": {k: v for k, v in spec["keys"].items()
                                                                     if k.startswith("general.")}}
            counts = [_compare_blocks(f32, tmp / f"{name}.q4_k_m.gguf", kind) for kind in ("Q4_K", "Q6_K")]
            print(f"{name}: {len(got['types'])} tensors; Q4_K_M's Q4_K and Q6_K blocks byte-identical: "
                  + ", ".join(f"{same} of {total}" for same, total in counts))
        f32 = tmp / "qwen2_tied_24.f32.gguf"
        blocks = {"rows": None}
        for kind in ("Q4_K", "Q6_K"):
            q = tmp / f"pure.{kind}.gguf"
            _llama(args.llama_python, f32, q, f"pure:{kind}")
            same, total = _compare_blocks(f32, q, kind)
            print(f"{kind}: {same} of {total} blocks byte-identical to llama.cpp's")
            t = {t.name: t for t in gguf.GGUFReader(q).tensors}[BLOCK_TENSOR]
            cols = int(t.shape[0])
            blocks[kind] = np.asarray(t.data).reshape(-1)[: BLOCK_ROWS * (cols // 256) * {"Q4_K": 144, "Q6_K": 210}[kind]]
            rows = {t.name: t for t in gguf.GGUFReader(f32).tensors}[BLOCK_TENSOR]
            blocks["rows"] = np.array(rows.data, dtype=np.float32).reshape(-1, cols)[:BLOCK_ROWS]
        runs = _record_runs(args, tmp)
    (out / "recipes.json").write_text(json.dumps(recipes, indent=1, sort_keys=True) + "\n")
    np.savez_compressed(out / "blocks.npz", **blocks)
    (out / "runs.json").write_text(json.dumps(runs, indent=0, sort_keys=True) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--quantize":
        print(json.dumps(quantize_with_llama_cpp(*sys.argv[2:])))
    elif len(sys.argv) == 3 and sys.argv[1] == "--run":
        print(json.dumps(run_with_llama_cpp(sys.argv[2])))
    else:
        main()
