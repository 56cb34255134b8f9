"""Load, open and save APR v2 model files (zero-copy on CPU; the API mirrors safetensors).

    tensors = apr_kernels.load("model.apr")            # dict of views into one mapping
    with apr_kernels.open("model.apr") as f:           # lazy: nothing is read until asked
        f.metadata, f.config, f.keys(), f.info(name)
        w = f.get_tensor(name)                         # quantised dtypes come back dequantised
        part = f.get_slice(name)[0:128]                # a view of the rows asked for
    apr_kernels.save(tensors, "out.apr", metadata={...})

``open`` also takes safetensors' ``safe_open`` arguments and protocol, so code written for it runs
unchanged: ``open(path, framework="pt", device="cpu")``, ``f.metadata()`` (the metadata is a dict
that returns itself when called), ``f.get_slice(name)`` with ``get_shape()``, ``get_dtype()`` and
indexing.

The C++ core (``apr_kernels._apr_ext``) maps the file MAP_PRIVATE with PROT_READ|PROT_WRITE
(copy-on-write: in-place ops on a loaded tensor change the process's copy, never the file) and
validates the header and the whole tensor index before any tensor is handed out. Every tensor is a
view whose owner keeps the mapping alive, so tensors stay valid after ``close()``; the mapping goes
away when the file is closed and the last tensor has died.

``mmap=False`` (or ``APR_KERNELS_MMAP=0`` in the environment, for every open in the process: the
trainer, converters and tools) reads the whole file into private memory with large parallel preads
instead of mapping it, after the same validation. Use it on network filesystems (NFS, Lustre, EFS),
where a mapping faults pages in 4 KiB at a time and a cold load crawls; tensors are still views (of
that memory), and a file truncated afterwards can no longer SIGBUS.

Errors: a malformed file raises ``apr_kernels.errors.AprFormatError`` (a ValueError) naming the
file, the field or tensor and what was expected; a missing or unreadable file raises OSError.

What validation cannot prevent: if another process truncates the file *after* it was opened, a
later access to a now-missing page of the mapping raises SIGBUS, which kills the process (no
Python exception can catch it). ``open`` checks the size again after parsing and ``verify=True``
reads through pread (a clean error, no SIGBUS), and ``AprFile.check_unchanged()`` re-checks the
size on demand. Never rewrite a mapped file in place; ``save`` always writes a temporary file and
renames it over the target, so replacing a file that is loaded elsewhere is safe.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
from collections.abc import Iterator
from typing import Any

import torch

from . import _apr_ext
from ._format import QUANTIZED, TORCH_DTYPES, LazyTensor, QuantizedTensor, TensorInfo, nbytes_for
from ._save import save, save_bytes
from .errors import AprFormatError

__all__ = ["load", "open", "save", "load_bytes", "save_bytes", "AprFile", "TensorSlice", "TensorInfo", "QuantizedTensor", "LazyTensor",
           "nbytes_for"]

# Tied-embedding placeholders (spec 10.4): a 0-byte lm_head stands for the embedding.
_TIED_SOURCES = {"lm_head.weight": ("model.embed_tokens.weight", "token_embd.weight"),
                 "output.weight": ("token_embd.weight", "model.embed_tokens.weight")}


def mapping_refused(path: str, nbytes: int, reason: str = "Cannot allocate memory") -> OSError:
    """The ENOMEM of a refused file mapping, with what limits it. (The mapping is private and writable,
    so it counts against ``ulimit -v`` and, under strict overcommit, against the commit limit, as
    torch's and safetensors' mappings do.)"""
    return OSError(errno.ENOMEM, f"{reason} mapping {nbytes:,} bytes; a private copy-on-write mapping of the "
                   f"whole file counts against the address-space limit (ulimit -v) and, under strict overcommit "
                   f"(vm.overcommit_memory=2), the commit limit: expected room for the file there", path)


class AprFile:
    """An open APR v2 file: the validated tensor table plus lazily built tensor views.

    Use as a context manager or call ``close()``. Tensors already returned stay valid after close.
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = False, device=None, mmap: bool | None = None):
        self.path = os.fspath(path)
        self.device = _device(device)  # where get_tensor/get_slice put tensors by default
        try:
            self._reader = _apr_ext.Reader(self.path, eager=not _use_mmap(mmap))
        except OSError as exc:
            if exc.errno != errno.ENOMEM:
                raise
            raise mapping_refused(self.path, os.path.getsize(self.path), exc.strerror) from None
        self._metadata: dict | None = None
        self._config = None
        self._entries = self._reader.entries()  # (name, dtype, shape, offset, size, placeholder, code)
        self._index = {e[0]: i for i, e in enumerate(self._entries)}
        self._infos: dict[str, TensorInfo] = {}  # built on demand: load() never needs them
        # The metadata must be a JSON object (spec 5.1). Parsing is deferred to first use (a big
        # tokenizer is ~10 MB of JSON that load() never needs) but the kind is checked now.
        self._meta_bytes = self._reader.metadata_bytes()
        head = self._meta_bytes[:64].lstrip(b" \t\r\n")
        if self._meta_bytes and not head.startswith(b"{"):
            raise AprFormatError(f"{self.path}: metadata is not a JSON object (starts with "
                                 f"{head[:16]!r}); expected '{{...}}' at offset 64")
        if verify:
            try:
                self._reader.verify()
            except BaseException:
                self._reader.close()
                raise

    # -- metadata -----------------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, Any]:
        """The JSON metadata as a dict (duplicate keys: the last one wins, as in aprender). Calling it,
        ``f.metadata()`` as safetensors' ``safe_open`` is used, returns the same dict."""
        if self._metadata is None:
            self._metadata = _Metadata(_parse_metadata(self._meta_bytes, self.path))
        return self._metadata

    @property
    def config(self):
        """Typed model config (``apr_kernels.metadata.AprModelConfig``) from the metadata."""
        if self._config is None:
            from .metadata import AprModelConfig

            self._config = AprModelConfig.from_metadata(self.metadata, path=self.path)
        return self._config

    @property
    def header(self) -> dict[str, Any]:
        """Header facts: magic, version, flags, data_offset, index_sorted, has_footer, ..."""
        r = self._reader
        return {"magic": r.magic, "version": r.version, "flags": r.flags, "data_offset": r.data_offset,
                "file_size": r.file_size, "index_sorted": r.index_sorted,
                "header_crc_present": r.header_crc_present, "has_footer": r.has_footer,
                "footer_crc": r.footer_crc if r.has_footer else None}

    # -- tensor table -------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Tensor names in index order."""
        return list(self._index)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __len__(self) -> int:
        return len(self._index)

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def info(self, name: str) -> TensorInfo:
        info = self._infos.get(name)
        if info is None:
            i = self._index.get(name)
            if i is None:
                raise KeyError(f"{self.path}: no tensor named {name!r} ({len(self)} tensors)")
            info = self._infos[name] = TensorInfo(*self._entries[i][:6])
        return info

    # -- tensors ------------------------------------------------------------------------------
    def get_raw(self, name: str) -> torch.Tensor:
        """The stored bytes of ``name`` as a 1-D uint8 tensor (a view into the mapping)."""
        info = self.info(name)
        return self._reader.view(info.offset, info.nbytes)

    def get_tensor(self, name: str, *, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor ``name``: a zero-copy view on CPU; copied through pinned buffers to CUDA.

        Quantised dtypes (Q4_K, Q6_K, APR_Q4, APR_Q8) are dequantised to ``dtype`` (default
        float32). For plain dtypes ``dtype`` converts (a copy) when it differs. A 0-byte tied
        ``lm_head.weight`` placeholder (spec 10.4) returns the embedding it stands for.
        """
        dev = self.device if device is None else _device(device)
        info = self._resolve(name)
        if dev.type == "cuda":
            from ._cuda_load import to_cuda

            return to_cuda(self, [info.name], dev, dtype=dtype)[info.name]
        t = self._finish(info.name, self._reader.tensor(self._index[info.name]), dtype)
        return t if dev.type == "cpu" else t.to(dev)

    def get_slice(self, name: str) -> "TensorSlice":
        """safetensors' lazy slice: ``get_shape()``, ``get_dtype()``, and ``[...]`` for part of the
        tensor (on CPU a view of the mapping; on CUDA only the part is copied)."""
        return TensorSlice(self, name)

    def tensors(self, *, device=None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """All tensors by name, in index order (what ``load`` returns)."""
        dev = self.device if device is None else _device(device)
        names = list(self._index)
        resolved = [self._resolve(n).name if e[5] else n for n, e in zip(names, self._entries)]
        if dev.type == "cuda":
            from ._cuda_load import to_cuda

            moved = to_cuda(self, sorted(set(resolved)), dev, dtype=dtype)
            return {n: moved[src] for n, src in zip(names, resolved)}
        views = self._reader.tensors()  # one C++ call: typed zero-copy views
        out = {}
        for i, (name, src) in enumerate(zip(names, resolved)):
            t = views[self._index[src]] if src != name else views[i]
            t = self._finish(src, t, dtype)
            out[name] = t if dev.type == "cpu" else t.to(dev)
        return out

    def _finish(self, name: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
        """The C++ view of tensor ``name`` -> the tensor handed out (dequantised/aligned/cast)."""
        entry = self._entries[self._index[name]]
        apr_dtype, shape = entry[1], entry[2]
        if apr_dtype in QUANTIZED:
            from .quant import dequantize

            return dequantize(apr_dtype, shape, t, dtype=dtype or torch.float32)
        tdtype = TORCH_DTYPES[apr_dtype]
        if t.dtype != tdtype:  # misaligned (a non-conforming writer): copy, never a misaligned view
            t = t.clone().view(tdtype).view(shape)
        return t if dtype is None or dtype == tdtype else t.to(dtype)

    def _resolve(self, name: str) -> TensorInfo:
        info = self.info(name)
        if not info.placeholder:
            return info
        for src in _TIED_SOURCES.get(name, ()):
            i = self._index.get(src)
            if i is not None and not self._entries[i][5] and tuple(self._entries[i][2]) == info.shape:
                return self.info(src)
        raise AprFormatError(f"{self.path}: tensor {name!r} is a 0-byte placeholder (shape "
                             f"{list(info.shape)}, dtype {info.dtype}) and no embedding of that shape "
                             f"exists to stand in for it (expected one of {_TIED_SOURCES.get(name, ())})")

    # -- lifetime -----------------------------------------------------------------------------
    def check_unchanged(self) -> None:
        """Raise AprFormatError if the file on disk shrank since it was opened (SIGBUS risk)."""
        size = self._reader.current_size()
        if size < self._reader.file_size:
            raise AprFormatError(f"{self.path}: file shrank from {self._reader.file_size} to {size} "
                                 "bytes after it was opened; expected it unchanged while mapped")

    def verify(self) -> None:
        """Check the footer CRC over the whole file (AprFormatError when missing or wrong)."""
        self._reader.verify()

    @property
    def closed(self) -> bool:
        return self._reader.closed

    def close(self) -> None:
        """Release this handle's reference to the mapping (tensors keep their own)."""
        self._reader.close()

    def __enter__(self) -> "AprFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self)} tensors"
        return f"AprFile({self.path!r}, {state})"


class _Metadata(dict):
    """The metadata dict; calling it returns itself (safetensors' ``f.metadata()``)."""

    def __call__(self) -> dict[str, Any]:
        return self


class TensorSlice:
    """One tensor of an open file, read only in the part indexed (safetensors' ``PySafeSlice``)."""

    def __init__(self, file: AprFile, name: str):
        self._file, self._info = file, file._resolve(name)
        self.name = name

    def get_shape(self) -> list[int]:
        return list(self._info.shape)

    def get_dtype(self) -> str:
        """The stored dtype's name ("F32", "BF16", "Q4_K", ...), as safetensors names its dtypes."""
        return self._info.dtype

    def __getitem__(self, index) -> torch.Tensor:
        part = self._file.get_tensor(self._info.name, device="cpu")[index]  # a view (quantised: dequantised)
        dev = self._file.device
        return part if dev.type == "cpu" else part.to(dev)

    def __repr__(self) -> str:
        return f"TensorSlice({self.name!r}, shape={self.get_shape()}, dtype={self.get_dtype()})"


def open(path: str | os.PathLike, framework: str = "pt", device="cpu", *,  # noqa: A001 (mirrors safe_open)
         verify: bool = False, mmap: bool | None = None) -> AprFile:
    """Open and validate an APR v2 file; ``verify=True`` also checks the footer CRC.

    ``framework`` and ``device`` are safetensors' ``safe_open`` arguments: tensors are torch tensors
    ("pt"), put on ``device`` by ``get_tensor``/``get_slice`` unless those say otherwise.
    ``mmap=False`` reads the file into memory up front instead of mapping it (network filesystems;
    default: ``APR_KERNELS_MMAP``, else True)."""
    if framework not in ("pt", "torch", "pytorch"):
        raise ValueError(f"apr_kernels.open({os.fspath(path)!r}): framework={framework!r} is not supported; "
                         f"expected 'pt' (torch tensors)")
    return AprFile(path, verify=verify, device=device, mmap=mmap)


def load(path: str | os.PathLike, *, device="cpu", verify: bool = False,
         mmap: bool | None = None) -> dict[str, torch.Tensor]:
    """All tensors of an APR v2 file as a dict (like ``safetensors.torch.load_file``).

    On CPU the tensors are zero-copy views of one private mapping (``mmap=False``: of the file read
    into memory); on CUDA they are copied through pinned staging buffers with overlapped
    host-to-device copies. Quantised tensors come back dequantised to float32 (use
    ``open(...).get_raw`` for the blocks).
    """
    with AprFile(path, verify=verify, mmap=mmap) as f:
        return f.tensors(device=device)


STREAM_READ = 16 << 20  # bytes read at a time from a file object given to load_bytes


def load_bytes(data, *, device="cpu", verify: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of the APR v2 file held in ``data``: bytes-like (``safetensors.torch.load``'s
    counterpart), or a binary file object with ``read`` (an fsspec, S3 or HTTP file; a pipe), read
    ``STREAM_READ`` bytes at a time, so memory holds the file once. The bytes go into an anonymous
    memory file, which is then validated and mapped like any file (every check, the same tensors);
    errors name the input ``<bytes>``."""
    fd = os.memfd_create("apr_kernels.load_bytes", os.MFD_CLOEXEC)
    try:
        with builtins.open(fd, "wb", closefd=False) as f:
            if hasattr(data, "read"):
                while block := data.read(STREAM_READ):
                    if not isinstance(block, (bytes, bytearray, memoryview)):
                        raise TypeError(f"apr_kernels.load_bytes: the file object gave {type(block).__name__}; "
                                        f"expected bytes (open it in binary mode)")
                    f.write(block)
            else:
                f.write(data)
        path = f"/proc/self/fd/{fd}"
        try:
            with AprFile(path, verify=verify, mmap=True) as af:
                return af.tensors(device=device)
        except AprFormatError as exc:
            raise AprFormatError(str(exc).replace(path, "<bytes>")) from None
    finally:
        os.close(fd)


MMAP_ENV = "APR_KERNELS_MMAP"


def _use_mmap(mmap: bool | None) -> bool:
    """``mmap`` if given, else the ``APR_KERNELS_MMAP`` switch (default on)."""
    if mmap is not None:
        return bool(mmap)
    value = os.environ.get(MMAP_ENV, "1").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{MMAP_ENV}={value!r}: expected 1 (map files, the default) or 0 (read them into memory)")


def _device(device) -> torch.device:
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(dev)!r} was requested but CUDA is not available "
                           "(torch.cuda.is_available() is False); use device='cpu'")
    return dev


def _parse_metadata(raw: bytes, path: str) -> dict:
    if not raw:
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AprFormatError(f"{path}: metadata is not valid UTF-8 (byte {exc.start} of the JSON at "
                             "offset 64); expected a UTF-8 JSON object") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AprFormatError(f"{path}: metadata is not valid JSON ({exc.msg} at line {exc.lineno} "
                             f"column {exc.colno}); expected a JSON object") from None
    except RecursionError:
        raise AprFormatError(f"{path}: metadata JSON nests too deeply; expected a JSON object") from None
    if not isinstance(meta, dict):
        raise AprFormatError(f"{path}: metadata is a JSON {type(meta).__name__}, expected a JSON object")
    return meta

