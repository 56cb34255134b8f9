"""Triton kernels and their launchers (``apr_kernels.kernels``).

Only ``@triton.jit`` functions and plain launchers live here: no autograd, no nn.Module.
These modules import Triton at import time, so the package imports them lazily through
``apr_kernels.backend.kernels(name)``.
"""

import os as _os


def _interpreter_index_fix() -> None:
    # Triton 3.6's interpreter holds program ids as 1-element arrays and converts loop bounds with
    # int(array), which NumPy 2.4 rejects ("only 0-dimensional arrays ..."), so any loop bound
    # derived from tl.program_id fails there. Convert with .item() instead (interpreter only).
    from triton.runtime import interpreter

    orig = interpreter._patch_lang_tensor
    if getattr(orig, "_apr_index_fix", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._apr_index_fix = True
    interpreter._patch_lang_tensor = patched


if _os.environ.get("TRITON_INTERPRET") == "1":  # every kernel module imports this package first
    _interpreter_index_fix()
