"""Torch custom ops (namespace ``apr::``) with autograd, dispatching to Triton or the reference.

One module per op: ``rms_norm``, ``attention``; ``reference`` holds the pure-PyTorch versions that
serve as the CPU fallback and as the tests' readable oracle.
"""
