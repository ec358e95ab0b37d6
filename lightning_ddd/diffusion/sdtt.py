"""Self-distillation through time (SDTT; Deschenaux and Gulcehre, ICLR 2025), as pure tensor functions.

A masked-diffusion student learns to do in one step what its teacher does in ``k`` (= 2) ancestral steps of
size dt. Per training example: ``z_t ~ q(z_t | x)``; the frozen teacher runs k steps t → t - dt → ... from
z_t; for every position masked in z_t the target is the teacher's x-prediction at the step in which that
position was unmasked (positions still masked after the k steps take the last step's prediction). The
student predicts ``log p(x^d | z_t)`` in one call and is pulled towards the target on the masked positions.
Rounds halve the step count: the student of one round is the teacher of the next, with dt doubled.

Shapes: ids (B, D) long; times (B,) float64; log-probabilities (B, D, V) fp32; losses (B,) per-sequence
sums in nats (divide by D for per-token numbers).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

from lightning_ddd.diffusion.categorical import sample_categorical
from lightning_ddd.diffusion.processes import MaskedProcess

#: per-position divergence between the student and the teacher's target: the paper's default is the reverse
#: KL, KL(student || target) ("kl-bwd" in the reference code, "KLD" in the paper)
Divergence = Literal["kl_reverse", "kl_forward", "mse", "tv"]

__all__ = ["Divergence", "divergence_loss", "draw_times", "teacher_targets"]


def draw_times(batch_size: int, generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> Tensor:
    """t ~ U(0, 1], stratified over the batch, (B,) float64 (t = 0 would leave nothing masked)."""
    offset = torch.rand(1, generator=generator, device=device, dtype=torch.float64)
    perm = torch.randperm(batch_size, generator=generator, device=device)
    return 1.0 - (offset + perm) / batch_size


@torch.no_grad()
def teacher_targets(
    denoise: Callable[[Tensor, Tensor], Tensor],
    process: MaskedProcess,
    z_t: Tensor,
    t: Tensor,
    dt: float,
    num_steps: int = 2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The SDTT target: the teacher's x-prediction at the step in which each masked position unmasks.

    The teacher runs ``num_steps`` ancestral steps t → max(t - dt, 0) → ... from ``z_t``. In each step every
    still-masked position unmasks with the exact posterior probability ``(alpha_s - alpha_t) / (1 - alpha_t)``
    (float64 uniform draws) and takes a token drawn in float64 from the teacher's prediction; only the
    positions that unmask are drawn. A step that reaches s = 0 unmasks every remaining position.

    Args:
        denoise: the teacher, ``(z (B, D), t (B,) float32) -> log p(x | z)`` (B, D, V) fp32.
        process: the masked process (schedule and mask id).
        z_t: (B, D) noisy ids at time t.
        t: (B,) times in (0, 1].
        dt: the teacher's step size (1 / its number of sampling steps).
        num_steps: k, the teacher steps the student replaces.
        generator: source of the unmasking and token draws.

    Returns:
        (B, D, V) fp32 target log-probabilities; at positions visible in z_t they are the teacher's carry-over
        (0 at the token, -inf elsewhere) and take no part in the loss.
    """
    if not isinstance(process, MaskedProcess):
        raise ValueError(f"SDTT distils masked diffusion; the teacher's process is {type(process).__name__}.")
    if num_steps < 1 or not 0.0 < dt <= 1.0:
        raise ValueError(f"teacher_targets: need num_steps >= 1 and 0 < dt <= 1, got {num_steps}, {dt}.")
    z = z_t.clone()
    pending = z == process.mask_id  # (B, D): masked in z_t and not yet unmasked by the teacher
    t = t.to(torch.float64)
    target: Tensor | None = None
    for _ in range(num_steps):
        s = (t - dt).clamp_min(0.0)
        log_p = denoise(z, t.float())  # (B, D, V)
        if target is None:
            target = log_p.clone()
        else:
            target[pending] = log_p[pending]  # still-masked positions take this step's prediction
        alpha_s, alpha_t = process.schedule.alpha(s), process.schedule.alpha(t)  # (B,)
        unmask_prob = ((alpha_s - alpha_t) / (1.0 - alpha_t)).clamp(0.0, 1.0)  # (B,)
        u = torch.rand(z.shape, generator=generator, device=z.device, dtype=torch.float64)  # (B, D)
        unmask = pending & (u < unmask_prob[:, None])  # (B, D)
        if bool(unmask.any()):
            z[unmask] = sample_categorical(log_p[unmask], generator)  # (R,) draws for the R unmasking positions
        pending &= ~unmask
        t = s
    return target


def divergence_loss(
    student_log_probs: Tensor, target_log_probs: Tensor, positions: Tensor, divergence: Divergence = "kl_reverse"
) -> Tensor:
    """Sum over ``positions`` of a per-position divergence between student and target, (B,).

    - ``kl_reverse``: ``KL(student || target) = sum_v p_s (log p_s - log p_t)`` (the paper's default);
    - ``kl_forward``: ``KL(target || student)``;
    - ``mse``: ``sum_v (log p_s - log p_t)^2`` on log-probabilities;
    - ``tv``: total variation ``(1/2) sum_v |p_s - p_t|``.

    Args:
        student_log_probs: (B, D, V) the student's log p(x | z_t) (with gradients).
        target_log_probs: (B, D, V) the teacher target (detached).
        positions: (B, D) bool, the positions masked in z_t.
        divergence: which divergence.

    Returns:
        (B,) nats (or the divergence's own unit).
    """
    keep = positions.unsqueeze(-1)  # (B, D, 1)
    zero = torch.zeros((), dtype=torch.float32, device=student_log_probs.device)
    # Visible positions carry -inf log-probs in both models: zero them before any arithmetic.
    log_s = torch.where(keep, student_log_probs.float(), zero)
    log_t = torch.where(keep, target_log_probs.detach().float(), zero)
    if divergence == "kl_reverse":
        per_class = log_s.exp() * (log_s - log_t)
    elif divergence == "kl_forward":
        per_class = log_t.exp() * (log_t - log_s)
    elif divergence == "mse":
        per_class = (log_s - log_t).square()
    elif divergence == "tv":
        per_class = 0.5 * (log_s.exp() - log_t.exp()).abs()
    else:
        raise ValueError(f"divergence='{divergence}' is not one of 'kl_reverse', 'kl_forward', 'mse', 'tv'.")
    return torch.where(keep, per_class, zero).sum(dim=(-1, -2))
