"""APR -> Hugging Face folder (model.safetensors, or shards of at most ``max_shard_size`` with
model.safetensors.index.json; config.json, tokenizer.json, tokenizer_config.json)
that ``transformers`` loads with ``from_pretrained``.

Quantised tensors are dequantised (to F32, or --dtype); GGUF-named tensors get HF names; a file
with ``rope_type`` 0 (llama.cpp row order) has its q/k rows put back in HF order; a tied lm_head is
dropped and ``tie_word_embeddings`` set. The safetensors file is written one tensor at a time, and
the folder appears only when complete (built next to it, then renamed).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import torch

from apr_kernels._format import TORCH_DTYPES
from apr_kernels.model.config import HF_ARCHITECTURES, MOE_FAMILIES

from .core import warn
from .names import gguf_to_hf, rope_permuted_heads, unpermute_rows

_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int32: "I32", torch.int64: "I64", torch.int8: "I8", torch.uint8: "U8"}
_DTYPES = {"keep": None, "bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def write_safetensors(path: Path, names: list[str], specs: dict, produce, metadata: dict | None = None) -> None:
    """Streaming safetensors writer: ``specs[name] = (torch dtype, shape)``; ``produce(name)`` returns
    the tensor when its turn comes (header first, then bytes back to back, as the format requires)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        dtype, shape = specs[name]
        n = dtype.itemsize
        for d in shape:
            n *= d
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the reference writer pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in names:
            t = produce(name).detach().contiguous().cpu()
            if t.dtype != specs[name][0] or tuple(t.shape) != tuple(specs[name][1]):
                raise ValueError(f"{path}: tensor {name!r} came out {t.dtype} {list(t.shape)}, expected "
                                 f"{specs[name][0]} {list(specs[name][1])}")
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_tensor_names(f, src) -> dict[str, str]:
    """Hugging Face name -> stored name of every model tensor of an open APR file (training state and
    LoRA adapters, which are merged into their weights, left out)."""
    lora = f.metadata.get("lora")
    names: dict[str, str] = {}
    for stored in f.keys():
        if stored.startswith("__training__.") or (lora and stored.endswith((".lora_A", ".lora_B", ".lora_magnitude"))):
            continue
        hf = gguf_to_hf(stored)
        if hf in names:
            raise ValueError(f"{src}: tensors {names[hf]!r} and {stored!r} both map to {hf!r}")
        names[hf] = stored
    lm_head = names.get("lm_head.weight")
    if lm_head is not None and f.info(lm_head).placeholder:
        names.pop("lm_head.weight")
    return names


def merged_tensor(f, stored: str, lora: dict | None, dtype: torch.dtype) -> torch.Tensor:
    """A stored weight in ``dtype``, with its LoRA update ``(alpha / rank) B A`` folded in (in fp32,
    rounded once) when the file has adapters for it."""
    module = stored[: -len(".weight")] if stored.endswith(".weight") else None
    if lora and module and f"{module}.lora_A" in f:
        from apr_kernels.model.lora import lora_scale, merged

        magnitude = f.get_tensor(f"{module}.lora_magnitude") if f"{module}.lora_magnitude" in f else None  # DoRA
        return merged(f.get_tensor(stored, dtype=torch.float32), f.get_tensor(f"{module}.lora_A"),
                      f.get_tensor(f"{module}.lora_B"), lora_scale(lora["rank"], lora["alpha"], lora.get("rslora", False)),
                      dtype, magnitude)
    return f.get_tensor(stored, dtype=dtype)


def check_new_folder(dst: Path) -> None:
    """``dst`` may become an output folder: absent or empty, in an existing folder."""
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst}: already exists and is not an empty folder")
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"{dst.parent}: output folder does not exist")


@contextlib.contextmanager
def new_folder(dst: Path):
    """A temporary folder next to ``dst`` that is renamed to ``dst`` when the block succeeds; on any
    error it is removed, so ``dst`` appears only when complete."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            dst.rmdir()
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def hf_config(meta: dict, cfg, tensors: set[str], tok) -> dict:
    """config.json contents via transformers' own config class (so the installed version reads it).

    Mixture-of-experts families get their expert keys (``_expert_kwargs``); attention biases are
    declared as the tensors say (``attention_bias``, Qwen2-MoE's ``qkv_bias``); a Qwen2-MoE window is
    written as explicit ``layer_types`` (its config class's own rule alternates layers)."""
    from transformers import AutoConfig

    family = cfg.architecture or cfg.model_type
    family = str(family).lower() if family else None
    if family not in HF_ARCHITECTURES:
        raise ValueError(f"architecture {family!r} cannot be exported; expected one of {', '.join(HF_ARCHITECTURES)}")
    missing = [k for k in ("hidden_size", "num_layers", "num_heads", "vocab_size", "intermediate_size")
               if getattr(cfg, k) is None]
    if missing:
        raise ValueError(f"metadata lacks {', '.join(missing)}; expected the typed model keys (spec 5.2)")
    kwargs = dict(
        architectures=[cfg.hf_architecture or HF_ARCHITECTURES[family]],
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads, vocab_size=cfg.vocab_size,
        intermediate_size=cfg.intermediate_size, head_dim=cfg.head_dim or cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings or 32768,
        rope_theta=cfg.rope_theta if cfg.rope_theta is not None else 10000.0,
        rms_norm_eps=cfg.rms_norm_eps if cfg.rms_norm_eps is not None else 1e-6,
        tie_word_embeddings="lm_head.weight" not in tensors,
        bos_token_id=tok.bos_id if tok else None, eos_token_id=tok.eos_id if tok else None,
        pad_token_id=tok.pad_id if tok else None,
    )
    has_bias = "model.layers.0.self_attn.q_proj.bias" in tensors
    if family in ("llama", "qwen3", "qwen3_moe"):
        kwargs["attention_bias"] = has_bias
    elif family == "qwen2_moe":
        kwargs["qkv_bias"] = has_bias
    if family in ("mistral", "mixtral"):
        kwargs["sliding_window"] = cfg.sliding_window  # None: no window
    elif family in ("qwen2", "qwen3", "qwen2_moe") and cfg.sliding_window is not None:
        k = cfg.max_window_layers or 0
        kwargs.update(use_sliding_window=True, sliding_window=cfg.sliding_window, max_window_layers=k)
        if family == "qwen2_moe":  # its own default rule alternates layers: say which layers are windowed
            kwargs["layer_types"] = ["full_attention" if i < k else "sliding_attention" for i in range(cfg.num_layers)]
    elif family == "qwen3_moe" and cfg.sliding_window is not None:
        if cfg.max_window_layers:
            raise ValueError(f"a qwen3_moe model windowed from layer {cfg.max_window_layers} on (max_window_layers) "
                             f"cannot be exported: transformers' Qwen3-MoE windows every layer or none")
        kwargs.update(use_sliding_window=True, sliding_window=cfg.sliding_window)
    if family in MOE_FAMILIES:
        kwargs.update(_expert_kwargs(cfg, family))
    if isinstance(meta.get("rope_scaling"), dict):
        kwargs["rope_scaling"] = {**meta["rope_scaling"], "rope_theta": kwargs["rope_theta"]}
    if cfg.num_labels:  # a sequence classifier (reward model): *ForSequenceClassification
        kwargs["architectures"] = [HF_ARCHITECTURES[family].replace("ForCausalLM", "ForSequenceClassification")]
        kwargs["num_labels"] = cfg.num_labels
        # transformers pools at the last token that is not the pad id; our sequences end with the
        # end-of-text id, scored there, so that id must not count as padding
        if tok is not None and tok.pad_id == tok.eos_id:
            kwargs["pad_token_id"] = None
            warn("the tokenizer's pad id is its end-of-text id, which ends every scored sequence: config.json gets "
                 "no pad_token_id (transformers then scores one unpadded sequence per call; set a distinct pad "
                 "token to batch)")
    return AutoConfig.for_model(family, **kwargs).to_dict()


def _expert_kwargs(cfg, family: str) -> dict:
    """The mixture-of-experts keywords of transformers' config class for APR metadata ``cfg``: read
    through ``ModelConfig.from_apr_config`` (its checks, and Hugging Face's defaults for the routing
    settings the file leaves out, exactly as ``from_apr`` builds the model), so a file that loads
    exports and one that cannot is refused with the same message."""
    from apr_kernels.model.config import ModelConfig

    m = ModelConfig.from_apr_config(cfg)
    out = {"num_experts_per_tok": m.num_experts_per_tok, "router_aux_loss_coef": m.router_aux_loss_coef}
    if family == "mixtral":  # (its config: experts intermediate_size wide, every layer sparse)
        return {**out, "num_local_experts": m.num_experts}
    out.update(num_experts=m.num_experts, moe_intermediate_size=m.moe_intermediate_size,
               norm_topk_prob=m.norm_topk_prob, decoder_sparse_step=m.decoder_sparse_step,
               mlp_only_layers=list(m.mlp_only_layers))
    if family == "qwen2_moe":
        out["shared_expert_intermediate_size"] = m.shared_expert_intermediate_size
    return out


DEFAULT_MAX_SHARD = "5GB"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5e9 bytes (decimal units, as Hugging Face's ``max_shard_size``; ``GiB`` binary)."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(text).upper())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2) or "B"])


def plan_shards(order: list[str], sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Consecutive groups of ``order`` whose byte sizes add up to at most ``max_bytes`` (a tensor larger
    than that gets a shard of its own), as ``save_pretrained`` does."""
    shards: list[list[str]] = [[]]
    used = 0
    for name in order:
        if shards[-1] and used + sizes[name] > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    return shards


def export(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "keep", progress: bool | None = None,
           max_shard_size: str | int = DEFAULT_MAX_SHARD) -> Path:
    import apr_kernels
    from apr_kernels.tokenizer import Tokenizer

    from .hf_tokenizer import write_hf_tokenizer

    src, dst = Path(src), Path(dst)
    if dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
    check_new_folder(dst)
    with apr_kernels.open(src) as f:
        meta, cfg = f.metadata, f.config
        tied = bool(cfg.tied_embeddings)
        names = model_tensor_names(f, src)  # HF name -> stored name
        lora = meta.get("lora")  # adapters of a LoRA run (model/lora.py): folded into their weights
        if tied:
            names.pop("lm_head.weight", None)  # HF re-ties it to the embedding
        tok = Tokenizer.from_metadata(meta, path=src) if meta.get("tokenizer.vocabulary") else None
        config = hf_config(meta, cfg, set(names), tok)
        want = _DTYPES[dtype]
        base = {hf: TORCH_DTYPES.get(f.info(stored).dtype, torch.float32) for hf, stored in names.items()}
        floats = {d for d in base.values() if d.is_floating_point}
        if want is None and len(floats) > 1:
            want = torch.float32  # mixed (e.g. GGUF F16 + dequantised blocks): HF models want one dtype
        specs = {hf: (want if want is not None and d.is_floating_point else d, f.info(names[hf]).shape)
                 for hf, d in base.items()}
        heads_q, heads_kv = cfg.num_heads, cfg.num_kv_heads or cfg.num_heads

        from tqdm import tqdm

        bar = tqdm(total=len(names), unit="tensor", desc=f"export {src.name}", file=sys.stderr,
                   disable=(not progress) if progress is not None else None)

        def produce(hf: str) -> torch.Tensor:
            t = merged_tensor(f, names[hf], lora, specs[hf][0])
            heads = rope_permuted_heads(hf, heads_q, heads_kv) if cfg.rope_type == 0 else None
            bar.update(1)
            return unpermute_rows(t, heads) if heads else t

        try:
            with new_folder(dst) as tmp:
                order = sorted(names)
                sizes = {hf: math.prod(shape) * dt.itemsize for hf, (dt, shape) in specs.items()}
                shards = plan_shards(order, sizes, parse_size(max_shard_size))
                if len(shards) == 1:
                    write_safetensors(tmp / "model.safetensors", order, specs, produce, {"format": "pt"})
                else:  # model-0000k-of-0000n.safetensors + the index transformers reads
                    weight_map = {}
                    for k, group in enumerate(shards, 1):
                        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                        write_safetensors(tmp / fname, group, specs, produce, {"format": "pt"})
                        weight_map.update(dict.fromkeys(group, fname))
                    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
                    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
                config["dtype"] = str(specs.get("model.embed_tokens.weight", (torch.float32,))[0]).removeprefix("torch.")
                (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str), encoding="utf-8")
                if tok is not None:
                    write_hf_tokenizer(tok, tmp)
        finally:
            bar.close()
    return dst


def lora_settings(meta: dict, src) -> dict:
    """The ``lora`` settings of a step checkpoint's metadata ``meta`` (rank, alpha, targets, ...), or an
    error naming ``src`` when it has no adapters to export."""
    lora = meta.get("lora")
    if not isinstance(lora, dict):
        raise ValueError(f"{src}: no LoRA adapters (metadata 'lora'); expected a step checkpoint of a "
                         f"`train --lora-rank` run (its final model.apr has them merged)")
    return lora


def export_adapter(src: str | os.PathLike, dst: str | os.PathLike, *, base: str | None = None) -> Path:
    """The LoRA adapters of a checkpoint (``apr-kernels train --lora-rank``) as a PEFT adapter folder:
    ``adapter_config.json`` + ``adapter_model.safetensors``, which ``peft.PeftModel.from_pretrained``
    puts on the base model (the Hugging Face export of the run's ``--init`` file). PEFT's scale is
    ``lora_alpha / r``, ours, so the numbers carry over as they are. ``base``: the config's
    ``base_model_name_or_path`` (default: the checkpoint's recorded source, if any). A reward model's
    checkpoint (``apr-kernels reward --lora-rank``) is a ``SEQ_CLS`` adapter whose trained ``score`` head
    travels whole (PEFT's ``modules_to_save``), for ``AutoModelForSequenceClassification`` bases."""
    import apr_kernels

    src, dst = Path(src), Path(dst)
    check_new_folder(dst)
    with apr_kernels.open(src) as f:
        meta, cfg = f.metadata, f.config
        lora = lora_settings(meta, src)
        parts = sorted(n for n in f.keys() if n.endswith((".lora_A", ".lora_B")))
        experts = next((n for n in parts if ".experts." in n), None)
        if experts and str(cfg.architecture).lower() == "qwen2_moe":
            raise ValueError(f"{src}: adapters on the experts ({experts.rpartition('.')[0]}, ...) of a qwen2_moe model "
                             f"cannot be exported as a PEFT adapter: PEFT does not put per-expert adapters on "
                             f"transformers' stacked Qwen2-MoE experts (it drops them, changing the model); export "
                             f"the merged model instead (`apr-kernels export` without --adapter)")
        # PEFT's target_modules: the run's targets, plus the names the experts call them by (Mixtral's w1/w2/w3)
        targets = list(dict.fromkeys([*lora["targets"], *(n.rpartition(".")[0].rpartition(".")[2] for n in parts)]))
        heads_q, heads_kv = cfg.num_heads, cfg.num_kv_heads or cfg.num_heads

        def stored(peft_name: str) -> str:  # PEFT's "<module>.lora_A.weight" is our "<module>.lora_A"
            name = peft_name.removeprefix("base_model.model.")
            if name.endswith(".lora_magnitude_vector"):  # DoRA's magnitude (PEFT's saved name)
                return name.removesuffix("_vector")
            return name.removesuffix(".weight") if name.endswith((".lora_A.weight", ".lora_B.weight")) else name

        def produce(peft_name: str) -> torch.Tensor:
            name = stored(peft_name)
            t = f.get_tensor(name, dtype=torch.float32)
            # B's rows (and DoRA's magnitudes) are the projection's output rows: in llama.cpp order when
            # the file is (rope_type 0)
            rows = name.endswith((".lora_B", ".lora_magnitude"))
            heads = rope_permuted_heads(name.rpartition(".")[0] + ".weight", heads_q, heads_kv) \
                if cfg.rope_type == 0 and rows else None
            return unpermute_rows(t, heads) if heads else t

        names = [f"base_model.model.{n}.weight" for n in parts]
        dora = bool(lora.get("dora"))
        if dora:
            names += [f"base_model.model.{n}_vector" for n in sorted(k for k in f.keys() if k.endswith(".lora_magnitude"))]
        classifier = bool(cfg.num_labels)
        if classifier:  # the score head trains whole: PEFT saves it under its module's name
            names.append("base_model.model.score.weight")
        specs = {n: (torch.float32, tuple(f.info(stored(n)).shape)) for n in names}
        config = {
            "peft_type": "LORA", "task_type": "SEQ_CLS" if classifier else "CAUSAL_LM", "r": int(lora["rank"]),
            "lora_alpha": lora["alpha"], "target_modules": targets, "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "use_rslora": bool(lora.get("rslora", False)),
            "use_dora": dora,
            "modules_to_save": ["score"] if classifier else None,
            "base_model_name_or_path": base if base is not None else meta.get("source"),
        }
        with new_folder(dst) as tmp:
            write_safetensors(tmp / "adapter_model.safetensors", names, specs, produce, {"format": "pt"})
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return dst
