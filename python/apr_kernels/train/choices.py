"""Multiple-choice evaluation by log-likelihood (``apr-kernels eval --choices FILE.jsonl``).

How lm-evaluation-harness scores its ``multiple_choice`` tasks (HellaSwag, ARC, PIQA, MMLU's
log-likelihood form, ...), on your own JSON Lines records::

    {"context": "The cat sat on the", "choices": [" mat", " moon"], "answer": 0}

(``query`` or ``question`` for ``context``, ``gold`` or ``label`` for ``answer``, as exports name
them). A context may also be a list of chat messages: it is rendered with the model's chat format
and the assistant's header (``chat.generation_prompt``, as ``generate --chat``; the harness's
``--apply_chat_template``), special tokens in it recognised, and each choice is the answer's text.
Each choice is scored by the summed log-probability of its tokens after the context:

* the context's trailing whitespace moves to the front of each choice, then the choice's tokens are
  ``encode(context + choice)`` past ``encode(context)`` (the harness's ``_encode_pair``), after the
  begin-of-text id when the tokenizer adds one; an empty context is the end-of-text id;
* ``acc``: the share of questions whose most likely choice is the answer; ``acc_norm``: the same with
  each log-likelihood divided by the choice's length in characters (the harness's length
  normalisation, which keeps long choices from losing for their length alone). Ties go to the
  first choice.

The log-likelihoods come from ``posttrain.sequence_logps`` (padding-free where the package kernels
run), ``batch_size`` sequences at a time.
"""

from __future__ import annotations

import torch

CONTEXT_KEYS = ("context", "query", "question")
ANSWER_KEYS = ("answer", "gold", "label")


def read_choices(paths) -> list[dict]:
    """``{"where", "context", "choices", "answer"}`` of every record of the JSON Lines ``paths``."""
    from .posttrain import jsonl_records

    out = []
    for where, record in jsonl_records(paths, "multiple-choice data ({'context', 'choices', 'answer'} records)"):
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object with context, choices and answer")
        context = next((record[k] for k in CONTEXT_KEYS if k in record), None)
        answer = next((record[k] for k in ANSWER_KEYS if k in record), None)
        choices = record.get("choices")
        if not isinstance(context, (str, list)):
            raise ValueError(f"{where}: expected a string 'context' (or 'query', 'question'), or a list of messages")
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
            raise ValueError(f"{where}: expected 'choices', a list of at least 2 non-empty strings")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"{where}: 'answer' must be the index of the right choice, 0..{len(choices) - 1}; "
                             f"got {answer!r}")
        out.append({"where": where, "context": context, "choices": choices, "answer": answer})
    if not out:
        raise ValueError(f"{', '.join(map(str, paths))}: no multiple-choice records")
    return out


def encode_pair(tokenizer, context: str | list, choice: str) -> tuple[list[int], list[int]]:
    """(context ids, choice ids) as the harness splits them (module docstring)."""
    from .chat import generation_prompt
    from .data import document_bos

    chat = isinstance(context, list)
    if chat:  # the template writes its own begin-of-text token where it has one
        context = generation_prompt(context, tokenizer)[0]
    spaces = len(context) - len(context.rstrip())
    if spaces and not chat:
        context, choice = context[:-spaces], context[-spaces:] + choice
    ctx = tokenizer.encode(context, special=chat)
    whole = tokenizer.encode(context + choice, special=chat)
    bos = document_bos(tokenizer) if not chat else None
    prefix = [bos] if bos is not None else []
    if not ctx and not prefix:
        eos = getattr(tokenizer, "eos_id", None)
        if eos is None:
            raise ValueError("multiple-choice: an empty context needs the tokenizer's end-of-text id")
        prefix = [eos]
    return prefix + whole[:len(ctx)], whole[len(ctx):]


@torch.no_grad()
def score_choices(model, records: list[dict], tokenizer, *, batch_size: int = 32, device=None,
                  autocast_dtype: torch.dtype | None = None, padding_free: bool | None = None, env=None,
                  sharded: bool = False) -> dict:
    """``{"acc", "acc_norm", "questions", "logps"}`` of ``model`` on ``records`` (``read_choices``);
    ``logps``: each question's choice log-likelihoods. ``env``: under torchrun, this rank scores every
    N-th batch of choices (``rank_share.batch_rounds``; ``sharded``: a model sharded by FSDP, every
    rank running as many forwards) and every rank gets all of them."""
    from .posttrain import sequence_logps
    from .rank_share import batch_rounds, every_batch

    device = torch.device(device) if device is not None else next(model.parameters()).device
    if padding_free is None:
        padding_free = model.use_fast(torch.empty(0, device=device))
    seqs = []
    for r in records:
        for choice in r["choices"]:
            ctx, cont = encode_pair(tokenizer, r["context"], choice)
            if not cont:
                raise ValueError(f"{r['where']}: choice {choice!r} adds no token to the context")
            limit = model.config.max_position_embeddings
            if len(ctx) + len(cont) - 1 > limit:
                raise ValueError(f"{r['where']}: context + choice {choice!r} are {len(ctx) + len(cont)} tokens; the "
                                 f"model takes at most {limit + 1} (max_position_embeddings {limit} inputs)")
            seqs.append([-1 - t for t in ctx] + cont)
    was = model.training
    model.eval()
    eos = getattr(tokenizer, "eos_id", None)
    parts = []
    with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        for a in batch_rounds(len(seqs), batch_size, env, sharded):
            logps = sequence_logps(model, seqs[a or 0:(a or 0) + batch_size], device,
                                   eos_id=eos if eos is not None else 0, padding_free=padding_free)
            if a is not None:  # (else the padding forward of a sharded model: the others' gathers)
                parts.append(logps.double().cpu().tolist())
    model.train(was)
    if sharded:
        from .distributed import reshard

        # (a forward without a backward leaves the root gathered, and under --fsdp-reshard-after-forward
        # never the layers too)
        reshard(model)
    flat = [v for part in every_batch(env, parts) for v in part]
    right = right_norm = 0
    logps, at = [], 0
    for r in records:
        lp = flat[at:at + len(r["choices"])]
        at += len(r["choices"])
        logps.append(lp)
        right += max(range(len(lp)), key=lambda i: (lp[i], -i)) == r["answer"]
        norm = [v / len(c) for v, c in zip(lp, r["choices"])]
        right_norm += max(range(len(norm)), key=lambda i: (norm[i], -i)) == r["answer"]
    n = len(records)
    return {"acc": right / n, "acc_norm": right_norm / n, "questions": n, "logps": logps}
