"""Learning-rate schedules that are awkward to write in YAML with torch's own classes."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


class WarmupCosineLR(LambdaLR):
    """Linear warm-up from 0 to the base LR over ``warmup_steps``, then cosine decay to ``min_ratio`` x base LR
    at ``total_steps`` (constant after). Step it every optimiser step (``interval: step``).

    Args:
        optimizer: the wrapped optimiser (filled in by the module).
        warmup_steps: steps of linear warm-up.
        total_steps: step at which the cosine reaches its floor; 0 keeps the LR constant after warm-up.
        min_ratio: final LR as a fraction of the base LR.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 1000, total_steps: int = 0, min_ratio: float = 0.1):
        if warmup_steps < 0 or total_steps < 0 or not 0.0 <= min_ratio <= 1.0:
            raise ValueError(
                f"WarmupCosineLR: need warmup_steps >= 0, total_steps >= 0, 0 <= min_ratio <= 1 "
                f"(got {warmup_steps}, {total_steps}, {min_ratio})."
            )
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio
        super().__init__(optimizer, self._factor)

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.total_steps <= self.warmup_steps:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
