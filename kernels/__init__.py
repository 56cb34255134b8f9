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


def _interpreter_patch_once() -> None:
    # Triton 3.6's interpreter patches triton.language (every builtin of tl, tl.tensor and tl.math
    # wrapped, found by inspect.getmembers) at each launch, restoring it after, and again at each call
    # of a @triton.jit helper inside the kernel, where the launch's patches are already in place: a
    # quarter of a small attention launch's time (2,269 patches for 3 forwards and a backward). A
    # helper's call patches only the language modules the launch has not (a builtin `load` still
    # there); its patches were never restored, so skipping them changes nothing else.
    from triton.runtime import interpreter

    orig = interpreter._patch_lang
    if getattr(orig, "_apr_patch_once", False):
        return
    import triton.language as tl

    def patch_lang(fn):
        langs = [value for value in fn.__globals__.values() if value is tl or value is tl.core]
        if langs and all(hasattr(lang, "load") and not tl.core.is_builtin(lang.load) for lang in langs):
            return interpreter._LangPatchScope()  # (an empty scope: nothing to restore)
        return orig(fn)

    patch_lang._apr_patch_once = True
    interpreter._patch_lang = patch_lang


if _os.environ.get("TRITON_INTERPRET") == "1":  # every kernel module imports this package first
    _interpreter_index_fix()
    _interpreter_patch_once()
