"""Mean per-sample unigram entropy: reported next to every perplexity, because low entropy
(repetitive samples) can buy a low perplexity."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


def unigram_entropy(tokens: Tensor, vocab_size: int | None = None) -> Tensor:
    """Entropy in nats of each sample's own token histogram: (N, D) ids → (N,)."""
    vocab_size = vocab_size or int(tokens.max()) + 1
    counts = torch.zeros(tokens.shape[0], vocab_size, dtype=torch.float64, device=tokens.device)
    counts.scatter_add_(1, tokens, torch.ones_like(tokens, dtype=torch.float64))
    p = counts / tokens.shape[1]
    return -torch.xlogy(p, p).sum(-1)


class SampleEntropy(Metric):
    """Mean per-sample unigram entropy over all samples seen on all processes."""

    full_state_update = False

    def __init__(self, vocab_size: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, tokens: Tensor) -> None:
        self.total += unigram_entropy(tokens, self.vocab_size).sum()
        self.count += tokens.shape[0]

    def compute(self) -> Tensor:
        return self.total / self.count
