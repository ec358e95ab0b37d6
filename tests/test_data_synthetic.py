"""The Markov-chain DataModule: its exact likelihood and entropy, and the data it samples."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightning_ddd.data.synthetic import MarkovChain


def small_chain(**kwargs) -> MarkovChain:
    args = dict(vocab_size=3, seq_len=4, num_train=64, num_val=16, batch_size=8)
    args.update(kwargs)
    return MarkovChain(**args)


def all_sequences(vocab_size: int, seq_len: int) -> torch.Tensor:
    """Every sequence of the space, (V^D, D)."""
    return torch.tensor(list(itertools.product(range(vocab_size), repeat=seq_len)), dtype=torch.long)


def test_log_likelihood_matches_manual_product():
    dm = small_chain(seq_len=3)
    # Overwrite the chain with a hand-built one to check the formula, not the random draw.
    dm.initial = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    dm.transition = torch.tensor(
        [[0.1, 0.6, 0.3], [0.4, 0.4, 0.2], [0.7, 0.2, 0.1]], dtype=torch.float64
    )
    tokens = torch.tensor([[0, 1, 2], [2, 0, 0]])
    expected = torch.tensor([0.5 * 0.6 * 0.2, 0.2 * 0.7 * 0.1], dtype=torch.float64).log()
    ll = dm.log_likelihood(tokens)
    assert ll.shape == (2,) and ll.dtype == torch.float64
    torch.testing.assert_close(ll, expected)
    torch.testing.assert_close(dm.oracle_log_likelihood(tokens), expected)


def test_probabilities_sum_to_one_over_all_sequences():
    dm = small_chain()
    probs = dm.log_likelihood(all_sequences(3, 4)).exp()  # (81,)
    assert math.isclose(probs.sum().item(), 1.0, abs_tol=1e-12)


@pytest.mark.parametrize("sharpness", [0.0, 2.0, 8.0])
def test_exact_entropy_matches_enumeration(sharpness):
    dm = small_chain(sharpness=sharpness)
    log_p = dm.log_likelihood(all_sequences(3, 4))
    enumerated = -(log_p.exp() * log_p).sum().item()
    assert math.isclose(dm.exact_entropy(), enumerated, rel_tol=1e-10)


def test_zero_sharpness_is_uniform():
    dm = small_chain(sharpness=0.0)
    assert math.isclose(dm.exact_entropy(), 4 * math.log(3), rel_tol=1e-12)


def test_sharper_chain_has_lower_entropy():
    soft = MarkovChain(sharpness=0.5, chain_seed=3).exact_entropy()
    sharp = MarkovChain(sharpness=4.0, chain_seed=3).exact_entropy()
    assert sharp < soft


def test_chain_shapes_and_rows():
    dm = MarkovChain(vocab_size=5)
    assert dm.initial.shape == (5,) and dm.transition.shape == (5, 5)
    torch.testing.assert_close(dm.transition.sum(-1), torch.ones(5, dtype=torch.float64))
    assert math.isclose(dm.initial.sum().item(), 1.0)


def test_samples_follow_the_chain():
    dm = MarkovChain(vocab_size=4, seq_len=8, num_train=4096, num_val=16, batch_size=64)
    dm.setup("fit")
    nll = -dm.log_likelihood(dm.train_set.tokens)  # (N,)
    # The mean NLL of samples estimates the entropy; allow four standard errors.
    stderr = nll.std().item() / math.sqrt(len(nll))
    assert abs(nll.mean().item() - dm.exact_entropy()) < 4 * stderr
    # The first-token frequencies match the initial distribution (binomial 4-sigma band).
    freq = torch.bincount(dm.train_set.tokens[:, 0], minlength=4).double() / len(nll)
    sigma = (dm.initial * (1 - dm.initial) / len(nll)).sqrt()
    assert ((freq - dm.initial).abs() < 4 * sigma + 1e-9).all()


def test_zero_probability_states_are_never_sampled():
    # Very sharp logits underflow some probabilities to exactly zero; those must never appear.
    dm = MarkovChain(vocab_size=6, seq_len=6, sharpness=400.0, num_train=512, num_val=16)
    assert (dm.transition == 0).any()  # the test needs real zeros
    dm.setup()
    assert torch.isfinite(dm.log_likelihood(dm.train_set.tokens)).all()


def test_same_seeds_same_data_and_different_seeds_differ():
    a, b, c, d = small_chain(), small_chain(), small_chain(seed=1), small_chain(chain_seed=1)
    for dm in (a, b, c, d):
        dm.setup("fit")
    assert torch.equal(a.train_set.tokens, b.train_set.tokens)
    assert torch.equal(a.val_set.tokens, b.val_set.tokens)
    assert not torch.equal(a.train_set.tokens, c.train_set.tokens)
    assert torch.equal(a.transition, c.transition)
    assert not torch.equal(a.transition, d.transition)


def test_val_split_does_not_depend_on_train_size():
    a, b = small_chain(num_train=32), small_chain(num_train=64)
    a.setup()
    b.setup()
    assert torch.equal(a.val_set.tokens, b.val_set.tokens)


def test_dataloaders_yield_long_batches_in_range():
    dm = small_chain()
    assert (dm.vocab_size, dm.seq_len) == (3, 4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (8, 4) and batch.dtype == torch.long
    assert batch.min() >= 0 and batch.max() < 3
    assert len(dm.train_dataloader()) == 64 // 8
    val = torch.cat(list(dm.val_dataloader()))
    assert torch.equal(val, dm.val_set.tokens)


def test_log_likelihood_rejects_mask_ids():
    dm = small_chain()
    with pytest.raises(ValueError, match="token ids"):
        dm.log_likelihood(torch.full((1, 4), 3))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(vocab_size=1), "vocab_size"),
        (dict(seq_len=0), "seq_len"),
        (dict(sharpness=-1.0), "sharpness"),
        (dict(num_train=0), "num_train"),
        (dict(num_val=0), "num_val"),
    ],
)
def test_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        small_chain(**kwargs)
