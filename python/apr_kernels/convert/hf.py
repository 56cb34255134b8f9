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
from apr_kernels.model.config import HF_ARCHITECTURES, MOE_FAMILIES

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
    """``sliding_window`` (+ ``max_window_layers``) from a config.json: Mistral's (and Mixtral's) window is
    on every layer; Qwen2/3 use it only with ``use_sliding_window``, on the layers from
    ``max_window_layers`` on (or as ``layer_types`` lists them: full layers first, then windowed ones).
    Transformers' Qwen3-MoE windows every layer (it has no ``max_window_layers``); its Qwen2-MoE windows
    the even-numbered layers below ``max_window_layers`` unless ``layer_types`` says otherwise, which is
    refused unless it comes out as full layers first, then windowed ones."""
    base = MOE_FAMILIES.get(model_type, model_type)
    if base == "mistral":
        return {"sliding_window": need("sliding_window")} if cfg.get("sliding_window") is not None else {}
    if base not in ("qwen2", "qwen3") or not cfg.get("use_sliding_window") or cfg.get("sliding_window") is None:
        return {}
    if model_type == "qwen3_moe":
        return {"sliding_window": need("sliding_window")}
    n = need("num_hidden_layers")
    types = cfg.get("layer_types")
    rule = ""
    if model_type == "qwen2_moe" and not (isinstance(types, list) and len(types) == n):
        k = cfg.get("max_window_layers", 28)  # Qwen2MoeConfig's default
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"{path}: max_window_layers is {k!r}; expected a non-negative integer")
        types = ["sliding_attention" if (i + 1) % 2 and i < k else "full_attention" for i in range(n)]
        rule = (f" (Qwen2-MoE's use_sliding_window with max_window_layers={k} windows the even-numbered layers "
                f"below it)")
    if isinstance(types, list) and len(types) == n:
        first = next((i for i, t in enumerate(types) if t == "sliding_attention"), n)
        if any(t != "sliding_attention" for t in types[first:]):
            raise ValueError(f"{path}: layer_types {types[:8]}...{rule}: windowed layers must follow all "
                             f"full-attention ones (expected full layers first, then sliding_attention)")
        k = first
    else:
        k = cfg.get("max_window_layers", n)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"{path}: max_window_layers is {k!r}; expected a non-negative integer")
    if k >= n:  # no layer is windowed
        return {}
    return {"sliding_window": need("sliding_window"), "max_window_layers": k}


# the expert count's two spellings: Qwen's config.json files say num_experts, Mixtral's (and what
# transformers 5 writes for Qwen3-MoE) num_local_experts
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts")


def _expert_keys(cfg: dict, model_type: str, path: Path, need) -> dict:
    """The mixture-of-experts keys of a qwen2_moe / qwen3_moe / mixtral config.json (Hugging Face's
    defaults for the routing settings it leaves out; the sizes are required). A dense model_type
    with an expert count is refused."""
    given = {k: cfg[k] for k in _EXPERT_COUNT_KEYS if cfg.get(k) is not None}
    if model_type not in MOE_FAMILIES:
        key = next((k for k, v in given.items() if v != 0), None)
        if key is not None:
            raise ValueError(f"{path}: {key} is {cfg[key]!r} but model_type {model_type!r} is a dense family; "
                             f"expected model_type {', '.join(MOE_FAMILIES)} for a mixture-of-experts model "
                             f"(or no {key})")
        return {}
    if not given:
        key = "num_local_experts" if model_type == "mixtral" else "num_experts"
        raise ValueError(f"{path}: {key} is missing; expected the number of experts per layer of a "
                         f"{model_type} (mixture-of-experts) model")
    if len(set(map(repr, given.values()))) > 1:
        raise ValueError(f"{path}: num_experts is {given['num_experts']!r} and num_local_experts is "
                         f"{given['num_local_experts']!r}; expected one expert count")
    count = need(next(iter(given)))
    top_k = need("num_experts_per_tok")
    if top_k > count:
        raise ValueError(f"{path}: num_experts_per_tok is {top_k}, more than the {count} experts; expected at most "
                         f"num_experts")
    coef = cfg.get("router_aux_loss_coef", 0.001)
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not 0 <= coef < float("inf"):
        raise ValueError(f"{path}: router_aux_loss_coef is {coef!r}; expected a finite number >= 0")
    out = {"num_experts": count, "num_experts_per_tok": top_k, "router_aux_loss_coef": float(coef)}
    if model_type == "mixtral":  # one width: the experts are intermediate_size wide (renormalised top-k)
        out["moe_intermediate_size"] = need("intermediate_size")
        noise = cfg.get("router_jitter_noise") or 0.0
        if noise:
            warn(f"{path}: router_jitter_noise={noise} (a training-time perturbation of the router) is not "
                 f"carried; apr_kernels trains without it")
        return out
    out["moe_intermediate_size"] = need("moe_intermediate_size")
    if model_type == "qwen2_moe":
        out["shared_expert_intermediate_size"] = need("shared_expert_intermediate_size")
    norm = cfg.get("norm_topk_prob", False)
    if not isinstance(norm, bool):
        raise ValueError(f"{path}: norm_topk_prob is {norm!r}; expected true or false")
    out["norm_topk_prob"] = norm
    out["decoder_sparse_step"] = need("decoder_sparse_step") if "decoder_sparse_step" in cfg else 1
    dense = cfg.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                              for i in dense):
        raise ValueError(f"{path}: mlp_only_layers is {dense!r}; expected a list of layer indices >= 0")
    out["mlp_only_layers"] = sorted(set(dense))
    return out


def _check_bias(cfg: dict, model_type: str, path: Path) -> None:
    """apr_kernels' models have q/k/v biases only in the Qwen2 families (Qwen2-MoE's as its tensors say,
    ``qkv_bias``): say so at conversion when another family's config has them (the weights convert as they
    are; loading them into a model will refuse)."""
    if model_type not in ("qwen2", "qwen2_moe") and cfg.get("attention_bias"):
        warn(f"{path}: attention_bias is true, but apr_kernels' {model_type} models have no attention biases "
             f"(only qwen2 and qwen2_moe do): the weights convert as they are, but from_apr and the trainer will "
             f"refuse the file")


# The JSON type of each config.json key read here (a key may be absent or null): checked first, so a
# damaged file is refused naming the key rather than failing wherever the value is used.
_INT, _NUMBER, _BOOL, _STR, _OBJECT = "an integer", "a number", "true or false", "a string", "an object"
_STRINGS, _INTS = "an array of strings", "an array of integers"
CONFIG_TYPES = {
    **dict.fromkeys(("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size",
                     "num_key_value_heads", "max_position_embeddings", "head_dim", "sliding_window",
                     "max_window_layers", "num_labels", "num_experts", "num_local_experts", "num_experts_per_tok",
                     "moe_intermediate_size", "shared_expert_intermediate_size", "decoder_sparse_step"), _INT),
    **dict.fromkeys(("rope_theta", "rms_norm_eps", "router_aux_loss_coef", "router_jitter_noise"), _NUMBER),
    **dict.fromkeys(("tie_word_embeddings", "attention_bias", "use_sliding_window", "norm_topk_prob"), _BOOL),
    "model_type": _STR, "architectures": _STRINGS, "layer_types": _STRINGS, "mlp_only_layers": _INTS,
    "rope_scaling": _OBJECT, "rope_parameters": _OBJECT, "id2label": _OBJECT,
}
_ROPE_TYPES = {"rope_theta": _NUMBER, "factor": _NUMBER, "rope_type": _STR, "type": _STR}


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_TYPE_OK = {_INT: _integer, _NUMBER: lambda v: (_integer(v) or isinstance(v, float)) and v == v,
            _BOOL: lambda v: isinstance(v, bool), _STR: lambda v: isinstance(v, str),
            _OBJECT: lambda v: isinstance(v, dict),
            _STRINGS: lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
            _INTS: lambda v: isinstance(v, list) and all(_integer(x) for x in v)}


def check_config_types(cfg: dict, path: Path) -> None:
    """Each key of ``CONFIG_TYPES`` (and of its RoPE object) that is there and not null has its JSON type."""
    for where, table, obj in [("", CONFIG_TYPES, cfg),
                              *((f"{k}.", _ROPE_TYPES, cfg[k]) for k in ("rope_scaling", "rope_parameters")
                                if isinstance(cfg.get(k), dict))]:
        for key, kind in table.items():
            value = obj.get(key)
            if value is not None and not _TYPE_OK[kind](value):
                raise ValueError(f"{path}: {where}{key} is {json.dumps(value)[:80]}; expected {kind}")


def config_metadata(cfg: dict, path: Path) -> dict:
    """Typed APR keys (spec 5.2, one spelling each) from a Hugging Face config.json."""
    check_config_types(cfg, path)
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
    theta = next((t for t in (cfg.get("rope_theta"), rope.get("rope_theta")) if t is not None), 10000.0)
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
        "rms_norm_eps": float(1e-6 if cfg.get("rms_norm_eps") is None else cfg["rms_norm_eps"]),
        "head_dim": cfg.get("head_dim") or hidden // heads,
    }
    meta.update(_window_keys(cfg, model_type, path, need))
    meta.update(_expert_keys(cfg, model_type, path, need))
    _check_bias(cfg, model_type, path)
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
