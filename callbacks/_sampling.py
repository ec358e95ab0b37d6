"""On which weights and on which rank the callbacks draw samples during training.

**Which weights.** With a ``WeightAveraging`` callback (e.g. ``EMAWeightAveraging``), :func:`sampling_context`
swaps the averaged weights into the module while samples are drawn and swaps them back afterwards. The
EMA callback itself swaps only between its ``on_validation_epoch_start`` and ``on_validation_epoch_end``,
and which callback's ``on_validation_epoch_end`` runs first depends on the order of the callback list. The
hooks used here (``on_train_batch_end``, ``on_validation_end``, ``on_train_end``) see the training weights
in the module whatever the order, so an explicit swap always samples the average. At ``on_train_end`` the
EMA callback copies the average into the module; before that copy the swap brings the average in, after it
both copies hold the average, so either order samples the average.

**Which rank.** Samples are drawn and scored on global rank 0 only, so the numbers do not depend on the
number of devices and evaluator models live on one device. No collective is called inside the rank-0
branch (sampling calls the backbone directly, not through the DDP wrapper, and metric syncing is turned
off), so nothing can deadlock; the other ranks wait at their next collective until rank 0 is done.
Sharded strategies (FSDP, DeepSpeed, model parallel) need every rank in each forward pass, so they are
refused at set-up.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from lightning_ddd.compat import swap_weights, weight_averages


class SamplingClock:
    """Seconds spent sampling inside callbacks, so ``Throughput`` can keep them out of training tokens/s."""

    seconds: float = 0.0


@contextmanager
def averaged_weights(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """Swap the (first) ``WeightAveraging`` callback's averaged weights into ``pl_module`` for the block.

    Only valid where the module holds the training weights (see the module docstring); a no-op without
    weight averaging or outside ``fit`` (where the averaging callback holds no average). Uses Lightning's
    own swap, the one it runs around validation (through :mod:`lightning_ddd.compat`).
    """
    averaging = weight_averages(trainer)[:1]
    for cb in averaging:
        swap_weights(cb, pl_module)
    try:
        yield
    finally:
        for cb in averaging:
            swap_weights(cb, pl_module)  # a swap is its own inverse


@contextmanager
def sampling_context(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """Averaged weights, a forked RNG (so adding a callback does not change training) and the clock."""
    device = pl_module.device
    devices = [device] if device.type == "cuda" else []
    start = time.perf_counter()
    try:
        with averaged_weights(trainer, pl_module), torch.random.fork_rng(devices=devices, device_type=device.type):
            yield
    finally:
        SamplingClock.seconds += time.perf_counter() - start


def check_strategy(trainer: pl.Trainer, owner: object) -> None:
    """Refuse sharded strategies: a rank-0-only forward pass would wait forever for the other shards."""
    if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
        raise ValueError(
            f"{type(owner).__name__} samples on rank 0 only, which needs the whole model on one device; "
            f"{type(trainer.strategy).__name__} shards it. Use DDP, or sample after training with `evaluate`."
        )

