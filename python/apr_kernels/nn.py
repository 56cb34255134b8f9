"""nn.Module wrappers over the ops: parameters, ``extra_repr`` and a call to the functional op."""

from __future__ import annotations

import torch
from torch import nn

# ---------------------------------------------------------------------------------- RMSNorm (issue 4)


# -------------------------------------------------------------------------------- Attention (issue 5)
