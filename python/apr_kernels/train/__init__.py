"""Training: data packing (``data``), learning-rate schedule (``schedule``), the loop (``loop``), APR
checkpoints with exact resume (``checkpoint``) and the ``demo`` / ``train`` / ``eval`` commands (``cli``)."""

from .loop import TrainConfig, Trainer

__all__ = ["TrainConfig", "Trainer"]
