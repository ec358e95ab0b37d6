"""``ResumableCheckpoint``: a ModelCheckpoint whose ``last.ckpt`` always holds the latest state, written at a
step boundary, so that ``fit --ckpt_path .../last.ckpt`` continues exactly where the run stopped."""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class ResumableCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (same arguments) that also writes ``last.ckpt`` when a run ends or is stopped.

    Lightning writes ``last.ckpt`` only next to another checkpoint (at a validation or an epoch's end) and
    at the end of training only if it never wrote one, so the steps after the last validation were lost
    (a 60-step run validated every 16 steps kept step 48). This callback adds three saves of ``last.ckpt``:

    - when training ends (``max_steps``, ``max_epochs``, early stopping), unless it already holds that step;
    - on SIGTERM (a cluster's pre-emption): Lightning finishes the current step (and its validation, when
      one is due), stops there and this callback saves;
    - on the first Ctrl-C, which is turned into the same graceful stop. A second Ctrl-C stops at once,
      without saving (a step cut in half cannot be resumed exactly).

    Every such checkpoint lies on a step boundary, and together with the training loader's saved position
    (``lightning_ddd.data.ResumableDataLoader``) a resumed run repeats the uninterrupted one bit for bit on
    the CPU. The process exits after an interrupt save (status 0 on SIGTERM/Ctrl-C, as Lightning's own
    SIGTERM handling does).

    Args:
        save_last: as ModelCheckpoint's, but on by default (the point of this class).
        **kwargs: ModelCheckpoint's other arguments (dirpath, filename, monitor, mode, save_top_k, ...).
    """

    def __init__(self, *, save_last: bool | Literal["link"] = True, **kwargs: Any) -> None:
        super().__init__(save_last=save_last, **kwargs)
        self._previous_sigint: Any = None
        self._interrupted = False

    # ---- Ctrl-C becomes a graceful stop ---------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._interrupted = False
        if threading.current_thread() is threading.main_thread() and self._previous_sigint is None:
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self._interrupted:
            self._restore_sigint()
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self._interrupted = True
        print("\nCtrl-C: stopping after this step and saving last.ckpt (press Ctrl-C again to stop at once, "
              "without saving).", file=sys.stderr, flush=True)
        sigterm = signal.getsignal(signal.SIGTERM)
        if not callable(sigterm):  # Lightning installs none on Windows: no graceful path there
            self._restore_sigint()
            raise KeyboardInterrupt
        sigterm(signal.SIGTERM, frame)  # Lightning's handler: the loop stops at the next step boundary

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None

    # ---- the saves ------------------------------------------------------------------------------------
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint()
        super().on_train_end(trainer, pl_module)
        self._save_final(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        super().on_exception(trainer, pl_module, exception)  # save_on_exception=True, if asked for
        if isinstance(exception, SIGTERMException):  # raised by Lightning at a step boundary, never mid-step
            if self._save_final(trainer):
                rank_zero_info(f"Stopped at step {trainer.global_step}; resume with --ckpt_path {self.last_model_path}")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_sigint()
        super().teardown(trainer, pl_module, stage)

    def _save_final(self, trainer: pl.Trainer) -> bool:
        """Write last.ckpt unless saving is off here or it already holds this step; True if written."""
        if not self.save_last or self._should_skip_saving_checkpoint(trainer):
            return False
        candidates = self._monitor_candidates(trainer)
        if self.save_last == "link":  # a link would point at an older checkpoint: replace it by the file itself
            path = self.format_checkpoint_name(candidates, self.CHECKPOINT_NAME_LAST)
            if trainer.is_global_zero and os.path.islink(path):
                os.remove(path)
            self.last_model_path = path
            self._save_checkpoint(trainer, path)
        else:
            self._save_last_checkpoint(trainer, candidates)
        return True
