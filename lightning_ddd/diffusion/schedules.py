"""Noise schedules: the probability ``alpha_t`` that a dimension still holds its clean value at time t.

All schedules are decreasing on t in [0, 1] with ``alpha_0 ~ 1`` and ``alpha_1 ~ 0``. The ELBO weight of
both the masked and the uniform process is ``w(t) = -alpha'_t / (1 - alpha_t)``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor


class NoiseSchedule(ABC):
    """Base class. Subclasses implement ``alpha`` and ``alpha_prime``; tensors of times in, same shape out."""

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """Signal level alpha_t in [0, 1]."""

    @abstractmethod
    def alpha_prime(self, t: Tensor) -> Tensor:
        """Time derivative d alpha_t / dt (non-positive)."""

    def weight(self, t: Tensor) -> Tensor:
        """ELBO weight ``-alpha'_t / (1 - alpha_t)``; infinite where alpha_t = 1."""
        return -self.alpha_prime(t) / (1.0 - self.alpha(t))

    def masking_level(self, t: Tensor) -> Tensor:
        """``1 - alpha_t``: the probability that a dimension is noised by time t."""
        return 1.0 - self.alpha(t)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class LogLinearSchedule(NoiseSchedule):
    """``alpha_t = 1 - (1 - eps) t`` (SEDD/RADD's log-linear noise); the ELBO weight is ``1 / t``.

    Args:
        eps: signal left at t = 1. ``eps = 0`` makes t = 1 pure noise.
    """

    def __init__(self, eps: float = 1e-3) -> None:
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"LogLinearSchedule: eps={eps} must lie in [0, 1).")
        self.eps = eps

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - (1.0 - self.eps) * t

    def alpha_prime(self, t: Tensor) -> Tensor:
        return torch.full_like(t, -(1.0 - self.eps))

    def weight(self, t: Tensor) -> Tensor:
        return 1.0 / t  # exact simplification of -alpha'/(1-alpha); avoids 0/0 round-off


class LinearSchedule(NoiseSchedule):
    """Total noise linear in t (MDLM's "linear"): ``alpha_t = exp(-(sigma_min + t (sigma_max - sigma_min)))``.

    Args:
        sigma_min: total noise at t = 0 (alpha_0 = exp(-sigma_min)).
        sigma_max: total noise at t = 1 (alpha_1 = exp(-sigma_max)).
    """

    def __init__(self, sigma_min: float = 1e-4, sigma_max: float = 20.0) -> None:
        if not 0.0 <= sigma_min < sigma_max:
            raise ValueError(f"LinearSchedule: need 0 <= sigma_min < sigma_max, got {sigma_min}, {sigma_max}.")
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(-(self.sigma_min + t * (self.sigma_max - self.sigma_min)))

    def alpha_prime(self, t: Tensor) -> Tensor:
        return -(self.sigma_max - self.sigma_min) * self.alpha(t)

    def weight(self, t: Tensor) -> Tensor:
        sigma = self.sigma_min + t * (self.sigma_max - self.sigma_min)
        return (self.sigma_max - self.sigma_min) / torch.expm1(sigma)  # alpha/(1-alpha) = 1/(e^sigma - 1)


class CosineSchedule(NoiseSchedule):
    """``alpha_t = (1 - eps) cos(pi t / 2)``: slow noising near the data, alpha_1 = 0.

    Args:
        eps: signal removed already at t = 0 (keeps the ELBO weight finite there).
    """

    def __init__(self, eps: float = 1e-3) -> None:
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"CosineSchedule: eps={eps} must lie in [0, 1).")
        self.eps = eps

    def alpha(self, t: Tensor) -> Tensor:
        return (1.0 - self.eps) * torch.cos(0.5 * math.pi * t)

    def alpha_prime(self, t: Tensor) -> Tensor:
        return -(1.0 - self.eps) * 0.5 * math.pi * torch.sin(0.5 * math.pi * t)
