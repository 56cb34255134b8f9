"""apr-kernels: train Llama/Qwen2 models from APR v2 files.

Public surface (imported lazily, so ``import apr_kernels`` stays cheap and never touches a GPU):

* Loader: ``load``, ``open``, ``save``, ``load_bytes``, ``save_bytes``, ``AprFile``, ``AprFormatError``.
* Ops (torch custom ops with autograd): ``rms_norm``, ``add_rms_norm``, ``attention``,
  ``swiglu``, ``rope``, ``grouped_mm``, ``linear_cross_entropy``, ``linear_distillation``.
* Modules: ``RMSNorm``, ``Attention``, ``SwiGLUMLP``, ``LinearCrossEntropyLoss``,
  ``LinearDistillationLoss`` (in ``apr_kernels.nn``).
* Hugging Face models: ``patch_hf_model(model)`` puts the kernels into a transformers Llama/Qwen2-family
  model (``apr_kernels.patch_hf``).
* Trainer: ``apr_kernels.model`` (``from_apr``), ``apr_kernels.train``; command line ``apr-kernels``.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# APR_KERNELS_BACKEND=triton without a GPU runs the kernels in Triton's interpreter, which must be
# switched on before anything imports Triton. Cheap: only reads the environment unless forced.
if __import__("os").environ.get("APR_KERNELS_BACKEND", "").strip().lower() == "triton":
    from apr_kernels.backend import prepare_interpreter_early

    prepare_interpreter_early()

# public name -> submodule that defines it
_API = {
    "load": "io",
    "open": "io",
    "save": "io",
    "load_bytes": "io",
    "save_bytes": "io",
    "AprFile": "io",
    "TensorInfo": "io",
    "QuantizedTensor": "io",
    "LazyTensor": "io",
    "AprFormatError": "errors",
    "rms_norm": "ops.rms_norm",
    "add_rms_norm": "ops.rms_norm",
    "attention": "ops.attention",
    "linear_cross_entropy": "ops.cross_entropy",
    "linear_distillation": "ops.distillation",
    "swiglu": "ops.swiglu",
    "rope": "ops.rope",
    "grouped_mm": "ops.grouped_mm",
    "RMSNorm": "nn",
    "Attention": "nn",
    "SwiGLUMLP": "nn",
    "LinearCrossEntropyLoss": "nn",
    "LinearDistillationLoss": "nn",
    "patch_hf_model": "patch_hf",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'apr_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"apr_kernels.{module}"), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__():
    return __all__
