"""A random first-order Markov chain: synthetic data whose exact likelihood and entropy are known.

Because log p(x) is exact, a model's NLL (or ELBO) on this data can be compared against the true
entropy, which turns "is the model any good" into a number with a known floor.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from lightning_ddd.data.base import TokenDataModule, TokenTensorDataset
from lightning_ddd.metrics.markov import markov_statistics

# Offset between the generator seeds of the train and val splits, so the two splits are independent
# and each one does not change when the size of the other does.
_VAL_SEED_OFFSET = 1_000_003


def _entropy(probs: Tensor) -> Tensor:
    """Shannon entropy in nats along the last dim; xlogy makes 0 * log 0 = 0 for peaked rows."""
    return -torch.special.xlogy(probs, probs).sum(-1)


class MarkovChain(TokenDataModule):
    """Sequences from a seeded random first-order Markov chain over ``vocab_size`` states.

    The chain is p(x) = initial[x_1] * prod_t transition[x_{t-1}, x_t], with the initial distribution
    and every row of the transition matrix drawn as softmax(sharpness * z), z standard normal, from a
    generator seeded with ``chain_seed``. The data is sampled from the chain with ``seed``.

    Args:
        vocab_size: number of states V (token ids 0..V-1).
        seq_len: sequence length D.
        sharpness: scale of the random logits; 0 gives uniform i.i.d. tokens (entropy D log V), larger
            values give peakier rows, i.e. a more predictable chain with lower entropy.
        num_train: number of training sequences.
        num_val: number of validation sequences.
        chain_seed: seed of the chain itself (initial distribution and transition matrix).
        batch_size: sequences per batch (per device).
        num_workers: DataLoader worker processes.
        seed: seed of the sampled sequences and of the shuffling order.
    """

    def __init__(
        self,
        vocab_size: int = 8,
        seq_len: int = 16,
        sharpness: float = 2.0,
        num_train: int = 8192,
        num_val: int = 1024,
        chain_seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        name = type(self).__name__
        if vocab_size < 2:
            raise ValueError(f"{name}: vocab_size={vocab_size} must be >= 2; use at least two states.")
        if seq_len < 1:
            raise ValueError(f"{name}: seq_len={seq_len} must be >= 1; use a positive length.")
        if sharpness < 0:
            raise ValueError(f"{name}: sharpness={sharpness} must be >= 0; use 0 for a uniform chain.")
        if num_train < 1:
            raise ValueError(f"{name}: num_train={num_train} must be >= 1; ask for at least one sequence.")
        if num_val < 1:
            raise ValueError(f"{name}: num_val={num_val} must be >= 1; ask for at least one sequence.")
        if num_train < batch_size:
            # The train loader drops the last partial batch, so this would give zero training steps.
            warnings.warn(
                f"{name}: num_train={num_train} < batch_size={batch_size}: the train loader will be empty.",
                stacklevel=2,
            )
        self._vocab_size = vocab_size
        self._seq_len = seq_len
        self.sharpness = sharpness
        self.num_train = num_train
        self.num_val = num_val
        self.chain_seed = chain_seed

        # The chain is tiny (V + V^2 numbers), so it is built here: the oracle works before setup().
        g = torch.Generator().manual_seed(chain_seed)
        init_logits = sharpness * torch.randn(vocab_size, generator=g, dtype=torch.float64)
        trans_logits = sharpness * torch.randn(vocab_size, vocab_size, generator=g, dtype=torch.float64)
        self.initial: Tensor = init_logits.softmax(-1)  # (V,) float64
        self.transition: Tensor = trans_logits.softmax(-1)  # (V, V) float64, rows sum to 1

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def seq_len(self) -> int:
        return self._seq_len

    def sample(self, num: int, generator: torch.Generator) -> Tensor:
        """Draw ``num`` sequences by inverse-CDF sampling in float64; returns a (num, D) LongTensor."""
        # Normalising by the last cumsum entry makes it exactly 1, so u < 1 never falls past the end.
        init_cdf = self.initial.cumsum(-1)
        init_cdf = init_cdf / init_cdf[-1]  # (V,)
        trans_cdf = self.transition.cumsum(-1)
        trans_cdf = trans_cdf / trans_cdf[:, -1:]  # (V, V)
        uniforms = torch.rand(self.seq_len, num, 1, generator=generator, dtype=torch.float64)  # (D, N, 1)
        tokens = torch.empty(self.seq_len, num, dtype=torch.long)  # (D, N): time-major, filled step by step
        # right=True skips zero-probability states (their cdf entry equals the previous one).
        tokens[0] = torch.searchsorted(init_cdf, uniforms[0, :, 0], right=True)
        for t in range(1, self.seq_len):
            rows = trans_cdf[tokens[t - 1]]  # (N, V): cdf of the next state given the current one
            tokens[t] = torch.searchsorted(rows, uniforms[t], right=True).squeeze(-1)
        return tokens.T.contiguous().clamp_(max=self.vocab_size - 1)  # (N, D)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return  # Lightning calls setup once per stage; the data never changes.
        train_gen = torch.Generator().manual_seed(self.seed)
        val_gen = torch.Generator().manual_seed(self.seed + _VAL_SEED_OFFSET)
        self.train_set = TokenTensorDataset(self.sample(self.num_train, train_gen))
        self.val_set = TokenTensorDataset(self.sample(self.num_val, val_gen))

    def log_likelihood(self, tokens: Tensor) -> Tensor:
        """Exact log p(x) in nats of (N, D) token ids; returns (N,) float64."""
        if tokens.dim() != 2 or tokens.shape[1] != self.seq_len:
            raise ValueError(f"expected (N, {self.seq_len}) tokens, got {tuple(tokens.shape)}")
        tokens = tokens.long().cpu()
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}); masked tokens have no density")
        log_init = self.initial.log()[tokens[:, 0]]  # (N,)
        log_steps = self.transition.log()[tokens[:, :-1], tokens[:, 1:]]  # (N, D-1)
        return log_init + log_steps.sum(-1)

    def oracle_log_likelihood(self, tokens: Tensor) -> Tensor:
        """Same as ``log_likelihood``: the data density is known exactly."""
        return self.log_likelihood(tokens)

    def sample_statistics(self, tokens: Tensor) -> dict[str, float]:
        """KL of the exact per-position marginals and pair law from the samples' smoothed counts.

        ``first_token_kl``, ``marginal_kl`` and ``transition_kl`` (add-1/2 smoothing), defined in
        :mod:`lightning_ddd.metrics.markov`.
        """
        if tokens.dim() != 2 or tokens.shape[1] != self.seq_len:
            raise ValueError(f"expected (N, {self.seq_len}) tokens, got {tuple(tokens.shape)}")
        return markov_statistics(tokens, self.initial, self.transition)

    def exact_entropy(self) -> float:
        """Exact entropy H(X_1, ..., X_D) in nats of a whole sequence.

        By the chain rule and the Markov property, H = H(X_1) + sum_{t>=2} sum_s P(X_{t-1}=s) H(T[s, :]),
        with the marginals P(X_t) propagated forward by the transition matrix.
        """
        row_entropy = _entropy(self.transition)  # (V,)
        marginal = self.initial  # (V,) = P(X_1)
        total = _entropy(marginal)
        for _ in range(1, self.seq_len):
            total = total + marginal @ row_entropy
            marginal = marginal @ self.transition
        return float(total)
