"""The Di4C mixture student (Hayakawa et al., ICML 2025): a teacher copy that takes a latent lambda ~ U(0, 1).

``p_theta(x | z_t) = E_lambda prod_d p_theta^d(x^d | z_t, lambda)``: one lambda per sequence, shared by all
positions, embedded as sinusoids of 1000 lambda and fed through the backbone's zero-initialised ``cond_proj``
MLP, so the untrained student is exactly the teacher. The maths lives in
:mod:`lightning_ddd.diffusion.mixture`; this module draws the noise, runs the networks and logs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_ddd.diffusion import mixture
from lightning_ddd.diffusion.categorical import sample_categorical
from lightning_ddd.diffusion.processes import MaskedProcess
from lightning_ddd.diffusion.sampling import SampleOutput, sample
from lightning_ddd.modules.student import DistilledStudent
from lightning_ddd.nn.transformer import sinusoids

TRAIN_STREAM, VAL_STREAM = 0, 1


def lambda_features(lam: Tensor, dim: int, seq_len: int = 0, position_dim: int = 0) -> Tensor:
    """The lambda input: sinusoids of ``1000 lambda`` (the diffusion-time embedding's formula), (N,) → (N, dim);
    with ``position_dim > 0``, per position with sinusoids of the position appended, (N, seq_len, dim + position_dim).
    """
    feats = sinusoids(1000.0 * lam, dim)  # (N, dim)
    if position_dim == 0:
        return feats
    pos = sinusoids(torch.arange(seq_len, device=lam.device), position_dim)  # (L, position_dim)
    N = feats.shape[0]
    return torch.cat([feats[:, None, :].expand(N, seq_len, dim), pos[None].expand(N, seq_len, position_dim)], dim=-1)


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

    Each training example gets its own time and role: w.p. ``distil_prob`` a distillation example near the
    data (tau ~ U[delta, 2 delta], per-lambda KL to the teacher), else a consistency example (t ~ U[delta, 1]:
    the student at t must match one teacher step t → u followed by the student at u). Every example also
    gets the data loss. Logs ``train/loss`` and ``train/loss_distil``, ``train/loss_data``,
    ``train/loss_consis`` (their weighted contributions, nats per token, summing to the loss), and the same
    under ``val/`` on fixed noise, plus ``val/data_correlation``: the mean correlation term C(x_data) per token
    (> 0 once the mixture explains the data better than its own marginals do).

    Args:
        teacher_ckpt: path of the teacher's checkpoint (not ``ckpt_path``, which resumes the student).
        vocab_size: linked from the data; must equal the teacher's.
        seq_len: linked from the data; must equal the teacher's.
        num_lambda: M, lambda draws per training input (the batch is repeated M times; 16 in the paper).
        lambda_dim: number of sinusoidal features of 1000 lambda fed to the backbone's ``cond_proj`` MLP.
        position_dim: if > 0, the lambda input is given per position with this many sinusoidal features of
            the position appended, so the MLP can give lambda a different effect at each position (the
            backbone's attention only sees relative positions, and with a shared additive input every
            position of an all-masked sequence is identical). 0: one shared lambda embedding.
        lambda_init_std: std of the first layer of the lambda MLP, in units of 1 / |features|
            (1: unit-variance pre-activations). Its last layer starts at zero whatever this is.
        delta: delta, the distillation examples' times lie in [delta, 2 delta].
        distil_prob: fraction of examples that are distillation examples (0.3 in the reference code).
        consis_step_min: smallest consistency step Delta (u = t - Delta, log-uniform in [min, max]).
        consis_step_max: largest consistency step Delta; equal to ``consis_step_min`` for a fixed step.
        teacher_grid_steps: if > 0, Delta = 1 / teacher_grid_steps (one step of an n-step teacher grid),
            overriding the log-uniform range.
        data_coeff: c in a(t) = c sigmoid(s (t - t0)), the weight of the data's correlation term
            (1 for images, 0.1 for text in the reference code). At most 1: the term's marginal part,
            + a(t) sum_d log Pbar^d(x^d), pushes the marginals away from the data, and only the KL term
            (weight 1) holds them, so with a(t) > 1 the loss rewards wrong marginals (samples collapse).
        data_sharpness: s in a(t) (20 in the paper); 0 gives the constant c / 2.
        data_midpoint: t0 in a(t) (1/2 in the paper): the data's correlations weigh in above this noise level;
            -inf (``-.inf`` in YAML) gives the constant a(t) = c at every noise level.
        weight_distil: weight of the distillation loss.
        weight_data: weight of the data loss.
        weight_consis: weight of the consistency loss.
        hybrid_teacher_steps: k, the number of final sampling steps taken by the teacher (0: student only).
        optimizer: optimiser of the student's parameters.
        lr_scheduler: optional LR schedule, stepped every optimiser step.
        seed: seed of the training noise.
        teacher_sha256: expected hash of the teacher file (leave unset; see ``DistilledStudent``).
    """

    def __init__(
        self,
        teacher_ckpt: str,
        vocab_size: int | None = None,
        seq_len: int | None = None,
        num_lambda: int = 16,
        lambda_dim: int = 128,
        position_dim: int = 0,
        lambda_init_std: float = 1.0,
        delta: float = 0.01,
        distil_prob: float = 0.3,
        consis_step_min: float = 1e-3,
        consis_step_max: float = 1e-2,
        teacher_grid_steps: int = 0,
        data_coeff: float = 0.1,
        data_sharpness: float = 20.0,
        data_midpoint: float = 0.5,
        weight_distil: float = 1.0,
        weight_data: float = 1.0,
        weight_consis: float = 1.0,
        hybrid_teacher_steps: int = 0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
        teacher_sha256: str | None = None,
    ) -> None:
        checks = [
            (num_lambda >= 1, f"num_lambda={num_lambda} must be >= 1"),
            (lambda_dim >= 2 and lambda_dim % 2 == 0, f"lambda_dim={lambda_dim} must be even and >= 2"),
            (position_dim >= 0 and position_dim % 2 == 0, f"position_dim={position_dim} must be even and >= 0"),
            (0.0 < delta < 0.5, f"delta={delta} must lie in (0, 0.5)"),
            (0.0 <= distil_prob <= 1.0, f"distil_prob={distil_prob} must lie in [0, 1]"),
            (0.0 <= data_coeff <= 1.0, f"data_coeff={data_coeff} must lie in [0, 1] (above 1 the data term rewards "
             "wrong marginals; raise weight_data to weigh the whole term more)"),
            (data_sharpness >= 0.0, f"data_sharpness={data_sharpness} must be >= 0"),
            (0.0 < consis_step_min <= consis_step_max, "need 0 < consis_step_min <= consis_step_max"),
            (min(teacher_grid_steps, hybrid_teacher_steps) >= 0, "step counts must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"MixtureStudent: {message}.")
        super().__init__(teacher_ckpt, vocab_size, seq_len, optimizer, lr_scheduler, seed, teacher_sha256)
        if getattr(self.backbone, "cond_proj", None) is not None:
            raise ValueError("MixtureStudent: the teacher's backbone already has a conditioning input; distil a plain teacher.")
        cond_dim = lambda_dim + position_dim
        self.backbone.add_cond_input(cond_dim)  # zero-initialised: the student starts as the teacher
        # At the start every component is the teacher, a stationary point of all three losses: lambda gets a
        # use only through second-order terms whose size is the gain of the lambda path. The hook's first
        # layer (std 0.02) would leave that gain ~1e-2; scale it to the features (the sinusoid vector has
        # squared norm cond_dim / 2). Its last layer stays at zero.
        nn.init.normal_(self.backbone.cond_proj[0].weight, std=lambda_init_std * (2.0 / cond_dim) ** 0.5)
        self.num_lambda, self.lambda_dim, self.position_dim = num_lambda, lambda_dim, position_dim
        self.delta, self.distil_prob = delta, distil_prob
        if teacher_grid_steps > 0:
            consis_step_min = consis_step_max = 1.0 / teacher_grid_steps
        self.consis_steps = (consis_step_min, consis_step_max)
        self.data_coeff, self.data_sharpness, self.data_midpoint = data_coeff, data_sharpness, data_midpoint
        self.weights = {"distil": weight_distil, "data": weight_data, "consis": weight_consis}
        self.hybrid_teacher_steps = hybrid_teacher_steps

    # ---- the mixture -------------------------------------------------------------------------------
    def draw_lambda(self, num: int, generator: torch.Generator | None, length: int | None = None) -> Tensor:
        """Fresh lambda ~ U(0, 1), embedded: (num, lambda_dim), or (num, length, lambda_dim + position_dim)."""
        lam = torch.rand(num, generator=generator, device=self.device)
        return lambda_features(lam, self.lambda_dim, length or self.seq_len, self.position_dim)

    def components(self, z_t: Tensor, t: Tensor, generator: torch.Generator | None) -> Tensor:
        """Log-probs of M components with fresh lambdas: (B, D), (B,) → (B, M, D, V)."""
        M, (B, D) = self.num_lambda, z_t.shape
        cond = self.draw_lambda(B * M, generator, D)  # (B*M, [D,] C)
        out = self.denoise(z_t.repeat_interleave(M, 0), t.repeat_interleave(M, 0), cond)  # (B*M, D, V)
        return out.view(B, M, D, -1)

    def step_condition(self, num_samples: int, generator: torch.Generator | None) -> Tensor:
        """A fresh lambda per sample at every sampling step, from the sampler's generator."""
        return self.draw_lambda(num_samples, generator)

    # ---- the losses --------------------------------------------------------------------------------
    @torch.no_grad()
    def consistency_targets(
        self, z_t: Tensor, t: Tensor, teacher_log_probs: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """One teacher step t → u per lambda draw, then the student at u with a fresh lambda.

        Returns:
            log Q_j (B, M, D, V) and draws y_j ~ prod_d Q_j^d (B, M, D).
        """
        M, (B, D) = self.num_lambda, z_t.shape
        u = mixture.consistency_times(t, *self.consis_steps, generator=generator)  # (B,)
        t_rep, u_rep = t.repeat_interleave(M, 0), u.repeat_interleave(M, 0)  # (B*M,)
        z_rep = z_t.repeat_interleave(M, 0)  # (B*M, D)
        x_hat = sample_categorical(teacher_log_probs.repeat_interleave(M, 0), generator)  # (B*M, D)
        z_u = self.process.posterior_sample(z_rep, x_hat, u_rep, t_rep, generator)  # (B*M, D)
        was_training = self.backbone.training
        self.backbone.eval()  # the target is the student's deterministic prediction (no dropout)
        target = self.denoise(z_u, u_rep, self.draw_lambda(B * M, generator, D))  # (B*M, D, V)
        self.backbone.train(was_training)
        y = sample_categorical(target, generator)  # (B*M, D)
        return target.view(B, M, D, -1), y.view(B, M, D)

    def di4c_losses(self, x: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        """Per-example weighted Di4C terms in nats per token, each (B,), plus the data's correlation term."""
        B, D = x.shape
        t, near = mixture.sample_times(B, self.delta, self.distil_prob, generator, self.device)
        z_t = self.process.corrupt(x, t, generator)  # (B, D)
        # Masked process: only positions masked in z_t take part (the rest are carried by every model).
        mask = z_t == self.process.mask_id if isinstance(self.process, MaskedProcess) else None
        with torch.no_grad():
            teacher = self.teacher.denoise(z_t, t)  # (B, D, V)
        log_probs = self.components(z_t, t, generator)  # (B, M, D, V)

        distil = mixture.distillation_loss(log_probs, teacher, mask)  # (B,)
        weight = mixture.data_weight(t, self.data_coeff, self.data_sharpness, self.data_midpoint)
        data = mixture.data_loss(log_probs, teacher, x, weight, mask)
        consis = torch.zeros_like(data)
        rows = (~near).nonzero().squeeze(-1)  # consistency examples only: they need M extra forward passes
        if rows.numel() > 0:
            rows_mask = mask[rows] if mask is not None else None
            target, y = self.consistency_targets(z_t[rows], t[rows], teacher[rows], generator)
            rows_loss = mixture.consistency_loss(log_probs[rows], target, y, rows_mask)
            consis = consis.index_put((rows,), rows_loss)
        with torch.no_grad():
            corr = mixture.correlation(log_probs, x, mask)
        w = self.weights
        return {
            "distil": w["distil"] * torch.where(near, distil, torch.zeros_like(distil)) / D,
            "data": w["data"] * data / D,
            "consis": w["consis"] * consis / D,
            "data_correlation": corr / D,
        }

    def training_step(self, x: Tensor, batch_idx: int) -> Tensor:
        if self.global_step == 0 and batch_idx == 0:
            self.check_batch(x)
        terms = self.di4c_losses(x, self.noise_generator(TRAIN_STREAM, self.global_step))
        loss = (terms["distil"] + terms["data"] + terms["consis"]).float().mean()
        self.log("train/loss", loss, prog_bar=True)
        for name in ("distil", "data", "consis"):
            self.log(f"train/loss_{name}", terms[name].float().mean())
        self.log("train/data_correlation", terms["data_correlation"].float().mean())
        return loss

    def validation_step(self, x: Tensor, batch_idx: int) -> None:
        if batch_idx == 0:
            self.check_batch(x)
        terms = self.di4c_losses(x, self.noise_generator(VAL_STREAM, batch_idx))  # same draws every validation
        log = dict(sync_dist=True, batch_size=x.shape[0])
        total = terms["distil"] + terms["data"] + terms["consis"]
        self.log("val/loss", total.float().mean(), prog_bar=True, **log)
        for name in ("distil", "data", "consis"):
            self.log(f"val/loss_{name}", terms[name].float().mean(), **log)
        self.log("val/data_correlation", terms["data_correlation"].float().mean(), **log)

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
