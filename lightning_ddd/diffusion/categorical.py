"""Categorical draws with an explicit precision.

Gumbel-max in float32 truncates the noise tail and acts like a lower temperature (it lowers generative
perplexity and diversity); inversion of a float32 cumulative sum resolves masses only down to about 2^-24 of the
row. So sampling runs in float64 unless the caller asks otherwise. The samplers draw by inverse CDF (one uniform
per row rather than one Gumbel per class); ``sample_categorical`` keeps Gumbel-max for the training losses.
"""

from __future__ import annotations

import torch
from torch import Tensor

PRECISIONS = {"float64": torch.float64, "float32": torch.float32}


def resolve_precision(precision: str | torch.dtype) -> torch.dtype:
    """Map ``"float64"`` / ``"float32"`` (or a dtype) to a torch dtype, with a clear error otherwise."""
    if isinstance(precision, torch.dtype):
        if precision not in PRECISIONS.values():
            raise ValueError(f"sampling precision {precision} is not supported; use float64 or float32.")
        return precision
    if precision not in PRECISIONS:
        raise ValueError(f"sampling precision '{precision}' is not supported; use one of {sorted(PRECISIONS)}.")
    return PRECISIONS[precision]


def sample_categorical(
    log_probs: Tensor,
    generator: torch.Generator | None = None,
    precision: str | torch.dtype = "float64",
) -> Tensor:
    """Draw one index per row by Gumbel-max: ``argmax(log p + G)``, G ~ Gumbel(0, 1).

    Args:
        log_probs: (..., K) unnormalised log-probabilities; ``-inf`` marks impossible classes.
        generator: torch.Generator on ``log_probs.device`` for reproducible draws.
        precision: dtype of the uniform noise and of the comparison ("float64" by default).

    Returns:
        (...,) LongTensor of indices.
    """
    dtype = resolve_precision(precision)
    u = torch.rand(log_probs.shape, generator=generator, device=log_probs.device, dtype=dtype)
    tiny = torch.finfo(dtype).tiny
    gumbel = -torch.log(-torch.log(u.clamp_min(tiny)))
    return torch.argmax(log_probs.to(dtype) + gumbel, dim=-1)


def sample_inverse_cdf(
    weights: Tensor,
    generator: torch.Generator | None = None,
    precision: str | torch.dtype = "float64",
    count: Tensor | None = None,
) -> Tensor:
    """Draw one index per row by inversion of the cumulative sum: one uniform per row instead of K Gumbels.

    Row ``i`` draws index ``j`` with probability ``weights[i, j] / sum(weights[i, :count[i]])`` among its first
    ``count[i]`` classes. With u ~ U[0, 1) the draw is the first j with ``cumsum[j] >= (1 - u) * total``: the
    target lies in (0, total], so a class of weight zero (whose cumulative sum equals its predecessor's) is
    never chosen, round-off included.

    Args:
        weights: (N, K) non-negative unnormalised probabilities, at least one positive per row (among the
            first ``count`` classes).
        generator: torch.Generator on ``weights.device`` for reproducible draws.
        precision: dtype of the uniforms, the cumulative sum and the comparison ("float64" by default).
        count: optional (N,) long number of leading classes each row draws from (1..K); None: all K.

    Returns:
        (N,) LongTensor of indices in [0, count).
    """
    dtype = resolve_precision(precision)
    cdf = weights.to(dtype).cumsum(dim=-1)  # (N, K) non-decreasing
    if count is None:
        total = cdf[:, -1]  # (N,)
    else:
        total = cdf.gather(-1, (count - 1).unsqueeze(-1)).squeeze(-1)  # (N,)
    u = torch.rand(total.shape, generator=generator, device=weights.device, dtype=dtype)
    target = (1.0 - u) * total  # (N,) in (0, total]
    index = torch.searchsorted(cdf, target.unsqueeze(-1)).squeeze(-1)  # first j with cdf[j] >= target
    # Only an out-of-order cumulative sum (a parallel scan's round-off) could land past the last class.
    return index.clamp_max_(weights.shape[-1] - 1 if count is None else count - 1)
