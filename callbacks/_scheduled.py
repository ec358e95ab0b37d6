"""The schedule shared by the callbacks that sample during training, and the scorer they share.

**When.** :class:`ScheduledSampling` runs every ``every_n_steps`` optimiser steps (``on_train_batch_end``)
and once when training ends (``on_train_end``: Lightning calls it before the strategy's teardown moves the
model to the CPU, so ``on_fit_end`` would sample on the CPU). Both hooks see the training weights, so the
EMA weights are swapped in explicitly (``lightning_ddd.callbacks._sampling``). Every rank draws its share
of the samples (:meth:`ScheduledSampling.draw`); rank 0 scores and logs.

**Scoring.** Samples are scored by :class:`lightning_ddd.evaluation.SampleScorer`, the implementation the
``evaluate`` subcommand uses, configured by :class:`lightning_ddd.evaluation.MetricOptions`. The options are
checked against the data at set-up (every rank, before training); the scorer, which may load an evaluator
LM or a feature extractor, is built once on rank 0 in ``on_train_start`` (the model is on its device by
then), so a missing evaluator fails before the first training step. The callback owns it: evaluator
weights never land in a model checkpoint. Its metrics do not sync across processes, since only rank 0
computes them.
"""

from __future__ import annotations

from dataclasses import asdict

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_ddd.distributed import Ranks
from lightning_ddd.evaluation import MetricOptions, SampleScorer, SamplingSettings, data_row, generate

from ._logging import log_markdown, log_scalars, warn_without_tensorboard, without_duplicates
from ._plots import require_plots
from ._sampling import check_strategy, sampling_context


class ScheduledSampling(Callback):
    """Base class: calls :meth:`evaluate` on every rank, on averaged weights, every ``every_n_steps`` optimiser
    steps and at the end of training.

    Args:
        every_n_steps: run every this many optimiser steps (None: only at the end of training).
        at_fit_end: also run once when training ends (skipped if the last step already ran).
        metrics: what to score beyond entropy and the oracle NLL.
    """

    #: whether :meth:`evaluate` draws plots (then matplotlib, the plots extra, is checked at set-up)
    plots: bool = False

    def __init__(self, every_n_steps: int | None = None, at_fit_end: bool = True,
                 metrics: MetricOptions = MetricOptions()) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"{type(self).__name__}: every_n_steps={every_n_steps} must be >= 1 or null (end only).")
        self.every_n_steps = every_n_steps
        self.at_fit_end = at_fit_end
        self.metrics = metrics
        self.scorer: SampleScorer | None = None
        self._last_step = -1  # global step of the last run
        self._next_step = every_n_steps or 0  # first global step of the next scheduled run

    def sampling_settings(self) -> list[SamplingSettings]:
        """Every setting this callback samples with (checked against the strategy at set-up)."""
        return list(getattr(self, "grid", [])) + ([self.sampling] if hasattr(self, "sampling") else [])

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, self, self.sampling_settings())
        warn_without_tensorboard(trainer, self)
        if self.plots:
            require_plots(self)
        self.metrics.validate(trainer.datamodule)  # every rank, before anything trains

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_steps:  # a resumed run goes on with the next multiple, not from the start
            self._next_step = (trainer.global_step // self.every_n_steps + 1) * self.every_n_steps
        if self.scorer is None and trainer.is_global_zero:
            # only rank 0 scores: a one-process scorer, whose metrics never wait for other ranks
            self.scorer = SampleScorer(self.metrics, trainer.datamodule, pl_module.vocab_size, pl_module.device)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        # ">=" rather than "% == 0": a batch may take several optimiser steps (students that alternate two
        # optimisers) and jump over the multiple; under gradient accumulation the step stays put for
        # several batches, and _next_step moves on after the first.
        if self.every_n_steps and trainer.global_step >= self._next_step:
            self._next_step = (trainer.global_step // self.every_n_steps + 1) * self.every_n_steps
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_fit_end and trainer.global_step != self._last_step:
            self._run(trainer, pl_module)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step  # on every rank, so all ranks agree on the schedule
        with sampling_context(trainer, pl_module):
            self.evaluate(trainer, pl_module)

    def draw(self, trainer: pl.Trainer, model, settings: SamplingSettings) -> tuple[Tensor, Tensor, float]:
        """``evaluation.generate`` shared by the ranks: every rank draws its share and gets all N."""
        return generate(model, settings, ranks=Ranks.of(trainer))

    def score(self, tokens: Tensor) -> dict[str, float]:
        """Every metric of (N, D) samples: entropy, the oracle NLL where the data has one, and ``metrics``
        (rank 0; empty elsewhere), less the ones that repeat another under a second name."""
        return without_duplicates(self.scorer(tokens), self.scorer.record) if self.scorer is not None else {}

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Draw samples (every rank, with :meth:`draw`) and log (rank 0); the averaged weights are in place."""
        raise NotImplementedError


class SampleMetricsLogger(ScheduledSampling):
    """Base class of the loggers of ``sample/<metric>``: one set of samples per evaluation, scored once, so
    ``sample/fid`` or ``sample/gen_ppl`` always sits next to ``sample/entropy`` of the same samples. The
    sampling settings, the evaluator and the same metrics on as many real sequences (``data_<metric>``, the
    floor, from ``lightning_ddd.evaluation.data_row``) are written once as text (``sample/protocol/<name>``),
    so a number is never separated from the protocol that produced it.
    """

    protocol_name = "metrics"

    def __init__(self, sampling: SamplingSettings, metrics: MetricOptions, every_n_steps: int | None,
                 at_fit_end: bool) -> None:
        super().__init__(every_n_steps, at_fit_end, metrics)
        self.sampling = sampling
        self._protocol_logged = False

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tokens, _, _ = self.draw(trainer, pl_module, self.sampling)  # (N, D), every rank draws its share
        if not trainer.is_global_zero:
            return
        scores = self.score(tokens)
        log_scalars(trainer, {f"sample/{name}": value for name, value in scores.items()})
        if not self._protocol_logged:
            floor = data_row(self.scorer, self.sampling.num_samples, self.sampling.seed)  # real data, same N
            floor = {f"data_{k}": v for k, v in floor.items() if k not in self.scorer.record and k != "model_class"}
            record = {**asdict(self.sampling), "sampler": self.sampling.sampler, **self.scorer.record, **floor}
            table = "| setting | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in record.items())
            log_markdown(trainer, f"sample/protocol/{self.protocol_name}", table)
            self._protocol_logged = True
