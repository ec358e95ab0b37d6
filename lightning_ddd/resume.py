"""Exact resume at an epoch boundary under ``max_steps``: repair the two loop states Lightning restores wrongly.

Lightning 2.x counts an epoch as *processed* before ``on_train_epoch_end`` (where ModelCheckpoint usually
saves) and *completed* after it, and a run that stops at ``max_steps`` still closes its epoch. With
``max_steps`` set, FitLoop always treats a loaded state as a restart, and two states come back wrong:

- saved at the end of an epoch (its last batch done): the resumed loop re-enters the finished epoch. With no
  validation due at that batch (a module without a validation loop, such as the D-MMD student before it had
  one, or ``val_check_interval`` off the epoch's end) it trains one extra batch drawn from the next epoch's
  shuffle and then counts that epoch twice; with validation due it trains nothing but still counts the
  epoch twice, so every later epoch uses the shuffle of the epoch after it. Either way the run leaves the
  uninterrupted one from the second resumed batch on.
- saved after the run stopped in the middle of an epoch (``max_steps``, early stopping, the final save at
  ``on_train_end``): the resumed loop believes the epoch ended and starts the next one, keeping the old
  epoch's batch count.

:func:`settle_epoch_boundary` rewrites those loop counters in a loaded checkpoint to the state an
uninterrupted run has at the same step: the epoch finished and the next one not begun, or the epoch still
open at the batch it stopped at (where the resumable training loader picks up). Every lightning_ddd module
calls it from ``on_load_checkpoint``, which Lightning runs before it restores the loops. Weights, optimiser
states and the data order then match exactly; Lightning's logging step counter may differ by one.
"""

from __future__ import annotations

from typing import Any, Literal

__all__ = ["settle_epoch_boundary"]

_KEYS = ("ready", "started", "processed", "completed")


def settle_epoch_boundary(checkpoint: dict[str, Any]) -> Literal["epoch_end", "mid_epoch_stop"] | None:
    """Repair the fit loop's counters of a checkpoint saved at an epoch's end or after a mid-epoch stop.

    Args:
        checkpoint: a loaded Lightning checkpoint, changed in place.

    Returns:
        "epoch_end" (the epoch is marked completed and the next one not started), "mid_epoch_stop" (the epoch
        is reopened at the batch it stopped at), or None (nothing to repair: another state, or no loop state).
    """
    fit = checkpoint.get("loops", {}).get("fit_loop")
    try:
        epochs = fit["epoch_progress"]
        batches = fit["epoch_loop.batch_progress"]
        current = batches["current"]
    except (KeyError, TypeError):
        return None
    if epochs["total"]["processed"] != epochs["total"]["started"]:
        return None  # the epoch loop was still running when it was saved: Lightning restores that itself
    done = current["completed"]
    if any(current[k] != done for k in _KEYS) or done == 0:
        return None  # saved inside a batch (e.g. at on_train_batch_end), or before any batch
    if batches.get("is_last_batch", False):
        # Finished epoch: completed = processed, and the next epoch's batch counters start at zero.
        for progress in (epochs["total"], epochs["current"]):
            progress["completed"] = progress["processed"]
        _zero(current)
        batches["is_last_batch"] = False
        _zero(fit.get("epoch_loop.scheduler_progress", {}).get("current"))
        for part in fit.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {}).values():
            _zero(part.get("current"))
        _zero(fit.get("epoch_loop.val_loop.batch_progress", {}).get("total"))
        return "epoch_end"
    # Stopped mid-epoch: reopen the epoch (started, not processed) at the batch reached.
    for progress in (epochs["total"], epochs["current"]):
        progress["processed"] = progress["completed"] = progress["started"] - 1
    return "mid_epoch_stop"


def _zero(progress: dict[str, int] | None) -> None:
    if progress is not None:
        for key in progress:
            progress[key] = 0
