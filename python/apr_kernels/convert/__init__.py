"""Converters: Hugging Face folder / .safetensors / .gguf -> APR (``convert``), APR -> Hugging Face
folder (``export``), and the ``inspect`` / ``validate`` tools behind the command line."""

from .core import convert
from .export import export
from .inspect import describe, validate

__all__ = ["convert", "export", "describe", "validate"]
