"""The D-MMD student (Hoogeboom et al., 2026): a few-step sampler distilled against an auxiliary denoiser.

Each training step is one iteration of *one* of two models, alternating 1:1 (auxiliary first, since at
initialisation the auxiliary equals the teacher and the student's gradient is zero):

- auxiliary iteration: the auxiliary learns to denoise the student's own samples (``L_AUX``);
- student iteration: the student moves towards tokens the teacher prefers over the auxiliary (``L_GEN``).

So ``trainer.max_steps`` counts both kinds: N steps are N/2 student updates. The alternation phase is a
counter saved in the checkpoint, and every draw comes from a generator seeded by that counter, so a
resumed run repeats an uninterrupted one exactly. The maths lives in ``lightning_ddd.diffusion.dmmd``, the
two loss terms in ``lightning_ddd.modules.student_losses``.

Validation scores the student's samples, not its losses (which measure the student against the auxiliary
that chases it, so ``loss_gen`` rises as both learn): see :meth:`DMMDStudent.validation_losses`.
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

from lightning_ddd.diffusion.dmmd import TeacherShaping, draw_times
from lightning_ddd.diffusion.likelihood import estimate_nll
from lightning_ddd.diffusion.losses import AnyOrderLoss, TeacherLoss, UniformELBO
from lightning_ddd.diffusion.processes import MaskedProcess
from lightning_ddd.diffusion.step_times import draw_step_times
from lightning_ddd.metrics.entropy import unigram_entropy
from lightning_ddd.modules.base import NoiseStream, backbone_logits, shared_attribute
from lightning_ddd.modules.student import DistilledStudent, TeacherOptions
from lightning_ddd.modules.student_losses import DistillationLoss, DMMDAuxiliaryLoss, DMMDContext, DMMDGeneratorLoss
from lightning_ddd.nn.transformer import sinusoids

#: noise inputs of a masked student when ``noise_dim`` is left at None
DEFAULT_MASKED_NOISE_DIM = 16


@dataclass(frozen=True)
class DMMDSettings:
    """The D-MMD student's step count(s), its inputs, loss weighting, gradient clipping and validation step counts.

    Args:
        num_steps: k, the per-k student's number of sampling steps (the paper's student, the default); the
            training gap t - s is drawn from U(0, 1/k) and the student does not see it, so it is best at the
            k it was trained for (run with many more steps, its samples come out sharper than the data).
        step_aware: train one student for every step count in [min_steps, max_steps] instead: each example
            draws kappa log-uniformly from that range and a step of exactly t - s = 1/kappa
            (``lightning_ddd.diffusion.step_times``), and the student is told the step it takes through a
            zero-initialised input of sinusoids of t and s (so the untrained student is still the teacher).
            ``num_steps`` is then unused.
        min_steps, max_steps: the step counts a step-aware student serves.
        step_dim: number of step features (sinusoids of 1000 t and 1000 s, half each; a multiple of 4).
        noise_dim: size of the per-position Gaussian noise input (0 = off). None: 16 for masked, 0 for uniform.
        weighting: w(s), "elbo" (the schedule's ELBO weight, 1/s for log-linear) or "constant".
        gradient_clip_val: max gradient norm of each model per iteration (0 = off); the Trainer's own
            ``gradient_clip_val`` must stay unset (Lightning refuses it under manual optimisation).
        val_steps: sampling step counts scored at validation. None: k for a per-k student, the fewest and
            the most steps for a step-aware one.
    """

    num_steps: int = 4
    step_aware: bool = False
    min_steps: int = 2
    max_steps: int = 16
    step_dim: int = 32
    noise_dim: int | None = None
    weighting: Literal["elbo", "constant"] = "elbo"
    gradient_clip_val: float = 1.0
    val_steps: list[int] | None = None

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"DMMDSettings: num_steps={self.num_steps} must be >= 1.")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(
                f"DMMDSettings: need 1 <= min_steps <= max_steps, got min_steps={self.min_steps}, "
                f"max_steps={self.max_steps}."
            )
        if self.step_dim < 4 or self.step_dim % 4:
            raise ValueError(f"DMMDSettings: step_dim={self.step_dim} must be a positive multiple of 4.")
        if self.noise_dim is not None and self.noise_dim < 0:
            raise ValueError(f"DMMDSettings: noise_dim={self.noise_dim} must be >= 0 (or null for the default).")
        if self.weighting not in ("elbo", "constant"):
            raise ValueError(f"DMMDSettings: weighting='{self.weighting}' is not one of 'elbo', 'constant'.")
        if not self.gradient_clip_val >= 0:
            raise ValueError(f"DMMDSettings: gradient_clip_val={self.gradient_clip_val} must be >= 0.")
        if self.val_steps is not None and (not self.val_steps or any(k < 1 for k in self.val_steps)):
            raise ValueError(f"DMMDSettings: val_steps={self.val_steps} must be step counts >= 1 (or null for the default).")

    @property
    def step_counts(self) -> tuple[int, int]:
        """(fewest, most) sampling steps the student is trained for."""
        return (self.min_steps, self.max_steps) if self.step_aware else (self.num_steps, self.num_steps)


def _default_bound(process) -> TeacherLoss:
    """The NLL bound of a teacher that names none: any-order for masked, the uniform ELBO otherwise."""
    return AnyOrderLoss() if isinstance(process, MaskedProcess) else UniformELBO()


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
    the step size, so a per-k student is best at the ``num_steps`` it was trained for; run with many more
    steps its samples come out sharper than the data. A step-aware student (``dmmd.step_aware``) is trained
    over a range of step counts and told each step's t and s (appended to the noise input, through the same
    zero-initialised hook), so one student serves every step count in that range.

    Each step draws one :class:`DMMDContext` (times, the student's sample, z_s, the shaped teacher and the
    auxiliary at z_s), evaluates every loss on it and updates one model with the sum of its terms. Logs
    ``train/loss_gen``, ``train/loss_aux`` (one ``loss_<name>`` per term, nats per token, all every step),
    ``train/student_entropy`` (mean entropy of the student's x-prediction at noised positions) and
    ``train/aux_teacher_gap`` (mean KL(teacher || auxiliary) per summed position). Without a noise input a
    falling output entropy means collapse; with one, some fall is expected (the noise carries part of the
    randomness), so check the entropy of samples as well. The losses measure the two models against each
    other, not the samples (``loss_gen`` rises as the auxiliary catches up), so validation scores samples:
    ``val/teacher_nll`` and ``val/entropy`` (see :meth:`validation_losses`); monitor ``val/teacher_nll``.

    Args:
        teacher_ckpt: the teacher: a lightning_ddd ``.ckpt`` (not ``ckpt_path``, which resumes the student), a hub
            id (e.g. ``kuleshov-group/mdlm-owt``) or a local directory in the hub's layout.
        vocab_size: linked from the data; must equal the teacher's.
        seq_len: linked from the data; must equal the teacher's.
        dmmd: the step count k (or the range of a step-aware student), the noise input, the weighting w(s)
            and the gradient clipping.
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
        teacher_sha256: expected hash of the teacher file or directory (leave unset; see ``DistilledStudent``).
        teacher_options: how a released teacher is loaded (revision, trust_remote_code, ...) and the dropout of
            the student's copy.
    """

    aux_optimizer_factory = shared_attribute()
    aux_lr_scheduler_factory = shared_attribute()
    hparams_ignore = ("optimizer", "lr_scheduler", "aux_optimizer", "aux_lr_scheduler")
    progress_bar_keys = ("loss_gen", "loss_aux", "teacher_nll")
    context_class = DMMDContext

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
        teacher_options: TeacherOptions = TeacherOptions(),
    ) -> None:
        super().__init__(teacher_ckpt, vocab_size, seq_len, optimizer, lr_scheduler, seed, teacher_sha256,
                         losses=dmmd_losses() if losses is None else losses, teacher_options=teacher_options)
        trained = {loss.trains for loss in self.losses}
        if trained != {"student", "auxiliary"}:
            raise ValueError(f"DMMDStudent: the losses must train both the student and the auxiliary, got {sorted(trained)}.")
        masked = isinstance(self.process, MaskedProcess)
        self.dmmd, self.teacher_shaping = dmmd, teacher_shaping
        self.noise_dim = (DEFAULT_MASKED_NOISE_DIM if masked else 0) if dmmd.noise_dim is None else dmmd.noise_dim
        self.step_dim = dmmd.step_dim if dmmd.step_aware else 0
        self.val_steps = sorted(set(dmmd.step_counts)) if dmmd.val_steps is None else list(dmmd.val_steps)
        self.aux_optimizer_factory = aux_optimizer
        self.aux_lr_scheduler_factory = aux_lr_scheduler
        # The auxiliary is a trained submodule (in the checkpoint), unlike the frozen teacher.
        self.aux_backbone = copy.deepcopy(self.teacher.backbone).requires_grad_(True)
        if self.noise_dim + self.step_dim > 0:
            if getattr(self.backbone, "cond_proj", None) is not None:
                raise ValueError("DMMDStudent: the teacher's backbone already has a conditioning input; distil a plain teacher.")
            # Zero-initialised: the student starts as the teacher. Input: [noise, step features].
            self.backbone.add_cond_input(self.noise_dim + self.step_dim)
        self.train()  # the copies inherit the loaded teacher's eval mode; the teacher itself stays in eval
        self.automatic_optimization = False
        self.iteration = 0  # alternation counter: even = auxiliary, odd = student; saved in checkpoints
        self._schedulers: list = [None, None]

    # ---- inputs ------------------------------------------------------------------------------------
    def draw_step_times(self, batch_size: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Training times of one student step, (s, t), (B,) float64 each: s < t within one step of k (per-k), or
        a step of a log-uniform step count in [min_steps, max_steps] (step-aware)."""
        if self.dmmd.step_aware:
            return draw_step_times(batch_size, self.dmmd.min_steps, self.dmmd.max_steps, generator, self.device)
        return draw_times(batch_size, self.dmmd.num_steps, generator, self.device)

    def draw_noise(self, batch_size: int, generator: torch.Generator | None) -> Tensor | None:
        """epsilon, (B, D, noise_dim) standard normal, or None without a noise input."""
        if self.noise_dim == 0:
            return None
        return torch.randn(batch_size, self.seq_len, self.noise_dim, generator=generator, device=self.device)

    def step_features(self, t: Tensor, s: Tensor) -> Tensor:
        """The step input of a step-aware student: sinusoids of 1000 t and 1000 s, (B,), (B,) → (B, step_dim)."""
        half = self.step_dim // 2
        return torch.cat([sinusoids(1000.0 * t, half), sinusoids(1000.0 * s, half)], dim=-1)

    def draw_condition(
        self, batch_size: int, generator: torch.Generator | None, t: Tensor | None = None, s: Tensor | None = None
    ) -> Tensor | None:
        """The student's extra input for a step from t to s ((B,) each): fresh noise (B, D, noise_dim) and, for
        a step-aware student, the step features appended at every position (B, D, noise_dim + step_dim), or
        (B, step_dim) without noise; None when the student has no extra input."""
        noise = self.draw_noise(batch_size, generator)
        if self.step_dim == 0:
            return noise
        if t is None or s is None:
            raise ValueError("this D-MMD student is step-aware: it needs the step's t and s (the sampler passes them).")
        step = self.step_features(t.to(self.device), s.to(self.device))  # (B, step_dim)
        if noise is None:
            return step
        return torch.cat([noise, step[:, None, :].expand(-1, self.seq_len, -1)], dim=-1)

    def step_condition(
        self, num_samples: int, generator: torch.Generator | None, t: float | None = None, s: float | None = None
    ) -> Tensor | None:
        """Fresh noise at every sampling step, from the sampler's generator (so samples are seeded), plus the
        step's t and s for a step-aware student (the sampler passes them as keywords)."""
        times = [None if v is None else torch.full((num_samples,), v, dtype=torch.float64) for v in (t, s)]
        return self.draw_condition(num_samples, generator, *times)

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

    # ---- validation --------------------------------------------------------------------------------
    def validation_losses(self, x: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        """Sample quality at the ``val_steps`` step counts, from the fixed validation noise.

        Per validation batch of B sequences, B samples are drawn in k steps (the sampler's seed is fixed per
        batch, so every validation scores the same noise) and scored by the frozen, unshaped teacher:
        ``teacher_nll`` is its NLL bound of the samples in nats per token (its own ``val_loss`` with its
        ``val_num_draws``), the figure to monitor: the untrained student is the teacher run in k steps, whose
        samples a few-step sampler garbles (tokens of one step are drawn independently, so it scores high),
        and it falls as the student's k-step samples approach what the teacher samples in many steps.
        ``entropy`` is the samples' mean unigram entropy: a collapsing student buys a low ``teacher_nll`` by
        repeating itself and shows here. With several step counts, each is logged as ``teacher_nll_<k>steps``
        and ``entropy_<k>steps`` and the two figures are their means.

        A likelihood bound of the validation data under the k-step student would reward covering the data
        rather than sampling well; on the quickstart it rose while the samples' exact NLL under the data fell.
        """
        teacher = self.teacher
        bound = getattr(teacher, "val_loss", None) or _default_bound(teacher.process)
        draws = getattr(teacher, "val_num_draws", 1)
        B, D = x.shape
        out: dict[str, Tensor] = {}
        for k in self.val_steps:
            tokens = self.generate(B, k, generator=generator).tokens  # (B, D)
            nll = estimate_nll(teacher.denoise, tokens, teacher.process, bound, draws, generator) / D  # (B,)
            out[f"teacher_nll_{k}steps"] = nll.float().mean()
            out[f"entropy_{k}steps"] = unigram_entropy(tokens, self.vocab_size).float().mean()
        if len(self.val_steps) == 1:
            return {name.rsplit("_", 1)[0]: value for name, value in out.items()}
        for name in ("teacher_nll", "entropy"):
            out[name] = torch.stack([out[f"{name}_{k}steps"] for k in self.val_steps]).mean()
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
        # Named, so LearningRateMonitor logs lr-student and lr-auxiliary rather than lr-AdamW and lr-AdamW-1.
        return [{"optimizer": o, **({"lr_scheduler": {"scheduler": sch, "name": name}} if sch is not None else {})}
                for o, sch, name in zip(optimizers, self._schedulers, ("lr-student", "lr-auxiliary"))]

    # ---- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["dmmd_iteration"] = self.iteration

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.iteration = int(checkpoint.get("dmmd_iteration", 0))
