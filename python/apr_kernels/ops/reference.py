"""Pure-PyTorch reference implementations: the CPU fallback path and the tests' readable oracle.

Each function states the numerics it implements; the Triton kernels must match them within the
dtype tolerances of tests/.
"""

from __future__ import annotations

import torch

# ---------------------------------------------------------------------------------- RMSNorm (issue 4)


# -------------------------------------------------------------------------------- Attention (issue 5)
