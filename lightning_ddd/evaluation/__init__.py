"""Sampling and evaluation shared by the ``sample``/``evaluate`` subcommands, the callbacks and notebooks.

``settings`` (what to sample, what to score), ``sampling`` (draw samples), ``evaluators`` (load evaluator
LMs and hand them to the metrics), ``scoring`` (score samples and likelihoods), ``outputs`` (result files).
"""

from lightning_ddd.evaluation.evaluators import load_ar_evaluator, load_evaluator
from lightning_ddd.evaluation.outputs import (
    SAMPLE_FILES,
    check_output_dir,
    check_writable_samples,
    markdown_table,
    settings_record,
    table_files,
    write_samples,
    write_table,
)
from lightning_ddd.evaluation.sampling import generate
from lightning_ddd.evaluation.scoring import SampleScorer, data_row, dataset_tokens, likelihood_bound, sample_metrics
from lightning_ddd.evaluation.settings import MetricOptions, SamplingSettings, has_density, sweep

__all__ = [
    "SAMPLE_FILES",
    "MetricOptions",
    "SampleScorer",
    "SamplingSettings",
    "check_output_dir",
    "check_writable_samples",
    "data_row",
    "dataset_tokens",
    "generate",
    "has_density",
    "likelihood_bound",
    "load_ar_evaluator",
    "load_evaluator",
    "markdown_table",
    "sample_metrics",
    "settings_record",
    "sweep",
    "table_files",
    "write_samples",
    "write_table",
]
