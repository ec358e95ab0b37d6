"""Draw a set of samples from a model exactly as its ``SamplingSettings`` say, in one process or several."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from lightning_ddd.distributed import Ranks
from lightning_ddd.evaluation.settings import SamplingSettings


@torch.no_grad()
def generate(model, settings: SamplingSettings, progress: bool = False,
             ranks: Ranks = Ranks()) -> tuple[Tensor, Tensor, float]:
    """Draw ``settings.num_samples`` samples from ``model`` (any module with ``generate``) in eval mode.

    With several ``ranks`` every rank must call this: each draws its share (``ranks.share``) from its own
    noise stream (``ranks.seed(settings.seed)``; rank 0's is the one-process stream), and every rank
    returns all N, concatenated in rank order. A one-process run is unchanged.

    Returns:
        tokens (N, D) on the CPU, NFE per sample (N,), and wall-clock seconds (of the slowest rank).
    """
    settings.validate(model.seq_len)
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=model.device).manual_seed(ranks.seed(settings.seed))
    num = ranks.share(settings.num_samples)
    tokens, nfe = [], []
    start = time.perf_counter()
    for first in range(0, num, settings.batch_size):
        n = min(settings.batch_size, num - first)
        out = model.generate(
            n, settings.steps, temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
            precision=settings.precision, generator=generator, cache=settings.cache, progress=progress,
        )
        tokens.append(out.tokens.cpu())
        nfe.append(out.nfe.cpu())
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    seconds = ranks.max(time.perf_counter() - start)
    model.train(was_training)
    N = settings.num_samples
    return ranks.gather(torch.cat(tokens))[:N], ranks.gather(torch.cat(nfe))[:N], seconds
