"""Tests for the bidirectional transformer backbone."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_ddd.nn import DenoisingTransformer
from lightning_ddd.nn.transformer import apply_rope, rope_angles

VOCAB = 11  # real tokens; id VOCAB is the mask token
SEQ_LEN = 12


def make_model(**kwargs) -> DenoisingTransformer:
    torch.manual_seed(0)
    kwargs = {"d_model": 32, "n_layers": 2, "n_heads": 4, **kwargs}
    return DenoisingTransformer(VOCAB + 1, VOCAB, SEQ_LEN, **kwargs).eval()


def random_ids(B: int = 3, L: int = SEQ_LEN) -> torch.Tensor:
    return torch.randint(0, VOCAB + 1, (B, L), generator=torch.Generator().manual_seed(1))


def perturb(module: torch.nn.Module, std: float = 0.5) -> None:
    """Overwrite every parameter of ``module`` with noise (to leave a zero initialisation)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * std)


def test_output_shape_and_attributes():
    model = make_model()
    assert model(random_ids(3, SEQ_LEN)).shape == (3, SEQ_LEN, VOCAB)
    assert model(random_ids(2, 5)).shape == (2, 5, VOCAB)  # shorter than seq_len is fine
    assert (model.num_input_tokens, model.vocab_size, model.seq_len) == (VOCAB + 1, VOCAB, SEQ_LEN)
    assert model.time_conditioning is False and model.cond_dim == 0


def test_weight_init():
    model = make_model(d_model=64)
    w = model.blocks[0].mlp.fc.weight
    assert abs(w.std().item() - 0.02) < 0.003
    assert torch.all(model.blocks[0].attn.qkv.bias == 0)
    assert abs(model.tok_emb.weight.std().item() - 0.02) < 0.003


def test_bidirectional():
    model = make_model()
    z = random_ids(2)
    z2 = z.clone()
    z2[:, -1] = (z[:, -1] + 1) % (VOCAB + 1)
    with torch.no_grad():
        a, b = model(z), model(z2)
    # A causal model would leave position 0 unchanged.
    assert not torch.allclose(a[:, 0], b[:, 0])


def test_rope_depends_only_on_relative_position():
    head_dim = 16
    g = torch.Generator().manual_seed(0)
    q = torch.randn(head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(head_dim, generator=g, dtype=torch.float64)

    def score(m: int, n: int) -> torch.Tensor:
        rq = apply_rope(q[None], rope_angles(torch.tensor([m]), head_dim))[0]
        rk = apply_rope(k[None], rope_angles(torch.tensor([n]), head_dim))[0]
        return rq @ rk

    for m, n, c in [(0, 3, 5), (7, 2, 11), (4, 4, 100)]:
        torch.testing.assert_close(score(m, n), score(m + c, n + c), rtol=1e-5, atol=1e-5)
    # ...but it does depend on the relative position, and rotations keep norms.
    assert not torch.allclose(score(0, 1), score(0, 3))
    rq = apply_rope(q[None], rope_angles(torch.tensor([9]), head_dim))[0]
    torch.testing.assert_close(rq.norm(), q.norm())
    assert not torch.allclose(rq, q)
    # Position 0 is the identity rotation.
    torch.testing.assert_close(apply_rope(q[None], rope_angles(torch.tensor([0]), head_dim))[0], q)


def test_sdpa_matches_manual_attention():
    model = make_model()
    attn = model.blocks[0].attn
    B, L, D, H = 2, 7, 32, 4
    x = torch.randn(B, L, D, generator=torch.Generator().manual_seed(0))
    perturb(attn, std=0.3)  # larger weights give non-uniform attention patterns
    angles = rope_angles(torch.arange(L), D // H)
    with torch.no_grad():
        out = attn(x, (angles.cos(), angles.sin()))

        q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(D, dim=-1)
        q, k, v = (y.view(B, L, H, D // H).transpose(1, 2) for y in (q, k, v))
        q, k = apply_rope(q, angles), apply_rope(k, angles)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), dim=-1)  # (B, H, L, L)
        assert weights.max() > 0.3  # not near-uniform, so the comparison has teeth
        y = (weights @ v).transpose(1, 2).reshape(B, L, D)
        expected = y @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def _cond_inputs(B: int = 3, C: int = 5):
    g = torch.Generator().manual_seed(2)
    return torch.randn(B, C, generator=g), torch.randn(B, SEQ_LEN, C, generator=g)


def test_cond_hook_zero_init_is_noop():
    z = random_ids()
    cond_vec, cond_seq = _cond_inputs()
    base = make_model()
    built = make_model(cond_dim=5)  # same seed, so same backbone weights
    assert built.cond_dim == 5 and built.cond_proj is not None
    with torch.no_grad():
        ref = base(z)
        assert torch.equal(built(z), ref)
        assert torch.equal(built(z, cond=cond_vec), ref)
        assert torch.equal(built(z, cond=cond_seq), ref)

        base.add_cond_input(5)
        assert base.cond_dim == 5
        assert torch.equal(base(z, cond=cond_vec), ref)
        assert torch.equal(base(z, cond=cond_seq), ref)


def test_add_cond_input_matches_model_dtype():
    model = make_model().double()
    model.add_cond_input(4)
    assert all(p.dtype == torch.float64 for p in model.cond_proj.parameters())
    out = model(random_ids(), cond=torch.randn(3, 4))
    assert out.dtype == torch.float64
    with pytest.raises(ValueError, match="already has"):
        model.add_cond_input(4)


@pytest.mark.parametrize("per_position", [False, True])
def test_cond_hook_learns(per_position):
    model = make_model()
    model.add_cond_input(5)
    model.train()
    z = random_ids()
    cond_vec, cond_seq = _cond_inputs()
    cond = cond_seq if per_position else cond_vec
    target = torch.randint(0, VOCAB, z.shape, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss = F.cross_entropy(model(z, cond=cond).reshape(-1, VOCAB), target.reshape(-1))
    loss.backward()
    opt.step()

    model.eval()
    with torch.no_grad():
        a = model(z, cond=cond)
        assert not torch.allclose(a, model(z, cond=-cond))
        assert not torch.allclose(a, model(z))
        if per_position:
            # A per-position cond equal at every position is the broadcast (B, C) form...
            same = cond[:, :1].expand_as(cond)
            torch.testing.assert_close(model(z, cond=same), model(z, cond=cond[:, 0]))
            # ...and different positions really get different inputs.
            assert not torch.allclose(a, model(z, cond=cond[:, 0]))


def test_cond_errors():
    model = make_model()
    with pytest.raises(ValueError, match="cond_dim=0"):
        model(random_ids(), cond=torch.randn(3, 5))
    model.add_cond_input(5)
    with pytest.raises(ValueError, match="cond must have shape"):
        model(random_ids(), cond=torch.randn(3, 4))
    with pytest.raises(ValueError, match="cond must have shape"):
        model(random_ids(), cond=torch.randn(3, SEQ_LEN - 1, 5))


def test_time_conditioning():
    model = make_model(time_conditioning=True)
    assert model.time_conditioning is True
    z = random_ids()
    with pytest.raises(ValueError, match="needs t"):
        model(z)
    t1, t2 = torch.full((3,), 0.1), torch.full((3,), 0.9)
    with torch.no_grad():
        # Zero-initialised modulation: a fresh model ignores t.
        torch.testing.assert_close(model(z, t1), model(z, t2))
        for block in model.blocks:
            perturb(block.ada, std=0.1)
        a, b = model(z, t1), model(z, t2)
        assert not torch.allclose(a, b)
        # A scalar t broadcasts over the batch.
        torch.testing.assert_close(model(z, torch.tensor(0.1)), a)


def test_time_ignored_without_time_conditioning():
    model = make_model()
    z = random_ids()
    with torch.no_grad():
        assert torch.equal(model(z, torch.full((3,), 0.1)), model(z, torch.full((3,), 0.9)))
        assert torch.equal(model(z), model(z, torch.full((3,), 0.5)))


def test_seq_len_error():
    model = make_model()
    with pytest.raises(ValueError, match=rf"{SEQ_LEN + 1} positions.*seq_len={SEQ_LEN}"):
        model(random_ids(2, SEQ_LEN + 1))


@pytest.mark.parametrize("bad_id", [-1, VOCAB + 1])
def test_id_range_error(bad_id):
    model = make_model()
    z = random_ids()
    z[1, 2] = bad_id
    with pytest.raises(ValueError, match=rf"\[0, {VOCAB + 1}\)"):
        model(z)


def test_constructor_validation():
    with pytest.raises(ValueError, match="n_heads"):
        DenoisingTransformer(VOCAB + 1, VOCAB, SEQ_LEN, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="n_heads"):
        DenoisingTransformer(VOCAB + 1, VOCAB, SEQ_LEN, d_model=12, n_heads=4)  # odd head size


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_bf16_autocast_cpu(time_conditioning):
    model = make_model(time_conditioning=time_conditioning, cond_dim=3)
    z = random_ids()
    t = torch.rand(3)
    with torch.no_grad():
        ref = model(z, t, cond=torch.randn(3, 3))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(z, t, cond=torch.randn(3, 3))
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


def test_rotary_tables_are_cached_and_match_the_angles():
    model = make_model()
    cos, sin = model.rope(SEQ_LEN, torch.device("cpu"))
    angles = rope_angles(torch.arange(SEQ_LEN), model.head_dim)
    torch.testing.assert_close(cos, angles.cos())
    torch.testing.assert_close(sin, angles.sin())
    assert model.rope(SEQ_LEN, torch.device("cpu"))[0] is cos  # computed once
    # bf16 casts of the model leave the float32 tables alone; a deep copy starts with its own cache.
    import copy

    assert model.to(torch.bfloat16).rope(SEQ_LEN, torch.device("cpu"))[0].dtype == torch.float32
    assert copy.deepcopy(model).rope._tables == {}


def test_dropout_active_only_in_training():
    model = make_model(dropout=0.5)
    z = random_ids()
    with torch.no_grad():
        assert torch.equal(model(z), model(z))
        model.train()
        assert not torch.equal(model(z), model(z))
