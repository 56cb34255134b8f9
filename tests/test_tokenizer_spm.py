"""SentencePiece BPE tokenizers (Llama 1/2, Mistral): the real Mistral-7B-v0.1 ``tokenizer.model``
(shipped in the ``mistral-common`` package) against the ``sentencepiece`` library and Hugging Face
``tokenizers`` (files built as transformers' Llama converter builds them), through every way such a
tokenizer reaches an APR file: ``tokenizer.model``, ``tokenizer.json``, GGUF metadata, and back out."""

import importlib.util
import json
import math
import os
import pathlib
import random

import pytest
pytest.importorskip("hypothesis")  # not on every GPU image; the CPU suite always has it
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import apr_kernels
from apr_kernels.convert.hf_tokenizer import hf_tokenizer_files, read_hf_tokenizer
from apr_kernels.spm_model import read_spm_model
from apr_kernels.tokenizer import Tokenizer
from apr_kernels import tokenizer_spm
from apr_kernels.tokenizer_spm import BYTE, CONTROL, NORMAL, UNKNOWN, SentencePieceTokenizer
from test_tokenizer import random_text, stdlib_text

spm = pytest.importorskip("sentencepiece")
tokenizers = pytest.importorskip("tokenizers")

FUZZ = int(os.environ.get("APR_FUZZ_EXAMPLES", "60"))


def mistral_model_path() -> pathlib.Path:
    spec = importlib.util.find_spec("mistral_common")  # the file only; the package is not imported
    if spec is None:
        pytest.skip("mistral-common (ships Mistral 7B v0.1's tokenizer.model) is not installed")
    return pathlib.Path(spec.origin).parent / "data" / "tokenizer.model.v1"


@pytest.fixture(autouse=True)
def python_engine(monkeypatch):
    """These tests check the Python engine against sentencepiece; test_native_engine_* the other."""
    monkeypatch.setattr(tokenizer_spm, "NATIVE", False)


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(mistral_model_path()))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_metadata(read_spm_model(mistral_model_path()))


def llama_style_json(sp, *, scheme: str = "legacy") -> str:
    """A tokenizer.json as transformers' LlamaConverter writes it (merges from its generate_merges),
    built with the `tokenizers` library: legacy = Prepend + Replace normalizer; "first" = the
    non-legacy Metaspace(prepend_scheme="first") pre-tokenizer."""
    from tokenizers import AddedToken, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import generate_merges

    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.vocab_size())}
    hf = tokenizers.Tokenizer(BPE(vocab, generate_merges(vocab, scores), unk_token="<unk>", fuse_unk=True,
                                  byte_fallback=True))
    if scheme == "legacy":
        hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    else:
        hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    return hf.to_str()


EDGE_CASES = ["", " ", "  ", "a", " a", "a ", "a  b", "\t\tx\n", "\n\n\n", "    return x  # é",
              "中文字日本語 한국어 🙂🚀", "e\u0301 café", "<s> is text </s>", "x" * 300, " " * 40 + "y"]


def test_model_file_reads_as_sentencepiece_does(sp):
    meta = read_spm_model(mistral_model_path())
    pieces, scores, types = meta["tokenizer.vocabulary"], meta["tokenizer.scores"], meta["tokenizer.token_type"]
    assert len(pieces) == sp.vocab_size() == 32000
    assert pieces == [sp.id_to_piece(i) for i in range(32000)]
    assert scores == [sp.get_score(i) for i in range(32000)]
    assert [i for i, t in enumerate(types) if t == UNKNOWN] == [sp.unk_id()] == [0]
    assert [i for i, t in enumerate(types) if t == CONTROL] == [sp.bos_id(), sp.eos_id()] == [1, 2]
    assert sum(t == BYTE for t in types) == 256 and types.count(NORMAL) == 32000 - 259
    assert meta["tokenizer.bos_token_id"] == 1 and meta["tokenizer.eos_token_id"] == 2
    assert meta["tokenizer.add_space_prefix"] is True


def test_encode_decode_match_sentencepiece_on_real_text(tok, sp):
    assert isinstance(tok, SentencePieceTokenizer)
    text = stdlib_text(60, 300_000)
    docs = [text[i : i + 5000] for i in range(0, len(text), 5000)] + EDGE_CASES
    for doc in docs:
        ids = tok.encode(doc, special=False)
        assert ids == sp.encode(doc), doc[:60]
        assert tok.decode(ids) == sp.decode(ids) == doc
    assert sum(len(sp.encode(d)) for d in docs) > 50_000  # real work, not a handful of tokens


@settings(max_examples=FUZZ, deadline=None)
@given(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80))
def test_fuzz_any_text_matches_sentencepiece(tok, sp, text):
    assert tok.encode(text, special=False) == sp.encode(text)


def test_mixed_scripts_fall_back_to_bytes(tok, sp):
    random.seed(3)
    for _ in range(20):
        text = random_text(200)
        ids = tok.encode(text, special=False)
        assert ids == sp.encode(text)
        assert tok.decode(ids) == text
    # U+A66E is no piece: its three UTF-8 bytes become byte pieces
    assert [sp.id_to_piece(i) for i in tok.encode("\ua66e", special=False)] == ["▁", "<0xEA>", "<0x99>", "<0xAE>"]


def test_native_engine_equals_the_python_engine(monkeypatch, tok, tmp_path):
    """With sentencepiece installed, encode runs it on a model file written from the APR keys: the
    same ids as the Python engine on real text, fuzzed text and special-token text."""
    from apr_kernels.spm_model import write_spm_model

    texts = [stdlib_text(200, 100_000)] + EDGE_CASES + [random_text(300) for _ in range(10)] + \
        ["<s>[INST] hi [/INST] there</s><s> again", "a<s>b</s> c"]
    python_ids = [(tok.encode(t), tok.encode(t, special=False)) for t in texts]
    monkeypatch.setattr(tokenizer_spm, "NATIVE", True)
    fresh = Tokenizer.from_metadata(tok.to_metadata())
    assert fresh._native() is not None
    assert [(fresh.encode(t), fresh.encode(t, special=False)) for t in texts] == python_ids
    # the model file written for it reads back as the same keys
    meta = tok.to_metadata()
    written = tmp_path / "tokenizer.model"
    written.write_bytes(write_spm_model(meta["tokenizer.vocabulary"], meta["tokenizer.scores"],
                                        meta["tokenizer.token_type"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                        add_dummy_prefix=True, byte_fallback=True))
    again = read_spm_model(written)
    assert {k: again[k] for k in meta if k in again} == {k: meta[k] for k in again}


@pytest.mark.parametrize("scheme", ["legacy", "always", "first"])
def test_tokenizer_json_import_matches_hf_tokenizers(tmp_path, sp, scheme):
    """A Llama-style tokenizer.json (the legacy normalizer form, and the Metaspace forms newer
    transformers write) becomes the same tokenizer: ids equal to `tokenizers`, special tokens in the
    text too."""
    hf = tokenizers.Tokenizer.from_str(llama_style_json(sp, scheme=scheme))
    (tmp_path / "tokenizer.json").write_text(llama_style_json(sp, scheme=scheme))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": "{{ bos_token }}"}))
    meta = read_hf_tokenizer(tmp_path)
    assert meta["tokenizer.model_type"] == "llama"
    assert meta["tokenizer.bos_token_id"] == 1 and meta["tokenizer.add_bos_token"] is True
    tok = Tokenizer.from_metadata(meta)
    texts = [stdlib_text(90, 40_000)] + EDGE_CASES + ["<s>[INST] hi [/INST] there</s><s> again", "a<s>b</s> c"]
    for text in texts:
        if scheme == "legacy":  # Metaspace forms differ from sentencepiece before a leading space
            assert tok.encode(text, special=False) == sp.encode(text)
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids, text[:60]
        ids = tok.encode(text)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False)


def test_model_file_only_folder_and_added_tokens(tmp_path, sp):
    """A folder with only tokenizer.model (GH-366), plus chat markers a fine-tune added on top."""
    (tmp_path / "tokenizer.model").write_bytes(mistral_model_path().read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {"32000": {"content": "<|im_start|>"}, "32001": {"content": "<|im_end|>"}},
        "eos_token": "<|im_end|>"}))
    tok = Tokenizer.from_metadata(read_hf_tokenizer(tmp_path))
    assert tok.vocab_size == 32002 and tok.eos_id == 32001 and tok.bos_id == 1
    text = "<|im_start|>user\nhello there<|im_end|>"
    body = sp.encode("user\nhello there")
    assert tok.encode(text) == [32000, *body, 32001]
    assert tok.encode(text, special=False) == sp.encode(text)


def test_export_loads_in_transformers_and_round_trips(tmp_path, tok, sp):
    """APR -> tokenizer.json + tokenizer_config.json: transformers' AutoTokenizer encodes like
    sentencepiece (with the <s> the config asks for); reading the folder back gives the tokenizer."""
    from transformers import AutoTokenizer

    meta = tok.to_metadata()
    meta["tokenizer.add_bos_token"] = True
    meta["tokenizer.chat_template"] = "{{ bos_token }}{{ messages[0]['content'] }}"
    exported = Tokenizer.from_metadata(meta)
    tj, tcfg = hf_tokenizer_files(exported)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tcfg))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    text = stdlib_text(120, 20_000)
    assert hf(text)["input_ids"] == [1, *sp.encode(text)]
    assert hf.decode(sp.encode(text)) == text
    again = Tokenizer.from_metadata(read_hf_tokenizer(tmp_path))
    assert again.encode(text) == tok.encode(text)
    assert again.extra["tokenizer.chat_template"] == meta["tokenizer.chat_template"]


def test_export_writes_a_tokenizer_model_sentencepiece_and_slow_tokenizers_load(tmp_path, tok, sp):
    """The exported folder carries a tokenizer.model, as Llama and Mistral folders do: sentencepiece
    loads it and encodes as the original model, with the original's pieces, scores and types (what
    llama.cpp's converter reads of it). A tokenizer the format cannot hold exactly (prefix space before
    the first piece only) gets none."""
    from apr_kernels.convert.hf_tokenizer import write_hf_tokenizer

    write_hf_tokenizer(tok, tmp_path)
    ours = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    n = sp.vocab_size()
    assert ours.vocab_size() == n
    assert [(ours.id_to_piece(i), ours.get_score(i), ours.is_control(i), ours.is_byte(i), ours.is_unknown(i))
            for i in range(n)] == [(sp.id_to_piece(i), sp.get_score(i), sp.is_control(i), sp.is_byte(i),
                                    sp.is_unknown(i)) for i in range(n)]
    text = stdlib_text(160, 20_000) + "\n  🙂 zé 中"
    assert ours.encode(text) == sp.encode(text)
    first_only = SentencePieceTokenizer.from_metadata({**tok.to_metadata(), "tokenizer.prepend_scheme": "first"})
    (tmp_path / "first").mkdir()
    write_hf_tokenizer(first_only, tmp_path / "first")
    assert not (tmp_path / "first" / "tokenizer.model").exists()


def test_metadata_round_trips_through_an_apr_file(tmp_path, tok, sp):
    import torch

    path = tmp_path / "t.apr"
    apr_kernels.save({"x": torch.zeros(1)}, path, metadata=tok.to_metadata())
    with apr_kernels.open(path) as f:
        again = Tokenizer.from_metadata(f.metadata, path)
    text = stdlib_text(140, 20_000)
    assert again.encode(text) == sp.encode(text)
    assert again.fingerprint() == tok.fingerprint()
    other = SentencePieceTokenizer.from_metadata({**tok.to_metadata(), "tokenizer.add_space_prefix": False})
    assert other.fingerprint() != tok.fingerprint()
    assert tok.encode("hello world") == sp.encode("hello world")
    assert sp.id_to_piece(tok.encode("hello world")[0]).startswith("▁")
    assert not sp.id_to_piece(other.encode("hello world")[0]).startswith("▁")


def test_offsets_cover_the_text(tok):
    """Each token starts where its text begins (the prefix "▁" covers no byte of the input)."""
    text = "<s>Hello  wörld\n\t🙂 x</s> y"
    ids, offsets = tok.encode_with_offsets(text)
    raw = text.encode()
    assert len(offsets) == len(ids) + 1 and offsets[0] == 0 and offsets[-1] == len(raw)
    for k, i in enumerate(ids):
        piece = raw[offsets[k] : offsets[k + 1]]
        expected = tok.token_bytes(i)
        assert piece == expected or (expected.startswith(b" ") and piece == expected[1:]), (k, piece, expected)


def test_gguf_llama_tokenizer_keys(tmp_path, sp):
    """GGUF's `llama` tokenizer (llama.cpp's export of these models) -> APR keys -> the tokenizer."""
    from apr_kernels.convert.gguf_in import _tokenizer

    kv = {"tokenizer.ggml.model": "llama",
          "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(sp.vocab_size())],
          "tokenizer.ggml.scores": [sp.get_score(i) for i in range(sp.vocab_size())],
          "tokenizer.ggml.token_type": [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else
                                        6 if sp.is_byte(i) else 1 for i in range(sp.vocab_size())],
          "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
          "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_space_prefix": True}
    meta = _tokenizer(kv, tmp_path / "m.gguf")
    assert meta["tokenizer.model_type"] == "llama" and "tokenizer.scores" in meta
    tok = Tokenizer.from_metadata(meta)
    text = stdlib_text(150, 20_000)
    assert tok.encode(text, special=False) == sp.encode(text)
    assert tok.bos_id == 1 and tok.eos_id == 2


def test_training_stream_starts_documents_with_bos(tmp_path, tok, sp):
    """With add_bos_token (Llama 2/3, Mistral) every document is <s> text </s>, as Hugging Face
    tokenization + an end-of-text id gives; the token cache keys on it."""
    from apr_kernels.train.data import token_cache_key, tokenize_files

    docs = [stdlib_text(10 + k, 2000)[:2000] for k in range(3)]
    files = []
    for k, d in enumerate(docs):
        files.append(tmp_path / f"d{k}.txt")
        files[-1].write_text(d)
    with_bos = Tokenizer.from_metadata({**tok.to_metadata(), "tokenizer.add_bos_token": True})
    stream = tokenize_files(files, with_bos).tolist()
    assert stream == [t for d in docs for t in [1, *sp.encode(d), 2]]
    assert tokenize_files(files, tok).tolist() == [t for d in docs for t in [*sp.encode(d), 2]]
    assert token_cache_key(files, with_bos, None) != token_cache_key(files, tok, None)


def test_supervised_targets_with_a_llama2_template(tok, sp):
    """A Llama-2-style chat template: the targets are exactly the answer's tokens and the </s>."""
    from apr_kernels.train import chat

    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
                "[/INST]{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")
    t = Tokenizer.from_metadata({**tok.to_metadata(), "tokenizer.chat_template": template})
    record = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four."}]}
    text, spans, _ = chat.render(record, t, "rec.jsonl:1")
    ids, targets = chat.encode_with_targets(t, text, spans)
    assert text == "<s>[INST] What is 2+2? [/INST] Four. </s>"
    assert ids[0] == 1 and ids[-1] == 2
    assert t.decode([i for i, ok in zip(ids, targets) if ok]).strip() == "Four. </s>"


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:100], "claims|truncated"),
    (lambda b: b"\x0a\xff\xff\xff\xff\x0f" + b[6:], "claims"),
    (lambda b: b"", "no pieces"),
])
def test_malformed_model_file_names_file(tmp_path, mutate, message):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(mutate(mistral_model_path().read_bytes()))
    with pytest.raises(ValueError, match=message) as info:
        read_spm_model(bad)
    assert str(bad) in str(info.value)


def test_unsupported_models_and_metadata_are_named(tmp_path, tok):
    spm.SentencePieceTrainer.train(sentence_iterator=iter(stdlib_text(5, 20_000).splitlines()), model_prefix=str(tmp_path / "u"),
                                   vocab_size=300, model_type="unigram", minloglevel=2)
    with pytest.raises(ValueError, match="model_type unigram is not supported"):
        read_spm_model(tmp_path / "u.model")
    meta = tok.to_metadata()
    with pytest.raises(ValueError, match="needs tokenizer.scores"):
        Tokenizer.from_metadata({k: v for k, v in meta.items() if k != "tokenizer.scores"}, "m.apr")
    bad_types = list(meta["tokenizer.token_type"])
    bad_types[5] = BYTE
    bad_types[400] = BYTE  # a normal piece labelled byte
    with pytest.raises(ValueError, match=r"tokenizer.vocabulary\[400\].*<0xAB>"):
        Tokenizer.from_metadata({**meta, "tokenizer.token_type": bad_types}, "m.apr")
    with pytest.raises(ValueError, match="one entry per vocabulary piece"):
        Tokenizer.from_metadata({**meta, "tokenizer.scores": meta["tokenizer.scores"][:-1]}, "m.apr")


def test_llama2_style_folder_converts_trains_and_generates(tmp_path, capsys, sp):
    """A Hugging Face Llama folder whose tokenizer is only a tokenizer.model (Llama 2 / Mistral
    layout) -> convert -> train from it (documents start with <s>) -> generate."""
    import torch
    import transformers

    from apr_kernels.cli import main

    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, vocab_size=32000, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    src = tmp_path / "hf"
    transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    (src / "tokenizer.model").write_bytes(mistral_model_path().read_bytes())
    (src / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "add_eos_token": False}))
    apr = tmp_path / "llama.apr"
    assert main(["convert", str(src), str(apr)]) == 0
    with apr_kernels.open(apr) as f:
        assert f.metadata["tokenizer.model_type"] == "llama" and f.metadata["tokenizer.add_bos_token"] is True
    data = tmp_path / "doc.txt"
    data.write_text(stdlib_text(30, 6000))
    capsys.readouterr()
    code = main(["train", "--init", str(apr), "--data", str(data), "--steps", "2", "--batch-size", "2",
                 "--seq-len", "32", "--lr", "1e-3", "--out", str(tmp_path / "run"), "--json", "--no-token-cache"])
    out = capsys.readouterr().out
    assert code == 0
    steps = [r for r in map(json.loads, filter(lambda x: x.startswith("{"), out.splitlines())) if "loss" in r]
    assert len(steps) >= 2 and all(math.isfinite(s["loss"]) for s in steps)
    code = main(["generate", "--init", str(tmp_path / "run" / "model.apr"), "--prompt", "def parse(",
                 "--max-new-tokens", "4", "--temperature", "0"])
    assert code == 0
    assert capsys.readouterr().out.startswith("def parse(")


def test_train_from_scratch_with_a_tokenizer_model_file(tmp_path, capsys, sp):
    """--tokenizer takes Hugging Face tokenizer files: here a bare tokenizer.model, with --fit-vocab;
    the checkpoint embeds the tokenizer, so eval reads the data as training did."""
    from apr_kernels.cli import main
    from apr_kernels.train.cli import load_tokenizer

    model_file = tmp_path / "tok" / "tokenizer.model"
    model_file.parent.mkdir()
    model_file.write_bytes(mistral_model_path().read_bytes())
    for spec in (str(model_file), str(model_file.parent)):
        assert load_tokenizer(spec).encode("def f(x):", special=False) == sp.encode("def f(x):")
    with pytest.raises(ValueError, match="no tokenizer.json, vocab.json"):
        load_tokenizer(str(tmp_path))
    data = tmp_path / "doc.txt"
    data.write_text(stdlib_text(40, 4000))
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny_llama", "--fit-vocab", "--tokenizer", str(model_file), "--data",
                 str(data), "--steps", "1", "--batch-size", "2", "--seq-len", "16", "--out", str(out),
                 "--no-token-cache"]) == 0
    with apr_kernels.open(out / "model.apr") as f:
        assert f.metadata["tokenizer.model_type"] == "llama" and f.metadata["vocab_size"] == 32000
    capsys.readouterr()
    assert main(["eval", "--init", str(out / "model.apr"), "--data", str(data), "--seq-len", "16"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("eval_loss=")


def _tiny_spm_meta() -> dict:
    pieces = ["<unk>", "<s>", "</s>", "▁", "a", "b", "▁a", "ab"]
    return {"tokenizer.model_type": "llama", "tokenizer.vocabulary": pieces,
            "tokenizer.scores": [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0],
            "tokenizer.token_type": [UNKNOWN, CONTROL, CONTROL] + [NORMAL] * 5}


def test_tiny_vocabulary_without_byte_pieces_uses_the_unknown_id():
    tok = Tokenizer.from_metadata(_tiny_spm_meta(), "tiny.apr")
    # "▁ab▁a": "▁a" scores above "ab", so ▁+a merge first; "▁ab" is no piece: ▁a b ▁a
    assert tok.encode("ab a", special=False) == [6, 5, 6]
    assert tok.encode("a zzz b", special=False) == [6, 3, 0, 3, 5]  # the three unknown z's fuse into one
    assert tok.decode([6, 3, 5]) == "a b"


@pytest.mark.parametrize("bad, field", [
    ({"tokenizer.vocabulary": "abc"}, "tokenizer.vocabulary"),
    ({"tokenizer.scores": ["x"] * 8}, "tokenizer.scores"),
    ({"tokenizer.scores": [0.0] * 7}, "tokenizer.scores"),
    ({"tokenizer.token_type": [True] * 8}, "tokenizer.token_type"),
    ({"tokenizer.token_type": [UNKNOWN, CONTROL, CONTROL, BYTE] + [NORMAL] * 4}, r"tokenizer.vocabulary\[3\]"),
    ({"tokenizer.token_type": [NORMAL] * 8}, "unknown piece"),
    ({"tokenizer.bos_token_id": 99}, "tokenizer.bos_token_id"),
    ({"tokenizer.eos_token_id": "2"}, "tokenizer.eos_token_id"),
    ({"tokenizer.prepend_scheme": "sometimes"}, "tokenizer.prepend_scheme"),
    ({"tokenizer.add_space_prefix": "no"}, "tokenizer.add_space_prefix"),
])
def test_hostile_sentencepiece_metadata_names_file_and_field(bad, field):
    with pytest.raises(ValueError, match=rf"bad\.apr.*{field}"):
        Tokenizer.from_metadata({**_tiny_spm_meta(), **bad}, path="bad.apr")


# Llama-2-chat's chat template (tokenizer_config.json of meta-llama/Llama-2-7b-chat-hf): the oracle
# for the built-in Llama 2 format used when a SentencePiece model ships no template.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
    "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is 2+2? "}, {"role": "assistant", "content": " Four."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"},
     {"role": "assistant", "content": "Rome, since 1871.\n"}],
])
def test_llama2_chat_format_without_a_template(tok, messages):
    """A SentencePiece model without a chat template (Llama 2 / Mistral base models): records render
    as Llama-2-chat's own template renders them, and the targets are exactly the answers + </s>."""
    from apr_kernels.train import chat

    text, spans, eos_target = chat.render({"messages": messages}, tok, "rec.jsonl:1")
    with_template = Tokenizer.from_metadata({**tok.to_metadata(), "tokenizer.chat_template": LLAMA2_CHAT_TEMPLATE})
    assert text == chat.render_template(LLAMA2_CHAT_TEMPLATE, messages, with_template, False, "oracle")
    assert chat.chat_format(tok) == "llama2" and not eos_target
    ids, targets = chat.encode_with_targets(tok, text, spans)
    answers = [m["content"].strip() for m in messages if m["role"] == "assistant"]
    # each answer's first token carries the space before it ("▁Rome"); decode drops only the first
    assert tok.decode([i for i, t in zip(ids, targets) if t]) == " </s> ".join(answers) + " </s>"
    prompt, close = chat.generation_prompt(messages[:-1], tok)
    assert prompt.endswith(" [/INST]") and close == 2
    with pytest.raises(ValueError, match="alternating"):
        chat.render({"messages": [{"role": "assistant", "content": "hi"}]}, tok, "rec.jsonl:2")


def test_gguf_export_writes_the_llama_tokenizer_llama_cpp_reads(tmp_path, tok, sp):
    """APR with a SentencePiece tokenizer -> GGUF: model 'llama', pieces, scores and types as llama.cpp
    writes them for Mistral (checked against sentencepiece itself), and the file converts back to the
    same tokenizer."""
    gguf = pytest.importorskip("gguf")
    from apr_kernels.cli import main
    from apr_kernels.model import Transformer, preset
    from apr_kernels.train.checkpoint import save_checkpoint

    model = Transformer(preset("tiny_llama").replace(vocab_size=sp.vocab_size() + 8), fast=False)  # padded rows
    save_checkpoint(tmp_path / "m.apr", model=model, tokenizer=tok)
    assert main(["export", str(tmp_path / "m.apr"), str(tmp_path / "m.gguf"), "-q"]) == 0
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    kv = {k: f.contents() for k, f in r.fields.items()}
    n = sp.vocab_size()
    assert kv["tokenizer.ggml.model"] == "llama"
    assert kv["tokenizer.ggml.tokens"][:n] == [sp.id_to_piece(i) for i in range(n)]
    assert kv["tokenizer.ggml.tokens"][n:] == [f"[PAD{i}]" for i in range(n, n + 8)]
    assert kv["tokenizer.ggml.scores"][:n] == pytest.approx([sp.get_score(i) for i in range(n)])
    assert kv["tokenizer.ggml.token_type"][:n] == [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else
                                                  6 if sp.is_byte(i) else 1 for i in range(n)]
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (1, 2)
    from apr_kernels.convert.core import convert

    convert(tmp_path / "m.gguf", tmp_path / "back.apr", progress=False)
    with __import__("apr_kernels").open(tmp_path / "back.apr") as f:
        back = Tokenizer.from_metadata(f.metadata)
    text = stdlib_text(151, 20_000)
    assert back.encode(text, special=False) == sp.encode(text)
