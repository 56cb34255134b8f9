"""Context parallelism (train/context_parallel.py): the zigzag split and its inverse against explicit
position lists; each rank's attention over the gathered K/V against whole-sequence attention (with
and without document masking); and 2 (gloo) processes, each holding half of every row, against one
process holding all of it: the loss and every gradient of a Qwen2-shaped model, eager and through
the Triton kernels (interpreter), with a sliding window in one layer, activation checkpointing (the
all-gather recomputed), document masking (documents crossing the ranks' chunks) and compiled layers."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

from apr_kernels.train.context_parallel import ContextParallel


def _config(**over):
    from apr_kernels.model import ModelConfig

    cfg = dict(architecture="qwen2", hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
               intermediate_size=64, vocab_size=97, max_position_embeddings=128, rope_theta=1e4,
               rms_norm_eps=1e-6, attention_bias=True, tie_word_embeddings=False)
    cfg.update(over)
    return ModelConfig(**cfg)


# a window in layer 1 only (Qwen2's max_window_layers), shorter than a rank's reach
CASES = {"eager": dict(fast=False), "triton": dict(fast=True),
         "window-checkpointed": dict(fast=True, sliding_window=11, max_window_layers=1, checkpoint=True),
         "documents-eager": dict(fast=False, documents=True, sliding_window=5, max_window_layers=1),
         "documents-triton": dict(fast=True, documents=True, sliding_window=5, max_window_layers=1),
         # selective checkpointing: the K/V all-gather's output kept with the matmuls and attention
         "documents-selective": dict(fast=True, documents=True, checkpoint="selective"),
         # each layer compiled whole (fullgraph: the K/V all-gather traces, no graph break)
         "compiled": dict(fast=False, compile=True)}
EOS = 5


def _documents(x):
    from apr_kernels.model.documents import Documents

    return Documents.from_eos(x, EOS)


def _inputs(T=32, B=2):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(6, 97, (B, T + 1), generator=g)
    # document ends (for the document-masked cases) inside chunks and on a chunk edge (chunks of 8)
    x[0, [3, 12, 13, 26]] = EOS
    x[1, [7, 20]] = EOS
    return x[:, :-1], x[:, 1:].clone()


def _model(case):
    from apr_kernels.model import Transformer

    spec = dict(CASES[case])
    fast, ckpt, compiled = spec.pop("fast"), spec.pop("checkpoint", False), spec.pop("compile", False)
    spec.pop("documents", None)
    torch.manual_seed(7)
    m = Transformer(_config(**spec), fast=fast)
    m.gradient_checkpointing = ckpt
    if compiled:
        # (a fresh cache: every earlier compile of Block.forward in this process counts towards dynamo's
        # recompile limit, which fullgraph turns into a failure)
        torch._dynamo.reset()
        for layer in m.model.layers:
            layer.forward = torch.compile(layer.forward, backend="aot_eager", fullgraph=True)
    return m


# ---------------------------------------------------------------------------- one process
@pytest.mark.parametrize("N", [1, 2, 3])
def test_zigzag_split_and_its_inverse(N):
    T = 2 * N * 5
    rows = torch.arange(2 * T).view(2, T)  # each value its own position (+ T in row 1)
    shards = []
    for r in range(N):
        cp = ContextParallel(None, r, N)
        want = list(range(r * 5, r * 5 + 5)) + list(range((2 * N - 1 - r) * 5, (2 * N - r) * 5))
        assert cp.positions(10).tolist() == want
        assert cp.shard(rows).tolist() == [want, [p + T for p in want]]
        shards.append(cp.shard(rows))
    everything = sorted(p for s in shards for p in s[0].tolist())
    assert everything == list(range(T))  # every position on exactly one rank
    cp = ContextParallel(None, 0, N)
    assert torch.equal(cp.to_global(torch.stack(shards)), rows)


def test_lengths_that_do_not_split_are_refused():
    cp = ContextParallel(None, 1, 3)
    with pytest.raises(ValueError, match=r"--seq-len 20 is not a multiple of 6 \(2 x --context-parallel"):
        cp.check_length(20, "--seq-len")
    with pytest.raises(ValueError, match=r"rank 3 of a group of 3"):
        ContextParallel(None, 3, 3)


class _Known(ContextParallel):
    """One rank of a group whose gather returns the whole-sequence K and V it was given (side by
    side, as attention gathers them)."""

    def __init__(self, rank, size, whole):
        super().__init__(None, rank, size)
        self.whole = torch.cat(list(whole), -1)

    def gather(self, t):
        assert torch.equal(self.shard(self.whole), t)  # (this rank's share of it)
        return self.whole


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "triton"])
@pytest.mark.parametrize("N, window", [(2, None), (3, None), (2, 5), (4, 3)])
def test_each_rank_attends_to_all_earlier_positions(use_backend, fast, N, window):
    from test_attention_prefix import oracle  # fp64, an explicit mask

    use_backend("triton")
    T = 2 * N * 6
    q, k, v = torch.randn(2, T, 4, 16), torch.randn(2, T, 2, 16), torch.randn(2, T, 2, 16)
    whole = oracle(q, k, v, True, 0.25, window or 0)[0].float().detach()
    for r in range(N):
        cp = _Known(r, N, [k, v])
        got = cp.attention(cp.shard(q), cp.shard(k), cp.shard(v), fast=fast, window=window, scale=0.25)
        torch.testing.assert_close(got, cp.shard(whole), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fast", [False, True], ids=["eager", "triton"])
@pytest.mark.parametrize("N, window", [(2, None), (3, 4)])
def test_each_rank_attends_within_its_documents(use_backend, fast, N, window):
    """Document masking: each local chunk sees only earlier positions of the same document, whole
    rows' spans (documents crossing chunks and ranks, one chunk inside a document)."""
    from apr_kernels.model.documents import Documents

    use_backend("triton")
    C = 6
    T = 2 * N * C
    x = torch.randint(6, 97, (2, T))
    x[0, [2, 9, 10, T - 8]] = EOS
    x[1, [C - 1, 3 * C]] = EOS
    docs = Documents.from_eos(x, EOS)
    doc, _ = docs.token_index(2 * T)
    doc = doc.view(2, T)
    q, k, v = torch.randn(2, T, 4, 16), torch.randn(2, T, 2, 16), torch.randn(2, T, 2, 16)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    visible = (j <= i) & (doc[:, :, None] == doc[:, None, :])  # [2, T, T]
    if window:
        visible &= j > i - window
    kk, vv = (t.double().repeat_interleave(2, 2) for t in (k, v))
    s = torch.einsum("bshd,bthd->bhst", q.double(), kk) * 0.25
    whole = torch.einsum("bhst,bthd->bshd", torch.softmax(s.masked_fill(~visible[:, None], float("-inf")), -1), vv)
    for r in range(N):
        cp = _Known(r, N, [k, v])
        lay, pos = cp.documents(docs, 2, T, fast)
        got = cp.attention(cp.shard(q), cp.shard(k), cp.shard(v), fast=fast, window=window, scale=0.25, documents=lay)
        torch.testing.assert_close(got, cp.shard(whole).float(), rtol=1e-5, atol=1e-5)
        # RoPE positions restart at each document
        want_pos = torch.cat([torch.arange(T) - torch.tensor([(doc[b] == doc[b, t]).nonzero()[0].item()
                                                               for t in range(T)]) for b in range(2)]).view(2, T)
        assert torch.equal(pos.view(2, -1), cp.shard(want_pos))


# ------------------------------------------------------------------------------- 2 processes
class _CountGathers(TorchDispatchMode):
    """How many all-gathers run (in the backward: the K/V gathers re-run by recomputation)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += "all_gather" in str(func)
        return func(*args, **(kwargs or {}))


def _worker(out: str) -> int:
    import torch.distributed as dist

    from apr_kernels.train.context_parallel import groups

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cp = groups(world, 2, rank)
    x, y = _inputs()
    result = {}
    for case in CASES:
        m = _model(case)
        m.set_context_parallel(cp)
        docs = _documents(x) if CASES[case].get("documents") else None  # (of the whole rows)
        loss = m.loss(cp.shard(x), cp.shard(y), reduction="sum", documents=docs)
        with _CountGathers() as counted:
            loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        grads = {}
        for name, p in m.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g)  # what DDP/FSDP's reduction over the group's ranks sums
            grads[name] = g
        result[case] = {"loss": total, "grads": grads, "backward_gathers": counted.n}
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()
    return 0


def test_two_ranks_match_one_process(tmp_path):
    import warnings

    from rank_runs import PORT_RETRY, free_port, rank_env, start_script

    out = tmp_path / "cp.pt"

    def start():
        port = free_port()
        envs = [{**rank_env(r, 2, port), "APR_KERNELS_BACKEND": "triton", "TRITON_INTERPRET": "1"} for r in range(2)]
        return [start_script([__file__, out], env, tmp_path, f"rank{r}") for r, env in enumerate(envs)]

    def finish(procs) -> list[str]:
        return [p.communicate(timeout=300)[1] for p in procs]

    procs = start()
    x, y = _inputs()
    want = {}
    os.environ["APR_KERNELS_BACKEND"] = "triton"
    try:  # (the one-process references while the ranks run)
        for case in CASES:
            m = _model(case)
            loss = m.loss(x, y, reduction="sum", documents=_documents(x) if CASES[case].get("documents") else None)
            loss.backward()
            want[case] = (loss.detach(), {name: p.grad for name, p in m.named_parameters()})
    finally:
        del os.environ["APR_KERNELS_BACKEND"]
    errors = finish(procs)
    if any(p.returncode for p in procs) and any("EADDRINUSE" in e for e in errors):  # (free_port's race)
        warnings.warn(f"{PORT_RETRY}\n{errors}")
        procs = start()
        errors = finish(procs)
    for p, stderr in zip(procs, errors):
        assert p.returncode == 0, stderr[-3000:]
    got = torch.load(out)
    # full checkpointing re-runs each layer's K/V all-gather in the backward; selective keeps it
    assert got["window-checkpointed"]["backward_gathers"] == 2 and got["documents-selective"]["backward_gathers"] == 0
    assert got["eager"]["backward_gathers"] == 0
    for case, (loss, grads) in want.items():
        # fp32 (the kernels' dtypes): only the summation order differs
        torch.testing.assert_close(got[case]["loss"], loss, rtol=1e-5, atol=1e-4, msg=case)
        for name, g in grads.items():
            torch.testing.assert_close(got[case]["grads"][name], g, rtol=1e-4, atol=1e-5, msg=f"{case}: {name}")


def test_four_ranks_in_two_context_groups_match_one_process(tmp_path):
    """4 ranks = 2 data-parallel groups x 2 context-parallel ranks (each group its half of
    the batch, each rank half of its rows' positions) against the same CLI run in one process; also
    distilling from a teacher."""
    from apr_kernels.cli import main
    from apr_kernels.model import Transformer
    from apr_kernels.train.checkpoint import save_checkpoint
    from rank_runs import Launch
    from test_distributed import COMMON, _cli, _losses, _odd_config, _records

    from apr_kernels.train.cli import byte_tokenizer

    torch.manual_seed(11)
    init = tmp_path / "init.apr"
    save_checkpoint(init, model=Transformer(_odd_config(), fast=False))
    # distillation: the teacher (whole on every rank) reads the whole rows, each rank its positions of
    # the teacher's hidden states; the fused loss's reference code on the fast path
    save_checkpoint(tmp_path / "teacher.apr", model=Transformer(_config(vocab_size=263), fast=False),
                    tokenizer=byte_tokenizer())
    args = {"cp": ["train", "--init", str(init), *COMMON, "--save-every", "0"]}
    args["kd"] = [*args["cp"], "--teacher", str(tmp_path / "teacher.apr"), "--kd-ratio", "0.6", "--kd-temperature",
                  "2.0", "--fast", "on"]
    one = {}
    for name, argv in args.items():
        code, one[name] = _cli(main, [*argv, "--out", str(tmp_path / f"one_{name}")])
        assert code == 0
    launch = Launch({name: [*argv, "--parallel", "ddp", "--context-parallel", "2", "--out", str(tmp_path / name)]
                     for name, argv in args.items()}, 4, tmp_path / "ranks")
    outs = launch.outputs()
    for name in args:
        ref, got = _records(one[name]), _records(outs[name])
        assert len(_losses(got)) == len(_losses(ref)) > 0
        assert _losses(got) == pytest.approx(_losses(ref), rel=1e-5)
        assert _losses(got, "eval", "eval_loss") == pytest.approx(_losses(ref, "eval", "eval_loss"), abs=1e-5)
    for key in ("ce", "kl", "grad_norm"):
        assert len(_losses(_records(outs["kd"]), key=key)) == len(_losses(_records(one["kd"])))
        assert _losses(_records(outs["kd"]), key=key) == pytest.approx(_losses(_records(one["kd"]), key=key),
                                                                      rel=1e-4), key


def test_what_context_parallelism_cannot_split_is_refused(tmp_path, capsys):
    from types import SimpleNamespace

    from apr_kernels.cli import main
    from apr_kernels.model import Transformer
    from apr_kernels.train.loop import TrainConfig, Trainer
    from test_distributed import COMMON, _cli

    # one process: no group to split over
    code, _ = _cli(main, ["train", "--preset", "tiny_qwen2", *COMMON, "--context-parallel", "2",
                          "--out", str(tmp_path / "a")])
    assert code != 0
    assert "--context-parallel 2: expected a group size >= 1, run under torchrun with --parallel ddp or fsdp" \
        in capsys.readouterr().err
    # the trainer's checks, on a stand-in for a 4-rank run in 2 groups of 2
    model = Transformer(_config(), fast=False)
    par = SimpleNamespace(module=model, world_size=4, data_ranks=2, context=ContextParallel(None, 0, 2),
                          tensor=None, sequence=None)
    tokens = torch.randint(0, 97, (4000,))

    def trainer(**cfg):
        Trainer(model, tokens, None, TrainConfig(**{"batch_size": 4, "seq_len": 32, **cfg}), parallel=par, eos_id=0)

    with pytest.raises(ValueError, match=r"--batch-size 3 is not a multiple of the 2 data-parallel groups \(4 ranks / "
                                         r"--context-parallel 2\)"):
        trainer(batch_size=3)
    with pytest.raises(ValueError, match=r"--seq-len 30 is not a multiple of 4"):
        trainer(seq_len=30)
    # and the model itself, asked for a mean over a share of the positions
    model.set_context_parallel(ContextParallel(None, 0, 2))
    x = torch.randint(1, 97, (1, 16))
    with pytest.raises(ValueError, match=r"reduction 'mean' under context or sequence parallelism: this rank holds"):
        model.loss(x, x)


def test_multiple_choice_scoring_takes_whole_rows_under_context_parallelism(tmp_path):
    """--eval-choices scores every question on every rank alike: inside ``whole_sequences`` the model
    reads whole rows (no group collective), and the split is back afterwards."""
    import json
    from types import SimpleNamespace

    from apr_kernels.model import Transformer
    from apr_kernels.train.cli import byte_tokenizer, choices_eval

    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"context": f"Is {t} hot?", "choices": [" yes", " no", " maybe"],
                                        "answer": i % 3}) + "\n" for i, t in enumerate(("fire", "ice", "tea"))))
    torch.manual_seed(2)
    model = Transformer(_config(vocab_size=260), fast=False)
    plain = choices_eval([path], byte_tokenizer())(SimpleNamespace(model=model, cfg=SimpleNamespace(eval_batch_size=4),
                                                                   device="cpu", autocast_dtype=None, parallel=None))
    cp = ContextParallel(None, 1, 2)  # (no process group: a forward on a share would fail in gather)
    model.set_context_parallel(cp)
    split = choices_eval([path], byte_tokenizer())(SimpleNamespace(model=model, cfg=SimpleNamespace(eval_batch_size=4),
                                                                   device="cpu", autocast_dtype=None, parallel=None))
    assert split == plain and plain["eval_questions"] == 3
    assert model.context_parallel is cp and all(l.self_attn.context_parallel is cp for l in model.model.layers)


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
