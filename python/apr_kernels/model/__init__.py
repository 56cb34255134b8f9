"""Llama/Qwen2 decoder-only models: configs as data, a PyTorch transformer with Hugging Face parameter
names, and ``from_apr`` (initialise from an APR v2 file, with preflight checks)."""

from .config import DEFAULT_PRESET, PRESETS, ModelConfig, pad_vocab, preset
from .documents import Documents
from .transformer import Transformer

__all__ = ["DEFAULT_PRESET", "PRESETS", "Documents", "ModelConfig", "Transformer", "from_apr", "pad_vocab",
           "preset"]


def __getattr__(name):
    # from_apr needs the loader (C++ extension); import it only when asked for
    if name in ("from_apr", "preflight", "PreflightError"):
        from . import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'apr_kernels.model' has no attribute {name!r}")
