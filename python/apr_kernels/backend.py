"""Which implementation an op runs: Triton kernels or the PyTorch reference.

One switch for every op, the environment variable ``APR_KERNELS_BACKEND``:

* ``auto`` (default): Triton when every input tensor is on a CUDA device and Triton imports,
  the PyTorch reference otherwise.
* ``triton``: always the Triton kernels. On CPU tensors they run in Triton's interpreter
  (``TRITON_INTERPRET=1``), which lets anyone check the kernels without a GPU (slowly).
* ``reference``: always the PyTorch reference code.

The variable is read on every call, so tests may flip it with ``monkeypatch.setenv``.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "APR_KERNELS_BACKEND"


def backend() -> str:
    """The backend asked for by ``APR_KERNELS_BACKEND`` (validated)."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={value!r}: expected one of {', '.join(BACKENDS)}")
    return value


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """Decide the path for one call from the switch and where the inputs live."""
    choice = backend()
    if choice == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if choice == "triton":
        if not on_cuda:
            _require_interpreter()  # before anything imports Triton
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton but Triton is not importable on this machine")
        return True
    return on_cuda and triton_available()


def _require_interpreter() -> None:
    # Triton reads TRITON_INTERPRET when it is first imported (its own tl.sum etc. are jitted then)
    # and again when each @triton.jit function is decorated, so it must be set before `triton` is
    # imported at all. Set it here if nothing imported Triton yet; otherwise say how to fix it.
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" in sys.modules:
        raise RuntimeError(
            f"{ENV_VAR}=triton on CPU tensors needs Triton's interpreter, but Triton was already "
            "imported without it (by apr_kernels on a GPU, or by another package such as transformers); "
            "set TRITON_INTERPRET=1 before starting Python"
        )
    os.environ["TRITON_INTERPRET"] = "1"


def prepare_interpreter_early() -> None:
    """Called at ``import apr_kernels``: when the Triton backend is forced on a machine without CUDA,
    turn the interpreter on before any other package gets to import Triton."""
    if os.environ.get(ENV_VAR, "").strip().lower() != "triton" or "triton" in sys.modules:
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_loaded: dict[str, ModuleType] = {}


def kernels(name: str) -> ModuleType:
    """Import ``apr_kernels.kernels.<name>`` on first use (never at package import: Triton may be
    missing, and without a GPU it must not compile anything)."""
    mod = _loaded.get(name)
    if mod is None:
        mod = importlib.import_module(f"apr_kernels.kernels.{name}")
        _loaded[name] = mod
    return mod


def kernels_for(name: str, x: torch.Tensor, *others: torch.Tensor) -> ModuleType | None:
    """The kernel module ``name`` when this call should run Triton (``use_triton`` on all the
    tensors) and the module computes ``x``'s dtype (its ``DTYPES``), else None: the reference path.
    fp64 (the gradcheck dtype) always takes the reference."""
    if not use_triton(x, *others):
        return None
    mod = kernels(name)
    return mod if x.dtype in mod.DTYPES else None
