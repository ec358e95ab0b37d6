"""The one module that touches private third-party APIs; ``tests/test_compat.py`` pins what is relied on.

Lightning's ``TensorBoardLogger`` takes ``default_hp_metric`` only at construction; the logger Lightning
builds by default keeps it on and logs ``hp_metric = -1``. :func:`turn_off_default_hp_metric` sets the
private attribute behind it. ``lightning_ddd.cli`` also overrides ``LightningCLI._parse_ckpt_path``, the
step of ``LightningCLI.__init__`` that merges a checkpoint's hyperparameters into the config (pinned too).

Lightning's ``WeightAveraging`` has no public way to put the averaged weights into the module outside its
own validation hooks. Its private ``_swap_models`` (exchange the module's parameters and buffers with the
average's; a swap is its own inverse) and ``_average_model`` (the ``AveragedModel``, None before ``setup``
and outside ``fit``) are what the sampling callbacks need to sample from the average at any hook.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.utilities.rank_zero import rank_zero_warn


def weight_averages(trainer: pl.Trainer) -> list[WeightAveraging]:
    """The trainer's ``WeightAveraging`` callbacks that hold an average now (empty outside ``fit``)."""
    found = [cb for cb in trainer.callbacks
             if isinstance(cb, WeightAveraging) and getattr(cb, "_average_model", None) is not None]
    if found and not all(callable(getattr(cb, "_swap_models", None)) for cb in found):
        rank_zero_warn("this Lightning's WeightAveraging has no _swap_models: sampling uses the training weights.")
        return []
    return found


def swap_weights(callback: WeightAveraging, pl_module: pl.LightningModule) -> None:
    """Exchange ``pl_module``'s weights with ``callback``'s average (Lightning's own validation swap)."""
    callback._swap_models(pl_module)


def turn_off_default_hp_metric(logger) -> None:
    """Make a ``TensorBoardLogger`` log its hyperparameters without the placeholder ``hp_metric = -1``."""
    if hasattr(logger, "_default_hp_metric"):
        logger._default_hp_metric = False
