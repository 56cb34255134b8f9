"""Fuzz harness for the APR reader: random damage to valid files must raise AprFormatError or
load; anything else (another exception, a crash, a hang) is a bug.

CI runs a bounded number of iterations through test_format_errors.py. By hand:

    python tests/fuzz_apr.py --iterations 200000 --seed 7     # random-mutation loop
    python tests/fuzz_apr.py --atheris                         # coverage-guided, if atheris is installed
"""

from __future__ import annotations

import argparse
import json
import os
import random
import struct
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import apr_kernels  # noqa: E402
from apr_build import build, f32, patch_header  # noqa: E402
from apr_kernels.errors import AprFormatError  # noqa: E402

INTERESTING = [0, 1, 2, 63, 64, 65, 255, 256, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1]


def seeds() -> list[bytes]:
    q4 = bytes(18 * 2)
    return [
        build([("a", "F32", (2,), f32(1, 2)), ("b", "F32", (3,), f32(3, 4, 5))]),
        build([("w", "BF16", (2, 3), bytes(range(12))), ("s", "I8", (), b"\x05"), ("e", "F32", (0, 4), b""),
               ("q", "APR_Q4", (40,), q4), ("k", "Q4_K", (1, 256), bytes(144))],
              meta={"model_type": "llama", "hidden_size": 4, "num_heads": 2}),
        build([("z", "I64", (1,), struct.pack("<q", -1))], sort=False, footer=False, pad_index=False),
    ]


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        if op < 0.35 and b:  # flip a bit
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op < 0.55 and b:  # random byte
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op < 0.75 and len(b) >= 8:  # an interesting integer at a random place
            i = rng.randrange(len(b) - 7)
            fmt = rng.choice("BHIQ")
            v = rng.choice(INTERESTING) % (1 << (8 * struct.calcsize(fmt)))
            struct.pack_into("<" + fmt, b, i, v)
        elif op < 0.85:  # truncate
            b = b[: rng.randrange(len(b) + 1)]
        elif op < 0.95:  # a header field set to an interesting value
            field = rng.choice(["tensor_count", "metadata_size", "tensor_index_offset", "data_offset"])
            v = rng.choice(INTERESTING + [len(b), len(b) - 4, len(b) + 1])
            if field in ("tensor_count", "metadata_size"):
                v %= 2**32
            b = bytearray(patch_header(bytes(b), **{field: v % 2**64})) if len(b) >= 64 else b
        else:  # append junk
            b += os.urandom(rng.randrange(1, 100))
    if len(b) >= 64 and rng.random() < 0.7:  # re-seal the header CRC to get past that check
        struct.pack_into("<I", b, 40, zlib.crc32(bytes(b[:40] + b[44:64])))
    return bytes(b)


# Bytes per element, or (elements per block, bytes per block[, bytes before the blocks]), by dtype.
SIZES = {"F32": 4, "F16": 2, "F64": 8, "I32": 4, "I64": 8, "I8": 1, "U8": 1, "BF16": 2,
         "Q4_K": (256, 144), "Q6_K": (256, 210), "APR_Q4": (32, 18), "APR_Q8": (1, 1, 4)}
KEY_VALUES = [0, 1, -1, 7, 2**31, 2**63, 1e308, 0.5, float("nan"), "", "llama", "qwen2", None, True, [], {},
              [1, 2], {"type": "yarn"}]  # right and wrong types for the typed keys
FLOAT_KEYS = ("rope_theta", "rms_norm_eps")
STRING_KEYS = ("model_type", "name", "description", "author", "license", "data_source", "data_license", "version",
               "source", "original_format", "created_at", "quantization", "chat_template", "chat_format",
               "architecture", "hf_architecture", "hf_model_type")


def key_value(rng: random.Random, key: str):
    """Mostly a value of ``key``'s type (spec section 5.2), else any of ``KEY_VALUES``."""
    if rng.random() < 0.2:
        return rng.choice(KEY_VALUES)
    if key in STRING_KEYS:
        return rng.choice(["llama", "qwen2", "mistral", "", "x" * rng.randrange(300)])
    if key in FLOAT_KEYS:
        return rng.choice([1e-6, 10000.0, 0.0, 1e308])
    if key in ("tied_embeddings", "special_tokens", "sharding"):
        return rng.choice([True, False]) if key == "tied_embeddings" else {}
    if key == "rope_scaling":
        return rng.choice([{"rope_type": "linear", "factor": 2.0}, {"type": "yarn", "factor": 4.0}, {}])
    if key == "mlp_only_layers":
        return [rng.randrange(4) for _ in range(rng.randrange(3))]
    return rng.choice([0, 1, 2, 4, 64, 2**31, 2**63])  # the integer keys


def nbytes(dtype: str, shape) -> int:
    n = 1
    for d in shape:
        n *= d
    size = SIZES[dtype]
    if isinstance(size, int):
        return n * size
    per, block, head = (*size, 0)[:3]
    return head + -(-n // per) * block


def structured(rng: random.Random) -> bytes:
    """A file laid out by ``apr_build.build`` from random tensors (every dtype, up to 4 dims, names
    of a model's) and metadata (the typed keys with values of the right type or not), then in half of
    them one rule broken (a field of an index entry, a name, the order, padding, flags, the footer)
    and sometimes random byte damage: past the header and index checks that stop most of ``mutate``'s
    files, into the per-tensor checks, the metadata's typed keys and the tensors' bytes."""
    from apr_kernels.metadata import TYPED_KEY_ORDER

    broken = rng.random() < 0.5 and rng.choice(["dtype", "ndim", "dim", "size", "name", "order", "padding", "flags",
                                                 "footer"])
    tensors = []
    for i in range(rng.randrange(6)):
        dtype = rng.choice(sorted(SIZES))
        shape = [rng.randrange(1, 9) for _ in range(rng.choice([0, 1, 2, 2, 3, 4]))]
        if dtype in ("Q4_K", "Q6_K"):  # (rows of whole 256-value super-blocks)
            shape = [*shape[:-1], 256 * rng.randrange(1, 3)]
        data = rng.randbytes(nbytes(dtype, shape)) if rng.random() < 0.5 else bytes(nbytes(dtype, shape))
        name = rng.choice([f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.mlp.up_proj.weight",
                           f"t{i}", "model.embed_tokens.weight" if i == 0 else f"model.norm.{i}.weight"])
        tensors.append([name, dtype, shape, data])
    if tensors and broken in ("dtype", "ndim", "dim", "size", "name"):
        t = rng.choice(tensors)
        if broken == "dtype":
            t[1] = rng.choice([2, 13, 31, 127, 130, 255])
        elif broken == "ndim":
            t[2] = [1] * rng.choice([9, 64, 255])
        elif broken == "dim":
            t[2] = [*t[2], rng.choice([0, 2**31, 2**32, 2**62, 2**64 - 1])]
        elif broken == "size":
            t.append(rng.choice([0, len(t[3]) + 1, max(0, len(t[3]) - 1), 2**63, 2**64 - 1]))
        else:
            t[0] = rng.choice(["", "a" * 257, b"x\xffy", tensors[0][0]])
    keys = rng.sample(TYPED_KEY_ORDER, rng.randrange(8))
    keys += rng.sample(["tied_embeddings", "rope_scaling", "sliding_window", "num_labels", "mlp_only_layers"],
                       rng.randrange(3))
    meta = {k: key_value(rng, k) for k in keys}
    try:
        data = build([tuple(t) for t in tensors], json.dumps(meta).encode(), sort=broken != "order",
                     pad_index=broken != "padding", footer=broken != "footer",
                     flags=rng.randrange(1 << 16) if broken == "flags" else 0x0400)
    except (struct.error, OverflowError):  # (a dimension or size past u64)
        data = build([])
    return mutate(rng, data) if rng.random() < 0.2 else data


def check(path: str) -> str:
    """'loaded' or 'refused'; any other exception propagates (a bug)."""
    try:
        with apr_kernels.open(path, verify=False) as f:
            for name in f.keys():
                f.get_tensor(name).float().sum()
            f.metadata
            f.config
        apr_kernels.load(path, verify=True, mmap=False)  # read into memory, CRC from memory
        return "loaded"
    except AprFormatError as exc:
        if path not in str(exc):
            raise AssertionError(f"message does not name the file: {exc}") from None
        return "refused"


def run(iterations: int = 1000, seed: int = 0, time_limit: float | None = None) -> dict:
    """Half the files damaged seeds (``mutate``), half ``structured``; counts of each outcome, the
    structured files' apart (``structured_loaded`` / ``structured_refused``)."""
    rng = random.Random(seed)
    base = seeds()
    stats = {"iterations": 0, "loaded": 0, "refused": 0, "structured_loaded": 0, "structured_refused": 0}
    fd, path = tempfile.mkstemp(suffix=".apr")
    os.close(fd)
    start = time.monotonic()
    try:
        for _ in range(iterations):
            kind = rng.choice(["", "structured_"])
            data = structured(rng) if kind else mutate(rng, rng.choice(base))
            with open(path, "wb") as fh:
                fh.write(data)
            try:
                stats[kind + check(path)] += 1
            except Exception:
                keep = path + ".crash"
                with open(keep, "wb") as fh:
                    fh.write(data)
                print(f"fuzz: unexpected exception; input saved to {keep}", file=sys.stderr)
                raise
            stats["iterations"] += 1
            if time_limit and time.monotonic() - start > time_limit:
                break
    finally:
        os.unlink(path)
    return stats


def run_atheris() -> None:  # pragma: no cover - manual tool
    import atheris

    fd, path = tempfile.mkstemp(suffix=".apr")
    os.close(fd)

    def one(data: bytes) -> None:
        with open(path, "wb") as fh:
            fh.write(data)
        check(path)

    for i, s in enumerate(seeds()):  # atheris takes a corpus folder; write the seeds there
        os.makedirs("fuzz_corpus", exist_ok=True)
        with open(f"fuzz_corpus/seed{i}.apr", "wb") as fh:
            fh.write(s)
    atheris.Setup([sys.argv[0], "fuzz_corpus"], one)
    atheris.Fuzz()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--atheris", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.atheris:
        run_atheris()
    else:
        print(run(a.iterations, a.seed, a.time))
