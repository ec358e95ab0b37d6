"""The SDTT student (self-distillation through time; Deschenaux and Gulcehre, ICLR 2025): the few-step baseline.

A masked-diffusion student (a copy of the teacher, no extra input) learns to take in one step what the
teacher takes in ``steps_per_teacher`` (k = 2) ancestral steps of size dt = 1 / N. Rounds halve the step
count: after ``round_steps`` optimiser steps the student's current weights become the next round's frozen
teacher and N is divided by k, so ``num_rounds`` rounds take a ``teacher_steps``-step teacher to a
``teacher_steps / k^num_rounds``-step student. The maths lives in :mod:`lightning_ddd.diffusion.sdtt`.
"""

from __future__ import annotations

import copy
import functools
import operator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_ddd.diffusion import sdtt
from lightning_ddd.diffusion.processes import MaskedProcess
from lightning_ddd.modules.base import Shared
from lightning_ddd.modules.student import DistilledStudent, TeacherOptions
from lightning_ddd.modules.student_losses import DistillationLoss

__all__ = ["SDTTContext", "SDTTLoss", "SDTTSettings", "SDTTStudent"]


@dataclass(frozen=True)
class SDTTSettings:
    """The rounds of self-distillation through time.

    Args:
        teacher_steps: N, the number of sampling steps of the teacher the first round distils (1,024 in the
            paper); the first round's teacher step is dt = 1 / N on the sampler's uniform grid.
        steps_per_teacher: k, the teacher steps one student step replaces (2 in the paper: each round halves).
        num_rounds: rounds of distillation; the last round's student samples in N / k^num_rounds steps.
        round_steps: optimiser steps per round; then the student becomes the teacher of the next round.
    """

    teacher_steps: int = 1024
    steps_per_teacher: int = 2
    num_rounds: int = 7
    round_steps: int = 10_000

    def __post_init__(self) -> None:
        if self.steps_per_teacher < 2 or self.num_rounds < 1 or self.round_steps < 1:
            raise ValueError(
                f"SDTTSettings: need steps_per_teacher >= 2, num_rounds >= 1 and round_steps >= 1, got "
                f"{self.steps_per_teacher}, {self.num_rounds}, {self.round_steps}."
            )
        if self.teacher_steps % self.steps_per_teacher**self.num_rounds:
            raise ValueError(
                f"SDTTSettings: teacher_steps={self.teacher_steps} must be divisible by steps_per_teacher^num_rounds "
                f"= {self.steps_per_teacher**self.num_rounds} so that every round's step count is a whole number."
            )

    def teacher_steps_at(self, round_index: int) -> int:
        """The number of sampling steps of round ``round_index``'s teacher (N / k^round)."""
        return self.teacher_steps // self.steps_per_teacher**round_index

    @property
    def student_steps(self) -> int:
        """The sampling steps of the final student: N / k^num_rounds."""
        return self.teacher_steps_at(self.num_rounds)


class SDTTContext:
    """One SDTT draw on clean ids x (B, D): times t, z_t, the student's prediction and (on first use) the target.

    Attributes:
        student: the SDTTStudent.
        t: (B,) float64 times in (0, 1]; z_t: (B, D) noisy ids; positions: (B, D) bool, masked in z_t.
    """

    def __init__(self, student: SDTTStudent, x: Tensor, generator: torch.Generator | None) -> None:
        self.student, self.generator = student, generator
        self.t = sdtt.draw_times(x.shape[0], generator, x.device)  # (B,)
        self.z_t = student.process.corrupt(x, self.t, generator)  # (B, D)
        self.positions = self.z_t == student.process.mask_id  # (B, D)

    @cached_property
    def target_log_probs(self) -> Tensor:
        """The current round's teacher after k steps of size dt, (B, D, V), no graph."""
        s = self.student
        dt = 1.0 / s.sdtt.teacher_steps_at(s.round)
        return sdtt.teacher_targets(s.round_teacher, s.process, self.z_t, self.t, dt, s.sdtt.steps_per_teacher,
                                    self.generator)

    @cached_property
    def log_probs(self) -> Tensor:
        """The student's one-step prediction log p(x | z_t), (B, D, V), with a graph when gradients are on."""
        return self.student.denoise(self.z_t, self.t.float())


class SDTTLoss(DistillationLoss):
    """The SDTT objective: a divergence between the student at z_t and the teacher's k-step target, summed over
    the positions masked in z_t.

    Args:
        weight: multiplies the term.
        divergence: ``kl_reverse`` (KL(student || target): the paper's default, the only divergence that kept
            quality as the steps fell), ``kl_forward``, ``mse`` (on log-probabilities) or ``tv``.
    """

    name = "sdtt"
    context = SDTTContext

    def __init__(self, weight: float = 1.0, divergence: sdtt.Divergence = "kl_reverse") -> None:
        super().__init__(weight)
        if divergence not in ("kl_reverse", "kl_forward", "mse", "tv"):
            raise ValueError(f"SDTTLoss: divergence='{divergence}' is not one of kl_reverse, kl_forward, mse, tv.")
        self.divergence = divergence

    def __call__(self, ctx: SDTTContext) -> Tensor:
        return self.weight * sdtt.divergence_loss(ctx.log_probs, ctx.target_log_probs, ctx.positions, self.divergence)


class SDTTStudent(DistilledStudent):
    """SDTT: a masked-diffusion student distilled round by round from its own earlier self.

    Logs ``train/loss`` (nats per token), one ``train/loss_<name>`` per term, ``train/round`` and
    ``train/teacher_steps`` (the current round's teacher), and the same losses under ``val/`` on fixed noise
    against the current round's teacher. Sample the final student with ``sdtt.student_steps`` steps.

    The round's teacher is the student's weights at the start of the round (training weights, not an EMA
    average), frozen and kept out of the optimiser; it is saved in the student's checkpoints (from the second
    round on it is not the teacher file), so a resumed run continues the same round exactly.

    Args:
        teacher_ckpt: the first round's teacher: a project checkpoint, a hub id or a hub-layout directory (not
            ``ckpt_path``, which resumes the student).
        vocab_size: linked from the data; must equal the teacher's.
        seq_len: linked from the data; must equal the teacher's.
        sdtt: the rounds: the teacher's step count, k, the number of rounds and their length.
        losses: the terms (``DistillationLoss`` subclasses reading an ``SDTTContext``). Default: ``SDTTLoss``
            with the reverse KL.
        optimizer: optimiser of the student's parameters.
        lr_scheduler: optional LR schedule, stepped every optimiser step.
        seed: seed of the training noise.
        teacher_sha256: expected hash of the teacher file (leave unset; see ``DistilledStudent``).
        teacher_options: how a released teacher is loaded (revision, trust_remote_code, ...) and the dropout of
            the student's copy (see ``DistilledStudent``).
    """

    context_class = SDTTContext
    #: val/loss is measured against the current round's teacher, so values of different rounds do not compare
    validation_comparable_over_training = False

    def __init__(
        self,
        teacher_ckpt: str,
        vocab_size: int | None = None,
        seq_len: int | None = None,
        sdtt: SDTTSettings = SDTTSettings(),
        losses: list[DistillationLoss] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
        teacher_sha256: str | None = None,
        teacher_options: TeacherOptions = TeacherOptions(),
    ) -> None:
        super().__init__(teacher_ckpt, vocab_size, seq_len, optimizer, lr_scheduler, seed, teacher_sha256,
                         losses=[SDTTLoss()] if losses is None else losses, teacher_options=teacher_options)
        if not isinstance(self.process, MaskedProcess):
            raise ValueError(
                f"SDTTStudent distils masked diffusion, but the teacher's process is {type(self.process).__name__}; "
                "use DMMDStudent or MixtureStudent for a uniform teacher."
            )
        self.sdtt = sdtt
        self.round = 0
        self._round_backbone = Shared(None)  # rounds >= 1: the frozen student of the previous round

    # ---- the rounds --------------------------------------------------------------------------------
    def round_at(self, step: int) -> int:
        """The round that optimiser step ``step`` belongs to (the last round goes on past its length)."""
        return min(step // self.sdtt.round_steps, self.sdtt.num_rounds - 1)

    @property
    def round_teacher(self) -> Callable[[Tensor, Tensor], Tensor]:
        """The current round's frozen teacher as a denoiser ``(z_t, t) -> (B, D, V)`` log-probs."""
        if self.round == 0:
            return self.teacher.denoise
        backbone = self._round_backbone.value
        return functools.partial(self._denoise_with, backbone)

    def _denoise_with(self, backbone: nn.Module, z_t: Tensor, t: Tensor) -> Tensor:
        time = t if getattr(backbone, "time_conditioning", False) else None
        return self.process.x0_log_probs(backbone(z_t, time), z_t)

    def start_round(self, round_index: int, backbone_state: dict[str, Tensor] | None = None) -> None:
        """Make the student's current weights (or ``backbone_state``) the frozen teacher of ``round_index``."""
        frozen = copy.deepcopy(self.backbone)
        if backbone_state is not None:
            frozen.load_state_dict(backbone_state)
        frozen.eval().requires_grad_(False)
        self._round_backbone = Shared(frozen)
        self.round = round_index

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        target = self.round_at(self.global_step)
        if target > self.round:
            self.start_round(target)

    # ---- the losses --------------------------------------------------------------------------------
    def compute_losses(self, x: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        """The sum of the terms (nats per token), each term, and the current round and its teacher's steps."""
        D = x.shape[1]
        terms = {name: value / D for name, value in self.loss_terms(SDTTContext(self, x, generator)).items()}
        out = {"loss": functools.reduce(operator.add, terms.values()).float().mean()}
        out.update({f"loss_{name}": value.float().mean() for name, value in terms.items()})
        out["round"] = torch.tensor(float(self.round), device=x.device)
        out["teacher_steps"] = torch.tensor(float(self.sdtt.teacher_steps_at(self.round)), device=x.device)
        return out

    # ---- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["sdtt_round"] = self.round
        if self.round > 0:  # the round's teacher is the student of an earlier step: keep it for resuming
            checkpoint["sdtt_round_teacher"] = self._round_backbone.value.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        round_index = int(checkpoint.get("sdtt_round", 0))
        if round_index > 0:
            self.start_round(round_index, checkpoint["sdtt_round_teacher"])
        else:
            self.round, self._round_backbone = 0, Shared(None)
