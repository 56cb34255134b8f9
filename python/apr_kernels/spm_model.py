"""A SentencePiece ``tokenizer.model`` (protobuf ``ModelProto``) -> APR ``tokenizer.*`` metadata.

Hugging Face folders of Llama 1/2, Mistral 7B and their fine-tunes often carry only this file (or
carry it next to a ``tokenizer.json``). It is read with a minimal protobuf wire-format parser (no
``protobuf`` dependency) that takes the fields a BPE tokenizer needs and skips the rest; the file is
untrusted input, so every length is checked against the bytes that remain.
"""

from __future__ import annotations

import struct
from pathlib import Path

from apr_kernels.tokenizer_spm import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, UNUSED

_MAX_BYTES = 64 << 20  # real models are < 5 MB


def _fields(buf: bytes, where: str):
    """(field number, wire type, value) of one message: ints for varint/fixed, bytes for
    length-delimited."""
    i, n = 0, len(buf)

    def varint() -> int:
        nonlocal i
        shift = value = 0
        while True:
            if i >= n or shift > 63:
                raise ValueError(f"{where}: truncated or malformed varint at byte {i}")
            b = buf[i]
            i += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
            shift += 7

    while i < n:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, wire, varint()
        elif wire == 1:
            if i + 8 > n:
                raise ValueError(f"{where}: truncated 64-bit field {field}")
            yield field, wire, buf[i : i + 8]
            i += 8
        elif wire == 2:
            size = varint()
            if size > n - i:
                raise ValueError(f"{where}: field {field} claims {size} bytes, {n - i} remain")
            yield field, wire, buf[i : i + size]
            i += size
        elif wire == 5:
            if i + 4 > n:
                raise ValueError(f"{where}: truncated 32-bit field {field}")
            yield field, wire, buf[i : i + 4]
            i += 4
        else:
            raise ValueError(f"{where}: unsupported protobuf wire type {wire} (field {field})")


def _varint(v: int) -> bytes:
    v &= (1 << 64) - 1  # negative int32 values are written as 10-byte two's complement
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, value) -> bytes:
    """One protobuf field: bytes/str (length-delimited), float (fixed32), bool/int (varint)."""
    if isinstance(value, (bytes, str)):
        data = value.encode("utf-8") if isinstance(value, str) else value
        return _varint(number << 3 | 2) + _varint(len(data)) + data
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    return _varint(number << 3) + _varint(int(value))


def write_spm_model(pieces: list[str], scores: list[float], types: list[int], *, unk_id: int, bos_id: int,
                    eos_id: int, pad_id: int, add_dummy_prefix: bool, byte_fallback: bool) -> bytes:
    """A SentencePiece BPE ``ModelProto`` (the bytes of a ``tokenizer.model``) with an identity
    normalizer: what :func:`read_spm_model` reads back, and what ``sentencepiece`` loads."""
    body = b"".join(_field(1, _field(1, p) + _field(2, float(s)) + _field(3, t))
                    for p, s, t in zip(pieces, scores, types))
    trainer = b"".join(_field(n, v) for n, v in ((3, 2), (4, len(pieces)), (35, byte_fallback), (40, unk_id),
                                                (41, bos_id), (42, eos_id), (43, pad_id)))
    normalizer = _field(1, "identity") + _field(3, add_dummy_prefix) + _field(4, False) + _field(5, True)
    return body + _field(2, trainer) + _field(3, normalizer)


def _int32(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v  # negative int32 values are 10-byte varints


def read_spm_model(path: str | Path) -> dict:
    """``tokenizer.*`` metadata (model_type ``llama``) of a SentencePiece BPE ``tokenizer.model``."""
    path = Path(path)
    if path.stat().st_size > _MAX_BYTES:
        raise ValueError(f"{path}: {path.stat().st_size} bytes, larger than any SentencePiece model "
                         f"({_MAX_BYTES} at most)")
    buf = path.read_bytes()
    where = f"{path}"
    pieces: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    trainer = {3: 1, 24: 0, 35: 0, 40: 0, 41: 1, 42: 2, 43: -1}  # field -> protobuf defaults
    normalizer = {1: "", 2: b"", 3: 1, 4: 1, 5: 1}
    for field, wire, value in _fields(buf, where):
        if field == 1 and wire == 2:
            piece, score, kind = None, 0.0, NORMAL
            for f, w, v in _fields(value, f"{where}: pieces[{len(pieces)}]"):
                if f == 1 and w == 2:
                    try:
                        piece = v.decode("utf-8")
                    except UnicodeDecodeError:
                        raise ValueError(f"{where}: pieces[{len(pieces)}] is not UTF-8") from None
                elif f == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif f == 3 and w == 0:
                    kind = v
            if piece is None:
                raise ValueError(f"{where}: pieces[{len(pieces)}] has no text")
            if kind not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE):
                raise ValueError(f"{where}: pieces[{len(pieces)}] {piece!r} has unknown type {kind}")
            pieces.append(piece)
            scores.append(score)
            types.append(kind)
        elif field in (2, 3) and wire == 2:
            spec = trainer if field == 2 else normalizer
            for f, w, v in _fields(value, f"{where}: {'trainer_spec' if field == 2 else 'normalizer_spec'}"):
                if f in spec:
                    spec[f] = v.decode("utf-8", "replace") if f == 1 and field == 3 else v
    if not pieces:
        raise ValueError(f"{where}: no pieces (expected a SentencePiece model)")
    if trainer[3] != 2:
        kind = {1: "unigram", 3: "word", 4: "char"}.get(trainer[3], str(trainer[3]))
        raise ValueError(f"{where}: SentencePiece model_type {kind} is not supported (expected bpe, as "
                         "Llama and Mistral tokenizers are)")
    if trainer[24]:
        raise ValueError(f"{where}: treat_whitespace_as_suffix=true is not supported")
    if normalizer[2] or normalizer[4]:
        what = "a precompiled normalization charsmap" if normalizer[2] else "remove_extra_whitespaces=true"
        raise ValueError(f"{where}: normalizer_spec has {what}; only the identity normalizer of Llama-family "
                         "tokenizers is supported")
    if not normalizer[5]:
        raise ValueError(f"{where}: escape_whitespaces=false is not supported")
    meta: dict[str, object] = {
        "tokenizer.model_type": "llama",
        "tokenizer.vocab_size": len(pieces),
        "tokenizer.vocabulary": pieces,
        "tokenizer.scores": scores,
        "tokenizer.token_type": types,
        "tokenizer.add_space_prefix": bool(normalizer[3]),
    }
    for key, field in (("bos", 41), ("eos", 42), ("padding", 43)):
        ident = _int32(trainer[field])
        if 0 <= ident < len(pieces):
            meta[f"tokenizer.{key}_token_id"] = ident
    return meta
