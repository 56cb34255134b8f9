"""The conversion pipeline shared by every source format: dtype/quantisation plan, tied embeddings,
metadata assembly, progress, and an atomic streaming write through ``apr_kernels.save``.

A reader (``hf.read_hf``, ``gguf_in.read_gguf``) returns a :class:`Source`: Hugging Face tensor names
mapped to ``LazyTensor``s (nothing is read yet) plus the metadata it could derive. ``convert`` then
wraps each lazy tensor once more (cast or quantise) and hands the lot to ``save``, which
materialises one tensor at a time, so peak memory stays near the largest tensor.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


from apr_kernels._format import TORCH_DTYPES, LazyTensor
from apr_kernels.errors import AprFormatError

from . import recipe
from .recipe import EMBED, FLOAT_DTYPES, LM_HEAD, QUANT_CHOICES, QUANT_META

DTYPE_CHOICES = {"keep": None, "bf16": "BF16", "f16": "F16", "f32": "F32"}
SCORE = "score.weight"


@dataclass
class Source:
    path: str
    tensors: dict[str, LazyTensor]
    metadata: dict = field(default_factory=dict)
    tied: bool | None = None  # the source says the output projection is the embedding
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for fn in self.closers:
            fn()


def warn(msg: str) -> None:
    print(f"apr-kernels: warning: {msg}", file=sys.stderr)


def quantize_device(name: str | None):
    """The device ``--quantize`` runs on for ``--device name``: "auto" (or None) a CUDA GPU when there is
    one (Q4_K/Q6_K through the Triton searches, the same blocks as the host's), else the CPU."""
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device here (torch.cuda.is_available() is False); expected "
                         f"--device cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    return device


def plan_tensor(lt: LazyTensor, dtype: str | None, qdtype: str | None, device=None) -> LazyTensor:
    """The tensor to write for source tensor ``lt`` under the --dtype choice and the block format
    ``qdtype`` that ``recipe.plan`` gives it (None: not quantised), quantised on ``device`` (default:
    where ``lt`` is, the host); one tensor there at a time."""
    if lt.dtype not in FLOAT_DTYPES:
        return lt  # quantised passthrough (Q4_K/Q6_K raw blocks) and integer tensors stay as they are
    if qdtype is not None:
        def quantised():
            from apr_kernels.quant import quantize

            value = lt.materialize()
            return quantize(qdtype, value if device is None else value.to(device))

        return LazyTensor(qdtype, lt.shape, quantised)
    if dtype and dtype != lt.dtype:
        tdtype = TORCH_DTYPES[dtype]
        return LazyTensor(dtype, lt.shape, lambda: lt.materialize().to(tdtype))
    return lt


def _with_progress(tensors: dict[str, LazyTensor], bar) -> dict[str, LazyTensor]:
    def wrap(lt: LazyTensor) -> LazyTensor:
        def run():
            value = lt.materialize()
            bar.update(lt.nbytes)
            return value

        return LazyTensor(lt.dtype, lt.shape, run)

    return {n: wrap(lt) for n, lt in tensors.items()}


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "keep", quantize: str | None = None,
            progress: bool | None = None, adapter: str | os.PathLike | None = None,
            chat_template: str | os.PathLike | None = None, device: str | None = "auto") -> dict:
    """Convert ``src`` (.safetensors file, Hugging Face folder, .gguf, .apr) to the APR file ``dst``;
    ``adapter``: a PEFT LoRA adapter folder merged into the weights on the way (``peft_in``);
    ``chat_template``: a jinja file written as the tokenizer's ``tokenizer.chat_template`` (replacing
    the source's; checked to render a conversation); ``device``: where ``quantize`` runs
    (``quantize_device``: "auto" takes a CUDA GPU when there is one; the file is the same either way).

    Returns the metadata written. On any error nothing is left at ``dst`` (``save`` writes a
    temporary file and renames it only when complete).
    """
    src_path, dst_path = Path(src), Path(dst)
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPE_CHOICES)}")
    if quantize is not None:
        recipe.check_kind(quantize)
        device = quantize_device(device)
    if not src_path.exists():
        src_path = cached_snapshot(str(src))
    if dst_path.exists() and dst_path.resolve() == src_path.resolve():
        raise ValueError(f"{dst_path}: the output would overwrite the input")
    if not dst_path.parent.is_dir():
        raise FileNotFoundError(f"{dst_path.parent}: output folder does not exist")
    source = open_source(src_path)
    try:
        tensors = dict(source.tensors)
        if not tensors:
            raise ValueError(f"{src_path}: holds no tensors")
        tied = _resolve_tied(source, tensors)
        merged = None
        if adapter is not None:
            from .peft_in import merge_adapter

            tensors, merged = merge_adapter(tensors, adapter)
        formats = recipe.plan(quantize, tensors, tied=tied)
        out = {n: plan_tensor(lt, DTYPE_CHOICES[dtype], formats.get(n), device if quantize else None)
               for n, lt in tensors.items()}
        meta = dict(source.metadata)
        if chat_template is not None:
            meta["tokenizer.chat_template"] = checked_chat_template(chat_template, meta)
        if merged is not None:
            meta["lora_merged"] = merged
        meta["tied_embeddings"] = tied
        if quantize:
            bits, block, symmetric = QUANT_META[quantize]
            meta["quantization"] = {"quant_type": quantize, "bits": bits, "block_size": block, "symmetric": symmetric}
        total = sum(lt.nbytes for lt in out.values())
        from tqdm import tqdm

        with tqdm(total=total, unit="B", unit_scale=True, desc=f"convert {src_path.name}",
                  disable=(not progress) if progress is not None else None, file=sys.stderr) as bar:
            from apr_kernels import save

            save(_with_progress(out, bar), dst_path, metadata=meta)
        _check_loadable(src_path, dst_path, meta)
        return meta
    finally:
        source.close()


def _check_loadable(src: Path, dst: Path, meta: dict) -> None:
    """The loader's metadata and shape checks (``loading.plan``, no weight read) on the converted model
    ``dst``, said now rather than at the first ``train``: metadata the APR reader refuses (a config
    value out of range) is refused, nothing left at ``dst``; tensors that do not fit the config (a
    damaged or mislabelled checkpoint, a part of a model) are a warning naming the source, the file
    kept (a conversion of what is there). A source without an architecture (a lone .safetensors file
    of tensors) is not a model: nothing to check."""
    if not any(meta.get(k) for k in ("architecture", "model_type", "hf_architecture")):
        return
    from apr_kernels.model.loading import PreflightError, plan

    try:
        plan(dst)
    except PreflightError as exc:
        warn(f"{src}: the converted file will not load as a model: {exc}")
    except AprFormatError as exc:
        dst.unlink(missing_ok=True)
        raise ValueError(f"{src}: converted, its metadata is not valid APR, so nothing was written ({exc})") from None


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cached_snapshot(src: str) -> Path:
    """The local folder of Hugging Face model ``org/name`` (``src``) in the Hugging Face cache
    (``HF_HUB_CACHE`` / ``HF_HOME``, where ``huggingface-cli download`` and ``from_pretrained`` put it),
    looked up without any network access; FileNotFoundError naming ``src`` when it is not there."""
    if not _REPO_ID.match(src):
        raise FileNotFoundError(f"{src}: no such file or folder")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        raise FileNotFoundError(f"{src}: no such file or folder (and huggingface_hub, which finds downloaded "
                                f"models by name, is not installed)") from None
    try:
        return Path(snapshot_download(src, local_files_only=True))
    except Exception as exc:  # noqa: BLE001  (LocalEntryNotFoundError and relatives: not in the cache)
        raise FileNotFoundError(f"{src}: no such file or folder, and no downloaded model of that name in the Hugging "
                                f"Face cache {HF_HUB_CACHE} ({type(exc).__name__}); download it first (e.g. "
                                f"`huggingface-cli download {src}`; nothing is fetched here)") from None


def checked_chat_template(path, meta: dict) -> str:
    """The jinja text of ``path``, checked to render a conversation with the tokenizer ``meta`` holds."""
    from apr_kernels.train.cli import load_tokenizer, with_chat_template

    if not meta.get("tokenizer.vocabulary"):
        raise ValueError(f"--chat-template {path}: the source has no tokenizer to carry a chat template")
    tok = with_chat_template(load_tokenizer(None, meta, "the converted file"), path)
    return tok.extra["tokenizer.chat_template"]


def _resolve_tied(source: Source, tensors: dict[str, LazyTensor]) -> bool:
    """Spec 10.4: a tied model gets a physical copy of the embedding as lm_head.weight (a sequence
    classifier, with its ``score`` head, has no output head to copy)."""
    if LM_HEAD in tensors or SCORE in tensors:
        return bool(source.tied)
    if EMBED not in tensors:
        return False
    tensors[LM_HEAD] = tensors[EMBED]  # materialised again when lm_head is written: a copy
    return True


def open_source(path: Path) -> Source:
    """Pick the reader by what ``path`` is: folder, APR, .safetensors, .gguf (magic bytes first)."""
    if path.is_dir():
        from .hf import read_hf

        return read_hf(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] in (b"APR\x00", b"APR2"):  # a trained or converted APR file: re-quantised, LoRA merged
        from .apr_in import read_apr

        return read_apr(path)
    if head[:4] == b"GGUF" or path.suffix.lower() == ".gguf":
        from .gguf_in import read_gguf

        return read_gguf(path)
    if path.suffix.lower() in (".safetensors", ".bin", ".pt", ".pth"):
        from .hf import read_hf

        return read_hf(path)
    raise ValueError(f"{path}: unknown source format (expected a .safetensors file, a Hugging Face model "
                     "folder, a .gguf file, an APR file or a PyTorch state dict .bin / .pt / .pth)")


__all__ = ["Source", "convert", "open_source", "plan_tensor", "DTYPE_CHOICES", "QUANT_CHOICES"]
