"""Sample quality across temperatures, nucleus masses and step counts, during training."""

from __future__ import annotations

import lightning.pytorch as pl

from lightning_ddd.evaluation import MetricOptions, SamplingSettings, markdown_table, sweep

from ._logging import log_figure, log_markdown, log_scalars
from ._plots import data_references, metric_lines
from ._scheduled import ScheduledSampling


class TemperatureSweep(ScheduledSampling):
    """Samples at every (steps, temperature, top-p) setting; logs a plot and a table of every setting, and a
    scalar curve over training for one setting.

    Text: ``sweep/table``, a markdown table of every metric at every setting. Image: ``sweep/plot``, each
    metric against temperature with one line per step count (and top-p). Scalars: only for the reference
    setting, the one ``sampling`` names (its steps, temperature and top-p) when the sweep holds it, else the
    first setting of the sweep: ``sweep/<metric>/steps=<n>/T=<t>`` (``/top_p=<p>`` appended when a top-p
    other than 1 is swept), for ``entropy``, ``oracle_nll`` (data with a known density) and what
    ``metrics`` turns on (e.g. ``gen_ppl``, ``fid``). A tag per setting would put a single point per
    evaluation for every setting in the scalars tab; the table and the plot hold them.
    Every setting uses the same ``sampling.seed``, so settings differ only by the setting. Every rank draws
    its share, rank 0 scores; with the EMA weights when EMA is on (see ``lightning_ddd.callbacks._sampling``).

    Args:
        temperatures: softmax temperatures of the x-prediction to sweep.
        top_ps: nucleus masses to sweep (None: ``sampling.top_p`` only).
        steps: sampling step counts to sweep (None: ``sampling.steps`` only).
        sampling: every other sampling setting, shared by all settings of the sweep; its steps,
            temperature and top-p name the reference setting that gets scalar curves.
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
        self.reference = sampling if sampling in self.grid else self.grid[0]

    def tag(self, metric: str, settings: SamplingSettings) -> str:
        tag = f"sweep/{metric}/steps={settings.steps}/T={settings.temperature}"
        return tag + (f"/top_p={settings.top_p}" if self.show_top_p else "")

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows = []
        for settings in self.grid:
            tokens, _, _ = self.draw(trainer, pl_module, settings)  # (N, D), on every rank
            if not trainer.is_global_zero:
                continue
            metrics = self.score(tokens)
            if settings == self.reference:
                log_scalars(trainer, {self.tag(name, settings): value for name, value in metrics.items()})
            line = f"steps={settings.steps}" + (f", top_p={settings.top_p}" if self.show_top_p else "")
            rows.append({"steps": settings.steps, "temperature": settings.temperature, "top_p": settings.top_p,
                         "line": line, **metrics})
        if not trainer.is_global_zero:
            return
        table = markdown_table([{k: v for k, v in row.items() if k != "line"} for row in rows])
        log_markdown(trainer, "sweep/table", f"step {trainer.global_step}\n\n{table}")
        names = list(dict.fromkeys(name for row in rows for name in row
                                   if name not in ("steps", "temperature", "top_p", "line")))
        figure = metric_lines(rows, "temperature", "line", names, "temperature",
                              title=f"temperature sweep, step {trainer.global_step}",
                              references=data_references(trainer.datamodule))
        log_figure(trainer, "sweep/plot", figure)
