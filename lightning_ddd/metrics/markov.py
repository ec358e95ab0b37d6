"""How far samples' per-position marginals and pair (transition) statistics are from a known Markov chain's.

Oracle NLL and unigram entropy cannot see a sampler that gets the per-position laws or the pairwise
structure wrong while each token stays likely (over-sharp students, a teacher blind to positions). These
figures compare the samples' empirical statistics with the exact ones of the chain
p(x) = initial[x_0] * prod_d transition[x_{d-1}, x_d]:

- ``first_token_kl``: KL(p_0 || q_0), the first position's law.
- ``marginal_kl``: mean over positions d = 0..D-1 of KL(p_d || q_d), where p_d = initial @ transition^d
  is the exact marginal at position d and q_d the smoothed empirical marginal of the samples there.
- ``transition_kl``: KL(P || Q) between the exact pair law pooled over d = 1..D-1,
  P(a, b) = mean_d p_{d-1}(a) transition[a, b], and the smoothed empirical law Q of the N (D - 1) pairs
  (x_{d-1}, x_d) of the samples. Pooling makes it one V x V table whatever D is; it is the KL of the
  joint pair law, so it sees both wrong conditionals and wrong pair frequencies.

Smoothing: add-1/2 per cell (Krichevsky-Trofimov), q(v) = (count(v) + 1/2) / (n + V/2), so no cell is
empty and every KL is finite. The empirical figures are biased upwards by about (cells - 1) / (2 n) even for
samples from the chain itself; the same figures on as many real sequences (the ``data`` row of
``evaluate``) are the floor to read them against.
"""

from __future__ import annotations

import torch
from torch import Tensor

SMOOTHING = 0.5  # add-1/2 per cell


def kl_divergence(p: Tensor, q: Tensor) -> Tensor:
    """KL(p || q) in nats along the last dim, with 0 log 0 = 0; float64."""
    p, q = p.double(), q.double()
    return (torch.special.xlogy(p, p) - torch.special.xlogy(p, q)).sum(-1)


def smoothed_frequencies(counts: Tensor, alpha: float = SMOOTHING) -> Tensor:
    """(..., C) counts -> (..., C) float64 frequencies (count + alpha) / (total + C alpha)."""
    counts = counts.double() + alpha
    return counts / counts.sum(-1, keepdim=True)


def position_marginals(initial: Tensor, transition: Tensor, seq_len: int) -> Tensor:
    """Exact marginals of a Markov chain: row d is initial @ transition^d; (D, V) float64."""
    rows = [initial.double()]
    for _ in range(1, seq_len):
        rows.append(rows[-1] @ transition.double())
    return torch.stack(rows)


def markov_statistics(tokens: Tensor, initial: Tensor, transition: Tensor,
                      alpha: float = SMOOTHING) -> dict[str, float]:
    """``first_token_kl``, ``marginal_kl`` and (when D > 1) ``transition_kl`` of (N, D) samples; see the module doc.

    Args:
        tokens: (N, D) token ids in [0, V).
        initial: (V,) law of the first token.
        transition: (V, V) transition matrix, rows sum to 1.
        alpha: pseudo-count added to every cell.
    """
    vocab = initial.shape[0]
    if tokens.dim() != 2 or len(tokens) == 0:
        raise ValueError(f"expected (N, D) token ids with N >= 1, got shape {tuple(tokens.shape)}.")
    tokens = tokens.long().cpu()
    if tokens.min() < 0 or tokens.max() >= vocab:
        raise ValueError(f"token ids must lie in [0, {vocab}); samples with masked tokens have no statistics.")
    n, seq_len = tokens.shape
    exact = position_marginals(initial, transition, seq_len)  # (D, V)
    counts = torch.zeros(seq_len, vocab, dtype=torch.float64)
    counts.scatter_add_(1, tokens.T, torch.ones(seq_len, n, dtype=torch.float64))  # (D, V): count of v at d
    per_position = kl_divergence(exact, smoothed_frequencies(counts, alpha))  # (D,)
    out = {"first_token_kl": per_position[0].item(), "marginal_kl": per_position.mean().item()}
    if seq_len > 1:
        pooled = exact[:-1].mean(0)  # (V,): law of x_{d-1} averaged over d = 1..D-1
        pair_exact = (pooled[:, None] * transition.double()).flatten()  # (V * V,)
        pairs = tokens[:, :-1] * vocab + tokens[:, 1:]  # (N, D-1) flat index of (x_{d-1}, x_d)
        pair_counts = torch.bincount(pairs.flatten(), minlength=vocab * vocab)  # (V * V,)
        out["transition_kl"] = kl_divergence(pair_exact, smoothed_frequencies(pair_counts, alpha)).item()
    return out
