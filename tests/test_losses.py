"""Teacher bounds against exact enumeration on a problem with D = 3 dimensions and V = 3 tokens."""

import itertools
import math

import pytest
import torch

from lightning_ddd.diffusion import CosineSchedule, LogLinearSchedule, MaskedProcess, UniformProcess
from lightning_ddd.diffusion.losses import AnyOrderLoss, LambdaDCE, TimeDCE, UniformELBO

D, V = 3, 3
ALL_X = torch.tensor(list(itertools.product(range(V), repeat=D)))  # (27, 3)


class TableDenoiser:
    """A fixed 'network': logits looked up from a random table indexed by the whole noisy sequence (and t)."""

    def __init__(self, process, time_dependent: bool, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        n = process.num_input_tokens
        self.process, self.time_dependent = process, time_dependent
        self.radix = n ** torch.arange(D - 1, -1, -1)
        self.table = torch.randn(n**D, D, V, generator=g, dtype=torch.float64) * 1.5
        self.slope = torch.randn(n**D, D, V, generator=g, dtype=torch.float64)

    def __call__(self, z, t):
        logits = self.table[(z * self.radix).sum(-1)]
        if self.time_dependent:
            logits = logits + t.reshape(-1, 1, 1).double() * self.slope[(z * self.radix).sum(-1)]
        return self.process.x0_log_probs(logits, z).double()


def ao_mixture_nll(den, process, x):
    """Exact -log p(x) of the infinite-step masked sampler: the mean over orders of the AR factorisations."""
    m = process.mask_id
    probs = []
    for order in itertools.permutations(range(D)):
        z, logp = torch.full((1, D), m), 0.0
        for d in order:
            logp += den(z, None)[0, d, x[d]].item()
            z[0, d] = x[d]
        probs.append(math.exp(logp))
    return -math.log(sum(probs) / len(probs))


def exact_lambda_dce(den, process, x):
    """sum over masked sets S of B(|S|, D-|S|+1) sum_{d in S} -log p(x^d | x outside S)."""
    total = 0.0
    for mask in itertools.product([0, 1], repeat=D):
        k = sum(mask)
        if k == 0:
            continue
        z = torch.where(torch.tensor(mask).bool(), process.mask_id, x).unsqueeze(0)
        lp = den(z, None)[0]
        total += sum(-lp[d, x[d]].item() for d in range(D) if mask[d]) / (k * math.comb(D, k))
    return total


def mc_mean(loss, den, process, x, n=40_000, seed=0):
    g = torch.Generator().manual_seed(seed)
    vals = loss(den, x.expand(n, D), process, g).double()
    return vals.mean().item(), vals.std().item() / math.sqrt(n)


@pytest.mark.parametrize("x_index", [0, 5, 17])
def test_masked_bounds_match_enumeration(x_index):
    process = MaskedProcess(V, LogLinearSchedule(eps=0.0))
    den = TableDenoiser(process, time_dependent=False)
    x = ALL_X[x_index]
    exact_bound = exact_lambda_dce(den, process, x)
    assert exact_bound >= ao_mixture_nll(den, process, x) - 1e-9
    for loss in [TimeDCE(), LambdaDCE(), AnyOrderLoss()]:
        mean, se = mc_mean(loss, den, process, x)
        assert abs(mean - exact_bound) < 4 * se + 1e-6, (loss, mean, exact_bound, se)


def test_any_order_loss_is_exact_on_average_over_its_draws():
    # AO's randomness is only (k, the masked set): average its estimate over a stratified batch exactly.
    process = MaskedProcess(V)
    den = TableDenoiser(process, time_dependent=False, seed=3)
    x = ALL_X[11]
    mean, se = mc_mean(AnyOrderLoss(), den, process, x, n=60_000, seed=1)
    assert se < 0.02
    assert abs(mean - exact_lambda_dce(den, process, x)) < 4 * se


def test_time_dce_truncation_with_default_schedule_is_small():
    process = MaskedProcess(V)  # log-linear, eps = 1e-3: alpha_1 > 0
    den = TableDenoiser(process, time_dependent=False)
    x = ALL_X[7]
    mean, se = mc_mean(TimeDCE(), den, process, x)
    assert abs(mean - exact_lambda_dce(den, process, x)) < 4 * se + 0.01


def test_masked_losses_reject_uniform_process():
    with pytest.raises(ValueError, match="UniformELBO"):
        TimeDCE().check_process(UniformProcess(V))
    with pytest.raises(ValueError, match="masked process"):
        UniformELBO().check_process(MaskedProcess(V))


def uniform_exact(den, process, T, x):
    """Exact discrete-time ELBO of x and exact NLL of the T-step ancestral sampler, by enumeration."""
    states = ALL_X  # all (V^D, D) noisy states
    idx = {tuple(s.tolist()): i for i, s in enumerate(states)}
    alpha = process.schedule.alpha
    alpha0 = alpha(torch.tensor(0.0, dtype=torch.float64)).item()
    with_recon = alpha0 < 1

    def q_marg(xv, t):  # q(z_t = state | x) for every state
        a = alpha(torch.tensor(t, dtype=torch.float64)).item()
        per = torch.where(states == xv, a + (1 - a) / V, (1 - a) / V)
        return per.prod(-1)

    def model_step(t, s):  # (S, S) matrix P[z_t, z_s] = prod_d p_theta(z_s^d | z_t)
        tt = torch.full((len(states),), t)
        p = process.posterior_probs(states, den(states, tt).exp(), s, t)  # (S, D, V)
        return torch.stack([p[:, torch.arange(D), s_].prod(-1) for s_ in states], dim=1)

    def true_step(xv, t, s):  # q(z_s = state' | z_t = state, x)
        onehot = torch.nn.functional.one_hot(xv.expand(len(states), D), V).double()
        p = process.posterior_probs(states, onehot, s, t)
        return torch.stack([p[:, torch.arange(D), s_].prod(-1) for s_ in states], dim=1)

    # exact NLL of the generative chain: uniform prior, T model steps, then p(x | z_0) if alpha_0 < 1
    dist = torch.full((len(states),), 1.0 / len(states), dtype=torch.float64)
    for i in range(T, 0, -1):
        dist = dist @ model_step(i / T, (i - 1) / T)
    if with_recon:
        lp = den(states, torch.zeros(len(states)))  # (S, D, V)
        px = (dist * lp[:, torch.arange(D), x].sum(-1).exp()).sum()
    else:
        px = dist[idx[tuple(x.tolist())]]
    nll = -math.log(px.item())

    elbo = process.prior_kl(x.unsqueeze(0)).item()
    for i in range(1, T + 1):
        t, s = i / T, (i - 1) / T
        w = q_marg(x, t)
        q, p = true_step(x, t, s), model_step(t, s)
        kl = torch.where(q > 0, q * (q.log() - p.log()), torch.zeros_like(q)).sum(-1)
        elbo += (w * kl).sum().item()
    if with_recon:
        lp = den(states, torch.zeros(len(states)))
        elbo += (q_marg(x, 0.0) * -lp[:, torch.arange(D), x].sum(-1)).sum().item()
    return elbo, nll


@pytest.mark.parametrize("schedule", [LogLinearSchedule(), CosineSchedule(eps=0.05)], ids=repr)
def test_uniform_elbo_bounds_exact_nll(schedule):
    T = 4
    process = UniformProcess(V, schedule)
    den = TableDenoiser(process, time_dependent=True, seed=2)
    for x_index in [0, 13, 26]:
        x = ALL_X[x_index]
        elbo, nll = uniform_exact(den, process, T, x)
        assert elbo >= nll - 1e-9
        mean, se = mc_mean(UniformELBO(num_steps=T), den, process, x)
        assert abs(mean - elbo) < 4 * se + 1e-6, (mean, elbo, se)
