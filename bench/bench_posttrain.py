"""Post-training speed: a DPO step and a reward-model step on padded vs padding-free batches, and
GRPO's sampling one prompt at a time vs all prompts in one left-padded batch, in one run on one device.

Rows (``op``, ``provider``):

* ``dpo_step``: one ``PreferenceTrainer`` step (forward and backward of both answers of every pair)
  on pairs whose prompts and answers have varied lengths (the padding a real batch carries):
  ``eager-padded`` (eager PyTorch, padded rows: what a plain implementation runs), ``fused-padded``
  (the package's kernels on padded rows) and ``fused-padding-free`` (ours: the answers packed into
  one row, each its own document, through the packed-sequence attention kernel);
* ``reward_step``: one ``RewardTrainer`` step (``apr-kernels reward``: both sides of every pair scored by
  a one-label head on the last token) on the same kind of pairs, the same three providers;
* ``grpo_sampling``: ``num_generations`` completions of each of ``prompts`` prompts of varied
  lengths with the KV cache, ``per-prompt`` (one ``generate`` call per prompt's group) vs
  ``batched`` (ours: ``generate_batch`` over all of them, left-padded); a fixed number of new tokens
  (no stop id), so both decode the same work.

ms (median), tokens_per_s (real tokens: no padding counted), peak_mem_mb. Model: ``qwen2_0_5b`` on
CUDA (bf16 autocast), 2 of its layers on CPU; ``--smoke``: tiny_qwen2, a code-path check.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def _pairs(n: int, vocab: int, prompt: tuple[int, int], answer: tuple[int, int], seed: int = 0):
    """``n`` (chosen, rejected) marked id lists with prompt and answer lengths drawn from the ranges."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(0, vocab, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()

    out = []
    for _ in range(n):
        p = [-1 - t for t in ids(*prompt)]
        out.append((p + ids(*answer), p + ids(*answer)))
    return out


def dpo_rows(cfg, dev, pairs_per_step: int, prompt, answer, warmup: int, steps: int) -> list[dict]:
    from apr_kernels.train.preference import PreferenceTrainer

    def trainer(model, pairs, cfgt, packed):
        return PreferenceTrainer(model, pairs, [], cfgt, eos_id=cfg.vocab_size - 1, device=dev, padding_free=packed,
                                 ref=(torch.zeros(len(pairs), 2), None))  # the reference pass is not timed

    pairs = _pairs(pairs_per_step * (warmup + steps), cfg.vocab_size, prompt, answer)
    return _step_rows("dpo_step", cfg, dev, pairs, trainer, pairs_per_step, prompt, answer, warmup, steps)


def reward_rows(cfg, dev, pairs_per_step: int, prompt, answer, warmup: int, steps: int) -> list[dict]:
    """A reward model's step (``apr-kernels reward``) on the same kind of pairs."""
    from apr_kernels.train.reward import RewardTrainer

    def trainer(model, pairs, cfgt, packed):
        return RewardTrainer(model, pairs, [0.0] * len(pairs), [], [], cfgt, eos_id=cfg.vocab_size - 1, device=dev,
                             padding_free=packed)

    pairs = [tuple([t if t >= 0 else -1 - t for t in s] for s in pair)  # (every token scored)
             for pair in _pairs(pairs_per_step * (warmup + steps), cfg.vocab_size, prompt, answer)]
    return _step_rows("reward_step", cfg.replace(num_labels=1), dev, pairs, trainer, pairs_per_step, prompt, answer,
                      warmup, steps)


def _step_rows(op: str, cfg, dev, pairs, make_trainer, pairs_per_step: int, prompt, answer, warmup: int,
               steps: int) -> list[dict]:
    """Median step time of ``make_trainer(model, pairs, cfg, padding_free)`` on eager padded rows, the
    fused path's padded rows and its padding-free rows."""
    from apr_kernels.model import Transformer
    from apr_kernels.train.loop import TrainConfig

    real = sum(len(s) - 1 for pair in pairs for s in pair) / len(pairs) * pairs_per_step
    rows = []
    for provider, fast, packed in (("eager-padded", False, False), ("fused-padded", True, False),
                                   ("fused-padding-free", True, True)):
        torch.manual_seed(0)
        model = Transformer(cfg, fast=fast).to(dev)
        cfgt = TrainConfig(steps=warmup + steps, batch_size=pairs_per_step, seq_len=prompt[1] + answer[1], lr=1e-6,
                           warmup=0)
        trainer = make_trainer(model, pairs, cfgt, packed)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            trainer.train_step()  # ends in a host read of the loss: a device sync
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        s = statistics.median(times)
        rows.append({"op": op, "pairs": pairs_per_step, "prompt": f"{prompt[0]}-{prompt[1]}",
                     "answer": f"{answer[0]}-{answer[1]}", "provider": provider, "ms": s * 1e3,
                     "tokens_per_s": real / s,
                     "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None})
        del model, trainer
    return rows


def grpo_rows(cfg, dev, prompts: int, generations: int, prompt, new_tokens: int, reps: int) -> list[dict]:
    from apr_kernels.model import Transformer
    from apr_kernels.model.generate import generate, generate_batch

    torch.manual_seed(0)
    model = Transformer(cfg, fast=False).to(dev)
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, cfg.vocab_size, (int(torch.randint(prompt[0], prompt[1] + 1, (1,), generator=g)),),
                         generator=g).tolist() for _ in range(prompts)]

    def per_prompt():
        for k, p in enumerate(ids):
            generate(model, torch.tensor([p] * generations), new_tokens, temperature=1.0,
                     generator=torch.Generator(dev).manual_seed(k))

    def batched():
        generate_batch(model, [p for p in ids for _ in range(generations)], new_tokens, temperature=1.0,
                       generators=[(generations, torch.Generator(dev).manual_seed(k)) for k in range(len(ids))])

    rows = []
    for provider, fn in (("per-prompt", per_prompt), ("batched", batched)):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            ms = _common.time_ms(fn, warmup=1, rep=reps, dev=dev)
        rows.append({"op": "grpo_sampling", "prompts": prompts, "generations": generations,
                     "prompt": f"{prompt[0]}-{prompt[1]}", "new_tokens": new_tokens, "provider": provider, "ms": ms,
                     "tokens_per_s": prompts * generations * new_tokens / (ms / 1e3)})
    return rows


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0],
                              lambda p: p.add_argument("--layers", type=int, default=None,
                                                       help="override the number of layers"))
    from apr_kernels.model import preset

    dev = _common.device()
    if args.smoke:
        cfg = preset("tiny_qwen2")
        dpo = dict(pairs_per_step=2, prompt=(4, 12), answer=(2, 10), warmup=1, steps=1)
        grpo = dict(prompts=2, generations=2, prompt=(3, 9), new_tokens=4, reps=2)
    elif dev.type == "cuda":
        cfg = preset("qwen2_0_5b")
        dpo = dict(pairs_per_step=8, prompt=(64, 512), answer=(32, 512), warmup=2, steps=5 if not args.quick else 3)
        grpo = dict(prompts=8, generations=8, prompt=(32, 256), new_tokens=128, reps=3 if not args.quick else 2)
    else:
        cfg = preset("qwen2_0_5b").replace(num_layers=2)
        dpo = dict(pairs_per_step=4, prompt=(32, 128), answer=(16, 128), warmup=1, steps=2)
        grpo = dict(prompts=4, generations=4, prompt=(16, 64), new_tokens=16, reps=2)
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    print(f"{cfg.num_layers} layers, {cfg.num_parameters() / 1e6:.0f}M parameters, on {dev}")
    rows = dpo_rows(cfg, dev, **dpo) + reward_rows(cfg, dev, **dpo) + grpo_rows(cfg, dev, **grpo)
    _common.print_table(rows, ["op", "provider", "ms", "tokens_per_s", "peak_mem_mb"])
    by = {(r["op"], r["provider"]): r for r in rows}
    print(f"dpo step: padding-free {by['dpo_step', 'fused-padded']['ms'] / by['dpo_step', 'fused-padding-free']['ms']:.2f}x "
          f"the padded fused step, {by['dpo_step', 'eager-padded']['ms'] / by['dpo_step', 'fused-padding-free']['ms']:.2f}x "
          f"the eager one; reward step: padding-free "
          f"{by['reward_step', 'fused-padded']['ms'] / by['reward_step', 'fused-padding-free']['ms']:.2f}x the padded "
          f"fused step; grpo sampling: batched "
          f"{by['grpo_sampling', 'per-prompt']['ms'] / by['grpo_sampling', 'batched']['ms']:.2f}x per-prompt")
    print("wrote", _common.write_results("posttrain", rows, args.out, {"ours": ["fused-padding-free", "batched"]}))


if __name__ == "__main__":
    main()
