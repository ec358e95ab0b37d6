"""The Di4C mixture student (Hayakawa et al., ICML 2025): a teacher copy that takes a latent lambda ~ U(0, 1)
(the paper's) or N(0, I) (``MixtureSettings.latent``).

``p_theta(x | z_t) = E_lambda prod_d p_theta^d(x^d | z_t, lambda)``: one lambda per sequence, shared by all
positions, embedded as sinusoids of 1000 lambda (a Gaussian lambda as it is) and fed through the backbone's
zero-initialised ``cond_proj`` MLP, so the untrained student is exactly the teacher. The maths lives in
:mod:`lightning_ddd.diffusion.mixture`, the three loss terms in :mod:`lightning_ddd.modules.student_losses`;
this module draws the lambdas, runs the networks and combines the terms.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_ddd.diffusion.mixture import Components, Di4CTimes
from lightning_ddd.diffusion.sampling import SampleOutput, sample
from lightning_ddd.modules.student import DistilledStudent, TeacherOptions
from lightning_ddd.modules.student_losses import (
    Di4CConsistencyLoss,
    Di4CContext,
    Di4CDataLoss,
    Di4CDistillationLoss,
    DistillationLoss,
)
from lightning_ddd.nn.transformer import sinusoids


def lambda_features(lam: Tensor, dim: int, seq_len: int = 0, position_dim: int = 0) -> Tensor:
    """The lambda input: for a uniform lambda (N,), sinusoids of ``1000 lambda`` (the diffusion-time
    embedding's formula), (N, dim); a Gaussian lambda (N, dim) as it is. With ``position_dim > 0``, per position
    with sinusoids of the position appended, (N, seq_len, dim + position_dim).
    """
    feats = sinusoids(1000.0 * lam, dim) if lam.dim() == 1 else lam  # (N, dim)
    if position_dim == 0:
        return feats
    pos = sinusoids(torch.arange(seq_len, device=lam.device), position_dim)  # (L, position_dim)
    N = feats.shape[0]
    return torch.cat([feats[:, None, :].expand(N, seq_len, dim), pos[None].expand(N, seq_len, position_dim)], dim=-1)


@dataclass(frozen=True)
class MixtureSettings:
    """The latent lambda of a mixture student: how many draws per input and how it is fed to the backbone.

    Args:
        num_lambda: M, lambda draws per training input (the batch is repeated M times; 16 in the paper).
        lambda_dim: uniform latent: number of sinusoidal features of 1000 lambda fed to the backbone's
            ``cond_proj`` MLP; Gaussian latent: the dimension of lambda, fed as it is.
        latent: the prior of lambda: ``uniform``, the paper's scalar U(0, 1); ``gaussian``, N(0, I) in
            ``lambda_dim`` dimensions (the project's option: a latent with several independent directions,
            which the quickstart measured slightly better; README, "Few-step distillation").
        position_dim: if > 0, the lambda input is given per position with this many sinusoidal features of
            the position appended, so the MLP can give lambda a different effect at each position (the
            backbone's attention only sees relative positions, and with a shared additive input every
            position of an all-masked sequence is identical). 0: one shared lambda embedding.
        lambda_init_std: std of the first layer of the lambda MLP, in units of 1 / |features|
            (1: unit-variance pre-activations). Its last layer starts at zero whatever this is.
    """

    num_lambda: int = 16
    lambda_dim: int = 128
    latent: Literal["uniform", "gaussian"] = "uniform"
    position_dim: int = 0
    lambda_init_std: float = 1.0

    def __post_init__(self) -> None:
        if self.num_lambda < 1:
            raise ValueError(f"MixtureSettings: num_lambda={self.num_lambda} must be >= 1.")
        if self.latent not in ("uniform", "gaussian"):
            raise ValueError(f"MixtureSettings: latent={self.latent!r} must be 'uniform' or 'gaussian'.")
        if self.lambda_dim < 1 or (self.latent == "uniform" and (self.lambda_dim < 2 or self.lambda_dim % 2)):
            raise ValueError(f"MixtureSettings: lambda_dim={self.lambda_dim} must be >= 1 (gaussian) or even and "
                             ">= 2 (uniform: sinusoid pairs).")
        if self.position_dim < 0 or self.position_dim % 2:
            raise ValueError(f"MixtureSettings: position_dim={self.position_dim} must be even and >= 0.")


def di4c_losses() -> list[DistillationLoss]:
    """The paper's objective: distillation, data and consistency terms, weight 1 each, default settings."""
    return [Di4CDistillationLoss(), Di4CDataLoss(), Di4CConsistencyLoss()]


class HybridDenoiser:
    """Student for t > ``switch_time``, teacher from there on (the teacher takes the last steps).

    Rows are routed by their own time, so a batch may mix both; the teacher gets no ``cond``.
    """

    def __init__(self, student: Callable[..., Tensor], teacher: Callable[..., Tensor], switch_time: float) -> None:
        self.student, self.teacher, self.switch_time = student, teacher, switch_time

    def __call__(self, z_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        use_teacher = t <= self.switch_time + 1e-6  # (B,); the grid times k/n carry float32 round-off
        if bool(use_teacher.all()):
            return self.teacher(z_t, t)
        if not bool(use_teacher.any()):
            return self.student(z_t, t, cond)
        out = self.student(z_t, t, cond).clone()  # (B, D, V)
        rows = use_teacher.nonzero().squeeze(-1)
        out[rows] = self.teacher(z_t[rows], t[rows])
        return out


class MixtureStudent(DistilledStudent):
    """Di4C: distils a product-form teacher into a mixture of products that samples well in few steps.

    Each training example gets its own time and role (``times``): w.p. ``distil_prob`` a distillation example
    near the data (tau ~ U[delta, 2 delta]), else a consistency example (t ~ U[delta, 1]). The objective is
    the sum of ``losses``, by default the paper's three terms: distillation (per-lambda KL to the teacher,
    distillation examples), data (every example) and consistency (the student at t must match one teacher
    step t → u followed by the student at u; consistency examples). The teacher's log-probs and the M
    components are computed once per step and shared by the terms (:class:`Di4CContext`).

    Logs ``train/loss`` and one ``train/loss_<name>`` per term (``loss_distil``, ``loss_data``,
    ``loss_consis``: weighted contributions in nats per token, summing to the loss), and the same under
    ``val/`` on fixed noise, plus ``data_correlation``: the mean correlation term C(x_data) per token (> 0
    once the mixture explains the data better than its own marginals do).

    Args:
        teacher_ckpt: the teacher: a lightning_ddd ``.ckpt`` (not ``ckpt_path``, which resumes the student), a hub
            id (e.g. ``kuleshov-group/mdlm-owt``) or a local directory in the hub's layout.
        vocab_size: linked from the data; must equal the teacher's.
        seq_len: linked from the data; must equal the teacher's.
        mixture: the latent lambda: number of draws M and its input features.
        times: per-example times and roles (delta, distil_prob).
        losses: the terms of the objective (``DistillationLoss`` subclasses reading a ``Di4CContext``), each
            with its weight and settings. Default: ``Di4CDistillationLoss``, ``Di4CDataLoss``,
            ``Di4CConsistencyLoss`` with their defaults.
        hybrid_teacher_steps: k, the number of final sampling steps taken by the teacher (0: student only).
        optimizer: optimiser of the student's parameters.
        lr_scheduler: optional LR schedule, stepped every optimiser step.
        seed: seed of the training noise.
        teacher_sha256: expected hash of the teacher file or directory (leave unset; see ``DistilledStudent``).
        teacher_options: how a released teacher is loaded (revision, trust_remote_code, ...) and the dropout of
            the student's copy.
    """

    context_class = Di4CContext

    def __init__(
        self,
        teacher_ckpt: str,
        vocab_size: int | None = None,
        seq_len: int | None = None,
        mixture: MixtureSettings = MixtureSettings(),
        times: Di4CTimes = Di4CTimes(),
        losses: list[DistillationLoss] | None = None,
        hybrid_teacher_steps: int = 0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
        teacher_sha256: str | None = None,
        teacher_options: TeacherOptions = TeacherOptions(),
    ) -> None:
        if hybrid_teacher_steps < 0:
            raise ValueError(f"MixtureStudent: hybrid_teacher_steps={hybrid_teacher_steps} must be >= 0.")
        super().__init__(teacher_ckpt, vocab_size, seq_len, optimizer, lr_scheduler, seed, teacher_sha256,
                         losses=di4c_losses() if losses is None else losses, teacher_options=teacher_options)
        if getattr(self.backbone, "cond_proj", None) is not None:
            raise ValueError("MixtureStudent: the teacher's backbone already has a conditioning input; distil a plain teacher.")
        cond_dim = mixture.lambda_dim + mixture.position_dim
        self.backbone.add_cond_input(cond_dim)  # zero-initialised: the student starts as the teacher
        # At the start every component is the teacher, a stationary point of all three losses: lambda gets a
        # use only through second-order terms whose size is the gain of the lambda path. The hook's first
        # layer (std 0.02) would leave that gain ~1e-2; scale it to the features (the sinusoid vector has
        # squared norm cond_dim / 2; a Gaussian lambda adds lambda_dim / 2 more). Its last layer stays at zero.
        nn.init.normal_(self.backbone.cond_proj[0].weight, std=mixture.lambda_init_std * (2.0 / cond_dim) ** 0.5)
        self.mixture, self.times = mixture, times
        self.hybrid_teacher_steps = hybrid_teacher_steps

    # ---- the mixture -------------------------------------------------------------------------------
    def prior_lambda(self, *shape: int, generator: torch.Generator | None) -> Tensor:
        """Fresh lambdas from the prior: U(0, 1), ``shape``; or N(0, I), (*shape, lambda_dim)."""
        if self.mixture.latent == "gaussian":
            return torch.randn(*shape, self.mixture.lambda_dim, generator=generator, device=self.device)
        return torch.rand(*shape, generator=generator, device=self.device)

    def draw_lambda(self, num: int, generator: torch.Generator | None, length: int | None = None) -> Tensor:
        """Fresh lambdas from the prior, embedded: (num, C), or (num, length, C + position_dim)."""
        lam = self.prior_lambda(num, generator=generator)
        return lambda_features(lam, self.mixture.lambda_dim, length or self.seq_len, self.mixture.position_dim)

    def components(
        self, z_t: Tensor, t: Tensor, generator: torch.Generator | None, positions: Tensor | None = None
    ) -> Components:
        """The M components with fresh lambdas at ``positions`` (B, D) (None: all), packed (M, n, V).

        B * M lambdas are drawn (lambda_{b, j} the (b M + j)-th draw) whatever the positions; the backbone runs on
        the M copies of the sequences that have a position only, and its head on those positions only.
        """
        M, (B, D) = self.mixture.num_lambda, z_t.shape
        if positions is None:
            positions = torch.ones_like(z_t, dtype=torch.bool)
        lam = self.prior_lambda(B, M, generator=generator)  # (B, M[, C])
        seqs = positions.any(dim=-1).nonzero().squeeze(-1)  # (A,) sequences with a row
        # Component-major copies: copy j of sequence a is row j * A + a, so the output's rows are (j, a, d).
        lam = lam[seqs].transpose(0, 1).reshape(M * seqs.numel(), *lam.shape[2:])  # (M*A[, C])
        cond = lambda_features(lam, self.mixture.lambda_dim, D, self.mixture.position_dim)  # (M*A, [D,] C)
        z, tt, pos = z_t[seqs].repeat(M, 1), t[seqs].repeat(M), positions[seqs].repeat(M, 1)
        out = self.denoise(z, tt, cond, positions=pos)  # (M * n, V)
        return Components(out.view(M, -1, out.shape[-1]), positions)

    def step_condition(self, num_samples: int, generator: torch.Generator | None) -> Tensor:
        """A fresh lambda per sample at every sampling step, from the sampler's generator."""
        return self.draw_lambda(num_samples, generator)

    # ---- the losses --------------------------------------------------------------------------------
    def compute_losses(self, x: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        """The sum of the terms (nats per token), each term, and the data's correlation term (not optimised)."""
        D = x.shape[1]
        ctx = Di4CContext(self, x, generator)
        terms = {name: value / D for name, value in self.loss_terms(ctx).items()}  # (B,) each, nats per token
        out = {"loss": functools.reduce(operator.add, terms.values()).float().mean()}
        out.update({f"loss_{name}": value.float().mean() for name, value in terms.items()})
        with torch.no_grad():
            comps = ctx.components
            out["data_correlation"] = (comps.correlation(comps.rows(x)[None])[0] / D).float().mean()
        return out

    # ---- sampling ----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, num_samples: int, num_steps: int, **kwargs: Any) -> SampleOutput:
        """Sample with a fresh lambda per sample and step; with ``hybrid_teacher_steps = k`` the teacher takes
        the last k of the ``num_steps`` steps. Keyword arguments go to :func:`lightning_ddd.diffusion.sampling.sample`."""
        k = min(self.hybrid_teacher_steps, num_steps)
        denoiser = self.denoise if k == 0 else HybridDenoiser(self.denoise, self.teacher.denoise, k / num_steps)
        return sample(
            denoiser, self.process, num_samples, self.seq_len, num_steps, device=self.device,
            step_condition=self.step_condition, **kwargs,
        )
