"""The shared base of distilled students: a frozen teacher loaded from a checkpoint path, and pluggable losses.

The teacher is held outside the student's module tree, so it is not in ``parameters()`` (so not in the
optimiser), not in ``state_dict()`` (so not in the student's checkpoints), and not copied by the EMA
callback's deep copy. Its path and content hash are recorded in the student's hyperparameters.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_ddd.checkpoints import CheckpointError, checkpoint_class, file_sha256, validate_checkpoint
from lightning_ddd.modules.base import DiffusionModule, Shared
from lightning_ddd.modules.student_losses import DistillationLoss


def load_teacher(path: str) -> DiffusionModule:
    """Load a trained lightning_ddd model from ``path``, frozen (no gradients) and in eval mode."""
    cls = checkpoint_class(validate_checkpoint(path, DiffusionModule))
    if cls is None or cls is DiffusionModule:
        raise CheckpointError(f"teacher checkpoint '{path}' does not record a lightning_ddd model class.")
    teacher = cls.load_from_checkpoint(path, map_location="cpu")  # state_dict holds EMA weights when EMA was on
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


class DistilledStudent(DiffusionModule):
    """Base class of students. Builds the student as a copy of the teacher (same process, same backbone
    weights) and holds its ``losses`` (:class:`~lightning_ddd.modules.student_losses.DistillationLoss`);
    subclasses add their conditioning input (``step_condition``), draw a ``context_class`` per batch, and
    combine the terms in ``compute_losses``. The teacher is loaded by ``load_teacher`` (override it to take
    teachers from elsewhere).

    Args:
        teacher_ckpt: path of the teacher's checkpoint (not ``ckpt_path``, which resumes the student).
        vocab_size: linked from the data; must equal the teacher's.
        seq_len: linked from the data; must equal the teacher's.
        optimizer: optimiser of the student's parameters.
        lr_scheduler: optional LR schedule, stepped every optimiser step.
        seed: seed of the training noise.
        teacher_sha256: expected hash of the teacher file; filled in from the checkpoint when resuming or
            evaluating (leave it unset), and checked so that a changed teacher file fails early.
        losses: the terms of the student's objective (at least one, distinct names); each is checked with
            ``check_student`` once the teacher, process and backbone exist.
    """

    #: the per-batch context the losses read (see ``DistillationLoss.context``)
    context_class: type = object

    def __init__(
        self,
        teacher_ckpt: str,
        vocab_size: int | None = None,
        seq_len: int | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
        teacher_sha256: str | None = None,
        losses: Sequence[DistillationLoss] = (),
    ) -> None:
        teacher = self.load_teacher(teacher_ckpt)
        for name, value in (("vocab_size", vocab_size), ("seq_len", seq_len)):
            if value is not None and value != getattr(teacher, name):
                raise ValueError(
                    f"{name} mismatch: the data has {name}={value} but the teacher '{teacher_ckpt}' was trained "
                    f"with {getattr(teacher, name)}; distil with the teacher's data."
                )
        super().__init__(
            teacher.vocab_size,
            teacher.seq_len,
            process=lambda _: copy.deepcopy(teacher.process),
            backbone=lambda *_: copy.deepcopy(teacher.backbone),
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            seed=seed,
        )
        self.backbone.requires_grad_(True)
        self.backbone.train()  # the copy inherits the loaded teacher's eval mode; Lightning keeps module modes
        self._teacher = Shared(teacher)  # out of children, state_dict and EMA copies
        self.hparams["teacher_sha256"] = file_sha256(teacher_ckpt)
        if teacher_sha256 is not None and teacher_sha256 != self.hparams.teacher_sha256:
            raise ValueError(
                f"{type(self).__name__}: the teacher '{teacher_ckpt}' has sha256 {self.hparams.teacher_sha256} but "
                f"this student was trained against {teacher_sha256}; resume or evaluate with the original teacher file."
            )
        self.losses = list(losses)
        names = [loss.name for loss in self.losses]
        if not self.losses or len(set(names)) < len(names):
            raise ValueError(f"{type(self).__name__}: need at least one loss and distinct loss names, got {names}.")
        for loss in self.losses:
            loss.check_student(self)

    def load_teacher(self, teacher_ckpt: str) -> DiffusionModule:
        """The frozen teacher named by ``teacher_ckpt`` (called before the student is built; no state yet)."""
        return load_teacher(teacher_ckpt)

    def loss_terms(self, ctx: Any) -> dict[str, Tensor]:
        """Every loss on one context: name → (B,) weighted per-sequence values in nats."""
        return {loss.name: loss(ctx) for loss in self.losses}

    @property
    def hparams_initial(self):
        """The hyperparameters the loggers write (hparams.yaml), with the teacher's actual hash: it is known only
        once the teacher is loaded, after Lightning has frozen this copy with the argument's value (null)."""
        hparams = super().hparams_initial
        hparams["teacher_sha256"] = self.hparams.teacher_sha256
        return hparams

    @property
    def teacher(self) -> DiffusionModule:
        """The frozen teacher, moved to the student's device on first use."""
        teacher = self._teacher.value
        if next(teacher.parameters()).device != self.device:
            teacher.to(self.device)
        return teacher

    def train(self, mode: bool = True):
        super().train(mode)
        self._teacher.value.eval()  # the teacher never leaves eval mode
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["teacher_ckpt"] = self.hparams.teacher_ckpt
        checkpoint["teacher_sha256"] = self.hparams.teacher_sha256
