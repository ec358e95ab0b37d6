"""An amortised posterior q(lambda | x, z_t) for a Di4C mixture student's latent (the project's addition).

The student's lambda ~ U(0, 1) is written lambda = Phi(e) with e ~ N(0, 1) (Phi: the normal CDF), and the
encoder gives a Gaussian q(e | x, z_t) = N(mu, sigma^2) per sequence. A pooled per-position MLP: each
position's clean token, noisy token and position are embedded and summed, mapped by an MLP, averaged over
the sequence and mapped to (mu, log sigma). Its mean starts as a small random function of the input:
the student's lambda path starts at zero (the student is the teacher), and a zero encoder too would sit
at a stationary point where neither gets a gradient (an x-independent q cannot tell the student which
lambda goes with which sequence). sigma starts at 1.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LambdaEncoder(nn.Module):
    """q(e | x, z_t) = N(mu, sigma^2), e the normal-score of the student's lambda; (B, D) ids → (B,), (B,).

    Args:
        vocab_size: V, the clean tokens' vocabulary.
        num_input_tokens: the noisy tokens' vocabulary (V + 1 for the masked process).
        seq_len: D.
        dim: width of the embeddings and of the MLP.
    """

    def __init__(self, vocab_size: int, num_input_tokens: int, seq_len: int, dim: int = 64) -> None:
        super().__init__()
        self.clean_emb = nn.Embedding(vocab_size, dim)
        self.noisy_emb = nn.Embedding(num_input_tokens, dim)
        self.pos_emb = nn.Embedding(seq_len, dim)
        self.position_mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim), nn.GELU())
        self.out = nn.Linear(dim, 2)
        for emb in (self.clean_emb, self.noisy_emb, self.pos_emb):
            nn.init.normal_(emb.weight, std=dim**-0.5)
        nn.init.normal_(self.out.weight, std=dim**-0.5)  # mu: about unit scale, log sigma: about 0 (see above)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, z_t: Tensor) -> tuple[Tensor, Tensor]:
        """Clean ids x and noisy ids z_t (B, D) → mu (B,), log sigma (B,)."""
        positions = torch.arange(x.shape[1], device=x.device)
        h = self.clean_emb(x) + self.noisy_emb(z_t) + self.pos_emb(positions)  # (B, D, dim)
        pooled = self.position_mlp(h).mean(dim=1)  # (B, dim)
        mu, log_sigma = self.out(pooled).unbind(-1)  # (B,), (B,)
        return mu, log_sigma


def posterior_draws(mu: Tensor, log_sigma: Tensor, num: int, generator: torch.Generator | None) -> Tensor:
    """lambda = Phi(mu + sigma eps), eps ~ N(0, 1): (B,), (B,) → (B, num), differentiable in mu and sigma."""
    eps = torch.randn(mu.shape[0], num, generator=generator, device=mu.device, dtype=mu.dtype)  # (B, num)
    return torch.special.ndtr(mu[:, None] + log_sigma.exp()[:, None] * eps)


def gaussian_kl_to_standard(mu: Tensor, log_sigma: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) in nats, elementwise."""
    return 0.5 * (mu.square() + (2.0 * log_sigma).exp() - 1.0) - log_sigma
