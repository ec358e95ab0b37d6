"""Teacher training objectives: upper bounds on -log p_theta(x), estimated per sequence.

Every loss maps (denoiser, clean ids x (B, D), process) to a (B,) tensor of per-sequence bounds in nats
whose expectation over the loss's randomness is the bound; divide by D for per-token numbers. Times,
masking levels and mask counts are stratified across the batch (``(u + i) / B``) to lower variance.

A denoiser is a callable ``(z_t (B, D) ids, t (B,) times or None) -> log p_theta(x | z_t) (B, D, V)`` in fp32.
One that also takes a ``positions`` keyword ((B, D) bool, e.g. ``DiffusionModule.denoise``) returns the N
rows at those positions, (N, V); the masked losses ask it for the masked positions only, the only rows they
read. The masked losses follow RADD (Ou et al., 2025): the network is time-independent, and t-DCE,
lambda-DCE and the any-order (AO) loss are equal in expectation.
"""

from __future__ import annotations

import inspect
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


def takes_positions(denoiser: Callable) -> bool:
    """Whether ``denoiser`` accepts a ``positions`` keyword (and then returns the rows at those positions)."""
    try:
        return "positions" in inspect.signature(denoiser).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False


def masked_nll(denoiser: Denoiser, z: Tensor, t: Tensor | None, x: Tensor, mask_id: int) -> Tensor:
    """``sum_{d masked in z} -log p_theta(x^d | z)`` per sequence, (B,): ``masked_cross_entropy`` of the denoiser's
    output, with a denoiser that takes ``positions`` asked for the masked rows only ((N, V) instead of (B, D, V))."""
    if not takes_positions(denoiser):
        return masked_cross_entropy(denoiser(z, t), x, z, mask_id)
    masked = z == mask_id  # (B, D)
    log_probs = denoiser(z, t, positions=masked)  # (N, V), row-major over the masked positions
    nll = -log_probs.gather(-1, x[masked].unsqueeze(-1)).squeeze(-1)  # (N,)
    # Scattered back to (B, D) with zeros elsewhere, so the sum over D runs as in masked_cross_entropy.
    return torch.zeros(x.shape, dtype=nll.dtype, device=x.device).masked_scatter(masked, nll).sum(-1)


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
        return process.schedule.weight(t) * masked_nll(denoiser, z, t, x, process.mask_id)


class LambdaDCE(_MaskedLoss):
    """lambda-DCE (RADD): ``E_{lambda ~ U(0,1)} (1/lambda) sum_{d masked} -log p(x^d | z_lambda)``, each dim
    masked w.p. lambda. Needs a time-independent network."""

    time_independent = True

    def __call__(self, denoiser, x, process, generator=None):
        lam = stratified_uniform(x.shape[0], generator, x.device)  # (B,)
        u = torch.rand(x.shape, generator=generator, device=x.device)
        z = torch.where(u < lam.unsqueeze(-1), torch.full_like(x, process.mask_id), x)
        return masked_nll(denoiser, z, None, x, process.mask_id) / lam


class AnyOrderLoss(_MaskedLoss):
    """Any-order autoregressive bound (RADD): k ~ U{1..D}, mask exactly k random dims, weight D / k.
    The lowest-variance masked estimator; needs a time-independent network."""

    time_independent = True

    def __call__(self, denoiser, x, process, generator=None):
        D = x.shape[1]
        k = (stratified_uniform(x.shape[0], generator, x.device) * D).floor().long() + 1  # (B,) in 1..D
        z = process.mask_exactly(x, k, generator)
        return masked_nll(denoiser, z, None, x, process.mask_id) * (D / k)


class UniformELBO(TeacherLoss):
    """Discrete-time ELBO of uniform diffusion on the grid t_i = i / T (a true upper bound on the NLL of the
    T-step ancestral sampler on that grid):

        KL(q(z_1|x) || U) + sum_{i=1..T} E KL(q(z_{t_{i-1}} | z_{t_i}, x) || p_theta(z_{t_{i-1}} | z_{t_i}))
        [+ E -log p_theta(x | z_0) when alpha_0 < 1],

    with the sum estimated by one stratified draw of i per sequence, scaled by the number of terms. The grid
    is computed in float64 (in float32, i / T is off by up to 6e-8, which at T = 1,000 shortens a step by
    about 1e-5 of its length); the network gets t in float32. The per-dimension KLs run in float64 on row
    chunks of bounded size (``posterior_kl``), so no float64 (B, D, V) tensor is built.

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
        t = i.double() / T  # (B,) float64 grid
        s = (i - 1).clamp_min(0).double() / T
        z_t = process.corrupt(x, t, generator)
        log_p = denoiser(z_t, t.float())  # (B, D, V)
        kl = posterior_kl(process, log_p, z_t, x, s, t).sum(-1)  # (B,) float64
        recon = -log_p.gather(-1, x.unsqueeze(-1)).squeeze(-1).sum(-1).double()
        term = torch.where(i == 0, recon, kl)
        return (process.prior_kl(x) + num_terms * term).to(log_p.dtype)


# ---- the posterior KL on row chunks ----------------------------------------------------------------------

#: Elements of (rows, V) per chunk of the posterior KL (2**21: each float64 temporary is 16 MB).
KL_CHUNK_ELEMENTS = 1 << 21


def _posterior_kl_rows(process: DiscreteProcess, log_p: Tensor, z: Tensor, x: Tensor, s: Tensor, t: Tensor) -> Tensor:
    """``KL(q(z_s | z_t, x) || sum_x' p(x') q(z_s | z_t, x'))`` per row, float64: (n, V), (n,) x 4 → (n,)."""
    V = log_p.shape[-1]
    z, x = z.unsqueeze(-1), x.unsqueeze(-1)  # (n, 1): each row is a batch of one position
    q = process.posterior_probs(z, F.one_hot(x, V).double(), s, t)  # (n, 1, V_in) exact posterior
    p = process.posterior_probs(z, log_p.double().exp().unsqueeze(1), s, t)  # the model's
    kl = torch.where(q > 0, q * (q.log() - p.clamp_min(1e-300).log()), torch.zeros_like(q))
    return kl.sum((-1, -2))


class _PosteriorKL(torch.autograd.Function):
    """``_posterior_kl_rows`` over every (b, d), a chunk of rows at a time; backward recomputes each chunk.

    The float64 temporaries of a chunk live only while it is computed, in forward and again in backward,
    so memory beyond ``log_p`` and its gradient is O(chunk V) whatever B and D are.
    """

    @staticmethod
    def forward(ctx, log_p: Tensor, z_t: Tensor, x: Tensor, s: Tensor, t: Tensor, process: DiscreteProcess):
        ctx.process = process
        ctx.save_for_backward(log_p, z_t, x, s, t)
        out = torch.empty(z_t.shape, dtype=torch.float64, device=z_t.device)  # (B, D)
        for rows, args in _kl_chunks(log_p, z_t, x, s, t):
            out.view(-1)[rows] = _posterior_kl_rows(process, *args)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        log_p, z_t, x, s, t = ctx.saved_tensors
        grad_log_p = torch.empty_like(log_p)  # (B, D, V)
        flat_grad, out = grad.reshape(-1), grad_log_p.view(-1, log_p.shape[-1])
        for rows, (lp, *args) in _kl_chunks(log_p, z_t, x, s, t):
            with torch.enable_grad():
                lp = lp.detach().requires_grad_()
                kl = _posterior_kl_rows(ctx.process, lp, *args)  # (n,)
                (out[rows],) = torch.autograd.grad(kl, lp, flat_grad[rows])
        return grad_log_p, None, None, None, None, None


def _kl_chunks(log_p: Tensor, z_t: Tensor, x: Tensor, s: Tensor, t: Tensor):
    """Yield ``(slice of flat rows, (log_p rows (n, V), z (n,), x (n,), s (n,), t (n,)))`` chunk by chunk."""
    B, D, V = log_p.shape
    flat = log_p.reshape(B * D, V)
    s, t = s.reshape(B, 1).expand(B, D).reshape(-1), t.reshape(B, 1).expand(B, D).reshape(-1)
    z_t, x = z_t.reshape(-1), x.reshape(-1)
    step = max(1, KL_CHUNK_ELEMENTS // V)
    for start in range(0, B * D, step):
        rows = slice(start, start + step)
        yield rows, (flat[rows], z_t[rows], x[rows], s[rows], t[rows])


def posterior_kl(process: DiscreteProcess, log_p: Tensor, z_t: Tensor, x: Tensor, s: Tensor, t: Tensor) -> Tensor:
    """Per-dimension ``KL(q(z_s | z_t, x) || p_theta(z_s | z_t))`` in float64, differentiable in ``log_p``.

    ``p_theta(z_s | z_t) = sum_x' p_theta(x' | z_t) q(z_s | z_t, x')`` (``process.posterior_probs``). Computed
    on chunks of rows, so the float64 work needs O(chunk V) memory rather than several (B, D, V) tensors.

    Args:
        process: the forward process.
        log_p: (B, D, V) log p_theta(x | z_t), fp32 or float64.
        z_t: (B, D) noisy ids; x: (B, D) clean ids.
        s, t: (B,) times, s < t.

    Returns:
        (B, D) float64 KLs (sum over D for the per-sequence term).
    """
    return _PosteriorKL.apply(log_p, z_t, x, s.to(torch.float64), t.to(torch.float64), process)
