"""The shared base of distilled students: a frozen teacher from a checkpoint or a release, and pluggable losses.

The teacher (a lightning_ddd ``.ckpt``, a hub id such as ``kuleshov-group/mdlm-owt``, or a local directory in the
hub's layout; see :mod:`lightning_ddd.modules.teacher_source`) is held outside the student's module tree, so it
is not in ``parameters()`` (so not in the optimiser), not in ``state_dict()`` (so not in the student's
checkpoints), and not copied by the EMA callback's deep copy. Its identity (content hash, or hub commit) is
recorded in the student's hyperparameters and checkpoints and checked whenever the student is rebuilt.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Any, Sequence

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_ddd.modules.base import DiffusionModule, Shared
from lightning_ddd.modules.student_losses import DistillationLoss
from lightning_ddd.modules.teacher_source import (
    TeacherOptions,
    check_identity,
    is_checkpoint_source,
    load_teacher,
    load_teacher_source,
    set_dropout,
)

__all__ = ["DistilledStudent", "TeacherOptions", "load_teacher"]


class DistilledStudent(DiffusionModule):
    """Base class of students. Builds the student as a copy of the teacher (same process, same backbone
    weights) and holds its ``losses`` (:class:`~lightning_ddd.modules.student_losses.DistillationLoss`);
    subclasses add their conditioning input (``backbone.add_cond_input``, zero-initialised, so the student
    starts as the teacher; a released network takes it at its token embeddings), draw a ``context_class`` per
    batch, and combine the terms in ``compute_losses``. The teacher is loaded by ``load_teacher`` (override it
    to take teachers from elsewhere).

    Args:
        teacher_ckpt: the teacher: a lightning_ddd checkpoint (``.ckpt``; not ``ckpt_path``, which resumes the
            student), a Hugging Face hub id (e.g. ``kuleshov-group/mdlm-owt``, read from the local cache when it
            is there, else downloaded) or a local directory in the hub's layout.
        vocab_size: linked from the data; must equal the teacher's.
        seq_len: linked from the data; must equal a checkpoint teacher's, at most a release's context.
        optimizer: optimiser of the student's parameters.
        lr_scheduler: optional LR schedule, stepped every optimiser step.
        seed: seed of the training noise.
        teacher_sha256: expected SHA-256 of the teacher file or release directory; filled in from the checkpoint
            when resuming or evaluating (leave it unset), so that a changed teacher fails before any work.
        losses: the terms of the student's objective (at least one, distinct names); each is checked with
            ``check_student`` once the teacher, process and backbone exist.
        teacher_options: how a released teacher is loaded (revision, trust_remote_code, ...) and the dropout
            of the student's copy (see :class:`~lightning_ddd.modules.teacher_source.TeacherOptions`).
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
        teacher_options: TeacherOptions | dict | None = None,
    ) -> None:
        options = _as_options(teacher_options)
        teacher = self.load_teacher(teacher_ckpt, options, vocab_size, seq_len)
        for name, value in (("vocab_size", vocab_size), ("seq_len", seq_len)):
            if value is not None and value != getattr(teacher, name):
                raise ValueError(
                    f"{name} mismatch: the data has {name}={value} but the teacher '{teacher_ckpt}' was trained "
                    f"with {getattr(teacher, name)}; distil with the teacher's data."
                )
        identity = dict(getattr(teacher, "identity", None) or {"source": teacher_ckpt, "revision": None, "sha256": None})
        if teacher_sha256 is not None and teacher_sha256 != identity["sha256"]:
            raise ValueError(
                f"{type(self).__name__}: the teacher '{teacher_ckpt}' has sha256 {identity['sha256']} but this student "
                f"was trained against {teacher_sha256}; resume or evaluate with the original teacher."
            )
        if options.dropout is not None:
            set_dropout(teacher.backbone, options.dropout)  # the copies inherit it; the teacher runs in eval mode
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
        self.teacher_identity = identity
        self.hparams["teacher_sha256"] = identity["sha256"]
        if "teacher_options" in self.hparams and not is_checkpoint_source(teacher_ckpt):
            # a hub id is pinned to the commit it resolved to: resuming or evaluating loads the same weights
            self.hparams["teacher_options"] = {**asdict(options), "revision": identity["revision"] or options.revision}
        self.losses = list(losses)
        names = [loss.name for loss in self.losses]
        if not self.losses or len(set(names)) < len(names):
            raise ValueError(f"{type(self).__name__}: need at least one loss and distinct loss names, got {names}.")
        for loss in self.losses:
            loss.check_student(self)

    def load_teacher(
        self, teacher_ckpt: str, options: TeacherOptions, vocab_size: int | None, seq_len: int | None
    ) -> DiffusionModule:
        """The frozen teacher named by ``teacher_ckpt`` (called before the student is built; no state yet).

        It should carry an ``identity`` dict (``source``, ``revision``, ``sha256``) for the student to record.
        """
        return load_teacher_source(teacher_ckpt, options, vocab_size, seq_len)

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

    # ---- data agreement (a released teacher fixes the tokenizer) -------------------------------------
    def check_datamodule(self, datamodule: Any) -> None:
        """The student's check of the data, then the teacher's own (a release's tokenizer), before any work."""
        super().check_datamodule(datamodule)
        self._teacher.value.check_datamodule(datamodule)

    def check_batch(self, x: Tensor) -> None:
        super().check_batch(x)
        self._teacher.value.check_batch(x)  # e.g. a release's mask id that is also a real token id

    # ---- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["teacher_ckpt"] = self.hparams.teacher_ckpt
        checkpoint["teacher_sha256"] = self.hparams.teacher_sha256
        checkpoint["teacher_identity"] = dict(self.teacher_identity)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        check_identity(checkpoint.get("teacher_identity"), self.teacher_identity)


def _as_options(options: TeacherOptions | dict | None) -> TeacherOptions:
    """``teacher_options`` as given in Python, or as read back from a checkpoint's hyperparameters (a dict)."""
    if options is None:
        return TeacherOptions()
    if isinstance(options, dict):
        return TeacherOptions(**options)
    return options
