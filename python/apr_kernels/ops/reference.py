"""Pure-PyTorch reference implementations: the CPU fallback path and the tests' readable oracle.

Each function states the numerics it implements; the Triton kernels must match them within the
dtype tolerances of tests/.
"""

from __future__ import annotations

import math

import torch

# ---------------------------------------------------------------------------------- RMSNorm (issue 4)
# Hugging Face LlamaRMSNorm / Qwen2RMSNorm numerics (transformers/models/llama/modeling_llama.py):
# normalise in fp32, round x_hat to x's dtype, then multiply by the weight with torch's type
# promotion (so y has dtype promote(x, weight)). The fused add rounds x + residual to x's dtype
# first, as HF's `residual + hidden_states` does in the model dtype.


def rms_norm_forward_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, rstd)``: y = weight * dt(h * rstd), h = fp32(x), rstd = rsqrt(mean(h^2) + eps) (fp32,
    shape x.shape[:-1]). fp64 inputs are computed in fp64 (the gradcheck path)."""
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * (h * rstd).to(x.dtype)
    return y, rstd.squeeze(-1).to(torch.promote_types(x.dtype, torch.float32))


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """HF RMSNorm: ``weight * (fp32(x) * rsqrt(mean(fp32(x)^2) + eps)).to(x.dtype)``."""
    return rms_norm_forward_reference(x, weight, eps)[0]


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(s), s)`` with ``s = x + residual`` in x's dtype (the new residual stream)."""
    s = x + residual
    return rms_norm_reference(s, weight, eps), s


def rms_norm_backward_reference(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    dresidual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dweight)`` of y = rms_norm(x), from the saved per-row ``rstd``, all in fp32 (fp64 for
    fp64 inputs); the cast of x_hat to x's dtype counts as the identity, as in autograd::

        g = dy * w;  dx = rstd * (g - x_hat * mean(g * x_hat)) + dresidual
        dw = sum over rows of dy * dt(x_hat)
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    h = x.to(acc)
    r = rstd.to(acc).unsqueeze(-1)
    x_hat = h * r
    g32 = dy.to(acc)
    g = g32 * weight.to(acc)
    dx = r * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
    if dresidual is not None:
        dx = dx + dresidual.to(acc)
    dw = (g32 * x_hat.to(x.dtype).to(acc)).reshape(-1, x.shape[-1]).sum(0)
    return dx.to(x.dtype), dw.to(weight.dtype)


# -------------------------------------------------------------------------------- Attention (issue 5)
# Softmax attention with grouped K/V: query head h uses K/V head h // G, G = Hq // Hkv. Computed in
# fp32 (fp64 for fp64 inputs), output rounded to q's dtype; the Triton kernels match this within the
# dtype tolerances (they additionally round P to the input dtype before the P @ V product).
# Layout [B, S, H, D]; causal means query i sees keys j <= i + Sk - Sq (bottom-right aligned: with
# Sk > Sq the queries are the last Sq positions; Sk == Sq is the usual self-attention); a sliding
# window w > 0 (causal only) also hides keys j <= i + Sk - Sq - w.


def _attn_scores(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float, window: int = 0):
    """fp32 scores ``[B, Hkv, G, S, Sk]`` and the grouped fp32 q ``[B, S, Hkv, G, D]`` (K/V are
    broadcast over the group by einsum, never expanded)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    B, S, HQ, D = q.shape
    HKV = k.shape[2]
    qg = q.to(acc).reshape(B, S, HKV, HQ // HKV, D)
    s = torch.einsum("bshgd,bthd->bhgst", qg, k.to(acc)) * scale
    if causal:
        off = k.shape[1] - S  # query i is at key position i + off
        hidden = torch.ones(S, k.shape[1], dtype=torch.bool, device=q.device).triu(off + 1)
        if window > 0:
            hidden |= torch.ones(S, k.shape[1], dtype=torch.bool, device=q.device).tril(off - window)
        s = s.masked_fill(hidden, float("-inf"))
    return s, qg


def attention_forward_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, window: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(o, lse)``: o ``[B, S, Hq, D]`` in q's dtype, lse ``[B, Hq, S]`` (natural log of the softmax
    denominator, fp32 or fp64), the statistic the backward recomputes P from."""
    B, S, HQ, D = q.shape
    s, _ = _attn_scores(q, k, causal, scale, window)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    o = torch.einsum("bhgst,bthd->bshgd", p, v.to(s.dtype)).reshape(B, S, HQ, D)
    return o.to(q.dtype), lse.reshape(B, HQ, S)


def attention_backward_reference(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
    lse: torch.Tensor, causal: bool, scale: float, dlse: torch.Tensor | None = None, window: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` from the saved ``(o, lse)``, FlashAttention-2 style::

        P = exp(scale * q k^T - lse);  dV = P^T dO;  dP = dO V^T;  delta = rowsum(dO * O) - dlse
        dS = P * (dP - delta);  dQ = scale * dS K;  dK = scale * dS^T Q   (summed over each group)
    """
    B, S, HQ, D = q.shape
    HKV = k.shape[2]
    s, qg = _attn_scores(q, k, causal, scale, window)
    acc = s.dtype
    p = torch.exp(s - lse.to(acc).reshape(B, HKV, HQ // HKV, S, 1))
    dog = do.to(acc).reshape(qg.shape)
    dv = torch.einsum("bhgst,bshgd->bthd", p, dog)
    dp = torch.einsum("bshgd,bthd->bhgst", dog, v.to(acc))
    delta = (dog * o.to(acc).reshape(qg.shape)).sum(-1).permute(0, 2, 3, 1)  # [B, Hkv, G, S]
    if dlse is not None:
        delta = delta - dlse.to(acc).reshape(delta.shape)
    ds = p * (dp - delta.unsqueeze(-1))
    dq = torch.einsum("bhgst,bthd->bshgd", ds, k.to(acc)).reshape(B, S, HQ, D) * scale
    dk = torch.einsum("bhgst,bshgd->bthd", ds, qg) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _span_pairs(cu_seqlens: torch.Tensor, cu_seqlens_k: torch.Tensor | None):
    """``((a, b), (ka, kb))`` query and key rows of each sequence with queries (keys = queries
    without ``cu_seqlens_k``)."""
    bounds = cu_seqlens.tolist()
    kb = bounds if cu_seqlens_k is None else cu_seqlens_k.tolist()
    return [((a, b), (c, d)) for a, b, c, d in zip(bounds[:-1], bounds[1:], kb[:-1], kb[1:]) if b > a]


def attention_varlen_forward_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool, scale: float,
    window: int = 0, cu_seqlens_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed sequences (q ``[T, Hq, D]``, k/v ``[T, Hkv, D]``, sequence i = rows
    ``cu_seqlens[i]:cu_seqlens[i+1]``, covering all T rows): :func:`attention_forward_reference` on
    each sequence alone. With ``cu_seqlens_k`` the keys ``[Tk, Hkv, D]`` have their own spans (causal:
    bottom-right per sequence). Returns o ``[T, Hq, D]`` and lse ``[Hq, T]``."""
    o = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.zeros((q.shape[1], q.shape[0]), dtype=torch.promote_types(q.dtype, torch.float32),
                      device=q.device)
    for (a, b), (c, d) in _span_pairs(cu_seqlens, cu_seqlens_k):
        oi, li = attention_forward_reference(q[None, a:b], k[None, c:d], v[None, c:d], causal, scale, window)
        o[a:b], lse[:, a:b] = oi[0], li[0]
    return o, lse


def attention_varlen_backward_reference(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
    lse: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool, scale: float, dlse: torch.Tensor | None = None,
    window: int = 0, cu_seqlens_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of :func:`attention_varlen_forward_reference`, sequence by sequence."""
    dq, dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    for (a, b), (c, d) in _span_pairs(cu_seqlens, cu_seqlens_k):
        g = attention_backward_reference(do[None, a:b], q[None, a:b], k[None, c:d], v[None, c:d],
                                         o[None, a:b], lse[None, :, a:b], causal, scale,
                                         None if dlse is None else dlse[None, :, a:b], window)
        dq[a:b], dk[c:d], dv[c:d] = g[0][0], g[1][0], g[2][0]
    return dq, dk, dv


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """Differentiable oracle: ``F.scaled_dot_product_attention(..., enable_gqa=True)`` on the
    ``[B, H, S, D]`` transposes, in fp32 (fp64 for fp64 inputs), output in q's dtype ``[B, S, Hq, D]``."""
    acc = torch.promote_types(q.dtype, torch.float32)
    qt, kt, vt = (t.to(acc).transpose(1, 2) for t in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(
        qt, kt, vt, is_causal=causal, scale=scale, enable_gqa=True)
    return o.transpose(1, 2).to(q.dtype)


# ------------------------------------------------------------------------- cross entropy (issue 6)
# Per-row cross entropy of a chunk of logits, computed in fp32 (fp64 for fp64 logits) from the logits
# as they are (bf16 logits of an autocast projection are read, not recomputed), with the gradient of
# the *sum* of row losses written over the logits in their dtype: the contract of the Triton kernel
# (kernels/cross_entropy.py). Out-of-range targets are the caller's to check (the op does, on CPU).


def cross_entropy_rows_reference(
    logits: torch.Tensor, targets: torch.Tensor, loss: torch.Tensor, ignore_index: int, write_grad: bool,
    label_smoothing: float = 0.0, z_loss: float = 0.0,
) -> torch.Tensor:
    """``loss[r] = lse_r - (1 - e) x_r[t_r] - e mean(x_r) + z lse_r^2`` (``lse_r = logsumexp(x_r)``; 0 for
    ignored rows) into ``loss``: the cross entropy with label smoothing ``e`` (torch's
    ``label_smoothing``: ``(1 - e) CE + e mean_j(-log p_j)``) plus the z-loss ``z lse^2`` (PaLM's); with
    ``write_grad`` ``logits[r] = (1 + 2 z lse_r) softmax(x_r) - (1 - e) onehot(t_r) - e / V`` (zeros for
    ignored rows)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = targets != ignore_index
    t = torch.where(valid, targets, 0).long()
    lse = torch.logsumexp(x, dim=-1)
    rows = lse - (1 - label_smoothing) * x.gather(1, t[:, None]).squeeze(1)
    if label_smoothing:
        rows = rows - label_smoothing * x.mean(-1)
    if z_loss:
        rows = rows + z_loss * lse * lse
    loss.copy_(torch.where(valid, rows, 0.0))
    if write_grad:  # in place on x (which is the logits themselves for fp32): one chunk of memory
        g = x.sub_(lse[:, None]).exp_()
        if z_loss:
            g.mul_((1 + 2 * z_loss * lse)[:, None])
        g.scatter_add_(1, t[:, None], torch.full_like(g[:, :1], -(1 - label_smoothing)))
        if label_smoothing:
            g.sub_(label_smoothing / g.shape[1])
        g.mul_(valid[:, None])
        if g.data_ptr() != logits.data_ptr():
            logits.copy_(g)
    return loss


def split_vocab_stats_reference(logits: torch.Tensor, local: torch.Tensor, stats: torch.Tensor,
                                smooth: bool) -> torch.Tensor:
    """``kernels/cross_entropy.split_vocab_stats``: per row of this rank's logit columns, the max, the
    exponential sum about it, the target logit (``local`` >= 0: its column here; else 0) and (with
    ``smooth``) the logit sum, into ``stats [4, n]`` (in ``stats``' dtype: fp32, fp64 for fp64)."""
    x = logits.to(stats.dtype)
    here = local >= 0
    m = x.amax(-1)
    stats[0] = m
    stats[1] = (x - m[:, None]).exp().sum(-1)
    stats[2] = x.gather(1, local.clamp(min=0)[:, None])[:, 0] * here
    stats[3] = x.sum(-1) if smooth else 0
    return stats


def split_vocab_grad_reference(logits: torch.Tensor, local: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor,
                               vocab: int, label_smoothing: float = 0.0, z_loss: float = 0.0) -> torch.Tensor:
    """``kernels/cross_entropy.split_vocab_grad``: ``logits`` overwritten with ``scale * ((1 + 2 z lse)
    exp(x - lse) - (1 - e) onehot(local) - e / vocab)``, computed in ``lse``'s dtype."""
    g = (logits.to(lse.dtype) - lse[:, None]).exp_()
    if z_loss:
        g.mul_((1 + 2 * z_loss * lse)[:, None])
    hit = (local >= 0).nonzero()[:, 0]
    g[hit, local[hit]] -= 1 - label_smoothing
    if label_smoothing:
        g.sub_(label_smoothing / vocab)
    return logits.copy_(g.mul_(scale[:, None]))


# --------------------------------------------------------------------------------- SwiGLU (issue 6)
# Hugging Face's MLP activation ``act_fn(gate) * up`` (act_fn = SiLU) in the input dtype, with torch's
# rounding points (each op computes in fp32 and rounds to the dtype); the backward is the one autograd
# builds for those two ops, written out so the kernel's contract can be read here.


def swiglu_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` exactly as eager PyTorch computes it."""
    return torch.nn.functional.silu(g) * u


def swiglu_backward_reference(dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dg, du)``: du = dy * silu(g); dg = silu'(g) * (dy * u), with silu'(g) = sig * (1 + g * (1 - sig))."""
    acc = torch.promote_types(g.dtype, torch.float32)
    s = torch.nn.functional.silu(g)
    du = dy * s
    ds = (dy * u).to(acc)
    g32 = g.to(acc)
    sig = torch.sigmoid(g32)
    dg = (ds * sig * (1 + g32 * (1 - sig))).to(g.dtype)
    return dg, du



# ------------------------------------------------------------------ grouped GEMM (mixture of experts)
# Rows of x sorted by group; group e owns rows offs[e-1] .. offs[e] (offs: cumulative ends) and is
# multiplied by its own weight W_e [out, in] (cast to x's dtype first, as autocast's weight copy).


def _group_bounds(offs: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs.tolist()
    return list(zip([0] + ends[:-1], ends))


def grouped_mm_reference(x: torch.Tensor, weights, offs: torch.Tensor, trans: bool = True) -> torch.Tensor:
    """``trans``: y[rows of e] = x[rows of e] @ W_e.T ``[N, out]``; else x[rows of e] @ W_e ``[N, in]``."""
    cols = weights[0].shape[0 if trans else 1]
    y = x.new_zeros(x.shape[0], cols)
    for (a, b), w in zip(_group_bounds(offs), weights):
        w = w.to(x.dtype)
        y[a:b] = x[a:b] @ (w.T if trans else w)
    return y


def grouped_mm_dw_reference(dy: torch.Tensor, x: torch.Tensor, offs: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """``[E, out, in]`` in ``w0``'s dtype: dW_e = dy[rows of e].T @ x[rows of e] (zeros for an empty group)."""
    acc = torch.promote_types(x.dtype, torch.float32)
    dw = torch.zeros(offs.numel(), *w0.shape, dtype=w0.dtype, device=x.device)
    for e, (a, b) in enumerate(_group_bounds(offs)):
        dw[e] = (dy[a:b].to(acc).T @ x[a:b].to(acc)).to(w0.dtype)
    return dw

# ----------------------------------------------------------------------------------- RoPE (issue 6)
# Rotary embedding of q [B, S, Hq, D] and k [B, S, Hkv, D] by tables cos/sin [S, D/2] (positions
# 0..S-1): pair (x1, x2) -> (x1 c - x2 s, x2 c + x1 s). rope_type 2 pairs j with j + D/2 (Hugging
# Face rotate_half), rope_type 0 pairs 2j with 2j + 1. inverse=True rotates back (sin negated): the
# backward. Computed in fp32 (fp64 for fp64), rounded once to the input dtype.


def rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_type: int,
                   inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    def rotate(x):
        acc = torch.promote_types(x.dtype, torch.float32)
        c = cos.to(acc)[None, :, None, :]
        s = sin.to(acc)[None, :, None, :] * (-1 if inverse else 1)
        x32 = x.to(acc)
        half = x.shape[-1] // 2
        if rope_type == 2:
            x1, x2 = x32[..., :half], x32[..., half:]
            out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
        else:
            x1, x2 = x32[..., 0::2], x32[..., 1::2]
            out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2)
        return out.to(x.dtype)

    return rotate(q), rotate(k)


# ------------------------------------------------------------------ distillation rows (issue 6)
# The row contract of ``ops/distillation.py``: per row, the student's cross entropy against the target
# and the temperature-scaled KL from the teacher, computed in fp32 from the chunk's two logit blocks,
# and the gradient of ``(1 - kd_ratio) * ce + kd_ratio * kl`` with respect to the student's logits.


def distillation_rows_reference(
    student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, ignore_index: int, kd_ratio: float,
    temperature: float, write_grad: bool, beta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(ce [n], kl [n], grad [n, V] or None)`` for student logits ``[n, V]`` and teacher logits
    ``[n, V_t]``: ``ce = logsumexp(s) - s[t]``; ``kl = T^2 D(p, q)`` over the ``min(V, V_t)`` leading
    columns (the vocabulary both heads share), ``q = softmax(s'/T)``, ``p = softmax(t'/T)``, with the
    divergence ``D`` chosen by ``beta`` as TRL's generalized JSD: 0 the forward KL(p || q), 1 the
    reverse KL(q || p), between ``beta KL(p || m) + (1 - beta) KL(q || m)`` with the mixture ``m = beta
    p + (1 - beta) q``. Rows whose target is ``ignore_index`` give zeros. ``grad = (1 - r)(softmax(s) -
    onehot) + r T dD/d(s'/T)`` (zero-padded past the shared columns), in fp32 (fp64 for fp64 logits);
    ``dD/du = q - p`` (forward), ``q (l - sum q l)`` with ``l = log q - log p`` (reverse) or
    ``(1 - beta) q (l - sum q l)`` with ``l = log q - log m`` (mixture)."""
    acc = torch.promote_types(student.dtype, torch.float32)
    s, t = student.to(acc), teacher.to(acc)
    v = min(s.shape[1], t.shape[1])
    valid = targets != ignore_index
    idx = torch.where(valid, targets, 0).long()[:, None]
    lse = torch.logsumexp(s, -1)
    ce = torch.where(valid, lse - s.gather(1, idx).squeeze(1), 0.0)
    log_q = torch.log_softmax(s[:, :v] / temperature, -1)
    log_p = torch.log_softmax(t[:, :v] / temperature, -1)
    p, q = log_p.exp(), log_q.exp()
    if beta == 0:
        div = (p * (log_p - log_q)).sum(-1)
    elif beta == 1:
        ell = log_q - log_p
        div = (q * ell).sum(-1)
    else:
        log_m = torch.logaddexp(log_q + math.log(1 - beta), log_p + math.log(beta))
        ell = log_q - log_m
        div = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * ell).sum(-1)
    kl = torch.where(valid, div * temperature ** 2, 0.0)
    if not write_grad:
        return ce, kl, None
    if beta == 0:
        d_u = q - p
    else:
        d_u = q * (ell - (q * ell).sum(-1, keepdim=True)) * (1 - beta if beta != 1 else 1.0)
    grad = (s - lse[:, None]).exp_().mul_(1 - kd_ratio)
    grad.scatter_add_(1, idx, torch.full_like(grad[:, :1], -(1 - kd_ratio)))
    grad[:, :v] += d_u * (kd_ratio * temperature)
    return ce, kl, grad.mul_(valid[:, None])
