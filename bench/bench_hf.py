"""A transformers model's training step, plain, with ``apr_kernels.patch_hf_model`` and with Liger-Kernel.

    python3 bench/bench_hf.py [--smoke | --quick] [--out DIR]

transformers' ``Qwen2ForCausalLM`` with Qwen2-0.5B's shape (24 layers, GQA 7:1, vocabulary 151,936;
random weights, fp32 master weights under bf16 autocast on CUDA), one forward and backward of the
causal-LM loss on random tokens (batch 4 x 2048; no optimizer step: the kernels' share), in one run on
one device:

  apr        apr_kernels.patch_hf_model(model): RMSNorm, SwiGLU, RoPE, the "apr_kernels" attention,
             the fused linear cross entropy (no logits)
  sdpa       the model as transformers builds it (attn_implementation="sdpa")
  liger      Liger-Kernel's _apply_liger_kernel_to_instance(model), when importable (CUDA)

Rows: op hf_train_step, shape, provider, ms (median step), tok_s, peak_mem_mb (CUDA allocator peak
over a step). --quick: 3 timed steps; --smoke: a 2-layer, 512-vocabulary model on any device (CPU:
the package's ops run their PyTorch reference).
"""

from __future__ import annotations

import importlib

import _common
import torch


def build(smoke: bool):
    import transformers

    kw = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
              tie_word_embeddings=True, attn_implementation="sdpa")
    if smoke:
        kw.update(hidden_size=112, intermediate_size=304, num_hidden_layers=2, num_attention_heads=7,
                  num_key_value_heads=1, vocab_size=512)
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))


def providers(dev: torch.device) -> dict:
    import apr_kernels

    out = {"sdpa": lambda m: m, "apr": apr_kernels.patch_hf_model}
    if dev.type == "cuda":
        try:
            from liger_kernel.transformers import _apply_liger_kernel_to_instance

            def liger(m):
                _apply_liger_kernel_to_instance(model=m)
                return m

            out["liger"] = liger
        except Exception as e:  # noqa: BLE001
            print(f"liger: not importable ({type(e).__name__}: {e}); skipped")
    return out


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0])
    dev = _common.device()
    try:
        importlib.import_module("transformers")
    except ImportError as e:  # (an image without it: say so, and leave a result that holds no rows)
        print(f"transformers: not importable ({e}); nothing to measure")
        print(f"wrote {_common.write_results('hf', [], args.out, {'note': 'transformers not installed'})}")
        return
    batch, seq = (2, 64) if args.smoke else (4, 2048)
    shape = f"qwen2-0.5b {batch}x{seq}" if not args.smoke else f"tiny {batch}x{seq}"
    rows = []
    # both patches replace the modeling module's apply_rotary_pos_emb for the whole process: each
    # provider starts from transformers' own
    from transformers.models.qwen2 import modeling_qwen2

    own_rope = modeling_qwen2.apply_rotary_pos_emb
    for name, patch in providers(dev).items():
        modeling_qwen2.apply_rotary_pos_emb = own_rope
        model = build(args.smoke).to(dev).train()
        try:
            model = patch(model)
        except Exception as e:  # noqa: BLE001  (a baseline that cannot patch this transformers: say so)
            print(f"{name}: patching failed ({type(e).__name__}: {e}); skipped")
            continue
        x = torch.randint(0, model.config.vocab_size, (batch, seq), device=dev)

        def step(model=model, x=x):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                loss = model(x, labels=x).loss
            loss.backward()
            model.zero_grad(set_to_none=True)

        try:
            ms = _common.time_ms(step, warmup=1 if args.smoke else 2, rep=2 if args.smoke else (3 if args.quick else 6),
                                 dev=dev)
            peak = _common.peak_memory_mb(step, dev=dev)
        except Exception as e:  # noqa: BLE001
            print(f"{name}: step failed ({type(e).__name__}: {e}); skipped")
            continue
        rows.append({"op": "hf_train_step", "shape": shape, "provider": name, "ms": ms,
                     "tok_s": batch * seq / ms * 1e3, "peak_mem_mb": peak})
        print(f"{name}: {ms:.2f} ms, {rows[-1]['tok_s']:.0f} tok/s, peak {peak} MB")
        del model, step
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    path = _common.write_results("hf", rows, args.out)
    _common.print_table(rows, ["shape", "provider", "ms", "tok_s", "peak_mem_mb"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
