"""Student objectives: ``DistillationLoss`` and the Di4C and D-MMD terms, each a subclass chosen by ``class_path``.

A student draws one *context* per batch (``Di4CContext``, ``DMMDContext``): the noise, the noisy inputs and,
computed on first use and then shared by every term, the expensive forward passes (the teacher's
log-probs, the student's M mixture components, the auxiliary's log-probs). A term reads the context and
returns a (B,) tensor of weighted per-sequence values in nats, like ``TeacherLoss``; the student divides by
D, sums the terms of the model being trained and logs each as ``<stage>/loss_<name>``. A new objective is
one subclass plus one entry in the student's ``losses`` list in YAML.

The maths lives in :mod:`lightning_ddd.diffusion.mixture` and :mod:`lightning_ddd.diffusion.dmmd`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from functools import cached_property
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from lightning_ddd.diffusion import dmmd, mixture
from lightning_ddd.diffusion.categorical import sample_categorical
from lightning_ddd.diffusion.processes import MaskedProcess

if TYPE_CHECKING:
    from lightning_ddd.modules.dmmd_student import DMMDStudent
    from lightning_ddd.modules.mixture_student import MixtureStudent
    from lightning_ddd.modules.student import DistilledStudent

__all__ = [
    "DMMDAuxiliaryLoss",
    "DMMDContext",
    "DMMDGeneratorLoss",
    "Di4CConsistencyLoss",
    "Di4CContext",
    "Di4CDataLoss",
    "Di4CDistillationLoss",
    "DistillationLoss",
]


class DistillationLoss(ABC):
    """Base class of student objectives; subclass, set ``name`` and ``context``, and list it in ``losses``.

    Args:
        weight: multiplies the term (>= 0).
    """

    #: the term is logged as ``<stage>/loss_<name>``; names are unique within a student
    name: str = ""
    #: the context class the term reads; the student must build this kind (or a subclass)
    context: type = object
    #: which model the term trains: "student", or "auxiliary" (D-MMD's auxiliary denoiser)
    trains: str = "student"

    def __init__(self, weight: float = 1.0) -> None:
        if not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"{type(self).__name__}: weight={weight} must be finite and >= 0.")
        self.weight = weight

    def check_student(self, student: DistilledStudent) -> None:
        """Raise a clear error if this term does not apply to ``student`` (called once, when it is built)."""
        if not issubclass(student.context_class, self.context):
            raise ValueError(
                f"{type(self).__name__} reads a {self.context.__name__} but {type(student).__name__} draws a "
                f"{student.context_class.__name__}; use it with the student it was written for."
            )

    @abstractmethod
    def __call__(self, ctx) -> Tensor:
        """(B,) weighted per-sequence values in nats."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


# ---- Di4C ----------------------------------------------------------------------------------------------


class Di4CContext:
    """One Di4C draw on clean ids x (B, D): per-example times and roles, z_t, and the shared forward passes.

    Draw order is fixed (times, z_t, then the M lambdas at the first use of ``log_probs``), so a term that
    draws noise of its own reads ``log_probs`` first.

    Attributes:
        student: the MixtureStudent.
        x: (B, D) clean ids.
        generator: the step's seeded generator.
        t: (B,) times; near: (B,) bool, True for distillation examples (t in [delta, 2 delta]).
        z_t: (B, D) noisy ids.
        mask: (B, D) positions masked in z_t (masked process), or None (uniform: every position).
    """

    def __init__(self, student: MixtureStudent, x: Tensor, generator: torch.Generator | None) -> None:
        self.student, self.x, self.generator = student, x, generator
        self.t, self.near = student.times.sample(x.shape[0], generator, student.device)  # (B,), (B,)
        self.z_t = student.process.corrupt(x, self.t, generator)  # (B, D)
        # Masked process: only positions masked in z_t take part (the rest are carried by every model).
        self.mask = self.z_t == student.process.mask_id if isinstance(student.process, MaskedProcess) else None

    @cached_property
    def teacher_log_probs(self) -> Tensor:
        """The frozen teacher's log p(x^d | z_t), (B, D, V), no graph."""
        with torch.no_grad():
            return self.student.teacher.denoise(self.z_t, self.t)

    @cached_property
    def log_probs(self) -> Tensor:
        """The student's M components with fresh lambdas, (B, M, D, V), with graph."""
        return self.student.components(self.z_t, self.t, self.generator)


class Di4CDistillationLoss(DistillationLoss):
    """Distillation examples only: ``mean_j sum_d KL(PT^d || P_j^d)``, per-lambda KL to the teacher near the data."""

    name = "distil"
    context = Di4CContext

    def __call__(self, ctx: Di4CContext) -> Tensor:
        distil = mixture.distillation_loss(ctx.log_probs, ctx.teacher_log_probs, ctx.mask)  # (B,)
        return self.weight * torch.where(ctx.near, distil, torch.zeros_like(distil))


class Di4CDataLoss(DistillationLoss):
    """Every example: ``a(t) (-C(x_data)) + sum_d KL(PT^d || Pbar^d)``, correlations from the data, marginals
    from the teacher.

    Args:
        weight: multiplies the term.
        a_t: the weight a(t) of the data's correlation term.
    """

    name = "data"
    context = Di4CContext

    def __init__(self, weight: float = 1.0, a_t: mixture.DataWeight = mixture.DataWeight()) -> None:
        super().__init__(weight)
        self.a_t = a_t

    def __call__(self, ctx: Di4CContext) -> Tensor:
        data = mixture.data_loss(ctx.log_probs, ctx.teacher_log_probs, ctx.x, self.a_t(ctx.t), ctx.mask)
        return self.weight * data


class Di4CConsistencyLoss(DistillationLoss):
    """Consistency examples only: the mixture cross-entropy of the student at t against one teacher step
    t → u followed by the student at u (a fresh lambda per draw, no dropout). Costs M extra forward passes
    per consistency example.

    Args:
        weight: multiplies the term.
        step: the consistency step Delta = t - u.
    """

    name = "consis"
    context = Di4CContext

    def __init__(self, weight: float = 1.0, step: mixture.ConsistencyStep = mixture.ConsistencyStep()) -> None:
        super().__init__(weight)
        self.step = step

    def __call__(self, ctx: Di4CContext) -> Tensor:
        log_probs = ctx.log_probs  # first: the components' lambdas are drawn before the targets' noise
        consis = torch.zeros(log_probs.shape[0], dtype=log_probs.dtype, device=log_probs.device)
        rows = (~ctx.near).nonzero().squeeze(-1)  # consistency examples only: they need M extra forward passes
        if rows.numel() > 0:
            rows_mask = ctx.mask[rows] if ctx.mask is not None else None
            target, y = self.targets(ctx, rows)
            consis = consis.index_put((rows,), mixture.consistency_loss(log_probs[rows], target, y, rows_mask))
        return self.weight * consis

    @torch.no_grad()
    def targets(self, ctx: Di4CContext, rows: Tensor) -> tuple[Tensor, Tensor]:
        """One teacher step t → u per lambda draw, then the student at u with a fresh lambda.

        Returns:
            log Q_j (R, M, D, V) and draws y_j ~ prod_d Q_j^d (R, M, D) for the R rows.
        """
        student = ctx.student
        z_t, t = ctx.z_t[rows], ctx.t[rows]
        M, (R, D) = student.mixture.num_lambda, z_t.shape
        u = self.step.draw(t, ctx.generator)  # (R,)
        t_rep, u_rep = t.repeat_interleave(M, 0), u.repeat_interleave(M, 0)  # (R*M,)
        z_rep = z_t.repeat_interleave(M, 0)  # (R*M, D)
        x_hat = sample_categorical(ctx.teacher_log_probs[rows].repeat_interleave(M, 0), ctx.generator)  # (R*M, D)
        z_u = student.process.posterior_sample(z_rep, x_hat, u_rep, t_rep, ctx.generator)  # (R*M, D)
        was_training = student.backbone.training
        student.backbone.eval()  # the target is the student's deterministic prediction (no dropout)
        target = student.denoise(z_u, u_rep, student.draw_lambda(R * M, ctx.generator, D))  # (R*M, D, V)
        student.backbone.train(was_training)
        y = sample_categorical(target, ctx.generator)  # (R*M, D)
        return target.view(R, M, D, -1), y.view(R, M, D)


# ---- D-MMD ---------------------------------------------------------------------------------------------


class DMMDContext:
    """One D-MMD draw on clean ids x (B, D): times s < t, z_t, the student's x-prediction and sample, z_s,
    and (on first use) the shaped teacher and the auxiliary at z_s.

    Attributes:
        student: the DMMDStudent.
        x: (B, D) clean ids.
        trains: the model whose forward pass keeps a graph ("student", "auxiliary"), or None (neither).
        s, t: (B,) float64 times, s < t.
        z_t: (B, D) noisy ids; noise: the student's extra input (noise, and the step for a step-aware
            student; ``DMMDStudent.draw_condition``), or None.
        log_p, p: (B, D, V) the student's x-prediction at z_t (log and probabilities).
        x_hat: (B, D) the student's sample; z_s: (B, D) the posterior draw from z_t given x_hat.
    """

    def __init__(self, student: DMMDStudent, x: Tensor, generator: torch.Generator | None,
                 trains: Literal["student", "auxiliary"] | None = None) -> None:
        B = x.shape[0]
        self.student, self.x, self.trains = student, x, trains
        self.s, self.t = student.draw_step_times(B, generator)  # (B,) each, float64
        self.z_t = student.process.corrupt(x, self.t, generator)  # (B, D)
        self.noise = student.draw_condition(B, generator, self.t, self.s)  # (B, D, C), (B, C) or None
        with torch.set_grad_enabled(trains == "student" and torch.is_grad_enabled()):
            self.log_p = student.denoise(self.z_t, self.t.float(), self.noise)  # (B, D, V); carried tokens visible
        self.p = self.log_p.exp()
        self.x_hat = sample_categorical(self.log_p.detach(), generator)  # (B, D), float64 Gumbel-max
        self.z_s = student.process.posterior_sample(self.z_t, self.x_hat, self.s, self.t, generator)  # (B, D)

    @cached_property
    def teacher_log_probs(self) -> Tensor:
        """l_theta at z_s, (B, D, V): the frozen teacher with the student's ``teacher_shaping``."""
        return self.student.teacher_log_probs(self.z_s, self.s)

    @cached_property
    def aux_log_probs(self) -> Tensor:
        """l_phi at z_s, (B, D, V), finite everywhere; with a graph only when the auxiliary trains."""
        with torch.set_grad_enabled(self.trains == "auxiliary" and torch.is_grad_enabled()):
            return self.student.aux_log_probs(self.z_s, self.s)

    @cached_property
    def positions(self) -> Tensor | None:
        """(B, D) positions the losses sum over: masked in z_s (masked process), else None (all)."""
        return dmmd.loss_positions(self.z_s, self.student.process)

    @cached_property
    def weight(self) -> Tensor:
        """w(s), (B,) fp32."""
        return dmmd.loss_weight(self.student.process.schedule, self.s, self.student.dmmd.weighting)


class DMMDGeneratorLoss(DistillationLoss):
    """L_GEN = ``w(s) sum_d sum_c p[d,c] (l_phi - l_theta)[d,c]``: trains the student towards tokens the teacher
    finds more likely than the auxiliary does."""

    name = "gen"
    context = DMMDContext
    trains = "student"

    def __call__(self, ctx: DMMDContext) -> Tensor:
        return self.weight * dmmd.generator_loss(ctx.p, ctx.aux_log_probs, ctx.teacher_log_probs, ctx.weight,
                                                 ctx.positions)


class DMMDAuxiliaryLoss(DistillationLoss):
    """L_AUX = ``-w(s) sum_d sum_c (y + exp(l_theta))[d,c] log p_phi[d,c]``: trains the auxiliary to denoise
    the student's own samples (its minimiser is the average of that denoiser and the teacher).

    Args:
        weight: multiplies the term.
        target: y, "soft" (the student's probabilities; masked process only) or "hard" (its sampled tokens;
            required for uniform). None: soft for masked, hard for uniform.
    """

    name = "aux"
    context = DMMDContext
    trains = "auxiliary"

    def __init__(self, weight: float = 1.0, target: Literal["soft", "hard"] | None = None) -> None:
        super().__init__(weight)
        if target not in (None, "soft", "hard"):
            raise ValueError(f"DMMDAuxiliaryLoss: target='{target}' is not one of 'soft', 'hard' or null.")
        self.target = target

    def resolved_target(self, process) -> str:
        """The target kind for ``process``: ``target``, or soft for masked and hard for uniform."""
        return self.target or ("soft" if isinstance(process, MaskedProcess) else "hard")

    def check_student(self, student: DistilledStudent) -> None:
        super().check_student(student)
        if self.target == "soft" and not isinstance(student.process, MaskedProcess):
            raise ValueError(
                "DMMDAuxiliaryLoss: target='soft' is biased for the uniform process (z_s depends on every sampled "
                "token); use target='hard'."
            )

    def __call__(self, ctx: DMMDContext) -> Tensor:
        target = dmmd.aux_targets(ctx.p, ctx.x_hat, self.resolved_target(ctx.student.process))  # (B, D, V)
        return self.weight * dmmd.auxiliary_loss(ctx.aux_log_probs, ctx.teacher_log_probs, target, ctx.weight,
                                                 ctx.positions)
