"""D-MMD distillation losses (Hoogeboom et al., 2026, "Beyond Single Tokens: Distilling Discrete Diffusion
Models via Discrete MMD"), as pure tensor functions.

Three x-predictions meet at a partly denoised ``z_s``: the frozen teacher's ``l_theta``, the auxiliary
model's ``l_phi`` (trained to denoise the student's own samples) and the student's ``p`` at the noisier
``z_t`` that produced ``z_s``. The generator loss moves ``p`` towards tokens the teacher finds more likely
than the auxiliary does; the auxiliary loss keeps the auxiliary at the average of the teacher and the
denoiser of the student's samples, so the two agree exactly when the student samples the teacher.

Shapes: ids (B, D) long; per-token distributions (B, D, V) fp32; times and weights (B,); every loss is a
(B,) per-sequence sum in nats (divide by D for per-token numbers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_ddd.diffusion.processes import DiscreteProcess, MaskedProcess
from lightning_ddd.diffusion.schedules import NoiseSchedule

AuxTarget = Literal["soft", "hard"]
Weighting = Literal["elbo", "constant"]

__all__ = [
    "AuxTarget",
    "TeacherShaping",
    "Weighting",
    "aux_targets",
    "auxiliary_cross_entropy",
    "auxiliary_loss",
    "draw_times",
    "expected_cost",
    "generator_loss",
    "loss_positions",
    "loss_weight",
    "masked_mean",
    "shape_teacher",
    "soft_top_p",
    "sum_rows",
]


def draw_times(
    batch_size: int, num_steps: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu"
) -> tuple[Tensor, Tensor]:
    """Per-example times ``s ~ U(0, 1]``, ``delta ~ U(0, 1/k)``, ``t = min(1, s + delta)``: (s, t), each (B,).

    ``delta`` is at most one of the student's k sampling steps, so z_s is what the student's step from t
    reveals. s is drawn from (0, 1] rather than [0, 1) so that the ELBO weight ``w(s)`` stays finite.
    """
    if num_steps < 1:
        raise ValueError(f"draw_times: num_steps={num_steps} must be >= 1.")
    s = 1.0 - torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64)  # (B,) in (0, 1]
    delta = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float64) / num_steps
    return s, (s + delta).clamp_max(1.0)


def loss_weight(schedule: NoiseSchedule, s: Tensor, weighting: Weighting = "elbo") -> Tensor:
    """w(s), (B,) fp32: the schedule's ELBO weight ``-alpha'_s / (1 - alpha_s)`` (1/s for log-linear) or 1."""
    if weighting == "elbo":
        return schedule.weight(s.to(torch.float64)).float()
    if weighting == "constant":
        return torch.ones_like(s, dtype=torch.float32)
    raise ValueError(f"weighting='{weighting}' is not one of 'elbo', 'constant'.")


def soft_top_p(log_probs: Tensor, top_p: float, shift: float = 2.0) -> Tensor:
    """Soft nucleus: lower every class outside the top-p set by ``shift`` nats, then renormalise.

    A hard cut (-1e20 outside the nucleus) makes ``l_phi - l_theta`` astronomically large wherever the
    student puts mass on a cut token, and training diverges; a finite shift keeps the gradient bounded.

    Args:
        log_probs: (..., V) log-probabilities; ``-inf`` entries stay ``-inf``.
        top_p: nucleus mass in (0, 1]; the most likely classes whose preceding mass is below top_p are kept
            (always at least the argmax). 1.0 returns ``log_probs`` unchanged.
        shift: Delta, nats subtracted outside the nucleus (>= 0).

    Returns:
        (..., V) log-probabilities, normalised over the last dim.
    """
    if not 0.0 < top_p <= 1.0 or shift < 0:
        raise ValueError(f"soft_top_p: need 0 < top_p <= 1 and shift >= 0, got {top_p}, {shift}.")
    if top_p == 1.0:
        return log_probs
    sorted_lp, order = log_probs.sort(dim=-1, descending=True, stable=True)  # (..., V)
    probs = sorted_lp.double().exp()
    mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of the strictly more likely classes
    # A class whose preceding mass is top_p up to the input's round-off is outside (0.5 + 0.3 vs 0.8).
    tol = 1e-9 if log_probs.dtype == torch.float64 else 1e-6
    inside_sorted = mass_before < top_p - tol
    inside_sorted[..., 0] = True
    inside = torch.zeros_like(inside_sorted).scatter_(-1, order, inside_sorted)  # (..., V)
    return torch.log_softmax(log_probs - shift * (~inside).to(log_probs.dtype), dim=-1)


def shape_teacher(log_probs: Tensor, temperature: float = 1.0, top_p: float = 1.0, shift: float = 2.0) -> Tensor:
    """l_theta: the teacher's log-probs at temperature tau (``log_softmax(l / tau)``), then the soft top-p."""
    if not temperature > 0:
        raise ValueError(f"shape_teacher: temperature={temperature} must be > 0.")
    out = log_probs.float()
    if temperature != 1.0:
        out = torch.log_softmax(out / temperature, dim=-1)  # -inf (carried tokens) stays -inf, 0 stays 0
    return soft_top_p(out, top_p, shift)


@dataclass(frozen=True)
class TeacherShaping:
    """How the frozen teacher's log-probs become l_theta: temperature tau, then a soft nucleus (``shape_teacher``).

    Args:
        temperature: tau; the teacher's log-probs are divided by it before the losses.
        top_p: soft nucleus of the teacher (1.0 = off).
        top_p_shift: Delta, nats taken from the teacher's tokens outside the nucleus (a finite soft cut; a
            hard cut makes the generator loss diverge).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_p_shift: float = 2.0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"TeacherShaping: temperature={self.temperature} must be > 0.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"TeacherShaping: top_p={self.top_p} must lie in (0, 1].")
        if not self.top_p_shift >= 0:
            raise ValueError(f"TeacherShaping: top_p_shift={self.top_p_shift} must be >= 0.")

    def __call__(self, log_probs: Tensor) -> Tensor:
        """l_theta, (..., V) fp32."""
        return shape_teacher(log_probs, self.temperature, self.top_p, self.top_p_shift)


def loss_positions(z_s: Tensor, process: DiscreteProcess) -> Tensor | None:
    """(B, D) bool of the positions the losses sum over: masked in z_s (masked process), else all (None).

    Elsewhere both the teacher and the auxiliary carry the visible token: their log-probs are 0 / -inf and
    their difference is undefined (-inf - -inf), while the true difference is zero.
    """
    return z_s == process.mask_id if isinstance(process, MaskedProcess) else None


def _rows(values: Tensor, positions: Tensor | None) -> Tensor:
    """(B, D, ...) values at ``positions`` (B, D) bool as rows (n, ...); all B * D rows when None."""
    return values.reshape(-1, *values.shape[2:]) if positions is None else values[positions]


def sum_rows(values: Tensor, positions: Tensor | None, shape: tuple[int, int]) -> Tensor:
    """Per-sequence sums of per-row values (n,) at ``positions`` (None: all) of a (B, D) ``shape`` → (B,).

    The rows are laid out on (B, D) with zeros elsewhere and summed over D (the order of a masked dense sum).
    """
    if positions is None:
        return values.reshape(shape).sum(-1)
    return values.new_zeros(shape).masked_scatter(positions, values).sum(-1)


def expected_cost(p: Tensor, aux_log_probs: Tensor, teacher_log_probs: Tensor) -> Tensor:
    """``sum_c p[c] (l_phi - l_theta)[c]`` per row, fp32: (..., V) three times → (...,); gradient through p only.

    The rows must be ones the losses sum over (finite log-probs). One (..., V) cost tensor is built and kept
    for backward; the product with p is a batched dot product.
    """
    cost = aux_log_probs.detach().float() - teacher_log_probs.detach().float()
    return torch.einsum("...v,...v->...", p.float(), cost)


def generator_loss(
    p: Tensor, aux_log_probs: Tensor, teacher_log_probs: Tensor, weight: Tensor, positions: Tensor | None = None
) -> Tensor:
    """L_GEN = ``w(s) sum_d sum_c p[d,c] (l_phi - l_theta)[d,c]``, per sequence (B,).

    Only ``p`` carries gradient (the student's); the log-prob difference is a fixed per-class cost, so the
    gradient w.r.t. the student's logits a is ``w p_c (g_c - sum_c' p_c' g_c')`` with g = l_phi - l_theta.
    Only the rows at ``positions`` enter the arithmetic (elsewhere -inf may meet -inf).

    Args:
        p: (B, D, V) the student's x-prediction at z_t (with grad).
        aux_log_probs: (B, D, V) l_phi at z_s.
        teacher_log_probs: (B, D, V) l_theta at z_s (temperature / top-p already applied).
        weight: (B,) w(s).
        positions: (B, D) bool positions to sum over (``loss_positions``), None = all.
    """
    per_row = expected_cost(_rows(p, positions), _rows(aux_log_probs, positions), _rows(teacher_log_probs, positions))
    return weight * sum_rows(per_row, positions, p.shape[:2])


def aux_targets(p: Tensor, x: Tensor, kind: AuxTarget) -> Tensor:
    """y, (B, D, V): the student's x-prediction ``p.detach()`` ("soft") or its sample ``onehot(x)`` ("hard").

    Soft is an unbiased, lower-variance target only when x^d is independent of z_s given the student's
    inputs, which holds at the positions still masked in z_s (masked process). Under uniform noise z_s
    depends on x at every position, so the target must be hard. (``auxiliary_cross_entropy`` also takes the
    hard target as the ids x themselves, which needs no (B, D, V) tensor.)
    """
    if kind == "soft":
        return p.detach().float()
    if kind == "hard":
        return F.one_hot(x, p.shape[-1]).float()
    raise ValueError(f"aux_target='{kind}' is not one of 'soft', 'hard'.")


def auxiliary_cross_entropy(aux_log_probs: Tensor, teacher_log_probs: Tensor, target: Tensor) -> Tensor:
    """``-sum_c (y + exp(l_theta))[c] log p_phi[c]`` per row, fp32: (..., V) twice → (...,).

    Args:
        aux_log_probs: (..., V) log p_phi (with grad; finite).
        teacher_log_probs: (..., V) l_theta.
        target: y as (..., V) probabilities, or as (...) long token ids (a one-hot y, no (..., V) tensor built).
    """
    mix = teacher_log_probs.detach().float().exp()  # (..., V) fresh: y is added in place
    if target.dtype == torch.long:
        mix.scatter_add_(-1, target.unsqueeze(-1), torch.ones(target.shape + (1,), dtype=mix.dtype, device=mix.device))
    else:
        mix.add_(target.detach().float())
    return -torch.einsum("...v,...v->...", mix, aux_log_probs.float())


def auxiliary_loss(
    aux_log_probs: Tensor, teacher_log_probs: Tensor, target: Tensor, weight: Tensor, positions: Tensor | None = None
) -> Tensor:
    """L_AUX = ``-w(s) sum_d sum_c (y + exp(l_theta))[d,c] log p_phi[d,c]``, per sequence (B,).

    Its minimiser is ``p_phi = (E[y | z_s] + p_theta) / 2``, which equals the teacher exactly when the
    student's samples are the teacher's; the value is a cross-entropy, so it is not zero there.

    Args:
        aux_log_probs: (B, D, V) log p_phi at z_s (with grad; finite at the summed positions).
        teacher_log_probs: (B, D, V) l_theta at z_s.
        target: y from ``aux_targets``, (B, D, V), or the (B, D) sampled ids for the hard target.
        weight: (B,) w(s).
        positions: (B, D) bool positions to sum over, None = all.
    """
    per_row = auxiliary_cross_entropy(_rows(aux_log_probs, positions), _rows(teacher_log_probs, positions),
                                      _rows(target, positions))
    return weight * sum_rows(per_row, positions, aux_log_probs.shape[:2])


def masked_mean(values: Tensor, positions: Tensor | None) -> Tensor:
    """Mean of (B, D) ``values`` over ``positions`` (all when None); 0 when there are none."""
    if positions is None:
        return values.mean()
    count = positions.sum()
    return torch.where(positions, values, torch.zeros_like(values)).sum() / count.clamp_min(1)
