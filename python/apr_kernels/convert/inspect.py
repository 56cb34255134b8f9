"""``inspect`` (what is in an APR file) and ``validate`` (is it sound: every reader check + footer CRC)."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import torch

from apr_kernels._format import ALIGNMENT, DTYPE_CODES, FLAG_ROW_MAJOR

FLAG_NAMES = {0x0001: "LZ4_COMPRESSED", 0x0002: "ZSTD_COMPRESSED", 0x0004: "ENCRYPTED", 0x0008: "SIGNED",
              0x0010: "SHARDED", 0x0020: "QUANTIZED", 0x0040: "HAS_FILTERBANK", 0x0080: "HAS_MODEL_CARD",
              0x0100: "STREAMING", 0x0200: "HAS_VOCAB", 0x0400: "LAYOUT_ROW_MAJOR", 0x0800: "LAYOUT_COLUMN_MAJOR"}
_BIG_LISTS = 8  # metadata lists longer than this are summarised


def flag_names(flags: int) -> list[str]:
    return [name for bit, name in FLAG_NAMES.items() if flags & bit] + (
        [f"0x{flags & 0xF000:04X} (reserved)"] if flags & 0xF000 else [])


def _summarise(value):
    if isinstance(value, list) and len(value) > _BIG_LISTS:
        return f"[{len(value)} items: {', '.join(json.dumps(v, ensure_ascii=False) for v in value[:3])}, ...]"
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + f"... ({len(value)} chars)"
    return value


def describe(path: str) -> dict:
    """Everything ``inspect`` shows, as JSON-ready data."""
    import apr_kernels

    with apr_kernels.open(path) as f:
        header = dict(f.header)
        header["magic"] = header["magic"].decode("latin-1")
        header["flag_names"] = flag_names(header["flags"])
        header["tensor_count"] = len(f)
        meta = f.metadata
        config = {k: v for k, v in vars(f.config).items() if v is not None}
        tensors, totals = [], defaultdict(lambda: {"count": 0, "bytes": 0, "elements": 0})
        for name in f.keys():
            info = f.info(name)
            numel = math.prod(info.shape)
            tensors.append({"name": name, "dtype": info.dtype, "shape": list(info.shape), "bytes": info.nbytes,
                            "offset": info.offset, **({"placeholder": True} if info.placeholder else {})})
            t = totals[info.dtype]
            t["count"] += 1
            t["bytes"] += info.nbytes
            t["elements"] += numel
    return {"path": str(path), "header": header, "metadata": meta, "config": config, "tensors": tensors,
            "totals": dict(totals)}


def _span(values: list[int]) -> str:
    """``{0..47}`` for consecutive numbers, else the numbers (shortened past 6)."""
    values = sorted(set(values))
    if len(values) > 1 and values == list(range(values[0], values[-1] + 1)):
        return f"{{{values[0]}..{values[-1]}}}"
    if len(values) == 1:
        return str(values[0])
    shown = ",".join(map(str, values[:6])) + (",..." if len(values) > 6 else "")
    return f"{{{shown}}}"


def grouped_tensors(tensors: list[dict]) -> list[dict]:
    """The tensor table with the names that differ only in their numbers (layers, experts) folded into
    one row per pattern, dtype and shape: ``model.layers.{0..47}.mlp.experts.{0..127}.up_proj.weight``
    with the count and the bytes of all of them. In first-appearance order."""
    groups: dict = {}
    for t in tensors:
        parts = t["name"].split(".")
        numbers = tuple(i for i, p in enumerate(parts) if p.isdigit())
        key = (tuple("#" if p.isdigit() else p for p in parts), t["dtype"], tuple(t["shape"]))
        g = groups.setdefault(key, {"parts": parts, "numbers": numbers, "values": [[] for _ in numbers],
                                    "count": 0, "bytes": 0})
        for slot, i in enumerate(numbers):
            g["values"][slot].append(int(parts[i]))
        g["count"] += 1
        g["bytes"] += t["bytes"]
    out = []
    for (_, dtype, shape), g in groups.items():
        parts = list(g["parts"])
        for slot, i in enumerate(g["numbers"]):
            parts[i] = _span(g["values"][slot])
        out.append({"name": ".".join(parts), "dtype": dtype, "shape": list(shape), "count": g["count"],
                    "bytes": g["bytes"]})
    return out


def format_text(d: dict, group: bool = False) -> str:
    h = d["header"]
    lines = [f"{d['path']}",
             f"  magic {h['magic']!r}  version {h['version'][0]}.{h['version'][1]}  flags 0x{h['flags']:04X} "
             f"({', '.join(h['flag_names']) or 'none'})",
             f"  {h['tensor_count']} tensors  data_offset {h['data_offset']}  file {h['file_size']} bytes  "
             f"index {'sorted' if h['index_sorted'] else 'NOT sorted'}  footer "
             f"{'0x%08X' % h['footer_crc'] if h['has_footer'] else 'absent'}",
             "", "metadata:"]
    for key, value in d["metadata"].items():
        lines.append(f"  {key}: {json.dumps(_summarise(value), ensure_ascii=False)}")
    lines += ["", "model config:"]
    lines += [f"  {k}: {v}" for k, v in d["config"].items()] or ["  (none)"]
    rows = grouped_tensors(d["tensors"]) if group else d["tensors"]
    width = max([len(t["name"]) for t in rows] + [4])
    lines += ["", f"  {'name':<{width}}  {'dtype':<6}  {'shape':<20}  {'bytes':>12}" + ("  count" if group else "")]
    for t in rows:
        shape = "[" + ", ".join(map(str, t["shape"])) + "]"
        extra = f"  {t['count']:>5}" if group else "  (placeholder)" if t.get("placeholder") else ""
        lines.append(f"  {t['name']:<{width}}  {t['dtype']:<6}  {shape:<20}  {t['bytes']:>12,}{extra}")
    lines += ["", "totals by dtype:"]
    for dtype, t in sorted(d["totals"].items()):
        lines.append(f"  {dtype:<6}  {t['count']:>5} tensors  {t['elements']:>14,} elements  {t['bytes']:>14,} bytes")
    all_bytes = sum(t["bytes"] for t in d["totals"].values())
    all_elems = sum(t["elements"] for t in d["totals"].values())
    lines.append(f"  {'all':<6}  {len(d['tensors']):>5} tensors  {all_elems:>14,} elements  {all_bytes:>14,} bytes")
    return "\n".join(lines)


def validate(path: str) -> list[str]:
    """One line per problem (empty: the file is sound). Opening runs the reader's structural checks;
    then the footer CRC, and what aprender's writer checklist (spec 17) asks that a lenient reader
    lets pass: sorted index, header CRC, flags, 64-byte tensor alignment, one spelling per key, the
    metadata `apr run` needs, the weights' dtype codes, finite weights with |mean| <= 100."""
    import apr_kernels
    from apr_kernels.metadata import ALIASES

    try:
        f = apr_kernels.open(path)
    except (ValueError, OSError) as exc:
        return [str(exc)]
    problems: list[str] = []
    with f:
        h = f.header
        if not h["has_footer"]:
            problems.append(f"{path}: no footer CRC (expected a u32 CRC-32 after the last tensor)")
        else:
            try:
                f.verify()
            except ValueError as exc:
                problems.append(str(exc))
        if not h["index_sorted"]:
            problems.append(f"{path}: tensor index is not sorted by name (aprender rejects it)")
        if not h["header_crc_present"]:
            problems.append(f"{path}: header CRC is 0 (aprender verifies it)")
        bad_flags = h["flags"] & 0x080F
        if bad_flags:
            problems.append(f"{path}: flags 0x{bad_flags:04X} ({', '.join(flag_names(bad_flags))}) are set; "
                            "expected no compression/encryption/signature/column-major flags")
        if not h["flags"] & FLAG_ROW_MAJOR:
            problems.append(f"{path}: flag LAYOUT_ROW_MAJOR (0x0400) is not set (expected, spec 17: every "
                            "aprender writer sets it)")
        unaligned = [n for n in f.keys() if f.info(n).offset % ALIGNMENT]  # (absolute offsets)
        if unaligned:
            problems.append(f"{path}: {len(unaligned)} tensor(s) start off a {ALIGNMENT}-byte boundary of the "
                            f"file ({', '.join(map(repr, unaligned[:3]))}); expected every tensor 64-aligned "
                            "(aprender's verify_alignment, spec 9)")
        try:
            meta = f.metadata
        except ValueError as exc:
            return problems + [str(exc)]
        for canon, aliases in ALIASES.items():
            for alias in aliases:
                if alias in meta and canon in meta:
                    problems.append(f"{path}: metadata has both {canon!r} and its alias {alias!r} "
                                    "(realizar drops all metadata; expected one spelling, spec 5.3)")
        try:
            f.config
        except ValueError as exc:
            problems.append(str(exc))
        if any(n.startswith(("model.layers.", "blk.")) for n in f.keys()):  # a language model's file
            problems.extend(_run_metadata(path, meta))
            problems.extend(_model_codes(f, path))
        kind = str(meta.get("tokenizer.model_type", meta.get("tokenizer.model", "bpe"))).lower()
        if meta.get("tokenizer.vocabulary") is not None and kind in ("bpe", "gpt2", "llama"):
            from apr_kernels.tokenizer import Tokenizer

            try:
                Tokenizer.from_metadata(meta, path=path)
            except ValueError as exc:
                problems.append(str(exc))
        for name in f.keys():
            problems.extend(_check_tensor(f, path, name))
    return problems


# what `apr run` needs of a language model's file (spec 5.6, aprender PR #2437), besides a tokenizer
RUN_KEYS = ("architecture", "hidden_size", "num_layers", "num_heads", "vocab_size")


# aprender's dtype codes that realizar reads otherwise (spec 7.2: it decodes them as GGML type ids,
# an unknown id as F32 with a warning), and the legacy codes of APR_Q4/APR_Q8 (spec 7.1)
REALIZAR_READS = {3: "GGML Q4_1", 4: "F32 (an unknown GGML id)", 5: "F32 (an unknown GGML id)",
                  6: "GGML Q5_0", 7: "GGML Q5_1"}
LEGACY_CODES = (8, 9)  # APR_Q4 and APR_Q8 before aprender GH-438
WEIGHT_PREFIXES = ("model.", "lm_head.", "score.", "blk.", "token_embd.", "output.", "output_norm.")


def _model_codes(f, path: str) -> list[str]:
    """The writer checklist's dtype codes (0, 1, 12, 14, 30, 128, 129: spec 17) for the weights of a
    language model (by their Hugging Face or GGUF names; not other tensors, such as the
    ``__training__.*`` state a checkpoint carries)."""
    problems = []
    for name, dtype, *_, code in f._entries:
        if not name.startswith(WEIGHT_PREFIXES):
            continue
        if code in REALIZAR_READS:
            problems.append(f"{path}: tensor {name!r} has dtype code {code} ({dtype}), which realizar reads as "
                            f"{REALIZAR_READS[code]}; expected a model weight in codes 0, 1, 12, 14, 30, 128 or 129 "
                            "(spec 7.2)")
        elif code in LEGACY_CODES:
            problems.append(f"{path}: tensor {name!r} has the legacy dtype code {code} ({dtype}); expected "
                            f"{DTYPE_CODES[dtype]}, its code since aprender GH-438 (spec 7.1)")
    return problems


def _run_metadata(path: str, meta: dict) -> list[str]:
    """The minimum metadata of spec 5.6 (for a language model's file)."""
    from apr_kernels.metadata import ALIASES

    missing = [k for k in RUN_KEYS if k not in meta and not any(a in meta for a in ALIASES.get(k, ()))]
    if not meta.get("tokenizer.vocabulary"):
        missing.append("tokenizer.vocabulary (an embedded tokenizer)")
    if not missing:
        return []
    return [f"{path}: a language model whose metadata lacks {', '.join(missing)}; expected every key `apr run` "
            "needs (spec 5.6)"]


def _check_tensor(f, path: str, name: str) -> list[str]:
    info = f.info(name)
    try:
        t = f.get_tensor(name)
    except (ValueError, RuntimeError) as exc:
        return [f"{path}: tensor {name!r}: {exc}"]
    if not t.is_floating_point() or info.placeholder:
        return []
    bad = (~torch.isfinite(t)).sum().item()
    if bad:
        return [f"{path}: tensor {name!r} ({info.dtype} {list(info.shape)}) has {bad} NaN/Inf values "
                "(expected finite weights)"]
    from apr_kernels.model.loading import MAX_ABS_MEAN  # (preflight's rule; the model code loads lazily)

    mean = float(t.mean(dtype=torch.float32)) if t.numel() else 0.0
    if abs(mean) > MAX_ABS_MEAN:
        return [f"{path}: tensor {name!r} ({info.dtype} {list(info.shape)}) has mean {mean:.6g} (expected "
                f"|mean| <= {MAX_ABS_MEAN:g}, as aprender's validate_tensor_values)"]
    return []
