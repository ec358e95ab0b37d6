"""Filtered categorical draws at selected positions of a (B, D, V) tensor, in row chunks of bounded memory.

A sampling step needs x_hat ~ filtered p_theta(. | z_t) only at the positions it updates (for the masked
process, those that unmask in this step). ``sample_positions`` gathers those rows a chunk at a time, applies
temperature / top-k / top-p with the semantics of ``filter_logits`` and draws by inverse CDF, so its extra
memory is O(chunk * V) whatever B and D are, and it touches no row it does not draw.

Shapes: log-probabilities (B, D, V); positions (N,) flat indices into B * D.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_ddd.diffusion.categorical import resolve_precision, sample_inverse_cdf

#: Elements per chunk of gathered rows (2**21: 16 MB in float64); a chunk holds at least one row.
CHUNK_ELEMENTS = 1 << 21

# Nucleus filtering compares a cumulative sum of exp(log p) against top_p; round-off of ~1e-16 per term
# must not decide whether a token whose preceding mass is exactly top_p (e.g. 0.5 + 0.3 vs 0.8) is kept.
TOP_P_TOL = 1e-9


def chunk_rows(vocab_size: int) -> int:
    """Rows of V classes per chunk: about ``CHUNK_ELEMENTS`` elements, at least one row."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


def sample_positions(
    log_probs: Tensor,
    positions: Tensor,
    generator: torch.Generator | None = None,
    precision: str | torch.dtype = "float64",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Tensor:
    """Draw one class at each of ``positions`` from filtered ``log_probs``, one chunk of rows at a time.

    Rows are drawn in the order of ``positions`` with one uniform each (``sample_inverse_cdf``), so the random
    stream a call consumes depends only on the number of positions.

    Args:
        log_probs: (B, D, V) log-probabilities (or logits); ``-inf`` marks impossible classes.
        positions: (N,) long flat indices ``b * D + d`` of the rows to draw.
        generator: torch.Generator on ``log_probs.device``.
        precision: dtype of the uniforms and the cumulative sums ("float64" or "float32").
        temperature, top_k, top_p: as in ``filter_logits`` (temperature, then top-k, then top-p). Filtering
            runs in float64 whatever the precision: the nucleus cut compares cumulative masses.

    Returns:
        (N,) long drawn classes.
    """
    dtype = resolve_precision(precision)
    B, D, V = log_probs.shape
    out = torch.empty(positions.shape, dtype=torch.long, device=log_probs.device)  # (N,)
    step = chunk_rows(V)
    for start in range(0, positions.numel(), step):
        pos = positions[start : start + step]  # (n,)
        rows = log_probs[pos // D, pos % D]  # (n, V) gathered copy
        out[start : start + step] = sample_rows(rows, generator, dtype, temperature, top_k, top_p)
    return out


def sample_rows(
    rows: Tensor,
    generator: torch.Generator | None = None,
    precision: str | torch.dtype = "float64",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> Tensor:
    """Draw one class per row of (n, V) log-probabilities after temperature / top-k / top-p filtering.

    The same distribution as ``sample_inverse_cdf`` on ``exp(filter_logits(rows, ...))``, without building
    the filtered (n, V) log-probabilities: top-k works on the k candidates only, top-p on the rows sorted by
    probability (ties in index order, as ``filter_logits``'s stable sort), and the draw is restricted to the
    kept prefix.

    Args:
        rows: (n, V) log-probabilities (or logits), any float dtype; ``rows`` is not modified.
        generator, precision, temperature, top_k, top_p: see ``sample_positions``.

    Returns:
        (n,) long classes in [0, V).
    """
    dtype = resolve_precision(precision)
    V = rows.shape[-1]
    filtering = temperature != 1.0 or 0 < top_k < V or top_p < 1.0
    x = rows.to(torch.float64 if filtering or dtype == torch.float64 else dtype)  # (n, V)
    if x is rows:
        x = x.clone()  # the in-place steps below must not write into the caller's tensor
    if temperature != 1.0:
        x.div_(temperature)
    classes = None  # (n, K): which class each column of x is, once x is restricted or reordered
    if 0 < top_k < V:
        x, classes = x.topk(top_k, dim=-1)  # (n, k) each
    if top_p >= 1.0:
        weights = x.sub_(x.amax(dim=-1, keepdim=True)).exp_()  # (n, K), the row maximum at 1
        index = sample_inverse_cdf(weights, generator, dtype)
    else:
        if classes is None:
            x, classes = x.sort(dim=-1, descending=True, stable=True)  # (n, V) each
        else:
            # topk's order among equal values is unspecified: re-sort the k candidates as the stable sort
            # of the full row would (value descending, then class ascending).
            classes, by_class = classes.sort(dim=-1)
            x, by_value = x.gather(-1, by_class).sort(dim=-1, descending=True, stable=True)
            classes = classes.gather(-1, by_value)
        probs = x.sub_(x[:, :1].clone()).exp_()  # (n, K) sorted: the first is the row maximum, now 1
        probs.div_(probs.sum(dim=-1, keepdim=True))  # normalised over the candidates
        mass_before = probs.cumsum(dim=-1).sub_(probs)  # mass of the strictly more likely classes
        count = (mass_before < top_p - TOP_P_TOL).sum(dim=-1).clamp_min_(1)  # (n,) the kept prefix; >= argmax
        del mass_before
        index = sample_inverse_cdf(probs, generator, dtype, count)
    return index if classes is None else classes.gather(-1, index.unsqueeze(-1)).squeeze(-1)
