"""Helpers shared by the kernel tests (attention, rms_norm)."""

import torch

from apr_kernels import backend


def kernel_module(name: str):
    """``apr_kernels.kernels.<name>``, imported under Triton's interpreter on CPU."""
    if not torch.cuda.is_available():
        backend._require_interpreter()
    return backend.kernels(name)


def spy_launchers(monkeypatch, name: str, launchers) -> list[str]:
    """Record the names of the launchers of kernel module ``name`` that get called: proves the
    Triton path (not the reference) ran."""
    k = kernel_module(name)
    calls = []
    for launcher in launchers:
        fn = getattr(k, launcher)
        monkeypatch.setattr(k, launcher, lambda *a, _fn=fn, _n=launcher, **kw: calls.append(_n) or _fn(*a, **kw))
    return calls
