"""Malformed and unusual APR files: one hand-made file per reader rule, each asserting its message;
files in the wild that the reader must accept; property tests on random mutations."""

from __future__ import annotations

import os
import struct
import tempfile
import zlib

import pytest
import torch
pytest.importorskip("hypothesis")  # not on every GPU image; the CPU suite always has it
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import apr_kernels
from apr_build import build, entry_bytes, f32, pad64, patch_header, read_header
from apr_kernels.errors import AprFormatError

A = ("a", "F32", (2,), f32(1.0, 2.0))
B = ("b", "F32", (3,), f32(3.0, 4.0, 5.0))
VALID = build([A, B])
H = read_header(VALID)
IDX = H["tensor_index_offset"]  # entry "a" starts here: u16 len, "a", dtype, ndim, dim, offset, size
A_DTYPE, A_NDIM, A_DIM, A_OFF, A_SIZE = IDX + 3, IDX + 4, IDX + 5, IDX + 13, IDX + 21


def poke(buf: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(buf)
    struct.pack_into("<" + fmt, b, offset, value)
    return bytes(b)


def refoot(buf: bytes) -> bytes:
    """Re-seal the footer CRC after an edit (so only the intended rule is broken)."""
    return buf[:-4] + struct.pack("<I", zlib.crc32(buf[:-4]))


def with_index(entries: bytes, count: int, data: bytes = b"") -> bytes:
    """A file whose index is exactly ``entries`` (raw bytes) followed by ``data``."""
    meta = b'{"model_type":"t"}'
    index_off = 64 + pad64(len(meta))
    data_off = index_off + pad64(len(entries))
    h = patch_header(bytes(64), magic=b"APR\x00", major=2, flags=0x400, tensor_count=count, metadata_offset=64,
                     metadata_size=len(meta), tensor_index_offset=index_off, data_offset=data_off)
    body = h + meta.ljust(pad64(len(meta)), b"\0") + entries.ljust(pad64(len(entries)), b"\0") + data
    return body + struct.pack("<I", zlib.crc32(body))


MALFORMED = [
    # (id, file bytes, substrings the message must contain)
    ("empty", b"", ["shorter than the 64-byte"]),
    ("short", b"APR\x00\x02\x00" + bytes(20), ["26 bytes", "shorter than the 64-byte"]),
    ("bad_magic", b"GGUF" + VALID[4:], ["bad magic", "expected 'APR\\0'"]),
    ("apr_v1", b"APRN" + VALID[4:], ["'APRN'", "APR v1"]),
    ("apr1_legacy", b"APR1" + VALID[4:], ["'APR1'", "legacy"]),
    ("compressed_wrapper", patch_header(VALID, major=1, metadata_offset=0x1234), ["legacy compressed"]),
    ("version", patch_header(VALID, major=3), ["version is 3.0", "major version 2"]),
    ("header_crc", poke(VALID, 40, "I", 0xDEADBEEF), ["header checksum mismatch", "0xDEADBEEF"]),
    ("column_major", patch_header(VALID, flags=0x0C00), ["LAYOUT_COLUMN_MAJOR"]),
    ("lz4", patch_header(VALID, flags=0x0401), ["compressed"]),
    ("zstd", patch_header(VALID, flags=0x0402), ["compressed"]),
    ("encrypted", patch_header(VALID, flags=0x0404), ["encrypted"]),
    ("too_many_tensors", patch_header(VALID, tensor_count=(1 << 20) + 1), ["tensor_count", "limit"]),
    ("count_vs_index", patch_header(VALID, tensor_count=1000), ["tensor_count is 1000", "index region"]),
    ("metadata_past_eof", patch_header(VALID, metadata_size=len(VALID)), ["metadata", "past the end"]),
    ("metadata_limit", patch_header(VALID, metadata_size=1 << 30), ["metadata_size", "limit"]),
    ("index_before_meta", patch_header(VALID, tensor_index_offset=70), ["tensor_index_offset is 70"]),
    ("index_past_eof", patch_header(VALID, tensor_index_offset=1 << 40), ["tensor_index_offset"]),
    ("data_before_index", patch_header(VALID, data_offset=IDX - 1), ["data_offset", "after the tensor index"]),
    ("data_past_eof", patch_header(VALID, data_offset=1 << 62), ["data_offset"]),
    ("name_len_zero", with_index(entry_bytes(b"", 0, (1,), 0, 4), 1, bytes(64)), ["name_len is 0"]),
    ("name_too_long", with_index(entry_bytes(b"n" * 300, 0, (1,), 0, 4), 1, bytes(64)), ["name_len is 300", "256"]),
    ("name_not_utf8", with_index(entry_bytes(b"w\xff\xfe", 0, (1,), 0, 4), 1, bytes(64)), ["not valid UTF-8"]),
    ("unknown_dtype", refoot(poke(VALID, A_DTYPE, "B", 99)), ["'a'", "unknown dtype code 99"]),
    ("dtype_2_ambiguous", refoot(poke(VALID, A_DTYPE, "B", 2)), ["unknown dtype code 2", "ambiguous"]),
    ("ndim_too_big", with_index(entry_bytes(b"x", 0, (1,) * 9, 0, 4), 1, bytes(64)), ["ndim is 9", "limit of 8"]),
    ("size_mismatch", refoot(poke(VALID, A_SIZE, "Q", 12)), ["'a'", "size is 12", "expected 8", "F32"]),
    ("shape_overflow", with_index(entry_bytes(b"x", 3, (1 << 61,), 0, 8), 1, bytes(64)), ["F64", "overflows"]),
    ("shape_too_large", with_index(entry_bytes(b"x", 0, (1 << 40, 1 << 40), 0, 4), 1, bytes(64)), ["too large"]),
    ("huge_dim_of_empty", with_index(entry_bytes(b"x", 0, (0, 1 << 63), 0, 0), 1, bytes(64)), ["too large"]),
    ("offset_outside", refoot(poke(VALID, A_OFF, "Q", 1 << 20)), ["'a'", "outside"]),
    ("offset_overflow", refoot(poke(VALID, A_OFF, "Q", (1 << 64) - 4)), ["'a'", "outside"]),
    ("overlap", refoot(poke(VALID, A_OFF, "Q", 64 + 4)), ["overlaps", "'a'", "'b'"]),
    ("duplicate", build([A, ("a", "F32", (3,), f32(3, 4, 5))], sort=False), ["duplicate tensor name 'a'"]),
    ("entry_past_region", patch_header(build([("x" * 40, "F32", (1,), f32(1))]), data_offset=IDX + 30),
     ["runs past the end of the index region"]),
    ("metadata_array", build([A], meta=b"[1,2]"), ["metadata is not a JSON object"]),
    ("metadata_string", build([A], meta=b'"hi"'), ["metadata is not a JSON object"]),
    ("truncated", VALID[: H["data_offset"] + 70], ["'b'", "outside"]),
]


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "read"])
@pytest.mark.parametrize("name,data,needles", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_file_is_refused_with_a_precise_message(tmp_path, name, data, needles, mmap):
    path = tmp_path / f"{name}.apr"
    path.write_bytes(data)
    with pytest.raises(AprFormatError) as exc:
        apr_kernels.load(path, mmap=mmap)
    msg = str(exc.value)
    assert str(path) in msg  # every message names the file
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert isinstance(exc.value, ValueError)


@pytest.mark.parametrize("meta,needle", [
    (b'{"a":', "not valid JSON"),
    (b'{"a":"\xff"}', "not valid UTF-8"),
    (b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}", "nests too deeply"),  # no RecursionError escapes
], ids=["truncated_json", "bad_utf8", "deep_nesting"])
def test_bad_metadata_raises_when_read(tmp_path, meta, needle):
    path = tmp_path / "m.apr"
    path.write_bytes(build([A], meta=meta))
    with apr_kernels.open(path) as f:
        assert torch.equal(f.get_tensor("a"), torch.tensor([1.0, 2.0]))  # tensors stay readable
        with pytest.raises(AprFormatError, match=needle) as exc:
            f.metadata
        assert str(path) in str(exc.value)


def test_typed_metadata_key_of_the_wrong_type(tmp_path):
    path = tmp_path / "m.apr"
    path.write_bytes(build([A], meta={"model_type": "llama", "hidden_size": "big"}))
    with apr_kernels.open(path) as f, pytest.raises(AprFormatError, match="'hidden_size' is 'big'.*integer"):
        f.config


def test_footer_checked_only_with_verify(tmp_path):
    path = tmp_path / "f.apr"
    bad = VALID[:-4] + struct.pack("<I", zlib.crc32(VALID[:-4]) ^ 1)
    path.write_bytes(bad)
    assert torch.equal(apr_kernels.load(path)["a"], torch.tensor([1.0, 2.0]))  # footer is optional
    with pytest.raises(AprFormatError, match="footer CRC mismatch"):
        apr_kernels.load(path, verify=True)
    # A corrupted data byte is caught by verify, not by the structural checks.
    data = bytearray(VALID)
    data[H["data_offset"]] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(AprFormatError, match="footer CRC mismatch"):
        apr_kernels.open(path, verify=True)
    path.write_bytes(build([A], footer=False))
    with pytest.raises(AprFormatError, match="no footer"):
        apr_kernels.load(path, verify=True)


def test_not_a_file_and_missing_file(tmp_path):
    with pytest.raises(AprFormatError, match="not a regular file"):
        apr_kernels.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        apr_kernels.load(tmp_path / "missing.apr")


# -- files in the wild the reader must accept (spec 13/16) --------------------------------------

ACCEPTED = [
    ("apr2_magic", dict(magic=b"APR2")),
    ("no_footer", dict(footer=False)),
    ("unsorted_index", dict(sort=False)),
    ("zero_header_crc", dict(zero_crc=True)),
    ("unaligned_data_offset", dict(pad_index=False)),
    ("no_layout_flag", dict(flags=0)),
]


@pytest.mark.parametrize("name,kw", ACCEPTED, ids=[a[0] for a in ACCEPTED])
def test_files_in_the_wild_are_accepted(tmp_path, name, kw):
    path = tmp_path / f"{name}.apr"
    tensors = [("z", "F32", (3,), f32(3.0, 4.0, -5.0)), ("a", "I32", (2,), struct.pack("<2i", 7, -8)),
               ("m", "F16", (2,), struct.pack("<2e", 0.5, -2.0))]
    path.write_bytes(build(tensors, **kw))
    out = apr_kernels.load(path, verify="footer" not in kw)
    assert out["z"].tolist() == [3.0, 4.0, -5.0]
    assert out["a"].tolist() == [7, -8]
    assert out["m"].tolist() == [0.5, -2.0]
    with apr_kernels.open(path) as f:
        assert f.header["index_sorted"] == (name != "unsorted_index")
        assert f.header["has_footer"] == (name != "no_footer")


def test_unaligned_tensors_are_copied_not_viewed_misaligned(tmp_path):
    # pad_index=False with a 3-entry index leaves data_offset off any 8-byte boundary.
    path = tmp_path / "u.apr"
    path.write_bytes(build([("d", "F64", (2,), struct.pack("<2d", 1.5, -2.25)), ("e", "U8", (1,), b"\x07")],
                           pad_index=False))
    with apr_kernels.open(path) as f:
        assert f.info("d").offset % 8 != 0
        d = f.get_tensor("d")
    assert d.tolist() == [1.5, -2.25] and d.data_ptr() % 8 == 0


@pytest.mark.parametrize("code,expect", [(8, "APR_Q4"), (128, "APR_Q4"), (9, "APR_Q8"), (129, "APR_Q8")])
def test_legacy_and_current_quant_codes(tmp_path, code, expect):
    from apr_kernels.quant import quantize

    qt = quantize(expect, torch.randn(40))
    path = tmp_path / "q.apr"
    path.write_bytes(build([("q", code, (40,), bytes(qt.data.numpy()))]))
    with apr_kernels.open(path) as f:
        assert f.info("q").dtype == expect
        assert torch.equal(f.get_raw("q"), qt.data)


def test_tied_lm_head_placeholder_resolves_to_the_embedding(tmp_path):
    emb = f32(*range(6))
    path = tmp_path / "t.apr"
    path.write_bytes(build([("model.embed_tokens.weight", "F32", (3, 2), emb), ("lm_head.weight", "F32", (3, 2), b"")]))
    out = apr_kernels.load(path)
    assert torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])
    with apr_kernels.open(path) as f:
        assert f.info("lm_head.weight").placeholder and f.info("lm_head.weight").nbytes == 0
    # A placeholder with nothing to stand in for it is an error when asked for.
    path.write_bytes(build([("w", "F32", (3, 2), b"")]))
    with apr_kernels.open(path) as f, pytest.raises(AprFormatError, match="placeholder"):
        f.get_tensor("w")


# -- property tests: random damage never crashes the process -------------------------------------

def _try_load(data: bytes) -> None:
    fd, path = tempfile.mkstemp(suffix=".apr")
    try:
        os.write(fd, data)
        os.close(fd)
        try:
            with apr_kernels.open(path, verify=True) as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    t.float().sum()  # touch every byte
                f.metadata
                f.config
        except AprFormatError as exc:
            assert path in str(exc)
    finally:
        os.unlink(path)


SEED_FILES = [VALID, build([("w", "BF16", (2, 3), bytes(range(12))), ("s", "I8", (), b"\x05"),
                            ("e", "F32", (0, 4), b"")], meta={"model_type": "x", "hidden_size": 4})]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(range(len(SEED_FILES))),
       edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 10**6)), reseal=st.booleans())
def test_random_mutations_raise_or_load(seed, edits, cut, reseal):
    data = bytearray(SEED_FILES[seed])
    for pos, val in edits:
        data[pos % len(data)] = val
    if reseal:  # re-seal the header CRC so the mutation reaches the deeper checks
        struct.pack_into("<I", data, 40, zlib.crc32(bytes(data[:40] + data[44:64])))
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    _try_load(bytes(data))


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(["tensor_count", "metadata_size", "tensor_index_offset", "data_offset"]),
       value=st.one_of(st.integers(0, 600), st.sampled_from([2**31, 2**32 - 1, 2**63, 2**64 - 1])))
def test_random_header_fields_raise_or_load(field, value):
    if field in ("tensor_count", "metadata_size"):
        value %= 2**32
    _try_load(patch_header(VALID, **{field: value}))


def test_fuzz_harness_bounded_run():
    from fuzz_apr import run

    stats = run(iterations=400, seed=1234)
    assert stats["iterations"] == 400
    # both outcomes exercised, by damaged seeds and by structured files (which load a third of the time)
    assert stats["refused"] > 0 and stats["loaded"] > 0
    assert stats["structured_refused"] > 0 and stats["structured_loaded"] > 40


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "read"])
def test_verify_covers_every_chunk_of_a_large_file(tmp_path, mmap):
    path = tmp_path / "big.apr"
    apr_kernels.save({"w": torch.randn(17 << 18)}, path)  # 17 MiB: three 8 MiB CRC / two 16 MiB read chunks
    apr_kernels.open(path, verify=True, mmap=mmap).close()
    for pos in (4096, (8 << 20) + 3, (16 << 20) + 100):  # one flipped data bit in each chunk
        data = bytearray(path.read_bytes())
        data[pos] ^= 0x10
        bad = tmp_path / f"bad{pos}.apr"
        bad.write_bytes(bytes(data))
        with pytest.raises(AprFormatError, match="footer CRC mismatch"):
            apr_kernels.open(bad, verify=True, mmap=mmap)
