"""`apr-kernels inspect` and `validate`: tables and totals checked against hand-computed sizes,
one line per problem for corrupted files."""

import json
import math
import subprocess
import sys

import pytest
import torch

import apr_kernels
from apr_kernels.cli import main
from apr_kernels.quant import quantize
from apr_kernels.tokenizer import byte_to_unicode


def _bytes_of(dtype: str, shape) -> int:  # spec 7.1, written out independently of _format.nbytes_for
    n = math.prod(shape)
    per = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4}
    if dtype in per:
        return n * per[dtype]
    if dtype == "APR_Q8":
        return 4 + n
    if dtype == "Q4_K":
        return math.prod(shape[:-1]) * -(-shape[-1] // 256) * 144
    raise AssertionError(dtype)


@pytest.fixture
def sample(tmp_path):
    tensors = {
        "model.embed_tokens.weight": torch.randn(37, 24),
        "model.norm.weight": torch.randn(24).half(),
        "model.layers.0.mlp.up_proj.weight": quantize("Q4_K", torch.randn(5, 300)),
        "model.layers.0.mlp.down_proj.weight": quantize("APR_Q8", torch.randn(24, 40)),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(24, 24).bfloat16(),
        "extra.ids": torch.arange(7, dtype=torch.int32),
    }
    b2u = byte_to_unicode()
    meta = {"architecture": "llama", "hidden_size": 24, "num_layers": 1, "num_heads": 4, "vocab_size": 37,
            "tokenizer.vocabulary": [b2u[b] for b in range(256)] + ["ab"], "tokenizer.merges": ["a b"],
            "tokenizer.model_type": "bpe"}
    path = tmp_path / "s.apr"
    apr_kernels.save(tensors, path, metadata=meta)
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    dtypes = {n: (t.dtype if isinstance(t, apr_kernels.io.QuantizedTensor) else
                  {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32"}[t.dtype])
              for n, t in tensors.items()}
    return path, shapes, dtypes, meta


def test_inspect_text_and_json(sample, capsys):
    path, shapes, dtypes, meta = sample
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    for name, shape in shapes.items():
        row = next(line for line in text.splitlines() if line.split()[:1] == [name])
        assert dtypes[name] in row.split() and "[" + ", ".join(map(str, shape)) + "]" in row
        assert f"{_bytes_of(dtypes[name], shape):,}" in row
    assert "LAYOUT_ROW_MAJOR" in text and "architecture: llama" in text
    assert "[257 items:" in text  # the vocabulary is summarised, not dumped

    assert main(["inspect", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["header"]["magic"] == "APR\x00" and d["header"]["version"] == [2, 0]
    assert "LAYOUT_ROW_MAJOR" in d["header"]["flag_names"] and d["header"]["tensor_count"] == len(shapes)
    assert d["metadata"]["tokenizer.vocabulary"] == meta["tokenizer.vocabulary"]
    assert d["config"]["num_heads"] == 4
    table = {t["name"]: t for t in d["tensors"]}
    assert {n: (t["dtype"], tuple(t["shape"])) for n, t in table.items()} == {n: (dtypes[n], shapes[n]) for n in shapes}
    for dtype in set(dtypes.values()):
        names = [n for n in shapes if dtypes[n] == dtype]
        assert d["totals"][dtype] == {"count": len(names), "bytes": sum(_bytes_of(dtype, shapes[n]) for n in names),
                                      "elements": sum(math.prod(shapes[n]) for n in names)}
    offsets = sorted(t["offset"] for t in d["tensors"])
    assert all(o % 64 == 0 for o in offsets)


def test_validate_sound_file(sample, capsys):
    path = sample[0]
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"{path}: OK"


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def test_validate_reports_each_problem(sample, tmp_path, capsys):
    path = sample[0]
    with apr_kernels.open(path) as f:
        info = f.info("model.embed_tokens.weight")
    _flip(path, info.offset)  # a low mantissa byte: only the footer CRC can notice
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "footer CRC" in out[0] and str(path) in out[0]

    nan = tmp_path / "nan.apr"
    w = torch.randn(6, 5)
    w[2, 3] = float("nan")
    w[4, 0] = float("inf")
    b2u = byte_to_unicode()
    apr_kernels.save({"a.weight": w, "b.weight": torch.ones(3)}, nan,
                     metadata={"tokenizer.vocabulary": [b2u[b] for b in range(256)], "tokenizer.merges": ["a q\u4e00"]})
    _flip(nan, nan.stat().st_size - 1)  # footer byte
    assert main(["validate", str(nan)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 3, out
    assert any("footer CRC" in line for line in out)
    assert any("'a.weight'" in line and "2 NaN/Inf" in line for line in out)
    assert any("tokenizer.merges" in line for line in out)


@pytest.mark.parametrize("damage", ["header", "truncate", "not_apr"])
def test_validate_and_inspect_broken_structure(sample, capsys, damage):
    path = sample[0]
    if damage == "header":
        _flip(path, 20)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-300])
    else:
        path.write_bytes(b"PK\x03\x04 definitely not an APR file" * 3)
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and str(path) in out[0], out
    assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0]


def test_python_m_entry_point(sample):
    r = subprocess.run([sys.executable, "-m", "apr_kernels", "validate", str(sample[0])],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr


def test_output_cut_short_by_its_reader_ends_quietly(tmp_path):
    """`apr-kernels inspect FILE | head -1`: the closed pipe stops the command without an error line
    (exit 141, 128 + SIGPIPE, as a tool killed by it). 4000 tensors: a listing larger than a pipe holds."""
    path = tmp_path / "many.apr"
    apr_kernels.save({f"t.{i}.weight": torch.zeros(1) for i in range(4000)}, path)
    proc = subprocess.Popen([sys.executable, "-m", "apr_kernels", "inspect", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    proc.stdout.close()  # the reader leaves before the listing is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and first.strip() == str(path).encode(), err
    assert "error" not in err and "Traceback" not in err, err


def test_group_folds_layers_and_experts_into_patterns(tmp_path, capsys):
    """inspect --group: one row per name pattern, dtype and shape, numbers folded into ranges (or lists),
    with the count and the bytes of all; a differing shape keeps its own row."""
    tensors = {f"model.layers.{n}.mlp.experts.{e}.up_proj.weight": torch.zeros(4, 8)
               for n in range(3) for e in range(5)}
    tensors.update({f"model.layers.{n}.input_layernorm.weight": torch.zeros(8) for n in (0, 2)})
    tensors["model.layers.1.input_layernorm.weight"] = torch.zeros(8, dtype=torch.float16)
    tensors["model.norm.weight"] = torch.zeros(8)
    path = tmp_path / "moe.apr"
    apr_kernels.save(tensors, path)
    assert main(["inspect", str(path), "--group"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("  model.")}
    assert rows["model.layers.{0..2}.mlp.experts.{0..4}.up_proj.weight"][1:] == ["F32", "[4,", "8]", "1,920", "15"]
    assert rows["model.layers.{0,2}.input_layernorm.weight"][1:] == ["F32", "[8]", "64", "2"]
    assert rows["model.layers.1.input_layernorm.weight"][1:] == ["F16", "[8]", "16", "1"]
    assert rows["model.norm.weight"][-1] == "1" and len(rows) == 4


def test_validate_checks_aprenders_writer_checklist(tmp_path, capsys):
    """Beyond what the reader refuses: the layout flag, 64-byte tensor alignment (spec 9, 17), the
    metadata `apr run` needs of a language model (spec 5.6) and aprender's |mean| <= 100 rule, one
    line each, every line naming the file."""
    from apr_build import build

    up = torch.randn(4, 8)
    bad = tmp_path / "bad.apr"  # realizar's writer: flags 0, the index unpadded; no model keys
    bad.write_bytes(build([("model.layers.0.mlp.up_proj.weight", "F32", (4, 8), up.numpy().tobytes())],
                          {"model_type": "t", "hidden_size": 8}, flags=0, pad_index=False))
    assert main(["validate", str(bad)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 3 and all(line.startswith(f"{bad}: ") for line in out), out
    assert "flag LAYOUT_ROW_MAJOR (0x0400) is not set" in out[0]
    assert "1 tensor(s) start off a 64-byte boundary of the file ('model.layers.0.mlp.up_proj.weight')" in out[1]
    assert ("a language model whose metadata lacks architecture, num_layers, num_heads, vocab_size, "
            "tokenizer.vocabulary (an embedded tokenizer); expected every key `apr run` needs") in out[2]
    codes = tmp_path / "codes.apr"  # a model's weights in I32 (code 4) and in the legacy APR_Q4 code 8
    codes.write_bytes(build([("model.layers.0.mlp.up_proj.weight", 4, (4, 8), bytes(128)),
                             ("model.layers.0.mlp.down_proj.weight", 8, (8, 32), bytes(8 * 18)),
                             ("__training__.step", 4, (1,), bytes(4))], {"model_type": "t"}))
    assert main(["validate", str(codes)]) == 1
    out = capsys.readouterr().out
    assert ("tensor 'model.layers.0.mlp.up_proj.weight' has dtype code 4 (I32), which realizar reads as F32 (an "
            "unknown GGML id); expected a model weight in codes 0, 1, 12, 14, 30, 128 or 129") in out
    assert ("tensor 'model.layers.0.mlp.down_proj.weight' has the legacy dtype code 8 (APR_Q4); expected 128"
            in out)
    assert "__training__" not in out  # (a checkpoint's training state is no model weight)
    huge = tmp_path / "huge.apr"
    huge.write_bytes(build([("a.weight", "F32", (3,), torch.tensor([300.0, 200.0, 100.0]).numpy().tobytes())]))
    assert main(["validate", str(huge)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"{huge}: tensor 'a.weight' (F32 [3]) has mean 200 (expected |mean| <= 100, as aprender's "
                   "validate_tensor_values)"]
