"""Ancestral samplers against exact enumerated distributions, the any-order mixture and RADD's E-NFE formula."""

import functools
import itertools
import math

import pytest
import torch
from scipy.stats import chi2
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from lightning_ddd.diffusion import LinearSchedule, LogLinearSchedule, MaskedProcess, UniformProcess
from lightning_ddd.diffusion.sampling import SampleOutput, filter_logits, sample, takes_step_times, validate_sampling_args

EPS = 1e-3  # the default log-linear schedule's eps; the exact computations below use the same schedule


# ----------------------------------------------------------------------------------------------
# Denoisers


class TableDenoiser:
    """log p(x | z_t) looked up in a table indexed by the whole state z_t (and the step k = n t if given)."""

    def __init__(self, table, num_input_tokens, num_steps=None):
        self.table = table.float()  # (S, D, V) or (n + 1, S, D, V)
        self.num_input_tokens = num_input_tokens
        self.num_steps = num_steps

    def state_index(self, z):
        D = z.shape[1]
        weights = self.num_input_tokens ** torch.arange(D - 1, -1, -1)
        return (z * weights).sum(-1)  # (B,) base-V_in number of the state

    def __call__(self, z, t):
        idx = self.state_index(z)
        if self.num_steps is None:
            return self.table[idx]
        k = torch.round(t.double() * self.num_steps).long()
        return self.table[k, idx]


def states(V_in, D):
    return list(itertools.product(range(V_in), repeat=D))


def masked_table(V, D, seed, scale=2.0):
    """A random time-independent masked denoiser table (S, D, V) that carries unmasked tokens with prob 1."""
    g = torch.Generator().manual_seed(seed)
    S = (V + 1) ** D
    table = torch.log_softmax(scale * torch.randn(S, D, V, generator=g, dtype=torch.float64), -1)
    for i, z in enumerate(states(V + 1, D)):
        for d, zd in enumerate(z):
            if zd != V:
                table[i, d] = torch.log(torch.nn.functional.one_hot(torch.tensor(zd), V).double())
    return table.float().double()  # the values the float32 denoiser returns


def uniform_table(V, D, n, seed, scale=2.0):
    """A random time-dependent uniform denoiser table (n + 1, S, D, V)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.log_softmax(scale * torch.randn(n + 1, V**D, D, V, generator=g, dtype=torch.float64), -1)
    return table.float().double()


class TinyNet(nn.Module):
    """A small time-independent masked denoiser: token embedding + mean context -> logits over V tokens."""

    def __init__(self, process, width=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.process = process
        self.emb = nn.Embedding(process.num_input_tokens, width)
        self.head = nn.Linear(2 * width, process.vocab_size)
        with torch.no_grad():
            self.head.weight.mul_(20.0)  # peaky, context-dependent predictions

    def forward(self, z, t=None):
        h = self.emb(z)  # (B, D, W)
        h = torch.cat([h, h.mean(1, keepdim=True).expand_as(h)], -1)  # (B, D, 2W)
        return self.process.x0_log_probs(self.head(h), z)


def never_called(*args):
    raise AssertionError("the denoiser must not be called")


# ----------------------------------------------------------------------------------------------
# Exact distributions, written out from the process definitions (independently of processes.py)


def alpha(t):
    return 1.0 - (1.0 - EPS) * t


def joint(per_dim):
    """Product distribution of independent dimensions, flattened in the lexicographic order of ``states``."""
    return functools.reduce(lambda a, b: torch.outer(a, b).flatten(), per_dim)


def tempered(log_p, temperature, top_k=0, top_p=1.0):
    """Filtered probabilities of one row by hand: temperature, then the top k, then the smallest top set
    holding top_p of the mass (the random tables have no ties)."""
    p = torch.softmax(log_p / temperature, -1)
    order = p.argsort(descending=True)
    if 0 < top_k < p.numel():
        p[order[top_k:]] = 0.0
        p = p / p.sum()
    if top_p < 1.0:
        kept = int((p[order].cumsum(0) < top_p - 1e-12).sum()) + 1  # the prefix whose mass reaches top_p
        p[order[kept:]] = 0.0
        p = p / p.sum()
    return p


def exact_masked(table, V, D, n, temperature=1.0, **filters):
    """Exact output distribution (V^D,) of the n-step masked sampler by propagating all (V+1)^D states."""
    all_states = states(V + 1, D)
    index = {z: i for i, z in enumerate(all_states)}
    p = torch.zeros(len(all_states), dtype=torch.float64)
    p[index[(V,) * D]] = 1.0
    for k in range(n, 0, -1):
        t, s = k / n, (k - 1) / n
        r = 1.0 if k == 1 else (alpha(s) - alpha(t)) / (1.0 - alpha(t))  # P(masked dim unmasks)
        new = torch.zeros_like(p)
        for i, z in enumerate(all_states):
            if p[i] == 0:
                continue
            per_dim = []
            for d, zd in enumerate(z):
                q = torch.zeros(V + 1, dtype=torch.float64)
                if zd == V:
                    q[:V] = r * tempered(table[i, d], temperature, **filters)
                    q[V] = 1.0 - r
                else:
                    q[zd] = 1.0
                per_dim.append(q)
            new += p[i] * joint(per_dim)
        p = new
    return torch.stack([p[index[x]] for x in states(V, D)])


def exact_uniform(table, V, D, n, temperature=1.0, **filters):
    """Exact output distribution (V^D,) of the n-step uniform sampler (uniform prior, Bayes-rule posteriors)."""
    all_states = states(V, D)
    p = torch.full((len(all_states),), 1.0 / len(all_states), dtype=torch.float64)
    for k in range(n, 0, -1):
        t, s = k / n, (k - 1) / n
        a_s, a_t = alpha(s), alpha(t)
        a_ts = a_t / a_s

        def q_post(zs, zt, x):  # q(z_s | z_t, x) = q(z_t | z_s) q(z_s | x) / q(z_t | x)
            fwd = a_ts * (zt == zs) + (1 - a_ts) / V
            marg_s = a_s * (zs == x) + (1 - a_s) / V
            marg_t = a_t * (zt == x) + (1 - a_t) / V
            return fwd * marg_s / marg_t

        new = torch.zeros_like(p)
        for i, z in enumerate(all_states):
            per_dim = []
            for d, zd in enumerate(z):
                px = tempered(table[k, i, d], temperature, **filters)
                if k == 1:
                    per_dim.append(px)  # the last step returns x_hat
                else:
                    per_dim.append(
                        torch.tensor([sum(px[x] * q_post(j, zd, x) for x in range(V)) for j in range(V)])
                    )
            new += p[i] * joint(per_dim)
        p = new
    return p


def any_order_mixture(table, V, D):
    """p(x) = mean over orders sigma of prod_k p(x_sigma_k | x_sigma_<k), with the table as the conditionals."""
    index = {z: i for i, z in enumerate(states(V + 1, D))}
    out = torch.zeros(V**D, dtype=torch.float64)
    orders = list(itertools.permutations(range(D)))
    for j, x in enumerate(states(V, D)):
        for order in orders:
            z, prob = [V] * D, 1.0
            for d in order:
                prob *= float(table[index[tuple(z)], d].exp()[x[d]])
                z[d] = x[d]
            out[j] += prob / len(orders)
    return out


def empirical(tokens, V):
    D = tokens.shape[1]
    codes = (tokens * V ** torch.arange(D - 1, -1, -1)).sum(-1)
    return torch.bincount(codes, minlength=V**D).double()


def assert_matches(counts, probs, alpha_level=1e-4):
    """Pearson chi-square goodness of fit; impossible outcomes must never appear."""
    N = counts.sum()
    assert (counts[probs == 0] == 0).all()
    pos = probs > 0
    stat = float(((counts[pos] - N * probs[pos]) ** 2 / (N * probs[pos])).sum())
    df = int(pos.sum()) - 1
    assert chi2.sf(stat, df) > alpha_level, f"chi2={stat:.1f} on {df} dof: {counts / N} vs {probs}"


def separation(p, q, N):
    """Chi-square statistic that N samples from p would give against q: how visible p != q is."""
    return float(N * ((p - q) ** 2 / q).sum())


# ----------------------------------------------------------------------------------------------
# (a) precision


@pytest.mark.parametrize("cls", [MaskedProcess, UniformProcess])
@pytest.mark.parametrize("precision, dtype", [(None, torch.float64), ("float32", torch.float32)])
def test_draws_use_requested_precision(monkeypatch, cls, precision, dtype):
    process = cls(4)
    real_rand, seen = torch.rand, []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("dtype"))
        return real_rand(*args, **kwargs)

    monkeypatch.setattr(torch, "rand", spy)
    kwargs = {} if precision is None else {"precision": precision}
    sample(TinyNet(process), process, 3, 5, 4, generator=torch.Generator().manual_seed(0), **kwargs)
    assert len(seen) >= 4 and all(d == dtype for d in seen), seen  # silently float32 would fail here


# ----------------------------------------------------------------------------------------------
# (b) seeds, (c) no mask in the output


@pytest.mark.parametrize("cls", [MaskedProcess, UniformProcess])
def test_seeded_reproducibility(cls):
    process = cls(5)
    net = TinyNet(process)
    run = lambda seed: sample(net, process, 8, 16, 6, generator=torch.Generator().manual_seed(seed)).tokens
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


@pytest.mark.parametrize("schedule", [LogLinearSchedule(), LinearSchedule(sigma_min=0.5)], ids=repr)
@pytest.mark.parametrize("num_steps", [1, 2, 7, 40])
def test_no_mask_in_output(schedule, num_steps):
    # alpha_0 = exp(-0.5) < 1 leaves masks in the exact posterior at s = 0: the last step must unmask them anyway.
    process = MaskedProcess(3, schedule)
    out = sample(TinyNet(process), process, 16, 12, num_steps, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, SampleOutput)
    assert out.tokens.shape == (16, 12) and out.tokens.dtype == torch.long
    assert (out.tokens >= 0).all() and (out.tokens < process.vocab_size).all()
    assert torch.equal(out.nfe, torch.full((16,), num_steps))


# ----------------------------------------------------------------------------------------------
# (d) filter_logits


def probs_after(p, **kwargs):
    return filter_logits(torch.tensor(p, dtype=torch.float64).log(), **kwargs).exp()


def test_filter_logits_by_hand():
    p = [0.5, 0.3, 0.15, 0.05]
    close = lambda a, b: torch.allclose(a, torch.tensor(b, dtype=torch.float64), atol=1e-12)
    assert close(probs_after(p), p)
    assert close(probs_after(p, top_p=0.8), [0.625, 0.375, 0, 0])  # 0.5 + 0.3 reaches 0.8 exactly
    assert close(probs_after(p, top_p=0.81), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    assert close(probs_after(p, top_p=0.5), [1, 0, 0, 0])
    assert close(probs_after(p, top_p=1e-6), [1, 0, 0, 0])  # always at least the argmax
    assert close(probs_after(p, top_k=2), [0.625, 0.375, 0, 0])
    assert close(probs_after(p, top_k=1), [1, 0, 0, 0])
    assert close(probs_after(p, top_k=4), p) and close(probs_after(p, top_k=10), p)
    sq = torch.tensor(p, dtype=torch.float64) ** 2
    assert close(probs_after(p, temperature=0.5), (sq / sq.sum()).tolist())
    # Temperature comes first: at T = 0.5 the top two hold 0.93 of the mass, so top_p = 0.9 keeps two;
    # at T = 1 it keeps three.
    assert close(probs_after(p, temperature=0.5, top_p=0.9), (sq[:2] / sq[:2].sum()).tolist() + [0, 0])
    assert close(probs_after(p, top_p=0.9), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    # Top-k renormalises before top-p: after top_k=3 the top two hold 0.8 / 0.95 = 0.842 >= 0.84.
    assert close(probs_after(p, top_p=0.84), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    assert close(probs_after(p, top_k=3, top_p=0.84), [0.625, 0.375, 0, 0])
    assert close(probs_after(p, top_k=3, top_p=0.85), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])


def test_filter_logits_batched_and_one_hot():
    g = torch.Generator().manual_seed(0)
    log_p = torch.log_softmax(torch.randn(3, 5, 7, generator=g), -1)
    log_p[0, 0] = torch.tensor([0.0] + [-math.inf] * 6)  # an unmasked position stays one-hot
    out = filter_logits(log_p, temperature=0.7, top_p=0.9, top_k=4)
    assert out.shape == (3, 5, 7) and out.dtype == torch.float64
    assert torch.allclose(out.exp().sum(-1), torch.ones(3, 5, dtype=torch.float64))
    assert ((out > -math.inf).sum(-1) <= 4).all()
    assert out[0, 0, 0] == 0 and torch.isinf(out[0, 0, 1:]).all()
    assert torch.equal(out.argmax(-1), log_p.argmax(-1))


# ----------------------------------------------------------------------------------------------
# (e) exact n-step distributions, (f) the any-order limit


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_masked_sampler_matches_exact_distribution(temperature):
    V, D, N = 2, 2, 40_000
    table = masked_table(V, D, seed=3)
    exact = {n: exact_masked(table, V, D, n, temperature) for n in (1, 2, 3)}
    assert separation(exact[1], exact[3], N) > 200  # the step counts are told apart by this sample size
    for n, probs in exact.items():
        assert torch.isclose(probs.sum(), torch.tensor(1.0, dtype=torch.float64))
        g = torch.Generator().manual_seed(10 + n)
        out = sample(TableDenoiser(table, V + 1), MaskedProcess(V), N, D, n, temperature=temperature, generator=g)
        assert_matches(empirical(out.tokens, V), probs)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_uniform_sampler_matches_exact_distribution(temperature):
    V, D, N = 2, 2, 40_000
    exact, tables = {}, {}
    for n in (1, 2, 3):
        tables[n] = uniform_table(V, D, n, seed=5 + n)
        exact[n] = exact_uniform(tables[n], V, D, n, temperature)
    # Power check: the same table run for 3 steps vs its last step alone must differ visibly.
    assert separation(exact[3], exact_uniform(tables[3][[0, 1]], V, D, 1, temperature), N) > 60
    for n, probs in exact.items():
        assert torch.isclose(probs.sum(), torch.tensor(1.0, dtype=torch.float64))
        g = torch.Generator().manual_seed(20 + n)
        den = TableDenoiser(tables[n], V, num_steps=n)
        out = sample(den, UniformProcess(V), N, D, n, temperature=temperature, generator=g)
        assert_matches(empirical(out.tokens, V), probs)


FILTERS = [{"top_k": 2}, {"top_p": 0.6}, {"temperature": 0.8, "top_k": 2, "top_p": 0.75}]


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("filters", FILTERS, ids=str)
def test_masked_sampler_with_filters_matches_exact_distribution(filters, precision):
    """The token law of the sampler (draws only at unmasking positions, in chunks) is the exact n-step law."""
    V, D, N, n = 3, 2, 40_000, 2
    table = masked_table(V, D, seed=11, scale=1.0)
    probs = exact_masked(table, V, D, n, **filters)
    assert separation(probs, exact_masked(table, V, D, n), N) > 200  # the filter changes the law visibly
    g = torch.Generator().manual_seed(30)
    den = TableDenoiser(table, V + 1)
    out = sample(den, MaskedProcess(V), N, D, n, generator=g, precision=precision, **filters)
    assert_matches(empirical(out.tokens, V), probs)


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("filters", FILTERS, ids=str)
def test_uniform_sampler_with_filters_matches_exact_distribution(filters, precision):
    """The same for the uniform process, whose posterior is drawn one mixture component per position."""
    V, D, N, n = 3, 2, 40_000, 2
    table = uniform_table(V, D, n, seed=12, scale=1.0)
    probs = exact_uniform(table, V, D, n, **filters)
    assert separation(probs, exact_uniform(table, V, D, n), N) > 200
    g = torch.Generator().manual_seed(31)
    den = TableDenoiser(table, V, num_steps=n)
    out = sample(den, UniformProcess(V), N, D, n, generator=g, precision=precision, **filters)
    assert_matches(empirical(out.tokens, V), probs)


def test_masked_many_steps_approaches_any_order_mixture():
    V, D, N, n = 2, 3, 4_000, 256
    table = masked_table(V, D, seed=7, scale=3.0)
    target = any_order_mixture(table, V, D)
    one_step = exact_masked(table, V, D, 1)  # all dimensions drawn independently given the all-mask state
    assert separation(one_step, target, N) > 200
    assert (exact_masked(table, V, D, n) - target).abs().sum() < 0.02  # the exact n-step law is close already
    out = sample(TableDenoiser(table, V + 1), MaskedProcess(V), N, D, n, generator=torch.Generator().manual_seed(0))
    assert_matches(empirical(out.tokens, V), target)


# ----------------------------------------------------------------------------------------------
# (g) RADD caching


def test_cached_equals_uncached():
    process = MaskedProcess(6)
    net = TinyNet(process)
    fixed = torch.full((64, 20), -1)
    fixed[:, :3] = torch.tensor([1, 2, 3])
    fixed[::2, 10] = 5
    for kwargs in ({}, {"temperature": 0.8, "top_p": 0.9, "top_k": 4}, {"fixed": fixed}, {"precision": "float32"}):
        for n in (5, 40):
            runs = [
                sample(net, process, 64, 20, n, cache=c, generator=torch.Generator().manual_seed(n), **kwargs)
                for c in (False, True)
            ]
            assert torch.equal(runs[0].tokens, runs[1].tokens), (kwargs, n)
            assert torch.equal(runs[0].nfe, torch.full((64,), n))
            assert (runs[1].nfe <= n).all() and (runs[1].nfe >= 1).all()


def test_cached_nfe_is_the_number_of_unmasking_steps():
    """RADD's count: the cached NFE of a sequence = the number of distinct steps in which it unmasks something."""
    process = MaskedProcess(5)
    net = TinyNet(process)
    inputs = []
    recorder = lambda z, t: inputs.append(z.clone()) or net(z)
    n = 24
    uncached = sample(recorder, process, 40, 12, n, generator=torch.Generator().manual_seed(0))
    cached = sample(net, process, 40, 12, n, cache=True, generator=torch.Generator().manual_seed(0))
    trajectory = torch.stack(inputs + [uncached.tokens])  # (n + 1, B, D): z_1, ..., z_{1/n}, output
    unmasking_steps = (trajectory[1:] != trajectory[:-1]).any(-1).sum(0)  # (B,)
    assert torch.equal(cached.nfe, unmasking_steps)
    assert torch.equal(cached.tokens, uncached.tokens)


@pytest.mark.parametrize("steps_per_dim", [1, 4])
def test_cached_nfe_matches_radd_formula(steps_per_dim):
    """RADD's E-NFE = n (1 - (1 - 1/n)^D) counts the distinct steps in which a sequence unmasks a position.

    The cached sampler calls the network on a sequence only in such steps, so its NFE is exactly that count.
    The default log-linear schedule (eps = 1e-3) matches the formula for any eps: a masked dimension
    unmasks at step t_k -> t_{k-1} w.p. (alpha_s - alpha_t) / (1 - alpha_t) = 1 / k, so its unmasking step
    is uniform over the n steps.
    """
    D, B = 16, 2000
    n = steps_per_dim * D
    process = MaskedProcess(4)
    out = sample(TinyNet(process), process, B, D, n, cache=True, generator=torch.Generator().manual_seed(0))
    expected = n * (1 - (1 - 1 / n) ** D)
    measured = out.nfe.double().mean().item()
    assert abs(measured / expected - 1) < 0.02, (n, measured, expected)


def test_cache_reuses_log_probs_of_unchanged_rows():
    process = MaskedProcess(3)
    den = TableDenoiser(masked_table(3, 2, seed=0), 4)
    calls = []
    spy = lambda z, t: calls.append(z.shape[0]) or den(z, t)
    out = sample(spy, process, 50, 2, 30, cache=True, generator=torch.Generator().manual_seed(0))
    assert len(calls) < 30 and sum(calls) == int(out.nfe.sum())  # rows evaluated only when needed
    assert (out.nfe <= 2).all()  # D = 2: at most two distinct unmasking steps per sequence


# ----------------------------------------------------------------------------------------------
# (h) fixed positions, (i) step_condition


@pytest.mark.parametrize("cls", [MaskedProcess, UniformProcess])
def test_fixed_positions_are_kept(cls):
    V, B, D, n = 5, 12, 10, 6
    process = cls(V)
    fixed = torch.full((B, D), -1)
    fixed[:, :3] = torch.tensor([4, 0, 2])  # a prefix
    fixed[:, 7] = torch.arange(B) % V  # and an infilled position
    is_fixed = fixed >= 0
    net = TinyNet(process)
    seen = []

    def den(z, t):
        seen.append(z.clone())
        return net(z)

    out = sample(den, process, B, D, n, fixed=fixed, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.tokens[is_fixed], fixed[is_fixed])
    assert len(seen) == n and all(torch.equal(z[is_fixed], fixed[is_fixed]) for z in seen)
    if cls is MaskedProcess:
        assert (seen[0][~is_fixed] == process.mask_id).all()
    assert (out.tokens[~is_fixed] < V).all()


def test_step_condition_called_once_per_step_and_reaches_denoiser():
    V, B, D, n = 4, 3, 5, 7
    g = torch.Generator().manual_seed(0)
    made, received = [], []

    def step_condition(num_samples, generator):
        assert num_samples == B and generator is g
        made.append(torch.randn(num_samples, 2, generator=generator))
        return made[-1]

    for process in (MaskedProcess(V), UniformProcess(V)):
        made.clear(), received.clear()

        def den(z, t, cond):
            received.append(cond)
            return process.x0_log_probs(torch.zeros(B, D, V), z)

        sample(den, process, B, D, n, step_condition=step_condition, generator=g)
        assert len(made) == n and len(received) == n
        assert all(a is b for a, b in zip(made, received))


def test_step_condition_that_takes_t_and_s_is_told_each_step():
    V, B, D, n = 4, 2, 3, 4
    steps = []

    def hook(num_samples, generator, t, s):
        steps.append((t, s))
        return torch.zeros(num_samples, 1)

    def den(z, t, cond):
        assert cond.shape == (B, 1)
        return MaskedProcess(V).x0_log_probs(torch.zeros(B, D, V), z)

    sample(den, MaskedProcess(V), B, D, n, step_condition=hook, generator=torch.Generator().manual_seed(0))
    assert steps == [(1.0, 0.75), (0.75, 0.5), (0.5, 0.25), (0.25, 0.0)]  # t_k = k / n, s = t - 1/n
    assert takes_step_times(hook) and takes_step_times(lambda n, g, **kw: None)
    assert not takes_step_times(lambda n, g: None) and not takes_step_times(lambda n, g, t: None)
    assert not takes_step_times(lambda n, g, t, s, /: None)  # positional-only: cannot be passed by name


# ----------------------------------------------------------------------------------------------
# (j) argument checks, and small things


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, r"temperature=0\.0 .*> 0"),
        ({"temperature": -1.0}, r"temperature=-1\.0"),
        ({"temperature": float("nan")}, r"temperature=nan"),
        ({"top_p": 0.0}, r"top_p=0\.0 .*\(0, 1\]"),
        ({"top_p": 1.5}, r"top_p=1\.5"),
        ({"top_k": -1}, r"top_k=-1 .*>= 0"),
        ({"top_k": 2.5}, r"top_k=2\.5"),
        ({"precision": "float16"}, r"float16"),
        ({"num_steps": 0}, r"num_steps=0 .*>= 1"),
        ({"num_samples": 0}, r"num_samples=0 .*>= 1"),
        ({"seq_len": 0}, r"seq_len=0 .*>= 1"),
        ({"cache": True, "process": UniformProcess(3)}, r"cache=True"),
        ({"cache": True, "step_condition": lambda b, g: None}, r"step_condition"),
        ({"fixed": torch.full((2, 4), -1)}, r"fixed has shape \(2, 4\)"),
        ({"fixed": torch.full((2, 5), 3)}, r"fixed ids .*\[0, 3\)"),  # the mask id is not a token
        ({"fixed": torch.full((2, 5), -2)}, r"fixed ids"),
        ({"fixed": torch.zeros(2, 5)}, r"fixed must be an integer tensor"),
    ],
)
def test_bad_arguments_raise_before_any_work(kwargs, match):
    args = {"process": MaskedProcess(3), "num_samples": 2, "seq_len": 5, "num_steps": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        sample(never_called, **args)


def test_validate_sampling_args():
    validate_sampling_args(temperature=0.5, top_p=0.9, top_k=10, precision="float32", num_steps=1)
    for kwargs in ({"temperature": 0}, {"top_p": 2}, {"top_k": -3}, {"num_steps": 0}, {"precision": "half"}):
        with pytest.raises(ValueError):
            validate_sampling_args(**kwargs)
    with pytest.raises(ValueError, match=r"top_p=0"):
        filter_logits(torch.zeros(3), top_p=0)


def test_wrong_denoiser_shape_is_reported():
    with pytest.raises(ValueError, match=r"x0_log_probs"):
        sample(lambda z, t: torch.zeros(*z.shape, 4), MaskedProcess(3), 2, 5, 2)  # V + 1 outputs


def test_top_k_one_is_greedy_and_progress_bar_runs():
    V, D = 5, 6
    base = torch.log_softmax(torch.randn(D, V, generator=torch.Generator().manual_seed(0)), -1)
    process = MaskedProcess(V)
    den = lambda z, t: process.x0_log_probs(base.expand(z.shape[0], D, V), z)
    out = sample(den, process, 4, D, 3, top_k=1, progress=True)
    assert torch.equal(out.tokens, base.argmax(-1).expand(4, D))


# ----------------------------------------------------------------------------------------------
# (k) bounded memory: no (B, D, V) temporaries beyond the network output


class LargestAllocation(TorchDispatchMode):
    """Records the element counts of every tensor an op creates (outputs sharing an input's storage, i.e.
    views and in-place results, are not new memory)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append(t.numel())
        return out


@pytest.mark.parametrize("cls, cache", [(MaskedProcess, False), (MaskedProcess, True), (UniformProcess, False)])
@pytest.mark.parametrize("filters", [{}, {"temperature": 0.7, "top_k": 5, "top_p": 0.9}], ids=str)
def test_sampler_allocates_no_full_size_temporaries(monkeypatch, cls, cache, filters):
    """Beyond the backbone's logits, a step allocates O(B D) and O(chunk V): here at most 2 rows of V."""
    from lightning_ddd.diffusion import draws, processes

    B, D, V, n = 4, 16, 64, 3
    monkeypatch.setattr(draws, "CHUNK_ELEMENTS", 2 * V)
    monkeypatch.setattr(processes, "_CHUNK_ELEMENTS", 2 * V)
    process = cls(V)
    torch.manual_seed(0)
    head = nn.Linear(process.num_input_tokens, V)

    def denoiser(z, t, *cond):
        with _disable_current_modes():  # the backbone's own allocations are not the sampler's
            logits = head(nn.functional.one_hot(z, process.num_input_tokens).float())  # (B, D, V)
            if cond:  # a student's per-step input
                logits = logits + cond[0][:, :1, None]
        return process.x0_log_probs(logits, z)  # in place under no_grad, chunk by chunk

    # Students sample through the step_condition hook (not combinable with the cache).
    step_condition = None if cache else (lambda num, g: torch.randn(num, 2, generator=g))
    spy = LargestAllocation()
    with spy:
        out = sample(
            denoiser, process, B, D, n, cache=cache, step_condition=step_condition,
            generator=torch.Generator().manual_seed(0), **filters,
        )
    assert (out.tokens < V).all()
    big = [size for size in spy.sizes if size > max(B * D, 2 * V)]
    assert big == [], big  # a (B, D, V) or (D, V) temporary would show here


def test_in_place_log_softmax_overwrites_only_what_the_caller_gave():
    """A full-span view (nn.Linear's reshaped product) is normalised in place; a slice of a bigger buffer is
    copied first, so the rest of that buffer keeps its values."""
    from lightning_ddd.diffusion.processes import owns_its_memory

    process = MaskedProcess(6)
    z = torch.full((2, 3), 6)  # all masked
    with torch.no_grad():
        linear = nn.Linear(4, 6)(torch.randn(2, 3, 4))  # (2, 3, 6), a view of its (6, 6) product
        expected = torch.log_softmax(linear, -1)
        assert linear._base is not None and owns_its_memory(linear)
        assert process.x0_log_probs(linear, z).data_ptr() == linear.data_ptr()  # no copy
        torch.testing.assert_close(linear, expected)
        buffer = torch.randn(4, 3, 6)
        before = buffer.clone()
        part = buffer[:2]  # contiguous, but a view of half of buffer
        assert not owns_its_memory(part) and not owns_its_memory(buffer.transpose(0, 1))
        out = process.x0_log_probs(part, z)
        torch.testing.assert_close(out, torch.log_softmax(before[:2], -1))
        assert torch.equal(buffer, before)
