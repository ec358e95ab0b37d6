"""Mixture-of-products denoisers and the Di4C losses (Hayakawa et al., ICML 2025), as pure tensor functions.

A Di4C student is ``p(x | z_t) = E_lambda prod_d p^d(x^d | z_t, lambda)``: a mixture of product
distributions, which (unlike one product) can represent dimensional correlations. Training draws M
lambdas per input, giving log-probabilities ``log_probs[b, j, d, v]`` of shape (B, M, D, V); the mixture
is the uniform average over the M components.

Every function takes an optional ``mask`` (B, D) of the positions that take part in the sums. For the
masked process it is "masked in z_t": elsewhere every model carries the token (log-prob 0 at the token,
-inf at the others), and a position-wise -inf - (-inf) would be NaN. Excluded positions are set to 0
before any arithmetic, so neither the values nor the gradients can be NaN. For the uniform process pass
None (every position takes part).

Shapes: B batch, M lambda draws (mixture components), N target samples, D dimensions, V vocabulary.

The settings of the time draws, the data weight a(t) and the consistency step are small frozen dataclasses
(``Di4CTimes``, ``DataWeight``, ``ConsistencyStep``) that check their values when built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ConsistencyStep",
    "DataWeight",
    "Di4CTimes",
    "categorical_kl",
    "consistency_loss",
    "consistency_times",
    "correlation",
    "data_loss",
    "data_weight",
    "distillation_loss",
    "mean_marginal",
    "mixture_cross_entropy",
    "mixture_log_likelihood",
    "sample_times",
]


def _keep(log_probs: Tensor, mask: Tensor | None) -> Tensor:
    """Zero the log-probs at excluded positions: (B, [M,] D, V) with mask (B, D)."""
    if mask is None:
        return log_probs
    view = mask.reshape(mask.shape[0], *([1] * (log_probs.dim() - 3)), mask.shape[1], 1)
    return log_probs.masked_fill(~view, 0.0)


def _targets(x: Tensor) -> tuple[Tensor, bool]:
    """Targets as (B, N, D) and whether a single (B, D) target was given (to squeeze the result)."""
    return (x.unsqueeze(1), True) if x.dim() == 2 else (x, False)


def mean_marginal(log_probs: Tensor, mask: Tensor | None = None) -> Tensor:
    """The lambda-averaged marginal ``log Pbar^d = logsumexp_j log P[j, d] - log M``: (B, M, D, V) → (B, D, V)."""
    log_probs = _keep(log_probs, mask)
    return torch.logsumexp(log_probs, dim=1) - math.log(log_probs.shape[1])


def _component_log_likelihood(log_probs: Tensor, x: Tensor) -> Tensor:
    """``sum_d log P[j, d, x_n^d]`` for every component and target: (B, M, D, V), (B, N, D) → (B, M, N)."""
    B, M, D, _ = log_probs.shape
    index = x.transpose(1, 2).unsqueeze(1).expand(B, M, D, x.shape[1])  # (B, M, D, N)
    return log_probs.gather(-1, index).sum(dim=2)  # (B, M, N)


def mixture_log_likelihood(log_probs: Tensor, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """``log p̂(x) = logsumexp_j sum_d log P[j, d, x^d] - log M``.

    Args:
        log_probs: (B, M, D, V) log-probabilities of the M components.
        x: targets, (B, D) or (B, N, D) token ids.
        mask: (B, D) positions that take part (None: all).

    Returns:
        (B,) for (B, D) targets, else (B, N).
    """
    log_probs = _keep(log_probs, mask)
    x, single = _targets(x)
    out = torch.logsumexp(_component_log_likelihood(log_probs, x), dim=1) - math.log(log_probs.shape[1])  # (B, N)
    return out.squeeze(1) if single else out


def correlation(log_probs: Tensor, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """The correlation term ``C(x) = log p̂(x) - sum_d log Pbar^d(x^d)``.

    It is 0 when every component is the same product, and it is the only part of the mixture's
    log-likelihood that a product of marginals cannot express.

    Args:
        log_probs: (B, M, D, V) log-probabilities of the M components.
        x: targets, (B, D) or (B, N, D) token ids.
        mask: (B, D) positions that take part (None: all).

    Returns:
        (B,) for (B, D) targets, else (B, N).
    """
    log_probs = _keep(log_probs, mask)
    xs, single = _targets(x)
    log_bar = mean_marginal(log_probs)  # (B, D, V)
    independent = log_bar.gather(-1, xs.transpose(1, 2)).sum(dim=1)  # (B, N)
    out = mixture_log_likelihood(log_probs, xs) - independent
    return out.squeeze(1) if single else out


def categorical_kl(log_p: Tensor, log_q: Tensor, mask: Tensor | None = None) -> Tensor:
    """``sum_d KL(p^d || q^d)`` of per-dimension categoricals: (..., D, V) twice → (...,).

    ``p`` is the target (zero entries contribute 0, as in x log x); ``mask`` is (B, D) and broadcasts
    over any axes between the batch and D.
    """
    log_p, log_q = _keep(log_p, mask), _keep(log_q, mask)
    p = log_p.exp()
    support = p > 0
    # Both branches stay finite where p > 0; where p == 0 the term is exactly 0 (no 0 * inf).
    term = p * (torch.where(support, log_p, torch.zeros_like(log_p)) - log_q)
    return torch.where(support, term, torch.zeros_like(term)).sum(dim=(-1, -2))


def mixture_cross_entropy(
    log_probs: Tensor, target_log_marginal: Tensor, samples: Tensor, mask: Tensor | None = None
) -> Tensor:
    """Control-variate estimate of the cross-entropy ``-E_{y ~ R} log p̂(y)`` (minus the constant ``sum_d H(r^d)``).

    ``-log p̂(y) = -C(y) - sum_d log Pbar^d(y^d)``; the second part has the closed-form expectation
    ``sum_d CE(r^d, Pbar^d)``, so only the correlation part is sampled:
    ``-mean_n C(y_n) + sum_d KL(r^d || Pbar^d)``.

    Args:
        log_probs: (B, M, D, V) the student's components (with gradients).
        target_log_marginal: (B, D, V) log r^d, the marginals of the target R (detached).
        samples: (B, N, D) draws y_n ~ R.
        mask: (B, D) positions that take part (None: all).

    Returns:
        (B,) nats.
    """
    log_bar = mean_marginal(log_probs, mask)
    return -correlation(log_probs, samples, mask).mean(dim=1) + categorical_kl(target_log_marginal, log_bar, mask)


# ---- the three Di4C losses -----------------------------------------------------------------------------


def data_weight(t: Tensor, coeff: float = 1.0, sharpness: float = 20.0, midpoint: float = 0.5) -> Tensor:
    """``a(t) = coeff * sigmoid(sharpness (t - midpoint))``: the data's correlation term matters at high noise."""
    return coeff * torch.sigmoid(sharpness * (t.float() - midpoint))


@dataclass(frozen=True)
class DataWeight:
    """a(t) = coeff sigmoid(sharpness (t - midpoint)), the weight of the data's correlation term in ``data_loss``.

    Args:
        coeff: c (1 for images, 0.1 for text in the reference code). At most 1: the term's marginal part,
            + a(t) sum_d log Pbar^d(x^d), pushes the marginals away from the data, and only the KL term
            (weight 1) holds them, so with a(t) > 1 the loss rewards wrong marginals (samples collapse).
        sharpness: s (20 in the paper); 0 gives the constant c / 2.
        midpoint: t0 (1/2 in the paper): the data's correlations weigh in above this noise level; -inf
            (``-.inf`` in YAML) gives the constant a(t) = c at every noise level.
    """

    coeff: float = 0.1
    sharpness: float = 20.0
    midpoint: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.coeff <= 1.0:
            raise ValueError(f"DataWeight: coeff={self.coeff} must lie in [0, 1] (above 1 the data term rewards "
                             "wrong marginals; raise the data loss's weight to weigh the whole term more).")
        if not self.sharpness >= 0.0:
            raise ValueError(f"DataWeight: sharpness={self.sharpness} must be >= 0.")

    def __call__(self, t: Tensor) -> Tensor:
        """a(t) per example: (B,) times → (B,) float32."""
        return data_weight(t, self.coeff, self.sharpness, self.midpoint)


def data_loss(
    log_probs: Tensor,
    teacher_log_probs: Tensor,
    x: Tensor,
    weight: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """``L_data = a(t) (-C(x_data)) + sum_d KL(PT^d || Pbar^d)``: correlations from the data, marginals from the teacher.

    Args:
        log_probs: (B, M, D, V) student components at z_t ~ q(z_t | x).
        teacher_log_probs: (B, D, V) teacher's log p(x^d | z_t) (detached).
        x: (B, D) the clean data.
        weight: (B,) a(t) per example (see ``data_weight``).
        mask: (B, D) positions that take part (None: all).

    Returns:
        (B,) nats.
    """
    log_bar = mean_marginal(log_probs, mask)
    return -weight * correlation(log_probs, x, mask) + categorical_kl(teacher_log_probs, log_bar, mask)


def distillation_loss(log_probs: Tensor, teacher_log_probs: Tensor, mask: Tensor | None = None) -> Tensor:
    """``L_distil = mean_j sum_d KL(PT^d || P_j^d)``: near the data the teacher's product is nearly exact.

    Args:
        log_probs: (B, M, D, V) student components at z_tau.
        teacher_log_probs: (B, D, V) teacher's log p(x^d | z_tau) (detached).
        mask: (B, D) positions that take part (None: all).

    Returns:
        (B,) nats.
    """
    target = teacher_log_probs.unsqueeze(1).expand_as(log_probs)  # (B, M, D, V)
    return categorical_kl(target, log_probs, mask).mean(dim=1)


def consistency_loss(
    log_probs: Tensor,
    target_log_probs: Tensor,
    samples: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """``L_consis = -mean_j C(y_j) + sum_d KL(Qbar^d || Pbar^d)``, the mixture cross-entropy against ``R = mean_j Q_j``.

    ``Q_j = p_theta(. | z_u^j, lambda'_j)`` is the student one teacher step later (z_u^j from the teacher's step
    t → u), and ``y_j ~ prod_d Q_j^d`` is a draw from component j of R, so the y_j are draws from R.

    Args:
        log_probs: (B, M, D, V) student components at z_t (with gradients).
        target_log_probs: (B, M', D, V) log Q_j (detached).
        samples: (B, M', D) y_j ~ Q_j.
        mask: (B, D) positions masked in z_t (None: all).

    Returns:
        (B,) nats.
    """
    target_bar = mean_marginal(target_log_probs, mask)  # (B, D, V)
    log_bar = mean_marginal(log_probs, mask)
    return -correlation(log_probs, samples, mask).mean(dim=1) + categorical_kl(target_bar, log_bar, mask)


# ---- times -------------------------------------------------------------------------------------------


def sample_times(
    batch_size: int,
    delta: float,
    distil_prob: float,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor]:
    """Per-example times and roles: w.p. ``distil_prob`` a distillation example at tau ~ U[delta, 2 delta],
    else a consistency example at t ~ U[delta, 1]. Both are stratified over the batch.

    Returns:
        t (B,) float32 and near (B,) bool (True: distillation example).
    """
    offset = torch.rand(1, generator=generator, device=device)
    u = (offset + torch.randperm(batch_size, generator=generator, device=device)) / batch_size  # (B,) stratified
    near = torch.rand(batch_size, generator=generator, device=device) < distil_prob
    t = torch.where(near, delta * (1.0 + u), delta + (1.0 - delta) * u)
    return t.float(), near


def consistency_times(
    t: Tensor,
    step_min: float,
    step_max: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``u = t - min(Delta, t / 2)`` with Delta log-uniform in [step_min, step_max] per example: (B,) → (B,).

    Capping the step at t/2 keeps u > 0 (the reference code does the same); step_min == step_max fixes Delta
    (e.g. one step of the teacher's grid, 1/n).
    """
    v = torch.rand(t.shape, generator=generator, device=t.device)
    step = step_min * (step_max / step_min) ** v  # log-uniform
    return t - torch.minimum(step.to(t.dtype), t / 2)


@dataclass(frozen=True)
class Di4CTimes:
    """Per-example times and roles of a Di4C batch (see ``sample_times``).

    Args:
        delta: delta, the distillation examples' times lie in [delta, 2 delta].
        distil_prob: fraction of examples that are distillation examples (0.3 in the reference code); the
            others are consistency examples at t ~ U[delta, 1].
    """

    delta: float = 0.01
    distil_prob: float = 0.3

    def __post_init__(self) -> None:
        if not 0.0 < self.delta < 0.5:
            raise ValueError(f"Di4CTimes: delta={self.delta} must lie in (0, 0.5).")
        if not 0.0 <= self.distil_prob <= 1.0:
            raise ValueError(f"Di4CTimes: distil_prob={self.distil_prob} must lie in [0, 1].")

    def sample(
        self, batch_size: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu"
    ) -> tuple[Tensor, Tensor]:
        """t (B,) float32 and near (B,) bool (True: distillation example)."""
        return sample_times(batch_size, self.delta, self.distil_prob, generator, device)


@dataclass(frozen=True)
class ConsistencyStep:
    """The consistency step Delta: the student at t matches one teacher step t → u = t - Delta, then itself at u.

    Args:
        step_min: smallest Delta (log-uniform in [step_min, step_max]; the paper: [1e-3, 1e-2]).
        step_max: largest Delta; equal to ``step_min`` for a fixed step.
        teacher_grid_steps: if > 0, Delta = 1 / teacher_grid_steps (one step of an n-step teacher grid),
            overriding the log-uniform range.
    """

    step_min: float = 1e-3
    step_max: float = 1e-2
    teacher_grid_steps: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.step_min <= self.step_max:
            raise ValueError(f"ConsistencyStep: need 0 < step_min <= step_max, got {self.step_min}, {self.step_max}.")
        if self.teacher_grid_steps < 0:
            raise ValueError(f"ConsistencyStep: teacher_grid_steps={self.teacher_grid_steps} must be >= 0.")

    @property
    def bounds(self) -> tuple[float, float]:
        """(smallest, largest) Delta after ``teacher_grid_steps``."""
        if self.teacher_grid_steps > 0:
            return 1.0 / self.teacher_grid_steps, 1.0 / self.teacher_grid_steps
        return self.step_min, self.step_max

    def draw(self, t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """u per example, (B,) → (B,) (see ``consistency_times``)."""
        return consistency_times(t, *self.bounds, generator=generator)
