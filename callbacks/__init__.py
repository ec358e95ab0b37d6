"""Lightning callbacks of lightning_ddd, installed as ``lightning_ddd.callbacks``.

This folder sits at the top of the repository; ``lightning_ddd/callbacks`` is a link to it, through which
a source checkout imports it and the wheel ships it (inside ``lightning_ddd``, never as a top-level
``callbacks`` package). Its own imports are relative, so it works under that one name.

Use them from YAML::

    trainer:
      callbacks:
        - class_path: lightning_ddd.callbacks.TemperatureSweep
          init_args:
            every_n_steps: 500
            temperatures: [0.8, 1.0]
            steps: [16, 64]
            sampling: {num_samples: 256}

Every sampling callback takes one ``sampling:`` block (:class:`lightning_ddd.evaluation.SamplingSettings`)
and, where it scores samples, one ``metrics:`` block (:class:`lightning_ddd.evaluation.MetricOptions`), as
the ``sample`` and ``evaluate`` subcommands do. Every rank draws its share of the samples and rank 0
scores them, with the EMA weights when an ``EMA`` (or Lightning's ``EMAWeightAveraging``) callback is on
(swapped in explicitly, so the order of the callback list does not matter), with
``lightning_ddd.evaluation``, the code behind the ``evaluate`` subcommand. ``EMA`` averages the weights
under DDP and FSDP alike; ``Compile`` compiles the networks; ``Throughput`` and ``SamplingThroughput``
measure speed and model FLOPs utilisation.
``_scheduled`` says when they run, ``_sampling`` on which weights and ranks, and why.
"""

from ._sampling import averaged_weights
from .compile import Compile
from .ema import EMA, export_weights
from .fid_logger import FIDLogger
from .perplexity_logger import PerplexityLogger
from .resumable_checkpoint import ResumableCheckpoint
from .sample_logger import SampleLogger
from .step_frontier import StepFrontier
from .temperature_sweep import TemperatureSweep
from .throughput import SamplingThroughput, Throughput

__all__ = [
    "EMA",
    "Compile",
    "FIDLogger",
    "PerplexityLogger",
    "ResumableCheckpoint",
    "SamplingThroughput",
    "SampleLogger",
    "StepFrontier",
    "TemperatureSweep",
    "Throughput",
    "averaged_weights",
    "export_weights",
]
