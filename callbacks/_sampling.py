"""On which weights and on which rank the callbacks draw samples during training.

**Which weights.** With a ``WeightAveraging`` callback (e.g. ``EMAWeightAveraging``), :func:`sampling_context`
swaps the averaged weights into the module while samples are drawn and swaps them back afterwards. The
EMA callback itself swaps only between its ``on_validation_epoch_start`` and ``on_validation_epoch_end``,
and which callback's ``on_validation_epoch_end`` runs first depends on the order of the callback list. The
hooks used here (``on_train_batch_end``, ``on_validation_end``, ``on_train_end``) see the training weights
in the module whatever the order, so an explicit swap always samples the average. At ``on_train_end`` the
EMA callback copies the average into the module; before that copy the swap brings the average in, after it
both copies hold the average, so either order samples the average.

**Which ranks.** Every rank draws its share of each set of samples (``lightning_ddd.distributed.Ranks``:
its own noise stream, every rank gets all N), and rank 0 alone scores them and logs, so evaluator models
live on one device and the metrics do not sync. One process draws exactly what it always drew. Every rank
runs the same hooks at the same steps, so the gathers meet. Sharded strategies need every rank in each
forward pass: under ``FSDPStrategy`` the full weights are gathered for the block
(``summon_full_params``; each rank then samples on its own), under ``ModelParallelStrategy`` (FSDP2) every
rank runs the same forward passes in step (equal shares; the RADD caching sampler, which skips the
network where a rank's rows unmask nothing, is refused there). DeepSpeed is refused.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from lightning_ddd.compat import swap_weights, weight_averages
from lightning_ddd.evaluation import SamplingSettings


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
def full_weights(trainer: pl.Trainer) -> Iterator[None]:
    """Under ``FSDPStrategy``: the full weights on every rank for the block (read-only), so that each rank
    can call the networks on its own. Elsewhere nothing: DDP holds them already, FSDP2 gathers per call."""
    model = trainer.strategy.model
    if isinstance(trainer.strategy, FSDPStrategy) and model is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, recurse=True, writeback=False):
            yield
    else:
        yield


@contextmanager
def sampling_context(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """Averaged weights, the full weights under FSDP, a forked RNG (so adding a callback does not change
    training) and the clock. Every rank enters it."""
    device = pl_module.device
    devices = [device] if device.type == "cuda" else []
    start = time.perf_counter()
    try:
        with averaged_weights(trainer, pl_module), full_weights(trainer), \
                torch.random.fork_rng(devices=devices, device_type=device.type):
            yield
    finally:
        SamplingClock.seconds += time.perf_counter() - start


def check_strategy(trainer: pl.Trainer, owner: object, settings: list[SamplingSettings] = ()) -> None:
    """Refuse what cannot sample during training: DeepSpeed, and the caching sampler under FSDP2, where
    every rank must run the same forward passes."""
    name = type(owner).__name__
    if isinstance(trainer.strategy, DeepSpeedStrategy):
        raise ValueError(f"{name} cannot sample under DeepSpeed; use DDP or FSDP, or sample afterwards with `evaluate`.")
    if isinstance(trainer.strategy, ModelParallelStrategy) and any(s.cache for s in settings):
        raise ValueError(
            f"{name}: the caching sampler (sampling.cache: true) skips forward passes per rank, which "
            "ModelParallelStrategy (FSDP2) cannot do; set cache: false."
        )

