"""Hugging Face tokenizer files <-> APR ``tokenizer.*`` metadata (byte-level BPE only).

Reads ``tokenizer.json`` (or ``vocab.json`` + ``merges.txt``) plus ``tokenizer_config.json`` for the
special-token names and chat template; writes a ``tokenizer.json`` + ``tokenizer_config.json`` that
``transformers.AutoTokenizer`` / ``PreTrainedTokenizerFast`` loads.
"""

from __future__ import annotations

import json
from pathlib import Path

from apr_kernels.tokenizer import (NFC_PRE_TYPES, PRE_PATTERNS, TOKEN_CONTROL, TOKEN_NORMAL,
                                   Tokenizer)


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def _pre_type(path: Path, pre: dict | None, normalizer: dict | None) -> str:
    """Map the pre-tokenizer (+ normalizer) of tokenizer.json to a `tokenizer.pre_type` name."""
    nodes = [pre] if pre else []
    if pre and pre.get("type") == "Sequence":
        nodes = pre.get("pretokenizers") or []
    pattern = None
    for node in nodes:
        if node.get("type") == "Split":
            pattern = (node.get("pattern") or {}).get("Regex")
        elif node.get("type") == "ByteLevel":
            if node.get("add_prefix_space"):
                raise ValueError(f"{path}: pre_tokenizer ByteLevel add_prefix_space=true is not supported")
            if node.get("use_regex", True) and pattern is None:
                pattern = PRE_PATTERNS["gpt2"]
        else:
            raise ValueError(f"{path}: pre_tokenizer {node.get('type')!r} is not supported "
                             "(expected ByteLevel, optionally after a Split regex)")
    if pattern is None:
        raise ValueError(f"{path}: pre_tokenizer has no ByteLevel step (expected a byte-level BPE)")
    norm = (normalizer or {}).get("type")
    if norm not in (None, "NFC"):
        raise ValueError(f"{path}: normalizer {norm!r} is not supported (expected none or NFC)")
    for name in ("qwen2", "llama-bpe", "gpt2"):
        if PRE_PATTERNS[name] == pattern and (norm == "NFC") == (name in NFC_PRE_TYPES):
            return name
    raise ValueError(f"{path}: pre-tokenizer regex {pattern!r} with normalizer {norm} matches no supported "
                     f"pre_type ({sorted(PRE_PATTERNS)})")


def read_hf_tokenizer(folder: str | Path, config: dict | None = None) -> dict | None:
    """``tokenizer.*`` metadata from a Hugging Face folder, or None when it holds no tokenizer files."""
    folder = Path(folder)
    tj, vj, mt = folder / "tokenizer.json", folder / "vocab.json", folder / "merges.txt"
    added: list[dict] = []
    if tj.is_file():
        data = _load_json(tj)
        model = data.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"{tj}: model type {model.get('type')!r} is not supported (expected BPE)")
        if model.get("ignore_merges"):
            raise ValueError(f"{tj}: model.ignore_merges=true is not supported")
        vocab, merges = model.get("vocab") or {}, model.get("merges") or []
        merges = [m if isinstance(m, str) else " ".join(m) for m in merges]  # newer files: [left, right]
        added = data.get("added_tokens") or []
        pre_type = _pre_type(tj, data.get("pre_tokenizer"), data.get("normalizer"))
    elif vj.is_file() and mt.is_file():
        vocab = _load_json(vj)
        lines = mt.read_text(encoding="utf-8").splitlines()
        merges = [ln for ln in lines if ln and not ln.startswith("#version")]
        pre_type = "gpt2"
    else:
        return None
    tc_path = folder / "tokenizer_config.json"
    tcfg = _load_json(tc_path) if tc_path.is_file() else {}
    for tid, entry in (tcfg.get("added_tokens_decoder") or {}).items():
        added.append({"id": int(tid), "content": entry["content"]})
    size = max([*vocab.values(), *(a["id"] for a in added)]) + 1
    tokens: list[str | None] = [None] * size
    types = [TOKEN_NORMAL] * size
    for tok, i in vocab.items():
        tokens[i] = tok
    # vocab.json/model.vocab entries that no merge produces (e.g. GPT-2's <|endoftext|>) are added
    # tokens too: matched literally, never produced by BPE
    produced = {m.replace(" ", "", 1) for m in merges}
    for tok, i in vocab.items():
        if len(tok) > 1 and tok not in produced:
            types[i] = TOKEN_CONTROL
    for a in added:
        tokens[a["id"]] = a["content"]
        types[a["id"]] = TOKEN_CONTROL
    for i, t in enumerate(tokens):
        if t is None:  # a hole in the id space: an unmatched placeholder
            tokens[i], types[i] = f"<|unused_{i}|>", TOKEN_CONTROL
    ids = {t: i for i, t in enumerate(tokens)}

    def special_id(key: str) -> int | None:
        value = tcfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value in ids:
            return ids[value]
        cfg_value = (config or {}).get(f"{key}_id")
        return cfg_value if isinstance(cfg_value, int) else None

    meta: dict[str, object] = {
        "tokenizer.model_type": "bpe",
        "tokenizer.pre_type": pre_type,
        "tokenizer.vocab_size": size,
        "tokenizer.vocabulary": tokens,
        "tokenizer.merges": merges,
        "tokenizer.token_type": types,
    }
    for key, name in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "padding")):
        value = special_id(key)
        if value is not None:
            meta[f"tokenizer.{name}_token_id"] = value
    if isinstance(tcfg.get("chat_template"), str):
        meta["tokenizer.chat_template"] = tcfg["chat_template"]
    if isinstance(tcfg.get("add_bos_token"), bool):
        meta["tokenizer.add_bos_token"] = tcfg["add_bos_token"]
    Tokenizer.from_metadata(meta, path=folder)  # fail now, with the folder's name, if unusable
    return meta


def hf_tokenizer_files(tok: Tokenizer) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) contents for ``tok``."""
    meta = tok.to_metadata()
    vocab_list = meta["tokenizer.vocabulary"]
    special = set(tok.special_tokens.values())
    added = [{"id": i, "content": vocab_list[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i in sorted(special)]
    tj = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"} if tok.nfc else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(vocab_list) if i not in special},
                  "merges": meta["tokenizer.merges"]},
    }
    names = {i: vocab_list[i] for i in special}
    tcfg: dict[str, object] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for attr, key in (("bos_id", "bos_token"), ("eos_id", "eos_token"), ("pad_id", "pad_token")):
        i = getattr(tok, attr)
        if i is not None:
            tcfg[key] = names.get(i, vocab_list[i])
    if "tokenizer.chat_template" in tok.extra:
        tcfg["chat_template"] = tok.extra["tokenizer.chat_template"]
    return tj, tcfg


def write_hf_tokenizer(tok: Tokenizer, folder: str | Path) -> None:
    folder = Path(folder)
    tj, tcfg = hf_tokenizer_files(tok)
    (folder / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg, ensure_ascii=False, indent=2), encoding="utf-8")
