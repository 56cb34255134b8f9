"""Triton kernels and their launchers (``apr_kernels.kernels``).

Only ``@triton.jit`` functions and plain launchers live here: no autograd, no nn.Module.
These modules import Triton at import time, so the package imports them lazily through
``apr_kernels.backend.kernels(name)``.
"""
