"""Draw a set of samples from a model exactly as its ``SamplingSettings`` say."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from lightning_ddd.evaluation.settings import SamplingSettings


@torch.no_grad()
def generate(model, settings: SamplingSettings, progress: bool = False) -> tuple[Tensor, Tensor, float]:
    """Draw ``settings.num_samples`` samples from ``model`` (any module with ``generate``) in eval mode.

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
