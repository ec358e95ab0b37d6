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
from lightning_ddd.diffusion.draws import sample_positions
from lightning_ddd.diffusion.processes import MaskedProcess

if TYPE_CHECKING:
    from lightning_ddd.modules.dmmd_student import DMMDStudent
    from lightning_ddd.modules.mixture_student import MixtureStudent
    from lightning_ddd.modules.student import DistilledStudent

__all__ = [
    "DMMDAuxiliaryLoss",
    "DMMDContext",
    "DMMDGeneratorLoss",
    "DMMDMarginalLoss",
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

    Every Di4C sum runs over the positions masked in z_t (masked process) or over all positions (uniform),
    so the teacher and the student are evaluated at those rows only (packed, see
    :class:`~lightning_ddd.diffusion.mixture.Components`), and the student's M copies are made only of the
    sequences that have such a position. Draw order is fixed (times, z_t, then the B * M lambdas at the first
    use of ``components``), so a term that draws noise of its own reads ``components`` first.

    Attributes:
        student: the MixtureStudent.
        x: (B, D) clean ids.
        generator: the step's seeded generator.
        t: (B,) times; near: (B,) bool, True for distillation examples (t in [delta, 2 delta]).
        z_t: (B, D) noisy ids.
        mask: (B, D) positions masked in z_t (masked process), or None (uniform: every position).
        positions: (B, D) the positions that take part: ``mask``, or all of them.
    """

    def __init__(self, student: MixtureStudent, x: Tensor, generator: torch.Generator | None) -> None:
        self.student, self.x, self.generator = student, x, generator
        self.t, self.near = student.times.sample(x.shape[0], generator, student.device)  # (B,), (B,)
        self.z_t = student.process.corrupt(x, self.t, generator)  # (B, D)
        # Masked process: only positions masked in z_t take part (the rest are carried by every model).
        self.mask = self.z_t == student.process.mask_id if isinstance(student.process, MaskedProcess) else None
        self.positions = self.mask if self.mask is not None else torch.ones_like(x, dtype=torch.bool)

    @cached_property
    def teacher_log_probs(self) -> Tensor:
        """The frozen teacher's log p(x^d | z_t) at the rows, (n, V), no graph."""
        with torch.no_grad():
            return self.student.teacher.denoise(self.z_t, self.t, positions=self.positions)

    @cached_property
    def components(self) -> mixture.Components:
        """The student's M components with fresh lambdas at the rows, (M, n, V), with graph."""
        return self.student.components(self.z_t, self.t, self.generator, self.positions)


class Di4CDistillationLoss(DistillationLoss):
    """Distillation examples only: ``mean_j sum_d KL(PT^d || P_j^d)``, per-lambda KL to the teacher near the data."""

    name = "distil"
    context = Di4CContext

    def __call__(self, ctx: Di4CContext) -> Tensor:
        distil = mixture.distillation_loss(ctx.components, ctx.teacher_log_probs)  # (B,)
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
        data = mixture.data_loss(ctx.components, ctx.teacher_log_probs, ctx.x, self.a_t(ctx.t))
        return self.weight * data


class Di4CConsistencyLoss(DistillationLoss):
    """Consistency examples only: the mixture cross-entropy of the student at t against one teacher step
    t → u followed by the student at u (a fresh lambda per draw, no dropout). Costs M extra forward passes
    per consistency example that has a masked position.

    Args:
        weight: multiplies the term.
        step: the consistency step Delta = t - u.
    """

    name = "consis"
    context = Di4CContext

    #: Elements (rows x V) of the targets' log-probs computed at once: the M target components are evaluated
    #: in groups of about this size (all at once at small sizes), their marginal accumulated group by group.
    chunk_elements: int = 1 << 25

    def __init__(self, weight: float = 1.0, step: mixture.ConsistencyStep = mixture.ConsistencyStep()) -> None:
        super().__init__(weight)
        self.step = step

    def __call__(self, ctx: Di4CContext) -> Tensor:
        comps = ctx.components  # first: the components' lambdas are drawn before the targets' noise
        consis = ctx.x.new_zeros(ctx.x.shape[0], dtype=comps.log_probs.dtype)  # (B,)
        is_consis = ~ctx.near & ctx.positions.any(dim=-1)  # (B,) consistency examples with rows to score
        seqs = is_consis.nonzero().squeeze(-1)  # (R,)
        if seqs.numel() == 0:
            return consis
        target_bar, y = self.targets(ctx, seqs)  # (n_R, V), (M, n_R)
        in_r = is_consis[ctx.positions.nonzero()[:, 0]]  # (n,) rows of the consistency examples
        kl = mixture.row_kl(target_bar, comps.log_marginal[in_r])  # (n_R,)
        # Targets on every row (the other sequences' values are dropped below): the correlation needs no copy
        # of the components.
        y_all = y.new_zeros(y.shape[0], in_r.shape[0])  # (M, n)
        y_all[:, in_r] = y
        value = -comps.correlation(y_all).mean(dim=0) + comps.sum_rows(kl.new_zeros(in_r.shape).masked_scatter(in_r, kl))
        return self.weight * torch.where(is_consis, value, consis)

    @torch.no_grad()
    def targets(self, ctx: Di4CContext, seqs: Tensor) -> tuple[Tensor, Tensor]:
        """One teacher step t → u per lambda draw, then the student at u with a fresh lambda, at the rows of ``seqs``.

        Copy j of sequence r is row ``j * R + r`` of the repeated batch. The teacher's clean guess x_hat is drawn
        only where the step unmasks (masked process; every position for uniform), and y_j only at the rows, each
        by inverse CDF in float64 (one uniform per drawn row).

        Returns:
            log Qbar = logsumexp_j log Q_j - log M at the n_R rows of ``seqs`` (n_R, V), and y_j ~ prod_d Q_j^d
            there (M, n_R).
        """
        student, g = ctx.student, ctx.generator
        M, (R, D) = student.mixture.num_lambda, (seqs.numel(), ctx.x.shape[1])
        z_t, t, positions = ctx.z_t[seqs], ctx.t[seqs], ctx.positions[seqs]  # (R, D), (R,), (R, D)
        u = self.step.draw(t, g)  # (R,)
        z_u = self.teacher_step(ctx, seqs, u, M)  # (M*R, D)
        u_rep, pos_rep = u.repeat(M), positions.repeat(M, 1)  # (M*R,), (M*R, D)
        lam = student.draw_lambda(M * R, g, D)  # (M*R, [D,] C)
        n_r = int(positions.sum())
        group = max(1, self.chunk_elements // max(1, n_r * student.vocab_size))  # components per group
        was_training = student.backbone.training
        student.backbone.eval()  # the target is the student's deterministic prediction (no dropout)
        acc, draws = None, []
        for j0 in range(0, M, group):
            rows = slice(j0 * R, min(M, j0 + group) * R)  # the copies of components j0 .. j0 + group - 1
            log_q = student.denoise(z_u[rows], u_rep[rows], lam[rows], positions=pos_rep[rows])  # (c * n_R, V)
            draws.append(sample_positions(log_q[None], torch.arange(log_q.shape[0], device=log_q.device), g))
            part = log_q.view(-1, n_r, log_q.shape[-1])  # (c, n_R, V)
            part = part[0] if part.shape[0] == 1 else torch.logsumexp(part, dim=0)  # (n_R, V)
            acc = part if acc is None else torch.logaddexp(acc, part, out=acc)  # in place: one (n_R, V) buffer
            del log_q, part
        student.backbone.train(was_training)
        return acc.sub_(math.log(M)), torch.cat(draws).view(M, n_r)

    @staticmethod
    def teacher_step(ctx: Di4CContext, seqs: Tensor, u: Tensor, copies: int) -> Tensor:
        """z_u ~ q(z_u | z_t, x_hat) with x_hat ~ teacher, for ``copies`` independent copies of the ``seqs`` rows.

        Returns:
            (copies * R, D) ids; copy j of sequence r is row j * R + r.
        """
        process, g = ctx.student.process, ctx.generator
        z_rep = ctx.z_t[seqs].repeat(copies, 1)  # (C*R, D)
        t_rep, u_rep = ctx.t[seqs].repeat(copies), u.repeat(copies)  # (C*R,)
        # Row of each position in the teacher's packed log-probs (-1 outside ``positions``).
        row_of = torch.cumsum(ctx.positions.reshape(-1), 0).view_as(ctx.positions) - 1  # (B, D)
        teacher_rows = row_of[seqs].repeat(copies, 1)  # (C*R, D)
        teacher = ctx.teacher_log_probs[None]  # (1, n, V): sample_positions reads rows by flat index
        if isinstance(process, MaskedProcess):
            alpha_u = process.schedule.alpha(u_rep.double()).unsqueeze(-1)  # (C*R, 1)
            alpha_t = process.schedule.alpha(t_rep.double()).unsqueeze(-1)
            unmask = (alpha_u - alpha_t) / (1.0 - alpha_t)  # (C*R, 1): a masked position unmasks w.p. this
            draw = torch.rand(z_rep.shape, generator=g, device=z_rep.device, dtype=torch.float64)
            update = (z_rep == process.mask_id) & (draw < unmask)  # (C*R, D)
            z_u = z_rep.clone()
            z_u[update] = sample_positions(teacher, teacher_rows[update], g)
            return z_u
        x_hat = sample_positions(teacher, teacher_rows.reshape(-1), g).view_as(z_rep)  # every position (uniform)
        return process.posterior_sample(z_rep, x_hat, u_rep, t_rep, g)


# ---- D-MMD ---------------------------------------------------------------------------------------------


class DMMDContext:
    """One D-MMD draw on clean ids x (B, D): times s < t, z_t, the student's x-prediction and sample, z_s,
    and (on first use) the shaped teacher and the auxiliary at z_s.

    Networks run on the rows that matter only (their heads on those positions alone): the student at the
    positions it predicts (masked in z_t for the masked process, else all; its sample is drawn there, the
    others carry their token), the teacher and the auxiliary at the positions the losses sum over (masked in
    z_s, a subset, or all). At V = 50k and D = 1,024 each (B, D, V) tensor not built saves gigabytes.

    Attributes:
        student: the DMMDStudent.
        x: (B, D) clean ids.
        trains: the model whose forward pass keeps a graph ("student", "auxiliary"), or None (neither).
        s, t: (B,) float64 times, s < t.
        z_t: (B, D) noisy ids; noise: the student's extra input (noise, and the step for a step-aware
            student; ``DMMDStudent.draw_condition``), or None.
        predicted: (B, D) bool, the positions the student predicts (n_t of them).
        log_p, p: (n_t, V) the student's x-prediction there (log and probabilities).
        x_hat: (B, D) the student's sample (drawn by inverse CDF in float64; z_t's token where carried).
        z_s: (B, D) the posterior draw from z_t given x_hat.
    """

    def __init__(self, student: DMMDStudent, x: Tensor, generator: torch.Generator | None,
                 trains: Literal["student", "auxiliary"] | None = None) -> None:
        B = x.shape[0]
        self.student, self.x, self.trains, self.generator = student, x, trains, generator
        self.s, self.t = student.draw_step_times(B, generator)  # (B,) each, float64
        self.z_t = student.process.corrupt(x, self.t, generator)  # (B, D)
        self.noise = student.draw_condition(B, generator, self.t, self.s)  # (B, D, C), (B, C) or None
        self.predicted = _rows_mask(dmmd.loss_positions(self.z_t, student.process), x)  # (B, D)
        self.log_p = self.student_log_probs(self.noise)  # (n_t, V)
        self.p = self.log_p.exp()
        drawn = sample_positions(self.log_p.detach()[None], torch.arange(self.log_p.shape[0], device=x.device),
                                 generator)  # (n_t,) one float64 uniform per row
        self.x_hat = self.z_t.masked_scatter(self.predicted, drawn)  # (B, D)
        self.z_s = student.process.posterior_sample(self.z_t, self.x_hat, self.s, self.t, generator)  # (B, D)

    @cached_property
    def positions(self) -> Tensor | None:
        """(B, D) positions the losses sum over: masked in z_s (masked process), else None (all)."""
        return dmmd.loss_positions(self.z_s, self.student.process)

    @cached_property
    def loss_rows(self) -> Tensor:
        """(B, D) bool, ``positions`` or every position (n_s of them)."""
        return _rows_mask(self.positions, self.x)

    @cached_property
    def in_loss(self) -> Tensor:
        """(n_t,) bool: which of the student's rows the losses sum over (masked in z_s implies masked in z_t)."""
        return self.loss_rows[self.predicted]

    @cached_property
    def teacher_log_probs(self) -> Tensor:
        """l_theta at z_s, (n_s, V) at ``loss_rows``: the frozen teacher with the student's ``teacher_shaping``."""
        return self.student.teacher_log_probs(self.z_s, self.s, positions=self.loss_rows)

    @cached_property
    def aux_log_probs(self) -> Tensor:
        """l_phi at z_s, (n_s, V) at ``loss_rows``; with a graph only when the auxiliary trains."""
        with torch.set_grad_enabled(self.trains == "auxiliary" and torch.is_grad_enabled()):
            return self.student.aux_log_probs(self.z_s, self.s, positions=self.loss_rows)

    @cached_property
    def weight(self) -> Tensor:
        """w(s), (B,) fp32."""
        return dmmd.loss_weight(self.student.process.schedule, self.s, self.student.dmmd.weighting)

    def student_log_probs(self, noise: Tensor | None) -> Tensor:
        """The student's x-prediction at z_t given its extra input, (n_t, V) log-probabilities at ``predicted``;
        with a graph only when the student trains."""
        with torch.set_grad_enabled(self.trains == "student" and torch.is_grad_enabled()):
            return self.student.denoise(self.z_t, self.t.float(), noise, positions=self.predicted)

    @cached_property
    def second_p(self) -> Tensor:
        """The student's x-prediction at the same z_t with a second, independent noise draw (the same step
        input), (n_t, V) probabilities at ``predicted``."""
        noise = self.student.draw_condition(self.x.shape[0], self.generator, self.t, self.s)
        return self.student_log_probs(noise).exp()

    @cached_property
    def teacher_probs_t(self) -> Tensor:
        """The shaped teacher's x-prediction at z_t, (n_t, V) probabilities at ``predicted``, no graph."""
        return self.student.teacher_log_probs(self.z_t, self.t, positions=self.predicted).exp()

    @cached_property
    def weight_t(self) -> Tensor:
        """w(t), (B,) fp32."""
        return dmmd.loss_weight(self.student.process.schedule, self.t, self.student.dmmd.weighting)

    def sum_rows(self, values: Tensor) -> Tensor:
        """Per-sequence sums of values at ``loss_rows``: (n_s,) → (B,)."""
        return dmmd.sum_rows(values, self.loss_rows, tuple(self.x.shape))

    def student_entropy(self) -> Tensor:
        """Mean entropy of the student's x-prediction over the positions it predicts (0 if none), no graph."""
        with torch.no_grad():
            entropy = -torch.special.xlogy(self.p, self.p).sum(-1)  # (n_t,)
            return entropy.sum() / max(1, entropy.numel())

    def aux_teacher_gap(self) -> Tensor:
        """Mean KL(teacher || auxiliary) over the positions the losses sum over (0 if none), no graph."""
        with torch.no_grad():
            l_theta, l_phi = self.teacher_log_probs, self.aux_log_probs
            kl = torch.special.xlogy(l_theta.exp(), l_theta.exp()).sum(-1) - torch.einsum(
                "...v,...v->...", l_theta.exp(), l_phi)  # (n_s,)
            return kl.sum() / max(1, kl.numel())


def _rows_mask(positions: Tensor | None, x: Tensor) -> Tensor:
    """``positions`` (B, D) bool, or every position of x when None."""
    return positions if positions is not None else torch.ones_like(x, dtype=torch.bool)


class DMMDGeneratorLoss(DistillationLoss):
    """L_GEN = ``w(s) sum_d sum_c p[d,c] (l_phi - l_theta)[d,c]``: trains the student towards tokens the teacher
    finds more likely than the auxiliary does."""

    name = "gen"
    context = DMMDContext
    trains = "student"

    def __call__(self, ctx: DMMDContext) -> Tensor:
        per_row = dmmd.expected_cost(ctx.p[ctx.in_loss], ctx.aux_log_probs, ctx.teacher_log_probs)  # (n_s,)
        return self.weight * (ctx.weight * ctx.sum_rows(per_row))


class DMMDMarginalLoss(DistillationLoss):
    """Marginal consistency, ``w(t) sum_d ||E_eps p[d] - p_theta(. | z_t)[d]||^2`` estimated without bias.

    Whatever correlations a few-step sampler draws through its noise, each token it reveals from z_t must
    follow the teacher's x-prediction at z_t on its own: averaged over the noise, the student's
    x-prediction is the teacher's, at every step size. The D-MMD generator loss is linear in p and has no
    term that says so; this one does, with no penalty on how the noise correlates positions: with two
    independent noise draws p1, p2 at the same z_t, ``(p1 - r) . (p2 - r)`` has expectation
    ``||E p - r||^2`` (r = the shaped teacher at z_t; one draw's value, logged as ``train/loss_marginal``, can
    be negative). Costs one more student and one teacher pass per student update. The project's
    addition, not the paper's: see ``configs/quickstart/dmmd_step_aware.yaml`` for what it changes.

    Args:
        weight: multiplies the term.
    """

    name = "marginal"
    context = DMMDContext
    trains = "student"

    def __call__(self, ctx: DMMDContext) -> Tensor:
        r = ctx.teacher_probs_t  # (n_t, V)
        d2 = ctx.second_p - r  # (n_t, V)
        # (p1 - r) . d2 as p1 . d2 - r . d2: backward keeps d2 and tensors that exist anyway, where a second
        # difference (p1 - r) would keep one more (n_t, V). The gradients are the same tensors (d2, and p1 - r
        # formed in backward); only the value loses precision to the two products' cancellation (fp32 at
        # V = 50,257, rows near 5e-7: errors near 1e-9, 0.2% of a row, against 4e-11 for the plain form).
        per_row = torch.einsum("nv,nv->n", ctx.p, d2) - torch.einsum("nv,nv->n", r, d2)  # (n_t,)
        return self.weight * (ctx.weight_t * dmmd.sum_rows(per_row, ctx.predicted, tuple(ctx.x.shape)))


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
        if self.resolved_target(ctx.student.process) == "soft":
            target = ctx.p.detach()[ctx.in_loss]  # (n_s, V) the student's x-prediction
        else:
            target = ctx.x_hat[ctx.loss_rows]  # (n_s,) its sample: a one-hot target, by id
        per_row = dmmd.auxiliary_cross_entropy(ctx.aux_log_probs, ctx.teacher_log_probs, target)  # (n_s,)
        return self.weight * (ctx.weight * ctx.sum_rows(per_row))
