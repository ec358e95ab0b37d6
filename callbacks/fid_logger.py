"""``sample/fid`` (Frechet distance of sampled to held-out images) next to ``sample/entropy``, during training."""

from __future__ import annotations

from dataclasses import replace

from lightning_ddd.evaluation import MetricOptions, SamplingSettings

from ._scheduled import SampleMetricsLogger


class FIDLogger(SampleMetricsLogger):
    """Draws ``sampling.num_samples`` images with a fixed seed and logs their FID against the held-out images.

    Scalars: ``sample/fid``, ``sample/entropy`` of the same samples, and ``sample/isc_mean``/``isc_std`` and
    ``sample/kid_mean``/``kid_std`` when ``metrics`` asks. Text: ``sample/protocol/fid``, the sampling
    settings, the extractor and the reference size, once. Image data only (checked at set-up). Scored by
    ``lightning_ddd.evaluation.SampleScorer``, as in the ``evaluate`` subcommand; the reference statistics
    are computed before the first training step and cached on disk. Every rank draws its share, rank 0
    scores; with the EMA weights when EMA is on (see ``lightning_ddd.callbacks._sampling``); the callback owns the feature extractor, so
    it never lands in a model checkpoint. The paper protocol is 50k samples against the whole training set
    with ``inception-v3-compat``; fewer samples give a higher (biased) FID that still tracks training.

    Args:
        sampling: how the images are drawn (at least 2: FID needs a covariance).
        metrics: the FID protocol (``fid_extractor``, ``fid_weights_path``, ``fid_reference_size``,
            ``cache_dir``; ``isc``/``kid`` add those); ``fid`` is always on here.
        every_n_steps: evaluate every this many optimiser steps (None: only at the end of training).
        at_fit_end: also evaluate once when training ends.
    """

    protocol_name = "fid"

    def __init__(
        self,
        *,
        sampling: SamplingSettings = SamplingSettings(),
        metrics: MetricOptions = MetricOptions(),
        every_n_steps: int | None = 5000,
        at_fit_end: bool = True,
    ) -> None:
        if sampling.num_samples < 2:
            raise ValueError(f"FIDLogger: num_samples={sampling.num_samples} must be >= 2 (FID needs a covariance).")
        super().__init__(sampling, replace(metrics, fid=True), every_n_steps, at_fit_end)
