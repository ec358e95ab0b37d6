"""Schedules and forward processes against hand computations and brute-force Bayes rule."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_ddd.diffusion import (
    CosineSchedule,
    LinearSchedule,
    LogLinearSchedule,
    MaskedProcess,
    UniformProcess,
    sample_categorical,
)

SCHEDULES = [LogLinearSchedule(), LogLinearSchedule(eps=0.0), LinearSchedule(), CosineSchedule()]


def test_log_linear_by_hand():
    s = LogLinearSchedule(eps=1e-3)
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    assert torch.allclose(s.alpha(t), torch.tensor([1.0, 1 - 0.999 * 0.25, 1e-3], dtype=torch.float64))
    assert torch.allclose(s.weight(t[1:]), 1.0 / t[1:])


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_derivative_and_weight(schedule):
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    finite_diff = (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h)
    assert torch.allclose(schedule.alpha_prime(t), finite_diff, rtol=1e-5, atol=1e-7)
    expected_w = -finite_diff / (1 - schedule.alpha(t))
    assert torch.allclose(schedule.weight(t), expected_w, rtol=1e-4)
    assert (schedule.alpha(t)[1:] < schedule.alpha(t)[:-1]).all()


def transition(process, s, t, V):
    """Brute-force q(z_t | z_s) as a (V_in, V_in) matrix, written from the process definitions."""
    a = process.schedule.alpha(torch.tensor(t, dtype=torch.float64)) / process.schedule.alpha(
        torch.tensor(s, dtype=torch.float64)
    )
    if isinstance(process, MaskedProcess):
        K = torch.zeros(V + 1, V + 1, dtype=torch.float64)
        for v in range(V):
            K[v, v] = a
            K[v, V] = 1 - a
        K[V, V] = 1.0
        return K
    return a * torch.eye(V, dtype=torch.float64) + (1 - a) / V


@pytest.mark.parametrize("cls", [MaskedProcess, UniformProcess])
def test_posterior_is_bayes_rule(cls):
    V = 3
    process = cls(V, CosineSchedule())
    s, t = 0.3, 0.7
    Vin = process.num_input_tokens
    q_s = process.marginal_probs(torch.arange(V).reshape(V, 1), s).double()[:, 0]  # (V, Vin): q(z_s | x)
    K = transition(process, s, t, V)  # q(z_t | z_s)
    for x, zt in itertools.product(range(V), range(Vin)):
        joint = q_s[x] * K[:, zt]  # q(z_s, z_t | x) over z_s
        if joint.sum() == 0:
            continue  # z_t impossible given x
        expected = joint / joint.sum()
        got = process.posterior_probs(
            torch.tensor([[zt]]), F.one_hot(torch.tensor([[x]]), V).double(), s, t
        )[0, 0]
        assert torch.allclose(got, expected, atol=1e-6), (x, zt)


@pytest.mark.parametrize("cls", [MaskedProcess, UniformProcess])
def test_posterior_of_mixture_is_mixture_of_posteriors(cls):
    V = 4
    process = cls(V)
    g = torch.Generator().manual_seed(0)
    z_t = process.corrupt(torch.randint(V, (2, 5), generator=g), 0.6, g)
    p = torch.softmax(torch.randn(2, 5, V, generator=g, dtype=torch.float64), -1)
    mix = process.posterior_probs(z_t, p, 0.2, 0.6)
    by_hand = sum(
        p[..., v : v + 1] * process.posterior_probs(z_t, F.one_hot(torch.full_like(z_t, v), V).double(), 0.2, 0.6)
        for v in range(V)
    )
    assert torch.allclose(mix, by_hand, atol=1e-10)
    assert torch.allclose(mix.sum(-1), torch.ones_like(mix[..., 0]))


def test_masked_log_linear_unmask_probability_is_t_minus_s_over_t():
    process = MaskedProcess(5, LogLinearSchedule(eps=0.0))
    z_t = torch.full((1, 1), process.mask_id)
    probs = process.posterior_probs(z_t, F.one_hot(torch.tensor([[2]]), 5).double(), 0.25, 0.75)[0, 0]
    assert probs[2].item() == pytest.approx((0.75 - 0.25) / 0.75)
    assert probs[process.mask_id].item() == pytest.approx(0.25 / 0.75)


@pytest.mark.parametrize("cls", [MaskedProcess, UniformProcess])
def test_corrupt_and_posterior_sample_frequencies(cls):
    V, N = 3, 200_000
    process = cls(V)
    g = torch.Generator().manual_seed(1)
    x = torch.full((N, 1), 1)
    z = process.corrupt(x, 0.4, g)
    freq = torch.bincount(z[:, 0], minlength=process.num_input_tokens).double() / N
    expected = process.marginal_probs(x[:1], 0.4)[0, 0].double()
    assert torch.allclose(freq, expected, atol=4 * math.sqrt(0.25 / N))
    z_s = process.posterior_sample(z, x, 0.1, 0.4, g)
    for zt in z.unique():
        rows = z[:, 0] == zt
        f = torch.bincount(z_s[rows, 0], minlength=process.num_input_tokens).double() / rows.sum()
        e = process.posterior_probs(zt.reshape(1, 1), F.one_hot(x[:1], V).double(), 0.1, 0.4)[0, 0]
        assert torch.allclose(f, e, atol=4 * math.sqrt(0.25 / rows.sum().item()) + 1e-9)


def test_priors_and_masked_output():
    masked, uniform = MaskedProcess(4), UniformProcess(4)
    assert (masked.prior_sample(2, 3) == 4).all()
    u = uniform.prior_sample(1000, 3, torch.Generator().manual_seed(0))
    assert u.min() == 0 and u.max() == 3
    # masked x-prediction: unmasked positions carry their own token with probability one
    z = torch.tensor([[4, 2]])
    lp = masked.x0_log_probs(torch.randn(1, 2, 4), z)
    assert torch.allclose(lp[0, 0].exp().sum(), torch.tensor(1.0))
    assert lp[0, 1, 2] == 0 and torch.isinf(lp[0, 1, [0, 1, 3]]).all()
    # mask exactly k dimensions
    x = torch.zeros(3, 6, dtype=torch.long)
    k = torch.tensor([1, 3, 6])
    assert ((masked.mask_exactly(x, k) == 4).sum(-1) == k).all()


def test_uniform_prior_kl_by_hand():
    process = UniformProcess(3, LogLinearSchedule(eps=0.1))
    q = torch.tensor([0.1 + 0.9 / 3, 0.9 / 3, 0.9 / 3], dtype=torch.float64)
    kl_one_dim = (q * (q * 3).log()).sum()
    assert process.prior_kl(torch.zeros(1, 2, dtype=torch.long)).item() == pytest.approx(2 * kl_one_dim.item())


def test_float64_gumbel_matches_probabilities():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    draws = sample_categorical(p.log().expand(100_000, 4), g)
    freq = torch.bincount(draws, minlength=4).double() / 100_000
    assert torch.allclose(freq, p, atol=0.01) and freq[3] == 0
    with pytest.raises(ValueError, match="precision"):
        sample_categorical(p.log(), g, precision="float16")


def test_masked_x_prediction_gradient_matches_plain_log_softmax():
    process = MaskedProcess(5)
    logits = torch.randn(2, 4, 5, requires_grad=True)
    z = torch.tensor([[5, 1, 5, 2], [0, 5, 5, 5]])
    target = torch.tensor([[0, 1, 2, 2], [0, 1, 1, 1]])
    lp = process.x0_log_probs(logits, z)
    lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)[z == 5].sum().backward()
    reference = logits.detach().clone().requires_grad_(True)
    torch.log_softmax(reference, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)[z == 5].sum().backward()
    assert torch.allclose(logits.grad, reference.grad)
    assert lp[0, 1, 1] == 0 and torch.isinf(lp[0, 1, 0])
