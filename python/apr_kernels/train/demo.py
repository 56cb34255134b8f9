"""``apr-kernels demo``: the whole pipeline in about a minute on two CPU cores, offline.

1. corpus: real Python from CPython's standard library (``sysconfig.get_paths()["stdlib"]``, tests and
   third-party packages left out), files in a fixed shuffled order: the first files are held out for
   evaluation, the following ones are trained on;
2. tokenizer: the real Qwen2.5 vocabulary (``Tokenizer.qwen2()``, 151,665 tokens);
3. model: the ``qwen2_demo`` preset, Qwen2-shaped (GQA 7:1 with 14 query and 2 key/value heads, q/k/v
   bias, tied embeddings), with the vocabulary padded to 151,680; fresh weights, so the step-0 loss
   is about ln(151680) = 11.9;
4. training with the ordinary loop (AdamW, warmup + cosine, clipping), eval at the start, every
   ``eval_every`` steps and at the end, then an APR checkpoint ``<out>/model.apr``;
5. the checkpoint is loaded back with ``from_apr`` and evaluated exactly as ``apr-kernels eval`` does,
   which must reproduce the final eval loss; the command to do that by hand is printed.
"""

from __future__ import annotations

import math
import os
import random
import shlex
import sysconfig
import time
from pathlib import Path

import torch

from .loop import TrainConfig

# Cost is dominated by the 151,680-row output projection and its softmax: each token's logits are
# 600 KB in fp32, so steps are kept to 256 tokens (under 1 s on 2 cores).
SEQ_LEN = 64
BATCH = 4
STEPS = 60
EVAL_TOKENS = 512   # 8 held-out sequences
EVAL_EVERY = 15
LR = 5e-3
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings",
              "lib2to3", "turtledemo", "ensurepip", "config-3.11-x86_64-linux-gnu"}


def stdlib_files(seed: int = 1234) -> list[Path]:
    """The stdlib's own .py files in a fixed shuffled order (same order on every run)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith((".", "config-")))
        files.extend(Path(dirpath) / n for n in sorted(names) if n.endswith(".py"))
    if not files:
        raise RuntimeError(f"{root}: no Python files found in the standard library folder")
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    random.Random(seed).shuffle(files)
    return files


def split_files(files: list[Path], tokenizer, eval_tokens: int, train_tokens: int):
    """(eval files, train files): eval files cover ``eval_tokens + 1`` tokens, train files the rest."""
    from .data import tokenize_files

    eval_files, train_files, n_eval, n_train = [], [], 0, 0
    for f in files:
        try:
            n = len(tokenize_files([f], tokenizer))
        except OSError:
            continue
        if n_eval <= eval_tokens:
            eval_files.append(f)
            n_eval += n
        elif n_train < train_tokens:
            train_files.append(f)
            n_train += n
        else:
            break
    return eval_files, train_files


def run_demo(args) -> int:
    from apr_kernels.model import Transformer, pad_vocab, preset
    from apr_kernels.model.generate import generate
    from apr_kernels.tokenizer import Tokenizer

    from .cli import pick_device, run_training, tristate
    from .evaluation import evaluate_file
    from .data import tokenize_files

    t0 = time.perf_counter()
    out = Path(args.out)
    steps = args.steps or STEPS
    device = pick_device(args.device)
    tok = Tokenizer.qwen2()
    cfg = preset("qwen2_demo")
    cfg = cfg.replace(vocab_size=pad_vocab(tok.vocab_size), head_dim=cfg.head_dim)
    need = steps * BATCH * SEQ_LEN + 1
    eval_files, train_files = split_files(stdlib_files(), tok, EVAL_TOKENS, need)
    train_tokens = tokenize_files(train_files, tok, max_tokens=need)
    eval_tokens = tokenize_files(eval_files, tok, max_tokens=EVAL_TOKENS + 1)
    torch.manual_seed(0)
    model = Transformer(cfg, fast=tristate(args.fast)).to(device)
    print(f"demo: Qwen2-shaped model, {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_heads} query / {cfg.num_kv_heads} KV heads (GQA {cfg.num_groups}:1), "
          f"vocab {cfg.vocab_size}, {cfg.num_parameters() / 1e6:.1f}M parameters, on {device}")
    print(f"demo: data = CPython stdlib, Qwen2.5 tokenizer ({tok.vocab_size} tokens): "
          f"{train_tokens.numel()} training tokens from {len(train_files)} files, "
          f"{eval_tokens.numel() - 1} held-out tokens from {len(eval_files)} other files; "
          f"from-scratch loss ~ ln(vocab) = {math.log(cfg.vocab_size):.2f}")
    tcfg = TrainConfig(steps=steps, batch_size=BATCH, seq_len=SEQ_LEN, lr=LR, warmup=max(1, steps // 10),
                       weight_decay=0.0, eval_every=EVAL_EVERY, eval_tokens=EVAL_TOKENS, log_every=5,
                       seed=0)
    spec = {"data": [str(f) for f in train_files], "eval_data": [str(f) for f in eval_files],
            "eval_fraction": 0.0, "max_tokens": need}
    trainer = run_training(model, tok, train_tokens, eval_tokens, tcfg, out, data_spec=spec,
                           json_lines=args.json, progress=False if args.no_progress else None)
    evals = [h for h in trainer.history if h["event"] == "eval"]
    first, last = evals[0]["eval_loss"], evals[-1]["eval_loss"]
    ckpt = out / "model.apr"
    print(f"demo: held-out loss fell from {first:.3f} (step 0) to {last:.3f} (step {trainer.step}); "
          f"checkpoint {ckpt} ({ckpt.stat().st_size / 2**20:.0f} MiB)")
    loss, n = evaluate_file(str(ckpt), [str(f) for f in eval_files], seq_len=SEQ_LEN,
                            max_tokens=EVAL_TOKENS, device=args.device, fast=tristate(args.fast))
    match = "reproduces" if abs(loss - last) <= 1e-4 * max(1.0, abs(last)) else "DOES NOT reproduce"
    print(f"demo: reloaded checkpoint {match} the final eval loss ({loss:.6f} vs {last:.6f}); "
          f"by hand:\n  apr-kernels eval --init {shlex.quote(str(ckpt))} --data "
          + " ".join(shlex.quote(str(f)) for f in eval_files)
          + f" --seq-len {SEQ_LEN} --max-tokens {EVAL_TOKENS}")
    prompt = "def "
    prompt_ids = tok.encode(prompt, special=False)
    ids = generate(trainer.model, torch.tensor([prompt_ids]), 48, temperature=0.8, top_k=50, eos_id=tok.eos_id,
                   generator=torch.Generator().manual_seed(0), vocab_size=tok.vocab_size)
    new = ids[0, len(prompt_ids):].tolist()
    new = new[:new.index(tok.eos_id)] if tok.eos_id in new else new
    print(f"demo: a sample from the trained model (apr-kernels generate --init {shlex.quote(str(ckpt))} "
          f"--prompt {shlex.quote(prompt)}):\n" + "\n".join("  | " + line for line in (prompt + tok.decode(new)).splitlines()))
    print(f"demo: done in {time.perf_counter() - t0:.0f} s")
    print(f"eval_loss={loss:.6f} tokens={n}")
    return 0 if match == "reproduces" else 1
