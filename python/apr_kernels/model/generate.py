"""Text generation from a trained model: a key/value cache and greedy or sampled decoding.

For looking at what a run learned (``apr-kernels generate``), not for serving. The computation is
the model's eager path (Hugging Face numerics): the prompt runs once as a causal block, filling
each layer's cache with its rotated keys and values; every new token then attends to the cache,
its RoPE position being its index in the sequence. Prompts in one ``generate`` batch have one
length; ``generate_batch`` takes prompts of any lengths, left-padded: each row's RoPE positions
start at its first real token and no query attends to a padding key (a padding query attends to
itself alone, so its values stay finite). Sampling: ``temperature`` 0 is greedy (argmax); otherwise
softmax(logits / temperature), restricted to the ``top_k`` most likely tokens and to the smallest set
whose probability reaches ``top_p``, drawn with ``generator`` (``generate_batch``: one generator per
group of rows, so a group samples alike in any batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .rope import rope_tables
from .transformer import Transformer, window_mask


class KVCache:
    """Per layer, the keys and values of every position so far, ``[B, Hkv, T, D]``, preallocated for
    ``capacity`` positions."""

    def __init__(self, model: Transformer, batch: int, capacity: int, device, dtype):
        c = model.config
        # (this rank's K/V heads under tensor parallelism)
        heads = model.model.layers[0].self_attn.num_kv_heads if len(model.model.layers) else c.num_kv_heads
        shape = (len(model.model.layers), batch, heads, capacity, c.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``/``v`` ``[B, Hkv, t, D]`` after the cached positions; all keys/values so far."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def _attention_step(attn, x: torch.Tensor, cos, sin, cache: KVCache, layer: int,
                    keys_ok: torch.Tensor | None = None) -> torch.Tensor:
    """``keys_ok`` ``[B, capacity]``: which cached positions are real tokens (left padding); then
    ``cos``/``sin`` hold one row per token of ``x`` (``[B * t, D/2]``)."""
    b, t, _ = x.shape
    if keys_ok is not None:  # the model's projections and rotation with per-token tables
        q, k, v = (z.view(b, t, z.shape[2], z.shape[3]) for z in attn.rotated_qkv(x, cos, sin, packed=True))
    else:
        q, k, v = attn.rotated_qkv(x, cos, sin)  # the model's own eager projections and rotation
    keys, values = cache.append(layer, k.transpose(1, 2), v.transpose(1, 2))
    # the new block is causal over the cached positions and itself (bottom-right: its queries are the
    # last t positions); a single new token sees every cached position (with a sliding window, only
    # the last ones)
    mask = window_mask(t, attn.window, x.device, cache.length) if attn.window is not None else None
    if mask is None and t > 1 and cache.length > 0:  # (SDPA's is_causal is top-left: only for an empty cache)
        mask = window_mask(t, cache.length + t, x.device, cache.length)
    if keys_ok is not None:
        end = cache.length + t
        qi = torch.arange(cache.length, end, device=x.device)[:, None]
        kj = torch.arange(end, device=x.device)[None, :]
        allowed = (kj <= qi) if mask is None else mask
        # (column distances are position distances: a row's padding all lies before its tokens)
        mask = (allowed[None] & keys_ok[:, None, :end]) | (kj == qi)[None]
        mask = mask[:, None]  # [B, 1, t, end]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                       is_causal=mask is None and t > 1 and cache.length == 0,
                                       scale=attn.head_dim ** -0.5,
                                       enable_gqa=attn.num_heads != attn.num_kv_heads)
    out = attn.o_proj(o.transpose(1, 2).reshape(b, t, attn.num_heads * attn.head_dim))
    tp = attn.tensor_parallel
    return out if tp is None else tp.leave(out)  # (tensor parallelism: the heads' partial sums added up)


@torch.no_grad()
def next_logits(model: Transformer, ids: torch.Tensor, cache: KVCache, cos_all, sin_all,
                pad: torch.Tensor | None = None, keys_ok: torch.Tensor | None = None) -> torch.Tensor:
    """Logits ``[B, vocab]`` of the token after ``ids`` ``[B, t]`` (the positions after the cache).
    ``pad`` ``[B]``: each row's left padding, with ``keys_ok`` (``generate_batch``)."""
    start, t = cache.length, ids.shape[1]
    if pad is None:
        cos, sin = cos_all[start:start + t], sin_all[start:start + t]
    else:  # per token: its column minus its row's padding (padding tokens: position 0)
        pos = (torch.arange(start, start + t, device=ids.device)[None, :] - pad[:, None]).clamp(min=0)
        cos, sin = cos_all[pos.flatten()], sin_all[pos.flatten()]
    h = model.model.embed_tokens(ids)
    for i, layer in enumerate(model.model.layers):
        h = h + _attention_step(layer.self_attn, layer.input_layernorm(h), cos, sin, cache, i, keys_ok)
        m = layer.ffn(layer.post_attention_layernorm(h))
        h = h + (m[0] if isinstance(m, tuple) else m)  # (a mixture-of-experts layer: (y, routing stats))
    cache.length += t
    h = model.model.norm(h[:, -1])
    vp = model.vocab_parallel
    if vp is not None:  # (the output head split by vocabulary range: the columns gathered)
        from apr_kernels.train.vocab_parallel import vocab_parallel_logits

        return vocab_parallel_logits(h, model.output_weight, vp).float()
    return F.linear(h, model.output_weight).float()


def sample(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of ``logits`` ``[B, vocab]`` (see the module docstring)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the first one always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu() if generator is not None and generator.device.type == "cpu" else probs,
                             1, generator=generator).view(-1).to(logits.device)


@torch.no_grad()
def generate(model: Transformer, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, eos_id=None,
             generator: torch.Generator | None = None, vocab_size: int | None = None) -> torch.Tensor:
    """``input_ids`` ``[B, T0]`` followed by up to ``max_new_tokens`` generated ids ``[B, T0 + n]``.
    Stops early once every row has produced a stop id: ``eos_id``, an id or a collection of ids
    (rows that finished earlier repeat the id they stopped at).
    ``vocab_size``: only ids below it are generated (the tokenizer's; a model's vocabulary is often
    padded past it with rows no text maps to)."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"generate: input_ids must be [B, T] with T >= 1 (prompts of one length); got "
                         f"shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens}; expected >= 0")
    cfg = model.config
    total = input_ids.shape[1] + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ValueError(f"generate: prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} "
                         f"positions exceed max_position_embeddings={cfg.max_position_embeddings}")
    param = next(model.parameters())
    ids = input_ids.to(param.device)
    was_training = model.training
    model.eval()
    try:
        cos, sin = rope_tables(total, cfg.head_dim, cfg.rope_theta, scaling=cfg.rope_scaling, device=param.device,
                               max_position_embeddings=cfg.max_position_embeddings)
        dtype = torch.get_autocast_dtype(param.device.type) if torch.is_autocast_enabled(param.device.type) \
            else param.dtype
        cache = KVCache(model, ids.shape[0], total, param.device, dtype)
        stops = None
        if eos_id is not None:
            stops = torch.tensor([eos_id] if isinstance(eos_id, int) else sorted(set(eos_id)), device=ids.device)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        last = torch.zeros(ids.shape[0], dtype=ids.dtype, device=ids.device)
        step_in = ids
        for _ in range(max_new_tokens):
            logits = next_logits(model, step_in, cache, cos, sin)
            if vocab_size is not None:
                logits[:, vocab_size:] = float("-inf")
            nxt = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            if stops is not None:
                nxt = torch.where(done, last, nxt)
                done |= torch.isin(nxt, stops)
                last = nxt
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            step_in = nxt[:, None]
            if stops is not None and bool(done.all()):
                break
    finally:
        model.train(was_training)
    return ids


@torch.no_grad()
def _group_done(done: torch.Tensor, ep) -> bool:
    """Whether every row is done: this rank's, or with an expert-parallel group ``ep`` every rank's."""
    if ep is None:
        return bool(done.all())
    running = (~done).any().to(torch.int32).reshape(1)
    import torch.distributed as dist

    dist.all_reduce(running, op=dist.ReduceOp.MAX, group=ep.group)
    return not bool(running.item())


def generate_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, stops=None,
                   generators: list[tuple[int, torch.Generator]] | None = None, temperature: float = 0.0,
                   top_k: int | None = None, top_p: float | None = None,
                   vocab_size: int | None = None) -> list[list[int]]:
    """Completions of ``prompts`` (id lists of any lengths, decoded together, left-padded): per row
    the ids after its prompt, up to ``max_new_tokens``, ending with the first stop id when one came
    (``stops``: one collection of ids for all rows, or one per row). ``generators``: ``(rows,
    generator)`` per consecutive group of ``rows`` rows, each group sampled with its own generator
    (default: one group of all rows, the global RNG).

    With the experts spread over an expert-parallel group (``model.expert_parallel``) every forward
    exchanges rows with the group's ranks, which decode other prompts: they step together until all
    of them are done (one small all-reduce per step), and a rank with no prompts (``prompts`` empty)
    steps along with a finished placeholder row, returning []."""
    ep = model.expert_parallel
    if not prompts and ep is not None:
        _decode(model, [[0]], max_new_tokens, None, None, 0.0, None, None, None, idle=True)
        return []
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate_batch: every prompt needs at least one token")
    return _decode(model, prompts, max_new_tokens, stops, generators, temperature, top_k, top_p, vocab_size)


def _decode(model: Transformer, prompts, max_new_tokens: int, stops, generators, temperature, top_k, top_p,
            vocab_size, idle: bool = False) -> list[list[int]]:
    """``generate_batch``'s decoding (``idle``: the rows are placeholders, done from the start)."""
    if max_new_tokens < 0:
        raise ValueError(f"generate_batch: max_new_tokens={max_new_tokens}; expected >= 0")
    cfg = model.config
    b, width = len(prompts), max(len(p) for p in prompts)
    total = width + max_new_tokens
    if total > cfg.max_position_embeddings:
        raise ValueError(f"generate_batch: the longest prompt ({width}) + max_new_tokens ({max_new_tokens}) = "
                         f"{total} positions exceed max_position_embeddings={cfg.max_position_embeddings}")
    groups = generators or [(b, None)]
    if sum(n for n, _ in groups) != b:
        raise ValueError(f"generate_batch: generators cover {sum(n for n, _ in groups)} rows; expected {b}")
    param = next(model.parameters())
    dev = param.device
    pad = torch.tensor([width - len(p) for p in prompts], device=dev)
    ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts], device=dev)
    keys_ok = torch.ones(b, total, dtype=torch.bool, device=dev)
    keys_ok[:, :width] = torch.arange(width, device=dev)[None, :] >= pad[:, None]
    per_row = stops is not None and len(stops) == b and all(not isinstance(x, int) for x in stops)
    row_stops = [set(x) for x in stops] if per_row else [set(stops or ())] * b
    table = torch.full((b, max(1, max(len(x) for x in row_stops))), -1, device=dev)
    for i, x in enumerate(row_stops):
        table[i, : len(x)] = torch.tensor(sorted(x), dtype=table.dtype)
    was_training = model.training
    model.eval()
    out = torch.empty(b, 0, dtype=torch.long, device=dev)
    try:
        cos, sin = rope_tables(total, cfg.head_dim, cfg.rope_theta, scaling=cfg.rope_scaling, device=dev,
                               max_position_embeddings=cfg.max_position_embeddings)
        dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else param.dtype
        cache = KVCache(model, b, total, dev, dtype)
        done = torch.full((b,), idle, dtype=torch.bool, device=dev)
        step_in = ids
        ep = model.expert_parallel
        for _ in range(max_new_tokens):  # (under expert parallelism: a forward and a check per step, as the group)
            logits = next_logits(model, step_in, cache, cos, sin, pad, keys_ok)
            if vocab_size is not None:
                logits[:, vocab_size:] = float("-inf")
            parts, row = [], 0
            for n, gen in groups:
                parts.append(sample(logits[row:row + n], temperature=temperature, top_k=top_k, top_p=top_p,
                                    generator=gen))
                row += n
            nxt = torch.cat(parts)
            out = torch.cat([out, nxt[:, None]], 1)
            done |= (table == nxt[:, None]).any(1)
            step_in = nxt[:, None]
            if _group_done(done, ep):
                break
    finally:
        model.train(was_training)
    completions = []
    for row, x in zip(out.tolist(), row_stops):
        stop = next((i for i, t in enumerate(row) if t in x), None)
        completions.append(row if stop is None else row[: stop + 1])
    return completions
