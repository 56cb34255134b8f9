"""The training pieces: schedule, data packing and batching, the loop (accumulation, clipping, learning),
exact resume from an APR checkpoint, init-from-APR, and the fast (Triton) path against the eager one."""

import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch

from apr_kernels.model import ModelConfig, Transformer, from_apr, preset
from apr_kernels.train.checkpoint import restore_training_state, save_checkpoint, training_metadata
from apr_kernels.train.cli import byte_tokenizer
from apr_kernels.train.data import (BatchStream, batch, find_text_files, sequences, split_holdout,
                                    tokenize_files)
from apr_kernels.train.loop import Trainer, TrainConfig
from apr_kernels.train.schedule import default_warmup, lr_at

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def stream(tok):
    """Real Python (the stdlib json package) as bytes + end-of-text: (train, held-out) at seq 32."""
    tokens = tokenize_files(find_text_files([STDLIB / "json"]), tok, max_tokens=24_000)
    return split_holdout(tokens, 32, eval_fraction=0.1, max_eval_sequences=12)


def losses(history):
    return [h["loss"] for h in history if h["event"] == "train"]


# ------------------------------------------------------------------------------------ schedule
def test_schedule_warmup_then_cosine_to_floor():
    kw = dict(lr=2.0, total_steps=11, warmup=2, min_ratio=0.1)
    assert [lr_at(s, **kw) for s in (0, 1, 2)] == [1.0, 2.0, 2.0]
    assert lr_at(10, **kw) == pytest.approx(0.2)  # the floor at the last step
    # halfway through the cosine (step 6 of 2..10): floor + (peak - floor) / 2
    assert lr_at(6, **kw) == pytest.approx(0.2 + 0.9)
    after = [lr_at(s, **kw) for s in range(2, 11)]
    assert all(a > b for a, b in zip(after, after[1:]))
    with pytest.raises(ValueError, match="step=-1"):
        lr_at(-1, **kw)


def test_epochs_give_the_steps_of_whole_passes_over_the_data():
    cfg = TrainConfig(batch_size=4, grad_accum=2)  # 8 items a step
    assert cfg.for_epochs(None, 62, warmup=None, what="x") is cfg
    assert cfg.for_epochs(1, 64, warmup=None, what="x").steps == 8  # exactly 8 steps
    assert cfg.for_epochs(1, 62, warmup=None, what="x").steps == 8  # 7.75: the last pass completed
    assert cfg.for_epochs(1.5, 62, warmup=None, what="x").steps == 12  # 11.625
    assert cfg.for_epochs(0.01, 62, warmup=None, what="x").steps == 1  # at least one step
    # 0.1 * 30 is 3.0000000000000004 in floats: still 3 steps, not 4
    assert TrainConfig(batch_size=1).for_epochs(0.1, 30, warmup=None, what="x").steps == 3
    fitted = cfg.for_epochs(100, 80, warmup=None, what="x")  # 1000 steps: the default warmup follows them
    assert fitted.steps == 1000 and fitted.warmup == default_warmup(1000) == 100 and cfg.warmup == 10
    assert cfg.for_epochs(2, 80, warmup=5, what="x").warmup == 5
    assert cfg.for_epochs(2, 80, warmup=None, what="x").batch_size == 4  # nothing else changes
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=f"--epochs {bad}: expected a positive number of passes over the pairs"):
            cfg.for_epochs(bad, 80, warmup=None, what="pairs")


def test_eval_watch_follows_the_best_eval_and_the_patience():
    """EvalWatch's rule on a made-up sequence: the step-0 baseline is no candidate, a NaN is never
    better, a higher-is-better metric counts the other way, and the run ends once `patience` evals in
    a row brought nothing better (never at the last step, which ends the run anyway)."""
    from apr_kernels.train.loop import EvalWatch

    class Watch(EvalWatch):
        def __init__(self, patience, higher=False):
            self.cfg = TrainConfig(steps=8, eval_every=1, early_stopping_patience=patience)
            self.best_metric, self.best_higher, self.logged, self.bests = "m", higher, [], []
            self.log = lambda event, rec: self.logged.append((event, rec))

        def feed(self, values):
            for step, v in enumerate(values):
                self.step = step
                self._watch({"m": v}, on_best=lambda w: self.bests.append(w.step))
                if self.stopped_early:
                    return step

    w = Watch(patience=2)
    assert w.feed([1.0, 3.0, 2.0, 2.5, float("nan"), 1.5, 0.5]) == 4  # steps 3 and 4 brought nothing lower
    assert w.bests == [1, 2] and w.best_eval == (2.0, 2) and w.stale_evals == 2
    assert w.logged == [("early_stop", {"step": 4, "evals_without_improvement": 2, "best_step": 2, "best_m": 2.0})]
    up = Watch(patience=2, higher=True)
    assert up.feed([9.0, 1.0, 2.0, 1.5, 3.0, 2.0, 2.5, 2.9]) == 6
    assert up.bests == [1, 2, 4] and up.best_eval == (3.0, 4)
    last = Watch(patience=1)
    # the patience runs out at step 8, the last: the run ends there anyway, no early stop
    assert last.feed([0.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.4, 0.6]) is None and last.stale_evals == 1
    assert Watch(patience=0).feed([1.0, 2.0, 3.0, 4.0]) is None
    with pytest.raises(ValueError, match="early_stopping_patience=2 with eval_every=0"):
        TrainConfig(early_stopping_patience=2)


def test_schedule_linear_wsd_and_constant():
    kw = dict(lr=2.0, total_steps=11, warmup=2, min_ratio=0.1)
    lin = [lr_at(s, schedule="linear", **kw) for s in range(11)]
    assert lin[:3] == [1.0, 2.0, 2.0] and lin[10] == pytest.approx(0.2)
    assert lin[6] == pytest.approx(1.1)  # halfway of 2..10 on a straight line
    # wsd, the last 20% decaying (round(2.2) = 2 steps): stable at 2.0 through step 8, then 1.1, 0.2
    wsd = [lr_at(s, schedule="wsd", decay_fraction=0.2, **kw) for s in range(11)]
    assert wsd == pytest.approx([1.0] + [2.0] * 8 + [1.1, 0.2])
    # a decay longer than the run after warmup starts right after the warmup
    assert [lr_at(s, schedule="wsd", decay_fraction=1.0, **kw) for s in range(2, 11)] == \
        pytest.approx([2.0 - 1.8 * k / 9 for k in range(1, 10)])
    assert [lr_at(s, schedule="constant", **kw) for s in range(11)] == [1.0] + [2.0] * 10
    with pytest.raises(ValueError, match="schedule 'step'; expected one of cosine, linear, wsd, constant"):
        lr_at(3, schedule="step", **kw)
    with pytest.raises(ValueError, match="decay_fraction=1.5; expected 0..1"):
        lr_at(3, schedule="wsd", decay_fraction=1.5, **kw)


# ---------------------------------------------------------------------------------------- data
def test_find_text_files_walks_folders_sorted_and_filters(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / ".git").mkdir()
    (tmp_path / "d" / "__pycache__").mkdir()
    for rel in ("d/b.py", "d/a.txt", "d/sub/c.md", "d/.git/x.py", "d/__pycache__/y.py", "d/image.png",
                "loose.dat"):
        (tmp_path / rel).write_text("x")
    got = find_text_files([tmp_path / "loose.dat", tmp_path / "d"])
    assert [p.relative_to(tmp_path).as_posix() for p in got] == ["loose.dat", "d/a.txt", "d/b.py", "d/sub/c.md"]
    with pytest.raises(FileNotFoundError, match=r"nope: data path does not exist"):
        find_text_files([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no text files found"):
        find_text_files([tmp_path / "empty"])


def test_documents_are_packed_with_end_of_text_and_non_utf8_skipped(tmp_path, tok):
    (tmp_path / "1.txt").write_text("ab")
    (tmp_path / "2.txt").write_bytes(b"\xff\xfe binary")
    (tmp_path / "3.txt").write_text("é")
    ids = tokenize_files(find_text_files([tmp_path]), tok).tolist()
    assert ids == [97, 98, 256, 0xC3, 0xA9, 256]
    assert tokenize_files(find_text_files([tmp_path]), tok, max_tokens=4).tolist() == [97, 98, 256, 0xC3]


def test_threaded_tokenisation_keeps_file_order_and_int32(tmp_path):
    """Real text through the Qwen2.5 tokenizer: any number of worker threads gives the stream of
    encoding each file in order (the oracle, computed here one file at a time), as int32; max_tokens
    cuts it anywhere, also inside a document, and a skipped (non-UTF-8 or empty) file leaves no gap."""
    from apr_kernels.tokenizer import Tokenizer

    qwen = Tokenizer.qwen2()
    files = sorted((STDLIB / "json").glob("*.py")) + sorted((STDLIB / "email").glob("*.py"))[:12]
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe")
    (tmp_path / "empty.txt").write_text("")
    files[3:3] = [tmp_path / "bin.txt", tmp_path / "empty.txt"]
    want = [i for f in files if f.parent != tmp_path for i in qwen.encode(f.read_text()) + [qwen.eos_id]]
    for workers in (1, 3, 8):
        got = tokenize_files(files, qwen, workers=workers)
        assert got.dtype == torch.int32 and got.tolist() == want, workers
    cut = len(qwen.encode(files[0].read_text())) + 5  # inside the second document
    assert tokenize_files(files, qwen, max_tokens=cut, workers=4).tolist() == want[:cut]


def test_special_token_text_in_a_document_does_not_end_it(tmp_path, tok):
    (tmp_path / "a.txt").write_text("x<|endoftext|>y")
    ids = tokenize_files([tmp_path / "a.txt"], tok).tolist()
    assert ids.count(256) == 1 and ids[-1] == 256 and tok.decode(ids[:-1]) == "x<|endoftext|>y"


def test_json_lines_hold_one_document_per_line_plain_or_gzip(tmp_path, tok):
    import gzip
    import json

    recs = [{"text": "ab", "id": 1}, {"text": ""}, {"text": "é", "meta": {"x": 1}}]
    body = "\n".join(json.dumps(r) for r in recs[:2]) + "\n\n" + json.dumps(recs[2]) + "\n"
    (tmp_path / "a.jsonl").write_text(body)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(body.encode()))
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(b"xy"))
    (tmp_path / "d.jsonl").write_text(json.dumps({"content": "z"}) + "\n")
    files = find_text_files([tmp_path])
    assert [f.name for f in files] == ["a.jsonl", "b.jsonl.gz", "c.txt.gz", "d.jsonl"]
    doc = [97, 98, 256, 0xC3, 0xA9, 256]  # "ab" EOS "é" EOS: the empty text adds nothing
    assert tokenize_files(files[:3], tok).tolist() == doc + doc + [120, 121, 256]
    assert tokenize_files(files[3:], tok, text_field="content").tolist() == [122, 256]
    with pytest.raises(ValueError, match=r"d.jsonl:1: expected a JSON object with a string field 'text' "
                                         r"\(--text-field\), or a 'messages', 'prompt'/'completion' or Alpaca record; "
                                         r"got an object with fields \['content'\]"):
        tokenize_files(files, tok)
    (tmp_path / "e.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"e.jsonl:2: expected a JSON object with a string field 'text'"):
        tokenize_files([tmp_path / "e.jsonl"], tok)
    (tmp_path / "f.jsonl").write_text('{"text": "ok"}\n[1, 2]\n{"text": "x"\n')
    with pytest.raises(ValueError, match=r"f.jsonl:2: .*got a JSON list"):
        tokenize_files([tmp_path / "f.jsonl"], tok)
    (tmp_path / "f.jsonl").write_text('{"text": "ok"}\n{"text": "x"\n')
    with pytest.raises(ValueError, match=r"f.jsonl:2: not valid JSON"):
        tokenize_files([tmp_path / "f.jsonl"], tok)


def test_token_cache_key_covers_the_text_field(tmp_path, tok):
    from apr_kernels.train.data import cached_tokens

    (tmp_path / "a.jsonl").write_text('{"text": "ab", "title": "c"}\n')
    files = find_text_files([tmp_path / "a.jsonl"])
    cache = tmp_path / "cache"
    assert cached_tokens(files, tok, cache_dir=cache).tolist() == [97, 98, 256]
    assert cached_tokens(files, tok, cache_dir=cache, text_field="title").tolist() == [99, 256]
    assert len(list(cache.glob("tokens-*.apr"))) == 2


def test_token_cache_hit_miss_and_invalidation(tmp_path, tok):
    import os

    from apr_kernels.train.data import cached_tokens

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("hello world")
    (data / "b.py").write_text("print(1)\n")
    cache = tmp_path / "cache"
    files = find_text_files([data])
    mtime = os.stat(data / "a.txt").st_mtime_ns
    want = tokenize_files(files, tok)
    notes = []
    first = cached_tokens(files, tok, cache_dir=cache, log=notes.append)
    assert torch.equal(first, want) and "saved to" in notes[-1]
    [entry] = list(cache.glob("tokens-*.apr"))
    second = cached_tokens(files, tok, cache_dir=cache, log=notes.append)
    assert "tokens from" in notes[-1]
    assert second.dtype == torch.int32 and torch.equal(second, want)
    # the hit is a view of the mapped file: no copy of the stream
    import apr_kernels

    with apr_kernels.open(entry) as f:
        off, size = f.info("tokens").offset, f.info("tokens").nbytes
    assert size == want.numel() * 4 and off > 0
    # max_tokens and an edited file make new entries; the old one stays valid
    assert torch.equal(cached_tokens(files, tok, max_tokens=5, cache_dir=cache), want[:5])
    (data / "a.txt").write_text("hello there")
    os.utime(data / "a.txt", ns=(mtime + 10**9, mtime + 10**9))
    changed = cached_tokens(files, tok, cache_dir=cache, log=notes.append)
    assert "saved to" in notes[-1] and torch.equal(changed, tokenize_files(files, tok))
    assert len(list(cache.glob("tokens-*.apr"))) == 3
    # a damaged entry is rebuilt, not trusted (the first state again: same path, size and mtime)
    entry.write_bytes(entry.read_bytes()[:40])
    (data / "a.txt").write_text("hello world")
    os.utime(data / "a.txt", ns=(mtime, mtime))
    rebuilt = cached_tokens(files, tok, cache_dir=cache, log=notes.append)
    assert any("unreadable" in n for n in notes) and torch.equal(rebuilt, tokenize_files(files, tok))


def test_tokenizer_fingerprint_tells_encodings_apart(tok):
    from apr_kernels.tokenizer import Tokenizer

    assert Tokenizer.qwen2().fingerprint() == Tokenizer.qwen2().fingerprint()
    assert Tokenizer.qwen2().fingerprint() != tok.fingerprint()
    bytes_again = byte_tokenizer()
    assert bytes_again.fingerprint() == tok.fingerprint()
    other_eos = Tokenizer(list(bytes_again._id_to_bytes), special=bytes_again.special_tokens,
                          merges=[], eos_id=None)
    assert other_eos.fingerprint() != tok.fingerprint()


def test_int32_token_streams_batch_as_int64(tok):
    seqs = sequences(torch.arange(100, dtype=torch.int32), 9)
    x, y, docs = batch(seqs, torch.tensor([0, 3]))
    assert docs is None
    assert x.dtype == y.dtype == torch.int64 and y[0, 0].item() == 1


def test_sequences_targets_are_the_next_tokens_and_holdout_is_the_tail():
    tokens = torch.randperm(1000)[:103]  # 103 tokens, T=10: 10 sequences of 11
    seqs = sequences(tokens, 10)
    assert seqs.shape == (10, 11)
    x, y, _ = batch(seqs, torch.tensor([0, 9]))
    assert torch.equal(x[0], tokens[:10]) and torch.equal(y[0], tokens[1:11])
    assert torch.equal(y[1], tokens[91:101])
    # every token but the first is a target exactly once
    assert torch.equal(torch.cat([batch(seqs, torch.tensor([i]))[1][0] for i in range(10)]), tokens[1:101])
    train, held = split_holdout(tokens, 10, eval_fraction=0.3)
    assert len(sequences(train, 10)) == 7 and len(sequences(held, 10)) == 3
    assert torch.equal(held, tokens[70:])  # the tail of the stream
    with pytest.raises(ValueError, match=r"15 tokens make 1 sequence\(s\) of 10\+1 tokens; expected at least 2"):
        split_holdout(tokens[:15], 10)


def test_batch_stream_is_one_permutation_per_epoch_and_resumes_at_a_position():
    s = BatchStream(7, seed=3)
    first = torch.cat([s.next(3) for _ in range(5)])  # 15 indices: two epochs and one more
    assert sorted(first[:7].tolist()) == list(range(7)) and sorted(first[7:14].tolist()) == list(range(7))
    assert not torch.equal(first[:7], first[7:14])  # a fresh order each epoch
    resumed = BatchStream(7, seed=3, position=6)
    assert torch.equal(torch.cat([resumed.next(3) for _ in range(3)]), first[6:15])
    assert not torch.equal(BatchStream(7, seed=4).next(7), first[:7])


# ---------------------------------------------------------------------------------------- loop
def _trainer(stream, cfg=None, model_cfg="tiny_llama", seed=0, **kw):
    torch.manual_seed(seed)
    model = Transformer(preset(model_cfg) if isinstance(model_cfg, str) else model_cfg, fast=False)
    cfg = cfg or TrainConfig(steps=6, batch_size=4, seq_len=32, lr=3e-3, eval_tokens=256)
    return Trainer(model, stream[0], stream[1], cfg, log=lambda *a: None, **kw)


def test_mfu_is_logged_with_a_known_peak_only(stream, monkeypatch):
    from apr_kernels.train.loop import PEAK_ENV, peak_tflops

    monkeypatch.delenv(PEAK_ENV, raising=False)
    assert "mfu" not in _trainer(stream).train_step()  # CPU: no datasheet peak
    monkeypatch.setenv(PEAK_ENV, "0.002")
    t = _trainer(stream)
    rec = t.train_step()
    # MFU = model FLOPs per token x tokens/s / peak, the tokens being those the step trained on
    want = preset("tiny_llama").flops_per_token(32) * rec["tok_s"] / 2e9
    assert rec["mfu"] == pytest.approx(want, rel=1e-9) and rec["mfu"] > 0
    for bad in ("fast", "-3", "nan"):
        monkeypatch.setenv(PEAK_ENV, bad)
        with pytest.raises(ValueError, match=f"{PEAK_ENV}=.*expected a positive number of TFLOP/s"):
            peak_tflops(torch.device("cpu"))
    # known cards by name (the PCIe H100 before the SXM one it contains), unknown ones: no MFU
    monkeypatch.delenv(PEAK_ENV)
    for name, want_peak in (("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H200", 989.4),
                            ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA GeForce RTX 4090", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, _n=name: _n)
        assert peak_tflops(torch.device("cuda")) == want_peak, name


def test_gradient_accumulation_equals_the_larger_batch(stream):
    big = _trainer(stream, TrainConfig(steps=3, batch_size=4, seq_len=32, lr=1e-2))
    acc = _trainer(stream, TrainConfig(steps=3, batch_size=2, grad_accum=2, seq_len=32, lr=1e-2))
    for _ in range(2):
        a, b = big.train_step(), acc.train_step()
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # (AdamW moves a weight whose gradient is near 0 by up to its rate whatever the gradient's rounding:
    # one embedding weight of 15360 was 1.3e-5 off on an AMD EPYC, the sums run in another order)
    for (name, p), q in zip(big.model.named_parameters(), acc.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=5e-5, msg=name)


def test_accumulation_weights_every_target_alike_when_counts_differ(stream):
    """A marked stream (tokens that are no targets stored as -1 - id, as supervised records make)
    with far more targets in some rows than others: two micro-batches of 2 rows give the loss and
    the update of one batch of 4 rows, i.e. the mean over all targets of the step (a mean of the
    micro-batches' means would weight the sparse rows' targets up). The loss is checked by hand."""
    train = stream[0].clone()
    n = (train.numel() - 1) // 32 * 32
    pos = torch.arange(train.numel())
    # rows alternate between nearly all targets and nearly none (every 8th position a target)
    sparse = ((pos // 32) % 2 == 1) & (pos % 8 != 0) & (pos < n)
    train[sparse] = -1 - train[sparse]
    marked = (train, stream[1])
    big = _trainer(marked, TrainConfig(steps=3, batch_size=4, seq_len=32, lr=1e-2))
    acc = _trainer(marked, TrainConfig(steps=3, batch_size=2, grad_accum=2, seq_len=32, lr=1e-2))
    index = BatchStream(len(sequences(train, 32)), seed=42).next(4)  # the first step's rows
    x, y, _ = batch(sequences(train, 32), index)
    assert 0 < (y != -100).sum() < y.numel()
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(big.model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
    a, b = big.train_step(), acc.train_step()
    assert a["loss"] == pytest.approx(want.item(), rel=1e-5)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    for (name, p), q in zip(big.model.named_parameters(), acc.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_gradients_are_clipped_to_the_max_norm(stream):
    t = _trainer(stream, TrainConfig(steps=2, batch_size=4, seq_len=32, grad_clip=0.05))
    rec = t.train_step()
    assert rec["grad_norm"] > 0.05  # the pre-clip norm is reported
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in t.model.parameters()]))
    assert norm <= 0.05 * (1 + 1e-4)


@pytest.fixture(scope="module")
def trained(stream, tmp_path_factory):
    """A tiny Qwen2 trained 40 steps with a checkpoint at step 20 and one at the end."""
    folder = tmp_path_factory.mktemp("trained")
    cfg = TrainConfig(steps=40, batch_size=8, seq_len=32, lr=4e-3, eval_every=20, save_every=20,
                      eval_tokens=384)
    t = _trainer(stream, cfg, model_cfg="tiny_qwen2")
    t.run(on_checkpoint=lambda tr: save_checkpoint(folder / f"step{tr.step}.apr", tr, tokenizer=byte_tokenizer()),
          progress=False)
    return t, folder


def test_training_lowers_the_held_out_loss(trained):
    t, _ = trained
    evals = [h["eval_loss"] for h in t.history if h["event"] == "eval"]
    assert [h["step"] for h in t.history if h["event"] == "eval"] == [0, 20, 40]
    assert evals[0] == pytest.approx(math.log(320), abs=0.3)  # fresh init: about ln(vocab)
    assert evals[2] < evals[0] - 2.0


def test_resume_from_checkpoint_gives_identical_losses(trained, stream):
    t, folder = trained
    meta = training_metadata(folder / "step20.apr")
    assert meta["training.step"] == 20 and meta["training.data_position"] == 160
    model = from_apr(folder / "step20.apr", fast=False)
    resumed = Trainer(model, stream[0], stream[1], TrainConfig.from_dict(meta["training.config"]),
                      log=lambda *a: None)
    restore_training_state(folder / "step20.apr", resumed)
    resumed.run(progress=False)
    assert losses(resumed.history) == losses(t.history)[20:]  # bit for bit on CPU
    assert resumed.last_eval == t.last_eval
    # without the optimizer state the same weights train differently: the state matters
    fresh = Trainer(from_apr(folder / "step20.apr", fast=False), stream[0], stream[1],
                    TrainConfig.from_dict(meta["training.config"]), log=lambda *a: None)
    fresh.step, fresh.batches.position = 20, 160
    assert fresh.train_step()["loss"] == losses(t.history)[20]  # same weights, same batch
    assert fresh.train_step()["loss"] != losses(t.history)[21]


def test_init_from_apr_starts_at_the_saved_eval_loss_far_below_scratch(trained, stream):
    t, folder = trained
    path = folder / "step40.apr"
    saved = training_metadata(path)["training.eval_loss"]
    assert saved == t.last_eval[0]
    init = Trainer(from_apr(path), stream[0], stream[1], TrainConfig(steps=1, seq_len=32, eval_tokens=384),
                   log=lambda *a: None)
    step0, _ = init.evaluate()
    assert step0 == pytest.approx(saved, rel=1e-6)
    scratch = _trainer(stream, TrainConfig(steps=1, seq_len=32, eval_tokens=384), model_cfg="tiny_qwen2", seed=5)
    from_scratch, _ = scratch.evaluate()
    assert from_scratch >= math.log(320) - 0.5
    assert step0 <= from_scratch - 2.0
    assert init.optimizer.state == {}  # only weights come from the init file (fresh optimizer)


# ------------------------------------------------------------------------------ fast vs eager
@pytest.mark.parametrize("rope_type", [2, 0])
def test_fast_path_matches_reference_path_for_a_few_steps(monkeypatch, stream, rope_type):
    # the Triton kernels (interpreter on CPU) against eager PyTorch: same loss curve
    monkeypatch.setenv("APR_KERNELS_BACKEND", "triton")
    from apr_kernels import backend

    cfg = ModelConfig(architecture="qwen2", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=72, vocab_size=257, attention_bias=True, tie_word_embeddings=False,
                      rope_type=rope_type)
    tcfg = TrainConfig(steps=3, batch_size=2, seq_len=16, lr=1e-2, warmup=0)
    torch.manual_seed(0)
    ref = Transformer(cfg, fast=False)
    fast = Transformer(cfg, fast=True)
    fast.load_state_dict(ref.state_dict())
    a = Trainer(ref, stream[0], None, tcfg, log=lambda *x: None)
    b = Trainer(fast, stream[0], None, tcfg, log=lambda *x: None)
    la = [a.train_step()["loss"] for _ in range(3)]
    lb = [b.train_step()["loss"] for _ in range(3)]
    # the kernels really ran
    assert {"rms_norm", "attention", "rope", "swiglu", "cross_entropy"} <= set(backend._loaded)
    assert la[2] < la[0]
    assert lb == pytest.approx(la, rel=2e-5)
    for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1e-4, msg=name)


# ----------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_fast_path_matches_reference_path_on_cuda(autocast, stream):
    # Qwen2-0.5B's layer shapes (GQA 7:1, head_dim 64, bias), two layers, byte vocabulary
    cfg = preset("qwen2_0_5b").replace(num_layers=2, vocab_size=320, head_dim=64)
    runs = _cuda_losses_reference_and_fast(cfg, stream, autocast)
    assert runs[0][-1] < runs[0][0] - 0.5
    assert runs[1] == pytest.approx(runs[0], rel=2e-3 if autocast is None else 2e-2)


def _cuda_losses_reference_and_fast(cfg, stream, autocast, steps: int = 8) -> list[list[float]]:
    """The first ``steps`` training losses of the reference and the fast path from the same weights."""
    tcfg = TrainConfig(steps=steps, batch_size=8, seq_len=32, lr=1e-3, warmup=0)
    torch.manual_seed(0)
    ref = Transformer(cfg, fast=False)
    fast = Transformer(cfg, fast=True)
    fast.load_state_dict(ref.state_dict())
    runs = []
    for model in (ref, fast):
        t = Trainer(model, stream[0], None, tcfg, device="cuda", autocast_dtype=autocast, log=lambda *x: None)
        runs.append([t.train_step()["loss"] for _ in range(steps)])
    return runs


@pytest.mark.cuda
def test_from_apr_straight_to_cuda_in_bf16(trained):
    _, folder = trained
    cpu = from_apr(folder / "step40.apr")
    gpu = from_apr(folder / "step40.apr", device="cuda", dtype=torch.bfloat16)
    assert {p.device.type for p in gpu.parameters()} == {"cuda"}
    assert {p.dtype for p in gpu.parameters()} == {torch.bfloat16}
    x = torch.randint(0, 320, (2, 40))
    with torch.no_grad():
        want = cpu(x)
        got = gpu(x.cuda()).float().cpu()
    assert (got - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["qwen3", "mistral"])
def test_fast_path_matches_reference_path_on_cuda_for_qwen3_and_mistral(family, stream):
    """The families whose fast path adds work: Qwen3's per-head q/k norms (rms_norm on head_dim rows
    of the fused q/k/v buffer) and Mistral's sliding window (window 24 over rows of 32)."""
    if family == "qwen3":
        cfg = preset("qwen3_0_6b").replace(num_layers=2, vocab_size=320, head_dim=128)
    else:
        cfg = preset("tiny_llama").replace(architecture="mistral", sliding_window=24, hidden_size=256,
                                           num_heads=4, num_kv_heads=2, head_dim=64)
    runs = _cuda_losses_reference_and_fast(cfg, stream, torch.bfloat16)
    assert runs[0][-1] < runs[0][0] - 0.3
    assert runs[1] == pytest.approx(runs[0], rel=2e-2)


def test_token_stream_is_the_same_in_any_batching_and_streams_to_the_cache(tmp_path):
    """token_parts batches documents across and within files (a big JSON Lines file is split); the
    stream, its max_tokens cut and the cache file written piece by piece are all the same stream."""
    from apr_kernels.train.data import cached_tokens, token_parts, tokenize_files

    docs = [STDLIB.joinpath(n).read_text()[:3000] for n in ("textwrap.py", "shlex.py", "json/__init__.py")]
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"text": d[i:i + 400]}) + "\n" for d in docs for i in range(0, 3000, 400)))
    small = tmp_path / "small.txt"
    small.write_text(docs[0][:777])
    files = [big, small]
    tok = byte_tokenizer()
    want = tokenize_files(files, tok, workers=1)
    pieces = list(token_parts(files, tok, batch_chars=500, workers=2))
    assert len(pieces) > 5 and torch.equal(torch.cat(pieces), want)
    cut = torch.cat(list(token_parts(files, tok, batch_chars=500, max_tokens=4321)))
    assert torch.equal(cut, want[:4321])
    cached = cached_tokens(files, tok, cache_dir=tmp_path / "cache")
    assert torch.equal(cached, want) and cached.dtype == torch.int32
    left = sorted(p.name for p in (tmp_path / "cache").iterdir())  # the entry and its lock file
    assert len(left) == 2 and left[1].startswith("tokens-") and left[0] == f".{left[1]}.lock"


def test_concurrent_misses_tokenise_once(tmp_path):
    """Two processes (two torchrun ranks) missing the same cache entry at once: one tokenises, the
    other waits on the lock and maps its file; both get the same stream."""
    import subprocess
    import sys

    files = sorted(str(p) for p in STDLIB.glob("*.py"))  # ~1 s each: the two runs overlap
    script = (
        "import sys, hashlib\n"
        "from pathlib import Path\n"
        "from apr_kernels.train.cli import byte_tokenizer\n"
        "from apr_kernels.train.data import cached_tokens\n"
        "t = cached_tokens([Path(f) for f in sys.argv[2:]], byte_tokenizer(), cache_dir=sys.argv[1],\n"
        "                  log=lambda m: print(m, flush=True))\n"
        "print('sha', hashlib.sha256(t.numpy().tobytes()).hexdigest())\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "cache"), *files],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    logs = "".join(o[0] for o in outs)
    assert logs.count("tokens saved to") == 1 and logs.count("tokens from") == 1, logs
    shas = {line for o in outs for line in o[0].splitlines() if line.startswith("sha ")}
    assert len(shas) == 1


def test_fp16_trains_with_loss_scaling_skips_overflows_and_resumes_exactly(stream, tmp_path):
    """precision fp16 (older GPUs; CPU autocast here): losses follow fp32's closely, the gradient
    scaler skips a step whose gradients overflow (weights untouched, scale halved), and its state
    travels with checkpoints so a resumed run repeats the uninterrupted losses."""
    cfg = TrainConfig(steps=4, batch_size=4, seq_len=32, lr=3e-3, eval_tokens=256)
    ref = _trainer(stream, cfg)
    half = _trainer(stream, TrainConfig.from_dict(cfg.to_dict(), precision="fp16"))
    assert ref.scaler is None and half.autocast_dtype == torch.float16 and half.scaler is not None
    a = [ref.train_step()["loss"] for _ in range(2)]
    b = [half.train_step()["loss"] for _ in range(2)]
    assert b == pytest.approx(a, rel=2e-3) and b != a  # fp16 maths, the same curve
    save_checkpoint(tmp_path / "s2.apr", half, tokenizer=byte_tokenizer())
    assert training_metadata(tmp_path / "s2.apr")["training.grad_scaler"]["scale"] == half.scaler.get_scale()
    rest = [half.train_step()["loss"] for _ in range(2)]
    resumed = Trainer(from_apr(tmp_path / "s2.apr", fast=False), stream[0], stream[1],
                      TrainConfig.from_dict(training_metadata(tmp_path / "s2.apr")["training.config"]),
                      log=lambda *a: None)
    restore_training_state(tmp_path / "s2.apr", resumed)
    assert [resumed.train_step()["loss"] for _ in range(2)] == rest
    # an overflow: gradients scaled past fp16's range are inf; the step is skipped, the scale halves
    over = _trainer(stream, TrainConfig.from_dict(cfg.to_dict(), precision="fp16"))
    over.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60)
    before = {n: p.detach().clone() for n, p in over.model.named_parameters()}
    rec = over.train_step()
    assert not math.isfinite(rec["grad_norm"]) and over.scaler.get_scale() == 2.0 ** 59
    assert all(torch.equal(p, before[n]) for n, p in over.model.named_parameters())
    assert math.isfinite(over.train_step()["loss"])
    with pytest.raises(ValueError, match=r"precision='fp8'; expected one of auto, bf16, fp16, fp32"):
        TrainConfig(precision="fp8")


def test_label_smoothing_and_z_loss_step_is_the_formula_and_eval_stays_plain(stream):
    """TrainConfig.label_smoothing / z_loss: a step's logged loss is the smoothed, z-regularised cross
    entropy over the step's targets (two micro-batches), its gradients those of that loss; held-out
    eval stays the plain cross entropy; a teacher with either is refused."""
    cfg = TrainConfig(steps=1, batch_size=2, grad_accum=2, seq_len=32, lr=3e-3, eval_tokens=256, label_smoothing=0.1,
                      z_loss=1e-3)
    trainer = _trainer(stream, cfg)
    torch.manual_seed(0)
    oracle = Transformer(preset("tiny_llama"), fast=False)
    oracle.load_state_dict(trainer.model.state_dict())
    rec = trainer.train_step()
    seqs = sequences(stream[0], 32)
    s = BatchStream(len(seqs), seed=cfg.seed)
    total, n = 0.0, 0
    for _ in range(2):
        x, y, _ = batch(seqs, s.next(2))
        logits = oracle(x).double().flatten(0, 1)
        keep = y.flatten() != -100
        per = torch.nn.functional.cross_entropy(logits, y.flatten(), reduction="none", label_smoothing=0.1)
        total = total + (per + 1e-3 * torch.logsumexp(logits, -1) ** 2 * keep).sum()
        n += int(keep.sum())
    (total / n).backward()
    assert rec["loss"] == pytest.approx(total.item() / n, rel=1e-5)
    norm = torch.nn.utils.clip_grad_norm_(oracle.parameters(), cfg.grad_clip)
    assert rec["grad_norm"] == pytest.approx(norm.item(), rel=1e-4)
    plain = _trainer(stream, TrainConfig(steps=1, batch_size=2, seq_len=32, eval_tokens=256))
    plain.model.load_state_dict(trainer.model.state_dict())
    assert trainer.evaluate()[0] == pytest.approx(plain.evaluate()[0], rel=1e-9)
    with pytest.raises(ValueError, match="label_smoothing and z_loss change the cross entropy alone"):
        TrainConfig(teacher="t.apr", z_loss=1e-4)


def test_cli_label_smoothing_z_loss_and_neftune_travel_into_checkpoints(tmp_path, capsys):
    """The options reach the checkpoint's config and a resumed run repeats the uninterrupted one (the
    NEFTune noise drawn from the restored random state)."""
    from apr_kernels.cli import main

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    args = ["train", "--preset", "tiny_llama", "--tokenizer", "bytes", "--data", str(stdlib / "textwrap.py"),
            "--eval-data", str(stdlib / "shlex.py"), "--steps", "3", "--batch-size", "2", "--seq-len", "32",
            "--eval-tokens", "64", "--save-every", "1", "--json", "--no-token-cache", "--fast", "off",
            "--label-smoothing", "0.1", "--z-loss", "1e-3", "--neftune-alpha", "5"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    losses = [json.loads(x)["loss"] for x in capsys.readouterr().out.splitlines() if '"event": "train"' in x]
    config = training_metadata(tmp_path / "a" / "step_000001.apr")["training.config"]
    assert (config["label_smoothing"], config["z_loss"], config["neftune_alpha"]) == (0.1, 1e-3, 5.0)
    assert main(["train", "--resume", str(tmp_path / "a" / "step_000001.apr"), "--json", "--out",
                 str(tmp_path / "b")]) == 0
    resumed = [json.loads(x)["loss"] for x in capsys.readouterr().out.splitlines() if '"event": "train"' in x]
    assert resumed == losses[1:]
    assert main([*args[:7], "--steps", "1", "--z-loss", "-1", "--out", str(tmp_path / "c")]) == 1
    assert "z_loss=-1.0; expected 0 <= label_smoothing <= 1 and z_loss >= 0" in capsys.readouterr().err


def test_activation_offload_keeps_saved_tensors_on_the_host_and_changes_nothing(stream, monkeypatch):
    """TrainConfig.activation_offload: the micro-batches' forwards run under save_on_cpu, and the
    losses and weights are those of the run without it."""
    calls = []
    real = torch.autograd.graph.save_on_cpu
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", lambda **k: calls.append(k) or real(**k))
    runs = []
    for offload in (False, True):
        cfg = TrainConfig(steps=2, batch_size=2, grad_accum=2, seq_len=32, lr=3e-3, eval_tokens=256,
                          activation_offload=offload)
        trainer = _trainer(stream, cfg)
        runs.append(([trainer.train_step()["loss"] for _ in range(2)], trainer.model.state_dict()))
    assert len(calls) == 4 and calls[0] == {"pin_memory": False}  # two micro-batches x two steps
    assert runs[1][0] == runs[0][0]
    for name, t in runs[0][1].items():
        assert torch.equal(runs[1][1][name], t), name
