"""SentencePiece BPE tokenizers (Llama 1/2, Mistral 7B, TinyLlama, Code Llama) <-> APR metadata.

The ``tokenizer.*`` keys (spec 5.5) of such a file: ``tokenizer.model_type`` ``"llama"`` (the name
GGUF and llama.cpp use), ``tokenizer.vocabulary`` (the pieces, with U+2581 "▁" for a space and
``<0xAB>`` byte pieces), ``tokenizer.scores`` (one float per piece), ``tokenizer.token_type`` (GGUF's
codes: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte) and
``tokenizer.add_space_prefix`` (SentencePiece's ``add_dummy_prefix``, default true).

Encoding is SentencePiece's BPE (also llama.cpp's and Hugging Face's for these tokenizers): spaces
become "▁", a "▁" is put before the text, the text is split into characters, and the adjacent pair
whose concatenation is a piece with the highest score is merged (leftmost first on ties) until no
pair is a piece; a symbol left that is not a piece becomes its UTF-8 bytes as byte pieces (byte
fallback) or the unknown id. Special tokens written in the text (``<s>``) are matched literally
when asked, and every text segment that starts the input or follows one gets the "▁" prefix
(llama.cpp, and Hugging Face's ``legacy`` Llama tokenizer that these models ship with).

Engines: the ``sentencepiece`` library (C++, about 4x faster) encodes the segments when it is
installed and the tokenizer is one it runs exactly (the "always" prefix rule, an unknown piece, no
user-defined pieces, unique pieces); it is given a model file written from these keys
(``spm_model.write_spm_model``). Otherwise, and for ``encode_with_offsets``, the same algorithm
runs in Python. ``NATIVE = False`` (module attribute) forces the Python engine.
"""

from __future__ import annotations

import hashlib
import heapq
import re
from pathlib import Path
from typing import Iterable, Mapping

from apr_kernels.metadata import tokenizer_carried

# GGUF / SentencePiece piece types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # "▁"
MODEL_TYPES = ("llama", "spm", "sentencepiece")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
NATIVE = True  # use the sentencepiece library when it can run the tokenizer exactly


def checked_ids(ids: Iterable[int], n: int) -> list[int]:
    """``ids`` as ints, each in ``[0, n)`` (ValueError naming the first that is not)."""
    ids = [int(i) for i in ids]
    bad = next((i for i in ids if not 0 <= i < n), None)
    if bad is not None:
        raise ValueError(f"tokenizer: token id {bad} is outside the vocabulary (expected 0 <= id < {n})")
    return ids


class SentencePieceTokenizer:
    """A SentencePiece BPE tokenizer with byte fallback (same interface as ``Tokenizer``)."""

    model_type = "llama"
    uses_tiktoken = False

    def __init__(self, pieces: list[str], scores: list[float], types: list[int], *,
                 bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None,
                 add_space_prefix: bool = True, prepend_first_only: bool = False,
                 metaspace: bool = False, extra: Mapping[str, object] | None = None,
                 where: str = "tokenizer"):
        """``add_space_prefix``: put "▁" before every text segment that starts the input or follows a
        special token; with ``prepend_first_only`` before the start of the input only. ``metaspace``:
        Hugging Face's ``Metaspace`` pre-tokenizer rule (transformers 4.40+ Llama tokenizers): no "▁"
        before a segment that starts with a space."""
        n = len(pieces)
        if len(scores) != n or len(types) != n:
            raise ValueError(f"{where}: tokenizer.scores ({len(scores)}) and tokenizer.token_type "
                             f"({len(types)}) must have one entry per vocabulary piece ({n})")
        for name, value in (("bos", bos_id), ("eos", eos_id), ("padding", pad_id)):
            if value is not None and not 0 <= value < n:
                raise ValueError(f"{where}: tokenizer.{name}_token_id {value} is outside the vocabulary "
                                 f"(expected 0 <= id < {n})")
        self._pieces = list(pieces)
        self._types = [int(t) for t in types]
        self._scores = [float(s) for s in scores]
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self.add_space_prefix = bool(add_space_prefix)
        self.prepend_first_only = bool(prepend_first_only) and self.add_space_prefix
        self.metaspace = bool(metaspace) and self.add_space_prefix
        self.extra = dict(extra or {})
        # Pieces BPE may produce: (score, id) by text. The first id wins for a duplicated piece.
        self._mergeable: dict[str, tuple[float, int]] = {}
        self._byte_ids: dict[int, int] = {}
        self._special: dict[str, int] = {}
        self.unk_id: int | None = None
        for i, (p, t) in enumerate(zip(self._pieces, self._types)):
            if t in (NORMAL, USER_DEFINED):  # UNUSED pieces are never produced (SentencePiece)
                self._mergeable.setdefault(p, (self._scores[i], i))
            elif t == BYTE:
                m = _BYTE_PIECE.fullmatch(p)
                if m is None:
                    raise ValueError(f"{where}: tokenizer.vocabulary[{i}] {p!r} has type byte (6) but is not "
                                     "of the form <0xAB>")
                self._byte_ids.setdefault(int(m.group(1), 16), i)
            if t in (CONTROL, UNKNOWN, USER_DEFINED):
                self._special.setdefault(p, i)
            if t == UNKNOWN and self.unk_id is None:
                self.unk_id = i
        if len(self._byte_ids) != 256 and self.unk_id is None:
            raise ValueError(f"{where}: the vocabulary has neither all 256 byte pieces <0x00>..<0xFF> nor an "
                             "unknown piece (type 2); some text could not be encoded")
        # Runs of text no piece spans may be encoded separately (exactly the same ids, and cacheable):
        # when no piece has a "▁" after another character, a "▁" that follows a character starts one.
        # (Not finer: a run of "▁" before a word merges by score, so no split inside it is safe.)
        crossing = any(SPACE in p.lstrip(SPACE) for p in self._mergeable)
        self._split = None if crossing else re.compile(f"(?<=[^{SPACE}])(?={SPACE})")
        self._cache: dict[str, tuple[int, ...]] = {}
        self._native_proc = None  # built on first use (_native)
        # the short-run engine is the byte-level module's BPE scan (lowest rank first): ranks = -scores
        from apr_kernels.tokenizer import bpe_split

        self._bpe_split = bpe_split
        self._neg_scores = {p: -score for p, (score, _) in self._mergeable.items()}
        self._special_re = (re.compile("|".join(re.escape(s) for s in sorted(self._special, key=len, reverse=True)))
                            if self._special else None)

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def from_metadata(cls, meta: Mapping[str, object], path: str | Path | None = None) -> "SentencePieceTokenizer":
        where = f"{path}: metadata" if path else "metadata"
        pieces = meta.get("tokenizer.vocabulary")
        if not isinstance(pieces, list) or not pieces or not all(isinstance(p, str) for p in pieces):
            raise ValueError(f"{where}: tokenizer.vocabulary must be a non-empty array of strings")
        scores, types = meta.get("tokenizer.scores"), meta.get("tokenizer.token_type")
        if not isinstance(scores, list) or not all(isinstance(s, (int, float)) and not isinstance(s, bool)
                                                    for s in scores):
            raise ValueError(f"{where}: a SentencePiece tokenizer (tokenizer.model_type "
                             f"{meta.get('tokenizer.model_type', meta.get('tokenizer.model'))!r}) needs "
                             "tokenizer.scores, an array of numbers")
        if types is None:
            types = [NORMAL] * len(pieces)
        if not isinstance(types, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in types):
            raise ValueError(f"{where}: tokenizer.token_type must be an array of integers")

        def _id(key):
            v = meta.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise ValueError(f"{where}: {key} must be an integer, got {v!r}")
            return v

        prefix = meta.get("tokenizer.add_space_prefix", True)
        if not isinstance(prefix, bool):
            raise ValueError(f"{where}: tokenizer.add_space_prefix must be true or false, got {prefix!r}")
        scheme = meta.get("tokenizer.prepend_scheme", "always")
        if scheme not in ("always", "first", "metaspace_always", "metaspace_first"):
            raise ValueError(f"{where}: tokenizer.prepend_scheme {scheme!r} is not supported (expected 'always', "
                             "'first', 'metaspace_always' or 'metaspace_first'; tokenizer.add_space_prefix=false "
                             "for none)")
        extra = tokenizer_carried(meta)  # (chat template, BOS rule, chat format)
        return cls(pieces, scores, types, bos_id=_id("tokenizer.bos_token_id"),
                   eos_id=_id("tokenizer.eos_token_id"), pad_id=_id("tokenizer.padding_token_id"),
                   add_space_prefix=prefix, prepend_first_only=scheme.endswith("first"),
                   metaspace=scheme.startswith("metaspace"), extra=extra, where=where)

    # ---- properties ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def prepend_scheme(self) -> str:
        """``tokenizer.prepend_scheme``: "always" (SentencePiece, llama.cpp, legacy Hugging Face),
        "first", or Hugging Face's Metaspace forms "metaspace_always" / "metaspace_first"."""
        scheme = "first" if self.prepend_first_only else "always"
        return f"metaspace_{scheme}" if self.metaspace else scheme

    @property
    def pieces(self) -> list[str]:
        return list(self._pieces)

    # ---- encode / decode ----------------------------------------------------------------------
    def encode(self, text: str, *, special: bool = True) -> list[int]:
        """Token ids of ``text``, as ``sentencepiece`` (and Hugging Face's Llama tokenizer) give them.
        ``special``: special tokens written in the text (``<s>``, ``</s>``) are recognised."""
        ids, _ = self._encode(text, special, None)
        return ids

    def encode_with_offsets(self, text: str, *, special: bool = True) -> tuple[list[int], list[int]]:
        """Token ids of ``text`` and the offsets in ``text``'s UTF-8 bytes where each token begins, plus
        where the last one ends (``len(ids) + 1`` offsets; the "▁" put before a segment covers no byte
        of the text)."""
        return self._encode(text, special, [])

    def _encode(self, text: str, special: bool, starts: list[int] | None) -> tuple[list[int], list[int] | None]:
        ids: list[int] = []
        pos = 0  # byte offset of the current segment in text
        prefix = self.add_space_prefix
        segments = self._special_re.finditer(text) if (special and self._special_re) else ()
        cursor = 0
        for m in segments:
            pos = self._encode_segment(text[cursor : m.start()], prefix and not (self.prepend_first_only and cursor),
                                       pos, ids, starts)
            ids.append(self._special[m.group()])
            if starts is not None:
                starts.append(pos)
                pos += len(m.group().encode("utf-8"))
            cursor = m.end()
        end = self._encode_segment(text[cursor:], prefix and not (self.prepend_first_only and cursor), pos, ids, starts)
        if starts is not None:
            starts.append(end)
        return ids, starts

    def model_proto(self) -> bytes | None:
        """The bytes of a SentencePiece ``tokenizer.model`` that encodes exactly as this tokenizer, or
        None where that format cannot say what it does (a prefix space only before the first piece,
        Metaspace splitting, user-defined pieces, no unknown piece, a piece twice)."""
        exact = (self.add_space_prefix and not self.prepend_first_only and not self.metaspace
                 and self.unk_id is not None and USER_DEFINED not in self._types
                 and len(set(self._pieces)) == len(self._pieces))
        if not exact:
            return None
        from apr_kernels.spm_model import write_spm_model

        return write_spm_model(self._pieces, self._scores, self._types, unk_id=self.unk_id,
                               bos_id=-1 if self.bos_id is None else self.bos_id,
                               eos_id=-1 if self.eos_id is None else self.eos_id,
                               pad_id=-1 if self.pad_id is None else self.pad_id,
                               add_dummy_prefix=True, byte_fallback=len(self._byte_ids) == 256)

    def _native(self):
        """A ``sentencepiece`` processor that encodes exactly as this tokenizer, or None."""
        if self._native_proc is None:
            self._native_proc = False
            proto = self.model_proto()
            if proto is not None:
                try:
                    import sentencepiece
                except ImportError:
                    return None
                proc = sentencepiece.SentencePieceProcessor()
                try:
                    proc.LoadFromSerializedProto(proto)
                except Exception:  # noqa: BLE001 -- a model it refuses: the Python engine
                    return None
                self._native_proc = proc
        return self._native_proc or None

    def _encode_segment(self, text: str, prefix: bool, pos: int, ids: list[int], starts: list[int] | None) -> int:
        """Encode one segment without special tokens, starting at byte ``pos`` of the input; returns
        the byte offset after it (offsets are tracked only when ``starts`` is a list)."""
        if not text:
            return pos
        if starts is None and prefix and NATIVE and self._native() is not None:
            ids.extend(self._native().encode(text))
            return pos
        prefix = prefix and not (self.metaspace and text.startswith(" "))
        norm = (SPACE if prefix else "") + text.replace(" ", SPACE)
        chunks = self._split.split(norm) if self._split is not None else [norm]
        begin = pos
        pos -= 1 if prefix else 0  # the prefix "▁" stands for a space the text does not have
        for chunk in chunks:
            chunk_ids = self._cache.get(chunk)
            if chunk_ids is None:
                chunk_ids = self._bpe(chunk)
                if len(self._cache) < 1 << 20:
                    self._cache[chunk] = chunk_ids
            if starts is None:
                ids.extend(chunk_ids)
                continue
            for i in chunk_ids:
                ids.append(i)
                starts.append(max(pos, begin))
                pos += len(self.token_bytes(i))  # a "▁" stands for one space byte
        return pos

    def _bpe(self, chunk: str) -> tuple[int, ...]:
        """SentencePiece BPE of one run of text: a linked list of symbols and a heap of the candidate
        merges keyed by (-score, position); stale entries are skipped when popped. O(n log n)."""
        if len(chunk) <= 32:  # a plain scan beats the heap on the short runs most text is
            return self._finish(self._bpe_split(self._neg_scores, chunk))
        sym: list[str | None] = list(chunk)
        n = len(sym)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        table = self._mergeable
        heap: list[tuple[float, int, str]] = []

        def candidate(i: int) -> None:
            j = nxt[i]
            if j >= 0:
                piece = sym[i] + sym[j]
                hit = table.get(piece)
                if hit is not None:
                    heapq.heappush(heap, (-hit[0], i, piece))

        for i in range(n - 1):
            candidate(i)
        while heap:
            _, i, piece = heapq.heappop(heap)
            j = nxt[i]
            if sym[i] is None or j < 0 or sym[i] + sym[j] != piece:
                continue  # stale: one of the two symbols has been merged since
            sym[i] = piece
            sym[j] = None
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                candidate(prv[i])
            candidate(i)
        parts = []
        i = 0
        while i >= 0:
            parts.append(sym[i])
            i = nxt[i]
        return self._finish(parts)

    def _finish(self, parts: list[str]) -> tuple[int, ...]:
        """Ids of the final symbols: pieces, else byte pieces (byte fallback) or the unknown id."""
        table = self._mergeable
        out: list[int] = []
        full_bytes = len(self._byte_ids) == 256
        for s in parts:  # a piece, or a single character no piece holds
            hit = table.get(s)
            if hit is not None:
                out.append(hit[1])
            elif full_bytes:  # byte fallback
                out.extend(self._byte_ids[b] for b in s.encode("utf-8"))
            elif not out or out[-1] != self.unk_id:  # consecutive unknowns fuse into one, as sentencepiece
                out.append(self.unk_id)
        return tuple(out)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for: its text with "▁" as a space, a byte piece's byte, a special
        token's literal text."""
        t, p = self._types[token_id], self._pieces[token_id]
        if t == BYTE:
            return bytes([int(p[3:5], 16)])
        if t in (NORMAL, USER_DEFINED, UNUSED):
            return p.replace(SPACE, " ").encode("utf-8")
        return p.encode("utf-8")

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (Hugging Face's decoding: "▁" -> space, byte pieces fused, the space of the
        prefix removed); byte sequences that are not valid UTF-8 become U+FFFD."""
        ids = checked_ids(ids, len(self._pieces))
        text = b"".join([self.token_bytes(i) for i in ids]).decode("utf-8", errors="replace")
        return text[1:] if self.add_space_prefix and text.startswith(" ") else text

    # ---- metadata -----------------------------------------------------------------------------
    def to_metadata(self) -> dict:
        """The ``tokenizer.*`` keys (spec 5.5) that :meth:`from_metadata`, aprender and llama.cpp read."""
        meta: dict[str, object] = {
            "tokenizer.model_type": self.model_type,
            "tokenizer.vocab_size": self.vocab_size,
            "tokenizer.vocabulary": list(self._pieces),
            "tokenizer.scores": list(self._scores),
            "tokenizer.token_type": list(self._types),
            "tokenizer.add_space_prefix": self.add_space_prefix,
        }
        if self.prepend_first_only or self.metaspace:
            meta["tokenizer.prepend_scheme"] = self.prepend_scheme
        for key, value in (("bos", self.bos_id), ("eos", self.eos_id), ("padding", self.pad_id)):
            if value is not None:
                meta[f"tokenizer.{key}_token_id"] = value
        meta.update(self.extra)
        return meta

    def merges(self) -> list[tuple[str, str]]:
        """Hugging Face BPE merges equivalent to the scores: every split of a piece into two pieces,
        highest score first, on ties the longer left part first (the order transformers' Llama
        converter gives them; it decides how runs of "▁" split)."""
        table = self._mergeable
        merges = []
        for piece, (score, _) in sorted(table.items(), key=lambda kv: kv[1][1]):
            local = [(table[piece[:k]][1], table[piece[k:]][1], piece[:k], piece[k:])
                     for k in range(1, len(piece)) if piece[:k] in table and piece[k:] in table]
            merges.extend((-score, -len(a), -len(b), a, b) for _, _, a, b in sorted(local))
        merges.sort(key=lambda m: m[:3])  # stable: piece order, then the ids of the parts
        return [(a, b) for *_, a, b in merges]

    def fingerprint(self) -> str:
        """A SHA-256 of everything that decides :meth:`encode`'s output (see ``Tokenizer.fingerprint``)."""
        cached = getattr(self, "_fingerprint", None)
        if cached is None:
            h = hashlib.sha256(f"spm\x00{self.add_space_prefix}\x00{self.prepend_scheme}\x00{self.eos_id}\x00"
                               .encode())
            for p, s, t in zip(self._pieces, self._scores, self._types):
                h.update(f"{p}\x00{s!r}\x00{t}\x01".encode())
            cached = self._fingerprint = h.hexdigest()
        return cached

    def __repr__(self) -> str:
        return (f"SentencePieceTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, add_space_prefix={self.add_space_prefix})")
