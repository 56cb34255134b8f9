"""AdamW with 8-bit optimizer state (``--optimizer adamw8bit``): Dettmers et al., "8-bit Optimizers via
Block-wise Quantization" (ICLR 2022), the optimizer of bitsandbytes' ``AdamW8bit`` and torchao's.

AdamW keeps two fp32 moments per parameter (8 bytes); this one keeps each as one byte per value plus
one fp32 scale per block of 256 values (about 2.03 bytes for both), so a full fine-tune of a 7B model
holds 14 GB of optimizer state instead of 56 GB. The update itself is AdamW's, in fp32:

* each step dequantises a parameter's moments, updates them and the parameter as ``torch.optim.AdamW``
  does (decoupled weight decay, bias correction), and quantises them again;
* quantisation is block-wise: a block's values are divided by its largest magnitude (``absmax``) and
  each is stored as the index of the nearest of 256 code values. The codes are the paper's *dynamic
  tree* map: a decimal exponent from 10^-6 to 10^0 and a linear fraction in (0.1, 1] whose resolution
  grows with the exponent, so small values keep their relative precision (the first moment's map is
  signed; the second moment's, never negative, spends the sign bit on more fractions);
* tensors of fewer than 4096 values (norms, biases, small adapters) keep fp32 moments, as bitsandbytes
  does: they cost nothing and are the most sensitive.

On CUDA (and with ``APR_KERNELS_BACKEND=triton``, in Triton's interpreter on CPU) each 8-bit tensor's
step is one fused kernel (``apr_kernels.kernels.adamw8bit``); the PyTorch code here is its reference
and runs elsewhere.

Checkpoints hold the 8-bit moments as they are (``__training__.adam8.<moment>.codes.<param>``, U8,
and ``...absmax.<param>``, F32), so a resumed run continues exactly: quantising dequantised moments
again would not give the same bytes (the signed map has no -1 code, so a block led by a negative value
shrinks its scale). Not with Muon.

Under FSDP (parameters and gradients are DTensors holding ``torch.chunk`` rows of dim 0 per rank) each
rank keeps the moments of its own rows. The blocks are those of the whole flattened tensor, so a
rank's rows must start on a block boundary: when every rank's share (``ceil(rows / ranks) * columns``
values) is a multiple of 256, its blocks are exactly the whole tensor's (the same codes as one process,
gathered into the same checkpoint tensors); otherwise that tensor keeps fp32 moments, sharded as
AdamW's are (``eight_bit_layout``). Resuming with another number of ranks re-forms what no longer fits.

Under tensor parallelism each rank holds a part of a split parameter (``train/tensor_parallel.py``):
rows (dim 0: column-parallel projections, the vocabulary-split embedding and head) or columns (dim 1:
row-parallel projections). Its moments stay 8-bit where its part's blocks are exactly whole-tensor
blocks: a row split whose part is a whole number of blocks (every part then starts on a boundary),
a column split whose part's rows are (``columns % 256 == 0``: each block lies in one row of one
rank's columns). The codes and scales then gather into one process's (``split_block_views``), so a
split run keeps one process's numbers and checkpoints; other split tensors keep fp32 moments. FSDP
around it shards the part's rows under the rule above.
"""

from __future__ import annotations

import math

import torch

from .distributed import local_part, shard_axis, shard_rows

BLOCK = 256          # values per scale
MIN_8BIT = 4096      # smaller tensors keep fp32 moments


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 sorted code values in [-1, 1] (signed) or [0, 1] of dynamic tree quantisation.

    For each decimal exponent e = 0..6 the codes are the midpoints of an even split of (0.1, 1] into
    2^e (signed) or 2^(e+1) pieces, times 10^(e-6): 127 magnitudes (254 unsigned), their negatives when
    signed, then 0 and 1."""
    values = []
    for e in range(7):
        pieces = 2 ** (e + (0 if signed else 1))
        edges = torch.linspace(0.1, 1.0, pieces + 1, dtype=torch.float64)
        values.append((edges[:-1] + edges[1:]) / 2 * 10.0 ** (e - 6))
    mags = torch.cat(values)
    codes = torch.cat([mags, -mags] if signed else [mags]).tolist() + [0.0, 1.0]
    assert len(codes) == 256
    return torch.tensor(sorted(codes), dtype=torch.float32)


class Blockwise8bit:
    """A tensor stored as uint8 codes into ``qmap`` and one fp32 absmax per ``BLOCK`` values."""

    __slots__ = ("codes", "absmax", "qmap", "shape")

    def __init__(self, x: torch.Tensor, qmap: torch.Tensor):
        self.shape = tuple(x.shape)
        self.qmap = qmap
        self.codes, self.absmax = quantize(x, qmap)

    @classmethod
    def from_parts(cls, codes: torch.Tensor, absmax: torch.Tensor, shape, qmap: torch.Tensor) -> "Blockwise8bit":
        """The stored form itself (a checkpoint's codes and scales); checked against ``shape``."""
        blocks = -(-math.prod(shape) // BLOCK)
        if codes.dtype != torch.uint8 or codes.numel() != blocks * BLOCK or absmax.numel() != blocks:
            raise ValueError(f"8-bit moment of shape {list(shape)}: expected {blocks * BLOCK} uint8 codes and {blocks} "
                             f"block scales, got {codes.numel()} {codes.dtype} codes and {absmax.numel()} scales")
        self = cls.__new__(cls)
        self.shape, self.qmap = tuple(shape), qmap
        self.codes, self.absmax = codes.reshape(-1), absmax.reshape(-1).to(torch.float32)
        return self

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.absmax, self.qmap, self.shape)

    def update(self, x: torch.Tensor) -> None:
        """Store ``x`` (this shape) in place of the held values."""
        self.codes, self.absmax = quantize(x, self.qmap)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + 4 * self.absmax.numel()


def quantize(x: torch.Tensor, qmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [n padded to BLOCK], absmax fp32 [blocks]) of ``x``: each value the nearest code
    of ``qmap`` (sorted) times its block's largest magnitude."""
    flat = x.detach().reshape(-1).float()
    pad = -flat.numel() % BLOCK
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]
    mids = (qmap[1:] + qmap[:-1]) / 2  # a value between two codes goes to the nearer one
    codes = torch.searchsorted(mids, scaled.reshape(-1)).to(torch.uint8)
    return codes, absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, shape) -> torch.Tensor:
    values = qmap[codes.long()].view(-1, BLOCK) * absmax[:, None]
    return values.reshape(-1)[:math.prod(shape)].view(shape)


def eight_bit_layout(p: torch.Tensor, split: tuple[int, int] | None = None) -> bool:
    """Whether ``p``'s moments are kept in 8 bits: at least ``MIN_8BIT`` values, and when sharded by
    FSDP every rank's share a whole number of blocks (module docstring). ``split``: ``(dim, ranks)``
    when ``p`` is this rank's part of a tensor-parallel parameter (its rows or columns): then the
    part's blocks must be the whole tensor's too."""
    if split is not None:
        dim, ranks = split
        if p.numel() * ranks < MIN_8BIT:
            return False
        whole_blocks = p.numel() % BLOCK == 0 if dim == 0 else p.ndim == 2 and p.shape[1] % BLOCK == 0
        if not whole_blocks:
            return False
    elif p.numel() < MIN_8BIT:
        return False
    if not hasattr(p, "device_mesh"):
        return True
    if shard_rows(p) is None:
        return False
    chunk = -(-p.shape[0] // shard_axis(p)[0])
    return chunk * (p.numel() // p.shape[0]) % BLOCK == 0


def split_block_views(shape, dim: int) -> tuple[tuple, tuple]:
    """The shapes to view a tensor-parallel part's (or the whole tensor's) flat codes and block scales
    as, so that the parts join along ``dim`` into the whole tensor's (``eight_bit_layout`` holding):
    a row split's parts follow each other (flat); a column split's are each row's columns, its
    blocks ``shape[1] / BLOCK`` per row."""
    if dim == 0:
        n = math.prod(shape)
        return (n,), (n // BLOCK,)
    return tuple(shape), (shape[0], shape[1] // BLOCK)


class AdamW8bit(torch.optim.Optimizer):
    """``torch.optim.AdamW`` with block-wise 8-bit moments (module docstring); the same param groups
    (``lr``, ``betas``, ``eps``, ``weight_decay``, and the trainers' ``lr_scale``)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 splits: dict | None = None):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._maps: dict = {}
        # tensor parallelism: parameter id -> (dim, ranks) of the split parts this rank holds
        self.splits = splits or {}

    def layout(self, p: torch.Tensor) -> bool:
        """Whether ``p``'s moments are 8-bit (``eight_bit_layout`` with its tensor-parallel split)."""
        return eight_bit_layout(p, self.splits.get(id(p)))

    def qmap(self, signed: bool, device) -> torch.Tensor:
        key = (signed, str(device))
        if key not in self._maps:
            self._maps[key] = dynamic_map(signed).to(device)
        return self._maps[key]

    def _mids(self, signed: bool, device) -> torch.Tensor:
        """The 255 midpoints between the map's codes (the fused kernel's search table)."""
        key = ("mids", signed, str(device))
        if key not in self._maps:
            q = self.qmap(signed, device)
            self._maps[key] = (q[1:] + q[:-1]) / 2
        return self._maps[key]

    @staticmethod
    def _kernel(p: torch.Tensor):
        """The fused kernel module when this tensor's step should run it, else None."""
        from apr_kernels import backend

        return backend.kernels("adamw8bit") if backend.use_triton(p) else None

    def _stored(self, p: torch.Tensor, value: torch.Tensor, signed: bool):
        """A moment as kept: 8-bit (of this rank's rows under FSDP) where ``eight_bit_layout``, else
        fp32 placed like ``p`` (a DTensor under FSDP)."""
        if not self.layout(p):
            return value.to(torch.float32, copy=True)  # (its own storage: updated in place)
        return Blockwise8bit(local_part(value), self.qmap(signed, local_part(p).device))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    zeros = torch.zeros_like(p, dtype=torch.float32)  # (a DTensor under FSDP)
                    state["exp_avg"] = self._stored(p, zeros, True)
                    state["exp_avg_sq"] = self._stored(p, zeros, False)
                state["step"] += 1
                t = float(state["step"])
                m_q, v_q = state["exp_avg"], state["exp_avg_sq"]
                # the update is elementwise: under FSDP each rank updates its own rows (local views)
                w, grad = local_part(p), local_part(p.grad)
                k = self._kernel(w) if isinstance(m_q, Blockwise8bit) else None
                if k is not None and w.is_contiguous() and grad.is_contiguous():
                    k.adamw8bit_step(w, grad, m_q.codes, m_q.absmax, v_q.codes, v_q.absmax,
                                     self._mids(True, w.device), m_q.qmap, self._mids(False, w.device), v_q.qmap,
                                     lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=wd, step=t)
                    continue
                m = m_q.dequantize() if isinstance(m_q, Blockwise8bit) else local_part(m_q)
                v = v_q.dequantize() if isinstance(v_q, Blockwise8bit) else local_part(v_q)
                g = grad.float()
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                p32 = w.float()
                if wd:
                    p32.mul_(1 - lr * wd)
                denom = (v / (1 - b2 ** t)).sqrt_().add_(eps)
                p32.addcdiv_(m, denom, value=-lr / (1 - b1 ** t))
                if p32 is not w:
                    w.copy_(p32)
                for q, value in ((m_q, m), (v_q, v)):
                    if isinstance(q, Blockwise8bit):
                        q.update(value)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """Moments given as tensors (a checkpoint's fp32 ones) are quantised as they arrive."""
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                if torch.is_tensor(state.get(key)):
                    state[key] = self._stored(p, state[key], signed)

    def state_bytes(self) -> int:
        """Bytes of moment storage held (for the benchmark and tests)."""
        total = 0
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                s = state.get(key)
                total += s.nbytes if isinstance(s, Blockwise8bit) else (s.numel() * s.element_size() if s is not None else 0)
        return total
