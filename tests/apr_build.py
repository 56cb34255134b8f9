"""Hand-built APR v2 byte layouts for the loader tests (independent of ``apr_kernels.save``).

``build`` lays a file out exactly as spec sections 1, 6 and 9 describe, with knobs to break each
rule; ``patch_header`` rewrites one header field and re-computes the header CRC, so a test breaks
exactly one rule at a time.
"""

from __future__ import annotations

import json
import struct
import zlib

CODES = {"F32": 0, "F16": 1, "F64": 3, "I32": 4, "I64": 5, "I8": 6, "U8": 7, "Q4_K": 12,
         "Q6_K": 14, "BF16": 30, "APR_Q4": 128, "APR_Q8": 129}

# header field -> (offset, struct format)
FIELDS = {
    "magic": (0, "4s"), "major": (4, "B"), "minor": (5, "B"), "flags": (6, "H"), "tensor_count": (8, "I"),
    "metadata_offset": (12, "Q"), "metadata_size": (20, "I"), "tensor_index_offset": (24, "Q"),
    "data_offset": (32, "Q"), "checksum": (40, "I"),
}


def pad64(n: int) -> int:
    return (n + 63) // 64 * 64


def header_crc(h: bytes) -> int:
    return zlib.crc32(h[:40] + h[44:64])


def entry_bytes(name: bytes, code: int, shape, offset: int, size: int) -> bytes:
    return (struct.pack("<H", len(name)) + name + struct.pack("<BB", code, len(shape))
            + b"".join(struct.pack("<Q", d) for d in shape) + struct.pack("<QQ", offset, size))


def build(tensors, meta=None, *, magic=b"APR\x00", flags=0x0400, sort=True, footer=True,
          pad_index=True, zero_crc=False) -> bytes:
    """tensors: list of (name str|bytes, dtype name or code, shape, data bytes[, size override])."""
    meta_b = meta if isinstance(meta, bytes) else json.dumps(meta if meta is not None else {"model_type": "t"},
                                                              separators=(",", ":")).encode()
    items = []
    for t in tensors:
        name, dtype, shape, data = t[:4]
        size = t[4] if len(t) > 4 else len(data)
        items.append((name.encode() if isinstance(name, str) else name,
                      CODES[dtype] if isinstance(dtype, str) else dtype, tuple(shape), data, size))
    if sort:
        items.sort(key=lambda it: it[0])
    index, off, offsets = b"", 0, []
    for name, code, shape, data, size in items:
        offsets.append(off)
        index += entry_bytes(name, code, shape, off, size)
        off += pad64(len(data))
    index_off = 64 + pad64(len(meta_b))
    data_off = index_off + (pad64(len(index)) if pad_index else len(index))
    h = bytearray(64)
    struct.pack_into("<4sBBHIQIQQ", h, 0, magic, 2, 0, flags, len(items), 64, len(meta_b), index_off, data_off)
    if not zero_crc:
        struct.pack_into("<I", h, 40, header_crc(h))
    out = bytearray(h)
    out += meta_b + bytes(pad64(len(meta_b)) - len(meta_b))
    out += index + bytes(data_off - index_off - len(index))
    for (_n, _c, _s, data, _z), o in zip(items, offsets):
        assert len(out) == data_off + o
        out += data + bytes(pad64(len(data)) - len(data))
    if footer:
        out += struct.pack("<I", zlib.crc32(bytes(out)))
    return bytes(out)


def patch_header(buf: bytes, fix_crc: bool = True, **fields) -> bytes:
    """Rewrite header fields (see FIELDS) and, unless told otherwise, re-seal the header CRC."""
    b = bytearray(buf)
    for name, value in fields.items():
        off, fmt = FIELDS[name]
        struct.pack_into("<" + fmt, b, off, value)
    if fix_crc and "checksum" not in fields:
        struct.pack_into("<I", b, 40, header_crc(bytes(b[:64])))
    return bytes(b)


def read_header(buf: bytes) -> dict:
    return {name: struct.unpack_from("<" + fmt, buf, off)[0] for name, (off, fmt) in FIELDS.items()}


def f32(*values) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)
