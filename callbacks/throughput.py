"""Training tokens/s, sampling samples/s and peak memory, logged as ``throughput/*`` scalars."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import replace

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_ddd.evaluation import SamplingSettings, generate

from ._logging import log_scalars
from ._sampling import SamplingClock
from ._scheduled import ScheduledSampling


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory in MiB: CUDA ``max_memory_allocated`` on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class Throughput(ScheduledSampling):
    """Logs how fast the model trains and samples, and how much memory it needs.

    Scalars (at the trainer's ``log_every_n_steps``, or ``log_every_n_steps`` here):
    ``throughput/train_tokens_per_s``: token ids of all ranks' batches per second of training batch time
    (from ``on_train_batch_start`` to ``on_train_batch_end``, so data loading and validation are left out,
    and so is time the sampling callbacks of this package spend inside that window). Under DDP it is rank
    0's rate times the world size: the distributed sampler gives every rank the same batch size.
    ``throughput/peak_memory_mib``: rank 0's ``torch.cuda.max_memory_allocated`` on a GPU, its peak RSS on
    the CPU. ``throughput/sampling_samples_per_s``: every ``every_n_steps`` and at the end of training, rank
    0 times drawing ``sampling`` (after a one-step warm-up). On a GPU every training batch is synchronised,
    which costs a little overlap but makes the timing true.

    Args:
        sampling: the samples timed for the sampling measurement.
        every_n_steps: measure sampling speed every this many optimiser steps (None: only at the end).
        at_fit_end: also measure sampling speed when training ends.
        log_every_n_steps: log training rate and memory every this many steps (None: the trainer's).
    """

    def __init__(
        self,
        *,
        sampling: SamplingSettings = SamplingSettings(),
        every_n_steps: int | None = 1000,
        at_fit_end: bool = True,
        log_every_n_steps: int | None = None,
    ) -> None:
        super().__init__(every_n_steps, at_fit_end)
        self.sampling = sampling
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"Throughput: log_every_n_steps={log_every_n_steps} must be >= 1 or null.")
        self.log_every_n_steps = log_every_n_steps
        self._reset_window()
        self._last_logged = 0
        self._batch_start = 0.0
        self._clock_start = 0.0

    def _reset_window(self) -> None:
        self._tokens = 0
        self._seconds = 0.0

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._reset_window()
        self._last_logged = trainer.global_step  # a resumed run logs a full window first

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._sync(pl_module)
        self._batch_start = time.perf_counter()
        self._clock_start = SamplingClock.seconds

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        self._sync(pl_module)
        sampling = SamplingClock.seconds - self._clock_start  # other callbacks' sampling in this batch
        self._seconds += time.perf_counter() - self._batch_start - sampling
        self._tokens += batch.numel() if isinstance(batch, Tensor) else 0
        every = self.log_every_n_steps or trainer.log_every_n_steps
        step = trainer.global_step
        if step // every > self._last_logged // every and self._seconds > 0:  # crossed a multiple of `every`
            log_scalars(trainer, {
                "throughput/train_tokens_per_s": self._tokens * trainer.world_size / self._seconds,
                "throughput/peak_memory_mib": peak_memory_mib(pl_module.device),
            })
            self._reset_window()
            self._last_logged = step
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        generate(pl_module, replace(self.sampling, steps=1))  # warm-up: first-call allocations, kernel loading
        _, _, seconds = generate(pl_module, self.sampling)
        log_scalars(trainer, {"throughput/sampling_samples_per_s": self.sampling.num_samples / seconds})
