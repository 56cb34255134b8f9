"""``apr-kernels train`` / ``eval`` / ``demo`` end to end on tiny settings (in process, real stdlib text)."""

import json
import re
import math
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import apr_kernels
from apr_kernels.cli import main
from text_helpers import write_short_documents

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAIN = [str(STDLIB / "json"), str(STDLIB / "textwrap.py")]
HELD = str(STDLIB / "shlex.py")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def json_lines(out):
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """train --json: 4 steps, checkpoints at 2 and 4, held-out file for eval."""
    out = tmp_path_factory.mktemp("run")
    argv = ["train", "--preset", "tiny_llama", "--tokenizer", "bytes", "--data", *TRAIN, "--eval-data", HELD,
            "--max-tokens", "20000", "--steps", "4", "--batch-size", "3", "--seq-len", "48", "--lr", "3e-3",
            "--eval-tokens", "240", "--save-every", "2", "--out", str(out), "--json", "--seed", "7",
            "--tensorboard", str(out / "tb")]
    proc = subprocess.run([sys.executable, "-m", "apr_kernels", *argv], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, json_lines(proc.stdout)


def test_train_logs_steps_evals_and_checkpoints(first_run):
    out, recs = first_run
    from apr_kernels.model import Transformer, preset

    start = recs[0]
    n_params = sum(p.numel() for p in Transformer(preset("tiny_llama")).parameters())
    assert start["event"] == "start" and start["params"] == start["trainable"] == n_params
    assert start["tokens_per_step"] == 3 * 48 and start["steps"] == 4 and start["lora_rank"] is None
    train = [r for r in recs if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["tok_s"] > 0 and r["lr"] > 0 for r in train)
    evals = [r for r in recs if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 4] and evals[0]["eval_tokens"] == 240
    assert evals[0]["eval_loss"] == pytest.approx(math.log(320), abs=0.3)
    assert [Path(r["path"]).name for r in recs if r["event"] == "checkpoint"] == ["step_000002.apr", "model.apr"]
    assert recs[-1]["event"] == "done" and recs[-1]["eval_loss"] == evals[-1]["eval_loss"]


def test_tensorboard_files_hold_the_logged_values(first_run):
    """--tensorboard: TensorBoard's own event reader finds every logged train and eval value at its step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, recs = first_run
    board = EventAccumulator(str(out / "tb"))
    board.Reload()
    train = [r for r in recs if r["event"] == "train"]
    for key in ("loss", "lr", "grad_norm", "tok_s"):
        got = board.Scalars(f"train/{key}")
        assert [e.step for e in got] == [r["step"] for r in train]
        assert [e.value for e in got] == pytest.approx([r[key] for r in train], rel=1e-6), key
    evals = [r for r in recs if r["event"] == "eval"]
    assert [(e.step, e.value) for e in board.Scalars("eval/loss")] == \
        [(r["step"], pytest.approx(r["eval_loss"], rel=1e-6)) for r in evals]
    assert "start/text_summary" in board.Tags()["tensors"]


def test_eval_reproduces_the_final_eval_loss(first_run, capsys):
    out, recs = first_run
    final = [r for r in recs if r["event"] == "eval"][-1]["eval_loss"]
    code, stdout, _ = run(capsys, "eval", "--init", str(out / "model.apr"), "--data", HELD, "--max-tokens", "240")
    assert code == 0
    last = stdout.strip().splitlines()[-1]
    key, tokens = last.split()
    assert key.startswith("eval_loss=") and tokens == "tokens=240"  # --seq-len defaults to the checkpoint's
    assert float(key.split("=")[1]) == pytest.approx(final, abs=2e-6)


def test_eval_reports_perplexity_and_bits_per_byte(capsys, tmp_path):
    """eval's perplexity is exp(loss) and its bits per byte the total loss over the UTF-8 bytes of the
    text the scored targets stand for (the end-of-text id: none), counted here by decoding the
    targets; the Qwen2.5 tokenizer on Python source, so tokens hold several bytes."""
    from apr_kernels.tokenizer import Tokenizer
    from apr_kernels.train.data import eval_sequences, split_targets, tokenize_files

    held = tmp_path / "held.py"
    held.write_text((STDLIB / "shlex.py").read_text()[:3000])
    code, out, err = run(capsys, "train", "--preset", "tiny_qwen2", "--fit-vocab", "--tokenizer", "qwen2", "--data",
                         str(STDLIB / "textwrap.py"), "--steps", "1", "--batch-size", "2", "--seq-len", "64",
                         "--eval-tokens", "64", "--no-token-cache", "--out", str(tmp_path / "m"))
    assert code == 0, err
    code, out, err = run(capsys, "eval", "--init", str(tmp_path / "m" / "model.apr"), "--data", str(held), "--json")
    assert code == 0, err
    got = json_lines(out)[-1]
    qwen = Tokenizer.qwen2()
    _, y = split_targets(eval_sequences(tokenize_files([held], qwen), 64))
    targets = [t for t in y.flatten().tolist() if t != -100]
    assert got["tokens"] == len(targets)
    text_bytes = len(qwen.decode([t for t in targets if t != qwen.eos_id]).encode("utf-8"))
    assert got["bytes"] == text_bytes and text_bytes > 2 * len(targets)
    assert got["perplexity"] == pytest.approx(math.exp(got["eval_loss"]), rel=1e-12)
    assert got["bits_per_byte"] == pytest.approx(got["eval_loss"] * len(targets) / (math.log(2) * text_bytes),
                                                 rel=1e-12)
    code, out, _ = run(capsys, "eval", "--init", str(tmp_path / "m" / "model.apr"), "--data", str(held))
    ppl_line, last = out.strip().splitlines()[-2:]
    assert last.startswith("eval_loss=") and ppl_line.startswith("perplexity=") and "bits_per_byte=" in ppl_line


def test_resume_continues_with_identical_losses(first_run, capsys, tmp_path):
    out, recs = first_run
    code, stdout, _ = run(capsys, "train", "--resume", str(out / "step_000002.apr"), "--out", str(tmp_path), "--json")
    assert code == 0
    resumed = [r["loss"] for r in json_lines(stdout) if r["event"] == "train"]
    assert resumed == [r["loss"] for r in recs if r["event"] == "train"][2:]


def test_resume_auto_is_the_same_command_after_a_crash(first_run, capsys, tmp_path):
    """--resume auto: with only the step-2 checkpoint in --out (a job killed before step 4), the same
    command continues from it with the uninterrupted losses; once model.apr is there it has nothing
    to do; in an empty --out it starts fresh."""
    import shutil

    out, recs = first_run
    argv = ["train", "--resume", "auto", "--preset", "tiny_llama", "--tokenizer", "bytes", "--data", *TRAIN,
            "--eval-data", HELD, "--max-tokens", "20000", "--steps", "4", "--batch-size", "3", "--seq-len", "48",
            "--lr", "3e-3", "--eval-tokens", "240", "--save-every", "2", "--json", "--seed", "7", "--no-progress"]
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copy(out / "step_000002.apr", crashed)
    code, stdout, err = run(capsys, *argv, "--out", str(crashed))
    assert code == 0 and f"continuing from {crashed / 'step_000002.apr'}" in err
    assert [r["loss"] for r in json_lines(stdout) if r["event"] == "train"] == \
        [r["loss"] for r in recs if r["event"] == "train"][2:]
    code, stdout, err = run(capsys, *argv, "--out", str(crashed))
    assert code == 0 and "is the finished run (step 4); nothing to do" in err and stdout == ""
    code, stdout, err = run(capsys, *argv, "--out", str(tmp_path / "fresh"), "--steps", "1")
    assert code == 0 and "starting fresh" in err
    assert [r["step"] for r in json_lines(stdout) if r["event"] == "train"] == [1]


def test_grad_checkpointing_flag_keeps_the_loss_curve(first_run, capsys, tmp_path, monkeypatch):
    out, recs = first_run
    from apr_kernels.model import transformer

    recomputed = []
    real = transformer.torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(transformer.torch.utils.checkpoint, "checkpoint",
                        lambda *a, **k: recomputed.append(1) or real(*a, **k))
    code, stdout, _ = run(capsys, "train", "--resume", str(out / "step_000002.apr"), "--out", str(tmp_path),
                          "--json", "--grad-checkpointing")
    assert code == 0 and recomputed
    resumed = [r["loss"] for r in json_lines(stdout) if r["event"] == "train"]
    assert resumed == pytest.approx([r["loss"] for r in recs if r["event"] == "train"][2:], rel=1e-5)


def test_compile_flag_compiles_each_layer_and_keeps_the_loss_curve(first_run, capsys, tmp_path, monkeypatch):
    out, recs = first_run
    import apr_kernels.train.cli as cli

    compiled = []
    real = torch.compile

    def spy_compile(fn, **kw):
        compiled.append(kw.get("backend"))
        return real(fn, **kw)

    monkeypatch.setattr(cli.torch, "compile", spy_compile)
    # (the graph capture is real; aot_eager skips inductor's C++ build on CPU)
    monkeypatch.setenv("APR_KERNELS_COMPILE_BACKEND", "aot_eager")
    code, stdout, _ = run(capsys, "train", "--resume", str(out / "step_000002.apr"), "--out", str(tmp_path),
                          "--json", "--compile")
    assert code == 0 and compiled == ["aot_eager"] * 2  # tiny_llama's two layers, on the backend asked
    resumed = [r["loss"] for r in json_lines(stdout) if r["event"] == "train"]
    assert resumed == pytest.approx([r["loss"] for r in recs if r["event"] == "train"][2:], rel=1e-5)
    names = set(apr_kernels.open(tmp_path / "model.apr").keys())
    assert "model.layers.0.self_attn.q_proj.weight" in names and not any("_orig_mod" in n for n in names)


def test_token_cache_is_written_once_and_reused(capsys, tmp_path):
    cache = tmp_path / "cache"
    argv = ["train", "--preset", "tiny_llama", "--tokenizer", "bytes", "--data", *TRAIN, "--eval-data", HELD,
            "--max-tokens", "6000", "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "64",
            "--json", "--no-progress", "--token-cache", str(cache)]
    code, out1, err1 = run(capsys, *argv, "--out", str(tmp_path / "a"))
    assert code == 0 and err1.count("saved to") == 2  # train and eval streams
    code, out2, err2 = run(capsys, *argv, "--out", str(tmp_path / "b"))
    assert code == 0 and err2.count("tokens from") == 2 and "saved to" not in err2
    assert len(list(cache.glob("tokens-*.apr"))) == 2
    losses = [[r["loss"] for r in json_lines(o) if r["event"] == "train"] for o in (out1, out2)]
    assert losses[0] == losses[1] and len(losses[0]) == 2
    code, _, err3 = run(capsys, *argv, "--out", str(tmp_path / "c"), "--no-token-cache", "--token-cache",
                        str(tmp_path / "unused"))
    assert code == 0 and "token cache" not in err3 and not (tmp_path / "unused").exists()


def test_text_log_lines_and_init_from_checkpoint(first_run, capsys, tmp_path):
    out, _ = first_run
    code, stdout, _ = run(capsys, "train", "--init", str(out / "model.apr"), "--data", *TRAIN, "--max-tokens",
                          "6000", "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "64",
                          "--out", str(tmp_path))
    assert code == 0
    steps = [line for line in stdout.splitlines() if line.startswith("step=")]
    assert [s.split()[0] for s in steps] == ["step=1", "step=2"]
    assert all(s.split()[1].startswith("loss=") and "tok_s=" in s for s in steps)
    assert (tmp_path / "model.apr").exists()


def test_preflight_errors_reach_the_command_line(capsys, tmp_path):
    # Qwen2.5 tokenizer against the default Llama-370M target: refused before any model is built
    code, _, err = run(capsys, "train", "--tokenizer", "qwen2", "--data", HELD, "--out", str(tmp_path))
    assert code == 1
    assert "apr-kernels train: error: preset 'llama_370m'" in err
    assert "the tokenizer has 151665 tokens but the model vocab_size is 50257" in err
    code, _, err = run(capsys, "train", "--init", str(tmp_path / "none.apr"), "--data", HELD)
    assert code == 1 and "none.apr: init file does not exist" in err
    code, _, err = run(capsys, "train", "--preset", "tiny_llama", "--tokenizer", "bytes")
    assert code == 1 and "--data PATH... is required" in err


@pytest.mark.slow
def test_demo_runs_end_to_end_and_its_checkpoint_reproduces_the_eval(tmp_path):
    # the README's first command, shortened to 3 steps (the full demo is ~30 steps)
    proc = subprocess.run([sys.executable, "-m", "apr_kernels", "demo", "--steps", "3", "--out", str(tmp_path),
                           "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert "GQA 7:1" in lines[0] and "vocab 151680" in lines[0]
    assert any("reloaded checkpoint reproduces the final eval loss" in line for line in lines)
    assert lines[-1].startswith("eval_loss=") and lines[-1].endswith("tokens=512")
    first = [line for line in lines if line.startswith("eval step=0")][0]
    assert float(first.split("eval_loss=")[1].split()[0]) == pytest.approx(math.log(151680), abs=0.3)
    assert (tmp_path / "model.apr").exists()
    sample = lines.index(next(line for line in lines if line.startswith("demo: a sample from the trained model")))
    assert lines[sample + 1].startswith("  | def ")


@pytest.fixture(scope="module")
def small_documents(tmp_path_factory):
    return write_short_documents(tmp_path_factory.mktemp("docs"))


def test_document_mask_trains_evaluates_and_resumes_with_masking(small_documents, capsys, tmp_path, monkeypatch):
    from apr_kernels.model import documents

    train, held = small_documents
    spans = []
    real = documents.Documents.from_eos.__func__
    monkeypatch.setattr(documents.Documents, "from_eos",
                        classmethod(lambda cls, x, eos: spans.append(eos) or real(cls, x, eos)))
    base = ["train", "--preset", "tiny_llama", "--tokenizer", "bytes", "--data", train, "--eval-data", held,
            "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3", "--eval-tokens", "512",
            "--save-every", "2", "--json", "--seed", "3", "--no-token-cache"]
    code, out, _ = run(capsys, *base, "--out", str(tmp_path / "masked"), "--document-mask")
    assert code == 0 and spans and set(spans) == {256}  # the byte tokenizer's end-of-text id
    masked = json_lines(out)
    spans.clear()
    code, out, _ = run(capsys, *base, "--out", str(tmp_path / "plain"))
    assert code == 0 and not spans
    plain = json_lines(out)
    losses = [[r["loss"] for r in recs if r["event"] == "train"] for recs in (masked, plain)]
    assert all(math.isfinite(v) for v in losses[0])
    # same initial weights, other attention: the step-0 evaluation and the loss curve differ
    evals = [[r["eval_loss"] for r in recs if r["event"] == "eval"] for recs in (masked, plain)]
    assert evals[0][0] != pytest.approx(evals[1][0], rel=1e-6)
    assert losses[0] != pytest.approx(losses[1], rel=1e-6)
    # eval takes the checkpoint's masking by default and reproduces the final eval loss
    args = ["eval", "--init", str(tmp_path / "masked" / "model.apr"), "--data", held, "--max-tokens", "512"]
    code, out, _ = run(capsys, *args)
    assert code == 0
    assert float(out.strip().splitlines()[-1].split()[0].split("=")[1]) == pytest.approx(evals[0][-1], abs=2e-6)
    code, out, _ = run(capsys, *args, "--no-document-mask")
    assert float(out.strip().splitlines()[-1].split()[0].split("=")[1]) != pytest.approx(evals[0][-1], rel=1e-5)
    # resume keeps document masking (stored in the training config): identical losses
    code, out, _ = run(capsys, "train", "--resume", str(tmp_path / "masked" / "step_000002.apr"), "--out",
                       str(tmp_path / "resumed"), "--json")
    assert code == 0
    resumed = json_lines(out)
    assert [r["loss"] for r in resumed if r["event"] == "train"] == losses[0][2:]
    assert [r["eval_loss"] for r in resumed if r["event"] == "eval"][-1] == evals[0][-1]


def test_json_lines_data_with_a_named_text_field(capsys, tmp_path):
    """A corpus exported as JSON Lines (one record per document): --text-field picks the field, the
    choice is stored with the data spec (so --resume reads the same documents), and a record without
    the field is a one-line error naming the file and line."""
    text = (STDLIB / "textwrap.py").read_text()
    for name, part in (("train.jsonl", text[:12000]), ("held.jsonl", text[12000:16000])):
        chunks = [part[i:i + 300] for i in range(0, len(part), 300)]
        (tmp_path / name).write_text("".join(json.dumps({"id": i, "body": c}) + "\n" for i, c in enumerate(chunks)))
    base = ["train", "--preset", "tiny_llama", "--tokenizer", "bytes", "--data", str(tmp_path / "train.jsonl"),
            "--eval-data", str(tmp_path / "held.jsonl"), "--steps", "2", "--batch-size", "2", "--seq-len", "32",
            "--eval-tokens", "64", "--json", "--no-token-cache", "--save-every", "1"]
    code, out, err = run(capsys, *base, "--out", str(tmp_path / "run"), "--text-field", "body")
    assert code == 0, err
    recs = json_lines(out)
    assert [r["step"] for r in recs if r["event"] == "train"] == [1, 2]
    from apr_kernels.train.checkpoint import training_metadata

    assert training_metadata(tmp_path / "run" / "step_000001.apr")["training.data_spec"]["text_field"] == "body"
    code, out, err = run(capsys, "train", "--resume", str(tmp_path / "run" / "step_000001.apr"), "--out",
                         str(tmp_path / "resumed"), "--json", "--no-token-cache")
    assert code == 0, err
    assert [r["loss"] for r in json_lines(out) if r["event"] == "train"] == \
        [r["loss"] for r in recs if r["event"] == "train"][1:]
    code, out, err = run(capsys, *base, "--out", str(tmp_path / "bad"))
    assert code != 0
    assert "train.jsonl:1: expected a JSON object with a string field 'text' (--text-field), or a 'messages', " \
           "'prompt'/'completion' or Alpaca record; got an object with fields ['body', 'id']" in err


def test_lr_schedule_flag_sets_the_logged_learning_rates(capsys, tmp_path):
    code, out, err = run(capsys, "train", "--preset", "tiny_llama", "--tokenizer", "bytes", "--data",
                         str(STDLIB / "textwrap.py"), "--steps", "4", "--batch-size", "2", "--seq-len", "32",
                         "--eval-tokens", "64", "--lr", "1e-3", "--warmup", "0", "--lr-schedule", "wsd",
                         "--decay-fraction", "0.5", "--json", "--no-token-cache", "--out", str(tmp_path))
    assert code == 0, err
    lrs = [r["lr"] for r in json_lines(out) if r["event"] == "train"]
    # stable for the first half, then a linear decay to min-lr-ratio 0.1 at the last step
    assert lrs == pytest.approx([1e-3, 1e-3, 5.5e-4, 1e-4])
    from apr_kernels.train.checkpoint import training_metadata

    stored = training_metadata(tmp_path / "model.apr")["training.config"]
    assert stored["lr_schedule"] == "wsd" and stored["decay_fraction"] == 0.5


def test_generate_continues_a_prompt_reproducibly(first_run, capsys):
    out, _ = first_run
    args = ["generate", "--init", str(out / "model.apr"), "--prompt", "import ", "--max-new-tokens", "12",
            "--json"]
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    rec = json.loads(stdout.strip().splitlines()[-1])
    assert rec["prompt"] == "import " and 0 <= rec["tokens"] <= 12
    assert json.loads(run(capsys, *args)[1].strip().splitlines()[-1]) == rec  # same seed, same text
    # greedy text equals the model's own argmax continuation (bytes tokenizer: one token per byte)
    code, stdout, _ = run(capsys, "generate", "--init", str(out / "model.apr"), "--prompt", "def ",
                          "--max-new-tokens", "6", "--temperature", "0")
    from apr_kernels.model import from_apr

    model = from_apr(out / "model.apr")
    ids = torch.tensor([list(b"def ")])
    for _ in range(6):
        with torch.no_grad():
            ids = torch.cat([ids, model(ids)[:, -1, :257].argmax(-1, keepdim=True)], dim=1)  # the tokenizer's ids
    want = ids[0, 4:].tolist()
    want = want[:want.index(256)] if 256 in want else want
    assert stdout.rstrip("\n") == "def " + bytes(want).decode("utf-8", errors="replace")
    # an empty prompt starts a fresh document
    code, stdout, err = run(capsys, "generate", "--init", str(out / "model.apr"), "--max-new-tokens", "5")
    assert code == 0, err


def test_chat_records_fine_tune_on_answers_only(capsys, tmp_path):
    """Supervised fine-tuning from the command line: chat records with the Qwen2.5 tokenizer, the loss
    over the assistant answers only; eval on the checkpoint reproduces the final eval loss."""
    lines = (STDLIB / "textwrap.py").read_text().splitlines()
    convos = [{"messages": [{"role": "user", "content": f"Line {i} of textwrap.py?"},
                            {"role": "assistant", "content": lines[i]}]} for i in range(120)]
    for name, part in (("train.jsonl", convos[:100]), ("held.jsonl", convos[100:])):
        (tmp_path / name).write_text("".join(json.dumps(c) + "\n" for c in part))
    code, out, err = run(capsys, "train", "--preset", "tiny_qwen2", "--fit-vocab", "--tokenizer", "qwen2",
                         "--data", str(tmp_path / "train.jsonl"), "--eval-data", str(tmp_path / "held.jsonl"),
                         "--steps", "3", "--batch-size", "2", "--seq-len", "64", "--eval-tokens", "256",
                         "--json", "--no-token-cache", "--out", str(tmp_path / "run"))
    assert code == 0, err
    evals = [r for r in json_lines(out) if r["event"] == "eval"]
    # eval_tokens counts targets: the answers and their <|im_end|>, far fewer than the 4 x 64 positions
    assert 0 < evals[-1]["eval_tokens"] < 256 / 2
    code, out, err = run(capsys, "eval", "--init", str(tmp_path / "run" / "model.apr"), "--data",
                         str(tmp_path / "held.jsonl"), "--max-tokens", "256")
    assert code == 0, err
    loss, tokens = out.strip().splitlines()[-1].split()
    assert float(loss.split("=")[1]) == pytest.approx(evals[-1]["eval_loss"], abs=2e-6)
    assert int(tokens.split("=")[1]) == evals[-1]["eval_tokens"]


def test_chat_template_file_renders_the_records_and_travels_with_the_checkpoint(capsys, tmp_path):
    """--chat-template FILE: records are rendered by that template (a plain-text one here, its answers
    closed by <|endoftext|>), the checkpoint carries it, and eval on the checkpoint renders alike (the
    same loss and target count; the default ChatML would give others). A template that cannot render
    a conversation is refused before any data is read."""
    template = ("{%- for m in messages %}{{- '### ' + m['role'] + ':\\n' + m['content'] }}"
                "{%- if m['role'] == 'assistant' %}{{- '<|endoftext|>' }}{%- endif %}{{- '\\n' }}{%- endfor %}")
    (tmp_path / "plain.jinja").write_text(template)
    convos = [{"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}!"}]}
              for i in range(60)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convos))
    common = ["train", "--preset", "tiny_qwen2", "--fit-vocab", "--tokenizer", "qwen2", "--data",
              str(tmp_path / "c.jsonl"), "--eval-data", str(tmp_path / "c.jsonl"), "--steps", "1", "--batch-size",
              "2", "--seq-len", "64", "--eval-tokens", "256", "--json", "--no-token-cache"]
    code, out, err = run(capsys, *common, "--chat-template", str(tmp_path / "plain.jinja"), "--out", str(tmp_path / "t"))
    assert code == 0, err
    final = [r for r in json_lines(out) if r["event"] == "eval"][-1]
    meta = apr_kernels.open(tmp_path / "t" / "model.apr").metadata
    assert meta["tokenizer.chat_template"] == template
    code, out, err = run(capsys, "eval", "--init", str(tmp_path / "t" / "model.apr"), "--data",
                         str(tmp_path / "c.jsonl"), "--max-tokens", "256", "--json")
    assert code == 0, err
    got = json_lines(out)[-1]
    assert got["eval_loss"] == pytest.approx(final["eval_loss"], abs=2e-6) and got["tokens"] == final["eval_tokens"]
    code, out, err = run(capsys, *common, "--out", str(tmp_path / "default"))  # ChatML: other targets
    assert code == 0, err
    assert [r for r in json_lines(out) if r["event"] == "eval"][-1]["eval_tokens"] != final["eval_tokens"]
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    code, _, err = run(capsys, *common, "--chat-template", str(tmp_path / "bad.jinja"), "--out", str(tmp_path / "x"))
    assert code == 1 and "--chat-template" in err and "does not render a conversation" in err, err


def test_keep_last_prunes_old_periodic_checkpoints(capsys, tmp_path):
    (tmp_path / "step_000001.apr").write_bytes(b"an older run's")  # pruned too: the folder's policy
    (tmp_path / "notes.apr").write_bytes(b"not a checkpoint")
    code, out, err = run(capsys, "train", "--preset", "tiny_llama", "--tokenizer", "bytes", "--data",
                         str(STDLIB / "textwrap.py"), "--steps", "5", "--batch-size", "2", "--seq-len", "32",
                         "--eval-tokens", "64", "--save-every", "1", "--keep-last", "2", "--json",
                         "--no-token-cache", "--out", str(tmp_path))
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.glob("*.apr")) == ["model.apr", "notes.apr", "step_000003.apr",
                                                               "step_000004.apr"]
    removed = [r["path"] for r in json_lines(out) if r["event"] == "checkpoint_removed"]
    assert [Path(p).name for p in removed] == ["step_000001.apr", "step_000002.apr"]


def test_epochs_train_whole_passes_over_the_training_sequences(capsys, tmp_path):
    """--epochs 1.5 over 2000 bytes at --seq-len 32 (bytes + end-of-text: 62 sequences), 8 a step:
    ceil(1.5 * 62 / 8) = 12 steps, every sequence seen once and half of them twice; --steps with it
    is refused."""
    data = tmp_path / "a.txt"
    data.write_text("def f(x):\n    return x + 1\n" * 74 + "##")  # 27 * 74 + 2 = 2000 ASCII bytes
    assert data.stat().st_size == 2000
    common = ["train", "--preset", "tiny_llama", "--tokenizer", "bytes", "--data", str(data), "--eval-data", HELD,
              "--batch-size", "4", "--grad-accum", "2", "--seq-len", "32", "--eval-tokens", "64", "--json",
              "--no-token-cache"]
    code, out, err = run(capsys, *common, "--epochs", "1.5", "--out", str(tmp_path / "o"))
    assert code == 0, err
    start = json_lines(out)[0]
    assert start["steps"] == 12 and start["train_tokens"] == 62 * 32 and start["epochs"] == round(96 / 62, 3)
    assert [r["step"] for r in json_lines(out) if r["event"] == "train"] == list(range(1, 13))
    meta = apr_kernels.open(tmp_path / "o" / "model.apr").metadata
    assert meta["training.step"] == 12 and meta["training.data_position"] == 96
    assert meta["training.config"]["steps"] == 12  # resolved once: a resumed run keeps it
    with pytest.raises(SystemExit):
        main([*common, "--epochs", "1", "--steps", "3", "--out", str(tmp_path / "x")])
    assert "not allowed with argument" in capsys.readouterr().err


def test_wandb_run_holds_the_logged_values(capsys, tmp_path, monkeypatch):
    """--wandb PROJECT (offline): the run, named after --out and kept under it, holds each train and
    eval record's numbers at their steps (read back from wandb's run file with its own protobuf
    messages) and the start record as its config."""
    pytest.importorskip("wandb")
    from wandb_records import config, finished_run_file, history, records

    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"}.items():
        monkeypatch.setenv(key, value)
    for key in ("WANDB_DIR", "WANDB_NAME"):
        monkeypatch.delenv(key, raising=False)
    out = tmp_path / "wb-run"
    code, stdout, err = run(capsys, "train", "--preset", "tiny_llama", "--tokenizer", "bytes", "--data",
                            str(STDLIB / "textwrap.py"), "--steps", "3", "--batch-size", "2", "--seq-len", "32",
                            "--eval-tokens", "64", "--eval-every", "2", "--json", "--no-token-cache",
                            "--wandb", "apr-tests", "--out", str(out))
    assert code == 0, err
    recs = json_lines(stdout)
    run_file = finished_run_file(out)
    (run_rec,) = [r.run for r in records(run_file) if r.WhichOneof("record_type") == "run"]
    assert (run_rec.project, run_rec.display_name) == ("apr-tests", "wb-run")
    rows = {}
    for row in history(run_file):  # wandb merges what is logged at one step into one row
        rows.setdefault(row["_step"], {}).update(row)
    for r in recs:
        if r["event"] in ("train", "eval"):
            for key, v in r.items():
                if key not in ("event", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    name = f"{r['event']}/{key.removeprefix('eval_') if r['event'] == 'eval' else key}"
                    assert rows[r["step"]][name] == pytest.approx(v, rel=1e-12), (r["step"], name)
    assert sorted(rows) == [0, 1, 2, 3] and "eval/loss" in rows[0] and "train/loss" in rows[3]
    cfg = config(run_file)
    assert cfg["steps"] == 3 and cfg["tokens_per_step"] == 2 * 32 and cfg["device"] == "cpu"


def test_early_stopping_and_best_checkpoint_follow_the_eval_losses(capsys, tmp_path):
    """A bouncing run (lr 3e-2, an eval every step) without early stopping gives the eval losses; from
    them the test works out where --early-stopping-patience 2 must stop and which step is best. The
    stopped run ends there (model.apr marked finished, --resume auto has nothing to do), best.apr
    re-evaluates to the best loss, and a run resumed before the stop stops at the same step."""
    common = ["train", "--preset", "tiny_llama", "--tokenizer", "bytes", "--data", str(STDLIB / "textwrap.py"),
              "--eval-data", str(STDLIB / "json"), "--steps", "10", "--batch-size", "2", "--seq-len", "32",
              "--eval-tokens", "128", "--eval-every", "1", "--lr", "3e-2", "--json", "--no-token-cache"]
    code, out, err = run(capsys, *common, "--out", str(tmp_path / "full"))
    assert code == 0, err
    losses = {r["step"]: r["eval_loss"] for r in json_lines(out) if r["event"] == "eval"}
    best, stale, stop = None, 0, None  # the rule, written out: step 0 is the baseline, not a candidate
    for step in range(1, 11):
        if best is None or losses[step] < losses[best]:
            best, stale = step, 0
        else:
            stale += 1
        if stale == 2:
            stop = step
            break
    assert stop is not None and stop < 10, losses  # (the settings must make the loss bounce)

    es = [*common, "--early-stopping-patience", "2", "--save-best", "--save-every", "1"]
    code, out, err = run(capsys, *es, "--out", str(tmp_path / "es"))
    assert code == 0, err
    recs = json_lines(out)
    assert [r["step"] for r in recs if r["event"] == "train"] == list(range(1, stop + 1))
    assert [r["eval_loss"] for r in recs if r["event"] == "eval"] == [losses[s] for s in range(stop + 1)]
    (early,) = [r for r in recs if r["event"] == "early_stop"]
    assert (early["step"], early["best_step"], early["best_eval_loss"]) == (stop, best, losses[best])
    bests = [r["step"] for r in recs if r["event"] == "best"]
    assert bests[-1] == best and all(losses[a] > losses[b] for a, b in zip(bests, bests[1:]))
    meta = apr_kernels.open(tmp_path / "es" / "model.apr").metadata
    assert meta["training.step"] == stop and meta["training.stopped_early"] is True
    best_meta = apr_kernels.open(tmp_path / "es" / "best.apr").metadata
    assert best_meta["training.step"] == best and "training.format" not in best_meta  # a model, not resumable
    assert not any(k.startswith("__training__") for k in apr_kernels.load(tmp_path / "es" / "best.apr"))
    code, out, err = run(capsys, "eval", "--init", str(tmp_path / "es" / "best.apr"), "--data", str(STDLIB / "json"),
                         "--seq-len", "32", "--max-tokens", "128")
    assert code == 0, err
    assert float(out.split("eval_loss=")[1].split()[0]) == pytest.approx(losses[best], abs=1e-5)
    code, _, err = run(capsys, *es, "--resume", "auto", "--out", str(tmp_path / "es"))
    assert code == 0 and "nothing to do" in err
    # resumed one step before the stop: the count of evals without improvement carries over
    code, out, err = run(capsys, "train", "--resume", str(tmp_path / "es" / f"step_{stop - 1:06d}.apr"), "--json",
                         "--out", str(tmp_path / "resumed"))
    assert code == 0, err
    assert [r["step"] for r in json_lines(out) if r["event"] == "early_stop"] == [stop]
    code, _, err = run(capsys, *[a if a != "--eval-every" else "--log-every" for a in es], "--out",
                       str(tmp_path / "bad"))
    assert code == 1 and "early_stopping_patience=2 with eval_every=0; expected >= 0, and periodic evals" in err


def test_profile_writes_a_trace_of_the_package_ops_and_keeps_the_losses(capsys, tmp_path):
    """--profile DIR --profile-steps 2 (fast path: the package's ops, their CPU reference code):
    steps 2-3 profiled (after a warm-up step), a Chrome trace holding the apr:: custom ops and the
    two profiled steps, a summary table, and the same losses as the run without a profiler."""
    common = ["train", "--preset", "tiny_llama", "--tokenizer", "bytes", "--data", str(STDLIB / "textwrap.py"),
              "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "64", "--json",
              "--no-token-cache", "--fast", "on"]
    code, out, err = run(capsys, *common, "--out", str(tmp_path / "plain"))
    assert code == 0, err
    want = [r["loss"] for r in json_lines(out) if r["event"] == "train"]
    code, out, err = run(capsys, *common, "--profile", str(tmp_path / "prof"), "--profile-steps", "2",
                         "--out", str(tmp_path / "profiled"))
    assert code == 0, err
    recs = json_lines(out)
    assert [r["loss"] for r in recs if r["event"] == "train"] == want
    (done,) = [r for r in recs if r["event"] == "profile"]
    trace_file, summary = tmp_path / "prof" / "trace_rank0.json", tmp_path / "prof" / "summary_rank0.txt"
    assert done["files"] == [str(trace_file), str(summary)]
    names = {e.get("name") for e in json.loads(trace_file.read_text())["traceEvents"]}
    assert {"apr::attention_fwd", "apr::attention_bwd", "apr::linear_cross_entropy"} <= names
    assert sorted(n for n in names if n and n.startswith("ProfilerStep#")) == ["ProfilerStep#2", "ProfilerStep#3"]
    assert "apr::attention_bwd" in summary.read_text() and "Self CPU" in summary.read_text()


def test_resume_with_more_steps_extends_the_run(capsys, tmp_path):
    """--resume CKPT --steps N continues a finished 3-step run to 6 steps: with a constant learning
    rate (the schedule is the only thing a new total changes) steps 4-6 equal those of a run trained
    for 6 steps from the start; a total at or below the checkpoint's step, or --epochs, is refused."""
    common = ["train", "--preset", "tiny_llama", "--tokenizer", "bytes", "--data", str(STDLIB / "textwrap.py"),
              "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "64", "--json", "--no-token-cache",
              "--lr-schedule", "constant", "--warmup", "1"]
    code, out, err = run(capsys, *common, "--steps", "6", "--out", str(tmp_path / "six"))
    assert code == 0, err
    want = [r["loss"] for r in json_lines(out) if r["event"] == "train"]
    code, out, err = run(capsys, *common, "--steps", "3", "--out", str(tmp_path / "three"))
    assert code == 0, err
    finished = tmp_path / "three" / "model.apr"  # (a full run's final file holds its training state)
    code, out, err = run(capsys, "train", "--resume", str(finished), "--steps", "6", "--json",
                         "--out", str(tmp_path / "more"))
    assert code == 0, err
    recs = json_lines(out)
    assert recs[0]["steps"] == 6 and [r["step"] for r in recs if r["event"] == "train"] == [4, 5, 6]
    assert [r["loss"] for r in recs if r["event"] == "train"] == want[3:]
    assert apr_kernels.open(tmp_path / "more" / "model.apr").metadata["training.config"]["steps"] == 6
    for extra, needle in ((["--steps", "2"], "--steps 2 with --resume"), (["--epochs", "2"], "--epochs with --resume")):
        code, _, err = run(capsys, "train", "--resume", str(finished), *extra, "--out", str(tmp_path / "x"))
        assert code == 1 and needle in err, err


def test_freeze_keeps_the_matching_parameters_and_resumes_frozen(capsys, tmp_path):
    """--freeze 'model.embed_tokens.*' 'model.layers.0.*': those tensors leave training exactly as they
    came (the tied output head with the embedding), every other one moves, the start line counts only
    the others as trainable, and a run resumed from a step checkpoint stays frozen (the losses of the
    uninterrupted run). A pattern matching nothing, freezing everything, or --freeze with LoRA is refused."""
    from apr_kernels.model import Transformer, preset
    from apr_kernels.train.checkpoint import save_checkpoint

    torch.manual_seed(3)
    model = Transformer(preset("tiny_llama"), fast=False)
    init = tmp_path / "init.apr"
    save_checkpoint(init, model=model, tokenizer=_bytes_tokenizer())
    before = apr_kernels.load(init)
    common = ["train", "--init", str(init), "--data", str(STDLIB / "textwrap.py"), "--steps", "4", "--batch-size",
              "2", "--seq-len", "32", "--eval-tokens", "64", "--json", "--no-token-cache", "--lr", "1e-2",
              "--save-every", "2"]
    patterns = ["--freeze", "model.embed_tokens.*", "model.layers.0.*"]
    code, out, err = run(capsys, *common, *patterns, "--out", str(tmp_path / "f"))
    assert code == 0, err
    recs = json_lines(out)
    frozen = [n for n, _ in model.named_parameters() if n.startswith(("model.embed_tokens.", "model.layers.0."))]
    assert len(frozen) == 10  # the embedding, layer 0's 7 projections and 2 norms
    assert recs[0]["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n not in frozen)
    after = apr_kernels.load(tmp_path / "f" / "model.apr")
    for name, _ in model.named_parameters():
        assert torch.equal(after[name], before[name]) == (name in frozen), name
    code, out, err = run(capsys, "train", "--resume", str(tmp_path / "f" / "step_000002.apr"), "--json",
                         "--out", str(tmp_path / "r"))
    assert code == 0, err
    assert [r["loss"] for r in json_lines(out) if r["event"] == "train"] == \
        [r["loss"] for r in recs if r["event"] == "train"][2:]
    assert torch.equal(apr_kernels.load(tmp_path / "r" / "model.apr")["model.layers.0.mlp.up_proj.weight"],
                       before["model.layers.0.mlp.up_proj.weight"])
    for extra, needle in ((["--freeze", "model.nothing.*"], "--freeze 'model.nothing.*': matches no trainable"),
                          (["--freeze", "*"], "freezes every parameter"),
                          (["--freeze", "model.norm.*", "--lora-rank", "2"], "with LoRA: the adapters already train")):
        code, _, err = run(capsys, *common, *extra, "--out", str(tmp_path / "x"))
        assert code == 1 and needle in err, err


def _bytes_tokenizer():
    from apr_kernels.train.cli import byte_tokenizer

    return byte_tokenizer()


def test_dry_run_prints_the_plan_and_writes_nothing(capsys, tmp_path):
    """--dry-run: the start line of the run the same command would train (its steps from --epochs, the
    parameters, tokens per step), no training step, no checkpoint, no output folder; a post-training
    command likewise."""
    out = tmp_path / "never"
    code, stdout, err = run(capsys, "train", "--preset", "tiny_llama", "--tokenizer", "bytes", "--data",
                            str(STDLIB / "textwrap.py"), "--epochs", "2", "--batch-size", "2", "--seq-len", "32",
                            "--eval-tokens", "64", "--json", "--no-token-cache", "--dry-run", "--out", str(out))
    assert code == 0, err
    recs = json_lines(stdout)
    assert [r["event"] for r in recs] == ["start", "dry_run"]
    start = recs[0]
    assert start["steps"] == math.ceil(2 * start["train_tokens"] / 32 / 2) and start["tokens_per_step"] == 64
    assert start["lr"] == 3e-4  # (from scratch)
    assert not out.exists()
    from apr_kernels.model import Transformer, preset
    from apr_kernels.train.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "init.apr", model=Transformer(preset("tiny_llama"), fast=False),
                    tokenizer=_bytes_tokenizer())
    # the peak learning rate: 5e-5 for every weight of an --init model, 3e-4 for LoRA's adapters, or --lr
    for extra, lr in (([], 5e-5), (["--lora-rank", "4"], 3e-4), (["--lr", "1e-3"], 1e-3)):
        code, stdout, err = run(capsys, "train", "--init", str(tmp_path / "init.apr"), "--data",
                                str(STDLIB / "textwrap.py"), "--steps", "2", "--batch-size", "2", "--seq-len", "32",
                                "--eval-tokens", "64", "--json", "--no-token-cache", "--dry-run", "--out", str(out),
                                *extra)
        assert code == 0, err
        assert json_lines(stdout)[0]["lr"] == lr, extra
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": " yes", "rejected": " no"})
                                              + "\n" for i in range(8)))
    code, stdout, err = run(capsys, "dpo", "--init", str(tmp_path / "init.apr"), "--data", str(tmp_path / "p.jsonl"),
                            "--batch-size", "2", "--json", "--dry-run", "--out", str(out))
    assert code == 0, err
    assert [r["event"] for r in json_lines(stdout)] == ["start", "dry_run"] and not out.exists()


def test_tokenize_fills_the_cache_that_train_then_maps(capsys, tmp_path):
    """`tokenize` with train's data arguments writes the cache entries; train with the same arguments
    maps them (no tokenising) and its eval covers the same tokens."""
    cache = tmp_path / "cache"
    data = ["--tokenizer", "bytes", "--data", *TRAIN, "--eval-data", HELD, "--max-tokens", "20000",
            "--eval-tokens", "240", "--token-cache", str(cache)]
    code, stdout, err = run(capsys, "tokenize", *data)
    assert code == 0 and stdout.startswith("train_tokens=20000 eval_tokens=241 ")
    assert err.count("tokens saved to") == 2 and len(list(cache.glob("tokens-*.apr"))) == 2
    code, stdout, err = run(capsys, "train", "--preset", "tiny_llama", *data, "--steps", "1", "--batch-size", "2",
                            "--seq-len", "48", "--json", "--no-progress", "--out", str(tmp_path / "o"))
    assert code == 0 and "saved to" not in err and err.count("tokens from") == 2, err


# --------------------------------------------------------------------- a longer context than the init's
def _short_context_init(path):
    from apr_kernels.model import ModelConfig, Transformer
    from apr_kernels.train.checkpoint import save_checkpoint

    torch.manual_seed(4)
    cfg = ModelConfig(architecture="qwen2", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, vocab_size=263, max_position_embeddings=32, rope_theta=1e4,
                      rms_norm_eps=1e-6, attention_bias=True, tie_word_embeddings=True)
    model = Transformer(cfg, fast=False)
    with torch.no_grad():  # sharp attention, so that the positions' rotations show in the loss
        for layer in model.model.layers:
            for name, gain in (("q_proj", 40), ("k_proj", 40), ("v_proj", 20), ("o_proj", 20)):
                getattr(layer.self_attn, name).weight.mul_(gain)
    save_checkpoint(path, model=model)


def test_with_context_sets_rope_and_limit():
    from apr_kernels.model import preset

    cfg = preset("tiny_qwen2").replace(max_position_embeddings=4096)
    yarn = cfg.with_context(rope_scaling="yarn:4")
    assert yarn.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    assert yarn.max_position_embeddings == 16384 and yarn.rope_theta == cfg.rope_theta
    llama3 = cfg.with_context(rope_scaling="llama3:8", max_position_embeddings=20000)
    assert llama3.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 4096}
    assert llama3.max_position_embeddings == 20000
    assert yarn.with_context(rope_scaling="none", rope_theta=1e7).rope_scaling is None
    js = cfg.with_context(rope_scaling='{"type": "linear", "factor": 2}')
    assert js.rope_scaling == {"rope_type": "linear", "factor": 2.0} and js.max_position_embeddings == 8192
    assert cfg.with_context() is cfg
    for spec, match in [("yarn", r"--rope-scaling: 'yarn'; expected KIND:FACTOR"),
                        ("longrope:2", r"rope_scaling type 'longrope' is not supported"),
                        ("yarn:-1", r"rope_scaling\['factor'\]=-1.0; expected a positive number"),
                        ("{oops", r"is not valid JSON")]:
        with pytest.raises(ValueError, match=match):
            cfg.with_context(rope_scaling=spec, where="x.apr")
    with pytest.raises(ValueError, match=r"x.apr: --rope-theta -5.0; expected a positive number"):
        cfg.with_context(rope_theta=-5.0, where="x.apr")


def test_train_extends_the_context_and_saves_it(tmp_path, capsys):
    """An init file of 32 positions trained at --seq-len 64 with yarn:2: refused without the scaling;
    with it the checkpoint carries the scaling and the new limit, and eval (which builds the model from
    the checkpoint alone) reproduces the run's final held-out loss, which the unscaled rotations miss."""
    from apr_kernels.model.loading import from_apr
    from apr_kernels.train.cli import byte_tokenizer
    from apr_kernels.train.data import evaluate, tokenize_files

    init = tmp_path / "init.apr"
    _short_context_init(init)
    common = ["train", "--init", str(init), "--tokenizer", "bytes", "--data", *TRAIN, "--eval-data", HELD,
              "--max-tokens", "20000", "--steps", "2", "--batch-size", "2", "--seq-len", "64", "--lr", "3e-3",
              "--eval-tokens", "256", "--json", "--seed", "3", "--fast", "off"]
    code, _, err = run(capsys, *common, "--out", str(tmp_path / "refused"))
    assert code != 0 and "--seq-len 64 exceeds the model's max_position_embeddings 32" in err
    code, out, err = run(capsys, *common, "--rope-scaling", "yarn:2", "--out", str(tmp_path / "long"))
    assert code == 0, err
    final = [r for r in json_lines(out) if r["event"] == "eval"][-1]["eval_loss"]
    model = from_apr(tmp_path / "long" / "model.apr", fast=False)
    assert model.config.rope_scaling == {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}
    assert model.config.max_position_embeddings == 64
    code, stdout, _ = run(capsys, "eval", "--init", str(tmp_path / "long" / "model.apr"), "--data", HELD,
                          "--max-tokens", "256", "--seq-len", "64")
    assert code == 0
    assert float(stdout.strip().splitlines()[-1].split()[0].split("=")[1]) == pytest.approx(final, abs=2e-6)
    tokens = tokenize_files([HELD], byte_tokenizer())  # (the tokens eval scored)
    plain = model.config.replace(rope_scaling=None)
    model.config = plain
    unscaled, _ = evaluate(model, tokens, 64, max_tokens=256)
    assert abs(unscaled - final) > 1e-3  # the scaling is in the numbers, not only in the metadata
    # a new base and limit instead; and none of it on a resumed run
    code, out, err = run(capsys, *common, "--rope-theta", "5e4", "--max-position-embeddings", "64",
                         "--save-every", "1", "--out", str(tmp_path / "theta"))
    assert code == 0, err
    model = from_apr(tmp_path / "theta" / "model.apr", fast=False)
    assert model.config.rope_theta == 5e4 and model.config.max_position_embeddings == 64
    assert model.config.rope_scaling is None
    code, _, err = run(capsys, "train", "--resume", str(tmp_path / "theta" / "step_000001.apr"), "--rope-theta",
                       "1e5", "--out", str(tmp_path / "resumed"))
    assert code != 0 and "a resumed run keeps its checkpoint's" in err


def test_pretokenised_shards_train_as_their_text_does(capsys, tmp_path):
    """aprender's pre-tokenised corpus (a folder of little-endian u32 shards read in sorted order, its
    manifest.json left out; a shard may be gzip-compressed): a run on the shards of the ids the text
    pipeline makes from the same files has the same losses, whether its plain shards are read in place
    (no token-cache entry) or a gzip-compressed one sends the folder through the token cache. An id
    outside the vocabulary and a torn shard are errors naming the file."""
    import gzip

    from apr_kernels.train.cli import byte_tokenizer
    from apr_kernels.train.data import find_text_files, tokenize_files

    tok = byte_tokenizer()
    stream = tokenize_files(find_text_files(TRAIN), tok, max_tokens=6000).numpy()
    held = tokenize_files([Path(HELD)], tok, max_tokens=65).numpy()
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    stream[4000:].astype("<u4").tofile(corpus / "shard-0002.bin")  # (sorted: read last)
    stream[:1500].astype("<u4").tofile(corpus / "shard-0000.bin")
    (corpus / "shard-0001.bin.gz").write_bytes(gzip.compress(stream[1500:4000].astype("<u4").tobytes()))
    (corpus / "manifest.json").write_text(json.dumps({"shards": 3, "tokens": int(stream.size)}))
    plain = tmp_path / "plain"  # the same corpus, every shard uncompressed: read in place
    plain.mkdir()
    for name, part in (("a.bin", stream[:1000]), ("b.bin", stream[1000:1001]), ("c.bin", stream[1001:])):
        part.astype("<u4").tofile(plain / name)
    (plain / "manifest.json").write_text("{}")
    held.astype("<u4").tofile(tmp_path / "held.bin")
    common = ["train", "--preset", "tiny_llama", "--tokenizer", "bytes", "--steps", "2", "--batch-size", "2",
              "--seq-len", "32", "--eval-tokens", "64", "--json", "--no-progress"]
    code, text_out, err = run(capsys, *common, "--data", *TRAIN, "--max-tokens", "6000", "--eval-data", HELD,
                              "--no-token-cache", "--out", str(tmp_path / "text"))
    assert code == 0, err
    runs = {}
    for folder in (plain, corpus):
        code, out, err = run(capsys, *common, "--data", str(folder), "--eval-data", str(tmp_path / "held.bin"),
                             "--token-cache", str(tmp_path / "cache"), "--out", str(tmp_path / f"run_{folder.name}"))
        assert code == 0, err
        runs[folder.name] = json_lines(out)
        if folder is plain:
            assert f"{stream.size} tokens of 3 pre-tokenised shard(s) read in place" in err
            assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("tokens-*.apr"))
    assert len(list((tmp_path / "cache").glob("tokens-*.apr"))) == 1  # (the compressed corpus's)

    def losses(recs):
        return [(r["event"], r["step"], r.get("loss", r.get("eval_loss"))) for r in recs
                if r["event"] in ("train", "eval")]

    assert len(losses(json_lines(text_out))) >= 3
    assert losses(runs["plain"]) == losses(json_lines(text_out))
    assert losses(runs["corpus"]) == losses(json_lines(text_out))
    # eval reads the shards in place too (all 187 sequences of 32 unless told): the text's numbers
    final = str(next((tmp_path / "run_plain").glob("*.apr")))
    evals = [run(capsys, "eval", "--init", final, "--seq-len", "32", "--data", *data)
             for data in ([str(plain)], [*TRAIN, "--max-tokens", str(187 * 32)])]
    assert evals[0][0] == 0 and evals[0][1].splitlines()[-2:] == evals[1][1].splitlines()[-2:], evals
    assert "tokens=5984" in evals[0][1]

    bad = tmp_path / "bad"
    bad.mkdir()
    ids = stream[:400].astype("<u4")
    ids[123] = tok.vocab_size + 5
    ids.tofile(bad / "a.bin")
    code, _, err = run(capsys, *common, "--data", str(bad), "--no-token-cache", "--out", str(tmp_path / "r1"))
    assert code != 0
    assert (f"{bad / 'a.bin'}: token 123 is id {tok.vocab_size + 5}, not below the tokenizer's vocabulary size "
            f"{tok.vocab_size}") in err
    (bad / "a.bin").write_bytes(stream[:400].astype("<u4").tobytes() + b"\x01\x02")
    code, _, err = run(capsys, *common, "--data", str(bad), "--no-token-cache", "--out", str(tmp_path / "r2"))
    assert code != 0
    assert f"{bad / 'a.bin'}: 1602 bytes is no whole number of token ids" in err


def test_tokenize_shards_writes_aprenders_corpus_that_train_reads(capsys, tmp_path):
    """tokenize --shards DIR: the --data stream as aprender's corpus (u32 shards of --shard-tokens ids
    in order, a manifest), which reads back as the same stream; an existing folder and supervised
    records are refused, leaving nothing behind."""
    import numpy as np

    from apr_kernels.train.cli import byte_tokenizer
    from apr_kernels.train.data import find_text_files, tokenize_files

    tok = byte_tokenizer()
    want = tokenize_files(find_text_files(TRAIN), tok, max_tokens=6000)
    out = tmp_path / "corpus"
    argv = ["tokenize", "--tokenizer", "bytes", "--data", *TRAIN, "--max-tokens", "6000", "--shards", str(out),
            "--shard-tokens", "2500"]
    code, stdout, err = run(capsys, *argv)
    assert code == 0, err
    assert stdout.startswith("tokens=6000 shards=3 ")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["manifest.json", "shard-00000.bin", "shard-00001.bin", "shard-00002.bin"]
    (tmp_path / "ref").mkdir()  # the folder's mode is what mkdir gives (mkdtemp's is 0700)
    assert out.stat().st_mode & 0o777 == (tmp_path / "ref").stat().st_mode & 0o777
    (tmp_path / "ref").rmdir()
    sizes = [np.fromfile(out / n, dtype="<u4").size for n in names[1:]]
    assert sizes == [2500, 2500, 1000]
    got = np.concatenate([np.fromfile(out / n, dtype="<u4") for n in names[1:]])
    assert np.array_equal(got, want.numpy())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokens"] == 6000 and manifest["vocab_size"] == tok.vocab_size
    assert [s["tokens"] for s in manifest["shards"]] == sizes
    assert torch.equal(tokenize_files(find_text_files([out]), tok), want)  # (the manifest left out)
    code, _, err = run(capsys, *argv)
    assert code != 0 and f"{out}: already exists" in err
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"prompt": "Q?", "completion": " A."}) + "\n")
    code, _, err = run(capsys, "tokenize", "--tokenizer", "bytes", "--data", str(chat), "--shards",
                       str(tmp_path / "sft"))
    assert code != 0 and "supervised records" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.jsonl", "corpus"]


def test_async_checkpoints_are_the_synchronous_files_written_while_training_goes_on(capsys, tmp_path, monkeypatch):
    """--async-checkpoint: each periodic checkpoint is snapshotted at its step and written by a thread
    while the next steps run (the write of step 1 is held until step 2 has trained, which a
    synchronous save could never see), and every file equals the synchronous run's, tensor for tensor
    and key for key. A failed background write fails the run, naming the file."""
    import threading

    import apr_kernels
    from apr_kernels.train import loop

    argv = ["train", "--preset", "tiny_llama", "--tokenizer", "bytes", "--data", *TRAIN, "--max-tokens", "4000",
            "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "64", "--save-every", "1",
            "--no-token-cache", "--json", "--no-progress", "--seed", "3"]
    code, _, err = run(capsys, *argv, "--out", str(tmp_path / "sync"))
    assert code == 0, err

    trained, save, seen = threading.Event(), apr_kernels.save, []
    step = loop.Trainer.train_step

    def train_step(self):
        rec = step(self)
        if rec["step"] == 2:
            trained.set()
        return rec

    def held_save(tensors, path, **kw):
        if Path(path).name == "step_000001.apr":
            seen.append(trained.wait(timeout=60))  # (a synchronous save would wait here for nothing)
        return save(tensors, path, **kw)

    monkeypatch.setattr(loop.Trainer, "train_step", train_step)
    monkeypatch.setattr(apr_kernels, "save", held_save)
    code, out, err = run(capsys, *argv, "--async-checkpoint", "--out", str(tmp_path / "async"))
    assert code == 0, err
    assert seen == [True]
    marks = [r.get("background") for r in json_lines(out) if r["event"] == "checkpoint"]
    assert marks == [True, True, None]  # (the final model.apr is written before the run ends)
    for name in ("step_000001.apr", "step_000002.apr", "model.apr"):
        with apr_kernels.open(tmp_path / "sync" / name) as a, apr_kernels.open(tmp_path / "async" / name) as b:
            assert a.metadata == b.metadata and sorted(a.keys()) == sorted(b.keys()), name
            for key in a.keys():
                assert torch.equal(a.get_tensor(key), b.get_tensor(key)), (name, key)

    def failing_save(tensors, path, **kw):
        if Path(path).name == "step_000001.apr":
            raise OSError(28, "No space left on device")
        return save(tensors, path, **kw)

    monkeypatch.setattr(apr_kernels, "save", failing_save)
    code, _, err = run(capsys, *argv, "--async-checkpoint", "--out", str(tmp_path / "full"))
    assert code != 0
    assert (f"{tmp_path / 'full' / 'step_000001.apr'}: the background checkpoint write failed: OSError: "
            f"[Errno 28] No space left on device") in err
    assert not (tmp_path / "full" / "step_000002.apr").exists()


def _neg(name):
    return lambda meta, tensors: tensors.__setitem__(name, -tensors[name].abs() - 1)


# damage to a resumable checkpoint's training state -> what the error says (besides the file's name)
RESUME_DAMAGE = {
    "step_missing": (lambda meta, tensors: meta.pop("training.step"), r"metadata training\.step is missing"),
    "adam_steps": (lambda meta, tensors: meta.__setitem__("training.adam_steps", None),
                   r"metadata training\.adam_steps=None; expected an object of parameter name: integer >= 0"),
    "config_type": (lambda meta, tensors: meta["training.config"].__setitem__("steps", "x"),
                    r"metadata training\.config: training config: steps='x'; expected int"),
    "data_spec_missing": (lambda meta, tensors: meta.pop("training.data_spec"),
                          r"metadata training\.data_spec is missing"),
    "data_spec_paths": (lambda meta, tensors: meta["training.data_spec"].__setitem__("data", "x"),
                        r"metadata training\.data_spec=.*expected an object with data \(a list of paths\)"),
    "eval_pair": (lambda meta, tensors: meta.pop("training.eval_tokens"),
                  r"training\.eval_loss and training\.eval_tokens; expected both or neither"),
    "negative_second_moment": (_neg("__training__.adam.exp_avg_sq.model.norm.weight"),
                               r"optimizer tensor '__training__\.adam\.exp_avg_sq\.model\.norm\.weight' .*negative"),
    "config_list": (lambda meta, tensors: meta["training.config"].__setitem__("eval_choices", [1.5]),
                    r"training config: eval_choices=\[1\.5\]; expected list \| None"),
    "rng": (lambda meta, tensors: tensors.__setitem__("__training__.rng.torch_cpu", torch.ones(3)),
            r"tensor __training__\.rng\.torch_cpu/cuda is not a random generator state"),
}


@pytest.mark.parametrize("case", sorted(RESUME_DAMAGE))
def test_a_damaged_training_state_is_refused_by_name_at_resume(first_run, tmp_path, capsys, case):
    """A resumable checkpoint is a file like any other: a missing or mistyped training.* value or a
    broken optimizer / RNG tensor is one error naming the file and what was expected (these were
    KeyError, TypeError and AttributeError tracebacks, or NaN losses from a negative second moment;
    by hand, 2,100 randomly damaged checkpoints of AdamW, 8-bit AdamW and Muon runs each resumed or
    were refused naming the file, but for a few values that fail later naming the field)."""
    import apr_kernels

    out, _ = first_run
    with apr_kernels.open(out / "step_000002.apr") as f:
        meta, tensors = dict(f.metadata), {n: f.get_tensor(n).clone() for n in f.keys()}
    meta = json.loads(json.dumps(meta))  # (a deep copy to damage)
    damage, want = RESUME_DAMAGE[case]
    damage(meta, tensors)
    bad = tmp_path / "damaged.apr"
    apr_kernels.save(tensors, bad, metadata=meta)
    code, _, err = run(capsys, "train", "--resume", str(bad), "--no-progress", "--out", str(tmp_path / "out"))
    assert code == 1, err
    assert re.search(rf"error: {re.escape(str(bad))}: .*{want}", err), err


@pytest.mark.parametrize("config, want", [([1], r"training\.config=\[1\]; expected an object"),
                                          ({"seq_len": "x"}, r"training config: seq_len='x'; expected int")])
def test_eval_names_a_damaged_stored_config(first_run, tmp_path, capsys, config, want):
    """``eval`` reads the run's sequence length and precision from the model's stored training.config:
    a damaged one is an error naming the file (was an AttributeError or a bare int() error)."""
    import apr_kernels

    out, _ = first_run
    with apr_kernels.open(out / "model.apr") as f:
        meta, tensors = dict(f.metadata), {n: f.get_tensor(n).clone() for n in f.keys()}
    meta["training.config"] = config
    bad = tmp_path / "damaged.apr"
    apr_kernels.save(tensors, bad, metadata=meta)
    code, _, err = run(capsys, "eval", "--init", str(bad), "--data", HELD, "--max-tokens", "240")
    assert code == 1 and re.search(rf"error: {re.escape(str(bad))}: .*{want}", err), err
