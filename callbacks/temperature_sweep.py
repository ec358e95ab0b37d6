"""Sample quality across temperatures, nucleus masses and step counts, during training."""

from __future__ import annotations

import lightning.pytorch as pl

from lightning_ddd.evaluation import MetricOptions, SamplingSettings, sweep

from ._logging import log_figure, log_scalars
from ._plots import data_references, metric_lines
from ._scheduled import ScheduledSampling


class TemperatureSweep(ScheduledSampling):
    """Samples at every (steps, temperature, top-p) setting and logs each metric per setting, plus a plot.

    Scalars: ``sweep/<metric>/steps=<n>/T=<t>`` for ``entropy``, ``oracle_nll`` (data with a known density) and
    what ``metrics`` turns on (e.g. ``gen_ppl``, ``fid``); ``/top_p=<p>`` is appended when a top-p other than 1
    is swept.
    Image: ``sweep/plot``, each metric against temperature with one line per step count (and top-p).
    Every setting uses the same ``sampling.seed``, so settings differ only by the setting. Every rank draws
    its share, rank 0 scores; with the EMA weights when EMA is on (see ``lightning_ddd.callbacks._sampling``).

    Args:
        temperatures: softmax temperatures of the x-prediction to sweep.
        top_ps: nucleus masses to sweep (None: ``sampling.top_p`` only).
        steps: sampling step counts to sweep (None: ``sampling.steps`` only).
        sampling: every other sampling setting, shared by all settings of the sweep.
        metrics: metrics beyond entropy and the oracle NLL, as for the ``evaluate`` subcommand, e.g.
            ``{evaluator: gpt2-large}`` for generative perplexity or ``{fid: true}`` for image data.
        every_n_steps: sweep every this many optimiser steps (None: only at the end of training).
        at_fit_end: also sweep once when training ends.
    """

    plots = True

    def __init__(
        self,
        *,
        temperatures: list[float] = [0.8, 0.9, 1.0],
        top_ps: list[float] | None = None,
        steps: list[int] | None = None,
        sampling: SamplingSettings = SamplingSettings(),
        metrics: MetricOptions = MetricOptions(),
        every_n_steps: int | None = 1000,
        at_fit_end: bool = True,
    ) -> None:
        super().__init__(every_n_steps, at_fit_end, metrics)
        self.grid = sweep(sampling, steps=steps, temperatures=temperatures, top_ps=top_ps)
        self.show_top_p = any(settings.top_p != 1.0 for settings in self.grid)

    def tag(self, metric: str, settings: SamplingSettings) -> str:
        tag = f"sweep/{metric}/steps={settings.steps}/T={settings.temperature}"
        return tag + (f"/top_p={settings.top_p}" if self.show_top_p else "")

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows, scalars = [], {}
        for settings in self.grid:
            tokens, _, _ = self.draw(trainer, pl_module, settings)  # (N, D), on every rank
            if not trainer.is_global_zero:
                continue
            metrics = self.score(tokens)
            scalars.update({self.tag(name, settings): value for name, value in metrics.items()})
            line = f"steps={settings.steps}" + (f", top_p={settings.top_p}" if self.show_top_p else "")
            rows.append({"temperature": settings.temperature, "line": line, **metrics})
        if not trainer.is_global_zero:
            return
        log_scalars(trainer, scalars)
        names = list(dict.fromkeys(name for row in rows for name in row if name not in ("temperature", "line")))
        figure = metric_lines(rows, "temperature", "line", names, "temperature",
                              title=f"temperature sweep, step {trainer.global_step}",
                              references=data_references(trainer.datamodule))
        log_figure(trainer, "sweep/plot", figure)
