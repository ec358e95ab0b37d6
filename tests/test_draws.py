"""Row draws (inverse CDF, filters, chunks) and the O(B D) posterior draws against exact distributions."""

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chi2

from lightning_ddd.diffusion import MaskedProcess, UniformProcess, filter_logits
from lightning_ddd.diffusion import draws
from lightning_ddd.diffusion.categorical import sample_inverse_cdf
from lightning_ddd.diffusion.draws import sample_positions, sample_rows


def chi2_pvalue(counts, probs):
    """Pearson goodness of fit; classes of probability zero must never appear."""
    assert (counts[probs == 0] == 0).all(), (counts, probs)
    pos = probs > 0
    if int(pos.sum()) == 1:
        return 1.0  # a point mass: every draw landed on it (checked above)
    N = counts.sum()
    stat = float(((counts[pos] - N * probs[pos]) ** 2 / (N * probs[pos])).sum())
    return chi2.sf(stat, int(pos.sum()) - 1)


def by_hand(log_p, temperature=1.0, top_k=0, top_p=1.0):
    """Filtered probabilities of one row, written out in plain Python (independent of filter_logits)."""
    p = [math.exp(v / temperature) if v > -math.inf else 0.0 for v in log_p.tolist()]
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))  # most likely first, ties by index
    if 0 < top_k < len(p):
        for i in order[top_k:]:
            p[i] = 0.0
    total = sum(p)
    p = [v / total for v in p]
    if top_p < 1.0:
        mass, keep = 0.0, []
        for i in order:
            keep.append(i)
            mass += p[i]
            if mass >= top_p - 1e-12:
                break
        p = [v if i in keep else 0.0 for i, v in enumerate(p)]
    total = sum(p)
    return torch.tensor([v / total for v in p], dtype=torch.float64)


FILTERS = [
    {},
    {"temperature": 0.6},
    {"top_k": 3},
    {"top_p": 0.6},
    {"temperature": 1.5, "top_k": 4, "top_p": 0.8},
]


@pytest.mark.parametrize("filters", FILTERS, ids=str)
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_sample_rows_matches_filtered_distribution(filters, precision):
    g = torch.Generator().manual_seed(0)
    V, N = 6, 60_000
    log_p = torch.log_softmax(0.5 * torch.randn(V, generator=g), -1)
    log_p[4] = -math.inf  # an impossible class
    expected = by_hand(log_p, **filters)
    assert torch.allclose(filter_logits(log_p, **filters).exp(), expected, atol=1e-12)  # the same semantics
    rows = log_p.float().expand(N, V)
    drawn = sample_rows(rows, g, precision, **filters)
    assert drawn.dtype == torch.long and drawn.shape == (N,)
    assert chi2_pvalue(torch.bincount(drawn, minlength=V).double(), expected) > 1e-4


def test_top_p_keeps_the_stable_sort_tie_order():
    # Classes 1, 2 and 3 tie; the stable sort puts 1 first, so top_p = 0.55 keeps classes 0 and 1 only.
    rows = torch.tensor([[0.4, 0.2, 0.2, 0.2]], dtype=torch.float64).log().expand(20_000, 4)
    expected = filter_logits(rows[0], top_p=0.55).exp()
    assert torch.allclose(expected, torch.tensor([2 / 3, 1 / 3, 0, 0], dtype=torch.float64))
    drawn = sample_rows(rows, torch.Generator().manual_seed(1), top_p=0.55)
    assert chi2_pvalue(torch.bincount(drawn, minlength=4).double(), expected) > 1e-4


def test_inverse_cdf_never_draws_zero_weight_classes():
    weights = torch.tensor([[0.0, 1.0, 0.0, 0.0, 2.0, 0.0]], dtype=torch.float64).expand(50_000, 6)
    for precision in ("float64", "float32"):
        drawn = sample_inverse_cdf(weights, torch.Generator().manual_seed(0), precision)
        assert set(drawn.unique().tolist()) == {1, 4}
    count = torch.full((50_000,), 2)  # only the first two classes: class 1 always
    assert (sample_inverse_cdf(weights, None, "float64", count) == 1).all()


def test_inverse_cdf_extremes_of_the_uniform(monkeypatch):
    """u = 0 draws the last positive class, u just below 1 the first: the target never leaves (0, total]."""
    weights = torch.tensor([[0.0, 3.0, 0.0, 5.0, 0.0]], dtype=torch.float64).expand(2, 5)
    u = torch.tensor([0.0, 1.0 - 2.0**-53], dtype=torch.float64)
    monkeypatch.setattr(torch, "rand", lambda *a, **k: u)
    assert sample_inverse_cdf(weights).tolist() == [3, 1]


def test_sample_positions_gathers_rows_in_chunks(monkeypatch):
    g = torch.Generator().manual_seed(0)
    B, D, V = 3, 7, 5
    log_probs = torch.log_softmax(torch.randn(B, D, V, generator=g), -1)
    log_probs[1, 2] = torch.tensor([-math.inf, 0.0, -math.inf, -math.inf, -math.inf])  # one-hot at class 1
    positions = torch.tensor([1 * D + 2, 0, 2 * D + 6, 5])
    run = lambda: sample_positions(log_probs, positions, torch.Generator().manual_seed(3), top_p=0.9)
    whole = run()
    monkeypatch.setattr(draws, "CHUNK_ELEMENTS", V)  # one row per chunk
    assert torch.equal(run(), whole)  # chunking does not change the draw: one uniform per row, in order
    assert whole[0] == 1
    expected = sample_rows(log_probs.reshape(-1, V)[positions], torch.Generator().manual_seed(3), top_p=0.9)
    assert torch.equal(whole, expected)


# ----------------------------------------------------------------------------------------------
# Posterior draws: stratified uniforms enumerate the draw's distribution exactly (up to 1 / M)


def stratified_posterior(process, z_t, x0, s, t, M, monkeypatch):
    """Frequencies (P, V_in) of posterior_sample at P pairs (z_t[p], x0[p]) when its uniforms run over the grid
    (i + 1/2) / M and its random ids over every id: the exact law of the draw, up to 1 / M per class."""
    V, P = process.vocab_size, z_t.numel()
    u = ((torch.arange(M, dtype=torch.float64) + 0.5) / M).repeat_interleave(V)  # (M V,)
    ids = torch.arange(V).repeat(M)  # (M V,)
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: u.to(kw.get("dtype", torch.float32))[:, None].expand(shape))
    monkeypatch.setattr(torch, "randint", lambda high, shape, **kw: ids[:, None].expand(shape))
    out = process.posterior_sample(z_t.expand(M * V, P), x0.expand(M * V, P), s, t)  # (M V, P)
    monkeypatch.undo()
    return torch.stack([torch.bincount(col, minlength=process.num_input_tokens) for col in out.T]).double() / (M * V)


@pytest.mark.parametrize("cls", [MaskedProcess, UniformProcess])
def test_posterior_sample_enumerates_posterior_probs(cls, monkeypatch):
    V, M = 4, 20_000
    process = cls(V)
    pairs = [(z, x) for z in range(process.num_input_tokens) for x in range(V) if cls is UniformProcess or z in (x, V)]
    z_t, x0 = torch.tensor(pairs).T[:, None]  # (1, P) each: every pair z_t reachable from x0
    for s, t in ((0.2, 0.5), (0.0, 0.25), (0.7, 1.0)):
        freq = stratified_posterior(process, z_t, x0, s, t, M, monkeypatch)  # (P, V_in)
        exact = process.posterior_probs(z_t, F.one_hot(x0, V).double(), s, t)[0]  # (P, V_in)
        assert torch.allclose(freq, exact, atol=2.0 / M), (s, t, freq, exact)


@pytest.mark.parametrize("cls", [MaskedProcess, UniformProcess])
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_posterior_sample_with_a_generator(cls, precision):
    V, N = 3, 60_000
    process = cls(V)
    g = torch.Generator().manual_seed(0)
    z_t = torch.tensor([[V - 1 if cls is UniformProcess else V, 0]]).expand(N, 2)
    x0 = torch.tensor([[1, 0]]).expand(N, 2)
    s, t = torch.full((N,), 0.3), torch.full((N,), 0.6)  # per-row times
    z_s = process.posterior_sample(z_t, x0, s, t, g, precision)
    exact = process.posterior_probs(z_t[:1], F.one_hot(x0[:1], V).double(), 0.3, 0.6)[0]  # (2, V_in)
    for d in range(2):
        counts = torch.bincount(z_s[:, d], minlength=process.num_input_tokens).double()
        assert chi2_pvalue(counts, exact[d]) > 1e-4
