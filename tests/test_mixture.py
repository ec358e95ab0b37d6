"""Di4C: mixture maths against exact enumeration, and the MixtureStudent module on a tiny teacher."""

import glob
import itertools
import math
import os

import pytest
import torch
import yaml

from lightning_ddd.cli import main
from lightning_ddd.data import MarkovChain
from lightning_ddd.diffusion import mixture
from lightning_ddd.diffusion.mixture import ConsistencyStep, DataWeight, Di4CTimes
from lightning_ddd.modules import MixtureStudent
from lightning_ddd.modules.mixture_student import MixtureSettings, lambda_features
from lightning_ddd.modules.student_losses import (
    Di4CConsistencyLoss,
    Di4CContext,
    Di4CDataLoss,
    Di4CDistillationLoss,
    DistillationLoss,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "configs", "tiny_teacher.yaml")
B, M, D, V = 2, 3, 3, 3
ALL_X = torch.tensor(list(itertools.product(range(V), repeat=D)))  # (27, D)


def random_components(seed=0, batch=B, m=M, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, m, D, V, generator=g, dtype=torch.float64) * 1.5
    return torch.log_softmax(logits, -1).requires_grad_(requires_grad)


def brute_mixture_probs(log_probs):
    """p̂(x) for every x in ALL_X: (B, M, D, V) → (B, 27), straight from the definition."""
    P = log_probs.exp()
    return torch.stack([
        torch.stack([P[b, :, torch.arange(D), x].prod(-1).mean() for x in ALL_X]) for b in range(P.shape[0])
    ])


# ---- maths against enumeration ---------------------------------------------------------------------


def test_mixture_likelihood_and_correlation_match_enumeration():
    lp = random_components()
    probs = brute_mixture_probs(lp)  # (B, 27)
    assert torch.allclose(probs.sum(-1), torch.ones(B, dtype=torch.float64))
    ll = mixture.mixture_log_likelihood(lp, ALL_X.expand(B, -1, -1))  # (B, 27)
    assert torch.allclose(ll, probs.log())
    # The lambda-averaged marginal is the mixture's true marginal, found by summing p̂ over the other dims.
    marginals = torch.stack([torch.stack([
        torch.stack([probs[b][ALL_X[:, d] == v].sum() for v in range(V)]) for d in range(D)]) for b in range(B)])
    assert torch.allclose(mixture.mean_marginal(lp).exp(), marginals)
    corr = mixture.correlation(lp, ALL_X.expand(B, -1, -1))
    independent = torch.stack([marginals[b, torch.arange(D), ALL_X].log().sum(-1) for b in range(B)])
    assert torch.allclose(corr, probs.log() - independent)
    # A (B, D) target gives (B,)
    assert torch.allclose(mixture.correlation(lp, ALL_X[:B]), corr[torch.arange(B), torch.arange(B)])


def test_correlation_vanishes_for_identical_components():
    lp = random_components(batch=1, m=1).expand(1, M, D, V)
    assert torch.allclose(mixture.correlation(lp, ALL_X[None]), torch.zeros(1, len(ALL_X), dtype=torch.float64))


def test_control_variate_cross_entropy_has_the_plain_expectation():
    lp = random_components(seed=1, batch=1, requires_grad=True)
    target = random_components(seed=2, batch=1, m=4)  # R = mean of 4 products, a correlated target
    R = brute_mixture_probs(target)[0]  # (27,)
    r = mixture.mean_marginal(target)  # (1, D, V) its marginals
    # Exact expectation over y ~ R of the one-sample control-variate estimate.
    per_y = torch.stack([mixture.mixture_cross_entropy(lp, r, y.view(1, 1, D))[0] for y in ALL_X])
    cv = (R * per_y).sum()
    plain = -(R * brute_mixture_probs(lp)[0].log()).sum()
    entropy = -(r.exp() * r).sum()
    assert torch.allclose(cv, plain - entropy)
    g_cv, = torch.autograd.grad(cv, lp)
    g_plain, = torch.autograd.grad(plain, lp)
    assert torch.allclose(g_cv, g_plain)  # the same gradient: the entropy is a constant
    # The consistency loss is this estimate with one draw per target component.
    y = torch.stack([ALL_X[5], ALL_X[17], ALL_X[2], ALL_X[9]])[None]  # (1, 4, D)
    expected = mixture.mixture_cross_entropy(lp, r, y)
    assert torch.allclose(mixture.consistency_loss(lp, target, y), expected)


def test_masked_positions_restrict_sums_without_nan():
    lp = random_components(seed=3, requires_grad=True)
    mask = torch.tensor([[True, False, True], [False, False, False]])
    x = torch.tensor([[0, 2, 1], [1, 1, 1]])
    # Carried positions: log-prob 0 at the token, -inf elsewhere, as process.x0_log_probs returns them.
    carried = torch.full((B, D, V), -math.inf, dtype=torch.float64).scatter(-1, x[..., None], 0.0)
    full = torch.where(mask[:, None, :, None], lp, carried[:, None])
    teacher = torch.where(mask[..., None], random_components(seed=4, m=1)[:, 0], carried)
    losses = [
        mixture.data_loss(full, teacher, x, torch.tensor([0.3, 0.7]), mask),
        mixture.distillation_loss(full, teacher, mask),
        mixture.consistency_loss(full, full.detach(), x[:, None].expand(B, M, D), mask),
    ]
    total = sum(loss.sum() for loss in losses)
    assert torch.isfinite(total)
    grad, = torch.autograd.grad(total, lp)
    assert torch.isfinite(grad).all() and grad[1].abs().max() == 0  # row 1 has nothing masked
    # Restricting equals dropping the unmasked dimension.
    kept = mixture.mixture_log_likelihood(lp[:1][:, :, [0, 2]], x[:1, [0, 2]])
    assert torch.allclose(mixture.mixture_log_likelihood(full[:1], x[:1], mask[:1]), kept)


def test_times_are_per_example():
    g = torch.Generator().manual_seed(0)
    t, near = mixture.sample_times(1000, 0.01, 0.5, g)
    assert 300 < near.sum() < 700
    assert ((t[near] >= 0.01) & (t[near] <= 0.02)).all() and (t[~near] >= 0.01).all() and t[~near].max() > 0.9
    u = mixture.consistency_times(t, 1e-3, 1e-2, g)
    step = t - u
    assert (step > 0).all() and (step <= torch.minimum(torch.full_like(t, 1e-2), t / 2) + 1e-7).all()
    assert step.std() > 0  # a Delta per example, not one per batch
    a = mixture.data_weight(torch.tensor([0.0, 0.5, 1.0]), coeff=0.5)
    assert torch.allclose(a, 0.5 * torch.sigmoid(torch.tensor([-10.0, 0.0, 10.0])))
    a = mixture.data_weight(torch.tensor([0.0, 0.5, 1.0]), coeff=1.0, sharpness=4.0, midpoint=0.25)
    assert torch.allclose(a, torch.sigmoid(torch.tensor([-1.0, 1.0, 3.0])))
    a = mixture.data_weight(torch.tensor([0.01, 0.5, 1.0]), coeff=0.7, midpoint=-math.inf)  # a constant a(t)
    assert torch.equal(a, torch.full((3,), 0.7))


# ---- the module --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("teacher"))
    main(["fit", "-c", TINY, "--trainer.default_root_dir", root, "--trainer.max_epochs", "1"])
    (path,) = glob.glob(os.path.join(root, "**", "last.ckpt"), recursive=True)
    return path


@pytest.fixture(scope="module")
def uniform_teacher_ckpt(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("uniform"))
    main(["fit", "-c", TINY, "--trainer.default_root_dir", root, "--trainer.max_epochs", "1",
          "--model.init_args.process", "UniformProcess", "--model.init_args.loss", "UniformELBO",
          "--model.init_args.val_loss", "UniformELBO", "--model.init_args.backbone.init_args.time_conditioning", "true"])
    (path,) = glob.glob(os.path.join(root, "**", "last.ckpt"), recursive=True)
    return path


def student(path, num_lambda=4, lambda_dim=16, position_dim=0, data_coeff=0.1, latent="uniform", **kw):
    """A small student; the common settings by keyword, built into their settings objects."""
    losses = [Di4CDistillationLoss(), Di4CDataLoss(a_t=DataWeight(coeff=data_coeff)), Di4CConsistencyLoss()]
    mix = MixtureSettings(num_lambda=num_lambda, lambda_dim=lambda_dim, position_dim=position_dim, latent=latent)
    return MixtureStudent(path, mixture=mix, losses=losses, **kw)


def terms_of(s, x, generator):
    """Per-example weighted terms in nats per token, each (B,)."""
    return {name: value / x.shape[1] for name, value in s.loss_terms(Di4CContext(s, x, generator)).items()}


def perturb(model, seed=0):
    """Give the lambda input an effect, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.backbone.cond_proj.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize("bad, match", [
    (lambda: MixtureSettings(num_lambda=0), "num_lambda"),
    (lambda: MixtureSettings(latent="normal"), "latent='normal' must be 'uniform' or 'gaussian'"),
    (lambda: MixtureSettings(lambda_dim=5), "lambda_dim=5 must be >= 1 \\(gaussian\\) or even"),
    (lambda: DataWeight(coeff=2.0), "coeff=2.0 must lie in \\[0, 1\\]"),
    (lambda: Di4CTimes(delta=0.7), "delta"),
    (lambda: ConsistencyStep(step_min=0.1, step_max=0.01), "step_min"),
    (lambda: Di4CDataLoss(weight=-1.0), "weight=-1.0"),
    (lambda: MixtureStudent("does-not-exist.ckpt", hybrid_teacher_steps=-1), "hybrid_teacher_steps"),
])
def test_bad_arguments_fail_before_loading_the_teacher(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()  # a checked setting fails when it is built, before any teacher path is read


@pytest.mark.parametrize("uniform", [False, True])
def test_untrained_student_is_the_teacher(teacher_ckpt, uniform_teacher_ckpt, uniform):
    s = student(uniform_teacher_ckpt if uniform else teacher_ckpt)
    g = torch.Generator().manual_seed(0)
    z = s.process.prior_sample(6, 8, g)
    z[:, :3] = torch.randint(5, (6, 3), generator=g)
    t = torch.rand(6, generator=g)
    out = s.denoise(z, t, s.draw_lambda(6, g))
    assert torch.equal(out, s.teacher.denoise(z, t))
    perturb(s)
    assert not torch.equal(s.denoise(z, t, s.draw_lambda(6, g)), s.teacher.denoise(z, t))
    assert not any(p.requires_grad for p in s.teacher.parameters())


@pytest.mark.parametrize("uniform", [False, True])
def test_loss_is_finite_and_decreases(teacher_ckpt, uniform_teacher_ckpt, uniform):
    s = student(uniform_teacher_ckpt if uniform else teacher_ckpt, data_coeff=1.0, position_dim=8)
    perturb(s)  # off the symmetric start, where every term and its gradient are 0
    data = MarkovChain(vocab_size=5, seq_len=8, num_train=32, sharpness=3.0)
    data.setup("fit")
    batch = torch.stack([data.train_set[i] for i in range(32)])
    opt = torch.optim.Adam(s.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        terms = terms_of(s, batch, torch.Generator().manual_seed(1))  # the same noise every step
        loss = (terms["distil"] + terms["data"] + terms["consis"]).mean()
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses
    assert all(p.grad is None for p in s.teacher.parameters())


def test_per_example_roles_and_times(teacher_ckpt, monkeypatch):
    s = student(teacher_ckpt)
    perturb(s)
    seen = {}
    data_loss, consistency_times = mixture.data_loss, mixture.consistency_times
    monkeypatch.setattr(mixture, "sample_times", lambda *a, **k: (
        torch.tensor([0.012, 0.6, 0.015, 0.9, 0.018, 0.3]), torch.tensor([True, False, True, False, True, False])))
    monkeypatch.setattr(mixture, "data_loss", lambda *a: (seen.__setitem__("weight", a[3]), data_loss(*a))[1])
    monkeypatch.setattr(mixture, "consistency_times",
                        lambda t, *a, **k: (seen.__setitem__("t", t), consistency_times(t, *a, **k))[1])
    x = torch.randint(5, (6, 8))
    terms = terms_of(s, x, torch.Generator().manual_seed(0))
    near = torch.tensor([True, False, True, False, True, False])
    assert (terms["consis"][near] == 0).all() and (terms["consis"][~near] != 0).all()
    assert (terms["distil"][~near] == 0).all()
    assert torch.equal(seen["t"], torch.tensor([0.6, 0.9, 0.3]))  # only consistency rows take a teacher step
    expected = mixture.data_weight(torch.tensor([0.012, 0.6, 0.015, 0.9, 0.018, 0.3]), s.losses[1].a_t.coeff, 20.0, 0.5)
    assert torch.allclose(seen["weight"], expected)  # a(t) of each example's own time


def test_gaussian_latent_components_are_the_dense_student_at_standard_normal_draws(teacher_ckpt):
    C, P = 5, 4  # an odd dimension is allowed: no sinusoid pairs
    s = student(teacher_ckpt, num_lambda=3, lambda_dim=C, position_dim=P, latent="gaussian").eval()
    perturb(s)
    x = torch.randint(5, (6, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ctx = Di4CContext(s, x, torch.Generator().manual_seed(1))
        comps = ctx.components  # (M, n, V)
        # Replay: the context's times and z_t, then B x M x C standard normals, lambda_{b, j} = row (b, j).
        g = torch.Generator().manual_seed(1)
        replay = Di4CContext(s, x, g)
        lam = torch.randn(6, 3, C, generator=g)
        for j in range(3):
            cond = lambda_features(lam[:, j], C, 8, P)  # (B, D, C + P): the same lambda at every position
            assert torch.equal(cond[:, 0, :C], lam[:, j]) and torch.equal(cond[:, 5, :C], lam[:, j])
            dense = s.denoise(replay.z_t, replay.t, cond)  # (B, D, V)
            torch.testing.assert_close(comps.log_probs[j], dense[ctx.mask], rtol=1e-5, atol=1e-5)
    # Sampling draws from the same prior: standard normal lambdas, shared by a sample's positions.
    feats = s.draw_lambda(4000, torch.Generator().manual_seed(2))  # (4000, D, C + P)
    assert feats.shape == (4000, 8, C + P) and torch.equal(feats[:, 0, :C], feats[:, 7, :C])
    assert feats[:, 0, :C].mean().abs() < 0.03 and (feats[:, 0, :C].std() - 1).abs() < 0.03


def test_sampling_draws_a_fresh_lambda_per_sample_and_step(teacher_ckpt, monkeypatch):
    s = student(teacher_ckpt)
    calls = []
    original = s.step_condition
    monkeypatch.setattr(s, "step_condition", lambda n, g: calls.append(original(n, g)) or calls[-1])
    out = s.generate(3, 5, generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (3, 8) and len(calls) == 5
    stacked = torch.stack(calls)  # (steps, samples, lambda_dim)
    assert stacked.shape == (5, 3, 16) and torch.unique(stacked[:, :, 0]).numel() == 15


def test_hybrid_sampler_uses_the_teacher_for_the_last_steps(teacher_ckpt, monkeypatch):
    s = student(teacher_ckpt, hybrid_teacher_steps=2)
    who = []
    teacher_denoise, student_denoise = s.teacher.denoise, s.denoise
    monkeypatch.setattr(s.teacher, "denoise", lambda z, t: who.append(("teacher", t[0].item())) or teacher_denoise(z, t))
    monkeypatch.setattr(s, "denoise", lambda z, t, c: who.append(("student", t[0].item())) or student_denoise(z, t, c))
    s.generate(4, 5, generator=torch.Generator().manual_seed(0))
    assert [w for w, _ in who] == ["student"] * 3 + ["teacher"] * 2
    assert [round(t, 3) for _, t in who] == [1.0, 0.8, 0.6, 0.4, 0.2]


def test_checkpoint_holds_no_teacher_and_reloads(teacher_ckpt, tmp_path):
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 3, "limit_val_batches": 1, "enable_progress_bar": False,
                    "enable_model_summary": False, "default_root_dir": str(tmp_path),
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"save_last": True}}]},
        "model": {"class_path": "lightning_ddd.modules.MixtureStudent",
                  "init_args": {"teacher_ckpt": teacher_ckpt, "mixture": {"num_lambda": 2, "lambda_dim": 8}}},
        "data": {"class_path": "MarkovChain",
                 "init_args": {"vocab_size": 5, "seq_len": 8, "num_train": 48, "num_val": 32, "batch_size": 16}},
    }
    path = tmp_path / "di4c.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(["fit", "-c", str(path)])
    metrics = cli.trainer.callback_metrics
    for key in ["train/loss", "train/loss_distil", "train/loss_data", "train/loss_consis", "val/loss"]:
        assert key in metrics and torch.isfinite(metrics[key]), key
    (ckpt_path,) = glob.glob(str(tmp_path / "**" / "last.ckpt"), recursive=True)
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert not any("teacher" in key for key in ckpt["state_dict"])
    assert any("cond_proj" in key for key in ckpt["state_dict"])
    teacher_params = sum(p.numel() for p in cli.model.teacher.parameters())
    assert sum(v.numel() for v in ckpt["state_dict"].values()) < 2 * teacher_params
    from lightning_ddd.checkpoints import file_sha256

    assert ckpt["teacher_ckpt"] == teacher_ckpt and ckpt["teacher_sha256"] == file_sha256(teacher_ckpt)
    reloaded = MixtureStudent.load_from_checkpoint(ckpt_path)
    z = torch.full((2, 8), 5)
    cond = reloaded.draw_lambda(2, torch.Generator().manual_seed(0))
    assert torch.equal(reloaded.denoise(z, None, cond), cli.model.denoise(z, None, cond))
    # Resuming rebuilds the student from its hyperparameters, which carry the teacher's hash.
    assert reloaded.hparams.teacher_sha256 == file_sha256(teacher_ckpt)
    with pytest.raises(ValueError, match="sha256"):
        student(teacher_ckpt, num_lambda=2, lambda_dim=8, teacher_sha256="0" * 64)
