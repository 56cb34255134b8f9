"""Fuzz harness for the APR reader: random damage to valid files must raise AprFormatError or
load; anything else (another exception, a crash, a hang) is a bug.

CI runs a bounded number of iterations through test_format_errors.py. By hand:

    python tests/fuzz_apr.py --iterations 200000 --seed 7     # random-mutation loop
    python tests/fuzz_apr.py --atheris                         # coverage-guided, if atheris is installed
"""

from __future__ import annotations

import argparse
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
    rng = random.Random(seed)
    base = seeds()
    stats = {"iterations": 0, "loaded": 0, "refused": 0}
    fd, path = tempfile.mkstemp(suffix=".apr")
    os.close(fd)
    start = time.monotonic()
    try:
        for _ in range(iterations):
            data = mutate(rng, rng.choice(base))
            with open(path, "wb") as fh:
                fh.write(data)
            try:
                stats[check(path)] += 1
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
