"""Training draws of one sampling step (s, t) over a range of step counts, for students told the step they take.

A step-aware few-step student is trained on steps of every size it will be sampled with and is told the step
it is taking, so one student serves 2, 4, 8 and 16 steps (a per-k student sees no step size and is best at
its own k). Step counts are drawn log-uniformly (continuously) from [min_steps, max_steps]: as many draws
between 2 and 4 steps as between 8 and 16. The gap is exactly one step of that count, t - s = 1 / kappa,
and s is uniform on (0, 1 - gap] (never 0: the ELBO weight w(s) stays finite), so every (s, t) trained on is
a step that a sampler with a step count in the range takes near there; the sampler's own grid points
(t = j / k) are among the continuous draws' values.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["draw_step_times"]


def draw_step_times(
    batch_size: int,
    min_steps: float,
    max_steps: float,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor]:
    """Per-example times of one step: kappa ~ log-U[min_steps, max_steps], t - s = 1 / kappa, s ~ U(0, 1 - 1/kappa].

    Returns:
        s, t: (B,) float64 each, 0 < s < t <= 1.
    """
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"draw_step_times: need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}.")
    u = torch.rand(2, batch_size, generator=generator, dtype=torch.float64, device=device)  # (2, B)
    log_kappa = math.log(min_steps) + u[0] * (math.log(max_steps) - math.log(min_steps))
    gap = torch.exp(-log_kappa)  # (B,) in [1/max, 1/min]
    s = (1.0 - u[1]) * (1.0 - gap)  # 1 - u in (0, 1]
    return s, s + gap

