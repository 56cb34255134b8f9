"""APR v2 constants and the small value types shared by the reader, the writer and quant.py.

The byte layout itself lives in the spec (/shared/spec/APR_V2.md); this module only names it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

import torch

MAGIC = b"APR\x00"
HEADER_SIZE = 64
ALIGNMENT = 64
FLAG_ROW_MAJOR = 0x0400
FLAG_SHARDED = 0x0010  # set with metadata 'sharding' by aprender's with_sharding() (spec 4, 12)
MAX_NAME_LEN = 256
MAX_NDIM = 8

# APR dtype name -> (code written, torch dtype of the stored elements or None for block formats)
DTYPE_CODES: dict[str, int] = {
    "F32": 0, "F16": 1, "F64": 3, "I32": 4, "I64": 5, "I8": 6, "U8": 7,
    "Q4_K": 12, "Q6_K": 14, "BF16": 30, "APR_Q4": 128, "APR_Q8": 129,
}
TORCH_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "I32": torch.int32, "I64": torch.int64, "I8": torch.int8, "U8": torch.uint8,
}
APR_DTYPE_OF: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}
QUANTIZED = frozenset({"Q4_K", "Q6_K", "APR_Q4", "APR_Q8"})
ALL_DTYPES = tuple(DTYPE_CODES)


def align64(n: int) -> int:
    return (n + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def nbytes_for(dtype: str, shape: tuple[int, ...]) -> int:
    """Stored byte size of a tensor of APR ``dtype`` and ``shape`` (spec section 7.1)."""
    n = math.prod(shape)
    if dtype in TORCH_DTYPES:
        return n * TORCH_DTYPES[dtype].itemsize
    if dtype == "APR_Q4":
        return -(-n // 32) * 18
    if dtype == "APR_Q8":
        return 4 + n
    if dtype in ("Q4_K", "Q6_K"):
        # Row-aligned GGML blocks (GH-370): each row of the last dimension starts a new block.
        cols = shape[-1] if shape else 1
        rows = math.prod(shape[:-1])
        return rows * -(-cols // 256) * (144 if dtype == "Q4_K" else 210)
    raise ValueError(f"unknown APR dtype {dtype!r}; expected one of {', '.join(ALL_DTYPES)}")


def _check_dtype_shape(kind: str, dtype: str, shape) -> tuple[int, ...]:
    if dtype not in DTYPE_CODES:
        raise ValueError(f"{kind}: unknown APR dtype {dtype!r}; expected one of {', '.join(ALL_DTYPES)}")
    shape = tuple(int(d) for d in shape)
    if len(shape) > MAX_NDIM or any(d < 0 for d in shape):
        raise ValueError(f"{kind}: shape {shape} must have at most {MAX_NDIM} non-negative dims")
    return shape


@dataclass(frozen=True)
class TensorInfo:
    """One tensor index entry. ``offset`` is the absolute file offset of the tensor's bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    placeholder: bool = False  # 0-byte stand-in for a tied lm_head (spec 10.4)


@dataclass(frozen=True)
class QuantizedTensor:
    """Raw quantised blocks (``data``: 1-D uint8) of a tensor of logical ``shape``.

    ``save`` writes ``data`` as is; ``apr_kernels.quant.dequantize`` turns it back into floats.
    """

    dtype: str
    shape: tuple[int, ...]
    data: torch.Tensor

    def __post_init__(self):
        shape = _check_dtype_shape("QuantizedTensor", self.dtype, self.shape)
        object.__setattr__(self, "shape", shape)
        if not isinstance(self.data, torch.Tensor) or self.data.dtype != torch.uint8 or self.data.dim() != 1:
            raise ValueError("QuantizedTensor: data must be a 1-D torch.uint8 tensor of raw blocks")
        want = nbytes_for(self.dtype, shape)
        if self.data.numel() != want:
            raise ValueError(f"QuantizedTensor: {self.dtype} of shape {shape} needs {want} bytes, "
                             f"got {self.data.numel()}")

    @property
    def nbytes(self) -> int:
        return self.data.numel()


@dataclass(frozen=True)
class LazyTensor:
    """A tensor that ``save`` materialises only when it writes it (one at a time: streaming).

    ``materialize()`` must return a tensor of APR ``dtype`` and ``shape`` (or a QuantizedTensor
    of them). With ``chunks`` (a callable returning an iterable of bytes-like pieces that add up to
    the stored bytes), ``save`` writes the pieces as they come instead: a tensor larger than memory
    (a token stream read back from disk) is never whole in it.
    """

    dtype: str
    shape: tuple[int, ...]
    materialize: Callable[[], Union[torch.Tensor, QuantizedTensor]]
    chunks: Optional[Callable[[], Iterable]] = None

    def __post_init__(self):
        object.__setattr__(self, "shape", _check_dtype_shape("LazyTensor", self.dtype, self.shape))

    @property
    def nbytes(self) -> int:
        return nbytes_for(self.dtype, self.shape)
