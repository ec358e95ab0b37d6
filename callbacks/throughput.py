"""Training throughput and model FLOPs utilisation (Lightning's ``ThroughputMonitor``), peak memory, and
sampling speed (which Lightning does not measure)."""

from __future__ import annotations

import contextlib
import resource
import sys
from dataclasses import replace

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from lightning_ddd.compat import compute_dtype, exclude_time
from lightning_ddd.evaluation import SamplingSettings

from ._logging import log_scalars
from ._sampling import SamplingClock
from ._scheduled import ScheduledSampling

#: Dense peak FLOP/s of chips that Lightning's table lists only with 2:4 sparsity or under a name the driver
#: does not report ("NVIDIA H200"): NVIDIA's H200 datasheet gives 1,979 TFLOP/s bf16 with sparsity, so
#: 989.5 dense, the H100 SXM's figure. MFU is quoted against dense peaks (PaLM, nanoGPT).
DENSE_PEAK_FLOPS = {
    "h200": {torch.bfloat16: 989.5e12, torch.float16: 989.5e12, "tfloat32": 494.7e12, torch.float32: 66.9e12},
}


def peak_flops(device: torch.device, dtype: torch.dtype | str) -> float | None:
    """Peak FLOP/s of ``device`` at ``dtype``: the dense table above, else Lightning's; None on the CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for chip, table in DENSE_PEAK_FLOPS.items():
            if chip in name:
                if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
                    dtype = "tfloat32"
                return table.get(dtype)
    return get_available_flops(device, dtype)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory in MiB: CUDA ``max_memory_allocated`` on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def batch_rows(batch) -> int:
    """Sequences in a batch of token ids (B, D)."""
    return batch.shape[0] if isinstance(batch, Tensor) else len(batch)


def batch_tokens(batch) -> int:
    """Token ids in a batch (B * D)."""
    return batch.numel() if isinstance(batch, Tensor) else 0


class Throughput(ThroughputMonitor):
    """Training samples/s, tokens/s, FLOP/s and model FLOPs utilisation, by Lightning's ``ThroughputMonitor``.

    FLOPs per batch: the module's own ``flops_per_batch`` if it has one, else counted on rank 0 by torch's
    ``FlopCounterMode`` (what Lightning's ``measure_flops`` uses) over the first ``flop_count_batches``
    training batches, forward and backward, every network the step runs (a student's teacher too), in
    eager mode; their mean (a D-MMD step alternates between two models). These are the matmul and
    attention FLOPs, the count MFU is defined on. MFU is FLOP/s per device over the device's peak at the
    precision's compute dtype (``peak_flops``, else the table above, else Lightning's); on the CPU there
    is no peak, so FLOP/s only.

    Scalars, every ``log_every_n_steps`` once ``window_size`` batches have run (rates over the window):
    ``train/device/samples_per_sec``, ``train/device/items_per_sec`` (tokens), ``train/device/flops_per_sec``,
    ``train/device/mfu``; with several processes also the totals ``train/samples_per_sec``,
    ``train/items_per_sec``, ``train/flops_per_sec``; and ``train/device/peak_memory_mib`` (CUDA
    ``max_memory_allocated``, or peak RSS on the CPU). Validation and this package's sampling callbacks are
    left out of the time; validation batches get their own ``validate/...`` rates (without FLOPs).

    Args:
        window_size: batches the rates are averaged over.
        flop_count_batches: batches the FLOP count averages over (0: no count, no MFU).
        peak_flops: the device's peak FLOP/s (None: from the tables).
    """

    def __init__(self, *, window_size: int = 20, flop_count_batches: int = 2, peak_flops: float | None = None) -> None:
        if window_size < 2:
            raise ValueError(f"Throughput: window_size={window_size} must be >= 2 (a rate needs two times).")
        if flop_count_batches < 0:
            raise ValueError(f"Throughput: flop_count_batches={flop_count_batches} must be >= 0.")
        super().__init__(batch_size_fn=batch_rows, length_fn=batch_tokens, window_size=window_size, separator="/")
        self.flop_count_batches, self.peak_flops = flop_count_batches, peak_flops
        self._counted: list[int] = []
        self._counting: contextlib.ExitStack | None = None
        self._clock = 0.0
        self._memory_step = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        dtype = compute_dtype(trainer.precision_plugin)
        available = self.peak_flops or peak_flops(trainer.strategy.root_device, dtype)
        self.available_flops = available
        for throughput in self._throughputs.values():
            throughput.available_flops = available

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._clock = SamplingClock.seconds
        counts = len(self._counted) < self.flop_count_batches and not _has_own_flops(pl_module)
        if trainer.is_global_zero and counts:
            self._counting = contextlib.ExitStack()
            self._counting.enter_context(torch.compiler.set_stance("force_eager"))
            self._flops = self._counting.enter_context(FlopCounterMode(display=False))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._counting is not None:
            self._counting.close()
            self._counting = None
            self._counted.append(self._flops.get_total_flops())
            pl_module.flops_per_batch = sum(self._counted) // len(self._counted)
        exclude_time(self, RunningStage.TRAINING, SamplingClock.seconds - self._clock)  # sampling callbacks' time
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if step % trainer.log_every_n_steps == 0 and step != self._memory_step:
            self._memory_step = step
            log_scalars(trainer, {"train/device/peak_memory_mib": peak_memory_mib(pl_module.device)})


    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args, **kwargs) -> None:
        # The count is of a training step: validation batches get samples/s and tokens/s, not FLOP/s.
        counted = self._counted and not _has_own_flops(pl_module)
        if counted:
            pl_module.flops_per_batch = None
        super().on_validation_batch_end(trainer, pl_module, *args, **kwargs)
        if counted:
            pl_module.flops_per_batch = sum(self._counted) // len(self._counted)


def _has_own_flops(pl_module: pl.LightningModule) -> bool:
    """Whether the module defines ``flops_per_batch`` itself (a class attribute or property)."""
    return hasattr(type(pl_module), "flops_per_batch")


class SamplingThroughput(ScheduledSampling):
    """Logs how fast the model samples: ``throughput/sampling_samples_per_s``.

    Every ``every_n_steps`` and at the end of training, every rank draws its share of ``sampling`` (after a
    one-step warm-up) on the EMA weights; the rate is N over the slowest rank's wall time.

    Args:
        sampling: the samples timed.
        every_n_steps: measure every this many optimiser steps (None: only at the end).
        at_fit_end: also measure when training ends.
    """

    def __init__(self, *, sampling: SamplingSettings = SamplingSettings(), every_n_steps: int | None = 1000,
                 at_fit_end: bool = True) -> None:
        super().__init__(every_n_steps, at_fit_end)
        self.sampling = sampling

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.draw(trainer, pl_module, replace(self.sampling, steps=1))  # warm-up: first-call allocations, kernels
        _, _, seconds = self.draw(trainer, pl_module, self.sampling)
        log_scalars(trainer, {"throughput/sampling_samples_per_s": self.sampling.num_samples / seconds})
