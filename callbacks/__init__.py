"""Lightning callbacks of lightning_ddd, installed as the top-level ``callbacks`` package.

Use them from YAML::

    trainer:
      callbacks:
        - class_path: callbacks.TemperatureSweep
          init_args: {every_n_steps: 500, temperatures: [0.8, 1.0], steps: [16, 64]}

The sampling callbacks draw samples on rank 0 only, with the EMA weights when an ``EMAWeightAveraging``
callback is on (swapped in explicitly, so the order of the callback list does not matter), and score them
with ``lightning_ddd.evaluation``, the code behind the ``evaluate`` subcommand. ``callbacks._scheduled``
says when they run, ``callbacks._sampling`` on which weights and ranks, and why.
"""

from callbacks._sampling import averaged_weights
from callbacks.fid_logger import FIDLogger
from callbacks.perplexity_logger import PerplexityLogger
from callbacks.sample_logger import SampleLogger
from callbacks.step_frontier import StepFrontier
from callbacks.temperature_sweep import TemperatureSweep
from callbacks.throughput import Throughput

__all__ = [
    "FIDLogger",
    "PerplexityLogger",
    "SampleLogger",
    "StepFrontier",
    "TemperatureSweep",
    "Throughput",
    "averaged_weights",
]
