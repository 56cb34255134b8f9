"""APR -> GGUF (llama.cpp, Ollama, LM Studio): ``apr-kernels export SRC.apr DST.gguf``.

Written as llama.cpp's ``convert_hf_to_gguf.py`` writes the same model, so its runtime reads it:

* Architecture: ``llama`` (Mistral too, as llama.cpp converts it), ``qwen2``, ``qwen3``; the model keys
  under ``{arch}.``; RoPE scaling as ``rope.scaling.*`` keys (linear, yarn) or, for Llama 3.1's
  ``llama3`` scaling, the per-pair ``rope_freqs`` divisors llama.cpp computes.
* Tensors: GGUF names (``names.hf_to_gguf``); Llama-family q/k rows permuted to llama.cpp's
  adjacent-pair order (``names.permute_rows``; whole rows move, so raw blocks stay exact); a tied
  output head is not written. Q4_K / Q6_K are copied as raw blocks (the GGML layout, byte for byte)
  unless ``dtype`` asks for floats; other block formats are dequantised; 1-D tensors are F32 (as
  llama.cpp writes norms). LoRA adapters are merged.
* Tokenizer: ``tokenizer.ggml.*`` from the embedded one: byte-level BPE as ``gpt2`` (tokens, types,
  merges, pre-tokenizer name), SentencePiece as ``llama`` (pieces, scores, types); the token list is
  padded to the model's vocabulary with ``[PAD{i}]`` entries, as llama.cpp requires.

``--quantize q4km`` (or ``q4ks``, ``q5km``, ``q5ks``, ``q6k``, ``q8_0``): a float model quantised as
``llama-quantize`` writes its Q4_K_M (Q4_K_S, ...) file from the F32 export, type for type
(``recipe.ggml_type``) and byte for byte: Q4_K/Q6_K/Q5_K from ``quant.py``'s llama.cpp-exact searches,
Q5_0/Q5_1/Q8_0 from the ``gguf`` package's quantisers, tensors it keeps float in F32 with ggml's
dimensions (a ``[1, n]`` gate as ``[n]``), and its ``general.file_type`` label.

Mixture-of-experts models as llama.cpp writes them: ``qwen2moe``, ``qwen3moe``, Mixtral as ``llama``
with ``expert_count``, ``expert_used_count``, ``expert_feed_forward_length`` (Mixtral:
``feed_forward_length``) and Qwen2-MoE's ``expert_shared_feed_forward_length``; each layer's experts
stacked into one ``[experts, out, in]`` tensor per projection (``ffn_gate_exps``, ...: raw Q4_K/Q6_K
blocks concatenated when every expert has them, else floats), the router as ``ffn_gate_inp``, the
shared expert as ``*_shexp`` and its gate as ``ffn_gate_inp_shexp`` [1, hidden]. Routing llama.cpp
does not run the same way (Qwen3-MoE without renormalisation, Qwen2-MoE with it) is written and warned
about; dense layers among expert layers are refused (llama.cpp would not load the file).

The file is streamed (one tensor in memory at a time) into a temporary file next to the target and
renamed over it when complete.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
from pathlib import Path
from warnings import warn

import numpy as np
import torch

from apr_kernels.metadata import tokenizer_carried

from .export import lora_settings, merged_tensor, model_tensor_names
from .names import PERMUTED_ARCHS, hf_to_gguf, permute_rows, rope_permuted_heads, unpermute_rows
from .recipe import FLOAT_DTYPES, GGUF_KINDS, Layout, ggml_type

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen2_moe": "qwen2moe",
             "qwen3_moe": "qwen3moe", "mixtral": "llama"}
_PRE = {"gpt2": "gpt-2", "qwen2": "qwen2", "llama-bpe": "llama-bpe"}  # our pre_type -> tokenizer.ggml.pre
# matrices llama.cpp's converter always writes in F32 (routers, Qwen2-MoE's shared-expert gate)
_F32_MATRICES = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")
_FLOATS = {"keep": None, "f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def export_gguf(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "keep",
                progress: bool | None = None, quantize: str | None = None, device: str | None = "auto") -> Path:
    """Write the APR model ``src`` as the GGUF file ``dst`` (module docstring). ``quantize="q4km"``:
    quantise the float weights as ``llama-quantize ... Q4_K_M`` does (or another of ``recipe.GGUF_KINDS``),
    into its types (``recipe.ggml_type``: Q4_K, Q5_K, Q6_K, Q8_0 and its fallbacks Q5_0, Q5_1, F16 for
    short rows), the same bytes; ``device``: where the k-quant searches run (``core.quantize_device``)."""
    import gguf

    import apr_kernels
    from apr_kernels.model.loading import plan

    src, dst = Path(src), Path(dst)
    if dtype not in _FLOATS:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(_FLOATS)}")
    if quantize is not None:
        if quantize not in GGUF_KINDS:
            raise ValueError(f"export --quantize {quantize!r}: expected one of {', '.join(GGUF_KINDS)} "
                             f"(llama-quantize's Q4_K_M, Q4_K_S, Q5_K_M, Q5_K_S, Q6_K, Q8_0)")
        if dtype != "keep":
            raise ValueError(f"export --quantize {quantize} with --dtype {dtype}: the quantised file's float tensors "
                             f"are F32 as llama-quantize writes them; expected one of the two")
        from .core import quantize_device

        device = quantize_device(device)
    _check_new_file(dst)
    cfg = plan(src).config  # every preflight check; tying decided as from_apr decides it
    if cfg.num_labels:
        raise ValueError(f"{src}: a sequence classifier (num_labels={cfg.num_labels}: a reward model's score head, "
                         f"no output head); GGUF export writes causal LMs for llama.cpp: expected a causal LM")
    dense = [i for i in range(cfg.num_layers) if cfg.is_moe and not cfg.moe_layer(i)]
    if dense:  # (llama.cpp 0.3.36 refuses it: "tensor 'blk.1.ffn_gate_inp.weight' not found")
        raise ValueError(f"{src}: layers {dense} are dense (mlp_only_layers / decoder_sparse_step), but llama.cpp's "
                         f"{GGUF_ARCH[cfg.architecture]} loads a model only when every layer routes to experts: "
                         f"expected every layer sparse")
    with apr_kernels.open(src) as f:
        meta = f.metadata
        arch = GGUF_ARCH[cfg.architecture]
        names = model_tensor_names(f, src)
        if cfg.tie_word_embeddings:
            names.pop("lm_head.weight", None)
        lora = meta.get("lora")
        if quantize is not None:
            _check_float_source(f, src, names, quantize)
        with _written(dst) as tmp:
            w = gguf.GGUFWriter(str(tmp), arch)
            w.add_name(str(meta.get("name") or src.stem))
            _model_keys(w, cfg, src)
            rope_freqs = _rope_keys(w, gguf, cfg, src)
            _tokenizer_keys(w, gguf, meta, cfg.vocab_size, src)
            # (GGUF name, produce() -> numpy array, its numpy shape and dtype, raw GGML type or None)
            hf_of = {stored: hf for hf, stored in names.items()}
            stacks = _expert_stacks(names)
            _cut_rows_warning(f, src, names, stacks, _FLOATS[dtype])
            types = _GgufTypes(quantize, cfg, hf_of, device)
            plans = [_tensor_plan(f, gguf, hf, names[hf], cfg, arch, lora, _FLOATS[dtype], types) for hf in sorted(names)]
            plans += [_stack_plan(f, gguf, name, stored, lora, _FLOATS[dtype], types) for name, stored in stacks.items()]
            if rope_freqs is not None:
                plans.append(("rope_freqs.weight", lambda: rope_freqs, rope_freqs.shape, np.float32, None))
            file_type = (GGUF_KINDS[quantize][1] if quantize is not None  # (as llama-quantize labels its file)
                         else _file_type(gguf, plans, meta))
            if file_type is not None:
                w.add_file_type(file_type)
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for name, _produce, shape, np_dtype, raw in plans:
                w.add_tensor_info(name, shape, np.dtype(np_dtype), math.prod(shape) * np.dtype(np_dtype).itemsize,
                                  raw_dtype=raw)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            from tqdm import tqdm

            bar = tqdm(plans, unit="tensor", desc=f"export {src.name}", file=sys.stderr,
                       disable=(not progress) if progress is not None else None)
            for _name, produce, _shape, _dtype, _raw in bar:
                w.write_tensor_data(np.ascontiguousarray(produce()))
            w.close()
    return dst


def _check_new_file(dst: Path) -> None:
    """A GGUF export's destination: a new file in an existing folder."""
    if dst.exists():
        raise FileExistsError(f"{dst}: already exists")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"{dst.parent}: output folder does not exist")


@contextlib.contextmanager
def _written(dst: Path):
    """A temporary file next to ``dst`` (its path yielded) renamed over ``dst`` when the block completes;
    removed on any error, so ``dst`` appears only whole."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)  # the writer opens it by name
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export_adapter_gguf(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """The LoRA adapters of a step checkpoint (``train --lora-rank``) as llama.cpp's LoRA adapter GGUF,
    the file its ``convert_lora_to_gguf.py`` writes: ``general.type`` adapter, ``adapter.type`` lora,
    ``adapter.lora.alpha``, and per adapted projection ``<gguf name>.lora_a`` [r, in] and ``.lora_b``
    [out, r] in float32 (B's rows in llama.cpp's order, as the projection's). llama.cpp applies it to
    the GGUF export of the run's ``--init`` file (``llama-cli -m base.gguf --lora adapter.gguf``,
    Ollama's ``ADAPTER``) with the scale ``alpha / r``: rsLoRA's ``alpha / sqrt(r)`` is written as the
    alpha that gives it. A layer's experts' adapters are stacked as llama.cpp stacks the experts
    (``ffn_*_exps.weight.lora_a`` [experts, r, in]). Refused: DoRA, a reward model's score head."""
    import gguf

    import apr_kernels

    src, dst = Path(src), Path(dst)
    _check_new_file(dst)
    with apr_kernels.open(src) as f:
        meta, cfg = f.metadata, f.config
        lora = lora_settings(meta, src)
        modules = sorted(n.removesuffix(".lora_A") for n in f.keys() if n.endswith(".lora_A"))
        why = ("DoRA (llama.cpp's adapters are plain LoRA)" if lora.get("dora") else
               "a sequence classifier (a reward model's score head)" if cfg.num_labels else None)
        if why:
            raise ValueError(f"{src}: {why} cannot be written as a llama.cpp LoRA adapter; export the merged model "
                             f"instead (`apr-kernels export STEP.apr model.gguf`)")
        arch = GGUF_ARCH[str(cfg.architecture).lower()]
        rank, alpha = int(lora["rank"]), float(lora["alpha"])
        if lora.get("rslora"):  # (llama.cpp scales by alpha / r)
            alpha *= math.sqrt(rank)
        heads_q, heads_kv = cfg.num_heads, cfg.num_kv_heads or cfg.num_heads
        tensors = []
        weights = {f"{m}.weight": m for m in modules}
        stacks = _expert_stacks(weights)  # (a layer's experts: one stacked GGUF tensor per projection)
        for name, experts in stacks.items():
            if len(experts) != cfg.num_experts:
                raise ValueError(f"{src}: adapters on {len(experts)} of the {cfg.num_experts} experts of {name}; "
                                 f"llama.cpp stacks a layer's experts, so expected adapters on all or none")
            for part in ("lora_A", "lora_B"):
                tensors.append((f"{name}.{part.lower()}",
                                torch.stack([f.get_tensor(f"{m}.{part}", dtype=torch.float32) for m in experts])))
        for weight, module in weights.items():
            b = f.get_tensor(f"{module}.lora_B", dtype=torch.float32)
            heads = rope_permuted_heads(weight, heads_q, heads_kv)
            if heads and arch in PERMUTED_ARCHS and cfg.rope_type == 2:
                b = permute_rows(b, heads)
            elif heads and arch not in PERMUTED_ARCHS and cfg.rope_type == 0:
                b = unpermute_rows(b, heads)
            name = hf_to_gguf(weight)
            tensors += [(f"{name}.lora_a", f.get_tensor(f"{module}.lora_A", dtype=torch.float32)), (f"{name}.lora_b", b)]
        with _written(dst) as tmp:
            w = gguf.GGUFWriter(str(tmp), arch)
            w.add_type(gguf.GGUFType.ADAPTER)
            w.add_name(str(meta.get("name") or src.stem))
            w.add_string(gguf.Keys.Adapter.TYPE, "lora")
            w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
            for name, t in tensors:
                w.add_tensor(name, t.contiguous().numpy())
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
    return dst


def _file_type(gguf, plans, meta: dict) -> int | None:
    """``general.file_type`` as llama.cpp labels such a file (its converter: all F32 / F16 / BF16;
    llama-quantize: Q4_K_M, Q6_K, whose files hold Q8_0 where rows are not whole blocks), from the
    matrices' types; None where no label fits (llama.cpp then guesses one from the types)."""
    kinds = {raw.name if raw is not None else np.dtype(np_dtype).name for name, _p, shape, np_dtype, raw in plans
             if len(shape) >= 2 and not name.endswith(_F32_MATRICES)}
    T = gguf.LlamaFileType
    plain = {frozenset({"float32"}): T.ALL_F32, frozenset({"float16"}): T.MOSTLY_F16, frozenset({"BF16"}): T.MOSTLY_BF16}
    if frozenset(kinds) in plain:
        return int(plain[frozenset(kinds)])
    quantized = (meta.get("quantization") or {}).get("quant_type")
    if quantized == "q4km" and kinds <= {"Q4_K", "Q6_K", "Q8_0"}:
        return int(T.MOSTLY_Q4_K_M)
    if quantized == "q6k" and kinds <= {"Q6_K", "Q8_0"}:
        return int(T.MOSTLY_Q6_K)
    return None


def whole_blocks(info) -> bool:
    """Whether a Q4_K/Q6_K tensor's rows are whole 256-value blocks, as GGUF's k-quants need (an APR file
    pads each row to whole blocks instead: Qwen2-0.5B's 896-value rows hold 1024 values' blocks)."""
    return info.shape[-1] % 256 == 0


def _requantised(info) -> bool:
    """A Q4_K/Q6_K tensor whose rows are not whole k-quant blocks but whole Q8_0 blocks (32 values):
    written as Q8_0 from its dequantised values, as llama.cpp falls back to another type for such rows
    (Q8_0 keeps each value within 1/254 of its 32-value block's largest)."""
    return info.dtype in ("Q4_K", "Q6_K") and not whole_blocks(info) and info.shape[-1] % 32 == 0


def _cut_rows_warning(f, src, names: dict, stacks: dict, want) -> None:
    """Say which Q4_K/Q6_K tensors cannot keep their blocks because their rows are not whole GGUF blocks."""
    stored = [*names.values(), *(s for group in stacks.values() for s in group)]
    cut = [s for s in stored if f.info(s).dtype in ("Q4_K", "Q6_K") and not whole_blocks(f.info(s))]
    if cut and want is None:
        widths = sorted({f.info(s).shape[-1] for s in cut})
        q8 = sum(_requantised(f.info(s)) for s in cut)
        warn(f"{src}: {len(cut)} Q4_K/Q6_K tensors have rows of {', '.join(map(str, widths))} values, not whole "
             f"256-value blocks as GGUF's k-quants need (e.g. {cut[0]}); written as Q8_0 ({q8}, rows of whole "
             f"32-value blocks) or dequantised F32 ({len(cut) - q8})")


def _q8_0(t: torch.Tensor) -> np.ndarray:
    """Q8_0 blocks of the rows of ``t`` (last dimension a multiple of 32): ``ggml_quant.blocks``."""
    from apr_kernels.ggml_quant import blocks

    return blocks("Q8_0", t)


def _check_float_source(f, src, names: dict, quantize: str) -> None:
    """``export --quantize`` quantises float weights, as llama-quantize does an F32/F16/BF16 file."""
    blocks = [s for s in names.values() if f.info(s).dtype not in FLOAT_DTYPES and len(f.info(s).shape) >= 2]
    if blocks:
        raise ValueError(f"{src}: export --quantize {quantize} quantises float weights, but {len(blocks)} tensors are "
                         f"stored in blocks already (e.g. {blocks[0]}: {f.info(blocks[0]).dtype}); expected a float "
                         f"file (a training checkpoint, a converted float model), or export this one without "
                         f"--quantize (its Q4_K/Q6_K blocks are kept)")


class _GgufTypes:
    """``export --quantize``'s type of each matrix (``recipe.ggml_type``, by its Hugging Face name; None:
    no quantisation asked, the stored formats decide), and its GGML blocks."""

    def __init__(self, kind: str | None, cfg, hf_of: dict, device=None):
        self.kind, self.hf_of, self.device = kind, hf_of, device
        self.layout = Layout.of_config(cfg) if kind else None

    def of(self, stored: str, shape) -> str | None:
        """GGML type name for the stored 2-D tensor ``stored``, "F32" where llama.cpp keeps it."""
        return ggml_type(self.kind, self.hf_of[stored], shape, self.layout) or "F32"

    def blocks(self, kind: str, t: torch.Tensor) -> np.ndarray:
        """``[rows, cols]`` float32 -> its rows' GGML blocks ``[rows, bytes]`` (``ggml_quant.blocks``; the
        k-quant searches on ``device``: a GPU's are the same bytes)."""
        from apr_kernels import ggml_quant

        on_device = self.device is not None and ggml_quant.ROW_BLOCK.get(kind) == 256
        return ggml_quant.blocks(kind, t.to(self.device) if on_device else t)

    def plan(self, gguf, name: str, kind: str, shape, produce):
        """The plan entry of a tensor of logical ``shape`` written as ``kind`` from ``produce()`` (float32
        values, ``shape``): raw blocks, or float16 / float32 values."""
        if kind in ("F32", "F16"):
            np_dtype = np.float32 if kind == "F32" else np.float16
            shape = tuple(shape)
            while len(shape) > 1 and shape[0] == 1:  # (llama-quantize writes ggml's dimensions: trailing 1s dropped)
                shape = shape[1:]
            return name, lambda: produce().numpy().astype(np_dtype, copy=False).reshape(shape), shape, np_dtype, None
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        byte_shape = (*shape[:-1], shape[-1] // block * size)
        if len(shape) == 2:
            return name, lambda: self.blocks(kind, produce()), byte_shape, np.uint8, qtype
        return name, lambda: np.stack([self.blocks(kind, e) for e in produce()]), byte_shape, np.uint8, qtype


def _expert_stacks(names: dict) -> dict[str, list[str]]:
    """Take the expert tensors out of ``names`` (Hugging Face name -> stored name): GGUF name of each
    stacked tensor -> the stored names of its experts, in expert order."""
    from .names import EXPERT_PROJ, HF_EXPERT

    found: dict[str, dict[int, str]] = {}
    for hf in [n for n in names if HF_EXPERT.match(n)]:
        layer, expert, proj = HF_EXPERT.match(hf).groups()
        found.setdefault(f"blk.{layer}.ffn_{EXPERT_PROJ[proj]}_exps.weight", {})[int(expert)] = names.pop(hf)
    return {name: [experts[e] for e in sorted(experts)] for name, experts in sorted(found.items())}


def _stack_plan(f, gguf, name: str, stored: list[str], lora, want: torch.dtype | None, types: _GgufTypes):
    """One layer's experts of one projection as a ``[experts, out, in]`` GGUF tensor: their raw Q4_K/Q6_K
    blocks one after another when all have them (and no adapter), else floats; ``export --quantize``:
    each expert quantised to the layer's type."""
    infos = [f.info(s) for s in stored]
    shape = (len(stored), *infos[0].shape)
    if types.kind is not None:
        return types.plan(gguf, name, types.of(stored[0], infos[0].shape), shape,
                          lambda: torch.stack([merged_tensor(f, s, lora, torch.float32) for s in stored]))
    adapted = bool(lora) and any(f"{s.removesuffix('.weight')}.lora_A" in f for s in stored)
    kinds = {i.dtype for i in infos}
    if len(kinds) == 1 and kinds <= {"Q4_K", "Q6_K"} and want is None and not adapted and whole_blocks(infos[0]):
        per_row = infos[0].nbytes // shape[1]
        return (name, lambda: np.stack([f.get_raw(s).view(shape[1], -1).numpy() for s in stored]),
                (*shape[:2], per_row), np.uint8, getattr(gguf.GGMLQuantizationType, kinds.pop()))
    if want is None and not adapted and all(_requantised(i) for i in infos):
        return (name, lambda: np.stack([_q8_0(f.get_tensor(s)) for s in stored]),
                (*shape[:2], shape[2] // 32 * 34), np.uint8, gguf.GGMLQuantizationType.Q8_0)
    same = {"F16": torch.float16, "BF16": torch.bfloat16}.get(kinds.pop()) if len(kinds) == 1 and not adapted else None
    out = want or same or torch.float32
    if out == torch.bfloat16:  # numpy has no bfloat16: the raw bytes
        return (name, lambda: np.stack([merged_tensor(f, s, lora, out).contiguous().view(torch.uint8).numpy()
                                        for s in stored]),
                (*shape[:-1], shape[-1] * 2), np.uint8, gguf.GGMLQuantizationType.BF16)
    np_dtype = np.float16 if out == torch.float16 else np.float32
    return (name, lambda: np.stack([merged_tensor(f, s, lora, out).contiguous().numpy() for s in stored]),
            shape, np_dtype, None)


def _tensor_plan(f, gguf, hf: str, stored: str, cfg, arch: str, lora, want: torch.dtype | None, types: _GgufTypes):
    info = f.info(stored)
    heads = rope_permuted_heads(hf, cfg.num_heads, cfg.num_kv_heads)
    # rows in HF order (rope_type 2) or llama.cpp order (0); GGUF wants llama.cpp order for llama
    permute = heads if (arch in PERMUTED_ARCHS and cfg.rope_type == 2) else None
    unpermute = heads if (arch not in PERMUTED_ARCHS and cfg.rope_type == 0) else None
    adapted = bool(lora) and f"{stored.removesuffix('.weight')}.lora_A" in f
    name = hf_to_gguf(hf)

    def ordered(t):  # rows in GGUF's order (whole rows move: raw blocks stay exact)
        return permute_rows(t, permute) if permute else unpermute_rows(t, unpermute) if unpermute else t

    if types.kind is not None and len(info.shape) == 2:  # export --quantize: llama-quantize's type, from the floats
        return types.plan(gguf, name, types.of(stored, info.shape), info.shape,
                          lambda: ordered(merged_tensor(f, stored, lora, torch.float32)))
    if info.dtype in ("Q4_K", "Q6_K") and want is None and not adapted and len(info.shape) == 2 and whole_blocks(info):
        rows = info.shape[0]
        return name, lambda: ordered(f.get_raw(stored).view(rows, -1)).numpy(), (rows, info.nbytes // rows), \
            np.uint8, getattr(gguf.GGMLQuantizationType, info.dtype)
    if want is None and not adapted and len(info.shape) == 2 and _requantised(info):
        return name, lambda: _q8_0(ordered(f.get_tensor(stored))), (info.shape[0], info.shape[1] // 32 * 34), \
            np.uint8, gguf.GGMLQuantizationType.Q8_0
    if len(info.shape) <= 1 or name.endswith(_F32_MATRICES):
        out = torch.float32  # norms, biases, routers and shared-expert gates: F32, as llama.cpp writes them
    elif want is not None:
        out = want
    elif info.dtype in ("F16", "BF16", "F32") and not adapted:
        out = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}[info.dtype]
    else:
        out = torch.float32  # dequantised blocks, merged adapters, other dtypes
    shape = tuple(info.shape)

    def floats():
        t = ordered(merged_tensor(f, stored, lora, out))
        if out == torch.bfloat16:  # numpy has no bfloat16: the raw bytes
            return t.contiguous().view(torch.uint8).numpy()
        return t.contiguous().numpy()

    if out == torch.bfloat16:
        byte_shape = (*shape[:-1], shape[-1] * 2) if shape else (2,)
        return name, floats, byte_shape, np.uint8, gguf.GGMLQuantizationType.BF16
    return name, floats, shape, np.float16 if out == torch.float16 else np.float32, None


def _model_keys(w, cfg, src) -> None:
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    # (llama.cpp reads Mixtral's expert size from feed_forward_length)
    w.add_feed_forward_length(cfg.moe_intermediate_size if cfg.architecture == "mixtral" else cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_key_length(cfg.head_dim)  # (the keys llama.cpp's convert_hf_to_gguf writes, and only those:
    w.add_value_length(cfg.head_dim)  # the rope dimensions and vocabulary size for its llama family alone)
    if GGUF_ARCH[cfg.architecture] == "llama":
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_vocab_size(cfg.vocab_size)
    if cfg.is_moe:
        _expert_keys(w, cfg, src)
    if cfg.sliding_window is not None:
        warn(f"{src}: the sliding window ({cfg.sliding_window} keys) is not written: llama.cpp runs this "
             f"architecture with full attention, which differs past {cfg.sliding_window} tokens")


def _expert_keys(w, cfg, src) -> None:
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if cfg.architecture != "mixtral":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if cfg.shared_expert_intermediate_size:
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    renormalises = cfg.architecture != "qwen2_moe"  # what llama.cpp runs for each family
    if cfg.norm_topk_prob != renormalises and cfg.architecture != "mixtral":
        warn(f"{src}: norm_topk_prob={cfg.norm_topk_prob}, but llama.cpp's {GGUF_ARCH[cfg.architecture]} "
             f"{'renormalises' if renormalises else 'does not renormalise'} the chosen experts' weights: its outputs "
             f"will differ")


def _rope_keys(w, gguf, cfg, src) -> np.ndarray | None:
    """RoPE scaling keys; returns llama3's ``rope_freqs`` divisors when those are the way to say it."""
    from apr_kernels.model.rope import inv_frequencies

    scaling = cfg.rope_scaling
    if not scaling:
        return None
    kind = scaling["rope_type"]
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
        return None
    if kind == "yarn":
        if any(k in scaling for k in ("attention_factor", "mscale", "mscale_all_dim")) or \
                scaling.get("truncate") is False:
            raise ValueError(f"{src}: yarn RoPE scaling with {sorted(set(scaling) - {'rope_type', 'factor'})} has no "
                             f"GGUF keys llama.cpp reads the same way; expected factor, original context and betas only")
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        if "beta_fast" in scaling:
            w.add_rope_scaling_yarn_beta_fast(scaling["beta_fast"])
        if "beta_slow" in scaling:
            w.add_rope_scaling_yarn_beta_slow(scaling["beta_slow"])
        return None
    if kind == "dynamic":  # no GGUF key: the same as none within the model's context length
        warn(f"{src}: dynamic (NTK) RoPE scaling has no GGUF key; llama.cpp will not scale past "
             f"{cfg.max_position_embeddings} positions")
        return None
    # llama3: llama.cpp divides each pair's frequency by rope_freqs[i], which its converter computes
    # in fp32 tensor arithmetic from the fp32 frequencies (done the same way here: the same bits)
    wavelen = 2 * math.pi / inv_frequencies(cfg.head_dim, cfg.rope_theta)
    factor, old_len = scaling["factor"], scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    smooth = (old_len / wavelen - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    keep, slow = wavelen < old_len / high, wavelen > old_len / low
    return torch.where(keep, 1.0, torch.where(slow, float(factor), between)).float().numpy()


def _tokenizer_keys(w, gguf, meta: dict, vocab_size: int, src) -> None:
    from apr_kernels.tokenizer import Tokenizer

    if not meta.get("tokenizer.vocabulary"):
        warn(f"{src}: no embedded tokenizer; the GGUF file has none either (llama.cpp needs one to run it)")
        return
    tok = Tokenizer.from_metadata(meta, path=src)
    pieces = [str(p) for p in meta["tokenizer.vocabulary"]]
    if len(pieces) > vocab_size:
        raise ValueError(f"{src}: the tokenizer has {len(pieces)} tokens, more than the model's vocab_size "
                         f"{vocab_size}")
    spm = meta.get("tokenizer.model_type") == "llama"
    types = meta.get("tokenizer.token_type")
    if not (isinstance(types, list) and len(types) == len(pieces)):
        special = set(tok.special_tokens.values())
        types = [int(gguf.TokenType.CONTROL) if i in special else int(gguf.TokenType.NORMAL)
                 for i in range(len(pieces))]
    pad = vocab_size - len(pieces)  # llama.cpp wants one token per embedding row
    w.add_tokenizer_model("llama" if spm else "gpt2")
    if spm:
        scores = meta.get("tokenizer.scores") or [0.0] * len(pieces)
        w.add_token_scores([float(s) for s in scores] + [-1000.0] * pad)
        w.add_tokenizer_pre("default")  # (as llama.cpp's converter writes a SentencePiece vocabulary:
        if meta.get("tokenizer.add_space_prefix") is False:  # the prefix space is llama.cpp's default)
            w.add_add_space_prefix(False)
    else:
        pre = meta.get("tokenizer.pre_type", "gpt2")
        if pre not in _PRE:
            warn(f"{src}: pre-tokenizer {pre!r} has no llama.cpp name; written as 'default' (llama.cpp will "
                 f"split text with GPT-2's regex, which may tokenise differently)")
        w.add_tokenizer_pre(_PRE.get(pre, "default"))
        merges = [str(m) for m in meta.get("tokenizer.merges") or []]
        if merges:  # (a byte-level vocabulary without merges has none to write)
            w.add_token_merges(merges)
    w.add_token_list(pieces + [f"[PAD{i}]" for i in range(len(pieces), vocab_size)])
    w.add_token_types([int(t) for t in types] + [int(gguf.TokenType.UNUSED)] * pad)
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                     ("padding_token_id", w.add_pad_token_id)):
        value = meta.get(f"tokenizer.{key}")
        if isinstance(value, int):
            add(value)
    if meta.get("tokenizer.add_bos_token") is not None:
        w.add_add_bos_token(bool(meta["tokenizer.add_bos_token"]))
    template = tokenizer_carried(meta).get("tokenizer.chat_template")  # (or aprender's typed chat_template)
    if isinstance(template, str):
        w.add_chat_template(template)
