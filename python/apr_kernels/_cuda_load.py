"""Host-to-GPU transfer for ``load(..., device="cuda")``: pinned staging ring, overlapped copies.

Copying straight from a cold mapping serialises 4 KiB page faults with the DMA (safetensors
#729/#736). Instead, worker threads ``pread`` consecutive file ranges into a small ring of pinned
buffers (readahead does the I/O in large requests; pread releases the GIL), and each filled
buffer's pieces are copied to their destination tensors with ``non_blocking=True`` on a side
stream. An event per buffer guards its reuse, so reading chunk k+1 overlaps the DMA of chunk k.
Only CUDA needs this path; nothing here runs at import time.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from ._format import QUANTIZED, TORCH_DTYPES
from .errors import AprFormatError

CHUNK_BYTES = 32 << 20   # one staging buffer
NUM_BUFFERS = 3          # ring depth: one filling, up to two in flight
READ_THREADS = min(8, max(1, (os.cpu_count() or 2) // 2))  # parallel preads per chunk
_MIN_SPLIT = 1 << 20     # do not split a read below this size


def to_cuda(f, names, device: torch.device, *, dtype: torch.dtype | None = None,
            chunk_bytes: int = CHUNK_BYTES, num_buffers: int = NUM_BUFFERS) -> dict[str, torch.Tensor]:
    """Tensors ``names`` of the open AprFile ``f`` on ``device`` (dequantised/converted there)."""
    infos = sorted((f.info(n) for n in names), key=lambda i: i.offset)  # file order: sequential reads
    raw = {i.name: torch.empty(i.nbytes, dtype=torch.uint8, device=device) for i in infos}
    fd = os.open(f.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != tuple(f._reader.identity) or st.st_size < f._reader.file_size:
            raise AprFormatError(f"{f.path}: the file was replaced or truncated after it was opened; "
                                 "expected the same file for the GPU copy")
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        _stream_copy(fd, f.path, [(raw[i.name], i.offset, i.nbytes) for i in infos], device,
                     chunk_bytes, num_buffers)
    finally:
        os.close(fd)
    out = {}
    for i in infos:
        r = raw[i.name]
        if i.dtype in QUANTIZED:
            from .quant import dequantize

            out[i.name] = dequantize(i.dtype, i.shape, r, dtype=dtype or torch.float32)
        else:
            t = r.view(TORCH_DTYPES[i.dtype]).view(i.shape)
            out[i.name] = t if dtype is None or dtype == t.dtype else t.to(dtype)
    return out


def plan_chunks(pieces, cap: int) -> list[list[tuple[int, int, int, int, int]]]:
    """Pack file ranges into staging chunks of ``cap`` bytes, splitting ranges that straddle one.

    ``pieces``: [(file offset, nbytes)] in file order. Returns one list per chunk of
    ``(piece index, offset inside the piece, offset inside the chunk, file offset, nbytes)``.
    """
    chunks, cur, used = [], [], 0
    for idx, (offset, nbytes) in enumerate(pieces):
        pos = 0
        while pos < nbytes:
            n = min(nbytes - pos, cap - used)
            cur.append((idx, pos, used, offset + pos, n))
            used += n
            pos += n
            if used == cap:
                chunks.append(cur)
                cur, used = [], 0
    if cur:
        chunks.append(cur)
    return chunks


def read_into(fd: int, path: str, view: memoryview, parts, pool: ThreadPoolExecutor | None) -> None:
    """pread each ``(chunk offset, file offset, nbytes)`` of ``parts`` into ``view``, large reads
    split across the pool's threads (pread releases the GIL)."""
    def read(dst: memoryview, offset: int) -> None:
        got = 0
        while got < len(dst):
            n = os.preadv(fd, [dst[got:]], offset + got)
            if n == 0:
                raise AprFormatError(f"{path}: file ended at byte {offset + got} during the GPU copy "
                                     "(truncated after it was opened?)")
            got += n

    jobs = []
    for buf_off, file_off, n in parts:
        step = max(_MIN_SPLIT, -(-n // READ_THREADS))
        for k in range(0, n, step):
            jobs.append((view[buf_off + k: buf_off + min(n, k + step)], file_off + k))
    if pool is not None and len(jobs) > 1:
        for fut in [pool.submit(read, v, o) for v, o in jobs]:
            fut.result()
    else:
        for v, o in jobs:
            read(v, o)


def _stream_copy(fd: int, path: str, pieces, device, chunk_bytes: int, num_buffers: int) -> None:
    """Copy file ranges ``(dst uint8 cuda tensor, file offset, nbytes)`` into their tensors."""
    total = sum(n for _, _, n in pieces)
    if total == 0:
        return
    cap = min(max(4096, chunk_bytes), total)
    chunks = plan_chunks([(off, n) for _, off, n in pieces], cap)
    nbuf = max(1, min(num_buffers, len(chunks)))
    bufs = [torch.empty(cap, dtype=torch.uint8, pin_memory=True) for _ in range(nbuf)]
    views = [memoryview(b.numpy()) for b in bufs]
    events: list = [None] * nbuf
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))  # destinations were allocated there
    pool = ThreadPoolExecutor(READ_THREADS) if READ_THREADS > 1 else None
    try:
        for k, chunk in enumerate(chunks):
            slot = k % nbuf
            if events[slot] is not None:
                events[slot].synchronize()  # the DMA that last read this buffer has finished
            read_into(fd, path, views[slot], [(b, f, n) for _, _, b, f, n in chunk], pool)
            with torch.cuda.stream(stream):
                for idx, pos, buf_off, _f, n in chunk:
                    pieces[idx][0][pos: pos + n].copy_(bufs[slot][buf_off: buf_off + n], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(stream)
            events[slot] = ev
        torch.cuda.current_stream(device).wait_stream(stream)
        for ev in events:
            if ev is not None:
                ev.synchronize()  # pinned buffers go back to the allocator only after their copies
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
