"""Where callbacks send what they log: scalars to every logger, images, figures and text to TensorBoard.

Scalars go through ``logger.log_metrics`` (not ``LightningModule.log``) because the sampling callbacks score
on rank 0 only: ``self.log`` would need the other ranks for its reduction, and it is not allowed in
``on_train_end``. Loggers are already rank-zero-only, so calling these on every rank is safe.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def tensorboard_writers(trainer: pl.Trainer) -> list:
    """The ``SummaryWriter`` of every TensorBoard logger of the trainer (empty on ranks other than 0)."""
    if not trainer.is_global_zero:
        return []
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def warn_without_tensorboard(trainer: pl.Trainer, owner: object) -> None:
    """Say once, at set-up, that images and text will go nowhere."""
    if trainer.is_global_zero and not any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers):
        warnings.warn(
            f"{type(owner).__name__}: no TensorBoardLogger among the trainer's loggers, so its images, plots and "
            "text are not written (scalars still go to every logger).",
            stacklevel=2,
        )


def without_duplicates(metrics: dict[str, float], record: dict) -> dict[str, float]:
    """``metrics`` less the ones that repeat another under a second name: with the oracle evaluator the
    generative NLL is the oracle NLL (``gen_ppl`` stays: it is the same number as a perplexity, and the
    tag a run with an LM evaluator would show)."""
    if record.get("evaluator") == "oracle" and "oracle_nll" in metrics:
        return {k: v for k, v in metrics.items() if k != "gen_nll"}
    return metrics


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float], step: int | None = None) -> None:
    """Log scalars to every logger at ``step`` (default: the trainer's global step)."""
    step = trainer.global_step if step is None else step
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def log_figure(trainer: pl.Trainer, tag: str, figure: Figure, step: int | None = None) -> None:
    """Log a matplotlib figure as an image (TensorBoard renders it with the Agg canvas)."""
    step = trainer.global_step if step is None else step
    for writer in tensorboard_writers(trainer):
        # close=False: closing goes through pyplot, which a bare Figure (see _plots) never joined.
        writer.add_figure(tag, figure, global_step=step, close=False)


def log_image_grid(trainer: pl.Trainer, tag: str, images: Tensor, step: int | None = None) -> None:
    """Log (N, C, H, W) images in [0, 1] as one roughly square grid (needs torchvision: the images extra)."""
    from torchvision.utils import make_grid

    step = trainer.global_step if step is None else step
    nrow = max(1, math.isqrt(len(images) - 1) + 1)  # ceil(sqrt(N)) columns
    # Upscale tiny images (8x8 digits) so TensorBoard does not blur them into a smudge.
    scale = max(1, 64 // max(images.shape[-2:]))
    images = images.float().clamp(0, 1).repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    grid = make_grid(images, nrow=nrow, padding=scale, pad_value=0.5)  # (3, H', W')
    for writer in tensorboard_writers(trainer):
        writer.add_image(tag, grid, global_step=step, dataformats="CHW")


def log_text(trainer: pl.Trainer, tag: str, samples: list[str], step: int | None = None) -> None:
    """Log strings as one markdown text; each sample is a fenced block, so whitespace and markup survive."""
    body = "\n\n".join(f"**sample {i}**\n\n```\n{text.replace('```', '` ` `')}\n```" for i, text in enumerate(samples))
    log_markdown(trainer, tag, body, step)


def log_markdown(trainer: pl.Trainer, tag: str, text: str, step: int | None = None) -> None:
    """Log one markdown text (TensorBoard's text tab renders markdown)."""
    step = trainer.global_step if step is None else step
    for writer in tensorboard_writers(trainer):
        writer.add_text(tag, text, global_step=step)

