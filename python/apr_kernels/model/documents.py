"""Document masking for packed training rows: where documents start, and what each token may see.

Training rows are cut from one stream of documents, each ending with the end-of-text id
(``train/data.py``), so a row usually holds the tail of one document and the heads of others. By
default every token attends to all earlier tokens of its row, across document boundaries (as
aprender and most pretraining runs do). With document masking a token attends only within its own
document, and RoPE positions restart at 0 at each document start, so each document is computed
exactly as if it were alone (Llama 3's pretraining recipe; Hugging Face's packed ``position_ids``).

A :class:`Documents` holds the spans of one batch ``[B, S]`` over its ``B * S`` tokens flattened in
row order, in the layout of ``apr_kernels.attention(..., cu_seqlens=, max_seqlen=)``: every row start
is a span start, so no span crosses a row. It is built on the host from the CPU batch (no device
sync) and moved with the batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Documents(NamedTuple):
    """Spans of documents in a ``[B, S]`` batch: ``cu_seqlens`` int32 ``[N + 1]`` (0, the start of
    each further span, B * S) and ``max_seqlen``, the longest span."""

    cu_seqlens: torch.Tensor
    max_seqlen: int

    @classmethod
    def from_eos(cls, input_ids: torch.Tensor, eos_id: int) -> "Documents":
        """Spans of ``input_ids`` ``[B, S]``: a document starts at each row start and after each
        ``eos_id`` (the end-of-text id that ends every document of the stream)."""
        if input_ids.dim() != 2:
            raise ValueError(f"Documents.from_eos: input_ids must be [B, S]; got shape {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        ids = input_ids.cpu()
        starts = torch.zeros(B, S, dtype=torch.bool)
        starts[:, 0] = True
        starts[:, 1:] = ids[:, :-1] == eos_id
        first = starts.flatten().nonzero().flatten()
        cu = torch.cat([first, torch.tensor([B * S])]).to(torch.int32)
        return cls(cu, int((cu[1:] - cu[:-1]).max()) if B * S else 0)

    def to(self, device, non_blocking: bool = False) -> "Documents":
        return Documents(self.cu_seqlens.to(device, non_blocking=non_blocking), self.max_seqlen)

    def check(self, batch: int, seq_len: int) -> None:
        """ValueError unless the spans fit a ``[batch, seq_len]`` input: int32, from 0 to
        batch * seq_len, non-decreasing, every row start a span start, max_seqlen the longest span.
        Reads ``cu_seqlens`` on the host (call it for CPU tensors or outside the hot loop)."""
        cu = self.cu_seqlens
        where = "documents"
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{where}: cu_seqlens must be a 1-D int32 tensor of at least 2 entries; got "
                             f"{getattr(cu, 'dtype', type(cu).__name__)} {tuple(getattr(cu, 'shape', ()))}")
        bounds = cu.tolist()
        n = batch * seq_len
        lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        if bounds[0] != 0 or bounds[-1] != n or min(lengths) < 0:
            raise ValueError(f"{where}: cu_seqlens must rise from 0 to {n} (= {batch} rows x {seq_len} "
                             f"tokens) without decreasing; got {bounds[:8]}{' ...' if len(bounds) > 8 else ''}")
        missing = sorted(set(range(0, n, seq_len)) - set(bounds))
        if missing:
            raise ValueError(f"{where}: every row start must start a document (spans may not cross "
                             f"rows of {seq_len} tokens); row starts missing from cu_seqlens: {missing[:8]}")
        if self.max_seqlen < max(lengths):
            raise ValueError(f"{where}: max_seqlen {self.max_seqlen} is shorter than the longest span "
                             f"({max(lengths)})")

    def token_index(self, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(document index, position within the document) of each of the ``n_tokens`` flattened
        tokens, int64, on ``cu_seqlens``' device (computed there: no sync)."""
        cu = self.cu_seqlens
        t = torch.arange(n_tokens, device=cu.device, dtype=torch.int32)
        doc = torch.searchsorted(cu, t, right=True) - 1  # the last span starting at or before t
        return doc, (t - cu[doc]).long()
