"""``apr-kernels eval``: what a trained model scores on held-out material.

    apr-kernels eval --init runs/ft/model.apr --data heldout/ --seq-len 256
    apr-kernels eval --init model.apr --choices arc.jsonl
    apr-kernels eval --init model.apr --prompts math.jsonl --reward rewards.py:exact --num-samples 8
    apr-kernels eval --init rm.apr --pairs pairs.jsonl

* ``--data``: the mean next-token loss (``evaluate_file``, in the layout and with the document masking
  the checkpoint was trained with), its perplexity and bits per byte; the last line is
  ``eval_loss=<float> tokens=<int>``.
* ``--choices``: multiple-choice accuracy by log-likelihood (``choices.py``).
* ``--prompts``: completions scored by reward functions or models (``generation.sampled_batches``,
  ``generation.scored``), the mean reward and pass@k.
* ``--pairs``: a reward model's accuracy on preference pairs (``reward.evaluate_pairs``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from .checkpoint import stored_config
from .cli import add_common_options, keep_freed_memory, load_tokenizer, packing_eos, pick_device, tristate
from .generation import (add_quantize_option, add_tensor_parallel_option, as_quantized, inference_model,
                         reward_functions, sampled_batches, scored, split_or_quantized)
from .loop import autocast_dtype_for


def evaluate_file(init: str, data: list[str], *, seq_len: int | None = None, max_tokens: int | None = None,
                  tokenizer: str | None = None, batch_size: int = 8, device=None, fast=None,
                  document_mask: bool | None = None, text_field: str = "text", with_bytes: bool = False,
                  quantize: str | None = None, env=None, sharded: bool = False):
    """(mean next-token loss, target tokens) of an APR model on text data, and with ``with_bytes`` the
    bytes of text those targets stand for (``data.target_bytes``). ``seq_len`` and ``document_mask``
    default to the checkpoint's training settings (else 256 and off). ``quantize``: the model as
    ``convert --quantize`` would store it. ``env``: under torchrun, each rank scores its share of the
    batches (``rank_share``) and every rank gets the totals; with ``sharded`` the model is sharded
    over the ranks by FSDP (each rank reading only its shards), each rank scoring a contiguous share
    of the sequences (``distributed.Parallel.evaluate``); with ``env.model_split`` (``--tensor-parallel``)
    split over each group of ranks, the groups sharing the batches (``rank_share``)."""
    from apr_kernels.model.loading import check_tokenizer_vocab, from_apr

    from .data import evaluate, find_text_files, pack_records, target_bytes, token_stream

    parallel = None
    if sharded:
        from .distributed import parallelize

        parallel = parallelize(sharded_model(init, env, fast), "fsdp", env)  # (sharded already: wrapped)
        model = parallel.module
    elif env is not None and env.model_split is not None:
        from .rank_share import split_model

        model = split_model(init, env, "eval", fast=fast)
    else:
        model = as_quantized(from_apr(init, device=pick_device(device), fast=fast), quantize, init)
    stored = stored_config(model.apr_metadata, init)
    tok = load_tokenizer(tokenizer, model.apr_metadata, init)
    check_tokenizer_vocab(tok.vocab_size, model.config.vocab_size, f"{init}: tokenizer")
    seq_len = seq_len or int(stored.get("seq_len", 256))
    if document_mask is None:
        document_mask = bool(stored.get("document_mask", False))
    eos_id = getattr(tok, "eos_id", None) if document_mask else None
    if document_mask and eos_id is None:
        raise ValueError(f"{init}: document masking needs the tokenizer's end-of-text id; this tokenizer has none")
    tokens = token_stream(find_text_files(data), tok, max_tokens=None if max_tokens is None else max_tokens + 1,
                          text_field=text_field)
    if stored.get("packing") == "records":  # evaluated in the layout it was trained in
        tokens = pack_records(tokens, seq_len, packing_eos(tok))
    dev = next(model.parameters()).device
    autocast = autocast_dtype_for(stored.get("precision", "auto"), dev)
    if parallel is not None:
        loss, n = parallel.evaluate(tokens, seq_len, batch_size=batch_size, autocast_dtype=autocast,
                                    max_tokens=max_tokens, eos_id=eos_id)
    else:
        loss, n = evaluate(model, tokens, seq_len, batch_size=batch_size, device=dev, autocast_dtype=autocast,
                           max_tokens=max_tokens, eos_id=eos_id, env=env)
    return (loss, n, target_bytes(tokens, seq_len, tok, max_tokens)) if with_bytes else (loss, n)


def cmd_eval(args) -> int:
    """``eval``; under torchrun each rank, a whole model, scores every N-th batch of the data,
    questions, pairs or prompts (``rank_share.py``) and rank 0 prints the totals; with ``--parallel
    fsdp`` (``--data``, ``--choices``, ``--pairs``) the model is sharded over the ranks instead
    (``load_model``; HSDP with ``--fsdp-shard-size``), each scoring its share of the batches, as many
    forwards on every rank."""
    from .distributed import launched
    from .rank_share import on_ranks

    if args.fsdp_shard_size is not None and args.parallel != "fsdp":
        raise ValueError(f"eval --fsdp-shard-size {args.fsdp_shard_size} shards within groups of ranks; expected "
                         f"--parallel fsdp under torchrun")
    if args.tensor_parallel != 1 and args.parallel == "fsdp":
        raise ValueError(f"eval --tensor-parallel {args.tensor_parallel} with --parallel fsdp: expected one of the "
                         f"two (the model split over tensor-parallel ranks, or sharded by FSDP)")
    split_or_quantized(args, "eval")
    if args.parallel == "fsdp":
        if args.prompts:
            raise ValueError("eval --parallel fsdp shards the model for --data, --choices and --pairs; --prompts "
                             "samples with a whole model on each rank (--parallel ddp)")
        if not launched():
            raise ValueError("eval --parallel fsdp shards the model over torchrun's ranks; expected a torchrun "
                             "launch (one process evaluates the whole model without it)")
        if args.quantize:
            raise ValueError(f"eval --quantize {args.quantize} with --parallel fsdp: the quantised copy is made "
                             f"whole on one device; expected one of the two")
    return on_ranks(args, lambda dev, env: _eval(args, dev, env))


def _eval(args, dev, env) -> int:
    if dev.type == "cpu":
        keep_freed_memory()
    if args.choices:
        return eval_choices(args, dev, env)
    if args.pairs:
        return eval_pairs(args, dev, env)
    if args.prompts:
        return eval_prompts(args, dev, env)
    loss, n, n_bytes = evaluate_file(args.init, args.data, seq_len=args.seq_len, max_tokens=args.max_tokens,
                                     tokenizer=args.tokenizer, batch_size=args.batch_size, device=dev,
                                     fast=tristate(args.fast), document_mask=args.document_mask,
                                     text_field=args.text_field, with_bytes=True, quantize=args.quantize, env=env,
                                     sharded=args.parallel == "fsdp")
    if n == 0:
        raise ValueError(f"{', '.join(args.data)}: no loss targets in the evaluated tokens (all of them are "
                         f"prompt tokens of supervised records); evaluate more tokens (--max-tokens)")
    if env is not None and not env.is_main:
        return 0
    # perplexity, and bits per byte: the total loss over the bytes of text scored (comparable across
    # tokenizers; NaN when the targets stand for no text)
    ppl = math.exp(loss) if loss < 700 else float("inf")
    bpb = loss * n / (math.log(2) * n_bytes) if n_bytes else float("nan")
    if args.json:
        print(json.dumps({"event": "eval", "eval_loss": loss, "tokens": n, "perplexity": ppl, "bits_per_byte": bpb,
                          "bytes": n_bytes}))
    else:
        print(f"perplexity={ppl:.4f} bits_per_byte={bpb:.6f} bytes={n_bytes}")
        print(f"eval_loss={loss:.6f} tokens={n}")
    return 0


def load_model(args, dev, env, classifier: bool = False):
    """(``eval``'s model, its autocast dtype: the checkpoint's training precision on ``dev``): the
    whole model (``from_apr``; a reward model: ``load_classifier``) as ``--quantize`` says, or with
    ``--parallel fsdp`` sharded over the ranks (``sharded_model``), or with ``--tensor-parallel``
    split over each group of ranks (``rank_share.split_model``)."""
    from apr_kernels.model.loading import classifier_labels, from_apr, load_classifier

    from .rank_share import split_model

    labels = {"num_labels": classifier_labels(args.init)} if classifier else {}
    if args.parallel == "fsdp":
        model = sharded_model(args.init, env, tristate(args.fast), **labels)
    elif env is not None and env.model_split is not None:
        model = split_model(args.init, env, "eval", fast=tristate(args.fast), **labels)
    else:
        load = load_classifier if classifier else from_apr
        model = as_quantized(load(args.init, device=dev, fast=tristate(args.fast)), args.quantize, args.init)
    stored = stored_config(model.apr_metadata, args.init)
    return model, autocast_dtype_for(stored.get("precision", "auto"), dev)


def sharded_model(init, env, fast, **kwargs):
    """``init`` sharded over the ranks by FSDP on the meta device (HSDP: over each group of
    ``env.fsdp_shard`` ranks), each rank reading only its shards (``distributed.from_apr``, ``kwargs``
    its) and computing in the precision it was trained in (bf16 on CUDA); rank 0 says how much of it
    it holds."""
    from apr_kernels.model.loading import plan

    from . import distributed

    stored = stored_config(plan(init).metadata, init)  # (FSDP's compute dtype: before loading)
    model = distributed.from_apr(init, env, "fsdp", fast=fast,
                                 compute_dtype=autocast_dtype_for(stored.get("precision", "auto"), env.device),
                                 **kwargs)
    if env.is_main:
        held = sum(distributed.local_part(p).numel() for p in model.parameters())
        shard = env.fsdp_shard or env.world_size  # (HSDP: within groups of that many ranks, the groups replicas)
        how = "FSDP" if shard == env.world_size else f"HSDP, {env.world_size // shard} replicas"
        print(f"eval: {init} sharded over {shard} ranks ({how}): rank 0 holds {held} of "
              f"{sum(p.numel() for p in model.parameters())} parameters", file=sys.stderr)
    return model


def eval_choices(args, dev, env=None) -> int:
    """``eval --choices``: accuracy on multiple-choice records (``choices.py``); the last line is
    ``acc=<float> acc_norm=<float> questions=<int>``."""
    from apr_kernels.model.loading import check_tokenizer_vocab

    from .choices import read_choices, score_choices

    records = read_choices(args.choices)  # (a bad record fails before the model loads)
    model, autocast = load_model(args, dev, env)
    tok = load_tokenizer(args.tokenizer, model.apr_metadata, args.init)
    check_tokenizer_vocab(tok.vocab_size, model.config.vocab_size, f"{args.init}: tokenizer")
    res = score_choices(model, records, tok, batch_size=args.batch_size, device=dev, autocast_dtype=autocast, env=env,
                        sharded=args.parallel == "fsdp")
    if env is not None and not env.is_main:
        return 0
    if args.json:
        print(json.dumps({"event": "eval_choices", **{k: res[k] for k in ("acc", "acc_norm", "questions")}}))
    else:
        print(f"acc={res['acc']:.6f} acc_norm={res['acc_norm']:.6f} questions={res['questions']}")
    return 0


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct (Chen et al.,
    2021): ``1 - C(n - c, k) / C(n, k)``."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def eval_prompts(args, dev, env=None) -> int:
    """``eval --prompts``: completions of prompt records scored by ``--reward`` (functions or reward
    models, as ``grpo``'s): the mean reward, and with ``--num-samples N`` samples per prompt pass@k
    for each ``--pass-k`` (a sample passes when its reward is at least ``--pass-threshold``). The last
    line is ``reward=<float> pass@<k>=<float>... prompts=<int> samples=<int>``. Under torchrun
    (``env``) each rank samples and scores its share of the batches (the completions one process
    draws) and rank 0 prints the sums of all ranks'."""
    from apr_kernels.model.loading import check_tokenizer_vocab

    from .grpo import read_prompts
    from .rank_share import rank_batches, summed

    n = args.num_samples
    if not args.reward:
        raise ValueError("eval --prompts scores completions; give --reward FILE.py:NAME or RM.apr")
    if n < 1 or (n > 1 and args.temperature <= 0):
        raise ValueError(f"eval: --num-samples {n} with --temperature {args.temperature}; expected 1 greedy "
                         f"sample, or several sampled at a temperature > 0")
    ks = sorted(set(args.pass_k or ([1, n] if n > 1 else [1])))
    if any(k < 1 or k > n for k in ks):
        raise ValueError(f"eval: --pass-k {ks}; expected values in [1, --num-samples {n}]")
    model = inference_model(args.init, dev, args.quantize, env=env, what="eval")
    tok = load_tokenizer(args.tokenizer, model.apr_metadata, args.init)
    check_tokenizer_vocab(tok.vocab_size, model.config.vocab_size, f"{args.init}: tokenizer")
    rewards = reward_functions(args, model, env)
    records = read_prompts(args.prompts, tok, model.config.max_position_embeddings - args.max_new_tokens)
    sums = torch.zeros(1 + len(ks), dtype=torch.float64)  # the rewards' sum, each pass@k's
    starts, _ = rank_batches(len(records), args.batch_size, env)
    for part, lines in sampled_batches(model, tok, records, n, args, starts):
        judged = scored(lines, part, n, rewards, args.reward_weights, "all")
        sums[0] += sum(line["reward"] for line in judged)
        for start in range(0, len(judged), n):
            c = sum(line["reward"] >= args.pass_threshold for line in judged[start:start + n])
            sums[1:] += torch.tensor([pass_at_k(n, c, k) for k in ks], dtype=torch.float64)
    sums = summed(env, sums)
    if env is not None and not env.is_main:
        return 0
    total, passes = sums.tolist()[0], dict(zip(ks, sums.tolist()[1:]))
    res = {"reward": total / (len(records) * n), **{f"pass@{k}": passes[k] / len(records) for k in ks},
           "prompts": len(records), "samples": n}
    if args.json:
        print(json.dumps({"event": "eval_prompts", **res}))
    else:
        print(" ".join(f"{k}={v:.6f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()))
    return 0


def eval_pairs(args, dev, env=None) -> int:
    """``eval --pairs`` of a reward model: the share of preference pairs it scores the chosen side
    higher, the mean margin and the Bradley-Terry loss; the last line is ``accuracy=<float>
    margin=<float> loss=<float> pairs=<int>``."""
    from apr_kernels.model.loading import check_tokenizer_vocab

    from .reward import evaluate_pairs, read_pairs

    model, autocast = load_model(args, dev, env, classifier=True)
    tok = load_tokenizer(args.tokenizer, model.apr_metadata, args.init)
    check_tokenizer_vocab(tok.vocab_size, model.config.vocab_size, f"{args.init}: tokenizer")
    pairs, margins, dropped = read_pairs(args.pairs, tok, model.config.max_position_embeddings)
    res = evaluate_pairs(model, pairs, margins, eos_id=tok.eos_id, batch_size=args.batch_size, device=dev,
                         autocast_dtype=autocast, env=env, sharded=args.parallel == "fsdp")
    if env is not None and not env.is_main:
        return 0
    res["dropped_too_long"] = dropped
    if args.json:
        print(json.dumps({"event": "eval_pairs", **res}))
    else:
        print(f"accuracy={res['accuracy']:.6f} margin={res['margin']:.6f} loss={res['loss']:.6f} pairs={res['pairs']}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="mean next-token loss of an APR model on text, its accuracy on "
                                           "multiple-choice questions, or a reward model's on preference pairs")
    p.add_argument("--init", required=True, help="APR model file")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", nargs="+", help="text, JSON Lines or Parquet files, or folders")
    what.add_argument("--choices", nargs="+", metavar="FILE.jsonl",
                      help="multiple-choice questions {'context', 'choices', 'answer'}: accuracy by log-likelihood "
                           "(lm-evaluation-harness's acc and acc_norm)")
    what.add_argument("--prompts", nargs="+", metavar="FILE.jsonl",
                      help="prompts {'prompt': text or messages, ...}: the mean --reward of their completions, and "
                           "pass@k with --num-samples")
    what.add_argument("--pairs", nargs="+", metavar="FILE.jsonl",
                      help="a reward model's accuracy on preference pairs {'prompt', 'chosen', 'rejected'} (the "
                           "share with the chosen side scored higher)")
    p.add_argument("--reward", nargs="+", metavar="FILE.py:NAME|RM.apr", help="with --prompts: the scorers")
    p.add_argument("--reward-weights", nargs="+", type=float, default=None, help="one weight per --reward")
    p.add_argument("--num-samples", type=int, default=1, help="with --prompts: completions per prompt (default 1)")
    p.add_argument("--pass-k", nargs="+", type=int, default=None, help="with --prompts: the k of pass@k "
                                                                        "(default 1 and --num-samples)")
    p.add_argument("--pass-threshold", type=float, default=1.0,
                   help="with --prompts: a completion passes at a reward >= this (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="with --prompts: tokens per completion")
    p.add_argument("--temperature", type=float, default=0.0, help="with --prompts: 0 greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="with --prompts: sample among the k most likely (0: all)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    add_quantize_option(p)
    p.add_argument("--seq-len", type=int, default=None, help="default: the checkpoint's, else 256")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokenizer", help="default: the file's embedded tokenizer")
    p.add_argument("--text-field", default="text", help="the document field of .jsonl records (default text)")
    p.add_argument("--document-mask", action=argparse.BooleanOptionalAction, default=None,
                   help="attend only within each document (default: as the checkpoint was trained)")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default=None,
                   help="under torchrun: ddp (default) a whole model per rank, each scoring its share of the "
                        "batches; fsdp (not --prompts) the model sharded over the ranks, for one too big for a "
                        "device")
    p.add_argument("--fsdp-shard-size", type=int, default=None, metavar="N",
                   help="with --parallel fsdp: shard within groups of N ranks, replicate across them (HSDP)")
    add_tensor_parallel_option(p, "scoring")
    p.add_argument("--dist-timeout", type=float, default=600.0,
                   help="under torchrun: seconds a rank waits for the others before failing (default 600)")
    add_common_options(p)
    p.set_defaults(func=cmd_eval)
