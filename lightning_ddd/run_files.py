"""What a run leaves on disk: the saved config, and nothing at all when it fails before training.

A run's folder (the logger's ``version_N``, its ``config.yaml``, the checkpoint folder) is created lazily
by Lightning as soon as the trainer sets up, so a run that fails in set-up (a bad optimiser argument, an
evaluator that cannot load, data that cannot be read) would leave an empty ``version_N`` behind, and the
next run would count past it. :class:`RunFolders` notes which of those paths do not exist yet and removes
them again if the run fails before its first optimiser step.
"""

from __future__ import annotations

import os
import shutil

import lightning.pytorch as pl
from lightning.pytorch.cli import SaveConfigCallback


class RunConfigSaver(SaveConfigCallback):
    """Saves the run's ``config.yaml`` into the logger's run folder, as Lightning does, but not into the
    working directory: with no logger and no ``trainer.default_root_dir`` there is no run folder (Lightning
    would write ``./config.yaml``), so nothing is written."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        trainer_config = self.config.get("trainer") or {}
        if not trainer.loggers and trainer_config.get("default_root_dir") is None:
            self.already_saved = True
            return
        super().setup(trainer, pl_module, stage)


class RunFolders:
    """The paths a run may create, noted before it starts; :meth:`remove_new` deletes those that appeared.

    Args:
        trainer: the run's trainer (its loggers and ``default_root_dir`` are read, nothing is created).
    """

    def __init__(self, trainer: pl.Trainer) -> None:
        self.is_global_zero = trainer.is_global_zero  # one process removes
        candidates = [getattr(logger, "log_dir", None) for logger in trainer.loggers]
        candidates.append(os.path.join(trainer.log_dir or trainer.default_root_dir, "config.yaml"))
        if not trainer.loggers:  # ModelCheckpoint's folder without a logger
            candidates.append(os.path.join(trainer.default_root_dir, "checkpoints"))
        self.new = [os.path.abspath(p) for p in dict.fromkeys(candidates) if p and not os.path.exists(p)]
        # the nearest existing folder above each new path: empty folders are removed up to it
        self.stops = {p: _existing_ancestor(p) for p in self.new}

    def remove_new(self) -> None:
        """Delete every noted path that now exists, then the empty folders made for it (on rank 0)."""
        for path in self.new if self.is_global_zero else ():
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.remove(path)
            parent, stop = os.path.dirname(path), self.stops[path]
            while parent != stop and parent.startswith(stop) and os.path.isdir(parent) and not os.listdir(parent):
                os.rmdir(parent)
                parent = os.path.dirname(parent)


def _existing_ancestor(path: str) -> str:
    parent = os.path.dirname(path)
    while not os.path.exists(parent) and parent != os.path.dirname(parent):
        parent = os.path.dirname(parent)
    return parent
