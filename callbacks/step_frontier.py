"""Sample quality against the number of sampling steps, for the model and (for a student) its teacher."""

from __future__ import annotations

import lightning.pytorch as pl

from lightning_ddd.evaluation import MetricOptions, SamplingSettings, markdown_table, sweep

from ._logging import log_figure, log_markdown, log_scalars
from ._plots import data_references, metric_lines
from ._scheduled import ScheduledSampling

#: per-setting numbers that describe cost, not quality: logged, but not plotted
_COST = ("mean_nfe", "seconds_per_sample")


class StepFrontier(ScheduledSampling):
    """Quality vs number of sampling steps: the curve a few-step student must push down and to the left.

    For every step count, samples are drawn with the same seed from the model being trained and, when the
    module is a distilled student (it has a ``teacher``), from its frozen teacher. The teacher never changes
    during training, so its numbers are computed once and shown again in each table and plot.

    Text: ``frontier/table``, a markdown table of every metric at every step count, for the model and the
    teacher. Image: ``frontier/plot``, each quality metric against steps. Scalars: only the model's numbers
    at the reference step count (``sampling.steps`` when it is among ``steps``, else the smallest, the
    few-step end a student is distilled for): ``frontier/<metric>/steps=<n>`` for ``entropy``, ``oracle_nll``
    (data with a known density), what ``metrics`` turns on, ``mean_nfe`` and ``seconds_per_sample``. The
    teacher's numbers never change during training, so they are in the table and the plot, not in curves.
    Every rank samples its share, rank 0 scores; with the EMA weights when EMA is on (see
    ``lightning_ddd.callbacks._sampling``).

    Args:
        steps: sampling step counts (each replaces ``sampling.steps``).
        sampling: every other sampling setting, shared by all step counts (model and teacher alike); its
            ``steps`` names the reference step count when it is among ``steps``.
        metrics: metrics beyond entropy and the oracle NLL, as for the ``evaluate`` subcommand, e.g.
            ``{evaluator: gpt2-large}`` for generative perplexity or ``{fid: true}`` for image data.
        every_n_steps: evaluate every this many optimiser steps (None: only at the end of training).
        at_fit_end: also evaluate once when training ends.
        teacher: also evaluate a student's teacher.
    """

    plots = True

    def __init__(
        self,
        *,
        steps: list[int] = [4, 8, 16, 32, 64, 128, 256, 512, 1024],
        sampling: SamplingSettings = SamplingSettings(),
        metrics: MetricOptions = MetricOptions(),
        every_n_steps: int | None = None,
        at_fit_end: bool = True,
        teacher: bool = True,
    ) -> None:
        super().__init__(every_n_steps, at_fit_end, metrics)
        if not steps:
            raise ValueError("StepFrontier: steps needs at least one step count.")
        self.grid = sweep(sampling, steps=sorted(set(steps)))
        self.reference_steps = sampling.steps if sampling.steps in steps else min(steps)
        self.include_teacher = teacher
        self._teacher_rows: list[dict] | None = None

    def _frontier(self, model, trainer: pl.Trainer, label: str) -> list[dict]:
        rows = []
        for settings in self.grid:
            tokens, nfe, seconds = self.draw(trainer, model, settings)  # (N, D), (N,), on every rank
            rows.append({"model": label, "steps": settings.steps,
                         **self.score(tokens),
                         "mean_nfe": nfe.float().mean().item(), "seconds_per_sample": seconds / settings.num_samples})
        return rows

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows = self._frontier(pl_module, trainer, "model")
        teacher = getattr(pl_module, "teacher", None) if self.include_teacher else None
        if teacher is not None:
            if self._teacher_rows is None:
                self._teacher_rows = self._frontier(teacher, trainer, "teacher")
            rows += self._teacher_rows
        if not trainer.is_global_zero:
            return
        (reference,) = [row for row in rows if row["model"] == "model" and row["steps"] == self.reference_steps]
        log_scalars(trainer, {f"frontier/{name}/steps={reference['steps']}": value for name, value in reference.items()
                              if name not in ("model", "steps")})
        table = markdown_table(rows)
        log_markdown(trainer, "frontier/table", f"step {trainer.global_step}\n\n{table}")
        quality = [name for name in dict.fromkeys(k for row in rows for k in row)
                   if name not in ("model", "steps", *_COST)]
        figure = metric_lines(rows, "steps", "model", quality, "sampling steps", log2_x=True,
                              title=f"step frontier, step {trainer.global_step}",
                              references=data_references(trainer.datamodule))
        log_figure(trainer, "frontier/plot", figure)
