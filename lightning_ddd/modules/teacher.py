"""The teacher: a masked (RADD) or uniform discrete diffusion model trained on a likelihood bound."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_ddd.diffusion.likelihood import estimate_nll
from lightning_ddd.diffusion.losses import TeacherLoss, TimeDCE
from lightning_ddd.diffusion.processes import MaskedProcess
from lightning_ddd.metrics import NLLMetric
from lightning_ddd.modules.base import BackboneFactory, DiffusionModule, ProcessFactory
from lightning_ddd.nn import DenoisingTransformer
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable


class DiffusionTeacher(DiffusionModule):
    """Discrete diffusion teacher. Masked (default): RADD's time-independent network trained with t-DCE,
    lambda-DCE or the any-order loss. Uniform: a time-conditioned network trained with ``UniformELBO``.

    Logs ``train/loss`` (nats/token) every step and ``val/nll`` (the bound, nats/token), ``val/ppl``, ``val/bpd``
    (bits per token) each validation, on EMA weights when the EMA callback is on.

    Args:
        vocab_size: real token ids V (linked from the data).
        seq_len: sequence length D (linked from the data).
        process: the forward process (``MaskedProcess`` or ``UniformProcess`` with a schedule).
        backbone: the network (``DenoisingTransformer`` with its size; set ``time_conditioning: true`` for uniform).
        loss: training objective (``TimeDCE``, ``LambdaDCE``, ``AnyOrderLoss`` for masked; ``UniformELBO``).
        val_loss: bound used for validation NLL (default: the training loss).
        val_num_draws: K, Monte-Carlo draws per validation sequence.
        optimizer: optimiser, built as ``optimizer(parameters)``.
        lr_scheduler: optional LR schedule, stepped every optimiser step.
        seed: seed of the training and validation noise.
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        process: ProcessFactory = MaskedProcess,
        backbone: BackboneFactory = DenoisingTransformer,
        loss: TeacherLoss | None = None,
        val_loss: TeacherLoss | None = None,
        val_num_draws: int = 1,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(vocab_size, seq_len, process, backbone, optimizer, lr_scheduler, seed)
        self.loss = loss if loss is not None else TimeDCE()
        self.val_loss = val_loss if val_loss is not None else self.loss
        if val_num_draws < 1:
            raise ValueError(f"val_num_draws={val_num_draws} must be >= 1.")
        self.val_num_draws = val_num_draws
        for objective in (self.loss, self.val_loss):
            objective.check_process(self.process)
            if objective.time_independent and getattr(self.backbone, "time_conditioning", False):
                raise ValueError(
                    f"{type(objective).__name__} feeds no time to the network but the backbone has "
                    "time_conditioning=true; set it to false (RADD) or use TimeDCE."
                )
        self.val_nll = NLLMetric()

    def compute_losses(self, x: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        bound = self.loss(self.denoise, x, self.process, generator)  # (B,) nats per sequence
        return {"loss": bound.float().mean() / x.shape[1]}  # nats per token, fp32

    def validation_losses(self, x: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        bound = estimate_nll(self.denoise, x, self.process, self.val_loss, self.val_num_draws, generator)
        self.val_nll.update(bound, x.shape[1])
        return {}  # val/nll is this bound per token: a val/loss would log the same number twice
