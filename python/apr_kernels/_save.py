"""``save``: the APR v2 writer (spec section 17, the writer checklist), atomic and streaming.

Layout written (spec sections 1 and 9): 64-byte header (magic ``APR\\0``, version 2.0, flags 0x0400
LAYOUT_ROW_MAJOR, header CRC over [0,40)+[44,64)), compact UTF-8 JSON metadata zero-padded to 64,
the binary tensor index sorted by UTF-8 byte order and padded to 64, each tensor's bytes padded to
64, then a u32 CRC-32 of everything before it.

Atomic: the bytes go to a temporary file in the target's folder, which is fsynced and renamed over
the target (then the folder is fsynced). On any error the temporary file is removed and the target
is untouched. Streaming: tensors are written one at a time straight from their memory (a
non-contiguous or non-CPU tensor is copied one tensor at a time); ``LazyTensor`` values are
materialised one at a time, so peak extra memory is one tensor, not the model, and a ``LazyTensor``
with ``chunks`` is written piece by piece (peak: one piece).
"""

from __future__ import annotations

import builtins
import io
import json
import os
import struct
import sys
import tempfile
from collections.abc import Mapping

import torch

from . import _apr_ext
from ._format import (ALIGNMENT, APR_DTYPE_OF, DTYPE_CODES, FLAG_ROW_MAJOR, HEADER_SIZE, MAGIC,
                      MAX_NAME_LEN, MAX_NDIM, LazyTensor, QuantizedTensor, align64, nbytes_for)

_ZEROS = bytes(ALIGNMENT)


def save(tensors: Mapping, path: str | os.PathLike, *, metadata: Mapping | None = None) -> None:
    """Write ``tensors`` (name -> Tensor | QuantizedTensor | LazyTensor) as an APR v2 file.

    ``metadata`` is the JSON object of spec section 5: typed keys are written in aprender's order
    under their canonical names (HF aliases such as ``num_hidden_layers`` are renamed), custom keys
    follow in the given order. ``model_type``, ``license``, ``data_source``, ``data_license``,
    ``total_size`` and ``param_count`` are always written (defaults: "", null, null, null, the sum
    of tensor bytes, the sum of element counts).
    """
    path = os.fspath(path)
    _write_atomically(path, *_layout(tensors, metadata, path))


def save_bytes(tensors: Mapping, *, metadata: Mapping | None = None) -> bytes:
    """``save`` into memory: the bytes of the APR v2 file (``safetensors.torch.save``'s counterpart)."""
    buf = io.BytesIO()
    _write_stream(buf, "<bytes>", *_layout(tensors, metadata, "<bytes>"))
    return buf.getvalue()


def _layout(tensors: Mapping, metadata: Mapping | None, path: str):
    """(header, metadata bytes, index, entries) of the file ``tensors`` and ``metadata`` make."""
    if sys.byteorder != "little":
        raise RuntimeError("APR v2 is little-endian; saving on a big-endian host is not supported")
    if not isinstance(tensors, Mapping):
        raise TypeError(f"save({path!r}): tensors must be a mapping of name -> tensor, got {type(tensors).__name__}")
    entries = sorted((_entry(path, name, value) for name, value in tensors.items()), key=lambda e: e[0])

    from .metadata import canonical_metadata

    meta = canonical_metadata(metadata or {}, path=path,
                              total_size=sum(e[3] for e in entries),
                              param_count=sum(_numel(e[2]) for e in entries))
    meta_bytes = json.dumps(meta, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    if len(meta_bytes) >= 1 << 32:
        raise ValueError(f"save({path!r}): metadata is {len(meta_bytes)} bytes; the format allows < 4 GiB")

    index = bytearray()
    offset = 0
    for name_b, dtype, shape, nbytes, _value in entries:
        index += struct.pack("<H", len(name_b)) + name_b
        index += struct.pack(f"<BB{len(shape)}QQQ", DTYPE_CODES[dtype], len(shape), *shape, offset, nbytes)
        offset += align64(nbytes)
    index_offset = HEADER_SIZE + align64(len(meta_bytes))
    data_offset = index_offset + align64(len(index))

    header = bytearray(HEADER_SIZE)
    struct.pack_into("<4sBBHIQIQQ", header, 0, MAGIC, 2, 0, FLAG_ROW_MAJOR, len(entries), HEADER_SIZE,
                     len(meta_bytes), index_offset, data_offset)
    struct.pack_into("<I", header, 40, _crc(bytes(header[:40]) + bytes(header[44:])))
    return header, meta_bytes, bytes(index), entries


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _entry(path: str, name, value):
    """(utf-8 name, APR dtype, shape, nbytes, value) with every check that can be made up front."""
    where = f"save({path!r}): tensor {name!r}"
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: names must be non-empty strings")
    name_b = name.encode("utf-8")
    if len(name_b) > MAX_NAME_LEN:
        raise ValueError(f"{where}: name is {len(name_b)} UTF-8 bytes, the format allows at most {MAX_NAME_LEN}")
    if isinstance(value, (QuantizedTensor, LazyTensor)):
        dtype, shape = value.dtype, tuple(value.shape)
    elif isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise ValueError(f"{where}: {value.layout} tensors cannot be saved; call .to_dense() first")
        dtype = APR_DTYPE_OF.get(value.dtype)
        if dtype is None:
            raise ValueError(f"{where}: torch dtype {value.dtype} has no APR dtype; expected one of "
                             f"{', '.join(str(d) for d in APR_DTYPE_OF)} (or a QuantizedTensor)")
        shape = tuple(value.shape)
    else:
        raise TypeError(f"{where}: expected a torch.Tensor, QuantizedTensor or LazyTensor, got {type(value).__name__}")
    if len(shape) > MAX_NDIM:
        raise ValueError(f"{where}: {len(shape)} dims, the format allows at most {MAX_NDIM}")
    return name_b, dtype, shape, nbytes_for(dtype, shape), value


def _tensor_bytes(path: str, name: str, dtype: str, shape, value) -> torch.Tensor:
    """The stored bytes of one value as a contiguous 1-D uint8 CPU tensor."""
    where = f"save({path!r}): tensor {name!r}"
    if isinstance(value, LazyTensor):
        value = value.materialize()
        got = value.dtype if isinstance(value, QuantizedTensor) else APR_DTYPE_OF.get(getattr(value, "dtype", None))
        if not isinstance(value, (torch.Tensor, QuantizedTensor)) or got != dtype or tuple(value.shape) != tuple(shape):
            raise ValueError(f"{where}: LazyTensor declared {dtype} {list(shape)} but materialize() returned "
                             f"{got or type(value).__name__} {list(getattr(value, 'shape', ()))}")
    if isinstance(value, QuantizedTensor):
        data = value.data
    else:
        data = value.detach().cpu().contiguous().reshape(-1)  # one tensor at a time
        return data.view(torch.uint8) if data.dtype != torch.uint8 else data
    return data.cpu().contiguous()


def _write_stream(f, path: str, header, meta_bytes: bytes, index: bytes, entries) -> None:
    """The file's bytes into the binary file object ``f``, tensor by tensor, then the footer CRC."""
    crc = 0

    def put(buf) -> None:
        nonlocal crc
        f.write(buf)
        crc = _crc(buf, crc)

    put(bytes(header))
    put(meta_bytes + _ZEROS[: align64(len(meta_bytes)) - len(meta_bytes)])
    put(index + _ZEROS[: align64(len(index)) - len(index)])
    for name_b, dtype, shape, nbytes, value in entries:
        if isinstance(value, LazyTensor) and value.chunks is not None:
            written = 0
            for piece in value.chunks():
                put(piece)
                written += memoryview(piece).nbytes
            if written != nbytes:
                raise ValueError(f"save({path!r}): tensor {name_b.decode()!r}: chunks() gave {written} "
                                 f"bytes, expected {nbytes} ({dtype} {list(shape)})")
            put(_ZEROS[: align64(nbytes) - nbytes])
            continue
        data = _tensor_bytes(path, name_b.decode(), dtype, shape, value)
        if data.numel() != nbytes:  # cannot happen for checked inputs; guards the layout
            raise ValueError(f"save({path!r}): tensor {name_b.decode()!r} produced {data.numel()} "
                             f"bytes, expected {nbytes}")
        if nbytes:
            put(data.numpy())
        del data, value  # streaming: drop each materialised tensor before the next
        put(_ZEROS[: align64(nbytes) - nbytes])
    f.write(struct.pack("<I", crc))


def _write_atomically(path: str, header, meta_bytes: bytes, index: bytes, entries) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a saved model should look like any new file
        with builtins.open(fd, "wb", buffering=1 << 20, closefd=False) as f:
            _write_stream(f, path, header, meta_bytes, index, entries)
            f.flush()
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _crc(buf, value: int = 0) -> int:
    return _apr_ext.crc32(buf, value)  # any C-contiguous bytes-like object or 1-D uint8 array
