"""``apr-kernels convert | export | merge | inspect | validate`` (registered by apr_kernels.cli).

Errors propagate as ValueError/OSError, which the router prints as one line with exit code 1.
"""

from __future__ import annotations

import json
import sys

from .core import DTYPE_CHOICES, QUANT_CHOICES
from .recipe import GGUF_KINDS


def _convert(args) -> int:
    from .core import convert

    meta = convert(args.src, args.dst, dtype=args.dtype, quantize=args.quantize,
                   progress=False if args.quiet else None, adapter=args.adapter, chat_template=args.chat_template,
                   device=args.device)
    if not args.quiet:
        arch = meta.get("architecture", "?")
        tok = "with tokenizer" if meta.get("tokenizer.vocabulary") else "no tokenizer"
        print(f"wrote {args.dst} ({arch}, {meta.get('original_format')}, {tok})")
        print(f"tensors: {_dtype_counts(args.dst)}")
    return 0


def _dtype_counts(path) -> str:
    """"3 F32, 10 Q4_K, 5 Q6_K": how many tensors of the APR file ``path`` each dtype holds."""
    from collections import Counter

    import apr_kernels

    with apr_kernels.open(path) as f:
        counts = Counter(f.info(n).dtype for n in f.keys())
    return ", ".join(f"{n} {dtype}" for dtype, n in sorted(counts.items()))


def _export(args) -> int:
    if args.adapter and str(args.dst).endswith(".gguf"):
        from .gguf_out import export_adapter_gguf

        out = export_adapter_gguf(args.src, args.dst)
    elif args.adapter:
        from .export import export_adapter

        out = export_adapter(args.src, args.dst)
    elif str(args.dst).endswith(".gguf"):
        from .gguf_out import export_gguf

        out = export_gguf(args.src, args.dst, dtype=args.dtype, progress=False if args.quiet else None,
                          quantize=args.quantize, device=args.device)
    elif args.quantize:
        raise ValueError(f"export --quantize {args.quantize}: quantises a GGUF file (llama-quantize's types); "
                         f"expected DST.gguf (a Hugging Face folder holds float weights)")
    else:
        from .export import export

        out = export(args.src, args.dst, dtype=args.dtype, progress=False if args.quiet else None,
                     max_shard_size=args.max_shard_size)
    if not args.quiet:
        print(f"wrote {out}")
    return 0


def _merge(args) -> int:
    from .merge import merge

    meta = merge(args.models, args.out, method=args.method, weights=args.weights, base=args.base, t=args.t,
                 density=args.density, dtype=args.dtype, seed=args.seed)
    if not args.quiet:
        print(f"wrote {args.out} ({meta['merge']['method']} of {len(args.models)} models)")
    return 0


def _inspect(args) -> int:
    from .inspect import describe, format_text

    d = describe(args.file)
    if args.json:
        json.dump(d, sys.stdout, indent=2, ensure_ascii=False, default=str)
        print()
    else:
        print(format_text(d, group=args.group))
    return 0


def _validate(args) -> int:
    from .inspect import validate

    problems = validate(args.file)
    for line in problems:
        print(line)
    if not problems and not args.quiet:
        print(f"{args.file}: OK")
    return 1 if problems else 0


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="HF folder / .safetensors / .gguf -> APR v2",
                              description="Convert a Hugging Face model folder (config.json, safetensors shards "
                                          "or pytorch_model.bin pickles, tokenizer), a .safetensors file, a .gguf "
                                          "file or a PyTorch state dict to an APR v2 file.")
    p.add_argument("src", help="source: .safetensors file, Hugging Face model folder (safetensors or "
                               "pytorch_model.bin), .gguf file, a PyTorch state dict .bin/.pt/.pth, or a model "
                               "name (org/name) already downloaded to the Hugging Face cache (never fetched)")
    p.add_argument("dst", help="output .apr file (written atomically)")
    p.add_argument("--dtype", choices=list(DTYPE_CHOICES), default="keep",
                   help="float tensors: keep their dtype (default) or cast")
    p.add_argument("--quantize", choices=list(QUANT_CHOICES), default=None,
                   help="quantise 2-D weights of >= 1024 elements: q4k (GGML Q4_K), q6k (GGML Q6_K), q8 (APR_Q8), "
                        "q4 (APR_Q4), or q4km: llama.cpp's Q4_K_M mixture (Q4_K; Q6_K for the output head, a "
                        "tied embedding, and attn_v / ffn_down in the layers llama.cpp gives more bits; "
                        "routers kept)")
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda[:N]",
                   help="where --quantize runs (default auto: a CUDA GPU when there is one, Q4_K/Q6_K through the "
                        "Triton searches; the file is byte for byte the same on either)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) merged into "
                        "the weights on the way: W + (lora_alpha / r) B A")
    p.add_argument("--chat-template", default=None, metavar="FILE.jinja",
                   help="write this jinja chat template into the file's tokenizer (replacing the source's): every "
                        "command then renders chat records with it")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=_convert)

    p = subparsers.add_parser("export", help="APR v2 -> Hugging Face folder (transformers from_pretrained), "
                                             "or a .gguf file (llama.cpp)")
    p.add_argument("src", help="input .apr file")
    p.add_argument("dst", help="output folder (must not exist, or be empty), or FILE.gguf (must not exist)")
    p.add_argument("--dtype", choices=list(DTYPE_CHOICES), default="keep",
                   help="float tensors: keep (quantised ones become f32; GGUF keeps Q4_K/Q6_K blocks) or cast")
    p.add_argument("--quantize", choices=list(GGUF_KINDS), default=None,
                   help="GGUF only: quantise the float weights as llama-quantize's Q4_K_M (q4km), Q4_K_S, Q5_K_M, "
                        "Q5_K_S, Q6_K or Q8_0 does (its type for each tensor, its fallbacks for rows that are not "
                        "whole 256-value blocks, the same bytes)")
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda[:N]",
                   help="where --quantize's k-quant searches run (default auto: a CUDA GPU when there is one; the "
                        "same bytes on either)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="largest safetensors shard (e.g. 5GB, 500MB, 2GiB); larger models get "
                        "model-0000k-of-0000n.safetensors + model.safetensors.index.json (default 5GB)")
    p.add_argument("--adapter", action="store_true",
                   help="only the LoRA adapters of a `train --lora-rank` step checkpoint, as a PEFT adapter folder "
                        "(adapter_config.json + adapter_model.safetensors) for peft.PeftModel.from_pretrained, or "
                        "to DST.gguf as llama.cpp's LoRA adapter (llama-cli --lora, Ollama's ADAPTER)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_export)

    from .merge import METHODS

    p = subparsers.add_parser("merge", help="merge APR models tensor by tensor (linear, slerp, task arithmetic, "
                                            "TIES), as mergekit does")
    p.add_argument("models", nargs="+", help="input .apr files (the same architecture, shapes and tokenizer)")
    p.add_argument("--out", required=True, help="output .apr file (written atomically)")
    p.add_argument("--method", choices=METHODS, default="linear",
                   help="linear (weighted mean), slerp (two models at --t), or with --base: task_arithmetic, "
                        "ties, dare_linear, dare_ties")
    p.add_argument("--weights", nargs="+", type=float, default=None, help="one weight per model (default 1)")
    p.add_argument("--base", default=None, help="the base model of task_arithmetic and ties")
    p.add_argument("--t", type=float, default=0.5, help="slerp's interpolation point: 0 = the first model")
    p.add_argument("--density", type=float, default=0.5,
                   help="ties, dare_*: the share of each task vector kept (largest / random entries)")
    p.add_argument("--seed", type=int, default=0, help="dare_*: the seed of the random drops")
    p.add_argument("--dtype", choices=list(DTYPE_CHOICES), default="keep",
                   help="output dtype (keep: the first model's; quantised tensors become f32)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_merge)

    p = subparsers.add_parser("inspect", help="header, flags, metadata, model config and tensor table")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--group", action="store_true",
                   help="one table row per name pattern, dtype and shape: layers and experts folded "
                        "(model.layers.{0..47}.mlp.experts.{0..127}.up_proj.weight), with counts")
    p.set_defaults(func=_inspect)

    p = subparsers.add_parser("validate", help="every reader check plus the footer CRC and aprender's writer checklist "
                                                  "(spec 17); exit 0 (sound) or 1")
    p.add_argument("file")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing when the file is sound")
    p.set_defaults(func=_validate)


__all__ = ["register"]
