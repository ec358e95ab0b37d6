"""A Trainer with two extra entry points, ``sample`` and ``evaluate``, so they share ``fit``'s configs.

LightningCLI builds a subcommand for each Trainer method it is told about; the work itself lives in
:mod:`lightning_ddd.evaluation`, shared with the callbacks.
"""

from __future__ import annotations

import itertools

from lightning.pytorch import Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from tqdm.auto import tqdm

from lightning_ddd.checkpoints import validate_checkpoint
from lightning_ddd.data.base import TokenDataModule
from lightning_ddd.evaluation import (
    MetricOptions,
    SampleScorer,
    SamplingSettings,
    data_row,
    generate,
    likelihood_bound,
    sample_metrics,
    settings_record,
    write_samples,
    write_table,
)
from lightning_ddd.modules.base import DiffusionModule


def load_weights(model: DiffusionModule, ckpt_path: str | None) -> None:
    """Load a checkpoint's (EMA, when EMA was on) weights into ``model``, checking kind and vocabulary first."""
    if ckpt_path is None:
        if not getattr(model, "pretrained", False):  # a released teacher brings its weights
            rank_zero_info("no --ckpt_path given: sampling from the untrained model")
        return
    ckpt = validate_checkpoint(ckpt_path, type(model))
    model.on_load_checkpoint(ckpt)
    model.load_state_dict(ckpt["state_dict"])


class DDDTrainer(Trainer):
    """Lightning's Trainer plus the ``sample`` and ``evaluate`` subcommands."""

    def _prepare(self, model: DiffusionModule, ckpt_path: str | None) -> DiffusionModule:
        load_weights(model, ckpt_path)
        return model.to(self.strategy.root_device).eval()

    def sample(
        self,
        model: DiffusionModule,
        datamodule: TokenDataModule | None = None,
        ckpt_path: str | None = None,
        output_dir: str = "samples",
        num_samples: int = 16,
        steps: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        precision: str = "float64",
        seed: int = 0,
        batch_size: int = 64,
        cache: bool = False,
    ) -> dict:
        """Draw samples and write token ids, decoded text or an image grid, and a JSON sidecar of the settings.

        Args:
            model: the model (filled in by the CLI).
            datamodule: the data, used to decode samples and score them (filled in by the CLI).
            ckpt_path: checkpoint whose weights to sample from.
            output_dir: folder for tokens.pt, samples.txt or samples.png, and samples.json.
            num_samples: number of samples.
            steps: sampling steps.
            temperature: softmax temperature of the x-prediction.
            top_p: nucleus mass kept (1.0 = off).
            top_k: most likely tokens kept (0 = off).
            precision: dtype of the categorical draws ("float64" or "float32").
            seed: seed of the sampler's generator.
            batch_size: samples drawn at once.
            cache: use the RADD caching sampler (masked, time-independent models).
        """
        settings = SamplingSettings(steps, temperature, top_p, top_k, precision, seed, num_samples, batch_size, cache)
        settings.validate(model.seq_len)  # before loading anything
        model = self._prepare(model, ckpt_path)
        tokens, nfe, seconds = generate(model, settings, progress=True)
        record = {**settings_record(model, settings, ckpt_path), "mean_nfe": nfe.float().mean().item(),
                  "seconds_per_sample": seconds / num_samples,
                  **sample_metrics(tokens, datamodule, model.vocab_size)}
        paths = write_samples(tokens, datamodule, output_dir, record)
        rank_zero_info(f"wrote {', '.join(paths)}")
        return record

    def evaluate(
        self,
        model: DiffusionModule,
        datamodule: TokenDataModule | None = None,
        ckpt_path: str | None = None,
        output_dir: str = "evaluation",
        steps: list[int] = [4, 16, 64],
        temperatures: list[float] = [1.0],
        top_ps: list[float] = [1.0],
        top_k: int = 0,
        num_samples: int = 256,
        precision: str = "float64",
        seed: int = 0,
        batch_size: int = 128,
        cache: bool = False,
        nll_num_draws: int = 1,
        nll_max_batches: int | None = None,
        evaluator: str | None = None,
        evaluator_batch_size: int = 16,
        gradient_moment: bool = False,
        gradient_moment_params: str | None = None,
        fid: bool = False,
        isc: bool = False,
        kid: bool = False,
        fid_extractor: str = "inception-v3-compat",
        fid_weights_path: str | None = None,
        fid_reference_size: int | None = None,
        metrics_cache_dir: str = "data_cache/fid",
    ) -> list[dict]:
        """Sweep step counts, temperatures and top-p values; write one row per setting to evaluation.json/.csv.

        Each row holds the checkpoint, model class, steps, sampler, temperature, top_p, precision, seed,
        num_samples, mean NFE, seconds per sample, and every metric this data supports: the NLL bound of the
        validation set (``nll``, ``ppl``, ``bpd``), the mean unigram entropy of the samples, and for data with
        a known density the exact oracle NLL per token of the samples. On request it adds the generative
        perplexity under an evaluator (``gen_nll``, ``gen_ppl``), the gradient moment (``grad_moment``) and,
        for image data, ``fid``, ``isc_mean``/``isc_std``, ``kid_mean``/``kid_std``.

        Args:
            model: the model (filled in by the CLI).
            datamodule: the data (filled in by the CLI).
            ckpt_path: checkpoint to evaluate.
            output_dir: folder for evaluation.json and evaluation.csv.
            steps: sampling step counts to sweep.
            temperatures: temperatures to sweep.
            top_ps: nucleus masses to sweep.
            top_k: top-k filter for every setting (0 = off).
            num_samples: samples per setting.
            precision: dtype of the categorical draws.
            seed: seed of every setting's sampler (the same seeds for every setting).
            batch_size: samples drawn at once.
            cache: use the RADD caching sampler.
            nll_num_draws: K, Monte-Carlo draws per validation sequence for the NLL bound.
            nll_max_batches: validation batches for the NLL bound (None: all).
            evaluator: generative perplexity under "oracle" (the data's exact density), an ARLanguageModel
                checkpoint path, or a Hugging Face causal LM name or folder (e.g. "gpt2-large"); None: off.
            evaluator_batch_size: sequences per evaluator forward pass.
            gradient_moment: also the D-MMD gradient moment under the (model) evaluator, against as many
                validation sequences as samples.
            gradient_moment_params: regular expression selecting the evaluator parameters it uses (None: all).
            fid: FID against the training images (image data).
            isc: Inception Score (image data).
            kid: KID against the training images (image data).
            fid_extractor: "inception-v3-compat" (downloads its weights unless fid_weights_path is set) or
                "digits-cnn" (trained offline on the Digits data).
            fid_weights_path: local weights file of the feature extractor.
            fid_reference_size: training images in the reference statistics (None: all).
            metrics_cache_dir: folder of the cached reference statistics.
        """
        grid = [SamplingSettings(n, temp, p, top_k, precision, seed, num_samples, batch_size, cache)
                for n, temp, p in itertools.product(steps, temperatures, top_ps)]
        for settings in grid:
            settings.validate(model.seq_len)  # every setting is checked before any work starts
        options = MetricOptions(evaluator, evaluator_batch_size, gradient_moment, gradient_moment_params, fid, isc,
                                kid, fid_extractor, fid_weights_path, fid_reference_size, metrics_cache_dir)
        options.validate(datamodule)
        model = self._prepare(model, ckpt_path)
        scorer = SampleScorer(options, datamodule, model.vocab_size, self.strategy.root_device)  # loads models once
        bound = likelihood_bound(model, datamodule, nll_num_draws, nll_max_batches, seed) if datamodule else {}
        rows = [data_row(scorer, num_samples, seed)] if datamodule is not None else []  # the real-data floor
        for settings in tqdm(grid, desc="evaluate"):
            tokens, nfe, seconds = generate(model, settings)
            rows.append({**settings_record(model, settings, ckpt_path), **scorer.record,
                         "mean_nfe": nfe.float().mean().item(), "seconds_per_sample": seconds / settings.num_samples,
                         **bound, **scorer(tokens)})
        paths = write_table(rows, output_dir)
        rank_zero_info(f"wrote {paths[0]} and {paths[1]}")
        return rows
