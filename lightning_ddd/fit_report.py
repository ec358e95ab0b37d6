"""The line a finished ``fit`` ends with: final and best validation metric, and where the checkpoints are."""

from __future__ import annotations

import math

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_ddd.run_files import RunFolders

#: validation metrics a report follows when no checkpoint callback names one, in order of preference
REPORTED = ("val/nll", "val/loss")


class FitReport(Callback):
    """Follows the run for the command line (added by it, not by configs): counts the optimiser steps taken
    in this process, so a run that fails before training can remove the folders it created
    (:meth:`remove_folders_if_untrained`), and records the validation metric after every validation, so
    :meth:`summary` can name the final and the best value.

    The metric is the one the first ``ModelCheckpoint`` monitors, else ``val/nll``, else ``val/loss``
    (lower is better for all of them unless the checkpoint says ``mode: max``). A module whose validation
    numbers measure a moving target (``validation_comparable_over_training = False``) gets no "best".
    """

    def __init__(self) -> None:
        self.steps_taken = 0
        #: the run folders this run may create (set by the CLI before the run starts)
        self.folders: RunFolders | None = None
        self.metric: str | None = None
        self.history: list[tuple[int, float]] = []  # (global step, value) after each validation
        self._mode = "min"

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        self.steps_taken += 1

    def remove_folders_if_untrained(self) -> None:
        """After a failure: remove the run folders this run created if it took no optimiser step."""
        if self.folders is not None and self.steps_taken == 0:
            self.folders.remove_new()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        checkpoint = _checkpoint_callback(trainer)
        candidates = ([checkpoint.monitor] if checkpoint is not None and checkpoint.monitor else []) + list(REPORTED)
        metrics = trainer.callback_metrics
        name = self.metric or next((m for m in candidates if m in metrics), None)
        if name is None or name not in metrics:
            return
        self.metric = name
        if checkpoint is not None and checkpoint.monitor == name:
            self._mode = checkpoint.mode
        value = float(metrics[name])
        if math.isfinite(value):
            self.history.append((trainer.global_step, value))

    def summary(self, trainer: pl.Trainer) -> str:
        """One line: the step reached, the final and best metric, the last and best checkpoint paths."""
        parts = [f"fit finished at step {trainer.global_step}"]
        if self.history:
            pick = max if self._mode == "max" else min
            best_step, best = pick(self.history, key=lambda item: item[1])
            final_step, final = self.history[-1]
            comparable = getattr(trainer.lightning_module, "validation_comparable_over_training", True)
            parts.append(f"{self.metric} {final:.4g} at step {final_step}"
                         + (f" (best {best:.4g} at step {best_step})" if comparable else ""))
        else:
            parts.append("no validation ran")
        checkpoint = _checkpoint_callback(trainer)
        if checkpoint is None:
            parts.append("no checkpoints (checkpointing is off)")
        else:
            if checkpoint.last_model_path:
                parts.append(f"last checkpoint {checkpoint.last_model_path}")
            if checkpoint.monitor and checkpoint.best_model_path:
                parts.append(f"best ({checkpoint.monitor}) {checkpoint.best_model_path}")
            elif not checkpoint.last_model_path and checkpoint.best_model_path:
                parts.append(f"checkpoint {checkpoint.best_model_path}")
        return "; ".join(parts)


def _checkpoint_callback(trainer: pl.Trainer) -> ModelCheckpoint | None:
    return next((cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)), None)
