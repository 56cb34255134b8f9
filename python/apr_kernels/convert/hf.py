"""Hugging Face sources: a .safetensors file or a model folder (config.json, one or more safetensors
shards with model.safetensors.index.json, tokenizer.json or vocab.json + merges.txt).

Tensor names and shapes are kept as they are (already HF names, row-major [out, in], spec 10.1);
bytes are read lazily through ``safetensors.safe_open`` (a private mapping), one tensor at a time.

Older folders hold PyTorch pickles instead (``pytorch_model.bin``, or shards listed in
``pytorch_model.bin.index.json``; also a single ``.bin`` / ``.pt`` / ``.pth`` file): read with
``torch.load(weights_only=True)``, which unpickles tensors and plain containers only (a pickle that
would run code is refused, naming the file), memory-mapped where the file is in torch's zip format.
Safetensors are preferred when a folder has both.
"""

from __future__ import annotations

import json
from pathlib import Path

from apr_kernels._format import LazyTensor
from apr_kernels.model.config import HF_ARCHITECTURES

from .core import Source, warn
from .hf_tokenizer import read_hf_tokenizer

# safetensors dtype -> APR dtype (both readers accept these; others are refused)
_ST_DTYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64", "I32": "I32", "I64": "I64",
              "I8": "I8", "U8": "U8"}


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if not index.is_file() and not any(folder.glob("*.safetensors")):  # an older folder: PyTorch pickles
        if (folder / "pytorch_model.bin.index.json").is_file():
            index = folder / "pytorch_model.bin.index.json"
        elif (folder / "pytorch_model.bin").is_file():
            return [folder / "pytorch_model.bin"]
    if index.is_file():
        weight_map = _load_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: 'weight_map' must be a non-empty object of tensor name -> shard file")
        files = []
        for shard in dict.fromkeys(weight_map.values()):
            if not isinstance(shard, str) or "/" in shard or "\\" in shard or not (folder / shard).is_file():
                raise ValueError(f"{index}: shard {shard!r} is not a file in {folder}")
            files.append(folder / shard)
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise ValueError(f"{folder}: no model.safetensors, model.safetensors.index.json, *.safetensors or "
                         "pytorch_model.bin file (expected a Hugging Face model folder)")
    return found


def _open_safetensors(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # SafetensorError and friends: one clear line naming the file
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: not a valid safetensors file ({msg})") from None


def read_safetensors(files: list[Path]) -> tuple[dict[str, LazyTensor], dict, list]:
    """Lazy tensors of all ``files`` (names unique across shards), their ``__metadata__``, handles."""
    tensors: dict[str, LazyTensor] = {}
    where_from: dict[str, Path] = {}
    source_meta: dict = {}
    handles = []
    for path in files:
        handle = _open_safetensors(path)
        handles.append(handle)
        source_meta.update(handle.metadata() or {})
        for name in handle.keys():
            if name in tensors:
                raise ValueError(f"{path}: tensor {name!r} is also in {where_from[name]} (expected each tensor "
                                 "in exactly one shard)")
            sl = handle.get_slice(name)
            st_dtype, shape = sl.get_dtype(), tuple(sl.get_shape())
            if st_dtype not in _ST_DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has dtype {st_dtype}; expected one of "
                                 f"{', '.join(_ST_DTYPES)}")
            tensors[name] = LazyTensor(_ST_DTYPES[st_dtype], shape,
                                       lambda h=handle, n=name: h.get_tensor(n))
            where_from[name] = path
    return tensors, source_meta, handles


def _window_keys(cfg: dict, model_type: str, path: Path, need) -> dict:
    """``sliding_window`` (+ ``max_window_layers``) from a config.json: Mistral's window is on every
    layer; Qwen2/3 use it only with ``use_sliding_window``, on the layers from ``max_window_layers``
    on (or as ``layer_types`` lists them: full layers first, then windowed ones)."""
    if model_type == "mistral":
        return {"sliding_window": need("sliding_window")} if cfg.get("sliding_window") is not None else {}
    if model_type not in ("qwen2", "qwen3") or not cfg.get("use_sliding_window") or cfg.get("sliding_window") is None:
        return {}
    n = need("num_hidden_layers")
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == n:
        first = next((i for i, t in enumerate(types) if t == "sliding_attention"), n)
        if any(t != "sliding_attention" for t in types[first:]):
            raise ValueError(f"{path}: layer_types {types[:8]}...: windowed layers must follow all full-attention "
                             f"ones (expected full layers first, then sliding_attention)")
        k = first
    else:
        k = cfg.get("max_window_layers", n)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"{path}: max_window_layers is {k!r}; expected a non-negative integer")
    if k >= n:  # no layer is windowed
        return {}
    return {"sliding_window": need("sliding_window"), "max_window_layers": k}


def config_metadata(cfg: dict, path: Path) -> dict:
    """Typed APR keys (spec 5.2, one spelling each) from a Hugging Face config.json."""
    model_type = cfg.get("model_type")
    if model_type not in HF_ARCHITECTURES:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported (expected one of "
                         f"{', '.join(HF_ARCHITECTURES)})")

    def need(key: str) -> int:
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{path}: {key} is {value!r}; expected a positive integer")
        return value

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    meta = {
        "architecture": model_type,
        "hf_architecture": (cfg.get("architectures") or [HF_ARCHITECTURES[model_type]])[0],
        "hf_model_type": model_type,
        "model_type": model_type,
        "hidden_size": hidden,
        "num_layers": need("num_hidden_layers"),
        "num_heads": heads,
        "num_kv_heads": cfg.get("num_key_value_heads") or heads,
        "vocab_size": need("vocab_size"),
        "intermediate_size": need("intermediate_size"),
        "max_position_embeddings": cfg.get("max_position_embeddings"),
        "rope_theta": float(theta),
        "rope_type": 2,  # Hugging Face rows: split-half rotation (rotate_half)
        "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "head_dim": cfg.get("head_dim") or hidden // heads,
    }
    meta.update(_window_keys(cfg, model_type, path, need))
    if meta["hf_architecture"].endswith("ForSequenceClassification"):  # a reward model / classifier: its labels
        labels = cfg.get("id2label") or {}
        meta["num_labels"] = len(labels) if labels else need("num_labels")
    if kind not in (None, "default"):
        from apr_kernels.model.rope import SUPPORTED_SCALING

        if kind not in SUPPORTED_SCALING:
            warn(f"{path}: RoPE scaling {kind!r} is carried as the custom key 'rope_scaling', but the "
                 f"trainer supports only {', '.join(SUPPORTED_SCALING)} and will refuse this file")
        meta["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    return meta


# torch dtype -> APR dtype, for PyTorch pickles (others are refused)
_TORCH_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int32": "I32",
                 "int64": "I64", "int8": "I8", "uint8": "U8"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def torch_state_dict(path: Path) -> dict:
    import pickle

    import torch

    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # the legacy (non-zip) format cannot be mapped: read it whole
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{path}: refused: not plain tensors (torch.load weights_only: {first[:200]})") from None
    except Exception as exc:  # a truncated zip, not a pickle at all, ...: one line naming the file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {first[:200]})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}; expected a state dict (tensor name -> tensor)")
    return obj


def read_torch_pickles(files: list[Path]) -> tuple[dict[str, LazyTensor], list]:
    """Lazy tensors of PyTorch state-dict pickles (names unique across shards), and the loaded dicts."""
    import torch

    tensors: dict[str, LazyTensor] = {}
    where_from: dict[str, Path] = {}
    loaded = []
    for path in files:
        state = torch_state_dict(path)
        loaded.append(state)
        for name, t in state.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor):
                raise ValueError(f"{path}: entry {name!r} is a {type(t).__name__}; expected tensors by name only")
            if name in tensors:
                raise ValueError(f"{path}: tensor {name!r} is also in {where_from[name]} (expected each tensor "
                                 "in exactly one shard)")
            dtype = _TORCH_DTYPES.get(str(t.dtype).removeprefix("torch."))
            if dtype is None:
                raise ValueError(f"{path}: tensor {name!r} has dtype {t.dtype}; expected one of "
                                 f"{', '.join(_TORCH_DTYPES)}")
            tensors[name] = LazyTensor(dtype, tuple(t.shape), lambda t=t: t.contiguous())
            where_from[name] = path
    return tensors, loaded


def read_hf(src: Path) -> Source:
    """A Hugging Face folder or a single .safetensors / PyTorch pickle file (its folder's config and
    tokenizer are used)."""
    folder = src if src.is_dir() else src.parent
    files = _shard_files(src) if src.is_dir() else [src]
    if files[0].suffix.lower() in PICKLE_SUFFIXES:
        tensors, handles = read_torch_pickles(files)
        source_meta, fmt = {}, "pytorch"
    else:
        tensors, source_meta, handles = read_safetensors(files)
        fmt = "safetensors"
    cfg_path = folder / "config.json"
    cfg = _load_json(cfg_path) if cfg_path.is_file() else None
    meta: dict = {"original_format": fmt, "source": str(src.resolve()), "name": src.resolve().name}
    tied = None
    if cfg is not None:
        meta.update(config_metadata(cfg, cfg_path))
        tied = bool(cfg.get("tie_word_embeddings", False))
    else:
        warn(f"{folder}: no config.json; the APR file will have no model dimensions")
    try:
        tok = read_hf_tokenizer(folder, cfg)
    except ValueError as exc:  # an unsupported tokenizer should not block the weights
        warn(f"tokenizer not embedded: {exc}")
        tok = False
    if tok is None:
        warn(f"{folder}: no tokenizer.json or vocab.json + merges.txt; the APR file will have no tokenizer")
    elif tok:
        meta.update(tok)
    if source_meta:
        meta["source_metadata"] = {str(k): str(v) for k, v in source_meta.items()}  # spec 5.4 (PMAT-223)
    return Source(str(src), tensors, meta, tied=tied, closers=[handles.clear])
