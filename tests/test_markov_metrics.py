"""Marginal and transition KL of samples against a known Markov chain: hand computations on a tiny chain."""

import math

import pytest
import torch

from lightning_ddd.data import Digits, MarkovChain
from lightning_ddd.evaluation import sample_metrics
from lightning_ddd.metrics.markov import markov_statistics, position_marginals

INITIAL = torch.tensor([0.75, 0.25], dtype=torch.float64)
TRANSITION = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64)
SAMPLES = torch.tensor([[0, 0, 0], [0, 0, 1], [1, 1, 1], [0, 1, 1]])  # N = 4, D = 3, V = 2


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def test_kls_of_four_samples_match_hand_computation():
    # Exact marginals: p0 = (.75, .25); p1 = p0 T = (.725, .275); p2 = p1 T = (.7075, .2925).
    p = [(0.75, 0.25), (0.725, 0.275), (0.7075, 0.2925)]
    # Counts of 0/1 per position: (3, 1), (2, 2), (1, 3); add 1/2 per cell over 4 + 2 * 1/2 = 5.
    q = [(3.5 / 5, 1.5 / 5), (2.5 / 5, 2.5 / 5), (1.5 / 5, 3.5 / 5)]
    # Pairs (x_{d-1}, x_d), d = 1, 2: 00 00 | 00 01 | 11 11 | 01 11 -> 00: 3, 01: 2, 10: 0, 11: 3 of 8.
    pair_q = [(c + 0.5) / (8 + 4 * 0.5) for c in (3, 2, 0, 3)]
    # Exact pooled pair law: ((p0 + p1) / 2)(a) T(a, b) with (p0 + p1) / 2 = (.7375, .2625).
    pair_p = [0.7375 * 0.9, 0.7375 * 0.1, 0.2625 * 0.2, 0.2625 * 0.8]

    out = markov_statistics(SAMPLES, INITIAL, TRANSITION)
    assert out["first_token_kl"] == pytest.approx(kl(p[0], q[0]), rel=1e-12)
    assert out["marginal_kl"] == pytest.approx(sum(kl(a, b) for a, b in zip(p, q)) / 3, rel=1e-12)
    assert out["transition_kl"] == pytest.approx(kl(pair_p, pair_q), rel=1e-12)
    torch.testing.assert_close(position_marginals(INITIAL, TRANSITION, 3), torch.tensor(p, dtype=torch.float64))


def test_markov_chain_hook_uses_its_own_parameters_and_sample_metrics_reports_it():
    data = MarkovChain(vocab_size=2, seq_len=3)
    data.initial, data.transition = INITIAL, TRANSITION
    expected = markov_statistics(SAMPLES, INITIAL, TRANSITION)
    assert data.sample_statistics(SAMPLES) == expected
    row = sample_metrics(SAMPLES, data, 2)
    assert {"entropy", "oracle_nll", "first_token_kl", "marginal_kl", "transition_kl"} == set(row)
    assert all(row[k] == expected[k] for k in expected)
    assert Digits().sample_statistics(torch.zeros(2, 64, dtype=torch.long)) == {}  # no known law: nothing
    assert set(sample_metrics(torch.zeros(2, 64, dtype=torch.long), Digits(), 17)) == {"entropy"}


def test_samples_of_the_chain_score_near_the_smoothing_bias_and_a_wrong_chain_does_not():
    data = MarkovChain(vocab_size=4, seq_len=6, sharpness=2.0, chain_seed=3)
    n = 4000
    real = data.sample(n, torch.Generator().manual_seed(0))
    good = data.sample_statistics(real)
    # Expected KL of a smoothed estimate from n draws is about (cells - 1) / (2 n); stay within a few times it.
    assert good["first_token_kl"] < 5 * 3 / (2 * n)
    assert good["marginal_kl"] < 5 * 3 / (2 * n)
    assert good["transition_kl"] < 5 * 15 / (2 * n * 5)
    wrong = data.sample_statistics(torch.randint(0, 4, (n, 6), generator=torch.Generator().manual_seed(1)))
    assert all(wrong[k] > 20 * good[k] for k in good)
    # The same marginals in a shuffled order keep the marginal KLs and lose the pair structure.
    shuffled = real[torch.randperm(n, generator=torch.Generator().manual_seed(2))]
    shuffled[:, 1:] = shuffled[torch.randperm(n, generator=torch.Generator().manual_seed(3)), 1:]
    mixed = data.sample_statistics(shuffled)
    assert mixed["first_token_kl"] == pytest.approx(good["first_token_kl"])
    assert mixed["transition_kl"] > 20 * good["transition_kl"]


def test_single_position_has_no_transition_kl_and_masked_tokens_are_refused():
    data = MarkovChain(vocab_size=3, seq_len=1)
    out = data.sample_statistics(torch.tensor([[0], [2]]))
    assert set(out) == {"first_token_kl", "marginal_kl"} and out["first_token_kl"] == out["marginal_kl"]
    with pytest.raises(ValueError, match="masked"):
        data.sample_statistics(torch.tensor([[3]]))  # the mask id
    with pytest.raises(ValueError, match="expected"):
        data.sample_statistics(torch.zeros(2, 4, dtype=torch.long))
