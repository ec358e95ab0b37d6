"""Scores of samples and of the model's likelihood, shared by the subcommands, callbacks and notebooks."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_ddd.diffusion.likelihood import estimate_nll
from lightning_ddd.evaluation.evaluators import load_evaluator
from lightning_ddd.evaluation.settings import MetricOptions
from lightning_ddd.metrics import (
    GenerativePerplexity,
    GradientMoment,
    ImageFidelity,
    NLLMetric,
    TorchEvaluator,
    dataset_reference,
    unigram_entropy,
)


def sample_metrics(tokens: Tensor, datamodule, vocab_size: int) -> dict[str, float]:
    """Metrics of samples that need no extra model: unigram entropy, and where the data's law is known the exact
    oracle NLL and the data's ``sample_statistics`` (e.g. marginal and transition KL of a Markov chain)."""
    metrics = {"entropy": unigram_entropy(tokens, vocab_size).mean().item()}
    oracle = datamodule.oracle_log_likelihood(tokens) if datamodule is not None else None
    if oracle is not None:
        metrics["oracle_nll"] = (-oracle.double().mean() / tokens.shape[1]).item()
    metrics.update(datamodule.sample_statistics(tokens) if datamodule is not None else {})
    return metrics


class SampleScorer:
    """Scores sets of samples with every metric the options ask for; heavy models load once, at construction.

    ``scorer(tokens)`` returns ``sample_metrics`` plus ``gen_nll``/``gen_ppl``, ``grad_moment``, ``fid``,
    ``isc_mean``/``isc_std``, ``kid_mean``/``kid_std`` as enabled; ``scorer.record`` names the evaluator and
    extractor, to be stored next to the numbers.

    Args:
        options: which metrics.
        datamodule: the data (decoding, oracle density, reference images, validation sequences).
        vocab_size: the model's vocabulary (for the entropy).
        device: where evaluator and feature extractor run.
        sync_on_compute: all-reduce the metric states across processes in ``compute`` (False when only one
            rank scores, as in the callbacks: the other ranks would never join the all-reduce).
    """

    def __init__(self, options: MetricOptions, datamodule, vocab_size: int, device: str | torch.device = "cpu",
                 sync_on_compute: bool = True) -> None:
        options.validate(datamodule)
        self.options, self.datamodule, self.vocab_size = options, datamodule, vocab_size
        decode = datamodule.decode if datamodule is not None else None
        sync = {"sync_on_compute": sync_on_compute}
        self.record: dict = {}
        self.perplexity = self.moment = self.fidelity = None
        if options.evaluator is not None:
            evaluator = load_evaluator(options.evaluator, datamodule, device, options.evaluator_batch_size)
            self.perplexity = GenerativePerplexity(evaluator, decode, **sync).to(device)
            self.record["evaluator"] = options.evaluator
            if options.gradient_moment:
                if not isinstance(evaluator, TorchEvaluator):
                    raise ValueError(f"gradient_moment needs a torch-model evaluator, not '{options.evaluator}'.")
                self.moment = GradientMoment(evaluator, options.gradient_moment_params, decode, **sync).to(device)
        if options.images:
            reference = None
            if options.fid or options.kid:
                reference = dataset_reference(datamodule, options.fid_extractor, options.fid_weights_path,
                                              options.cache_dir, options.fid_reference_size, keep_features=options.kid)
                self.record["fid_reference_images"], self.record["fid_reference_split"] = reference.num, reference.split
            self.fidelity = ImageFidelity(reference, options.fid_extractor, options.fid_weights_path,
                                          isc=options.isc, kid=options.kid, **sync).to(device)
            self.record["fid_extractor"] = options.fid_extractor

    @property
    def metrics(self) -> list:
        """The torchmetrics metrics this scorer updates."""
        return [m for m in (self.perplexity, self.moment, self.fidelity) if m is not None]

    def __call__(self, tokens: Tensor) -> dict[str, float]:
        metrics = sample_metrics(tokens, self.datamodule, self.vocab_size)
        if self.perplexity is not None:
            self.perplexity.reset()
            for chunk in tokens.split(self.options.evaluator_batch_size * 16):  # bounds decoded-text memory
                self.perplexity.update(chunk)
            metrics.update(_floats(self.perplexity.compute()))
        if self.moment is not None:
            metrics["grad_moment"] = self._gradient_moment(tokens)
        if self.fidelity is not None:
            self.fidelity.reset()
            for chunk in tokens.split(256):
                self.fidelity.update(self.datamodule.decode(chunk))
            metrics.update(_floats(self.fidelity.compute()))
        return metrics

    def _gradient_moment(self, tokens: Tensor) -> float:
        self.moment.reset()
        self.datamodule.setup("validate")
        data = dataset_tokens(self.datamodule.val_set, len(tokens))
        batch = self.options.evaluator_batch_size
        for source, samples in (("gen", tokens), ("data", data)):
            for chunk in samples.split(batch):
                self.moment.update(chunk, source)
        return self.moment.compute().item()


def data_row(scorer: SampleScorer, num_samples: int, seed: int = 0) -> dict:
    """The scorer's metrics on ``num_samples`` real sequences: the floor a perfect sampler reaches at this N.

    Small-sample metrics are biased (FID, smoothed KLs, entropy), so a sample figure is read against this
    row. The sequences must lie outside every reference: the validation split, or the training split when
    FID/KID statistics or the gradient moment's data come from the validation split, or when the validation
    split holds fewer than N sequences and the training split more. A seeded random subset of the split
    (all of it, and fewer rows, when it is smaller than N).
    """
    data = scorer.datamodule
    data.setup("fit")
    reference_uses_val = scorer.moment is not None or (
        scorer.fidelity is not None and getattr(scorer.fidelity.reference, "split", None) == "val")
    too_small = len(data.val_set) < num_samples < len(data.train_set)
    split = "train" if reference_uses_val or too_small else "val"
    dataset = getattr(data, f"{split}_set")
    if getattr(dataset, "tokens", None) is not None and len(dataset) > num_samples:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num_samples]
        tokens = dataset.tokens[order.sort().values].long()  # (N, D)
    else:
        tokens = dataset_tokens(dataset, num_samples)
    return {"model_class": "data", "data_split": split, "num_samples": len(tokens), **scorer.record, **scorer(tokens)}


def dataset_tokens(dataset, limit: int | None = None) -> Tensor:
    """The first ``limit`` rows of a token dataset as one (N, D) LongTensor."""
    tokens = getattr(dataset, "tokens", None)
    if tokens is None:
        tokens = torch.stack([dataset[i] for i in range(len(dataset) if limit is None else min(limit, len(dataset)))])
    return tokens[:limit].long()


def _floats(values: dict[str, Tensor]) -> dict[str, float]:
    return {name: float(value) for name, value in values.items()}


@torch.no_grad()
def likelihood_bound(model, datamodule, num_draws: int = 1, max_batches: int | None = None,
                     seed: int = 0) -> dict[str, float]:
    """NLL bound per token (and PPL, bits per token) of the validation set under the model's ``val_loss``."""
    if not hasattr(model, "val_loss"):
        return {}
    datamodule.setup("validate")
    metric = NLLMetric().to(model.device)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    model.eval()
    for i, x in enumerate(datamodule.val_dataloader()):
        if max_batches is not None and i >= max_batches:
            break
        x = x.to(model.device)
        metric.update(estimate_nll(model.denoise, x, model.process, model.val_loss, num_draws, generator), x.shape[1])
    return {name: value.item() for name, value in metric.compute().items()}
