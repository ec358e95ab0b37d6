"""Pure tensor maths of discrete diffusion (no Lightning): schedules, processes, losses, samplers."""

from lightning_ddd.diffusion.categorical import resolve_precision, sample_categorical
from lightning_ddd.diffusion.likelihood import estimate_nll
from lightning_ddd.diffusion.processes import DiscreteProcess, MaskedProcess, UniformProcess
from lightning_ddd.diffusion.sampling import SampleOutput, filter_logits, sample, validate_sampling_args
from lightning_ddd.diffusion.schedules import CosineSchedule, LinearSchedule, LogLinearSchedule, NoiseSchedule

__all__ = [
    "CosineSchedule",
    "DiscreteProcess",
    "LinearSchedule",
    "LogLinearSchedule",
    "MaskedProcess",
    "NoiseSchedule",
    "SampleOutput",
    "UniformProcess",
    "estimate_nll",
    "filter_logits",
    "resolve_precision",
    "sample",
    "sample_categorical",
    "validate_sampling_args",
]
