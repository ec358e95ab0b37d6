"""``sample/gen_ppl`` (generative perplexity under an evaluator) next to ``sample/entropy``, during training."""

from __future__ import annotations

from lightning_ddd.evaluation import MetricOptions, SamplingSettings

from ._scheduled import SampleMetricsLogger


class PerplexityLogger(SampleMetricsLogger):
    """Draws ``sampling.num_samples`` samples with a fixed seed and logs their generative perplexity.

    Scalars: ``sample/gen_ppl`` and ``sample/gen_nll`` (nats per token), ``sample/entropy`` (mean per-sample
    unigram entropy of the same samples: low entropy can buy a low perplexity), ``sample/oracle_nll`` on data
    with a known density, and ``sample/grad_moment`` when ``metrics.gradient_moment`` is on. Text:
    ``sample/protocol/gen_ppl``, the sampling settings and the evaluator, once. Scored by
    ``lightning_ddd.evaluation.SampleScorer``, as in the ``evaluate`` subcommand. Every rank draws its share,
    rank 0 scores; with the EMA weights when EMA is on (see ``lightning_ddd.callbacks._sampling``); the callback owns the evaluator,
    so it is loaded once, before the first training step, and never lands in a model checkpoint.

    Args:
        sampling: how the samples are drawn.
        metrics: ``metrics.evaluator`` is required: ``oracle`` (the data's exact density, e.g. MarkovChain;
            offline), the path of an ``ARLanguageModel`` checkpoint trained on this data (offline), or a
            Hugging Face causal LM name or folder (``gpt2-large`` is the field's convention; decoded text is
            retokenized).
        every_n_steps: evaluate every this many optimiser steps (None: only at the end of training).
        at_fit_end: also evaluate once when training ends.
    """

    protocol_name = "gen_ppl"

    def __init__(
        self,
        *,
        sampling: SamplingSettings = SamplingSettings(),
        metrics: MetricOptions = MetricOptions(),
        every_n_steps: int | None = 1000,
        at_fit_end: bool = True,
    ) -> None:
        if metrics.evaluator is None:
            raise ValueError(
                "PerplexityLogger: set metrics.evaluator to 'oracle', an ARLanguageModel checkpoint path or a "
                "Hugging Face LM name such as gpt2-large."
            )
        super().__init__(sampling, metrics, every_n_steps, at_fit_end)
