"""Mixture-of-experts experts: the routed SwiGLU experts of one layer, forward and forward+backward.

    python3 bench/bench_moe.py [--smoke | --quick] [--out DIR]

Shapes: the expert layouts of Qwen3-30B-A3B (hidden 2048, 128 experts of 768, top 8), Qwen1.5-MoE-A2.7B
(2048, 60 x 1408, top 4) and Mixtral-8x7B (4096, 8 x 14336, top 2) at 8192 tokens (full: 4096 and 16384
too), bf16 weights and activations, tokens routed by a random router (softmax, top k; seeded). The
timed step starts from the tokens sorted by expert (the sort and the weighting are the same for
every provider) and ends with the experts' outputs: gate and up projections, SwiGLU, down
projection. Providers, in one run on one device:

  apr                 SparseMoE's fast path: apr_kernels.grouped_mm x 3 + swiglu, the experts' own
                      nn.Linear weights read in place, no host sync
  loop                one GEMM chain per expert on its rows (group sizes read on the host), what
                      Hugging Face's eager MoE blocks and the package's LoRA path do
  apr_stacked         the same kernels on transformers' stacked layout ([E, 2I, h] gate_up_proj and
                      [E, h, I] down_proj, stacked once beforehand): ``patch_hf_model(experts=True)``
  torch_grouped_mm    torch.nn.functional.grouped_mm (CUTLASS on sm_90) on that stacked layout, as
                      transformers' default ``grouped_mm`` experts implementation runs it (skipped
                      where this torch has no grouped_mm or refuses the input)

Rows: op moe_experts, model, mode fwd | fwd_bwd (gradients of the tokens and every weight), shape
(tokens x choices), provider, ms, flops (forward 3 GEMMs: 6·T·k·h·I; fwd+bwd 3x that), tflops,
``vs_loop`` and ``vs_grouped_mm`` on apr rows and ``vs_grouped_mm`` on apr_stacked rows (their ms /
ours). --quick: 8192 tokens only;
--smoke: a tiny layout in fp32 on any device.
"""

from __future__ import annotations

import _common
import torch
import torch.nn.functional as F

import apr_kernels

# name: (hidden, experts, expert intermediate, top k)
MODELS = {"qwen3-30b-a3b": (2048, 128, 768, 8), "qwen1.5-moe-a2.7b": (2048, 60, 1408, 4),
          "mixtral-8x7b": (4096, 8, 14336, 2)}


class Experts:
    """One layer's experts as separate [out, in] weights, and the routed, sorted tokens."""

    def __init__(self, h, e, inter, k, tokens, dtype, dev):
        g = torch.Generator(device="cpu").manual_seed(0)
        gd = torch.Generator(device=dev).manual_seed(0)  # (the weights drawn on the device: GBs for Mixtral)
        self.w = {name: [(torch.randn(*shape, generator=gd, device=dev) * shape[1] ** -0.5).to(dtype).requires_grad_()
                         for _ in range(e)]
                  for name, shape in (("gate", (inter, h)), ("up", (inter, h)), ("down", (h, inter)))}
        logits = torch.randn(tokens, e, generator=g)
        chosen = logits.softmax(-1).topk(k, dim=-1).indices.flatten()
        ids, order = chosen.sort(stable=True)
        self.offs = torch.searchsorted(ids, torch.arange(e), right=True).to(dev)
        x = torch.randn(tokens, h, generator=g).to(dev, dtype)
        self.xs = x[(order // k).to(dev)].requires_grad_()
        self.params = [self.xs] + [w for ws in self.w.values() for w in ws]

    def apr(self, xs):
        g = apr_kernels.grouped_mm(xs, self.w["gate"], self.offs)
        u = apr_kernels.grouped_mm(xs, self.w["up"], self.offs)
        return apr_kernels.grouped_mm(apr_kernels.swiglu(g, u), self.w["down"], self.offs)

    def loop(self, xs):
        counts = self.offs.diff(prepend=self.offs.new_zeros(1)).tolist()  # the host read each step
        outs = []
        for i, part in enumerate(xs.split(counts)):
            hid = F.silu(F.linear(part, self.w["gate"][i])) * F.linear(part, self.w["up"][i])
            outs.append(F.linear(hid, self.w["down"][i]))
        return torch.cat(outs)

    def _stacked(self):
        """transformers' layout, stacked once (leaves of their own): gate_up [E, 2I, h], down [E, h, I]."""
        gate_up = torch.cat([torch.stack([w.detach() for w in self.w[n]]) for n in ("gate", "up")], 1)
        return gate_up.requires_grad_(), torch.stack([w.detach() for w in self.w["down"]]).requires_grad_()

    def apr_stacked(self):
        gate_up, down = self._stacked()

        def run(xs):
            gu = apr_kernels.grouped_mm(xs, gate_up, self.offs)
            inter = gu.shape[1] // 2
            return apr_kernels.grouped_mm(apr_kernels.swiglu(gu[:, :inter], gu[:, inter:]), down, self.offs)

        return run, [self.xs, gate_up, down]

    def stacked(self):
        """``F.grouped_mm`` on the stacked layout (its B operands are the transposed views)."""
        grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
        if grouped_mm is None:
            raise RuntimeError("this torch has no grouped_mm")
        gate_up, down = self._stacked()
        offs = self.offs.to(torch.int32)

        def run(xs):
            g, u = grouped_mm(xs, gate_up.transpose(1, 2), offs=offs).chunk(2, dim=-1)
            return grouped_mm(F.silu(g) * u, down.transpose(1, 2), offs=offs)

        return run, [self.xs, gate_up, down]


def main() -> None:
    args = _common.parse_args(__doc__.splitlines()[0])
    dev = _common.device()
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rep = 3 if args.smoke or dev.type == "cpu" else 10
    if args.smoke:
        shapes = [("tiny", (32, 4, 64, 2), 64)]
    else:
        tokens = [8192] if args.quick else [8192, 4096, 16384]
        shapes = [(m, MODELS[m], t) for t in tokens for m in MODELS]
    rows, failed = [], []
    for model, (h, e, inter, k), tokens in shapes:
        ex = Experts(h, e, inter, k, tokens, dtype, dev)
        dy = torch.randn(tokens * k, h, device=dev, dtype=dtype)
        providers = {"apr": (ex.apr, ex.params), "loop": (ex.loop, ex.params), "apr_stacked": ex.apr_stacked()}
        try:
            providers["torch_grouped_mm"] = ex.stacked()
        except Exception as err:  # noqa: BLE001  (a baseline this torch lacks: say so, go on)
            failed.append(f"torch_grouped_mm {model}: {type(err).__name__}: {str(err)[:160]}")
        flops = 6 * tokens * k * h * inter
        got = {}
        for name, (fn, params) in providers.items():
            try:
                fwd = _common.time_ms(lambda: fn(params[0]), warmup=2, rep=rep, dev=dev)
                step = _common.time_ms(lambda: torch.autograd.grad(fn(params[0]), params, dy), warmup=2, rep=rep,
                                       dev=dev)
            except Exception as err:  # noqa: BLE001
                failed.append(f"{name} {model} {tokens}: {type(err).__name__}: {str(err)[:160]}")
                print(f"FAILED {failed[-1]}")
                continue
            for mode, ms, f in (("fwd", fwd, flops), ("fwd_bwd", step, 3 * flops)):
                got[name, mode] = ms
                rows.append({"op": "moe_experts", "model": model, "mode": mode, "shape": f"{tokens}x{k}",
                             "dtype": str(dtype)[6:], "provider": name, "ms": ms, "flops": f, "tflops": f / (ms * 1e-3) / 1e12})
        for row in rows:
            if row["provider"] == "apr_stacked" and row["model"] == model and row["shape"] == f"{tokens}x{k}" \
                    and ("torch_grouped_mm", row["mode"]) in got:
                row["vs_grouped_mm"] = got["torch_grouped_mm", row["mode"]] / row["ms"]
            if row["provider"] == "apr" and row["model"] == model and row["shape"] == f"{tokens}x{k}":
                for base, key in (("loop", "vs_loop"), ("torch_grouped_mm", "vs_grouped_mm")):
                    if (base, row["mode"]) in got:
                        row[key] = got[base, row["mode"]] / row["ms"]
        print(f"{model} {tokens} tokens: " + ", ".join(f"{n} {m} {ms:.3f} ms" for (n, m), ms in got.items()))
        del ex, providers
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    for line in failed:
        print(f"skipped: {line}")
    layouts = {m: dict(zip(("hidden", "experts", "intermediate", "top_k"), v)) for m, v in MODELS.items()}
    path = _common.write_results("moe", rows, args.out, {"ours": ["apr", "apr_stacked"], "failed": failed,
                                                         "layouts": layouts})
    _common.print_table(rows, ["model", "shape", "mode", "provider", "ms", "tflops", "vs_loop", "vs_grouped_mm"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
