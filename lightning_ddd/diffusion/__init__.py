"""Pure tensor maths of discrete diffusion (no Lightning): schedules, processes, losses, samplers."""

from lightning_ddd.diffusion.categorical import resolve_precision, sample_categorical
from lightning_ddd.diffusion.processes import DiscreteProcess, MaskedProcess, UniformProcess
from lightning_ddd.diffusion.schedules import CosineSchedule, LinearSchedule, LogLinearSchedule, NoiseSchedule

__all__ = [
    "CosineSchedule",
    "DiscreteProcess",
    "LinearSchedule",
    "LogLinearSchedule",
    "MaskedProcess",
    "NoiseSchedule",
    "UniformProcess",
    "resolve_precision",
    "sample_categorical",
]
