"""Absolute positions in the denoiser: without them every position of an all-mask input looks the same.

The data is a Markov chain whose first-token law (0.86 on token 0) is far from its stationary law (0.32),
so the exact per-position marginals differ strongly at the start of the sequence. A teacher with learned
absolute positions must follow them, both in its all-mask prediction and in 64-step samples; the same
teacher with RoPE alone cannot (which shows the test can fail).
"""

import functools

import pytest
import torch

from lightning_ddd.data import MarkovChain
from lightning_ddd.diffusion import MaskedProcess
from lightning_ddd.diffusion.losses import AnyOrderLoss
from lightning_ddd.diffusion.sampling import sample
from lightning_ddd.nn import DenoisingTransformer

V, D = 4, 6


@functools.lru_cache(maxsize=None)
def chain() -> MarkovChain:
    dm = MarkovChain(vocab_size=V, seq_len=D, sharpness=2.0, chain_seed=0, num_train=4096)
    dm.setup()
    return dm


def exact_marginals(dm: MarkovChain) -> torch.Tensor:
    """P(X_d = v), (D, V) float64: the initial law pushed through the transition matrix."""
    rows = [dm.initial]
    for _ in range(dm.seq_len - 1):
        rows.append(rows[-1] @ dm.transition)
    return torch.stack(rows)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p / q).log()).sum(-1)


@functools.lru_cache(maxsize=None)
def trained(learned_positions: bool) -> tuple[DenoisingTransformer, MaskedProcess]:
    torch.manual_seed(0)
    process = MaskedProcess(V)
    net = DenoisingTransformer(V + 1, V, D, d_model=32, n_layers=2, n_heads=4, learned_positions=learned_positions)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    data, g = chain().train_set.tokens, torch.Generator().manual_seed(0)
    for _ in range(300):
        x = data[torch.randint(0, len(data), (128,), generator=g)]
        loss = AnyOrderLoss()(lambda z, t: process.x0_log_probs(net(z), z), x, process, g).mean() / D
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval(), process


def per_position_kls(learned_positions: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(true marginal || model) per position: of the all-mask prediction, and of 64-step samples."""
    net, process = trained(learned_positions)
    truth = exact_marginals(chain())
    denoise = lambda z, t: process.x0_log_probs(net(z), z)  # noqa: E731
    with torch.no_grad():
        all_mask = torch.full((1, D), process.mask_id)
        predicted = denoise(all_mask, None)[0].double().exp()  # (D, V)
        tokens = sample(denoise, process, 2000, D, 64, generator=torch.Generator().manual_seed(1)).tokens
    counts = torch.stack([torch.bincount(tokens[:, d], minlength=V) for d in range(D)]).double() + 0.5
    return kl(truth, predicted), kl(truth, counts / counts.sum(-1, keepdim=True))


def test_learned_positions_follow_the_per_position_marginals():
    prediction_kl, sample_kl = per_position_kls(learned_positions=True)
    assert prediction_kl.max() < 0.05, prediction_kl
    assert sample_kl.max() < 0.04, sample_kl
    # The all-mask prediction differs by position where the data's marginals do.
    net, process = trained(True)
    with torch.no_grad():
        p = net(torch.full((1, D), process.mask_id))[0].softmax(-1)
    assert (p[0] - p[-1]).abs().max() > 0.3


def test_rope_alone_cannot_tell_the_first_position():
    prediction_kl, sample_kl = per_position_kls(learned_positions=False)
    assert prediction_kl[0] > 0.3, prediction_kl
    assert sample_kl[0] > 0.05, sample_kl


def test_all_mask_input_is_position_blind_without_the_table():
    net = DenoisingTransformer(V + 1, V, D, d_model=32, n_layers=2, n_heads=4, learned_positions=False).eval()
    with torch.no_grad():
        out = net(torch.full((2, D), V))
    torch.testing.assert_close(out[:, :1].expand_as(out), out, rtol=0, atol=1e-5)


def test_checkpoint_without_the_table_loads_as_the_same_model():
    old = DenoisingTransformer(V + 1, V, D, d_model=32, n_layers=1, n_heads=4, learned_positions=False)
    new = DenoisingTransformer(V + 1, V, D, d_model=32, n_layers=1, n_heads=4)
    with pytest.warns(UserWarning, match="no absolute position table"):
        new.load_state_dict(old.state_dict())
    z = torch.randint(0, V + 1, (3, D), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(new(z), old(z))
    assert torch.all(new.pos_emb.weight == 0)
