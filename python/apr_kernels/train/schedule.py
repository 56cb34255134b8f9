"""Learning-rate schedule: linear warmup, then cosine decay to ``min_ratio * lr`` (aprender's
WarmupCosineDecayLR). A pure function of the step, so a resumed run needs no scheduler state."""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, total_steps: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Warmup ramps linearly from lr/warmup (step 0) to lr (step warmup-1); the cosine then runs from lr
    at step ``warmup`` down to ``min_ratio * lr`` at the last step (``total_steps - 1``).
    """
    if step < 0:
        raise ValueError(f"learning-rate schedule: step={step}; expected >= 0")
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    floor = lr * min_ratio
    span = max(1, total_steps - 1 - warmup)
    progress = min(1.0, (step - warmup) / span)
    return floor + 0.5 * (lr - floor) * (1.0 + math.cos(math.pi * progress))


def default_warmup(total_steps: int) -> int:
    """10% of the run, at most 100 steps (aprender's fine-tune warmup)."""
    return min(100, max(0, total_steps // 10))
