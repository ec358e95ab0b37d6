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
from lightning_ddd.metrics import NLLMetric, unigram_entropy
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
    """Metrics of samples that need no extra model: unigram entropy, and the exact oracle NLL when the data has one."""
    metrics = {"entropy": unigram_entropy(tokens, vocab_size).mean().item()}
    oracle = datamodule.oracle_log_likelihood(tokens) if datamodule is not None else None
    if oracle is not None:
        metrics["oracle_nll"] = (-oracle.double().mean() / tokens.shape[1]).item()
    return metrics


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
        "checkpoint": ckpt_path,
        "model_class": type(model).__name__,
        "sampler": settings.sampler,
        **asdict(settings),
    }
