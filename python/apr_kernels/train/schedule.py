"""Learning-rate schedules: linear warmup, then one of

* ``cosine`` (default): cosine decay to ``min_ratio * lr`` at the last step (aprender's
  WarmupCosineDecayLR);
* ``linear``: straight-line decay to ``min_ratio * lr`` at the last step;
* ``wsd`` (warmup-stable-decay, as in MiniCPM and DeepSeek runs): ``lr`` held until the last
  ``decay_fraction`` of the steps, which decay linearly to ``min_ratio * lr`` at the last step, so a
  run can be continued from any checkpoint of its stable phase;
* ``constant``: ``lr`` after the warmup.

Each is a pure function of the step, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "linear", "wsd", "constant")


def lr_at(step: int, *, lr: float, total_steps: int, warmup: int, min_ratio: float = 0.1,
          schedule: str = "cosine", decay_fraction: float = 0.2) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Warmup ramps linearly from lr/warmup (step 0) to lr (step warmup-1); the decay then runs from lr
    at its first step down to ``min_ratio * lr`` at the last step (``total_steps - 1``).
    """
    if step < 0:
        raise ValueError(f"learning-rate schedule: step={step}; expected >= 0")
    if schedule not in SCHEDULES:
        raise ValueError(f"learning-rate schedule {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if not 0.0 <= decay_fraction <= 1.0:
        raise ValueError(f"learning-rate schedule: decay_fraction={decay_fraction}; expected 0..1")
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    floor = lr * min_ratio
    if schedule == "wsd":  # stable, then the last steps decay (never inside the warmup)
        start = max(warmup, total_steps - max(1, round(decay_fraction * total_steps)))
        if step < start:
            return lr
        progress = min(1.0, (step - start + 1) / max(1, total_steps - start))  # first decay step < lr
        return lr - (lr - floor) * progress
    progress = min(1.0, (step - warmup) / max(1, total_steps - 1 - warmup))
    if schedule == "cosine":
        return floor + 0.5 * (lr - floor) * (1.0 + math.cos(math.pi * progress))
    return lr - (lr - floor) * progress


def default_warmup(total_steps: int) -> int:
    """10% of the run, at most 100 steps (aprender's fine-tune warmup)."""
    return min(100, max(0, total_steps // 10))
