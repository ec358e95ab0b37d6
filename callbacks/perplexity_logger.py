"""``sample/gen_ppl`` (generative perplexity under an evaluator) next to ``sample/entropy``, during training."""

from __future__ import annotations

from lightning_ddd.evaluation import MetricOptions, SamplingSettings

from callbacks._scheduled import SampleMetricsLogger


class PerplexityLogger(SampleMetricsLogger):
    """Draws ``num_samples`` samples with a fixed seed and logs their generative perplexity.

    Scalars: ``sample/gen_ppl`` and ``sample/gen_nll`` (nats per token), ``sample/entropy`` (mean per-sample
    unigram entropy of the same samples: low entropy can buy a low perplexity), ``sample/oracle_nll`` on data
    with a known density, and ``sample/grad_moment`` when asked. Text: ``sample/protocol/gen_ppl``, the
    sampling settings and the evaluator, once. Scored by ``lightning_ddd.evaluation.SampleScorer``, as in
    the ``evaluate`` subcommand. Runs on rank 0 with the EMA weights when EMA is on (see
    ``callbacks._sampling``); the callback owns the evaluator, so it is loaded once, before the first
    training step, and never lands in a model checkpoint.

    Args:
        evaluator: ``oracle`` (the data's exact density, e.g. MarkovChain; offline), the path of an
            ``ARLanguageModel`` checkpoint trained on this data (offline), or a Hugging Face causal LM name or
            folder (``gpt2-large`` is the field's convention; decoded text is retokenized).
        every_n_steps: evaluate every this many optimiser steps (None: only at the end of training).
        at_fit_end: also evaluate once when training ends.
        num_samples: samples per evaluation.
        steps: sampling steps.
        temperature: softmax temperature of the x-prediction.
        top_p: nucleus mass kept (1.0 = off).
        top_k: most likely tokens kept (0 = off).
        precision: dtype of the categorical draws ("float64" or "float32").
        seed: seed of the sampler (the same noise at every evaluation).
        batch_size: samples drawn at once.
        cache: use the RADD caching sampler (masked, time-independent models).
        evaluator_batch_size: sequences per evaluator forward pass.
        gradient_moment: also log D-MMD's gradient moment under the (model) evaluator.
        gradient_moment_params: regular expression selecting the evaluator parameters it uses (None: all).
    """

    protocol_name = "gen_ppl"

    def __init__(
        self,
        evaluator: str = "gpt2-large",
        every_n_steps: int | None = 1000,
        at_fit_end: bool = True,
        num_samples: int = 64,
        steps: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        precision: str = "float64",
        seed: int = 0,
        batch_size: int = 64,
        cache: bool = False,
        evaluator_batch_size: int = 16,
        gradient_moment: bool = False,
        gradient_moment_params: str | None = None,
    ) -> None:
        settings = SamplingSettings(steps, temperature, top_p, top_k, precision, seed, num_samples, batch_size, cache)
        metrics = MetricOptions(evaluator=evaluator, evaluator_batch_size=evaluator_batch_size,
                                gradient_moment=gradient_moment, gradient_moment_params=gradient_moment_params)
        super().__init__(settings, metrics, every_n_steps, at_fit_end)
