"""``sample/fid`` (Frechet distance of sampled to training images) next to ``sample/entropy``, during training."""

from __future__ import annotations

from lightning_ddd.evaluation import MetricOptions, SamplingSettings

from callbacks._scheduled import SampleMetricsLogger


class FIDLogger(SampleMetricsLogger):
    """Draws ``num_samples`` images with a fixed seed and logs their FID against the training images.

    Scalars: ``sample/fid``, ``sample/entropy`` of the same samples, and ``sample/isc_mean``/``isc_std`` and
    ``sample/kid_mean``/``kid_std`` when asked. Text: ``sample/protocol/fid``, the sampling settings, the
    extractor and the reference size, once. Image data only (checked at set-up). Scored by
    ``lightning_ddd.evaluation.SampleScorer``, as in the ``evaluate`` subcommand; the reference statistics
    are computed before the first training step and cached on disk. Runs on rank 0 with the EMA weights
    when EMA is on (see ``callbacks._sampling``); the callback owns the feature extractor, so it never lands
    in a model checkpoint. The paper protocol is 50k samples against the whole training set with
    ``inception-v3-compat``; fewer samples give a higher (biased) FID that still tracks training.

    Args:
        fid_extractor: torch-fidelity feature extractor: ``inception-v3-compat`` (downloads its weights
            unless ``fid_weights_path`` is set) or ``digits-cnn`` (trained offline on the Digits data).
        fid_weights_path: local weights file of the extractor.
        fid_reference_size: training images in the reference statistics (None: all).
        every_n_steps: evaluate every this many optimiser steps (None: only at the end of training).
        at_fit_end: also evaluate once when training ends.
        num_samples: samples per evaluation (at least 2).
        steps: sampling steps.
        temperature: softmax temperature of the x-prediction.
        top_p: nucleus mass kept (1.0 = off).
        top_k: most likely tokens kept (0 = off).
        precision: dtype of the categorical draws ("float64" or "float32").
        seed: seed of the sampler (the same noise at every evaluation).
        batch_size: samples drawn at once.
        cache: use the RADD caching sampler (masked, time-independent models).
        isc: also log the Inception Score.
        kid: also log KID against the training images.
        cache_dir: folder of the cached reference statistics.
    """

    protocol_name = "fid"

    def __init__(
        self,
        fid_extractor: str = "inception-v3-compat",
        fid_weights_path: str | None = None,
        fid_reference_size: int | None = None,
        every_n_steps: int | None = 5000,
        at_fit_end: bool = True,
        num_samples: int = 1000,
        steps: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        precision: str = "float64",
        seed: int = 0,
        batch_size: int = 64,
        cache: bool = False,
        isc: bool = False,
        kid: bool = False,
        cache_dir: str = "data_cache/fid",
    ) -> None:
        if num_samples < 2:
            raise ValueError(f"FIDLogger: num_samples={num_samples} must be >= 2 (FID needs a covariance).")
        settings = SamplingSettings(steps, temperature, top_p, top_k, precision, seed, num_samples, batch_size, cache)
        metrics = MetricOptions(fid=True, isc=isc, kid=kid, fid_extractor=fid_extractor,
                                fid_weights_path=fid_weights_path, fid_reference_size=fid_reference_size,
                                cache_dir=cache_dir)
        super().__init__(settings, metrics, every_n_steps, at_fit_end)
