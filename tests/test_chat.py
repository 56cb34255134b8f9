"""Supervised records (train/chat.py): ChatML and Llama 3 rendering, which tokens are loss targets,
the marked int32 stream, and training and evaluation counting only targets."""

import json
import math
import os
import re

import pytest
import torch

from apr_kernels.tokenizer import Tokenizer, byte_to_unicode
from apr_kernels.train import chat
from apr_kernels.train.data import batch, sequences, split_targets, tokenize_files

CONVO = {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4."},
                      {"role": "user", "content": "And 3+3? ünïcode"},
                      {"role": "assistant", "content": "6, I think."}]}


@pytest.fixture(scope="module")
def qwen():
    return Tokenizer.qwen2()


def llama3_tokenizer():
    """Byte-level vocabulary plus the Llama 3 special tokens (ids 256..)."""
    vocab = [byte_to_unicode()[b] for b in range(256)] + list(chat.LLAMA3) + ["<|end_of_text|>"]
    return Tokenizer.from_metadata({"tokenizer.vocabulary": vocab, "tokenizer.merges": [],
                                    "tokenizer.eos_token_id": 260})


def _targets_text(tok, ids, targets):
    return tok.decode([i for i, t in zip(ids, targets) if t])


def test_chatml_rendering_and_targets(qwen):
    text, spans, eos_target = chat.render(CONVO, qwen, "mem:1")
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n4.<|im_end|>\n<|im_start|>user\nAnd 3+3? ünïcode<|im_end|>\n"
                    "<|im_start|>assistant\n6, I think.<|im_end|>\n")
    assert not eos_target
    ids, targets = chat.encode_with_targets(qwen, text, spans)
    assert ids == qwen.encode(text)  # as apply_chat_template + tokenize: template tokens are special
    assert ids.count(151_644) == 5 and ids.count(151_645) == 5
    # targets: each answer and the <|im_end|> closing it, nothing of the prompts or the headers
    assert _targets_text(qwen, ids, targets) == "4.<|im_end|>6, I think.<|im_end|>"


def test_llama3_rendering_and_targets():
    tok = llama3_tokenizer()
    assert chat.chat_format(tok) == "llama3"
    text, spans, _ = chat.render({"messages": CONVO["messages"][1:3]}, tok, "mem:1")
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>")
    ids, targets = chat.encode_with_targets(tok, text, spans)
    assert ids[0] == 256 and _targets_text(tok, ids, targets) == "4.<|eot_id|>"


def test_prompt_completion_targets_the_completion_and_the_stop(qwen, tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"prompt": "Q: capital of France?\nA:", "completion": " Paris"})
                                      + "\n" + json.dumps({"text": "plain text"}) + "\n")
    stream = tokenize_files([tmp_path / "a.jsonl"], qwen).tolist()
    prompt_ids = qwen.encode("Q: capital of France?\nA:", special=False)
    plain = qwen.encode("plain text", special=False) + [qwen.eos_id]
    marked = [-1 - i for i in prompt_ids]
    assert stream[:len(marked)] == marked  # prompt tokens stored as -1 - id
    answer = stream[len(marked):len(stream) - len(plain)]
    assert answer and all(i >= 0 for i in answer) and answer[-1] == qwen.eos_id  # the stop is a target
    assert qwen.decode(answer[:-1]) == " Paris"
    assert stream[len(stream) - len(plain):] == plain  # plain text: every token a target


def test_stream_rows_split_into_ids_and_ignored_targets(qwen, tmp_path):
    (tmp_path / "c.jsonl").write_text(json.dumps(CONVO) + "\n" + json.dumps(CONVO) + "\n")
    stream = tokenize_files([tmp_path / "c.jsonl"], qwen)
    ids = torch.where(stream < 0, -1 - stream, stream)
    text = qwen.decode(ids.tolist())
    assert text.count("<|im_start|>assistant\n") == 4 and text.count("<|endoftext|>") == 2
    seqs = sequences(stream, 16)
    x, y, _ = batch(seqs, torch.arange(len(seqs)))
    assert x.dtype == y.dtype == torch.int64 and (x >= 0).all()
    # every target kept is an answer token (or its closing <|im_end|>), every other one -100
    kept = y[y != -100].tolist()
    answers = qwen.encode("4.<|im_end|>6, I think.<|im_end|>")
    assert kept == (answers * 2)[:len(kept)] and len(kept) >= len(answers)
    # split_targets on a text-only row is the plain shift
    plain = torch.tensor([[5, 6, 7, 8]])
    xs, ys = split_targets(plain)
    assert xs.tolist() == [[5, 6, 7]] and ys.tolist() == [[6, 7, 8]]


def test_training_counts_only_answer_tokens(qwen, tmp_path):
    from apr_kernels.model import Transformer, pad_vocab, preset
    from apr_kernels.train.data import evaluate

    (tmp_path / "c.jsonl").write_text("".join(json.dumps(CONVO) + "\n" for _ in range(6)))
    stream = tokenize_files([tmp_path / "c.jsonl"], qwen)
    cfg = preset("tiny_qwen2").replace(vocab_size=pad_vocab(qwen.vocab_size))
    torch.manual_seed(0)
    model = Transformer(cfg, fast=False)
    loss, count = evaluate(model, stream, 32, batch_size=4)
    seqs = sequences(stream, 32)
    assert count == int((seqs[:, 1:] >= 0).sum())  # the marked stream's targets, not all tokens
    assert count < seqs[:, 1:].numel()
    # the same number by hand: cross entropy of the answer positions only
    x, y, _ = batch(seqs, torch.arange(len(seqs)))
    with torch.no_grad():
        logits = model(x)
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    assert loss == pytest.approx(want.item(), rel=1e-5) and math.isfinite(loss)


@pytest.mark.parametrize("record,match", [
    ({"messages": []}, r"mem:3: 'messages' must be a non-empty list"),
    ({"messages": [{"role": "bot", "content": "x"}]}, r"mem:3: messages\[0\] must be \{'role': one of system, "
                                                       r"user, assistant, 'content': str\}"),
    ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\] must be"),
    ({"prompt": "x"}, r"mem:3: a prompt/completion record needs string fields 'prompt' and 'completion'; "
                      r"got fields \['prompt'\]"),
])
def test_malformed_records_name_the_line(qwen, record, match):
    with pytest.raises(ValueError, match=match):
        chat.render(record, qwen, "mem:3")


def test_chat_records_need_a_chat_tokenizer(tmp_path):
    from apr_kernels.train.cli import byte_tokenizer

    (tmp_path / "c.jsonl").write_text(json.dumps(CONVO) + "\n")
    with pytest.raises(ValueError, match=r"c\.jsonl:1: chat records need a chat template .* or a tokenizer with "
                                         r"ChatML \(<\|im_start\|>, <\|im_end\|>\), Llama 3 .* or Llama 2"):
        tokenize_files([tmp_path / "c.jsonl"], byte_tokenizer())


def test_evaluation_without_any_target_is_nan_for_the_trainer_and_an_error_for_eval(qwen, tmp_path, capsys):
    from apr_kernels.model import Transformer, pad_vocab, preset
    from apr_kernels.train.checkpoint import save_checkpoint
    from apr_kernels.train.cli import main
    from apr_kernels.train.data import evaluate

    long_prompt = {"prompt": "word " * 200, "completion": " end"}
    (tmp_path / "p.jsonl").write_text(json.dumps(long_prompt) + "\n")
    stream = tokenize_files([tmp_path / "p.jsonl"], qwen)
    model = Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(qwen.vocab_size)), fast=False)
    loss, count = evaluate(model, stream, 32, max_tokens=64)  # the first 2 rows: prompt only
    assert count == 0 and math.isnan(loss)
    save_checkpoint(tmp_path / "m.apr", model=model, tokenizer=qwen)
    code = main(["eval", "--init", str(tmp_path / "m.apr"), "--data", str(tmp_path / "p.jsonl"), "--seq-len", "32",
                 "--max-tokens", "64"])
    assert code == 1 and "no loss targets in the evaluated tokens" in capsys.readouterr().err


def test_parquet_rows_are_documents_like_json_lines(qwen, tmp_path):
    """Parquet (Hugging Face datasets' format): a text column, a messages column, prompt/completion
    columns; each gives the stream of the same records as JSON Lines. Bad files name file and row."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = ["first document", None, "", "third é"]
    pq.write_table(pa.table({"text": texts, "id": [1, 2, 3, 4]}), tmp_path / "t.parquet", row_group_size=2)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts if t))
    assert torch.equal(tokenize_files([tmp_path / "t.parquet"], qwen), tokenize_files([tmp_path / "t.jsonl"], qwen))
    convos = [CONVO, {"messages": CONVO["messages"][1:3]}]
    pq.write_table(pa.table({"messages": [c["messages"] for c in convos]}), tmp_path / "c.parquet")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(c) + "\n" for c in convos))
    got = tokenize_files([tmp_path / "c.parquet"], qwen)
    assert (got < 0).any() and torch.equal(got, tokenize_files([tmp_path / "c.jsonl"], qwen))
    pc = [{"prompt": "Q?", "completion": " A."}]
    pq.write_table(pa.table({"prompt": ["Q?"], "completion": [" A."]}), tmp_path / "p.parquet")
    (tmp_path / "p.jsonl").write_text(json.dumps(pc[0]) + "\n")
    assert torch.equal(tokenize_files([tmp_path / "p.parquet"], qwen), tokenize_files([tmp_path / "p.jsonl"], qwen))
    # a folder walk collects Parquet files too
    from apr_kernels.train.data import find_text_files

    assert (tmp_path / "t.parquet") in find_text_files([tmp_path])
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "b.parquet")
    with pytest.raises(ValueError, match=r"b.parquet: expected a column 'text' \(--text-field\), 'messages' \(or "
                                         r"ShareGPT's 'conversations'\), 'prompt' and 'completion', or Alpaca's "
                                         r"'instruction' and 'output'; got columns \['body'\]"):
        tokenize_files([tmp_path / "b.parquet"], qwen)
    assert tokenize_files([tmp_path / "b.parquet"], qwen, text_field="body").tolist() == \
        qwen.encode("x") + [qwen.eos_id]
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    with pytest.raises(ValueError, match=r"n.parquet:row 1: column 'text' holds int; expected strings"):
        tokenize_files([tmp_path / "n.parquet"], qwen)
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"bad.parquet: not a readable Parquet file"):
        tokenize_files([tmp_path / "bad.parquet"], qwen)



def _damaged(data: bytes, rng) -> bytes:
    """``data`` with one random damage: bytes changed, cut short, a run zeroed, a 4/8-byte integer set to
    an edge value, or 16 bytes copied from elsewhere."""
    b, kind = bytearray(data), rng.randrange(5)
    if kind == 0:
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == 1:
        b = b[:rng.randrange(len(b))]
    elif kind == 2:
        i = rng.randrange(len(b))
        b[i:i + rng.randint(1, 64)] = bytes(rng.randint(1, 64))
    elif kind == 3:
        i, n = rng.randrange(len(b) - 8), rng.choice([4, 8])
        b[i:i + n] = rng.choice([0, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1, 1 << 30]).to_bytes(8, "little")[:n]
    else:
        i, j = rng.randrange(len(b)), rng.randrange(len(b))
        b[i:i + 16] = b[j:j + 16]
    return bytes(b)


def test_damaged_parquet_and_arrow_files_are_refused_by_name(tmp_path):
    """Training data files are input too. Randomly damaged Parquet files and Arrow stream shards (text
    and messages columns, several row groups / record batches) each read or fail with a ValueError
    naming the file: pyarrow's own errors (OSError, SystemError, ...) were raised as they came, and a
    damaged Arrow shard's offsets crashed the process (SIGSEGV, SIGBUS: 19 of 19 batches of 200 damaged
    files, by hand) until each batch was validated in full before its rows were read."""
    import random

    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [("doc %d " % i) * (1 + i % 7) for i in range(40)]
    convo = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    tables = {"t": pa.table({"text": texts, "id": list(range(40))}), "m": pa.table({"messages": [convo] * 12})}
    bases = {}
    for name, table in tables.items():
        pq.write_table(table, tmp_path / f"{name}.parquet", row_group_size=5)
        with pa.ipc.new_stream(str(tmp_path / f"{name}.arrow"), table.schema) as w:
            for b in table.to_batches(max_chunksize=5):
                w.write_batch(b)
        for suffix in (".parquet", ".arrow"):
            bases[name + suffix] = (tmp_path / f"{name}{suffix}").read_bytes()
    tok, rng, outcomes = llama3_tokenizer(), random.Random(torch.initial_seed()), []
    for name, data in bases.items():  # (the undamaged files read)
        assert tokenize_files([tmp_path / name], tok).numel() > 0, name
    for i in range(240):
        name = sorted(bases)[i % 4]
        path = tmp_path / f"d{i}" / name
        path.parent.mkdir()
        path.write_bytes(_damaged(bases[name], rng))
        try:
            tokenize_files([path], tok)
            outcomes.append("read")
        except ValueError as exc:
            assert str(exc).startswith(str(path)), f"{name}, damaged: {exc}"
            outcomes.append("refused" if "is not readable" not in str(exc) else "refused while reading")
    # (most damage is found at the header; some only when a row group or record batch is read)
    assert {"read", "refused", "refused while reading"} <= set(outcomes), sorted(set(outcomes))


ALPACA = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
          {"instruction": "Say hi.", "input": "", "output": "Hi!", "system": "Be kind.",
           "history": [["Who are you?", "A model."]]}]
ALPACA_AS_MESSAGES = [
    {"messages": [{"role": "user", "content": "Add the numbers.\n2 and 3"}, {"role": "assistant", "content": "5"}]},
    {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Who are you?"},
                  {"role": "assistant", "content": "A model."}, {"role": "user", "content": "Say hi."},
                  {"role": "assistant", "content": "Hi!"}]}]


def test_alpaca_records_and_json_arrays_read_as_conversations(qwen, tmp_path):
    """Alpaca's records (instruction, input, output; optional system and history), as LLaMA-Factory reads
    them, train as the conversations they stand for, from JSON Lines, from a .json array (the form
    alpaca_data.json ships in) and from Parquet columns; a .json array of text records is read like
    JSON Lines, any other .json file stays one text document."""
    assert [chat.normalised(r) for r in ALPACA] == ALPACA_AS_MESSAGES
    (tmp_path / "want.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ALPACA_AS_MESSAGES))
    want = tokenize_files([tmp_path / "want.jsonl"], qwen)
    assert (want < 0).any()  # (prompts are no targets)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ALPACA))
    (tmp_path / "alpaca_data.json").write_text(json.dumps(ALPACA, indent=4))
    for name in ("a.jsonl", "alpaca_data.json"):
        assert torch.equal(tokenize_files([tmp_path / name], qwen), want), name
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({k: [r.get(k) for r in ALPACA] for k in ("instruction", "input", "output", "system",
                                                                     "history")}), tmp_path / "a.parquet")
    assert torch.equal(tokenize_files([tmp_path / "a.parquet"], qwen), want)
    # a .json array of {"text"} records: one document each, as JSON Lines
    (tmp_path / "t.json").write_text(json.dumps([{"text": "one"}, {"text": "two"}]))
    assert tokenize_files([tmp_path / "t.json"], qwen).tolist() == \
        qwen.encode("one") + [qwen.eos_id] + qwen.encode("two") + [qwen.eos_id]
    # other JSON is text: a config object, an array of numbers, an array of objects that are no records
    for other in ({"text": "a config"}, [1, 2, 3], [{"name": "x", "size": 3}]):
        (tmp_path / "o.json").write_text(json.dumps(other))
        assert tokenize_files([tmp_path / "o.json"], qwen).tolist() == qwen.encode(json.dumps(other)) + [qwen.eos_id]
    # a bad Alpaca record names the file and the element
    (tmp_path / "bad.json").write_text(json.dumps([ALPACA[0], {"instruction": "x", "output": 5}]))
    with pytest.raises(ValueError, match=r"bad.json\[1\]: an Alpaca record's instruction, input and output must be "
                                         r"strings; got \['str', 'str', 'int'\]"):
        tokenize_files([tmp_path / "bad.json"], qwen)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"instruction": "x", "output": "y", "history": ["z"]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: an Alpaca record's history must be a list of \[user, "
                                         r"assistant\] string pairs; got 'z'"):
        tokenize_files([tmp_path / "bad.jsonl"], qwen)


def test_a_datasets_save_to_disk_folder_reads_its_arrow_shards(qwen, tmp_path):
    """A folder as `datasets`' save_to_disk writes it (Arrow IPC stream shards, data-0000k-of-0000n.arrow,
    beside dataset_info.json and state.json): the shards' rows are the documents, as the same records
    in JSON Lines, and the two metadata files are not; the columns are read as Parquet's are."""
    pa = pytest.importorskip("pyarrow")
    from apr_kernels.train.data import find_text_files

    def save(folder, table, shards=2):
        folder.mkdir()
        n = table.num_rows
        for k in range(shards):  # (datasets writes each shard with RecordBatchStreamWriter)
            part = table.slice(k * n // shards, (k + 1) * n // shards - k * n // shards)
            with pa.ipc.new_stream(str(folder / f"data-{k:05d}-of-{shards:05d}.arrow"), part.schema) as w:
                for batch in part.to_batches(max_chunksize=1):
                    w.write_batch(batch)
        (folder / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))
        (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00002.arrow"}]}))

    texts = ["first document", "second", "", "fourth é"]
    save(tmp_path / "t", pa.table({"text": texts, "id": [1, 2, 3, 4]}))
    assert [p.name for p in find_text_files([tmp_path / "t"])] == ["data-00000-of-00002.arrow",
                                                                   "data-00001-of-00002.arrow"]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts if t))
    assert torch.equal(tokenize_files(find_text_files([tmp_path / "t"]), qwen),
                       tokenize_files([tmp_path / "t.jsonl"], qwen))
    save(tmp_path / "a", pa.table({k: [r.get(k) for r in ALPACA] for k in ("instruction", "input", "output")}),
         shards=1)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({k: r[k] for k in ("instruction", "input", "output")})
                                              + "\n" for r in ALPACA))
    assert torch.equal(tokenize_files(find_text_files([tmp_path / "a"]), qwen),
                       tokenize_files([tmp_path / "a.jsonl"], qwen))
    (tmp_path / "bad.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(ValueError, match=r"bad.arrow: not a readable Arrow stream file"):
        tokenize_files([tmp_path / "bad.arrow"], qwen)


def test_generation_prompt_opens_the_assistant_turn(qwen):
    text, close = chat.generation_prompt(CONVO["messages"][:2], qwen)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert close == 151_645
    tok = llama3_tokenizer()
    text, close = chat.generation_prompt(CONVO["messages"][1:2], tok)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n") and close == tok.special_tokens["<|eot_id|>"]


def test_generate_chat_from_the_command_line(qwen, tmp_path, capsys):
    from apr_kernels.model import Transformer, pad_vocab, preset
    from apr_kernels.train.checkpoint import save_checkpoint
    from apr_kernels.train.cli import main

    torch.manual_seed(0)
    model = Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(qwen.vocab_size)), fast=False)
    save_checkpoint(tmp_path / "m.apr", model=model, tokenizer=qwen)
    code = main(["generate", "--init", str(tmp_path / "m.apr"), "--chat", "--system", "Be brief.", "--prompt",
                 "2+2?", "--max-new-tokens", "8", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    rec = json.loads(out.strip().splitlines()[-1])
    assert rec["prompt"] == "2+2?" and rec["tokens"] <= 8 and "<|im_end|>" not in rec["completion"]


def test_arbitrary_json_lines_load_or_raise_value_error(qwen, tmp_path):
    """Data files are untrusted: any JSON value on any line either tokenises or raises ValueError
    naming the file and line; never another exception. (APR_FUZZ_EXAMPLES=N for a longer run: 1500
    examples passed when this was written.)"""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                        st.text(max_size=20))
    values = st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["text", "messages", "prompt", "completion", "role", "content", "x"]),
                        inner, max_size=4)), max_leaves=12)
    roles = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "bot", 3]),
                                   "content": st.one_of(st.text(max_size=15), st.integers())})
    records = st.one_of(values, st.fixed_dictionaries({"messages": st.lists(roles, max_size=3)}))
    path = tmp_path / "d.jsonl"

    @hypothesis.settings(max_examples=int(os.environ.get("APR_FUZZ_EXAMPLES", "60")), deadline=None)
    @hypothesis.given(st.lists(records, min_size=1, max_size=4))
    def check(lines):
        path.write_text("".join(json.dumps(v) + "\n" for v in lines))
        try:
            out = tokenize_files([path], qwen)
        except ValueError as exc:
            assert str(exc).startswith(f"{path}:"), str(exc)
            return
        assert out.dtype == torch.int32

    check()


# A Qwen2.5-style template (default system prompt when the conversation has none), as converters keep
# it in `tokenizer.chat_template`.
TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_the_token_cache_tells_chat_templates_apart(qwen, tmp_path):
    """One vocabulary, two chat templates (a base model's and its instruct model's default system
    prompts differ): the same chat records give two cache entries and two streams, each the stream
    tokenising with that template gives, not the other's."""
    import copy

    from apr_kernels.train.data import cached_tokens

    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": CONVO["messages"][1:3]}) + "\n")
    other = TEMPLATE.replace("You are a helpful assistant.", "You are Qwen.")
    toks = []
    for template in (TEMPLATE, other):
        tok = copy.copy(qwen)
        tok.extra = dict(qwen.extra, **{"tokenizer.chat_template": template})
        toks.append(tok)
    cache = tmp_path / "cache"
    got = [cached_tokens([tmp_path / "c.jsonl"], t, cache_dir=cache).clone() for t in toks]
    assert len(list(cache.glob("tokens-*.apr"))) == 2 and not torch.equal(got[0], got[1])
    for t, stream in zip(toks, got):
        assert torch.equal(stream, tokenize_files([tmp_path / "c.jsonl"], t))


def test_the_models_own_chat_template_renders_as_transformers_does(qwen):
    """With tokenizer.chat_template present, records are rendered by it: the same text and ids as
    transformers' apply_chat_template on the same template (default system prompt included), the
    assistant answers and their <|im_end|> the only targets; generation prompts too."""
    import copy

    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as HFTokenizer

    from apr_kernels.convert.hf_tokenizer import hf_tokenizer_files

    tok = copy.copy(qwen)
    tok.extra = dict(qwen.extra, **{"tokenizer.chat_template": TEMPLATE})
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=HFTokenizer.from_str(json.dumps(hf_tokenizer_files(tok)[0])))
    hf.chat_template = TEMPLATE
    convo = CONVO["messages"][1:]  # no system message: the template adds its default one
    text, spans, eos_target = chat.render({"messages": convo}, tok, "mem:1")
    assert text == hf.apply_chat_template(convo, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n") and not eos_target
    ids, targets = chat.encode_with_targets(tok, text, spans)
    want_ids = hf.apply_chat_template(convo, tokenize=True)
    if hasattr(want_ids, "keys"):  # newer transformers return a BatchEncoding
        want_ids = want_ids["input_ids"]
    assert ids == list(want_ids)
    assert _targets_text(tok, ids, targets) == "4.<|im_end|>6, I think.<|im_end|>"
    prompt, close = chat.generation_prompt(convo[:1], tok)
    assert prompt == hf.apply_chat_template(convo[:1], tokenize=False, add_generation_prompt=True)
    assert close == 151_645
    # a template that hides an answer cannot mark targets: a clear error
    tok.extra = {"tokenizer.chat_template": "{% for m in messages %}{{ m['role'] }}{% endfor %}"}
    with pytest.raises(ValueError, match=r"mem:1: the chat template does not show messages\[1\] \(assistant\) "
                                         r"verbatim"):
        chat.render({"messages": convo}, tok, "mem:1")
    tok.extra = {"tokenizer.chat_template": "{{ raise_exception('no system role here') }}"}
    with pytest.raises(ValueError, match=r"mem:1: the model's chat template failed on this record "
                                         r"\(no system role here\)"):
        chat.render({"messages": convo}, tok, "mem:1")


# hostile chat templates (a template comes inside a model file): what each must fail with, under the
# limits test_hostile_chat_templates sets (1,000,000 items, 100,000 steps)
HOSTILE_TEMPLATES = {
    "division": ("{{ 1 / 0 }}", "ZeroDivisionError"),
    "syntax": ("{% for %}", "Expected an expression"),
    "recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError|steps"),
    "internals": ("{{ (1).__class__.__mro__ }}", "unsafe"),
    "repeat": ("{{ 'a' * 10 ** 9 }}", "at most 1,000,000"),
    "repeat_list": ("{{ [[1, 2]] * 10 ** 6 }}", "at most 1,000,000"),
    "power": ("{{ 7 ** 1000000 }}", "bits of an integer; a chat template may make at most 65,536"),
    "squaring": ("{% set ns = namespace(n=3) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}{% endfor %}",
                 "bits of an integer"),
    "doubling_concat": ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}", "at most 1,000,000"),
    "doubling_plus": ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                      "{% endfor %}", "at most 1,000,000"),
    "center": ("{{ 'a'|center(10 ** 10) }}", "at most 1,000,000"),
    "ljust": ("{{ 'a'.ljust(10 ** 10) }}", "at most 1,000,000"),
    "printf": ("{{ '%9999999999d' % 1 }}", "at most 1,000,000"),
    "printf_star": ("{{ '%*d' % (9999999999, 1) }}", "at most 1,000,000"),
    "format_filter": ("{{ '%9999999999d'|format(1) }}", "at most 1,000,000"),
    "str_format": ("{{ '{:>9999999999}'.format('a') }}", "at most 1,000,000"),
    "replace": ("{% set s = 'a' * 10000 %}{{ s.replace('', s) }}", "at most 1,000,000"),
    "replace_filter": ("{% set s = 'a' * 10000 %}{{ s|replace('a', s) }}", "at most 1,000,000"),
    "join": ("{% set s = 'a' * 100000 %}{{ ''.join([s, s, s, s, s, s, s, s, s, s, s]) }}", "at most 1,000,000"),
    "join_filter": ("{% set s = 'a' * 100000 %}{{ [s, s, s, s, s, s, s, s, s, s, s]|join }}", "at most 1,000,000"),
    "expandtabs": ("{% set s = '\t' * 10000 %}{{ s.expandtabs(10000) }}", "at most 1,000,000"),
    "wordwrap": ("{{ (' ' * 100000 ~ 'a')|wordwrap(2) }}", "may wrap at most 65,536"),
    "indent": ("{% set s = 'a\n' * 10000 %}{{ s|indent(10000) }}", "at most 1,000,000"),
    "tojson": ("{{ (range(100000)|list)|tojson(indent=100) }}", "at most 1,000,000"),
    "nested_repr": ("{% set l = ['a' * 1000] * 900 %}{{ [l, l, l, l, l, l, l, l, l, l, l, l] }}", "1,000,000"),
    "output": ("{% set s = 'a' * 100000 %}{% for i in range(100) %}{{ s }}{% endfor %}", "1,000,000 characters"),
    "loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "steps"),
    "string_loops": ("{% set s = 'a' * 100000 %}{% for i in s %}{% for j in s %}{% endfor %}{% endfor %}", "steps"),
    "lipsum": ("{{ lipsum(10 ** 6) }}", "'lipsum' is undefined"),
    # one filter call looping over many items in Python (16 Mi characters sorted took 30 s), and a chain
    # of lazy filters each calling one per item (each call a step)
    "sort_items": ("{{ ('ab' * 400000)|sort|length }}", "the filter sort over 800,000 items; .* at most 100,000"),
    "lazy_chain": ("{{ ('ab' * 40000)|list" + "|map('upper')" * 30 + "|list|length }}", "steps"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TEMPLATES))
def test_hostile_chat_templates_fail_by_name_before_they_allocate(qwen, monkeypatch, case):
    """A chat template is code inside an untrusted file: each hostile one (loops without end, strings,
    lists and numbers grown past the size limit by any operator, method or filter, Python errors) fails
    with one ValueError naming the record, and the render never holds more than a few times the size
    limit (tracemalloc's peak: the limits are checked before the allocation)."""
    import copy
    import tracemalloc

    from apr_kernels.train import chat_template

    monkeypatch.setattr(chat_template, "MAX_SIZE", 1_000_000)
    monkeypatch.setattr(chat_template, "MAX_STEPS", 100_000)
    monkeypatch.setattr(chat_template, "MAX_ITEMS", 100_000)
    template, want = HOSTILE_TEMPLATES[case]
    tok = copy.copy(qwen)
    tok.extra = {"tokenizer.chat_template": template}
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"mem:1: the model's chat template failed on this record \(") as err:
            chat.render(CONVO, tok, "mem:1")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert re.search(want, str(err.value)), err.value
    assert peak < 40_000_000, peak  # (1,000,000 characters are 1 to 4 MB; a list of them 8 MB)


def test_chat_template_limits_leave_real_templates_alone(qwen, monkeypatch):
    """The limits change nothing a real template does: Qwen2's template and one using every construct
    the limits watch (loops, macros, filters, methods, formatting, tojson) render exactly what jinja's
    own sandbox renders with transformers' tojson; the time limit stops a loop (0 s: at its first step)."""
    import copy

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from apr_kernels.train import chat_template

    busy = ("{% macro turn(m) %}{{ '<|im_start|>' + m.role + '\n' + m.content|trim + '<|im_end|>\n' }}{% endmacro %}"
            "{% for m in messages %}{{ turn(m) }}{{ '%-6s|%3d' % (m.role, loop.index) }}{{ '{:>8}'.format(m.role) }}"
            "{{ m.content.replace(' ', '_')|center(30) }}{{ [m.role, m.content]|join('/') }}{{ m|tojson }}"
            "{{ (m.role * 3).upper() ~ m.content.split()|length }}{% endfor %}")
    for template in (TEMPLATE, busy):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: (
            json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys))
        want = env.from_string(template).render(messages=CONVO["messages"], add_generation_prompt=True, bos_token="",
                            eos_token="<|endoftext|>")
        tok = copy.copy(qwen)
        tok.extra = {"tokenizer.chat_template": template}
        got = chat.render_template(template, CONVO["messages"], tok, True, "mem:1")
        assert got == want and len(got) > 200
    # jinja's indent filter extends a list given to it in place (then fails), past the immutable sandbox:
    # the template works on copies, so the caller's messages stay as they were
    messages = copy.deepcopy(CONVO["messages"])
    with pytest.raises(ValueError, match=r"mem:1: .*AttributeError: 'list' object has no attribute 'splitlines'"):
        chat.render_template("{{ messages|indent(2) }}", messages, tok, True, "mem:1")
    assert messages == CONVO["messages"]
    monkeypatch.setattr(chat_template, "MAX_SECONDS", 0.0)
    with pytest.raises(ValueError, match=r"mem:1: .* steps or 0\.0 s on one conversation"):
        chat.render_template("{% for m in messages %}{{ m.role }}{% endfor %}", CONVO["messages"], tok, True, "mem:1")


def test_random_chat_templates_render_or_fail_by_name_within_the_limits(qwen, monkeypatch):
    """Random templates of nested expressions over the operators, methods and filters the limits watch
    (and some they need not), in loops and ``set``s: each renders or fails with one ValueError naming
    the record, no render holds more than a few times the size limit (tracemalloc's peak), and the
    caller's messages are left as they were. (By hand, 75,000 of them found the integer-bits, wordwrap
    and list-size limits; this one found jinja's indent filter extending a list in place.)"""
    import copy
    import random
    import tracemalloc

    from apr_kernels.train import chat_template

    monkeypatch.setattr(chat_template, "MAX_SIZE", 1_000_000)
    monkeypatch.setattr(chat_template, "MAX_STEPS", 20_000)
    values = ["'a'", "'ab\\t\\n'", "s", "ns.s", "messages", "messages[0].content", "1", "7", "10**6", "99999999",
              "2", "[s, s]", "[1, 2, 3]", "range(1000)|list", "{'a': s}", "loop.index"]
    forms = ["{a} * {b}", "{a} + {b}", "{a} ** {b}", "'%{b}d' % 1", "{a} ~ {b}", "{a}|center({b})", "{a}|indent({b})",
             "{a}.ljust({b})", "{a}.expandtabs({b})", "{a}|replace('a', {b})", "{a}.replace('', {b})",
             "[{a}, {b}]|join", "{a}|tojson", "{a}|tojson(indent={b})", "'{{:>{b}}}'.format({a})", "{a}|list",
             "{a}|batch({b})|list", "{a}|wordwrap({b})", "{a}|truncate({b})", "{a}.split()", "{a}|length",
             "{a}[:{b}]", "({a})|string", "{a} / {b}", "{a} // {b}", "{a}|sum", "{a}|sort", "{a}|unique|list"]
    rng = random.Random(7)

    def expr(depth=0):
        if depth > 1 or rng.random() < 0.4:
            return rng.choice(values)
        return "(" + rng.choice(forms).format(a=expr(depth + 1), b=expr(depth + 1)) + ")"

    def statement(depth=0):
        r = rng.random()
        if depth < 3 and r < 0.3:
            return "{% for i in " + expr() + " %}" + statement(depth + 1) + statement(depth + 1) + "{% endfor %}"
        return ("{% set ns.s = " if r < 0.5 else "{% set s = " if r < 0.6 else "{{ ") + expr() + (
            " %}" if r < 0.6 else " }}")

    tok = copy.copy(qwen)
    messages = copy.deepcopy(CONVO["messages"])
    outcomes = {"rendered": 0, "refused": 0}
    tracemalloc.start()
    try:
        for _ in range(150):
            template = "{% set s = 'x' %}{% set ns = namespace(s='y') %}" + "".join(
                statement() for _ in range(rng.randint(1, 4)))
            try:
                text = chat.render_template(template, CONVO["messages"], tok, False, "mem:1")
            except ValueError as exc:
                assert str(exc).startswith("mem:1: the model's chat template failed on this record ("), exc
                outcomes["refused"] += 1
            else:
                assert isinstance(text, str) and len(text) <= 1_000_000
                outcomes["rendered"] += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert min(outcomes.values()) >= 10, outcomes
    assert peak < 60_000_000, peak
    assert CONVO["messages"] == messages  # (jinja's indent filter extends a list in place: the template gets copies)


def _records_of(stream: torch.Tensor, eos: int) -> list[list[int]]:
    """The documents of a marked stream (each ending with its end-of-text id), as marked ids."""
    out, cur = [], []
    for t in stream.tolist():
        cur.append(t)
        if t in (eos, -1 - eos):
            out.append(cur)
            cur = []
    return out + ([cur] if cur else [])


def test_record_packing_keeps_every_record_whole_in_one_sequence(qwen, tmp_path):
    """--packing records: every record shorter than a sequence lies whole in exactly one row (so every
    answer is preceded by its own prompt), longer ones are cut into full rows plus a packed tail, the
    padding is non-target end-of-text ids, the targets are exactly the stream's, and the rows are
    nearly full (best-fit decreasing)."""
    from apr_kernels.train.data import pack_records

    import random

    rng = random.Random(0)
    lines = []
    for i in range(60):
        turns = [{"role": "user", "content": "q" * rng.randint(1, 40) + str(i)},
                 {"role": "assistant", "content": "a" * rng.randint(1, 60)}]
        lines.append(json.dumps({"messages": turns} if i % 3 else {"prompt": "p" * rng.randint(1, 30) + str(i),
                                                                    "completion": "c" * rng.randint(1, 90)}))
    lines.append(json.dumps({"text": "long " * 150}))  # longer than a sequence: cut
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    stream = tokenize_files([tmp_path / "r.jsonl"], qwen)
    eos, L = qwen.eos_id, 48
    packed = pack_records(stream, L, eos)
    rows = sequences(packed, L)
    assert packed.dtype == torch.int32 and len(packed) == len(rows) * L + 1
    records = _records_of(stream, eos)
    row_lists = [r.tolist() for r in rows]
    for rec in records:
        if len(rec) <= L - 1:
            hits = [i for i, r in enumerate(row_lists) for s in range(1, L + 1 - len(rec) + 1) if r[s:s + len(rec)] == rec]
            assert len(hits) == 1, rec
    assert sum(len(r) > L - 1 for r in records) == 1  # the long text: cut into rows
    # content = the stream's tokens exactly once (in record order within a row); the rest is padding
    pad = -1 - eos
    content = [t for r in row_lists for t in r[1:L] if t != pad]
    assert sorted(content) == sorted(t for t in stream.tolist() if t != pad)
    assert all(r[0] == pad and r[L] == pad for r in row_lists)
    assert int((packed >= 0).sum()) == int((stream >= 0).sum())  # the same targets, padding none
    # best-fit decreasing uses at most 11/9 of the optimal rows (+1), which uses >= tokens / capacity
    assert len(rows) <= 11 / 9 * math.ceil(len(stream) / (L - 1)) + 1
    assert torch.equal(pack_records(stream, L, eos), packed)  # deterministic
    # a case with a known optimum: documents of 30, 30, 17, 17 tokens pair up into two full rows of 47
    docs = [[7] * 29 + [eos], [8] * 16 + [eos], [9] * 29 + [eos], [6] * 16 + [eos]]
    two = sequences(pack_records(torch.tensor([t for d in docs for t in d], dtype=torch.int32), 48, eos), 48)
    assert len(two) == 2
    for r in two:  # each row: one document of 30 and one of 17, no padding
        assert sorted(len(d) for d in _records_of(r[1:48], eos)) == [17, 30] and not (r[1:48] == -1 - eos).any()


def test_cli_record_packing_trains_and_eval_follows_it(qwen, tmp_path, capsys):
    from apr_kernels.model import Transformer, pad_vocab, preset
    from apr_kernels.train.checkpoint import save_checkpoint
    from apr_kernels.train.cli import main

    (tmp_path / "c.jsonl").write_text("".join(json.dumps(CONVO) + "\n" for _ in range(30)))
    model = Transformer(preset("tiny_qwen2").replace(vocab_size=pad_vocab(qwen.vocab_size)), fast=False)
    save_checkpoint(tmp_path / "init.apr", model=model, tokenizer=qwen)
    code = main(["train", "--init", str(tmp_path / "init.apr"), "--data", str(tmp_path / "c.jsonl"), "--steps", "2",
                 "--batch-size", "2", "--seq-len", "64", "--packing", "records", "--document-mask", "--json",
                 "--no-token-cache", "--no-progress", "--eval-tokens", "128", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert code == 0
    recs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    final = [r for r in recs if r["event"] == "eval"][-1]
    assert main(["eval", "--init", str(tmp_path / "o" / "model.apr"), "--data", str(tmp_path / "c.jsonl"),
                 "--max-tokens", "128", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.splitlines()[-1])
    # eval lays the data out as the run did (stored in training.config): the targets of its first
    # two packed rows, not of two rows cut from the stream
    from apr_kernels.train.data import pack_records

    stream = tokenize_files([tmp_path / "c.jsonl"], qwen, max_tokens=129)
    packed_rows, stream_rows = sequences(pack_records(stream, 64, qwen.eos_id), 64)[:2], sequences(stream, 64)[:2]
    assert got["tokens"] == int((packed_rows[:, 1:] >= 0).sum()) != int((stream_rows[:, 1:] >= 0).sum())
    assert final["eval_tokens"] > 0


def test_aprenders_typed_chat_keys_are_read():
    """aprender's typed top-level keys (spec 5.2): ``chat_template`` renders chats when the file has no
    ``tokenizer.chat_template`` (which wins when both are there) and is saved under that key;
    ``chat_format`` picks among the formats whose special tokens the tokenizer has, and one that is
    not rendered here is named in the error."""
    meta = {k: v for k, v in llama3_tokenizer().to_metadata().items() if k != "tokenizer.token_type"}
    assert "tokenizer.chat_template" not in meta
    plain = Tokenizer.from_metadata(meta)
    typed = Tokenizer.from_metadata({**meta, "chat_template": TEMPLATE})
    assert chat.chat_template(plain) is None and chat.chat_template(typed) == TEMPLATE
    text, _, _ = chat.render({"messages": CONVO["messages"][1:3]}, typed, "mem:1")
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n4.<|im_end|>\n")
    assert typed.to_metadata()["tokenizer.chat_template"] == TEMPLATE
    both = Tokenizer.from_metadata({**meta, "chat_template": TEMPLATE, "tokenizer.chat_template": "{{ 'x' }}"})
    assert chat.chat_template(both) == "{{ 'x' }}"

    # a vocabulary with the ChatML and the Llama 3 special tokens: the typed format decides
    vocab = meta["tokenizer.vocabulary"] + list(chat.CHATML)
    both_formats = {**meta, "tokenizer.vocabulary": vocab}
    assert chat.chat_format(Tokenizer.from_metadata(both_formats)) == "chatml"  # (the first that fits)
    assert chat.chat_format(Tokenizer.from_metadata({**both_formats, "chat_format": "llama3"})) == "llama3"
    assert chat.chat_format(Tokenizer.from_metadata({**both_formats, "chat_format": "llama2"})) == "chatml"
    named = Tokenizer.from_metadata({**both_formats, "chat_format": "llama3"})
    assert named.to_metadata()["chat_format"] == "llama3"
    text, _, _ = chat.render({"messages": CONVO["messages"][1:3]}, named, "mem:1")
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>")
    bare = {"tokenizer.vocabulary": meta["tokenizer.vocabulary"][:256], "tokenizer.merges": [], "chat_format": "phi"}
    with pytest.raises(ValueError, match=r"mem:1: chat records need a chat template .* none of these; its "
                                         r"chat_format 'phi' is not one rendered here \(chatml, llama3, llama2\)"):
        chat.render({"messages": CONVO["messages"][1:3]}, Tokenizer.from_metadata(bare), "mem:1")
