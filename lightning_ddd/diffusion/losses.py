"""Teacher training objectives: upper bounds on -log p_theta(x), estimated per sequence.

Every loss maps (denoiser, clean ids x (B, D), process) to a (B,) tensor of per-sequence bounds in nats
whose expectation over the loss's randomness is the bound; divide by D for per-token numbers. Times,
masking levels and mask counts are stratified across the batch (``(u + i) / B``) to lower variance.

A denoiser is a callable ``(z_t (B, D) ids, t (B,) times or None) -> log p_theta(x | z_t) (B, D, V)`` in fp32.
The masked losses follow RADD (Ou et al., 2025): the network is time-independent, and t-DCE, lambda-DCE
and the any-order (AO) loss are equal in expectation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_ddd.diffusion.processes import DiscreteProcess, MaskedProcess, UniformProcess

Denoiser = Callable[[Tensor, "Tensor | None"], Tensor]


def stratified_uniform(batch_size: int, generator: torch.Generator | None = None, device="cpu") -> Tensor:
    """(B,) draws ``(u + i) / B`` in (0, 1), one per stratum, in a random order."""
    u = torch.rand(1, generator=generator, device=device)
    perm = torch.randperm(batch_size, generator=generator, device=device)
    return (u + perm) / batch_size


def masked_cross_entropy(log_probs: Tensor, x: Tensor, z: Tensor, mask_id: int) -> Tensor:
    """``sum_{d masked in z} -log p(x^d | z)``: (B, D, V), (B, D), (B, D) → (B,)."""
    nll = -log_probs.gather(-1, x.unsqueeze(-1)).squeeze(-1)  # (B, D)
    return torch.where(z == mask_id, nll, torch.zeros_like(nll)).sum(-1)


class TeacherLoss(ABC):
    """Base class of teacher objectives; subclass and select with ``class_path`` to plug in a new one."""

    #: whether the loss feeds no time to the denoiser (RADD's time-independent network)
    time_independent: bool = False

    def check_process(self, process: DiscreteProcess) -> None:
        """Raise a clear error if this loss does not apply to ``process``."""

    @abstractmethod
    def __call__(
        self, denoiser: Denoiser, x: Tensor, process: DiscreteProcess, generator: torch.Generator | None = None
    ) -> Tensor:
        """Per-sequence upper bound on -log p(x), (B,), in nats."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class _MaskedLoss(TeacherLoss):
    def check_process(self, process: DiscreteProcess) -> None:
        if not isinstance(process, MaskedProcess):
            raise ValueError(
                f"{type(self).__name__} is a masked-diffusion loss but the process is {type(process).__name__}; "
                "use UniformELBO for the uniform process."
            )


class TimeDCE(_MaskedLoss):
    """t-DCE / continuous-time ELBO: ``E_t w(t) sum_{d masked} -log p(x^d | z_t)``, t stratified on [t_min, 1].

    In masking level lambda = 1 - alpha_t this is the lambda-DCE restricted to lambda in
    [1 - alpha(t_min), 1 - alpha_1]: equal to it in expectation when alpha_1 = 0 and t_min = 0, and slightly
    smaller otherwise (log-linear with eps = 1e-3 leaves out masking levels above 0.999).

    Args:
        t_min: smallest time drawn.
    """

    def __init__(self, t_min: float = 0.0) -> None:
        if not 0.0 <= t_min < 1.0:
            raise ValueError(f"TimeDCE: t_min={t_min} must lie in [0, 1).")
        self.t_min = t_min

    def __call__(self, denoiser, x, process, generator=None):
        t = self.t_min + (1.0 - self.t_min) * stratified_uniform(x.shape[0], generator, x.device)  # (B,)
        z = process.corrupt(x, t, generator)
        ce = masked_cross_entropy(denoiser(z, t), x, z, process.mask_id)
        return process.schedule.weight(t) * ce


class LambdaDCE(_MaskedLoss):
    """lambda-DCE (RADD): ``E_{lambda ~ U(0,1)} (1/lambda) sum_{d masked} -log p(x^d | z_lambda)``, each dim
    masked w.p. lambda. Needs a time-independent network."""

    time_independent = True

    def __call__(self, denoiser, x, process, generator=None):
        lam = stratified_uniform(x.shape[0], generator, x.device)  # (B,)
        u = torch.rand(x.shape, generator=generator, device=x.device)
        z = torch.where(u < lam.unsqueeze(-1), torch.full_like(x, process.mask_id), x)
        return masked_cross_entropy(denoiser(z, None), x, z, process.mask_id) / lam


class AnyOrderLoss(_MaskedLoss):
    """Any-order autoregressive bound (RADD): k ~ U{1..D}, mask exactly k random dims, weight D / k.
    The lowest-variance masked estimator; needs a time-independent network."""

    time_independent = True

    def __call__(self, denoiser, x, process, generator=None):
        D = x.shape[1]
        k = (stratified_uniform(x.shape[0], generator, x.device) * D).floor().long() + 1  # (B,) in 1..D
        z = process.mask_exactly(x, k, generator)
        return masked_cross_entropy(denoiser(z, None), x, z, process.mask_id) * (D / k)


class UniformELBO(TeacherLoss):
    """Discrete-time ELBO of uniform diffusion on the grid t_i = i / T (a true upper bound on the NLL of the
    T-step ancestral sampler on that grid):

        KL(q(z_1|x) || U) + sum_{i=1..T} E KL(q(z_{t_{i-1}} | z_{t_i}, x) || p_theta(z_{t_{i-1}} | z_{t_i}))
        [+ E -log p_theta(x | z_0) when alpha_0 < 1],

    with the sum estimated by one stratified draw of i per sequence, scaled by the number of terms.

    Args:
        num_steps: T, the number of discrete steps.
    """

    def __init__(self, num_steps: int = 1000) -> None:
        if num_steps < 1:
            raise ValueError(f"UniformELBO: num_steps={num_steps} must be >= 1.")
        self.num_steps = num_steps

    def check_process(self, process):
        if not isinstance(process, UniformProcess):
            raise ValueError(
                f"UniformELBO is the uniform-diffusion loss but the process is {type(process).__name__}; "
                "use TimeDCE, LambdaDCE or AnyOrderLoss for the masked process."
            )

    def __call__(self, denoiser, x, process, generator=None):
        T = self.num_steps
        with_recon = bool(process.schedule.alpha(torch.zeros(())) < 1.0)
        first = 0 if with_recon else 1  # term 0 is the reconstruction term -log p(x | z_0)
        num_terms = T + 1 - first
        i = (stratified_uniform(x.shape[0], generator, x.device) * num_terms).floor().long() + first  # (B,)
        t = i.float() / T
        s = (i - 1).clamp_min(0).float() / T
        z_t = process.corrupt(x, t, generator)
        log_p = denoiser(z_t, t)  # (B, D, V)
        # KL(q || p_theta) per dimension; q is the exact posterior given the true x.
        q = process.posterior_probs(z_t, F.one_hot(x, process.vocab_size).double(), s, t)
        p = process.posterior_probs(z_t, log_p.double().exp(), s, t)
        kl = torch.where(q > 0, q * (q.log() - p.clamp_min(1e-300).log()), torch.zeros_like(q)).sum((-1, -2))
        recon = -log_p.gather(-1, x.unsqueeze(-1)).squeeze(-1).sum(-1).double()
        term = torch.where(i == 0, recon, kl)
        return (process.prior_kl(x) + num_terms * term).to(log_p.dtype)
