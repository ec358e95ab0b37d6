"""Mixture-of-products denoisers and the Di4C losses (Hayakawa et al., ICML 2025), as pure tensor functions.

A Di4C student is ``p(x | z_t) = E_lambda prod_d p^d(x^d | z_t, lambda)``: a mixture of product
distributions, which (unlike one product) can represent dimensional correlations. Training draws M
lambdas per input, giving the log-probabilities of M components; the mixture is their uniform average.

Only some positions take part in the sums: for the masked process those masked in z_t (elsewhere every
model carries the token, log-prob 0 at the token and -inf at the others, and contributes nothing). The
losses therefore work on *packed rows*: :class:`Components` holds the M components' log-probs at the n
positions that take part, (M, n, V), and the (B, D) mask that says where they are. The students compute
only those rows (the backbone's head runs on them alone), and every (B, M, D, V) reduction becomes an
(M, n, V) one. The functions also accept the dense layout, (B, M, D, V) with an optional (B, D) ``mask``
(None: every position), which they pack first; excluded positions never enter the arithmetic, so neither
values nor gradients can be NaN there.

Shapes: B batch, M lambda draws (mixture components), N target samples, D dimensions, V vocabulary,
n packed rows (positions that take part, row-major over (b, d)).

The settings of the time draws, the data weight a(t) and the consistency step are small frozen dataclasses
(``Di4CTimes``, ``DataWeight``, ``ConsistencyStep``) that check their values when built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

__all__ = [
    "Components",
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
    "row_kl",
    "sample_times",
]


class Components:
    """M mixture components at the positions that take part in the sums, packed into rows.

    Args:
        log_probs: (M, n, V) log-probabilities: component j at the r-th True entry of ``mask`` (row-major).
        mask: (B, D) bool, the positions that take part (n of them).
    """

    def __init__(self, log_probs: Tensor, mask: Tensor) -> None:
        if log_probs.dim() != 3 or mask.dim() != 2:
            raise ValueError(f"Components: need (M, n, V) log-probs and a (B, D) mask, got {tuple(log_probs.shape)} "
                             f"and {tuple(mask.shape)}.")
        self.log_probs, self.mask = log_probs, mask

    @classmethod
    def from_dense(cls, log_probs: Tensor, mask: Tensor | None = None) -> "Components":
        """Pack (B, M, D, V) components at ``mask`` (B, D) (None: every position)."""
        B, _, D, _ = log_probs.shape
        if mask is None:
            mask = torch.ones(B, D, dtype=torch.bool, device=log_probs.device)
        return cls(log_probs.transpose(0, 1)[:, mask], mask)  # (M, n, V)

    @property
    def num_components(self) -> int:
        return self.log_probs.shape[0]

    def rows(self, values: Tensor) -> Tensor:
        """Per-position values at the rows: (B, D, ...) → (n, ...)."""
        return values[self.mask]

    def target_rows(self, y: Tensor) -> Tensor:
        """N targets per sequence at the rows: (B, N, D) → (N, n)."""
        return y.transpose(1, 2)[self.mask].transpose(0, 1)

    def sum_rows(self, values: Tensor) -> Tensor:
        """Sum per sequence: (..., n) → (..., B). The rows are laid out on (B, D) with zeros elsewhere and
        summed over D, the order of a masked dense sum."""
        out = values.new_zeros(*values.shape[:-1], *self.mask.shape)  # (..., B, D)
        out[..., self.mask] = values
        return out.sum(-1)

    @cached_property
    def log_marginal(self) -> Tensor:
        """The lambda-averaged marginal ``log Pbar = logsumexp_j log P_j - log M``, (n, V)."""
        return _LogMeanExp.apply(self.log_probs)

    def component_log_likelihood(self, y: Tensor) -> Tensor:
        """``sum_d log P_j[d, y^d]`` per component and target: y (N, n) rows → (M, N, B)."""
        M, n, _ = self.log_probs.shape
        index = y.transpose(0, 1).unsqueeze(0).expand(M, n, y.shape[0])  # (M, n, N)
        return self.sum_rows(self.log_probs.gather(-1, index).transpose(1, 2))  # (M, N, B)

    def log_likelihood(self, y: Tensor) -> Tensor:
        """``log p̂(y) = logsumexp_j sum_d log P_j[d, y^d] - log M``: y (N, n) rows → (N, B)."""
        return torch.logsumexp(self.component_log_likelihood(y), dim=0) - math.log(self.num_components)

    def correlation(self, y: Tensor) -> Tensor:
        """The correlation term ``C(y) = log p̂(y) - sum_d log Pbar^d(y^d)``: y (N, n) rows → (N, B).

        It is 0 when every component is the same product, and it is the only part of the mixture's
        log-likelihood that a product of marginals cannot express.
        """
        independent = self.log_marginal.gather(-1, y.transpose(0, 1)).transpose(0, 1)  # (N, n)
        return self.log_likelihood(y) - self.sum_rows(independent)


#: Elements per group of components in the reductions over them (2**22: 16 MB of fp32 temporaries).
CHUNK_ELEMENTS = 1 << 22


def _logsumexp0(x: Tensor) -> Tensor:
    """``torch.logsumexp(x, dim=0)`` for (M, n, V), with temporaries of at most about ``CHUNK_ELEMENTS`` elements
    (the built-in builds two of x's size); the same formula, max-shifted."""
    step = max(1, CHUNK_ELEMENTS // max(1, x[0].numel()))
    if step >= x.shape[0]:
        return torch.logsumexp(x, dim=0)
    shift = x.amax(dim=0)  # (n, V)
    shift.masked_fill_(shift.abs() == math.inf, 0.0)  # as torch.logsumexp: all -inf stays -inf, inf stays inf
    total = torch.zeros_like(shift)
    for j in range(0, x.shape[0], step):
        total += torch.exp(x[j : j + step] - shift).sum(dim=0)
    return total.log_().add_(shift)


class _LogMeanExp(torch.autograd.Function):
    """``logsumexp(log_probs, dim=0) - log M`` whose output is the one (n, V) tensor kept, and whose backward
    writes its (M, n, V) gradient in place (the built-in ops keep two (n, V) tensors and build three of the
    gradient's size). The same values; the same gradients up to round-off."""

    @staticmethod
    def forward(ctx, log_probs: Tensor) -> Tensor:
        ctx.log_m = math.log(log_probs.shape[0])
        out = _logsumexp0(log_probs).sub_(ctx.log_m)  # (n, V)
        ctx.save_for_backward(log_probs, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:
        log_probs, out = ctx.saved_tensors
        # d/d lp_j = grad exp(lp_j - logsumexp) = grad exp(lp_j - out - log M) / ... : the mixture weight of j.
        weights = torch.sub(log_probs, out, out=torch.empty_like(log_probs)).sub_(ctx.log_m).exp_()
        return weights.mul_(grad)


class _DotLogQ(torch.autograd.Function):
    """``sum_v exp(log_p) log_q`` per row, differentiable in ``log_q`` only; keeps ``log_p`` (the caller's) for
    backward instead of a second (..., V) tensor of probabilities."""

    @staticmethod
    def forward(ctx, log_p: Tensor, p: Tensor, log_q: Tensor) -> Tensor:
        ctx.save_for_backward(log_p)
        return torch.einsum("...v,...v->...", p, log_q)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        (log_p,) = ctx.saved_tensors
        return None, None, log_p.exp().mul_(grad.unsqueeze(-1))


def _packed(log_probs: Tensor | Components, mask: Tensor | None) -> Components:
    return log_probs if isinstance(log_probs, Components) else Components.from_dense(log_probs, mask)


def _targets(x: Tensor) -> tuple[Tensor, bool]:
    """Targets as (B, N, D) and whether a single (B, D) target was given (to squeeze the result)."""
    return (x.unsqueeze(1), True) if x.dim() == 2 else (x, False)


def _target_rows(comps: Components, x: Tensor) -> tuple[Tensor, bool]:
    """Dense targets (B, D) or (B, N, D) as rows (N, n), and whether to squeeze the (N, B) result to (B,)."""
    xs, single = _targets(x)
    return comps.target_rows(xs), single


def _marginal_rows(comps: Components, log_probs: Tensor) -> Tensor:
    """Per-position log-probs as rows: dense (B, D, V) are packed at the mask, rows (n, V) pass through."""
    return log_probs[comps.mask] if log_probs.dim() == 3 else log_probs


def mean_marginal(log_probs: Tensor, mask: Tensor | None = None) -> Tensor:
    """The lambda-averaged marginal ``log Pbar^d = logsumexp_j log P[j, d] - log M``: (B, M, D, V) → (B, D, V),
    0 at positions outside ``mask``. Packed components have it as ``Components.log_marginal``."""
    if mask is not None:
        log_probs = log_probs.masked_fill(~mask[:, None, :, None], 0.0)
    return torch.logsumexp(log_probs, dim=1) - math.log(log_probs.shape[1])


def mixture_log_likelihood(log_probs: Tensor | Components, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """``log p̂(x) = logsumexp_j sum_d log P[j, d, x^d] - log M``.

    Args:
        log_probs: (B, M, D, V) log-probabilities of the M components, or packed ``Components``.
        x: targets, (B, D) or (B, N, D) token ids.
        mask: (B, D) positions that take part (None: all; ignored for ``Components``).

    Returns:
        (B,) for (B, D) targets, else (B, N).
    """
    comps = _packed(log_probs, mask)
    y, single = _target_rows(comps, x)
    out = comps.log_likelihood(y).transpose(0, 1)  # (B, N)
    return out.squeeze(1) if single else out


def correlation(log_probs: Tensor | Components, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """The correlation term ``C(x) = log p̂(x) - sum_d log Pbar^d(x^d)`` (see ``Components.correlation``).

    Args:
        log_probs: (B, M, D, V) log-probabilities of the M components, or packed ``Components``.
        x: targets, (B, D) or (B, N, D) token ids.
        mask: (B, D) positions that take part (None: all; ignored for ``Components``).

    Returns:
        (B,) for (B, D) targets, else (B, N).
    """
    comps = _packed(log_probs, mask)
    y, single = _target_rows(comps, x)
    out = comps.correlation(y).transpose(0, 1)  # (B, N)
    return out.squeeze(1) if single else out


def row_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q)`` of categoricals over the last dim: (..., V) twice → (...,).

    ``p`` is the target (no gradient is taken through it; zero entries contribute 0, as in x log x); ``q``
    must be finite wherever p is 0 (the students' log-probs are). Computed as ``sum p log p - sum p log q``
    with the second sum a batched dot product, and only ``log_p`` itself kept for backward.
    """
    log_p = log_p.detach()
    p = log_p.exp()
    neg_entropy = torch.special.xlogy(p, p).sum(-1)
    return neg_entropy - _DotLogQ.apply(log_p, p, log_q)


def categorical_kl(log_p: Tensor, log_q: Tensor, mask: Tensor | None = None) -> Tensor:
    """``sum_d KL(p^d || q^d)`` of per-dimension categoricals: (..., D, V) twice → (...,).

    ``p`` is the target (zero entries contribute 0, as in x log x); ``mask`` is (B, D) and broadcasts
    over any axes between the batch and D; positions outside it contribute 0.
    """
    if mask is not None:
        view = mask.reshape(mask.shape[0], *([1] * (log_p.dim() - 3)), mask.shape[1], 1)
        log_p, log_q = log_p.masked_fill(~view, 0.0), log_q.masked_fill(~view, 0.0)
    p = log_p.exp()
    support = p > 0
    # Both branches stay finite where p > 0; where p == 0 the term is exactly 0 (no 0 * inf).
    term = p * (torch.where(support, log_p, torch.zeros_like(log_p)) - log_q)
    return torch.where(support, term, torch.zeros_like(term)).sum(dim=(-1, -2))


def mixture_cross_entropy(
    log_probs: Tensor | Components, target_log_marginal: Tensor, samples: Tensor, mask: Tensor | None = None
) -> Tensor:
    """Control-variate estimate of the cross-entropy ``-E_{y ~ R} log p̂(y)`` (minus the constant ``sum_d H(r^d)``).

    ``-log p̂(y) = -C(y) - sum_d log Pbar^d(y^d)``; the second part has the closed-form expectation
    ``sum_d CE(r^d, Pbar^d)``, so only the correlation part is sampled:
    ``-mean_n C(y_n) + sum_d KL(r^d || Pbar^d)``.

    Args:
        log_probs: (B, M, D, V) the student's components (with gradients), or packed ``Components``.
        target_log_marginal: log r^d, the marginals of the target R (detached): (B, D, V), or (n, V) rows.
        samples: draws y_n ~ R: (B, N, D), or (N, n) rows.
        mask: (B, D) positions that take part (None: all; ignored for ``Components``).

    Returns:
        (B,) nats.
    """
    comps = _packed(log_probs, mask)
    y = samples if isinstance(log_probs, Components) else comps.target_rows(samples)
    kl = row_kl(_marginal_rows(comps, target_log_marginal), comps.log_marginal)  # (n,)
    return -comps.correlation(y).mean(dim=0) + comps.sum_rows(kl)


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
    log_probs: Tensor | Components,
    teacher_log_probs: Tensor,
    x: Tensor,
    weight: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """``L_data = a(t) (-C(x_data)) + sum_d KL(PT^d || Pbar^d)``: correlations from the data, marginals from the teacher.

    Args:
        log_probs: (B, M, D, V) student components at z_t ~ q(z_t | x), or packed ``Components``.
        teacher_log_probs: teacher's log p(x^d | z_t) (detached): (B, D, V), or (n, V) rows.
        x: (B, D) the clean data.
        weight: (B,) a(t) per example (see ``data_weight``).
        mask: (B, D) positions that take part (None: all; ignored for ``Components``).

    Returns:
        (B,) nats.
    """
    comps = _packed(log_probs, mask)
    kl = row_kl(_marginal_rows(comps, teacher_log_probs), comps.log_marginal)  # (n,)
    return -weight * comps.correlation(comps.rows(x)[None])[0] + comps.sum_rows(kl)


def distillation_loss(
    log_probs: Tensor | Components, teacher_log_probs: Tensor, mask: Tensor | None = None
) -> Tensor:
    """``L_distil = mean_j sum_d KL(PT^d || P_j^d)``: near the data the teacher's product is nearly exact.

    The KL is linear in log P_j, so the mean over j is the KL to the mean log-probs (no (M, n, V) product).

    Args:
        log_probs: (B, M, D, V) student components at z_tau, or packed ``Components``.
        teacher_log_probs: teacher's log p(x^d | z_tau) (detached): (B, D, V), or (n, V) rows.
        mask: (B, D) positions that take part (None: all; ignored for ``Components``).

    Returns:
        (B,) nats.
    """
    comps = _packed(log_probs, mask)
    kl = row_kl(_marginal_rows(comps, teacher_log_probs), comps.log_probs.mean(dim=0))  # (n,)
    return comps.sum_rows(kl)


def consistency_loss(
    log_probs: Tensor | Components,
    target_log_probs: Tensor,
    samples: Tensor,
    mask: Tensor | None = None,
) -> Tensor:
    """``L_consis = -mean_j C(y_j) + sum_d KL(Qbar^d || Pbar^d)``, the mixture cross-entropy against ``R = mean_j Q_j``.

    ``Q_j = p_theta(. | z_u^j, lambda'_j)`` is the student one teacher step later (z_u^j from the teacher's step
    t → u), and ``y_j ~ prod_d Q_j^d`` is a draw from component j of R, so the y_j are draws from R.

    Args:
        log_probs: (B, M, D, V) student components at z_t (with gradients), or packed ``Components``.
        target_log_probs: log Q_j (detached): (B, M', D, V), or with packed components log Qbar as rows (n, V).
        samples: y_j ~ Q_j: (B, M', D), or (M', n) rows.
        mask: (B, D) positions masked in z_t (None: all; ignored for ``Components``).

    Returns:
        (B,) nats.
    """
    if isinstance(log_probs, Components):
        return mixture_cross_entropy(log_probs, target_log_probs, samples)
    comps = Components.from_dense(log_probs, mask)
    target_bar = Components.from_dense(target_log_probs, comps.mask).log_marginal  # (n, V)
    return mixture_cross_entropy(comps, target_bar, comps.target_rows(samples))


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
