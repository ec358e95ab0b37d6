"""Negative log-likelihood, perplexity and bits per token, summed across processes before dividing."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric


class NLLMetric(Metric):
    """Token-weighted NLL: the sums of nats and of tokens are all-reduced, never per-rank means.

    ``compute()`` returns ``{"nll": nats/token, "ppl": exp(nll), "bpd": bits/token}``.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_tokens", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nll_per_sequence: Tensor, tokens_per_sequence: int | Tensor) -> None:
        """Add (B,) per-sequence NLLs in nats covering ``tokens_per_sequence`` tokens each."""
        self.nll_sum += nll_per_sequence.double().sum()
        tokens = torch.as_tensor(tokens_per_sequence, dtype=torch.float64, device=self.num_tokens.device)
        self.num_tokens += tokens.sum() if tokens.dim() else tokens * nll_per_sequence.numel()

    def compute(self) -> dict[str, Tensor]:
        nll = self.nll_sum / self.num_tokens
        return {"nll": nll, "ppl": torch.exp(nll), "bpd": nll / math.log(2.0)}
