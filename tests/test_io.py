"""load / open / save: round trips, zero-copy, lifetime, atomic streaming save, metadata, HF interop."""

from __future__ import annotations

import gc
import io
import json
import os
import struct
import weakref
import zlib

import pytest
import torch

import apr_kernels
from apr_kernels.io import LazyTensor, QuantizedTensor
from apr_kernels.metadata import AprModelConfig

PLAIN = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.int8, torch.uint8]
SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (3, 5), (2, 3, 4, 5), (1, 2, 1, 2, 1, 2, 1, 3)]


def random_tensor(dtype: torch.dtype, shape) -> torch.Tensor:
    if dtype.is_floating_point:
        t = torch.randn(shape, dtype=torch.float64).mul(1e3).to(dtype)
        if t.numel() >= 4:  # specials must survive bit for bit
            t.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=dtype)
        return t
    info = torch.iinfo(dtype)
    t = torch.randint(info.min, info.max, shape, dtype=dtype)
    if t.numel() >= 2:
        t.view(-1)[:2] = torch.tensor([info.min, info.max], dtype=dtype)
    return t


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def mapping_of(path) -> list[tuple[int, int]]:
    """Address ranges of the process's mappings of ``path`` (from /proc/self/maps)."""
    path = os.path.realpath(path)
    out = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            if line.rstrip().endswith(path):
                lo, hi = line.split()[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return out


def test_round_trip_every_dtype_and_shape(tmp_apr):
    tensors = {f"{str(d)[6:]}.{'x'.join(map(str, s)) or 'scalar'}": random_tensor(d, s) for d in PLAIN for s in SHAPES}
    apr_kernels.save(tensors, tmp_apr)
    out = apr_kernels.load(tmp_apr, verify=True)
    assert list(out) == sorted(tensors, key=str.encode)  # index order is UTF-8 byte order
    for name, t in tensors.items():
        assert same_bits(out[name], t), name
    with apr_kernels.open(tmp_apr) as f:
        assert len(f) == len(tensors) and all(n in f for n in tensors) and list(f) == f.keys()
        for name, t in tensors.items():
            info = f.info(name)
            assert info.shape == tuple(t.shape) and info.nbytes == t.numel() * t.element_size()
            assert info.offset % 64 == 0
            assert same_bits(f.get_tensor(name), t)
            assert torch.equal(f.get_raw(name), t.reshape(-1).view(torch.uint8))


def test_writer_checklist_from_the_bytes(tmp_apr):
    """Spec 17, checked on the raw bytes: header, CRCs, compact JSON, sorted index, alignment."""
    apr_kernels.save({"b": torch.ones(3), "a": torch.zeros(2, 2, dtype=torch.float16), "é": torch.ones(1)},
                     tmp_apr, metadata={"num_hidden_layers": 2, "architecture": "llama", "extra": [1, "x"]})
    raw = tmp_apr.read_bytes()
    magic, major, minor, flags, count, meta_off, meta_size, index_off, data_off, crc = struct.unpack_from("<4sBBHIQIQQI", raw)
    assert (magic, major, minor, flags, count, meta_off) == (b"APR\x00", 2, 0, 0x0400, 3, 64)
    assert crc == zlib.crc32(raw[:40] + raw[44:64]) and raw[44:64] == bytes(20)
    meta = raw[64:64 + meta_size].decode()
    assert meta == json.dumps(json.loads(meta), separators=(",", ":"), ensure_ascii=False)  # compact
    assert list(json.loads(meta)) == ["model_type", "license", "data_source", "data_license", "total_size",
                                      "param_count", "architecture", "num_layers", "extra"]
    assert index_off == 64 + (meta_size + 63) // 64 * 64 and index_off % 64 == 0 and data_off % 64 == 0
    pos, names = index_off, []
    for _ in range(count):
        (n,) = struct.unpack_from("<H", raw, pos)
        names.append(raw[pos + 2: pos + 2 + n])
        _code, ndim = raw[pos + 2 + n], raw[pos + 3 + n]
        off, size = struct.unpack_from("<QQ", raw, pos + 4 + n + 8 * ndim)
        assert (data_off + off) % 64 == 0
        pos += 4 + n + 8 * ndim + 16
    assert names == sorted(names) == [b"a", b"b", "é".encode()]
    assert raw[pos:data_off] == bytes(data_off - pos)
    assert len(raw) % 64 == 4 and struct.unpack("<I", raw[-4:])[0] == zlib.crc32(raw[:-4])


def test_zero_copy_views_live_inside_the_mapping(tmp_apr):
    tensors = {f"w{i}": torch.randn(17, 33).to(PLAIN[i % 4]) for i in range(12)}
    apr_kernels.save(tensors, tmp_apr)
    out = apr_kernels.load(tmp_apr)
    ranges = mapping_of(tmp_apr)
    assert ranges, "the file is not mapped"
    for t in out.values():
        start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        assert any(lo <= start and end <= hi for lo, hi in ranges)
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()  # one storage per tensor


def test_mmap_false_reads_the_file_into_private_memory(tmp_apr, monkeypatch):
    """mmap=False (network filesystems): every byte read up front by parallel preads into anonymous
    memory, so the tensors equal the mapped ones, are not views of the file, and survive the file
    being truncated afterwards (a mapping would SIGBUS there)."""
    tensors = {f"t{i}": random_tensor(torch.float32, (257, 1000 + i)) for i in range(40)}  # ~41 MB, 3 chunks
    tensors["i8"] = random_tensor(torch.int8, (5, 7))
    apr_kernels.save(tensors, tmp_apr)
    mapped = apr_kernels.load(tmp_apr)
    with apr_kernels.open(tmp_apr, mmap=False, verify=True) as f:
        got = f.tensors()
        assert got.keys() == tensors.keys()
        assert all(same_bits(got[n], t) and same_bits(mapped[n], t) for n, t in tensors.items())
        lo, hi = got["t0"].data_ptr(), got["t39"].data_ptr()
        assert not any(a <= lo < b or a <= hi < b for a, b in mapping_of(tmp_apr))  # not the file's pages
    os.truncate(tmp_apr, 100)
    assert all(same_bits(got[n], t) for n, t in tensors.items())
    got["i8"].fill_(3)  # private, writable memory
    del mapped
    # APR_KERNELS_MMAP=0 sets the default for every open (the trainer, converters, tools)
    apr_kernels.save(tensors, tmp_apr)
    monkeypatch.setenv("APR_KERNELS_MMAP", "0")
    with apr_kernels.open(tmp_apr) as f:
        assert f._reader.eager and same_bits(f.get_tensor("t1"), tensors["t1"])
        assert not mapping_of(tmp_apr)
    monkeypatch.setenv("APR_KERNELS_MMAP", "maybe")
    with pytest.raises(ValueError, match=r"APR_KERNELS_MMAP='maybe': expected 1 .* or 0"):
        apr_kernels.load(tmp_apr)


def test_in_place_writes_are_private_copy_on_write(tmp_apr):
    apr_kernels.save({"w": torch.arange(6, dtype=torch.float32)}, tmp_apr)
    before = tmp_apr.read_bytes()
    w = apr_kernels.load(tmp_apr)["w"]
    w.add_(100)  # would SIGSEGV on a PROT_READ mapping; must not reach the file
    assert w.tolist() == [100.0, 101.0, 102.0, 103.0, 104.0, 105.0]
    assert tmp_apr.read_bytes() == before
    assert apr_kernels.load(tmp_apr)["w"].tolist() == list(range(6))


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_large_sparse_file_loads_without_reading_it(tmp_apr):
    from apr_build import build

    n = 1 << 28  # 1 GiB of float32 zeros, stored as a hole
    head = build([("big", "F32", (n,), b"", n * 4)], footer=False)  # index only, data lands past EOF
    tmp_apr.write_bytes(head)
    os.truncate(tmp_apr, len(head) + n * 4)
    gc.collect()
    base = rss_bytes()
    out = apr_kernels.load(tmp_apr)
    big = out["big"]
    assert big.shape == (n,) and big[-3:].tolist() == [0.0, 0.0, 0.0]
    grown = rss_bytes() - base
    assert grown < 64 << 20, f"RSS grew by {grown >> 20} MiB for a 1 GiB file"


def test_a_mapping_beyond_the_address_space_limit_is_a_clear_error(tmp_path):
    """A file too big for the process's address-space limit (``ulimit -v``; strict overcommit acts
    alike) fails with ENOMEM naming the file, its size and the limits a private mapping counts
    against; so does a pre-tokenised shard the trainer maps (``shard_stream``). The files are a sparse
    1 GiB F32 tensor and a sparse 1 GiB shard; the limit is set 256 MiB above what the process
    already uses."""
    import subprocess
    import sys

    from apr_build import build

    path = tmp_path / "sparse.apr"
    size = 1 << 30
    head = build([("w", "F32", (size // 4,), b"", size)], footer=False)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + size + 4)  # (a hole: no disk used)
    shard = tmp_path / "ids.bin"
    with open(shard, "wb") as f:
        f.truncate(size)
    script = (
        "import resource, sys, torch, apr_kernels, apr_kernels.io\n"  # (imported before the limit)
        "from apr_kernels.train.shard_stream import map_shards\n"
        "used = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize')) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (used + (256 << 20),) * 2)\n"
        "for load in (apr_kernels.open, lambda p: map_shards([p])):\n"
        "    try:\n"
        "        load(sys.argv[1])\n"
        "    except OSError as exc:\n"
        "        print(exc.errno, exc)\n"
        "    sys.argv.pop(1)\n")
    out = subprocess.run([sys.executable, "-c", script, str(path), str(shard)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stdout
    for line, name in zip(lines, (path, shard)):
        assert line.startswith("12 [Errno 12] Cannot allocate memory mapping ") and str(name) in line
        assert "counts against the address-space limit (ulimit -v)" in line
    assert "1,073,741,824 bytes" in lines[1]


def test_tensors_outlive_close_and_the_mapping_goes_with_the_last_one(tmp_apr):
    ref = {"a": torch.randn(100), "b": torch.arange(10)}
    apr_kernels.save(ref, tmp_apr)
    gc.collect()
    start = len(mapping_of(tmp_apr))
    f = apr_kernels.open(tmp_apr)
    a = f.get_tensor("a")
    b = f.get_tensor("b")
    f.close()
    assert f.closed
    with pytest.raises(apr_kernels.AprFormatError, match="closed"):
        f.get_tensor("a")
    del f
    gc.collect()
    assert torch.equal(a, ref["a"]) and torch.equal(b, ref["b"])  # still valid after close + gc
    assert len(mapping_of(tmp_apr)) == start + 1
    del a
    gc.collect()
    assert len(mapping_of(tmp_apr)) == start + 1  # b still holds it
    assert torch.equal(b, ref["b"])
    del b
    gc.collect()
    assert len(mapping_of(tmp_apr)) == start
    # Many open/load cycles leak neither mappings nor descriptors.
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        apr_kernels.load(tmp_apr)
        with apr_kernels.open(tmp_apr) as f:
            f.get_tensor("a")
    gc.collect()
    assert len(mapping_of(tmp_apr)) == start and len(os.listdir("/proc/self/fd")) == fds


def test_save_over_a_loaded_file_is_safe(tmp_apr):
    apr_kernels.save({"w": torch.arange(4.0)}, tmp_apr)
    old = apr_kernels.load(tmp_apr)
    apr_kernels.save({"w": old["w"] * 2}, tmp_apr)  # the safetensors #762 case: rename, not rewrite
    assert old["w"].tolist() == [0.0, 1.0, 2.0, 3.0]  # the old mapping is untouched
    assert apr_kernels.load(tmp_apr, verify=True)["w"].tolist() == [0.0, 2.0, 4.0, 6.0]


def test_failed_save_leaves_nothing_behind(tmp_path):
    target = tmp_path / "m.apr"

    def boom():
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        apr_kernels.save({"a": torch.ones(3), "b": LazyTensor("F32", (3,), boom)}, target)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp file
    apr_kernels.save({"a": torch.ones(3)}, target)
    before = target.read_bytes()
    with pytest.raises(ValueError, match="declared F32 \\[3\\].*F16"):
        apr_kernels.save({"a": LazyTensor("F32", (3,), lambda: torch.ones(3, dtype=torch.float16))}, target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.apr"]
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_lazy_tensors_are_materialised_one_at_a_time(tmp_apr):
    alive: list[weakref.ref] = []
    peak = []

    def make(i):
        def materialize():  # tensors hold no cycles: refcounting frees them at once
            peak.append(sum(r() is not None for r in alive))
            t = torch.full((1000,), float(i))
            alive.append(weakref.ref(t))
            return t
        return materialize

    apr_kernels.save({f"t{i}": LazyTensor("F32", (1000,), make(i)) for i in range(6)}, tmp_apr)
    assert peak == [0] * 6  # the previous tensor was released before the next was made
    out = apr_kernels.load(tmp_apr)
    assert [out[f"t{i}"][0].item() for i in range(6)] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


def test_save_accepts_non_contiguous_and_quantised_values(tmp_apr):
    x = torch.randn(6, 4)
    q = QuantizedTensor("APR_Q8", (5,), torch.arange(9, dtype=torch.uint8))
    apr_kernels.save({"t": x.t(), "s": x[::2, 1], "q": q}, tmp_apr)
    with apr_kernels.open(tmp_apr) as f:
        assert torch.equal(f.get_tensor("t"), x.t().contiguous())
        assert torch.equal(f.get_tensor("s"), x[::2, 1].contiguous())
        assert torch.equal(f.get_raw("q"), q.data)


@pytest.mark.parametrize("tensors,error,match", [
    ({"b": torch.ones(2, dtype=torch.bool)}, ValueError, "torch.bool has no APR dtype"),
    ({"n" * 257: torch.ones(1)}, ValueError, "257 UTF-8 bytes"),
    ({"d": torch.ones([1] * 9)}, ValueError, "9 dims"),
    ({"": torch.ones(1)}, ValueError, "non-empty"),
    ({3: torch.ones(1)}, ValueError, "non-empty strings"),
    ({"x": [1.0, 2.0]}, TypeError, "got list"),
    ({"c": torch.ones(2, dtype=torch.complex64)}, ValueError, "complex64"),
])
def test_save_refuses_what_the_format_cannot_hold(tmp_path, tensors, error, match):
    with pytest.raises(error, match=match):
        apr_kernels.save(tensors, tmp_path / "x.apr")
    assert list(tmp_path.iterdir()) == []


def test_metadata_round_trip_and_canonical_keys(tmp_apr):
    meta = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "n_head": 4,
            "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tied_embeddings": True,
            "tokenizer.vocabulary": ["a", "ü", "🙂"], "nested": {"k": [1, None, 2.5]}}
    apr_kernels.save({"w": torch.ones(1)}, tmp_apr, metadata=meta)
    with apr_kernels.open(tmp_apr) as f:
        m = f.metadata
        assert "num_hidden_layers" not in m and m["num_layers"] == 2 and m["num_heads"] == 4
        assert m["tokenizer.vocabulary"] == ["a", "ü", "🙂"] and m["nested"] == {"k": [1, None, 2.5]}
        assert m["license"] is None and m["param_count"] == 1 and m["total_size"] == 4
        cfg = f.config
    assert cfg == AprModelConfig(model_type="llama", hidden_size=64, num_layers=2, num_heads=4,
                                 rope_theta=10000.0, rms_norm_eps=1e-6, tied_embeddings=True)
    assert AprModelConfig.from_metadata(cfg.to_metadata()) == cfg
    with pytest.raises(ValueError, match="alias of 'num_layers'"):
        apr_kernels.save({"w": torch.ones(1)}, tmp_apr, metadata={"num_layers": 2, "n_layers": 3})
    with pytest.raises(ValueError, match="Out of range float values"):
        apr_kernels.save({"w": torch.ones(1)}, tmp_apr, metadata={"x": float("nan")})


def test_config_reads_aliases_and_checks_types():
    cfg = AprModelConfig.from_metadata({"num_attention_heads": 8, "num_key_value_heads": 2, "n_embd": 512,
                                        "context_length": 4096.0, "norm_eps": 1e-5, "architecture": "qwen2"})
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size, cfg.max_position_embeddings) == (8, 2, 512, 4096)
    assert cfg.rms_norm_eps == 1e-5 and cfg.vocab_size is None
    assert cfg.to_metadata() == {"architecture": "qwen2", "hidden_size": 512, "num_heads": 8, "num_kv_heads": 2,
                                 "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
    with pytest.raises(apr_kernels.AprFormatError, match="disagree"):
        AprModelConfig.from_metadata({"num_layers": 2, "n_layers": 3}, path="m.apr")
    with pytest.raises(apr_kernels.AprFormatError, match="'num_heads' is True"):
        AprModelConfig.from_metadata({"num_heads": True})


def test_cuda_without_a_gpu_is_a_clear_error(tmp_apr):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    apr_kernels.save({"w": torch.ones(2)}, tmp_apr)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        apr_kernels.load(tmp_apr, device="cuda")
    with apr_kernels.open(tmp_apr) as f, pytest.raises(RuntimeError, match="CUDA is not available"):
        f.get_tensor("w", device="cuda:0")


def test_hf_llama_loads_the_state_dict(tmp_apr):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    src = transformers.LlamaForCausalLM(cfg).eval()
    apr_kernels.save(src.state_dict(), tmp_apr, metadata={"architecture": "llama", "hidden_size": 32})
    dst = transformers.LlamaForCausalLM(cfg).eval()
    missing, unexpected = dst.load_state_dict(apr_kernels.load(tmp_apr), strict=True)
    assert not missing and not unexpected
    ids = torch.randint(0, 96, (2, 11))
    with torch.no_grad():
        assert torch.equal(dst(ids).logits, src(ids).logits)


# -- CUDA (run by bench/gpu_check.sh on a lent GPU) -------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("chunk", [4096, 1 << 20, 32 << 20])
def test_cuda_load_matches_cpu(tmp_apr, chunk, monkeypatch):
    from apr_kernels import _cuda_load
    from apr_kernels.quant import quantize

    monkeypatch.setattr(_cuda_load, "CHUNK_BYTES", chunk)
    tensors = {f"p{i}": random_tensor(d, (37, 129)) for i, d in enumerate(PLAIN)}
    tensors.update(big=torch.randn(3, 1 << 20), empty=torch.ones(0, 3), scalar=torch.tensor(2.5),
                   q=quantize("Q4_K", torch.randn(5, 300)))
    apr_kernels.save(tensors, tmp_apr)
    cpu = apr_kernels.load(tmp_apr)
    gpu = apr_kernels.load(tmp_apr, device="cuda")
    assert list(gpu) == list(cpu)
    for name, t in cpu.items():
        assert gpu[name].is_cuda and same_bits(gpu[name].cpu(), t), name
    with apr_kernels.open(tmp_apr) as f:
        one = f.get_tensor("p2", device="cuda", dtype=torch.float32)
        assert one.is_cuda and same_bits(one.cpu(), cpu["p2"].float())  # NaN != NaN: compare bits


def test_crc32_matches_zlib_on_every_path():
    from apr_kernels import _apr_ext

    data = os.urandom(5000)
    for n in [0, 1, 15, 16, 63, 64, 65, 127, 128, 1000, 4999]:
        for start in (0, 1, 7):  # unaligned starts reach the slice-by-8 head loop
            chunk = data[start:start + n]
            for init in (0, 0xDEADBEEF):
                assert _apr_ext.crc32(chunk, init) == zlib.crc32(chunk, init)
                assert _apr_ext.crc32_slice8(chunk, init) == zlib.crc32(chunk, init)
    assert _apr_ext.crc32(b"123456789") == 0xCBF43926  # the spec's check value (11.1)


def test_verify_racing_close_never_crashes(tmp_apr):
    import threading

    apr_kernels.save({"w": torch.randn(1 << 20)}, tmp_apr)
    for _ in range(5):
        f = apr_kernels.open(tmp_apr)
        errors = []

        def verify():
            try:
                f.verify()
            except apr_kernels.AprFormatError as exc:  # "closed" is the only acceptable failure
                errors.append(str(exc))

        th = threading.Thread(target=verify)
        th.start()
        f.close()
        th.join()
        assert all("closed" in e for e in errors)


@pytest.mark.parametrize("cap", [100, 4096, 1 << 20])
def test_gpu_staging_plan_reassembles_every_tensor(tmp_apr, cap):
    """The chunking and pread logic of the CUDA path, executed with CPU buffers."""
    from concurrent.futures import ThreadPoolExecutor

    from apr_kernels._cuda_load import plan_chunks, read_into

    shapes = [(3, 7), (0,), (), (300,), (5, 5, 5), (400_000,)]  # the last one splits across threads
    tensors = {f"t{i}": random_tensor(PLAIN[i % len(PLAIN)], s) for i, s in enumerate(shapes)}
    apr_kernels.save(tensors, tmp_apr)
    with apr_kernels.open(tmp_apr) as f:
        infos = sorted((f.info(n) for n in f.keys()), key=lambda i: i.offset)
    pieces = [(i.offset, i.nbytes) for i in infos]
    chunks = plan_chunks(pieces, cap)
    assert all(sum(n for *_, n in c) <= cap for c in chunks)
    out = [bytearray(n) for _, n in pieces]
    buf = bytearray(cap)
    fd = os.open(tmp_apr, os.O_RDONLY)
    pool = ThreadPoolExecutor(3) if cap >= 1 << 20 else None
    try:
        for chunk in chunks:
            buf[:] = b"\xAA" * cap  # poison: stale bytes would show
            read_into(fd, str(tmp_apr), memoryview(buf), [(b, fo, n) for _, _, b, fo, n in chunk], pool)
            for idx, pos, b, _fo, n in chunk:
                out[idx][pos: pos + n] = buf[b: b + n]
    finally:
        os.close(fd)
        if pool:
            pool.shutdown()
    for info, got in zip(infos, out):
        assert bytes(got) == bytes(tensors[info.name].reshape(-1).view(torch.uint8).numpy()), info.name


def test_safe_open_code_runs_unchanged(tmp_path):
    """A script written for safetensors' safe_open (framework/device arguments, metadata(), get_slice
    with get_shape/get_dtype/indexing) gives the same results on an APR file of the same tensors."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open

    tensors = {"w": torch.randn(6, 10), "b": torch.randn(10).to(torch.bfloat16),
               "ids": torch.arange(24, dtype=torch.int64).reshape(2, 3, 4)}
    st_path, apr_path = tmp_path / "m.safetensors", tmp_path / "m.apr"
    safetensors_torch.save_file(tensors, str(st_path), metadata={"format": "pt"})
    apr_kernels.save(tensors, apr_path, metadata={"format": "pt"})

    def script(opener, path):
        out = {}
        with opener(str(path), framework="pt", device="cpu") as f:
            out["format"] = f.metadata()["format"]
            for name in sorted(f.keys()):
                s = f.get_slice(name)
                out[name] = (f.get_tensor(name), s.get_shape(), s.get_dtype(), s[1:2], s[:, 1:3] if
                             len(s.get_shape()) > 1 else s[2:7])
        return out

    want, got = script(safe_open, st_path), script(apr_kernels.open, apr_path)
    assert got["format"] == want["format"] == "pt"
    for name in tensors:
        for a, b in zip(got[name], want[name]):
            if isinstance(a, torch.Tensor):
                assert a.dtype == b.dtype and torch.equal(a, b), name
            else:
                assert a == b, name
    with apr_kernels.open(apr_path) as f:  # the slice is a view of the mapping, not a copy
        assert f.get_slice("w")[2:4].data_ptr() == f.get_tensor("w")[2].data_ptr()
    with pytest.raises(ValueError, match=r"m\.apr.*framework='np' is not supported; expected 'pt'"):
        apr_kernels.open(apr_path, framework="np")


def test_lazy_tensor_chunks_are_written_piece_by_piece(tmp_path):
    """A LazyTensor with chunks(): the same file as the whole tensor, without materialize(); a
    wrong byte count is refused and leaves no file."""
    t = torch.arange(1000, dtype=torch.int32)
    whole, pieces, bad = tmp_path / "whole.apr", tmp_path / "pieces.apr", tmp_path / "bad.apr"
    apr_kernels.save({"t": t}, whole, metadata={"k": 1})

    def never():
        raise AssertionError("materialize() called although chunks() was given")

    raw = t.numpy().tobytes()
    apr_kernels.save({"t": LazyTensor("I32", (1000,), never, lambda: (raw[i:i + 333] for i in range(0, 4000, 333)))},
                     pieces, metadata={"k": 1})
    assert pieces.read_bytes() == whole.read_bytes()
    with pytest.raises(ValueError, match=r"'t': chunks\(\) gave 3996 bytes, expected 4000"):
        apr_kernels.save({"t": LazyTensor("I32", (1000,), never, lambda: [raw[:3996]])}, bad)
    assert not bad.exists() and not list(tmp_path.glob(".bad.apr.*"))


def test_bytes_round_trip_like_safetensors_save_and_load(tmp_apr):
    """save_bytes / load_bytes (safetensors.torch.save / load): the bytes are exactly the file save
    writes, load_bytes gives the same tensors through the same validation, and a damaged buffer is an
    AprFormatError naming <bytes>."""
    tensors = {f"{str(d)[6:]}": random_tensor(d, (3, 5)) for d in PLAIN}
    from apr_kernels.quant import quantize

    tensors["q"] = quantize("Q4_K", torch.randn(2, 256))
    meta = {"model_type": "llama", "note": "bytes"}
    data = apr_kernels.save_bytes(tensors, metadata=meta)
    apr_kernels.save(tensors, tmp_apr, metadata=meta)
    assert isinstance(data, bytes) and data == tmp_apr.read_bytes()
    got = apr_kernels.load_bytes(data, verify=True)
    want = apr_kernels.load(tmp_apr)
    assert got.keys() == want.keys()
    assert all(same_bits(got[n], want[n]) for n in want)
    assert apr_kernels.load_bytes(bytearray(data))["int8"].data_ptr() != 0  # any bytes-like object

    class Stream:  # a file object that only reads, a few bytes at a time (a pipe, an HTTP body)
        def __init__(self, raw):
            self.raw, self.at = raw, 0

        def read(self, n=-1):
            n = min(n, 1000)
            self.at += n
            return self.raw[self.at - n:self.at]

    for stream in (Stream(data), io.BytesIO(data)):
        got = apr_kernels.load_bytes(stream, verify=True)
        assert got.keys() == want.keys() and all(same_bits(got[n], want[n]) for n in want)
    with pytest.raises(TypeError, match=r"the file object gave str; expected bytes \(open it in binary mode\)"):
        apr_kernels.load_bytes(io.StringIO("APR"))
    with pytest.raises(apr_kernels.AprFormatError, match=r"^<bytes>: .*shorter than the 64-byte"):
        apr_kernels.load_bytes(io.BytesIO(data[:10]))
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0xFF  # a flipped data byte: only the footer CRC can tell
    with pytest.raises(apr_kernels.AprFormatError, match=r"^<bytes>: footer CRC mismatch"):
        apr_kernels.load_bytes(bytes(bad), verify=True)
    with pytest.raises(apr_kernels.AprFormatError, match=r"^<bytes>: .*shorter than the 64-byte"):
        apr_kernels.load_bytes(data[:10])
