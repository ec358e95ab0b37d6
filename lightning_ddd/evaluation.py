"""Sampling and evaluation shared by the ``sample``/``evaluate`` subcommands, callbacks and notebooks.

A ``SamplingSettings`` fixes everything that decides a set of samples; every result row carries it, so a
number is never separated from the protocol that produced it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from lightning_ddd.data.base import TokenDataModule
from lightning_ddd.diffusion.likelihood import estimate_nll
from lightning_ddd.diffusion.sampling import validate_sampling_args
from lightning_ddd.metrics import (
    GenerativePerplexity,
    GradientMoment,
    ImageFidelity,
    NLLMetric,
    TorchEvaluator,
    dataset_reference,
    load_evaluator,
    unigram_entropy,
)
from lightning_ddd.modules.base import DiffusionModule

EVAL_STREAM = 2


@dataclass
class SamplingSettings:
    """Everything that decides a set of samples (recorded next to every result)."""

    steps: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    precision: str = "float64"
    seed: int = 0
    num_samples: int = 64
    batch_size: int = 64
    cache: bool = False

    def validate(self, seq_len: int = 1) -> None:
        validate_sampling_args(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, precision=self.precision,
            num_steps=self.steps, num_samples=self.num_samples, seq_len=seq_len,
        )
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1.")

    @property
    def sampler(self) -> str:
        return "caching" if self.cache else "ancestral"


@torch.no_grad()
def generate(model: DiffusionModule, settings: SamplingSettings, progress: bool = False) -> tuple[Tensor, Tensor, float]:
    """Draw ``settings.num_samples`` samples from ``model`` in eval mode.

    Returns:
        tokens (N, D) on the CPU, NFE per sample (N,), and wall-clock seconds.
    """
    settings.validate(model.seq_len)
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=model.device).manual_seed(settings.seed)
    tokens, nfe = [], []
    start = time.perf_counter()
    for first in range(0, settings.num_samples, settings.batch_size):
        n = min(settings.batch_size, settings.num_samples - first)
        out = model.generate(
            n, settings.steps, temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
            precision=settings.precision, generator=generator, cache=settings.cache, progress=progress,
        )
        tokens.append(out.tokens.cpu())
        nfe.append(out.nfe.cpu())
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    seconds = time.perf_counter() - start
    model.train(was_training)
    return torch.cat(tokens), torch.cat(nfe), seconds


def sample_metrics(tokens: Tensor, datamodule: TokenDataModule | None, vocab_size: int) -> dict[str, float]:
    """Metrics of samples that need no extra model: unigram entropy, and where the data's law is known the exact
    oracle NLL and the data's ``sample_statistics`` (e.g. marginal and transition KL of a Markov chain)."""
    metrics = {"entropy": unigram_entropy(tokens, vocab_size).mean().item()}
    oracle = datamodule.oracle_log_likelihood(tokens) if datamodule is not None else None
    if oracle is not None:
        metrics["oracle_nll"] = (-oracle.double().mean() / tokens.shape[1]).item()
    metrics.update(datamodule.sample_statistics(tokens) if datamodule is not None else {})
    return metrics


@dataclass
class MetricOptions:
    """Metrics beyond entropy and the oracle NLL, and how to compute them (recorded next to the results).

    Attributes:
        evaluator: generative perplexity under ``"oracle"`` (the data's exact density), an ``ARLanguageModel``
            checkpoint path, or a Hugging Face causal LM name or folder (e.g. ``"gpt2-large"``); None: off.
        evaluator_batch_size: sequences per evaluator forward pass.
        gradient_moment: also the D-MMD gradient moment under the evaluator (a torch model), against as many
            validation sequences as there are samples.
        gradient_moment_params: regular expression selecting the evaluator parameters it uses (None: all).
        fid: FID of the decoded samples against the held-out (validation) images (image data only).
        isc: Inception Score of the decoded samples.
        kid: KID against the held-out (validation) images.
        fid_extractor: torch-fidelity feature extractor: ``inception-v3-compat`` or the offline ``digits-cnn``.
        fid_weights_path: local weights of the extractor (None: its default, which may download).
        fid_reference_size: validation images in the reference statistics (None: all).
        cache_dir: folder of the cached reference statistics.
    """

    evaluator: str | None = None
    evaluator_batch_size: int = 16
    gradient_moment: bool = False
    gradient_moment_params: str | None = None
    fid: bool = False
    isc: bool = False
    kid: bool = False
    fid_extractor: str = "inception-v3-compat"
    fid_weights_path: str | None = None
    fid_reference_size: int | None = None
    cache_dir: str = "data_cache/fid"

    def validate(self, datamodule: TokenDataModule | None) -> None:
        """Raise on option combinations that cannot work, before any model is loaded."""
        if self.gradient_moment and self.evaluator in (None, "oracle"):
            raise ValueError("gradient_moment needs a model evaluator: set evaluator to a checkpoint or LM name.")
        images = datamodule is not None and datamodule.modality == "image"
        if (self.fid or self.isc or self.kid) and not images:
            raise ValueError("fid/isc/kid need image data (e.g. Digits, CIFAR10Pixels).")
        if self.evaluator == "oracle" and not _has_density(datamodule):
            raise ValueError("evaluator='oracle' needs data with a known density (MarkovChain).")
        if self.evaluator_batch_size < 1:
            raise ValueError(f"evaluator_batch_size={self.evaluator_batch_size} must be >= 1.")


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
    """

    def __init__(self, options: MetricOptions, datamodule: TokenDataModule | None, vocab_size: int,
                 device: str | torch.device = "cpu") -> None:
        options.validate(datamodule)
        self.options, self.datamodule, self.vocab_size = options, datamodule, vocab_size
        decode = datamodule.decode if datamodule is not None else None
        self.record: dict = {}
        self.perplexity = self.moment = self.fidelity = None
        if options.evaluator is not None:
            evaluator = load_evaluator(options.evaluator, datamodule, device, options.evaluator_batch_size)
            self.perplexity = GenerativePerplexity(evaluator, decode).to(device)
            self.record["evaluator"] = options.evaluator
            if options.gradient_moment:
                if not isinstance(evaluator, TorchEvaluator):
                    raise ValueError(f"gradient_moment needs a torch-model evaluator, not '{options.evaluator}'.")
                self.moment = GradientMoment(evaluator, options.gradient_moment_params, decode).to(device)
        if options.fid or options.isc or options.kid:
            reference = None
            if options.fid or options.kid:
                reference = dataset_reference(datamodule, options.fid_extractor, options.fid_weights_path,
                                              options.cache_dir, options.fid_reference_size, keep_features=options.kid)
                self.record["fid_reference_images"], self.record["fid_reference_split"] = reference.num, reference.split
            self.fidelity = ImageFidelity(reference, options.fid_extractor, options.fid_weights_path,
                                          isc=options.isc, kid=options.kid).to(device)
            self.record["fid_extractor"] = options.fid_extractor

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


def _has_density(datamodule: TokenDataModule | None) -> bool:
    probe = torch.zeros(1, datamodule.seq_len, dtype=torch.long) if datamodule is not None else None
    return probe is not None and datamodule.oracle_log_likelihood(probe) is not None


def _floats(values: dict[str, Tensor]) -> dict[str, float]:
    return {name: float(value) for name, value in values.items()}


@torch.no_grad()
def likelihood_bound(model, datamodule: TokenDataModule, num_draws: int = 1, max_batches: int | None = None,
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


def write_table(rows: list[dict], output_dir: str, name: str = "evaluation") -> tuple[str, str]:
    """Write rows as ``<name>.json`` and ``<name>.csv`` (atomically); return both paths."""
    os.makedirs(output_dir, exist_ok=True)
    json_path, csv_path = (os.path.join(output_dir, f"{name}.{ext}") for ext in ("json", "csv"))
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(json_path + ".tmp", "w") as f:
        json.dump(rows, f, indent=2)
    with open(csv_path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(json_path + ".tmp", json_path)
    os.replace(csv_path + ".tmp", csv_path)
    return json_path, csv_path


def write_samples(tokens: Tensor, datamodule: TokenDataModule | None, output_dir: str, record: dict) -> list[str]:
    """Write ``tokens.pt``, a human view (``samples.txt`` or ``samples.png``) and ``samples.json`` (the settings)."""
    os.makedirs(output_dir, exist_ok=True)
    paths = [os.path.join(output_dir, "tokens.pt")]
    torch.save(tokens, paths[0])
    decoded = datamodule.decode(tokens) if datamodule is not None else [" ".join(map(str, r.tolist())) for r in tokens]
    if isinstance(decoded, Tensor):  # images (N, C, H, W) in [0, 1]
        from torchvision.utils import save_image

        paths.append(os.path.join(output_dir, "samples.png"))
        save_image(decoded, paths[-1], nrow=max(1, int(math.sqrt(len(decoded)))), padding=1)
    else:
        paths.append(os.path.join(output_dir, "samples.txt"))
        with open(paths[-1], "w") as f:
            f.write("\n\n".join(f"=== sample {i} ===\n{text}" for i, text in enumerate(decoded)) + "\n")
    paths.append(os.path.join(output_dir, "samples.json"))
    with open(paths[-1], "w") as f:
        json.dump(record, f, indent=2)
    return paths


def settings_record(model, settings: SamplingSettings, ckpt_path: str | None) -> dict:
    """The protocol fields written next to samples and result rows."""
    return {
        "checkpoint": ckpt_path if ckpt_path is not None else getattr(model, "source_label", None),
        "model_class": type(model).__name__,
        "sampler": settings.sampler,
        **asdict(settings),
    }
