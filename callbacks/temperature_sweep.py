"""Sample quality across temperatures, nucleus masses and step counts, during training."""

from __future__ import annotations

import itertools

import lightning.pytorch as pl

from lightning_ddd.evaluation import MetricOptions, SamplingSettings, generate

from callbacks._logging import log_figure, log_scalars
from callbacks._plots import data_references, metric_lines
from callbacks._scheduled import ScheduledSampling


class TemperatureSweep(ScheduledSampling):
    """Samples at every (steps, temperature, top-p) setting and logs each metric per setting, plus a plot.

    Scalars: ``sweep/<metric>/steps=<n>/T=<t>`` for ``entropy``, ``oracle_nll`` (data with a known density) and
    what ``metrics`` turns on (e.g. ``gen_ppl``, ``fid``); ``/top_p=<p>`` is appended when a top-p other than 1
    is swept.
    Image: ``sweep/plot``, each metric against temperature with one line per step count (and top-p).
    Every setting uses the same ``seed``, so settings differ only by the setting. Runs on rank 0 with the
    EMA weights when EMA is on (see ``callbacks._sampling``).

    Args:
        every_n_steps: sweep every this many optimiser steps (None: only at the end of training).
        temperatures: softmax temperatures of the x-prediction to sweep.
        top_ps: nucleus masses to sweep (1.0 = off).
        steps: sampling step counts to sweep.
        num_samples: samples per setting.
        seed: seed of every setting's sampler.
        at_fit_end: also sweep once when training ends.
        top_k: top-k filter of every setting (0 = off).
        precision: dtype of the categorical draws ("float64" or "float32").
        batch_size: samples drawn at once.
        cache: use the RADD caching sampler (masked, time-independent models).
        metrics: metrics beyond entropy and the oracle NLL, as for the ``evaluate`` subcommand, e.g.
            ``{evaluator: gpt2-large}`` for generative perplexity or ``{fid: true}`` for image data.
    """

    def __init__(
        self,
        every_n_steps: int | None = 1000,
        temperatures: list[float] = [0.8, 0.9, 1.0],
        top_ps: list[float] = [1.0],
        steps: list[int] = [64],
        num_samples: int = 64,
        seed: int = 0,
        at_fit_end: bool = True,
        top_k: int = 0,
        precision: str = "float64",
        batch_size: int = 64,
        cache: bool = False,
        metrics: MetricOptions | None = None,
    ) -> None:
        super().__init__(every_n_steps, at_fit_end, metrics)
        if not (temperatures and top_ps and steps):
            raise ValueError("TemperatureSweep: temperatures, top_ps and steps each need at least one value.")
        self.grid = [SamplingSettings(n, t, p, top_k, precision, seed, num_samples, batch_size, cache)
                     for n, t, p in itertools.product(steps, temperatures, top_ps)]
        for settings in self.grid:
            settings.validate()  # a bad value fails when the config is read, not after hours of training
        self.show_top_p = any(p != 1.0 for p in top_ps)

    def tag(self, metric: str, settings: SamplingSettings) -> str:
        tag = f"sweep/{metric}/steps={settings.steps}/T={settings.temperature}"
        return tag + (f"/top_p={settings.top_p}" if self.show_top_p else "")

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows, scalars = [], {}
        for settings in self.grid:
            tokens, _, _ = generate(pl_module, settings)  # (N, D)
            metrics = self.score(tokens)
            scalars.update({self.tag(name, settings): value for name, value in metrics.items()})
            line = f"steps={settings.steps}" + (f", top_p={settings.top_p}" if self.show_top_p else "")
            rows.append({"temperature": settings.temperature, "line": line, **metrics})
        log_scalars(trainer, scalars)
        names = list(dict.fromkeys(name for row in rows for name in row if name not in ("temperature", "line")))
        figure = metric_lines(rows, "temperature", "line", names, "temperature",
                              title=f"temperature sweep, step {trainer.global_step}",
                              references=data_references(trainer.datamodule))
        log_figure(trainer, "sweep/plot", figure)
