"""``apr-kernels generate`` and ``chat``: text from a trained model.

    apr-kernels generate --init model.apr --prompt "def fib(n):" --max-new-tokens 64
    apr-kernels generate --init model.apr --prompts prompts.jsonl --num-return-sequences 4 \\
        --reward rewards.py:exact --keep best --output best.jsonl
    apr-kernels chat --init model.apr

One prompt (``--prompt``, or a user message with ``--chat``), a file of prompt records decoded in
batches with optional scoring (``--prompts``; best-of-N and preference pairs with ``--keep``), or a
conversation on the terminal. ``sampled_batches`` and ``scored`` also serve ``eval --prompts``.
Under torchrun a file of prompts is shared among the ranks, a whole model on each (``rank_share.py``):
every rank decodes every N-th batch, rank 0 gathers and writes them in order; with ``--tensor-parallel
T`` each group of T ranks holds one model split between them and decodes its batches together. One
prompt (``--prompt``) or a ``chat`` runs under torchrun only on one model split over all the ranks
(``whole_world``): each rank decodes the same tokens, rank 0 reads the terminal and prints.
"""

from __future__ import annotations

import json
import sys

import torch

from .cli import load_tokenizer


def as_quantized(model, kind: str | None, path):
    """``model`` as ``convert path out.apr --quantize kind`` would store it (``--quantize``; None: as is)."""
    if kind:
        from .qat import quantize_as_converted

        quantize_as_converted(model, kind, path)
    return model


def inference_model(path, dev: torch.device, quantize: str | None = None, *, env=None, what: str = "generate"):
    """An APR model to decode with: bf16 on CUDA; with ``quantize`` (``--quantize KIND``) as ``convert
    --quantize KIND`` would write it, quantised from the stored weights before halving them; under
    ``--tensor-parallel`` (``env.model_split``) split over each group of ranks
    (``rank_share.split_model``; ``what``: the command)."""
    from apr_kernels.model.loading import from_apr

    half = torch.bfloat16 if dev.type == "cuda" else None
    if env is not None and env.model_split is not None:
        from .rank_share import split_model

        return split_model(path, env, what, fast=False, dtype=half)
    model = as_quantized(from_apr(path, device=dev, dtype=None if quantize else half, fast=False), quantize, path)
    return model.to(half) if quantize and half is not None else model


def add_tensor_parallel_option(p, work: str) -> None:
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="T",
                   help=f"under torchrun: split the model over groups of T consecutive ranks (each rank its heads "
                        f"and MLP rows of every layer, for a model too big for one device), the groups sharing the "
                        f"{work} (default 1: a whole model per rank)")


def add_quantize_option(p) -> None:
    from apr_kernels.convert.recipe import RUN_CHOICES

    p.add_argument("--quantize", choices=RUN_CHOICES, default=None, metavar="KIND",
                   help="run the model as `convert --quantize KIND` (q4k, q6k, q8, q4, q4km) would store it, or as "
                        "`export --quantize KIND` writes it for llama.cpp (gguf:q4km, gguf:q4ks, gguf:q5km, gguf:q5ks, "
                        "gguf:q6k, gguf:q8_0), without writing the file")


def cmd_generate(args) -> int:
    """``generate``: continue a prompt with a trained model (look at what a run learned); under
    torchrun each rank decodes its share of ``--prompts``' batches and rank 0 writes them in order."""
    from .rank_share import on_ranks

    refuse = None if args.prompts or args.tensor_parallel != 1 else (
        "generate under torchrun shares a file of prompts among the ranks; give --prompts FILE.jsonl (a single "
        "prompt runs in one process, or on a model split over all the ranks with --tensor-parallel N)")
    split_or_quantized(args, "generate")
    return on_ranks(args, lambda dev, env: _generate(args, dev, env), refuse)


def split_or_quantized(args, what: str) -> None:
    """``--tensor-parallel`` and ``--quantize`` do not combine: refused by name."""
    if args.tensor_parallel != 1 and args.quantize:
        raise ValueError(f"{what} --tensor-parallel {args.tensor_parallel} with --quantize {args.quantize}: the "
                         f"quantised copy is made whole on one device; expected one of the two")


def _generate(args, dev, env) -> int:
    from apr_kernels.model.generate import generate
    from apr_kernels.model.loading import check_tokenizer_vocab

    from .data import document_bos

    model = inference_model(args.init, dev, args.quantize, env=env)
    tok = load_tokenizer(args.tokenizer, model.apr_metadata, args.init)
    check_tokenizer_vocab(tok.vocab_size, model.config.vocab_size, f"{args.init}: tokenizer")
    if (args.reward or args.keep != "all") and not args.prompts:
        raise ValueError("generate: --reward and --keep score a file of prompts; give --prompts FILE.jsonl")
    if args.prompts:  # many prompts from JSON Lines, decoded in batches
        return generate_file(args, model, tok, env)
    whole_world(env, "generate --prompt")
    eos = getattr(tok, "eos_id", None)
    stops = {eos} if eos is not None else set()
    if args.chat:  # the prompt is a user message; the answer stops at the token closing the turn
        from .chat import generation_prompt

        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": args.prompt}]
        text, close = generation_prompt(messages, tok)
        prompt = tok.encode(text, special=True)
        stops.add(close)
    else:
        prompt = tok.encode(args.prompt, special=False) if args.prompt else []
        bos = document_bos(tok)
        if bos is not None:  # documents start so in training
            prompt = [bos] + prompt
    if not prompt:  # an empty prompt starts a fresh document: what follows an end-of-text id in training
        if eos is None:
            raise ValueError(f"{args.init}: an empty --prompt needs the tokenizer's end-of-text id; give a prompt")
        prompt = [eos]
    gen = torch.Generator().manual_seed(args.seed)
    ids = generate(model, torch.tensor([prompt]), args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k or None, top_p=args.top_p, eos_id=stops or None, generator=gen,
                   vocab_size=tok.vocab_size)[0].tolist()
    new = ids[len(prompt):]
    cut = next((i for i, t in enumerate(new) if t in stops), None)
    if cut is not None:
        new = new[:cut]
    # the text the new tokens add to the prompt's (a SentencePiece decode of them alone would drop
    # the space that starts the first)
    completion = tok.decode(prompt + new)[len(tok.decode(prompt)):]
    if env is not None and not env.is_main:  # (the group's ranks decoded the same tokens)
        return 0
    if args.json:
        print(json.dumps({"event": "generate", "prompt": args.prompt, "completion": completion,
                          "tokens": len(new)}))
    else:
        print(completion if args.chat else args.prompt + completion)
    return 0


def whole_world(env, what: str) -> None:
    """One prompt or conversation under torchrun: only on one model split over every rank (each
    rank then decodes the same tokens, rank 0 prints), since several copies would all answer it."""
    if env is not None and (env.model_split is None or env.model_split.size != env.world_size):
        split = env.model_split.size if env.model_split is not None else 1
        raise ValueError(f"{what} under torchrun: one prompt for one model; with --tensor-parallel {split} the "
                         f"{env.world_size} ranks would hold {env.world_size // split} copies answering it alike; "
                         f"expected --tensor-parallel {env.world_size} (one copy split over all the ranks)")


def cmd_chat(args) -> int:
    """``chat``: a conversation with a model on the terminal: each line of standard input is a user
    turn, answered in the model's chat format with the whole conversation so far as the prompt
    (``/reset`` starts over; an empty line or the end of input ends). Each answer is printed as one
    line (newlines inside it kept as ``\\n`` when ``--json``: one JSON object per turn)."""
    from .rank_share import on_ranks

    refuse = None if args.tensor_parallel != 1 else (
        "chat is a conversation on one terminal: run it in one process, not under torchrun (or on a model split "
        "over all the ranks with --tensor-parallel N)")
    split_or_quantized(args, "chat")
    return on_ranks(args, lambda dev, env: _chat(args, dev, env), refuse)


def _user_lines(env):
    """The conversation's lines from standard input: under torchrun rank 0 reads them and hands each
    to the other ranks (which wait for it up to --dist-timeout), None closing."""
    if env is None:
        yield from sys.stdin
        return
    import torch.distributed as dist

    lines = iter(sys.stdin) if env.is_main else None
    while True:
        box = [next(lines, None) if env.is_main else None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return
        yield box[0]


def _chat(args, dev, env) -> int:
    from apr_kernels.model.generate import generate
    from apr_kernels.model.loading import check_tokenizer_vocab

    from .chat import generation_prompt

    whole_world(env, "chat")
    model = inference_model(args.init, dev, args.quantize, env=env, what="chat")
    tok = load_tokenizer(args.tokenizer, model.apr_metadata, args.init)
    check_tokenizer_vocab(tok.vocab_size, model.config.vocab_size, f"{args.init}: tokenizer")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    gen = torch.Generator().manual_seed(args.seed)
    for line in _user_lines(env):
        text = line.rstrip("\n")
        if not text.strip():
            break
        if text.strip() == "/reset":
            history = []
            continue
        history.append({"role": "user", "content": text})
        prompt_text, close = generation_prompt(system + history, tok)
        prompt = tok.encode(prompt_text, special=True)
        if len(prompt) + args.max_new_tokens > model.config.max_position_embeddings:
            raise ValueError(f"chat: the conversation ({len(prompt)} tokens) + --max-new-tokens {args.max_new_tokens} "
                             f"exceeds the model's {model.config.max_position_embeddings} positions; /reset it")
        stops = {close} | ({tok.eos_id} if getattr(tok, "eos_id", None) is not None else set())
        ids = generate(model, torch.tensor([prompt]), args.max_new_tokens, temperature=args.temperature,
                       top_k=args.top_k or None, top_p=args.top_p, eos_id=stops, generator=gen,
                       vocab_size=tok.vocab_size)[0].tolist()
        new = ids[len(prompt):]
        cut = next((i for i, t in enumerate(new) if t in stops), None)
        answer = tok.decode(prompt + (new if cut is None else new[:cut]))[len(tok.decode(prompt)):]
        history.append({"role": "assistant", "content": answer})
        if env is None or env.is_main:
            print(json.dumps({"event": "chat", "user": text, "assistant": answer}) if args.json else answer,
                  flush=True)
    return 0


def generate_file(args, model, tok, env=None) -> int:
    """``generate --prompts FILE.jsonl...``: ``--num-return-sequences`` completions of each record's
    ``prompt`` (a string, continued as text, or a list of messages, answered in the chat format),
    decoded ``--batch-size`` prompts at a time (left-padded, ``generate_batch``); one JSON line per
    completion, the record with ``completion`` (a string, or ``[{"role": "assistant", ...}]``) and
    ``sample`` added, to ``--output`` or stdout. Each prompt samples with a generator seeded by
    ``--seed`` and its place in the files, so the batch size changes nothing.

    With ``--reward`` (functions or reward model files, as ``grpo`` takes them, summed with
    ``--reward-weights``) each line also gets its ``reward``, and ``--keep`` chooses what is written:
    every completion (``all``), the best of each prompt's (``best``: best-of-N, rejection sampling's
    supervised data) or its best and worst as a preference pair (``pairs``: ``{"prompt", "chosen",
    "rejected"}`` with both rewards, for ``dpo`` or ``reward``; prompts whose completions all score
    alike give none). Ties go to the lower sample number. Under torchrun (``env``) each rank decodes
    and scores its share of the batches (``rank_batches``) and rank 0 writes every rank's lines in the
    order one process writes them: the same file."""
    from .grpo import read_prompts
    from .rank_share import gathered, rank_batches

    n = args.num_return_sequences
    if n < 1 or args.batch_size < 1:
        raise ValueError(f"generate: --num-return-sequences {n} and --batch-size {args.batch_size}; expected >= 1")
    if args.keep != "all" and not args.reward:
        raise ValueError(f"generate: --keep {args.keep} needs --reward (the scores that choose)")
    if args.keep == "pairs" and n < 2:
        raise ValueError(f"generate: --keep pairs needs --num-return-sequences >= 2 (got {n})")
    rewards = reward_functions(args, model, env)
    records = read_prompts(args.prompts, tok, model.config.max_position_embeddings - args.max_new_tokens)
    starts, rounds = rank_batches(len(records), args.batch_size, env)
    batches = sampled_batches(model, tok, records, n, args, starts)
    writes = env is None or env.is_main
    out = (open(args.output, "w", encoding="utf-8") if args.output else sys.stdout) if writes else None
    try:
        for _ in range(rounds):
            mine = next(batches, None)  # (none in a last round with fewer batches than ranks)
            lines = gathered(env, scored(mine[1], mine[0], n, rewards, args.reward_weights, args.keep) if mine else [])
            if writes:
                out.writelines(json.dumps(line) + "\n" for line in lines)
                out.flush()
    finally:
        if out is not None and out is not sys.stdout:
            out.close()
    return 0


def reward_functions(args, model, env=None) -> dict:
    """``generate --reward``'s functions by name (``grpo.load_reward``; reward models on the model's
    device, in bf16 on CUDA as the sampling runs; under ``--tensor-parallel`` split like the model
    over each group of ranks, ``cli.split_frozen``)."""
    if not args.reward:
        if args.reward_weights:
            raise ValueError("generate: --reward-weights needs --reward")
        return {}
    from .grpo import load_reward, reward_name

    dev = model.model.embed_tokens.weight.device
    split = {"env": env, "mode": "ddp", "tensor": env.model_split} if env is not None and env.model_split else {}
    return {reward_name(spec): load_reward(spec, device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else None,
                                           **(split if spec.endswith(".apr") else {}))
            for spec in args.reward}


def sampled_batches(model, tok, records: list[dict], n: int, args, starts=None):
    """``(records, lines)`` of each batch of ``--batch-size`` prompt records (those beginning at
    ``starts``, default all): ``n`` completions of each, decoded together (left-padded,
    ``generate_batch``; each prompt's generator seeded by ``--seed`` and its place in the files), as
    lines ``{"prompt", **fields, "completion", "sample", "_ids"}``."""
    from apr_kernels.model.generate import generate_batch

    dev = model.model.embed_tokens.weight.device  # (sampling on the device: no copy to the host)
    for start in range(0, len(records), args.batch_size) if starts is None else starts:
        part = records[start:start + args.batch_size]
        gens = [(n, torch.Generator(dev).manual_seed(args.seed * 1_000_003 + start + k)) for k in range(len(part))]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            done = generate_batch(model, [r["ids"] for r in part for _ in range(n)], args.max_new_tokens,
                                  stops=[r["stops"] for r in part for _ in range(n)], generators=gens,
                                  temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                                  vocab_size=tok.vocab_size)
        lines = []
        for i, ids in enumerate(done):
            r = part[i // n]
            new = [t for t in ids if t not in r["stops"]]
            # the text the new tokens add to the prompt's (SentencePiece: the first one's space)
            text = tok.decode(r["ids"] + new)[len(tok.decode(r["ids"])):]
            answer = [{"role": "assistant", "content": text}] if isinstance(r["prompt"], list) else text
            lines.append({"prompt": r["prompt"], **r["fields"], "completion": answer, "sample": i % n, "_ids": new})
        yield part, lines


def scored(lines: list[dict], records: list[dict], n: int, functions: dict, reward_weights, keep: str) -> list[dict]:
    """The lines of one batch as ``--keep`` says (``_generate_file``), with their rewards."""
    ids = [line.pop("_ids") for line in lines]
    if not functions:
        return lines
    from .grpo import score

    weights = list(reward_weights) if reward_weights else [1.0] * len(functions)
    if len(weights) != len(functions):
        raise ValueError(f"--reward-weights: {len(weights)} weight(s) for {len(functions)} reward function(s)")
    total, table = score(functions, weights, [line["prompt"] for line in lines], [line["completion"] for line in lines],
                         ids, [r["fields"] for r in records for _ in range(n)])
    for k, line in enumerate(lines):
        line["reward"] = float(total[k])
        if len(functions) > 1:
            line["rewards"] = {name: (None if v != v else v) for name, v in zip(functions, table[:, k].tolist())}
    if keep == "all":
        return lines
    kept = []
    for start in range(0, len(lines), n):
        group = lines[start:start + n]
        order = sorted(range(n), key=lambda k: (-group[k]["reward"], k))
        best, worst = group[order[0]], group[order[-1]]
        if keep == "best":
            kept.append(best)
        elif best["reward"] > worst["reward"]:
            fields = {k: v for k, v in best.items() if k not in ("completion", "sample", "reward", "rewards")}
            kept.append({**fields, "chosen": best["completion"], "rejected": worst["completion"],
                         "chosen_reward": best["reward"], "rejected_reward": worst["reward"]})
    return kept


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="continue a prompt with an APR model (sampling, KV cache)")
    p.add_argument("--init", required=True, help="APR model file")
    p.add_argument("--prompt", default="", help="text to continue (default: a fresh document)")
    p.add_argument("--prompts", nargs="+", metavar="FILE.jsonl",
                   help="instead of --prompt: JSON Lines of {'prompt': text or messages, ...}; one JSON line per "
                        "completion (the record plus 'completion' and 'sample'); under torchrun each rank decodes "
                        "its share of the batches, rank 0 writes")
    p.add_argument("--output", help="with --prompts: write the JSON lines here (default stdout)")
    p.add_argument("--batch-size", type=int, default=16, help="with --prompts: prompts decoded together")
    p.add_argument("--num-return-sequences", type=int, default=1, help="with --prompts: completions per prompt")
    p.add_argument("--reward", nargs="+", metavar="FILE.py:NAME|RM.apr",
                   help="with --prompts: score each completion (reward functions or reward models, as grpo's)")
    p.add_argument("--reward-weights", nargs="+", type=float, default=None, help="one weight per --reward (default 1)")
    p.add_argument("--keep", choices=("all", "best", "pairs"), default="all",
                   help="with --reward: every completion, each prompt's best (best-of-N), or its best and worst as a "
                        "preference pair {'prompt', 'chosen', 'rejected'}")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set reaching p")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true",
                   help="the prompt is a user message in the model's chat format (ChatML / Llama 3); print "
                        "the answer, stopping at the end of the assistant's turn")
    p.add_argument("--system", default=None, help="with --chat: a system message before the user's")
    p.add_argument("--tokenizer", help="default: the file's embedded tokenizer")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the text")
    add_quantize_option(p)
    add_tensor_parallel_option(p, "batches of --prompts")
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("chat", help="talk to an APR model on the terminal (one user turn per line)")
    p.add_argument("--init", required=True, help="APR model file")
    p.add_argument("--system", default=None, help="a system message before the conversation")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="default: the file's embedded tokenizer")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="one JSON object per turn")
    add_quantize_option(p)
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="under torchrun: the model split over all N ranks (each its heads and MLP rows of every "
                        "layer, for a model too big for one device); rank 0 reads the terminal")
    p.add_argument("--dist-timeout", type=float, default=86400.0,
                   help="under torchrun: seconds the other ranks wait for rank 0's next line (default a day)")
    p.set_defaults(func=cmd_chat)
