"""The D-MMD student (Hoogeboom et al., 2026): a few-step sampler distilled against an auxiliary denoiser.

Each training step is one iteration of *one* of two models, alternating 1:1 (auxiliary first, since at
initialisation the auxiliary equals the teacher and the student's gradient is zero):

- auxiliary iteration: the auxiliary learns to denoise the student's own samples (``L_AUX``);
- student iteration: the student moves towards tokens the teacher prefers over the auxiliary (``L_GEN``).

So ``trainer.max_steps`` counts both kinds: N steps are N/2 student updates. The alternation phase is a
counter saved in the checkpoint, and every draw comes from a generator seeded by that counter, so a
resumed run repeats an uninterrupted one exactly. The maths lives in ``lightning_ddd.diffusion.dmmd``.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_ddd.diffusion import dmmd
from lightning_ddd.diffusion.categorical import sample_categorical
from lightning_ddd.diffusion.processes import MaskedProcess
from lightning_ddd.modules.base import shared_attribute
from lightning_ddd.modules.student import DistilledStudent

TRAIN_STREAM = 0
#: noise inputs of a masked student when ``noise_dim`` is left at None
DEFAULT_MASKED_NOISE_DIM = 16


class DMMDStudent(DistilledStudent):
    """D-MMD student: teacher, student and auxiliary are x-predictions; student and auxiliary start as copies
    of the teacher. A masked student also takes per-position Gaussian noise through a zero-initialised input
    (the paper: 4-step CIFAR-10 FID 151 without it, 22.3 with it), drawn fresh at every sampling step.

    The student inherits the teacher's time input: a uniform student is time-conditioned, a masked one is
    not. For masked diffusion the ideal few-step student samples the clean data jointly given the visible
    tokens (the noise supplies the randomness), and that target does not depend on t, as RADD's does not;
    besides, the number of masks in z_t already tells the network roughly what t is. What it cannot see is
    the step size, so a student is best at the ``num_steps`` it was trained for; run with many more steps
    its samples come out sharper than the teacher's.

    Logs ``train/loss_gen``, ``train/loss_aux`` (nats per token, both every step), ``train/student_entropy``
    (mean entropy of the student's x-prediction at noised positions) and ``train/aux_teacher_gap`` (mean
    KL(teacher || auxiliary) per summed position). Without a noise input a falling output entropy means
    collapse; with one, some fall is expected (the noise carries part of the randomness), so check the
    entropy of samples (``evaluate``) as well.

    Args:
        teacher_ckpt: path of the teacher's checkpoint (not ``ckpt_path``, which resumes the student).
        vocab_size: linked from the data; must equal the teacher's.
        seq_len: linked from the data; must equal the teacher's.
        num_steps: k, the student's number of sampling steps; the training gap t - s is drawn from U(0, 1/k).
            Train one student per step count: the student does not see the step size.
        teacher_temperature: tau; the teacher's log-probs are divided by it before the losses.
        top_p: soft nucleus of the teacher (1.0 = off).
        top_p_shift: Delta, nats taken from the teacher's tokens outside the nucleus (a finite soft cut).
        aux_target: the auxiliary's target, "soft" (the student's probabilities, masked only) or "hard" (its
            sampled tokens; required for uniform). None: soft for masked, hard for uniform.
        weighting: w(s), "elbo" (the schedule's ELBO weight, 1/s for log-linear) or "constant".
        noise_dim: size of the per-position Gaussian noise input (0 = off). None: 16 for masked, 0 for uniform.
        gradient_clip_val: max gradient norm of each model per iteration (0 = off); the Trainer's own
            ``gradient_clip_val`` must stay unset (Lightning refuses it under manual optimisation).
        optimizer: optimiser of the student.
        aux_optimizer: optimiser of the auxiliary model. It must track the student: give it a learning rate
            at least the student's (3x the student's was stable where equal rates let the student run ahead).
        lr_scheduler: optional LR schedule of the student, stepped at every student update.
        aux_lr_scheduler: optional LR schedule of the auxiliary, stepped at every auxiliary update.
        seed: seed of the training noise.
        teacher_sha256: expected hash of the teacher file (leave unset; see ``DistilledStudent``).
    """

    aux_optimizer_factory = shared_attribute()
    aux_lr_scheduler_factory = shared_attribute()

    def __init__(
        self,
        teacher_ckpt: str,
        vocab_size: int | None = None,
        seq_len: int | None = None,
        num_steps: int = 4,
        teacher_temperature: float = 1.0,
        top_p: float = 1.0,
        top_p_shift: float = 2.0,
        aux_target: Literal["soft", "hard"] | None = None,
        weighting: Literal["elbo", "constant"] = "elbo",
        noise_dim: int | None = None,
        gradient_clip_val: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        aux_optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        aux_lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
        teacher_sha256: str | None = None,
    ) -> None:
        super().__init__(teacher_ckpt, vocab_size, seq_len, optimizer, lr_scheduler, seed, teacher_sha256)
        # Like the student's own: factories are not hyperparameters (and a lambda cannot be pickled).
        self.remove_ignored_hparams(["aux_optimizer", "aux_lr_scheduler"])
        masked = isinstance(self.process, MaskedProcess)
        aux_target = aux_target or ("soft" if masked else "hard")
        noise_dim = (DEFAULT_MASKED_NOISE_DIM if masked else 0) if noise_dim is None else noise_dim
        if num_steps < 1 or not teacher_temperature > 0 or not 0.0 < top_p <= 1.0 or top_p_shift < 0:
            raise ValueError(
                f"DMMDStudent: need num_steps >= 1, teacher_temperature > 0, 0 < top_p <= 1, top_p_shift >= 0 "
                f"(got {num_steps}, {teacher_temperature}, {top_p}, {top_p_shift})."
            )
        if aux_target not in ("soft", "hard") or weighting not in ("elbo", "constant"):
            raise ValueError(f"DMMDStudent: unknown aux_target='{aux_target}' or weighting='{weighting}'.")
        if aux_target == "soft" and not masked:
            raise ValueError(
                "DMMDStudent: aux_target='soft' is biased for the uniform process (z_s depends on every sampled "
                "token); use aux_target='hard'."
            )
        if noise_dim < 0 or gradient_clip_val < 0:
            raise ValueError(f"DMMDStudent: noise_dim={noise_dim} and gradient_clip_val={gradient_clip_val} must be >= 0.")
        self.num_steps, self.noise_dim = num_steps, noise_dim
        self.teacher_temperature, self.top_p, self.top_p_shift = teacher_temperature, top_p, top_p_shift
        self.aux_target, self.weighting, self.gradient_clip_val = aux_target, weighting, gradient_clip_val
        self.aux_optimizer_factory = aux_optimizer
        self.aux_lr_scheduler_factory = aux_lr_scheduler
        # The auxiliary is a trained submodule (in the checkpoint), unlike the frozen teacher.
        self.aux_backbone = copy.deepcopy(self.teacher.backbone).requires_grad_(True)
        if noise_dim > 0:
            self.backbone.add_cond_input(noise_dim)  # zero-initialised: the student starts as the teacher
        self.train()  # the copies inherit the loaded teacher's eval mode; the teacher itself stays in eval
        self.automatic_optimization = False
        self.iteration = 0  # alternation counter: even = auxiliary, odd = student; saved in checkpoints
        self._schedulers: list = [None, None]

    # ---- inputs ------------------------------------------------------------------------------------
    def draw_noise(self, batch_size: int, generator: torch.Generator | None) -> Tensor | None:
        """epsilon, (B, D, noise_dim) standard normal, or None without a noise input."""
        if self.noise_dim == 0:
            return None
        return torch.randn(batch_size, self.seq_len, self.noise_dim, generator=generator, device=self.device)

    def step_condition(self, num_samples: int, generator: torch.Generator | None) -> Tensor | None:
        """Fresh noise at every sampling step, from the sampler's generator (so samples are seeded)."""
        return self.draw_noise(num_samples, generator)

    def _time(self, t: Tensor) -> Tensor | None:
        return t.float() if getattr(self.aux_backbone, "time_conditioning", False) else None

    def aux_log_probs(self, z_s: Tensor, s: Tensor) -> Tensor:
        """log p_phi(x | z_s), (B, D, V) fp32, finite everywhere (the losses select the positions)."""
        return torch.log_softmax(self.aux_backbone(z_s, self._time(s)).float(), dim=-1)

    @torch.no_grad()
    def teacher_log_probs(self, z_s: Tensor, s: Tensor) -> Tensor:
        """l_theta, (B, D, V): the frozen teacher at temperature tau with the soft top-p."""
        raw = self.teacher.denoise(z_s, s.float())
        return dmmd.shape_teacher(raw, self.teacher_temperature, self.top_p, self.top_p_shift)

    # ---- training ----------------------------------------------------------------------------------
    def training_step(self, x: Tensor, batch_idx: int) -> None:
        if self.iteration == 0:
            self.check_batch(x)
        train_student = self.iteration % 2 == 1
        out = self.compute_losses(x, self.noise_generator(TRAIN_STREAM, self.iteration), train_student)
        self._update(0 if train_student else 1, out["loss_gen"] if train_student else out["loss_aux"])
        self.iteration += 1
        # Every value is logged at every step (each loss is free given the other's forward passes), so the
        # curves do not depend on whether log_every_n_steps is odd or even.
        for name, value in out.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name.startswith("loss"))

    def compute_losses(self, x: Tensor, generator: torch.Generator | None, train_student: bool) -> dict[str, Tensor]:
        """One D-MMD draw on clean ids x (B, D): both losses (nats per token) and the two diagnostics.

        Gradients flow into the student (``loss_gen``) when ``train_student``, else into the auxiliary
        (``loss_aux``); the other model runs without a graph.
        """
        B, D = x.shape
        s, t = dmmd.draw_times(B, self.num_steps, generator, x.device)  # (B,) each, float64
        z_t = self.process.corrupt(x, t, generator)  # (B, D)
        eps = self.draw_noise(B, generator)  # (B, D, C) or None
        with torch.set_grad_enabled(train_student):
            log_p = self.denoise(z_t, t.float(), eps)  # (B, D, V); carried tokens at visible positions
        p = log_p.exp()
        x_hat = sample_categorical(log_p.detach(), generator)  # (B, D), float64 Gumbel-max
        z_s = self.process.posterior_sample(z_t, x_hat, s, t, generator)  # (B, D)

        l_theta = self.teacher_log_probs(z_s, s)  # (B, D, V)
        positions = dmmd.loss_positions(z_s, self.process)  # (B, D) or None
        weight = dmmd.loss_weight(self.process.schedule, s, self.weighting)  # (B,)
        target = dmmd.aux_targets(p, x_hat, self.aux_target)  # (B, D, V)
        with torch.set_grad_enabled(not train_student):
            l_phi = self.aux_log_probs(z_s, s)  # (B, D, V)

        with torch.no_grad():
            entropy = -(p * log_p.clamp_min(-1e30)).sum(-1)  # (B, D); clamp: 0 * -inf would be NaN
            safe_theta = torch.where(l_theta.isfinite(), l_theta, torch.zeros_like(l_theta))
            kl = (l_theta.exp() * (safe_theta - l_phi)).sum(-1)  # (B, D): KL(teacher || auxiliary)
        return {
            "loss_gen": dmmd.generator_loss(p, l_phi, l_theta, weight, positions).mean() / D,
            "loss_aux": dmmd.auxiliary_loss(l_phi, l_theta, target, weight, positions).mean() / D,
            "student_entropy": dmmd.masked_mean(entropy, dmmd.loss_positions(z_t, self.process)),
            "aux_teacher_gap": dmmd.masked_mean(kl, positions),
        }

    def _update(self, index: int, loss: Tensor) -> None:
        """One step of optimiser ``index`` (0 = student, 1 = auxiliary) and its scheduler."""
        optimizer = self.optimizers()[index]
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.gradient_clip_val > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        optimizer.step()
        if self._schedulers[index] is not None:
            self._schedulers[index].step()

    def configure_optimizers(self):
        optimizers = [self.optimizer_factory(self.backbone.parameters()),
                      self.aux_optimizer_factory(self.aux_backbone.parameters())]
        factories = (self.lr_scheduler_factory, self.aux_lr_scheduler_factory)
        self._schedulers = [f(o) if f is not None else None for f, o in zip(factories, optimizers)]
        # Listed so that Lightning checkpoints and restores them; manual optimisation steps them itself.
        return [{"optimizer": o, **({"lr_scheduler": {"scheduler": sch}} if sch is not None else {})}
                for o, sch in zip(optimizers, self._schedulers)]

    # ---- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dmmd_iteration"] = self.iteration

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.iteration = int(checkpoint.get("dmmd_iteration", 0))
