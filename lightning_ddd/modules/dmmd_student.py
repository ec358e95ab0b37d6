"""The D-MMD student (Hoogeboom et al., 2026): a few-step sampler distilled against an auxiliary denoiser.

Each training step is one iteration of *one* of two models, alternating 1:1 (auxiliary first, since at
initialisation the auxiliary equals the teacher and the student's gradient is zero):

- auxiliary iteration: the auxiliary learns to denoise the student's own samples (``L_AUX``);
- student iteration: the student moves towards tokens the teacher prefers over the auxiliary (``L_GEN``).

So ``trainer.max_steps`` counts both kinds: N steps are N/2 student updates. The alternation phase is a
counter saved in the checkpoint, and every draw comes from a generator seeded by that counter, so a
resumed run repeats an uninterrupted one exactly. The maths lives in ``lightning_ddd.diffusion.dmmd``, the
two loss terms in ``lightning_ddd.modules.student_losses``.
"""

from __future__ import annotations

import copy
import functools
import operator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_ddd.diffusion.dmmd import TeacherShaping
from lightning_ddd.diffusion.processes import MaskedProcess
from lightning_ddd.modules.base import NoiseStream, backbone_logits, shared_attribute
from lightning_ddd.modules.student import DistilledStudent
from lightning_ddd.modules.student_losses import DistillationLoss, DMMDAuxiliaryLoss, DMMDContext, DMMDGeneratorLoss

#: noise inputs of a masked student when ``noise_dim`` is left at None
DEFAULT_MASKED_NOISE_DIM = 16


@dataclass(frozen=True)
class DMMDSettings:
    """The D-MMD student's step count, noise input, loss weighting and gradient clipping.

    Args:
        num_steps: k, the student's number of sampling steps; the training gap t - s is drawn from U(0, 1/k).
            Train one student per step count: the student does not see the step size.
        noise_dim: size of the per-position Gaussian noise input (0 = off). None: 16 for masked, 0 for uniform.
        weighting: w(s), "elbo" (the schedule's ELBO weight, 1/s for log-linear) or "constant".
        gradient_clip_val: max gradient norm of each model per iteration (0 = off); the Trainer's own
            ``gradient_clip_val`` must stay unset (Lightning refuses it under manual optimisation).
    """

    num_steps: int = 4
    noise_dim: int | None = None
    weighting: Literal["elbo", "constant"] = "elbo"
    gradient_clip_val: float = 1.0

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"DMMDSettings: num_steps={self.num_steps} must be >= 1.")
        if self.noise_dim is not None and self.noise_dim < 0:
            raise ValueError(f"DMMDSettings: noise_dim={self.noise_dim} must be >= 0 (or null for the default).")
        if self.weighting not in ("elbo", "constant"):
            raise ValueError(f"DMMDSettings: weighting='{self.weighting}' is not one of 'elbo', 'constant'.")
        if not self.gradient_clip_val >= 0:
            raise ValueError(f"DMMDSettings: gradient_clip_val={self.gradient_clip_val} must be >= 0.")


def dmmd_losses() -> list[DistillationLoss]:
    """The paper's pair: the generator loss (trains the student) and the auxiliary loss (trains the auxiliary)."""
    return [DMMDGeneratorLoss(), DMMDAuxiliaryLoss()]


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

    Each step draws one :class:`DMMDContext` (times, the student's sample, z_s, the shaped teacher and the
    auxiliary at z_s), evaluates every loss on it and updates one model with the sum of its terms. Logs
    ``train/loss_gen``, ``train/loss_aux`` (one ``loss_<name>`` per term, nats per token, all every step),
    ``train/student_entropy`` (mean entropy of the student's x-prediction at noised positions) and
    ``train/aux_teacher_gap`` (mean KL(teacher || auxiliary) per summed position). Without a noise input a
    falling output entropy means collapse; with one, some fall is expected (the noise carries part of the
    randomness), so check the entropy of samples (``evaluate``) as well. There is no validation loop: the
    losses measure the two models against each other, not the samples; use ``evaluate``.

    Args:
        teacher_ckpt: path of the teacher's checkpoint (not ``ckpt_path``, which resumes the student).
        vocab_size: linked from the data; must equal the teacher's.
        seq_len: linked from the data; must equal the teacher's.
        dmmd: the step count k, the noise input, the weighting w(s) and the gradient clipping.
        teacher_shaping: temperature and soft nucleus applied to the teacher's log-probs.
        losses: the terms (``DistillationLoss`` subclasses reading a ``DMMDContext``); each trains the student
            or the auxiliary. Default: ``DMMDGeneratorLoss`` and ``DMMDAuxiliaryLoss`` (soft targets for
            masked, hard for uniform).
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
    hparams_ignore = ("optimizer", "lr_scheduler", "aux_optimizer", "aux_lr_scheduler")
    progress_bar_keys = ("loss_gen", "loss_aux")
    context_class = DMMDContext
    validation_step = None  # no validation loop (see above); Lightning skips it when the hook is unset

    def __init__(
        self,
        teacher_ckpt: str,
        vocab_size: int | None = None,
        seq_len: int | None = None,
        dmmd: DMMDSettings = DMMDSettings(),
        teacher_shaping: TeacherShaping = TeacherShaping(),
        losses: list[DistillationLoss] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        aux_optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        aux_lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
        teacher_sha256: str | None = None,
    ) -> None:
        super().__init__(teacher_ckpt, vocab_size, seq_len, optimizer, lr_scheduler, seed, teacher_sha256,
                         losses=dmmd_losses() if losses is None else losses)
        trained = {loss.trains for loss in self.losses}
        if trained != {"student", "auxiliary"}:
            raise ValueError(f"DMMDStudent: the losses must train both the student and the auxiliary, got {sorted(trained)}.")
        masked = isinstance(self.process, MaskedProcess)
        self.dmmd, self.teacher_shaping = dmmd, teacher_shaping
        self.noise_dim = (DEFAULT_MASKED_NOISE_DIM if masked else 0) if dmmd.noise_dim is None else dmmd.noise_dim
        self.aux_optimizer_factory = aux_optimizer
        self.aux_lr_scheduler_factory = aux_lr_scheduler
        # The auxiliary is a trained submodule (in the checkpoint), unlike the frozen teacher.
        self.aux_backbone = copy.deepcopy(self.teacher.backbone).requires_grad_(True)
        if self.noise_dim > 0:
            self.backbone.add_cond_input(self.noise_dim)  # zero-initialised: the student starts as the teacher
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

    def aux_log_probs(self, z_s: Tensor, s: Tensor, positions: Tensor | None = None) -> Tensor:
        """log p_phi(x | z_s), (B, D, V) fp32, finite everywhere (the losses select the positions); with
        ``positions`` ((B, D) bool) the (N, V) rows there only."""
        return torch.log_softmax(backbone_logits(self.aux_backbone, z_s, self._time(s), None, positions).float(), dim=-1)

    @torch.no_grad()
    def teacher_log_probs(self, z_s: Tensor, s: Tensor, positions: Tensor | None = None) -> Tensor:
        """l_theta, (B, D, V): the frozen teacher shaped by ``teacher_shaping`` (temperature, soft top-p); with
        ``positions`` ((B, D) bool) the (N, V) rows there only."""
        return self.teacher_shaping(self.teacher.denoise(z_s, s.float(), positions=positions))

    # ---- training ----------------------------------------------------------------------------------
    def training_step(self, x: Tensor, batch_idx: int) -> None:
        self.check_first_batch(x, "train")
        trains = "student" if self.iteration % 2 == 1 else "auxiliary"
        out = self.compute_losses(x, self.noise_generator(NoiseStream.TRAIN, self.iteration), trains)
        self._update(0 if trains == "student" else 1, out.pop("loss"))
        self.iteration += 1
        # Every value is logged at every step (each loss is free given the other's forward passes), so the
        # curves do not depend on whether log_every_n_steps is odd or even.
        self.log_losses("train", out, x.shape[0])

    def compute_losses(
        self, x: Tensor, generator: torch.Generator | None, trains: Literal["student", "auxiliary"] | None = None
    ) -> dict[str, Tensor]:
        """One D-MMD draw on clean ids x (B, D): every term (nats per token) and the two diagnostics.

        With ``trains`` set, gradients flow into that model only and ``"loss"`` is the sum of its terms;
        the other model runs without a graph. With None neither keeps a graph and there is no ``"loss"``.
        """
        D = x.shape[1]
        ctx = DMMDContext(self, x, generator, trains)
        terms = self.loss_terms(ctx)  # (B,) each, nats per sequence
        out = {f"loss_{name}": value.mean() / D for name, value in terms.items()}
        if trains is not None:
            out["loss"] = functools.reduce(operator.add, [out[f"loss_{loss.name}"] for loss in self.losses
                                                          if loss.trains == trains])
        with torch.no_grad():
            out["student_entropy"] = ctx.student_entropy()
            out["aux_teacher_gap"] = ctx.aux_teacher_gap()
        return out

    def _update(self, index: int, loss: Tensor) -> None:
        """One step of optimiser ``index`` (0 = student, 1 = auxiliary) and its scheduler."""
        optimizer = self.optimizers()[index]
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.dmmd.gradient_clip_val > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.dmmd.gradient_clip_val, gradient_clip_algorithm="norm")
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
