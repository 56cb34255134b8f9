"""Hugging Face tokenizer files <-> APR ``tokenizer.*`` metadata.

Byte-level BPE (GPT-2, Qwen2, Llama 3): ``tokenizer.json`` or ``vocab.json`` + ``merges.txt``.
SentencePiece BPE (Llama 1/2, Mistral): a ``tokenizer.json`` whose BPE works on "▁"-for-space text
with byte fallback, or a SentencePiece ``tokenizer.model`` alone. ``tokenizer_config.json`` gives the
special-token names, ``add_bos_token`` and the chat template. Writes a ``tokenizer.json`` +
``tokenizer_config.json`` that ``transformers.AutoTokenizer`` / ``PreTrainedTokenizerFast`` loads.
"""

from __future__ import annotations

import json
from pathlib import Path

from apr_kernels.tokenizer import (CUSTOM_PRE_TYPE, NFC_PRE_TYPES, PRE_PATTERNS, TOKEN_CONTROL, TOKEN_NORMAL,
                                   Tokenizer)
from apr_kernels.tokenizer_spm import BYTE, SPACE, UNKNOWN, UNUSED, SentencePieceTokenizer

from apr_kernels.spm_model import read_spm_model


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def _pre_type(path: Path, pre: dict | None, normalizer: dict | None) -> dict:
    """The ``tokenizer.pre_type`` keys of tokenizer.json's pre-tokenizer (+ normalizer): a named
    type when the regex is one of ours, else "custom" with the regex itself (``tokenizer.pre_pattern``)
    and the normalizer (``tokenizer.normalizer``)."""
    nodes = [pre] if pre else []
    if pre and pre.get("type") == "Sequence":
        nodes = pre.get("pretokenizers") or []
    pattern = None
    for node in nodes:
        if node.get("type") == "Split":
            if pattern is not None:
                raise ValueError(f"{path}: pre_tokenizer has several Split steps; expected one regex before "
                                 f"ByteLevel")
            split = node.get("pattern") or {}
            if "Regex" not in split or node.get("invert") or node.get("behavior", "Isolated") != "Isolated":
                raise ValueError(f"{path}: pre_tokenizer Split {split!r} (behavior {node.get('behavior')!r}, invert "
                                 f"{node.get('invert')!r}) is not supported; expected an Isolated regex split")
            pattern = split["Regex"]
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
            return {"tokenizer.pre_type": name}
    return {"tokenizer.pre_type": CUSTOM_PRE_TYPE, "tokenizer.pre_pattern": pattern,
            **({"tokenizer.normalizer": "NFC"} if norm == "NFC" else {})}


def _nodes(node: dict | None, key: str) -> list[dict]:
    """The steps of a normalizer / pre-tokenizer (a Sequence's list, or the node itself)."""
    if not node:
        return []
    return list(node.get(key) or []) if node.get("type") == "Sequence" else [node]


def _sentencepiece_scheme(path: Path, data: dict) -> tuple[bool, str] | None:
    """(add_space_prefix, ``tokenizer.prepend_scheme``) when tokenizer.json is a SentencePiece-style
    BPE ("▁" for spaces: Llama 1/2, Mistral), None for any other tokenizer."""
    norms = _nodes(data.get("normalizer"), "normalizers")
    pres = _nodes(data.get("pre_tokenizer"), "pretokenizers")
    replaces = any(n.get("type") == "Replace" and (n.get("pattern") or {}).get("String") == " "
                   and n.get("content") == SPACE for n in norms)
    metaspace = [p for p in pres if p.get("type") == "Metaspace"]
    if not replaces and not metaspace:
        return None
    for n in norms:
        if n.get("type") not in ("Prepend", "Replace") or (n.get("type") == "Prepend" and n.get("prepend") != SPACE):
            raise ValueError(f"{path}: normalizer step {n.get('type')!r} is not supported in a SentencePiece-style "
                             "tokenizer (expected Prepend('▁') and Replace(' ', '▁'))")
    if metaspace:
        if len(pres) != 1 or metaspace[0].get("replacement", SPACE) != SPACE:
            raise ValueError(f"{path}: pre_tokenizer {data.get('pre_tokenizer')!r} is not supported (expected "
                             "one Metaspace('▁'))")
        m = metaspace[0]
        if m.get("split", True):
            raise ValueError(f"{path}: pre_tokenizer Metaspace split=true is not supported (expected split=false, "
                             "as Llama and Mistral tokenizers have; a tokenizer.model next to it is read instead)")
        scheme = m.get("prepend_scheme") or ("always" if m.get("add_prefix_space", True) else "never")
        return scheme != "never", f"metaspace_{scheme}"
    if pres:
        raise ValueError(f"{path}: pre_tokenizer {data.get('pre_tokenizer')!r} is not supported in a "
                         "SentencePiece-style tokenizer (expected none or Metaspace)")
    return any(n.get("type") == "Prepend" for n in norms), "always"


def _place_added(pieces: list, types: list, added: list[dict], scores: list | None = None) -> None:
    """Put the added tokens (special, matched literally) at their ids, growing the lists as needed,
    and fill any hole in the id space with an unmatched placeholder."""
    size = max([len(pieces), *(a["id"] + 1 for a in added)])
    for lst, fill in ((pieces, None), (types, TOKEN_CONTROL), (scores, 0.0)):
        if lst is not None:
            lst.extend([fill] * (size - len(lst)))
    for a in added:
        pieces[a["id"]] = a["content"]
        if types[a["id"]] != UNKNOWN:
            types[a["id"]] = TOKEN_CONTROL
    for i, piece in enumerate(pieces):
        if piece is None:
            pieces[i], types[i] = f"<|unused_{i}|>", TOKEN_CONTROL


def _sentencepiece_json(model: dict, vocab: dict, merges: list[str], scheme: tuple[bool, str],
                        added: list[dict]) -> dict:
    """SentencePiece metadata from a tokenizer.json BPE model: each piece's score is minus the index of
    the first merge that makes it (the merges of these files are ordered by SentencePiece score)."""
    size = max([*vocab.values(), *(a["id"] for a in added)]) + 1
    pieces: list[str | None] = [None] * size
    for piece, i in vocab.items():
        pieces[i] = piece
    rank: dict[str, int] = {}
    for k, m in enumerate(merges):
        rank.setdefault(m.replace(" ", "", 1), k)
    types, scores = [TOKEN_NORMAL] * size, [0.0] * size
    for i, piece in enumerate(pieces):
        if piece is None:
            continue
        if model.get("byte_fallback") and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            types[i] = BYTE
        elif piece == model.get("unk_token"):
            types[i] = UNKNOWN
        elif len(piece) > 1 and piece not in rank:
            types[i] = UNUSED  # no merge makes it: BPE never produces it
        scores[i] = -float(rank.get(piece, 0))
    _place_added(pieces, types, added, scores)
    meta: dict[str, object] = {
        "tokenizer.model_type": "llama", "tokenizer.vocab_size": size, "tokenizer.vocabulary": pieces,
        "tokenizer.scores": scores, "tokenizer.token_type": types, "tokenizer.add_space_prefix": scheme[0],
    }
    if scheme[0] and scheme[1] != "always":
        meta["tokenizer.prepend_scheme"] = scheme[1]
    return meta


# Token ids a tokenizer file may use: far above any real vocabulary (Gemma's 262,144), low enough that
# a hostile id cannot make the id-indexed lists allocate gigabytes.
MAX_TOKEN_ID = 1 << 24


def _token_id(value, path: Path, where: str) -> int:
    if isinstance(value, str) and value.isdigit():  # (added_tokens_decoder's keys are id strings)
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_TOKEN_ID:
        raise ValueError(f"{path}: {where} is {json.dumps(value)[:60]}; expected a token id in [0, {MAX_TOKEN_ID})")
    return value


def _checked_tokens(path: Path, model: dict) -> None:
    """tokenizer.json's vocab (string -> id) and merges ("left right" strings or [left, right] pairs),
    type-checked."""
    vocab, merges = model.get("vocab"), model.get("merges")
    if vocab is not None and not isinstance(vocab, dict):
        raise ValueError(f"{path}: model.vocab is {type(vocab).__name__}; expected an object (token -> id)")
    for token, i in (vocab or {}).items():
        _token_id(i, path, f"model.vocab[{token!r:.40}]")
    if merges is not None and not isinstance(merges, list):
        raise ValueError(f"{path}: model.merges is {type(merges).__name__}; expected an array")
    for k, m in enumerate(merges or []):
        if not (isinstance(m, str) and " " in m or isinstance(m, list) and len(m) == 2
                and all(isinstance(x, str) for x in m)):
            raise ValueError(f"{path}: model.merges[{k}] is {json.dumps(m)[:60]}; expected \"left right\" or "
                             "[left, right]")


def _added_tokens(path: Path, where: str, entries) -> list[dict]:
    """tokenizer.json's ``added_tokens`` (an array of {"id", "content"}) or tokenizer_config.json's
    ``added_tokens_decoder`` (an object id -> {"content"}), type-checked, as {"id", "content"}."""
    if entries is None:
        return []
    decoder = where == "added_tokens_decoder"
    if not isinstance(entries, dict if decoder else list):
        raise ValueError(f"{path}: {where} is {type(entries).__name__}; expected "
                         f"{'an object (id -> token)' if decoder else 'an array'}")
    added = []
    for key, entry in entries.items() if decoder else enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise ValueError(f"{path}: {where}[{json.dumps(key)}] is {json.dumps(entry)[:60]}; expected an object "
                             "with a string content")
        entry_id = key if decoder else entry.get("id")
        added.append({"id": _token_id(entry_id, path, f"{where}[{json.dumps(key)}] id"), "content": entry["content"]})
    return added


def read_hf_tokenizer(folder: str | Path, config: dict | None = None) -> dict | None:
    """``tokenizer.*`` metadata from a Hugging Face folder, or None when it holds no tokenizer files.
    A file whose structure is not the schema's (a list where an object belongs, ...) raises a
    ``ValueError`` naming it."""
    folder = Path(folder)
    try:
        return _read_hf_tokenizer(folder, config)
    except (TypeError, AttributeError, KeyError, IndexError) as exc:  # a node deeper than the checked ones
        raise ValueError(f"{folder}: a tokenizer file does not follow Hugging Face's schema ({type(exc).__name__}: "
                         f"{exc}); expected the objects and arrays transformers writes") from None


def _read_hf_tokenizer(folder: Path, config: dict | None) -> dict | None:
    tj, vj, mt = folder / "tokenizer.json", folder / "vocab.json", folder / "merges.txt"
    sp_model = folder / "tokenizer.model"
    tc_path = folder / "tokenizer_config.json"
    tcfg = _load_json(tc_path) if tc_path.is_file() else {}
    if not isinstance(tcfg, dict):
        raise ValueError(f"{tc_path}: holds {type(tcfg).__name__}; expected a JSON object")
    added = _added_tokens(tc_path, "added_tokens_decoder", tcfg.get("added_tokens_decoder"))
    meta = None
    if tj.is_file():
        data = _load_json(tj)
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict):
            raise ValueError(f"{tj}: model is {json.dumps(model)[:60]}; expected an object with type BPE")
        if model.get("type") != "BPE":
            raise ValueError(f"{tj}: model type {model.get('type')!r} is not supported (expected BPE)")
        if model.get("ignore_merges"):
            raise ValueError(f"{tj}: model.ignore_merges=true is not supported")
        _checked_tokens(tj, model)
        added = [*_added_tokens(tj, "added_tokens", data.get("added_tokens")), *added]
        vocab, merges = model.get("vocab") or {}, model.get("merges") or []
        merges = [m if isinstance(m, str) else " ".join(m) for m in merges]  # newer files: [left, right]
        scheme = _sentencepiece_scheme(tj, data)
        if scheme is not None:
            meta = _sentencepiece_json(model, vocab, merges, scheme, added)
        pre_keys = _pre_type(tj, data.get("pre_tokenizer"), data.get("normalizer")) if meta is None else None
    elif vj.is_file() and mt.is_file():
        vocab = _load_json(vj)
        lines = mt.read_text(encoding="utf-8").splitlines()
        merges = [ln for ln in lines if ln and not ln.startswith("#version")]
        pre_keys = {"tokenizer.pre_type": "gpt2"}
    elif sp_model.is_file():
        meta = read_spm_model(sp_model)
        # tokens added on top of the SentencePiece model (chat markers of fine-tunes)
        _place_added(meta["tokenizer.vocabulary"], meta["tokenizer.token_type"], added, meta["tokenizer.scores"])
        meta["tokenizer.vocab_size"] = len(meta["tokenizer.vocabulary"])
    else:
        return None
    if tj.is_file() and "add_bos_token" not in tcfg:  # Llama 3 says it in tokenizer.json only
        tcfg = {**tcfg, "add_bos_token": _template_adds_bos(data.get("post_processor"), tcfg)}
    if meta is not None:
        return _finish(meta, folder, tcfg, config)
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
    _place_added(tokens, types, added)
    meta: dict[str, object] = {
        "tokenizer.model_type": "bpe",
        **pre_keys,
        "tokenizer.vocab_size": size,
        "tokenizer.vocabulary": tokens,
        "tokenizer.merges": merges,
        "tokenizer.token_type": types,
    }
    return _finish(meta, folder, tcfg, config)


def _template_adds_bos(post: dict | None, tcfg: dict) -> bool | None:
    """Whether tokenizer.json's post-processor puts the bos token before a single text (Llama 3's
    TemplateProcessing "<|begin_of_text|> $A"); None when it says nothing either way."""
    steps = _nodes(post, "processors")
    template = next((p for p in steps if p.get("type") == "TemplateProcessing"), None)
    if template is None:
        return None
    single = template.get("single") or []
    first = (single[0] or {}).get("SpecialToken", {}).get("id") if single else None
    bos = tcfg.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    return first is not None and first == bos


def _finish(meta: dict, folder: Path, tcfg: dict, config: dict | None) -> dict:
    """Special-token ids by name, the chat template and ``add_bos_token`` from tokenizer_config.json;
    then the metadata is checked by building the tokenizer."""
    ids: dict[str, int] = {}
    for i, t in enumerate(meta["tokenizer.vocabulary"]):
        ids.setdefault(t, i)

    def special_id(key: str) -> int | None:
        value = tcfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value in ids:
            return ids[value]
        cfg_value = (config or {}).get(f"{key}_id")
        return cfg_value if isinstance(cfg_value, int) else None

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


def _bos_template(tok, vocab_list: list[str]) -> dict | None:
    """The post-processor that puts the bos token first when the tokenizer adds one (as Llama 2/3's
    tokenizer.json do), else None."""
    if not (tok.extra.get("tokenizer.add_bos_token") and tok.bos_id is not None):
        return None
    name = vocab_list[tok.bos_id]
    single = [{"SpecialToken": {"id": name, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]
    return {"type": "TemplateProcessing", "single": single,
            "pair": single + [{"SpecialToken": {"id": name, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {name: {"id": name, "ids": [tok.bos_id], "tokens": [name]}}}


def _sentencepiece_tokenizer_json(tok: SentencePieceTokenizer, added: list[dict]) -> dict:
    """A Llama-style tokenizer.json: BPE over "▁"-for-space text with byte fallback, merges ordered
    by score (what transformers' Llama converter writes)."""
    pieces = tok.pieces
    scheme = tok.prepend_scheme
    # SentencePiece's rule ("always") is the legacy normalizer form; the others are Metaspace's
    metaspace = tok.add_space_prefix and scheme != "always"
    steps = []
    if tok.add_space_prefix and not metaspace:
        steps.append({"type": "Prepend", "prepend": SPACE})
    steps.append({"type": "Replace", "pattern": {"String": " "}, "content": SPACE})
    decoders = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}]
    if tok.add_space_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None if metaspace else {"type": "Sequence", "normalizers": steps},
        "pre_tokenizer": ({"type": "Metaspace", "replacement": SPACE, "split": False,
                           "prepend_scheme": scheme.removeprefix("metaspace_")} if metaspace else None),
        "post_processor": _bos_template(tok, pieces),
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": pieces[tok.unk_id] if tok.unk_id is not None else None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": True, "ignore_merges": False,
                  "vocab": {p: i for i, p in enumerate(pieces)},
                  "merges": [f"{a} {b}" for a, b in tok.merges()]},
    }


def hf_tokenizer_files(tok: Tokenizer | SentencePieceTokenizer) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) contents for ``tok``."""
    meta = tok.to_metadata()
    vocab_list = meta["tokenizer.vocabulary"]
    special = set(tok.special_tokens.values())
    added = [{"id": i, "content": vocab_list[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i in sorted(special)]
    if isinstance(tok, SentencePieceTokenizer):
        return _sentencepiece_tokenizer_json(tok, added), _tokenizer_config(tok, vocab_list, special)
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
        "post_processor": _bos_template(tok, vocab_list),
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(vocab_list) if i not in special},
                  "merges": meta["tokenizer.merges"]},
    }
    return tj, _tokenizer_config(tok, vocab_list, special)


def _tokenizer_config(tok, vocab_list: list[str], special: set[int]) -> dict:
    names = {i: vocab_list[i] for i in special}
    tcfg: dict[str, object] = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for attr, key in (("bos_id", "bos_token"), ("eos_id", "eos_token"), ("pad_id", "pad_token")):
        i = getattr(tok, attr)
        if i is not None:
            tcfg[key] = names.get(i, vocab_list[i])
    for key in ("chat_template", "add_bos_token"):
        if f"tokenizer.{key}" in tok.extra:
            tcfg[key] = tok.extra[f"tokenizer.{key}"]
    return tcfg


def write_hf_tokenizer(tok: Tokenizer, folder: str | Path) -> None:
    """tokenizer.json and tokenizer_config.json, and for a SentencePiece tokenizer its
    ``tokenizer.model`` too where that format holds it exactly (as Llama and Mistral folders carry one:
    slow tokenizers and llama.cpp's converter read it)."""
    folder = Path(folder)
    tj, tcfg = hf_tokenizer_files(tok)
    (folder / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(tcfg, ensure_ascii=False, indent=2), encoding="utf-8")
    proto = tok.model_proto() if isinstance(tok, SentencePieceTokenizer) else None
    if proto is not None:
        (folder / "tokenizer.model").write_bytes(proto)
