"""Small `train` runs for the CLI tests of training options (float8, QAT): a model whose projections
are all float8- and block-friendly, the command line, and its JSON records."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAIN = [str(STDLIB / "json"), str(STDLIB / "textwrap.py")]
HELD = str(STDLIB / "shlex.py")


def sixteen_config(**kw):
    """A 2-layer Qwen2 whose every dimension is a multiple of 16 (float8 GEMMs) and whose rows of 64
    and 96 values hold whole APR_Q4 blocks of 32; the byte tokenizer's vocabulary."""
    from apr_kernels.model import ModelConfig

    base = dict(architecture="qwen2", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                intermediate_size=96, vocab_size=272, max_position_embeddings=256, rope_theta=1e4,
                rms_norm_eps=1e-6, attention_bias=True, tie_word_embeddings=True)
    return ModelConfig(**{**base, **kw})


def train_args(init: Path, out: Path, *extra: str) -> list[str]:
    """``train`` on ``init`` for 4 steps of 4 rows x 32 tokens, checkpoints at 2 and 4, JSON records;
    ``extra`` last (a repeated option takes its last value)."""
    return ["train", "--init", str(init), "--tokenizer", "bytes", "--data", *TRAIN, "--eval-data", HELD,
            "--max-tokens", "20000", "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3",
            "--eval-tokens", "160", "--save-every", "2", "--json", "--seed", "5", "--no-progress", "--fast", "off",
            "--dist-timeout", "60", "--out", str(out), *extra]


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def losses(text: str, event: str = "train", key: str = "loss") -> list[float]:
    return [r[key] for r in records(text) if r["event"] == event]


def sixteen_init(path: Path, seed: int = 3, **kw) -> Path:
    """``path``: an APR file of a ``sixteen_config(**kw)`` model with weights drawn from ``seed``."""
    import torch

    from apr_kernels.model import Transformer
    from apr_kernels.train.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    save_checkpoint(path, model=Transformer(sixteen_config(**kw), fast=False))
    return path
