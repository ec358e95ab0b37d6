"""Scores of samples and of the model's likelihood, shared by the subcommands, callbacks and notebooks.

In a data-parallel evaluation (``Ranks`` with several processes) every rank holds all N samples; the
metrics with summed states (generative perplexity, gradient moment, FID/IS/KID, the NLL bound) update on
this rank's rows only and all-reduce in ``compute``, and the cheap metrics of the whole set (entropy, the
oracle NLL, the data's sample statistics) are computed on every rank from all N.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_ddd.diffusion.likelihood import estimate_nll
from lightning_ddd.distributed import Ranks
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
        ranks: the processes that score together (every one calls the scorer with the same N samples, and
            the metric states all-reduce in ``compute``); one process (the default, and the callbacks, where
            rank 0 scores alone) never syncs. Rank 0 builds evaluators and reference statistics first, so
            the others read its caches.
    """

    def __init__(self, options: MetricOptions, datamodule, vocab_size: int, device: str | torch.device = "cpu",
                 ranks: Ranks = Ranks()) -> None:
        options.validate(datamodule)
        self.options, self.datamodule, self.vocab_size, self.ranks = options, datamodule, vocab_size, ranks
        with ranks.first():
            self._build(options, datamodule, device, {"sync_on_compute": ranks.world_size > 1})

    def _build(self, options: MetricOptions, datamodule, device, sync: dict) -> None:
        decode = datamodule.decode if datamodule is not None else None
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
        """Every metric of (N, D) samples (all N on every rank)."""
        metrics = sample_metrics(tokens, self.datamodule, self.vocab_size)
        mine = tokens[self.ranks.rows(len(tokens))]  # the rows this rank feeds the summed-state metrics
        if self.perplexity is not None:
            self.perplexity.reset()
            for chunk in mine.split(self.options.evaluator_batch_size * 16):  # bounds decoded-text memory
                self.perplexity.update(chunk)
            metrics.update(_floats(self.perplexity.compute()))
        if self.moment is not None:
            metrics["grad_moment"] = self._gradient_moment(tokens)
        if self.fidelity is not None:
            self.fidelity.reset()
            for chunk in mine.split(256):
                self.fidelity.update(self.datamodule.decode(chunk))
            metrics.update(_floats(self.fidelity.compute()))
        return metrics

    def _gradient_moment(self, tokens: Tensor) -> float:
        self.moment.reset()
        self.datamodule.setup("validate")
        data = dataset_tokens(self.datamodule.val_set, len(tokens))
        batch, rows = self.options.evaluator_batch_size, self.ranks.rows(len(tokens))
        for source, samples in (("gen", tokens[rows]), ("data", data[rows])):
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
                     seed: int = 0, ranks: Ranks = Ranks()) -> dict[str, float]:
    """NLL bound per token (and PPL, bits per token) of the validation set under the model's ``val_loss``.

    ``max_batches`` validation batches (None: all) are scored; with several ``ranks`` each scores every
    world_size-th of their rows, with its own noise stream, and the summed states all-reduce.
    """
    if not hasattr(model, "val_loss"):
        return {}
    datamodule.setup("validate")
    metric = NLLMetric(sync_on_compute=ranks.world_size > 1).to(model.device)
    generator = torch.Generator(device=model.device).manual_seed(ranks.seed(seed))
    model.eval()
    loader = datamodule.val_dataloader()
    if ranks.world_size > 1:
        loader = _rank_loader(loader, max_batches, ranks)
        max_batches = None
    for i, x in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x = x.to(model.device)
        metric.update(estimate_nll(model.denoise, x, model.process, model.val_loss, num_draws, generator), x.shape[1])
    return {name: value.item() for name, value in metric.compute().items()}


def _rank_loader(loader: torch.utils.data.DataLoader, max_batches: int | None, ranks: Ranks):
    """This rank's part of the rows a one-process run scores: every world_size-th of the first
    ``max_batches`` batches' rows, in batches of the same size."""
    total = len(loader.dataset)
    if max_batches is not None:
        total = min(total, max_batches * loader.batch_size)
    rows = torch.utils.data.Subset(loader.dataset, range(ranks.rank, total, ranks.world_size))
    return torch.utils.data.DataLoader(rows, batch_size=loader.batch_size, collate_fn=loader.collate_fn)
