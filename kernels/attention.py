"""Fused grouped-query attention (FlashAttention-2 style) forward and backward in Triton.

Layout: q ``[B, S, Hq, D]``, k/v ``[B, S, Hkv, D]`` addressed through their strides, so a
``[B, H, S, D]`` tensor passed as ``x.transpose(1, 2)`` runs without a copy. Only the last dimension
must be contiguous (the launchers copy a tensor whose last stride is not 1).

Varlen (packed documents, as ``flash_attn_varlen_func``): q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` hold
N sequences back to back, sequence i being rows ``cu_seqlens[i]:cu_seqlens[i+1]``; each attends only
within itself. The same kernels run with ``VARLEN``: one grid row per (sequence, head), each program
reads its sequence's bounds (clamped into [0, T]: no out-of-bounds access whatever ``cu_seqlens``
holds) and programs past the end of a short sequence exit at once.

* Query head ``h`` reads K/V head ``h // G`` (G = Hq // Hkv) inside the kernels: K/V are never expanded.
* Forward: online softmax in fp32 in the exp2 domain (``scale * log2(e)`` folded into one multiply
  after the QK^T dot); saves the natural-log LSE per row (fp32 ``[B, Hq, S]``).
* Causal: K/V blocks above the diagonal are skipped; only the diagonal band is masked, off-diagonal
  blocks run mask-free. Ragged S: boundary masks only in the last block. head_dim is padded to the
  next power of two inside the kernel (``BLOCK_D``) with a d-mask.
* Backward: ``delta = rowsum(dO * O)``; a dK/dV kernel where one program owns one K/V block of one
  K/V head and loops over the G query heads of its group and all query blocks, accumulating in fp32
  registers (no atomics, no G-times buffers: deterministic); a dQ kernel, one program per query block
  per query head, looping over K/V blocks.
* Dots take fp16/bf16 (or fp32, "ieee" precision) operands with fp32 accumulation; all other math is fp32.
* Launch configs (tiles, warps, stages): ``kernels/attention_tuning.py`` -- a fixed table by default,
  an opt-in autotune over a few candidates per kernel with APR_KERNELS_AUTOTUNE=1 on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from apr_kernels.kernels import attention_tuning as tuning
from apr_kernels.kernels.attention_tuning import default_config  # noqa: F401 (re-exported)

LOG2E = 1.4426950408889634




@triton.jit
def _load_tile(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, ROW_MASK: tl.constexpr,
               EVEN_D: tl.constexpr):
    # [rows, BLOCK_D] tile; masked only where the constexpr flags say a boundary can be crossed.
    if ROW_MASK:
        if EVEN_D:
            x = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return x


@triton.jit
def _store_tile(ptrs, x, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr):
    tl.store(ptrs, x, mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _seq_span(CU, off_b, S, VARLEN: tl.constexpr):
    """(first token, length) of the sequence a program works on. Dense: (0, S), the batch index
    addresses it. Varlen: sequence ``off_b`` of the packed tokens, read from ``cu_seqlens`` and clamped
    into [0, S] (S = all tokens), so even a malformed ``cu_seqlens`` cannot address out of bounds."""
    if VARLEN:
        start = tl.load(CU + off_b)
        end = tl.load(CU + off_b + 1)
        start = tl.minimum(tl.maximum(start, 0), S)
        end = tl.minimum(tl.maximum(end, start), S)
        tok0 = start.to(tl.int64)
        n = end - start
    else:
        tok0 = off_b * 0
        n = S
    return tok0, n


@triton.jit
def _key_span(CU_K, off_b, tok0, S, SK, VARLEN: tl.constexpr, VARLEN_K: tl.constexpr):
    """(first key, key count) of a program's sequence: its own tokens when packed with one
    ``cu_seqlens``; with ``cu_seqlens_k`` (VARLEN_K) its span of the packed keys (clamped into [0, SK],
    SK = all keys); dense: every batch row's SK keys."""
    if VARLEN:
        if VARLEN_K:
            return _seq_span(CU_K, off_b, SK, VARLEN)
        return tok0, S
    return tok0, SK


@triton.jit
def _slab(P, off_b, sb, tok0, ss, off_h, sh):
    """Pointer to row 0 of one (batch or packed sequence, head) slab of a [B, S, H, D] / [T, H, D]
    tensor: ``tok0`` is the sequence's first token (0 when dense), ``ss`` the row stride."""
    return P + off_b * sb + tok0 * ss + off_h * sh


@triton.jit
def _window_span(m0, full_hi, WINDOW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks of the rows [m0, m0 + BLOCK_M) under a causal window (row i sees keys i - WINDOW + 1
    .. i): [lo, win_hi) holds keys only some rows see (masked), [win_hi, full_hi) keys all rows see."""
    lo = tl.maximum(m0 - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
    first_all = tl.maximum(m0 + BLOCK_M - WINDOW, 0)  # the first key the block's last row sees
    win_hi = tl.minimum(tl.maximum((first_all + BLOCK_N - 1) // BLOCK_N * BLOCK_N, lo), full_hi)
    return lo, win_hi


@triton.jit
def _key_positions(m0, offs_m, S, SK, CAUSAL: tl.constexpr):
    """Rows as key positions: causal attention with SK >= S keys is bottom-right aligned (query row i
    is at key position i + SK - S, as FlashAttention >= 2.1); returns (the block's first row's
    position, every row's). Without causal masking positions only index, and the offset is 0."""
    if CAUSAL:
        q_off = SK - S
        return m0 + q_off, offs_m + q_off
    return m0, offs_m


@triton.jit
def _row_block_keys(p0, SK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key bounds of a block of BLOCK_M rows whose first row is at key position ``p0`` (>= 0):
    [0, full_hi) every row sees (mask-free blocks), [full_hi, tail_hi) only some (masked)."""
    if CAUSAL:
        # (clamped: a broken cu_seqlens_k promise, fewer keys than queries, must not start the loops
        # at negative keys; and C and Python integer division agree on p0 >= 0)
        full_hi = tl.maximum(p0, 0) // BLOCK_N * BLOCK_N
        tail_hi = tl.minimum(p0 + BLOCK_M, SK)
    else:
        full_hi = (SK // BLOCK_N) * BLOCK_N
        tail_hi = SK
    return full_hi, tail_hi


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d, lo, hi, S,
               qk_scale, WINDOW, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_D: tl.constexpr,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, SLIDING: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_base + cols[:, None] * stride_ks + offs_d[None, :], cols, S, offs_d,
                       HEAD_DIM, MASKED, EVEN_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if MASKED:
            keep = cols[None, :] < S
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None])
            if SLIDING:
                keep = keep & (cols[None, :] > offs_m[:, None] - WINDOW)
            qk = tl.where(keep, qk, float("-inf"))
        # Without a window every row sees at least one unmasked column by the end of its first
        # visited block, so m_new is finite and alpha = exp2(-inf) = 0 on the first step (no NaN).
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = m_new
        if SLIDING:  # a block at the window's edge may hide every column from a row: keep p = 0, not NaN
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(qk - m_use[:, None])
        v = _load_tile(v_base + cols[:, None] * stride_vs + offs_d[None, :], cols, S, offs_d,
                       HEAD_DIM, MASKED, EVEN_D)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, CU, CU_K,
              sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh, slb, slh,
              S, SK, H_Q, G, qk_scale, WINDOW,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
              DOT_PREC: tl.constexpr, VARLEN: tl.constexpr, SLIDING: tl.constexpr, VARLEN_K: tl.constexpr):
    pid_bh = tl.program_id(0)  # axis 0 (no 65535 limit); all heads of one row block run together
    pid_m = tl.program_id(1)
    if CAUSAL:
        start_m = tl.num_programs(1) - 1 - pid_m  # longest rows first: better tail balance
    else:
        start_m = pid_m
    off_b = (pid_bh // H_Q).to(tl.int64)
    off_h = (pid_bh % H_Q).to(tl.int64)
    off_kh = off_h // G
    tok0, S = _seq_span(CU, off_b, S, VARLEN)
    tok0_k, SK = _key_span(CU_K, off_b, tok0, S, SK, VARLEN, VARLEN_K)
    if VARLEN:
        if start_m * BLOCK_M >= S:  # the grid covers the longest sequence; shorter ones end here
            return
    k_base = _slab(K, off_b, skb, tok0_k, sks, off_kh, skh)
    v_base = _slab(V, off_b, svb, tok0_k, svs, off_kh, svh)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(_slab(Q, off_b, sqb, tok0, sqs, off_h, sqh) + offs_m[:, None] * sqs + offs_d[None, :],
                   offs_m, S, offs_d, HEAD_DIM, True, EVEN_D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    p0, pos_m = _key_positions(start_m * BLOCK_M, offs_m, S, SK, CAUSAL)
    full_hi, tail_hi = _row_block_keys(p0, SK, BLOCK_M, BLOCK_N, CAUSAL)
    lo = 0
    if SLIDING:  # keys before the window are skipped; blocks at its edge are masked
        lo, win_hi = _window_span(p0, full_hi, WINDOW, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, svs, pos_m, offs_d, lo, win_hi,
                                   SK, qk_scale, WINDOW, HEAD_DIM, BLOCK_N, EVEN_D, True, CAUSAL, True, DOT_PREC)
        lo = win_hi
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, svs, pos_m, offs_d, lo, full_hi,
                               SK, qk_scale, WINDOW, HEAD_DIM, BLOCK_N, EVEN_D, False, CAUSAL, False, DOT_PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, sks, svs, pos_m, offs_d, full_hi,
                               tail_hi, SK, qk_scale, WINDOW, HEAD_DIM, BLOCK_N, EVEN_D, True, CAUSAL, SLIDING,
                               DOT_PREC)
    if SLIDING:  # padding rows past S may see no key in their window (never stored): no 0/0
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # log2 -> natural log
    _store_tile(_slab(O, off_b, sob, tok0, sos, off_h, soh) + offs_m[:, None] * sos + offs_d[None, :],
                acc.to(O.dtype.element_ty), offs_m, S, offs_d, HEAD_DIM)
    tl.store(LSE + off_b * slb + off_h * slh + tok0 + offs_m, lse, mask=offs_m < S)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, sob, sos, soh, sdob, sdos, sdoh, S, H_Q,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    EVEN_D: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    off_b = (pid_bh // H_Q).to(tl.int64)
    off_h = (pid_bh % H_Q).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + off_b * sob + off_h * soh + rows[:, None] * sos + offs_d[None, :], rows, S,
                   offs_d, HEAD_DIM, True, EVEN_D)
    do = _load_tile(DO + off_b * sdob + off_h * sdoh + rows[:, None] * sdos + offs_d[None, :], rows, S,
                    offs_d, HEAD_DIM, True, EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * S + rows, delta, mask=rows < S)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqs, sdos, kpos, offs_d,
                    lo, hi, S, qk_scale, WINDOW, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                    MASK_M: tl.constexpr, EVEN_D: tl.constexpr, CAUSAL_MASK: tl.constexpr,
                    WINDOW_MASK: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m0
        # Rows past S load as zeros (dO = 0, delta = 0): their dV and dK contributions are exactly 0.
        q = _load_tile(q_base + rows[:, None] * sqs + offs_d[None, :], rows, S, offs_d, HEAD_DIM,
                       MASK_M, EVEN_D)
        do = _load_tile(do_base + rows[:, None] * sdos + offs_d[None, :], rows, S, offs_d, HEAD_DIM,
                        MASK_M, EVEN_D)
        if MASK_M:
            lse2 = tl.load(lse_base + rows, mask=rows < S, other=0.0) * 1.4426950408889634
            delta = tl.load(delta_base + rows, mask=rows < S, other=0.0)
        else:
            lse2 = tl.load(lse_base + rows) * 1.4426950408889634
            delta = tl.load(delta_base + rows)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)  # [BLOCK_N, BLOCK_M]
        p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
        if CAUSAL_MASK:  # kpos: the keys' positions counted in query rows
            p_t = tl.where(rows[None, :] >= kpos[:, None], p_t, 0.0)
        if WINDOW_MASK:
            p_t = tl.where(rows[None, :] < kpos[:, None] + WINDOW, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, CU, CU_K,
                   sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh,
                   sdkb, sdks, sdkh, sdvb, sdvs, sdvh, slb, slh,
                   S, SK, H_Q, H_KV, G, qk_scale, sm_scale, WINDOW,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASK_M: tl.constexpr,
                   EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, VARLEN: tl.constexpr,
                   SLIDING: tl.constexpr, VARLEN_K: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)  # causal: low n has the most query rows below it, so it starts first
    off_b = (pid_bh // H_KV).to(tl.int64)
    off_kh = (pid_bh % H_KV).to(tl.int64)
    tok0, S = _seq_span(CU, off_b, S, VARLEN)
    tok0_k, SK = _key_span(CU_K, off_b, tok0, S, SK, VARLEN, VARLEN_K)
    if VARLEN:
        if pid_n * BLOCK_N >= SK:
            return
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(_slab(K, off_b, skb, tok0_k, sks, off_kh, skh) + offs_n[:, None] * sks + offs_d[None, :],
                   offs_n, SK, offs_d, HEAD_DIM, True, EVEN_D)
    v = _load_tile(_slab(V, off_b, svb, tok0_k, svs, off_kh, svh) + offs_n[:, None] * svs + offs_d[None, :],
                   offs_n, SK, offs_d, HEAD_DIM, True, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # query row i is at key position i + q_off (bottom-right aligned when SK > S)
    q_off = 0
    if CAUSAL:  # rows before the block's first key see none of it; rows from diag_hi see all of it
        if VARLEN and not VARLEN_K:  # a packed sequence's keys are its queries: the diagonal block
            lo = n0
            diag_hi = tl.minimum(lo + BLOCK_N, S)
        else:
            q_off = SK - S
            lo = tl.maximum(n0 - q_off, 0) // BLOCK_M * BLOCK_M  # (clamped first: C and Python // agree)
            sees_all = tl.maximum(n0 + BLOCK_N - 1 - q_off, 0)
            diag_hi = tl.minimum(tl.maximum((sees_all + BLOCK_M - 1) // BLOCK_M * BLOCK_M, lo), S)
    else:
        lo = 0
        diag_hi = 0
    rows_hi = S
    if SLIDING:  # rows past the window of the block's last key see none of it: skipped
        rows_hi = tl.minimum(n0 + BLOCK_N - 1 + WINDOW - q_off, S)
    for g in range(G):  # the G query heads sharing this K/V head, summed in registers
        off_h = off_kh * G + g
        q_base = _slab(Q, off_b, sqb, tok0, sqs, off_h, sqh)
        do_base = _slab(DO, off_b, sdob, tok0, sdos, off_h, sdoh)
        row0 = off_b * slb + off_h * slh + tok0
        if CAUSAL:
            dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row0, DELTA + row0, sqs, sdos,
                                     offs_n - q_off, offs_d, lo, diag_hi, S, qk_scale, WINDOW, HEAD_DIM, BLOCK_M,
                                     MASK_M, EVEN_D, True, SLIDING, DOT_PREC)
        # one pass below the diagonal (with a window, masked throughout: a second, unmasked pass for
        # the rows that see all the block's keys costs more registers than the mask costs time)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row0, DELTA + row0, sqs, sdos,
                                 offs_n - q_off, offs_d, diag_hi, rows_hi, S, qk_scale, WINDOW, HEAD_DIM, BLOCK_M,
                                 MASK_M, EVEN_D, False, SLIDING, DOT_PREC)
    dk = dk * sm_scale
    _store_tile(_slab(DK, off_b, sdkb, tok0_k, sdks, off_kh, sdkh) + offs_n[:, None] * sdks + offs_d[None, :],
                dk.to(DK.dtype.element_ty), offs_n, SK, offs_d, HEAD_DIM)
    _store_tile(_slab(DV, off_b, sdvb, tok0_k, sdvs, off_kh, sdvh) + offs_n[:, None] * sdvs + offs_d[None, :],
                dv.to(DV.dtype.element_ty), offs_n, SK, offs_d, HEAD_DIM)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_d, lo,
                  hi, S, qk_scale, WINDOW, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                  EVEN_D: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                  SLIDING: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(k_base + cols[:, None] * stride_ks + offs_d[None, :], cols, S, offs_d,
                       HEAD_DIM, MASKED, EVEN_D)
        v = _load_tile(v_base + cols[:, None] * stride_vs + offs_d[None, :], cols, S, offs_d,
                       HEAD_DIM, MASKED, EVEN_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASKED:
            keep = cols[None, :] < S
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None])
            if SLIDING:
                keep = keep & (cols[None, :] > offs_m[:, None] - WINDOW)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, CU, CU_K,
                 sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sdob, sdos, sdoh, sdqb, sdqs, sdqh,
                 slb, slh, S, SK, H_Q, G, qk_scale, sm_scale, WINDOW,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
                 DOT_PREC: tl.constexpr, VARLEN: tl.constexpr, SLIDING: tl.constexpr, VARLEN_K: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    if CAUSAL:
        start_m = tl.num_programs(1) - 1 - pid_m
    else:
        start_m = pid_m
    off_b = (pid_bh // H_Q).to(tl.int64)
    off_h = (pid_bh % H_Q).to(tl.int64)
    off_kh = off_h // G
    tok0, S = _seq_span(CU, off_b, S, VARLEN)
    tok0_k, SK = _key_span(CU_K, off_b, tok0, S, SK, VARLEN, VARLEN_K)
    if VARLEN:
        if start_m * BLOCK_M >= S:
            return
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(_slab(Q, off_b, sqb, tok0, sqs, off_h, sqh) + offs_m[:, None] * sqs + offs_d[None, :],
                   offs_m, S, offs_d, HEAD_DIM, True, EVEN_D)
    do = _load_tile(_slab(DO, off_b, sdob, tok0, sdos, off_h, sdoh) + offs_m[:, None] * sdos + offs_d[None, :],
                    offs_m, S, offs_d, HEAD_DIM, True, EVEN_D)
    row0 = off_b * slb + off_h * slh + tok0
    lse2 = tl.load(LSE + row0 + offs_m, mask=offs_m < S, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + row0 + offs_m, mask=offs_m < S, other=0.0)
    k_base = _slab(K, off_b, skb, tok0_k, sks, off_kh, skh)
    v_base = _slab(V, off_b, svb, tok0_k, svs, off_kh, svh)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    p0, pos_m = _key_positions(start_m * BLOCK_M, offs_m, S, SK, CAUSAL)
    full_hi, tail_hi = _row_block_keys(p0, SK, BLOCK_M, BLOCK_N, CAUSAL)
    lo = 0
    if SLIDING:
        lo, win_hi = _window_span(p0, full_hi, WINDOW, BLOCK_M, BLOCK_N)
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, sks, svs, pos_m, offs_d, lo, win_hi, SK,
                           qk_scale, WINDOW, HEAD_DIM, BLOCK_N, EVEN_D, True, CAUSAL, True, DOT_PREC)
        lo = win_hi
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, sks, svs, pos_m, offs_d, lo, full_hi, SK,
                       qk_scale, WINDOW, HEAD_DIM, BLOCK_N, EVEN_D, False, CAUSAL, False, DOT_PREC)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, sks, svs, pos_m, offs_d, full_hi,
                       tail_hi, SK, qk_scale, WINDOW, HEAD_DIM, BLOCK_N, EVEN_D, True, CAUSAL, SLIDING, DOT_PREC)
    dq = dq * sm_scale
    _store_tile(_slab(DQ, off_b, sdqb, tok0, sdqs, off_h, sdqh) + offs_m[:, None] * sdqs + offs_d[None, :],
                dq.to(DQ.dtype.element_ty), offs_m, S, offs_d, HEAD_DIM)


# ------------------------------------------------------------------------------------- launchers

def _lastdim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels assume unit stride along head_dim (vectorised loads); anything else is copied.
    return t if t.stride(-1) == 1 else t.contiguous()


class _Packing:
    """How the programs find their sequence. Dense: ``[B, S, H, D]``, grid rows = B, sequence length
    S. Varlen: ``[T, H, D]`` packed tokens split by ``cu_seqlens`` (int32 ``[N + 1]``); grid rows = N,
    the grid's sequence axis covers ``max_seqlen``; the kernels read each sequence's bounds and the
    batch strides are 0. LSE/delta are ``[B, Hq, S]`` (dense) or ``[Hq, T]`` (varlen)."""

    def __init__(self, q: torch.Tensor, cu_seqlens, max_seqlen, k: torch.Tensor | None = None,
                 cu_seqlens_k=None, max_seqlen_k=None):
        self.varlen = cu_seqlens is not None
        self.cu_k = cu_seqlens_k  # packed keys with their own spans (varlen only), else None
        if self.varlen:
            self.n_seq, self.seqlen = cu_seqlens.numel() - 1, int(max_seqlen)
            self.tokens = q.shape[0]  # the kernels' S argument: the clamp bound of cu_seqlens
            # SK: the clamp bound of cu_seqlens_k (without it each sequence's keys are its queries)
            self.keys = k.shape[0] if cu_seqlens_k is not None else self.tokens
            self.seqlen_k = int(max_seqlen_k) if cu_seqlens_k is not None else self.seqlen
            self.cu = cu_seqlens
            self.lse_strides = (0, self.tokens)
        else:
            self.n_seq, self.seqlen = q.shape[0], q.shape[1]
            self.tokens = self.seqlen
            self.keys = self.seqlen_k = (k if k is not None else q).shape[1]  # SK: may exceed S
            self.cu = None
            self.lse_strides = (q.shape[2] * self.seqlen, self.seqlen)

    def strides(self, t: torch.Tensor) -> tuple[int, int, int]:
        """(batch, sequence, head) strides."""
        if self.varlen:
            return 0, t.stride(0), t.stride(1)
        return t.stride(0), t.stride(1), t.stride(2)

    def check_offsets(self, *ts: torch.Tensor) -> None:
        # Batch/sequence starts and head offsets are int64 in the kernels; offsets inside one
        # sequence of one head are int32.
        for t in ts:
            _, s_s, s_h = self.strides(t)
            rows = max(self.seqlen, self.seqlen_k) if self.varlen else t.shape[1]  # (a sequence's span bound)
            span = (rows - 1) * s_s + (t.shape[-2] - 1) * s_h + t.shape[-1]
            if span >= 2**31:
                raise ValueError(f"kernels/attention.py: a sequence of {rows} rows of a tensor of "
                                 f"shape {tuple(t.shape)} and strides {t.stride()} spans {span} elements; "
                                 f"expected < 2**31")


def _meta(q: torch.Tensor) -> dict:
    D = q.shape[-1]
    block_d = max(16, 1 << (D - 1).bit_length())
    return dict(HEAD_DIM=D, BLOCK_D=block_d, EVEN_D=block_d == D,
                DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32")


def _choose(kind: str, q: torch.Tensor, pk: _Packing, hkv: int, causal: bool, config: dict | None,
            launch, window: int = 0) -> dict:
    """An explicit ``config``; else, with APR_KERNELS_AUTOTUNE=1 on CUDA, the fastest candidate for
    this shape (timed once per process); else the fixed default table."""
    if config:
        return dict(config)
    HQ, D = q.shape[-2], q.shape[-1]
    if tuning.autotune_requested(q):
        cands = tuning.candidates(kind, D, q.dtype, pk.seqlen, q.device)
        if len(cands) > 1:
            key = (str(q.dtype).replace("torch.", ""), pk.n_seq, pk.seqlen, HQ, hkv, D, bool(causal),
                   pk.varlen) + ((window,) if window else ()) + ((pk.seqlen_k,) if pk.seqlen_k != pk.seqlen else ())
            return tuning.pick(kind, key, cands, launch)
    return default_config(kind, D, q.dtype, pk.seqlen, q.device)


def _interp_bf16(*ts: torch.Tensor) -> bool:
    # The interpreter computes bf16 dots/arithmetic wrongly: run it in fp32 there (CPU only).
    return not ts[0].is_cuda and ts[0].dtype == torch.bfloat16


def _sliding(window: int, causal: bool, pk: _Packing) -> int:
    """The window the kernels apply (0: none; a window as long as the sequence changes nothing)."""
    if window and not causal:
        raise ValueError("kernels/attention.py: a sliding window needs causal=True")
    return window if 0 < window < pk.seqlen_k else 0


def attention_fwd(q, k, v, causal: bool, scale: float, *, out=None, lse=None, config=None,
                  cu_seqlens=None, max_seqlen=None, window: int = 0, cu_seqlens_k=None, max_seqlen_k=None):
    """Forward. Dense: q ``[B,S,Hq,D]``, k/v ``[B,Sk,Hkv,D]`` -> (o ``[B,S,Hq,D]``, lse ``[B,Hq,S]``);
    Sk may differ from S (causal: Sk >= S, the queries are the last S positions, bottom-right aligned).
    Varlen (``cu_seqlens`` int32 ``[N+1]`` on q's device, ``max_seqlen`` >= every length): q
    ``[T,Hq,D]``, k/v ``[T,Hkv,D]`` -> (o ``[T,Hq,D]``, lse ``[Hq,T]``); sequence i is rows
    ``cu_seqlens[i]:cu_seqlens[i+1]`` and attends only within itself. Any strides with a unit last
    stride; o in q's dtype, lse fp32 natural log. ``out``/``lse`` may be preallocated (tests poison them).
    ``window`` > 0 (causal only): row i attends to keys i - window + 1 .. i (Mistral's sliding window).
    ``cu_seqlens_k``/``max_seqlen_k`` (varlen): k/v ``[Tk, Hkv, D]`` packed with their own spans, sequence
    i's keys being rows ``cu_seqlens_k[i]:cu_seqlens_k[i+1]``; causal is bottom-right aligned per
    sequence, as in the dense Sk > S case (``flash_attn_varlen_func``'s cu_seqlens_q/cu_seqlens_k)."""
    HQ, HKV = q.shape[-2], k.shape[-2]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    pk = _Packing(q, cu_seqlens, max_seqlen, k, cu_seqlens_k, max_seqlen_k)
    lse_shape = (HQ, q.shape[0]) if pk.varlen else (q.shape[0], HQ, q.shape[1])
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device) if lse is None else lse
    if _interp_bf16(q):
        o32, _ = attention_fwd(q.float(), k.float(), v.float(), causal, scale, lse=lse, config=config,
                               cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, window=window,
                               cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_seqlen_k)
        o.copy_(o32)
        return o, lse
    if o.numel() == 0 or pk.n_seq == 0 or pk.seqlen == 0:
        return o, lse
    if pk.seqlen_k == 0 and not pk.varlen:  # no keys (non-causal): an empty softmax, as the reference
        return o.fill_(float("nan")), lse.fill_(float("-inf"))
    window = _sliding(window, causal, pk)
    q, k, v = (_lastdim_contiguous(t) for t in (q, k, v))
    pk.check_offsets(q, k, v, o)
    if o.stride(-1) != 1 or not lse.is_contiguous():
        raise ValueError("kernels/attention.py: out must have a unit last stride and lse must be contiguous")
    meta = _meta(q)

    def launch(cfg):
        _attn_fwd[(pk.n_seq * HQ, triton.cdiv(pk.seqlen, cfg["BLOCK_M"]))](
            q, k, v, o, lse, pk.cu, pk.cu_k, *pk.strides(q), *pk.strides(k), *pk.strides(v), *pk.strides(o),
            *pk.lse_strides, pk.tokens, pk.keys, HQ, HQ // HKV, scale * LOG2E, window,
            CAUSAL=bool(causal), VARLEN=pk.varlen, SLIDING=window > 0, VARLEN_K=pk.cu_k is not None, **meta, **cfg)

    launch(_choose("fwd", q, pk, HKV, causal, config, launch, window))
    return o, lse


def attention_bwd(do, q, k, v, o, lse, causal: bool, scale: float, *, dlse=None, dq=None, dk=None,
                  dv=None, config=None, cu_seqlens=None, max_seqlen=None, window: int = 0, cu_seqlens_k=None,
                  max_seqlen_k=None):
    """Backward: (dq, dk, dv) shaped like (q, k, v), in their dtype. ``dlse`` (optional, the
    gradient of lse) folds into delta. ``config`` may hold ``dkdv`` and ``dq`` launch configs.
    ``cu_seqlens``/``max_seqlen``/``window``: as in :func:`attention_fwd`."""
    HQ, D = q.shape[-2], q.shape[-1]
    HKV = k.shape[-2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    pk = _Packing(q, cu_seqlens, max_seqlen, k, cu_seqlens_k, max_seqlen_k)
    if _interp_bf16(q):
        grads = attention_bwd(do.float(), q.float(), k.float(), v.float(), o.float(), lse, causal,
                              scale, dlse=dlse, config=config, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                              window=window, cu_seqlens_k=cu_seqlens_k, max_seqlen_k=max_seqlen_k)
        for dst, src in zip((dq, dk, dv), grads):
            dst.copy_(src)
        return dq, dk, dv
    if pk.n_seq == 0 or pk.seqlen == 0 or dk.numel() == 0 or dq.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    window = _sliding(window, causal, pk)
    do, q, k, v, o = (_lastdim_contiguous(t) for t in (do, q, k, v, o))
    lse = lse.contiguous()
    pk.check_offsets(do, q, k, v, o, dq, dk, dv)
    if dq.stride(-1) != 1 or dk.stride(-1) != 1 or dv.stride(-1) != 1:
        raise ValueError("kernels/attention.py: dq, dk and dv must have a unit last stride")
    config = config or {}
    meta = _meta(q)
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    # delta = rowsum(o * do) needs no sequence bounds: varlen tensors run as one batch of T rows
    o4, do4 = (t.unsqueeze(0) if pk.varlen else t for t in (o, do))
    B4, S4 = o4.shape[0], o4.shape[1]
    pre_m = 64 if q.is_cuda else 32
    _attn_bwd_delta[(B4 * HQ, triton.cdiv(S4, pre_m))](
        o4, do4, delta, o4.stride(0), o4.stride(1), o4.stride(2), do4.stride(0), do4.stride(1),
        do4.stride(2), S4, HQ, HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"], BLOCK_M=pre_m,
        EVEN_D=meta["EVEN_D"], num_warps=4)
    if dlse is not None:  # d lse_i / d s_ij = P_ij: the same as lowering delta by dlse
        delta.sub_(dlse)

    def launch_dkdv(cfg):
        _attn_bwd_dkdv[(pk.n_seq * HKV, triton.cdiv(pk.seqlen_k, cfg["BLOCK_N"]))](
            q, k, v, do, dk, dv, lse, delta, pk.cu, pk.cu_k, *pk.strides(q), *pk.strides(k), *pk.strides(v),
            *pk.strides(do), *pk.strides(dk), *pk.strides(dv), *pk.lse_strides, pk.tokens, pk.keys, HQ, HKV,
            HQ // HKV, scale * LOG2E, scale, window, CAUSAL=bool(causal), VARLEN=pk.varlen,
            SLIDING=window > 0, VARLEN_K=pk.cu_k is not None, MASK_M=pk.varlen or pk.seqlen % cfg["BLOCK_M"] != 0,
            **meta, **cfg)

    def launch_dq(cfg):
        _attn_bwd_dq[(pk.n_seq * HQ, triton.cdiv(pk.seqlen, cfg["BLOCK_M"]))](
            q, k, v, do, dq, lse, delta, pk.cu, pk.cu_k, *pk.strides(q), *pk.strides(k), *pk.strides(v),
            *pk.strides(do), *pk.strides(dq), *pk.lse_strides, pk.tokens, pk.keys, HQ, HQ // HKV,
            scale * LOG2E, scale, window, CAUSAL=bool(causal), VARLEN=pk.varlen, SLIDING=window > 0,
            VARLEN_K=pk.cu_k is not None, **meta, **cfg)

    # Each kernel only writes its outputs (no accumulation into them): timing candidates on the
    # real buffers is safe, and the chosen config's launch below rewrites them.
    dkdv_cfg = _choose("dkdv", q, pk, HKV, causal, config.get("dkdv"), launch_dkdv, window)
    if pk.cu_k is not None and D > 64 and "dkdv" not in config and dkdv_cfg["num_warps"] < 8:
        # per-sequence key spans hold more registers through the loops: at 4 warps the dK/dV
        # accumulators spill ~580 B per thread at D 128 (sm_90a ptxas), at 8 warps ~80 B
        dkdv_cfg = dict(dkdv_cfg, num_warps=8)
    launch_dkdv(dkdv_cfg)
    launch_dq(_choose("dq", q, pk, HKV, causal, config.get("dq"), launch_dq, window))
    return dq, dk, dv
