"""D-MMD: the loss maths against hand-derived formulas, and the student module through the real CLI."""

import glob
import os

import pytest
import torch
import yaml

from lightning_ddd.checkpoints import file_sha256
from lightning_ddd.cli import main
from lightning_ddd.diffusion import LogLinearSchedule, MaskedProcess
from lightning_ddd.diffusion import dmmd
from lightning_ddd.diffusion.likelihood import estimate_nll
from lightning_ddd.diffusion.step_times import draw_step_times
from lightning_ddd.metrics.entropy import unigram_entropy
from lightning_ddd.modules import DMMDStudent
from lightning_ddd.modules.dmmd_student import DMMDSettings
from lightning_ddd.modules.student_losses import DMMDAuxiliaryLoss, DMMDContext, DMMDGeneratorLoss, DMMDMarginalLoss
from lightning_ddd.nn.transformer import sinusoids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TEACHER = os.path.join(ROOT, "tests", "configs", "tiny_teacher.yaml")
TINY_DMMD = os.path.join(ROOT, "tests", "configs", "tiny_dmmd.yaml")


def random_log_probs(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(*shape, generator=g, dtype=torch.float64) * 2, dim=-1)


# ---- pure maths ------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_positions", [False, True])
def test_generator_gradient_is_the_analytic_one(use_positions):
    B, D, V = 2, 3, 4
    logits = torch.randn(B, D, V, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    logits.requires_grad_(True)
    l_phi = random_log_probs(B, D, V, seed=2).requires_grad_(True)
    l_theta = random_log_probs(B, D, V, seed=3).requires_grad_(True)
    weight = torch.tensor([0.5, 3.0], dtype=torch.float64)
    positions = torch.tensor([[True, False, True], [False, True, True]]) if use_positions else None
    p = torch.softmax(logits, dim=-1)
    dmmd.generator_loss(p, l_phi, l_theta, weight, positions).sum().backward()

    # By hand: d/da_j sum_c p_c g_c = p_j (g_j - sum_c p_c g_c), g = l_phi - l_theta, times w, zero off positions.
    with torch.no_grad():
        q = torch.softmax(logits, dim=-1)
        g = l_phi - l_theta
        expected = weight[:, None, None] * q * (g - (q * g).sum(-1, keepdim=True))
        if positions is not None:
            expected = expected * positions[..., None]
    torch.testing.assert_close(logits.grad, expected.to(logits.grad.dtype))
    assert l_phi.grad is None and l_theta.grad is None  # the student is the only one pushed by L_GEN


def test_generator_loss_value():
    p = torch.tensor([[[0.25, 0.75]]])
    l_phi, l_theta = torch.tensor([[[-1.0, -2.0]]]), torch.tensor([[[-3.0, -0.5]]])
    # 2 * (0.25 * (-1 + 3) + 0.75 * (-2 + 0.5)) = 2 * (0.5 - 1.125)
    assert dmmd.generator_loss(p, l_phi, l_theta, torch.tensor([2.0])).item() == pytest.approx(-1.25)


def test_fixed_point_gives_zero_loss_and_zero_gradient():
    B, D, V = 3, 5, 6
    l_theta = random_log_probs(B, D, V, seed=4)
    student_logits = l_theta.clone().requires_grad_(True)  # student's x-prediction = teacher's
    aux_logits = l_theta.clone().requires_grad_(True)  # auxiliary = teacher
    weight = torch.rand(B, dtype=torch.float64) + 0.5
    p = torch.softmax(student_logits, dim=-1)
    aux = torch.log_softmax(aux_logits, dim=-1)
    gen = dmmd.generator_loss(p, aux, l_theta, weight)
    gen.sum().backward()
    assert gen.abs().max() < 1e-6
    assert student_logits.grad.abs().max() < 1e-6  # the losses compute in fp32
    # L_AUX's gradient w.r.t. the logits is w (2 softmax - y - p_theta): zero when y = p_theta = p_phi.
    dmmd.auxiliary_loss(aux, l_theta, dmmd.aux_targets(p, None, "soft"), weight).sum().backward()
    assert aux_logits.grad.abs().max() < 1e-6
    # and away from the fixed point both gradients are clearly non-zero
    other = random_log_probs(B, D, V, seed=5)
    logits = other.clone().requires_grad_(True)
    dmmd.generator_loss(torch.softmax(logits, -1), aux.detach(), other.flip(-1), weight).sum().backward()
    assert logits.grad.abs().max() > 1e-3


def test_auxiliary_minimiser_is_the_average_of_target_and_teacher():
    y = torch.softmax(torch.randn(1, 2, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64), -1)
    l_theta = random_log_probs(1, 2, 5, seed=6)

    def grad_at(probs):
        logits = probs.log().clone().requires_grad_(True)
        dmmd.auxiliary_loss(torch.log_softmax(logits, -1), l_theta, y, torch.ones(1)).sum().backward()
        return logits.grad

    # L_AUX is convex in the logits, so a zero gradient marks its minimum: p_phi = (y + p_theta) / 2.
    assert grad_at((y + l_theta.exp()) / 2).abs().max() < 1e-6
    assert grad_at(l_theta.exp()).abs().max() > 1e-2  # the teacher alone is not the minimiser
    assert grad_at(y).abs().max() > 1e-2


def test_no_nan_at_unmasked_positions():
    process = MaskedProcess(4)
    z_s = torch.tensor([[4, 1, 4, 0]])  # positions 1 and 3 are visible: carried, log-probs 0 / -inf there
    logits = torch.randn(1, 4, 4, requires_grad=True)
    carried = process.x0_log_probs(torch.randn(1, 4, 4), z_s)  # teacher-like, -inf at visible positions
    aux_logits = torch.randn(1, 4, 4, requires_grad=True)
    aux = process.x0_log_probs(aux_logits, z_s)
    assert torch.isinf(carried).any()
    naive = (torch.softmax(logits, -1) * (aux - carried)).sum()
    assert torch.isnan(naive)  # what the position restriction protects against
    positions = dmmd.loss_positions(z_s, process)
    weight = torch.ones(1)
    gen = dmmd.generator_loss(torch.softmax(logits, -1), aux, carried, weight, positions)
    target = dmmd.aux_targets(torch.softmax(logits, -1), z_s.clamp_max(3), "hard")
    aux_loss = dmmd.auxiliary_loss(aux, carried, target, weight, positions)
    (gen + aux_loss).sum().backward()
    assert torch.isfinite(gen).all() and torch.isfinite(aux_loss).all()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(aux_logits.grad).all()
    assert logits.grad[0, [1, 3]].abs().max() == 0 and aux_logits.grad[0, [1, 3]].abs().max() == 0
    assert aux_logits.grad[0, [0, 2]].abs().max() > 0


def test_soft_and_hard_targets():
    p = torch.softmax(torch.randn(2, 3, 4), -1)
    x = torch.tensor([[0, 3, 1], [2, 2, 0]])
    assert torch.equal(dmmd.aux_targets(p, x, "soft"), p)
    assert torch.equal(dmmd.aux_targets(p, x, "hard"), torch.nn.functional.one_hot(x, 4).float())
    # The hard target is the soft one in expectation: so is L_AUX (it is linear in y).
    many = torch.distributions.Categorical(probs=p).sample((20000,))  # (N, 2, 3)
    hard_mean = torch.nn.functional.one_hot(many, 4).float().mean(0)
    torch.testing.assert_close(hard_mean, p, atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="soft"):
        dmmd.aux_targets(p, x, "mixed")


def test_soft_top_p_shifts_the_tail_by_delta():
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    out = dmmd.soft_top_p(lp, 0.8, 2.0)  # nucleus {0.5, 0.3}: the tail loses exactly 2 nats before renormalising
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(1))
    diff = lp - out
    torch.testing.assert_close(diff[0, 2:] - diff[0, :2].mean(), torch.full((2,), 2.0))
    torch.testing.assert_close(diff[0, 0], diff[0, 1])
    assert torch.equal(dmmd.soft_top_p(lp, 1.0), lp)
    carried = torch.tensor([[0.0, -float("inf"), -float("inf")]])
    assert torch.equal(dmmd.shape_teacher(carried, 0.7, 0.5), carried)  # a visible token stays certain


def test_draw_times_and_weight():
    s, t = dmmd.draw_times(10000, 4, torch.Generator().manual_seed(0))
    assert s.min() > 0 and s.max() <= 1 and t.max() <= 1
    assert (t >= s).all() and (t - s).max() <= 0.25 and (t - s).max() > 0.2
    assert s.mean().item() == pytest.approx(0.5, abs=0.02)
    w = dmmd.loss_weight(LogLinearSchedule(), torch.tensor([0.25, 0.5]))
    torch.testing.assert_close(w, torch.tensor([4.0, 2.0]))
    torch.testing.assert_close(dmmd.loss_weight(LogLinearSchedule(), torch.tensor([0.25]), "constant"), torch.ones(1))


# ---- the module through the CLI ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    main(["fit", "-c", TINY_TEACHER, "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "1"])
    (path,) = glob.glob(str(root / "**" / "last.ckpt"), recursive=True)
    return path


def fit_student(root, teacher_ckpt, *extra):
    return main(["fit", "-c", TINY_DMMD, "--trainer.default_root_dir", str(root),
                 "--model.init_args.teacher_ckpt", teacher_ckpt, *extra])


def test_fresh_student_sits_at_the_fixed_point(teacher_ckpt):
    model = DMMDStudent(teacher_ckpt, dmmd=DMMDSettings(noise_dim=4))
    x = torch.randint(5, (8, 8), generator=torch.Generator().manual_seed(0))
    out = model.compute_losses(x, torch.Generator().manual_seed(1), trains="student")
    out["loss_gen"].backward()
    assert out["loss_gen"].abs().item() < 1e-6 and out["aux_teacher_gap"].abs().item() < 1e-6
    grads = [p.grad.abs().max() for p in model.backbone.parameters() if p.grad is not None]
    assert grads and max(grads) < 1e-6


def test_resume_continues_exactly(teacher_ckpt, tmp_path):
    straight = fit_student(tmp_path / "straight", teacher_ckpt, "--trainer.max_epochs", "3")
    fit_student(tmp_path / "first", teacher_ckpt, "--trainer.max_epochs", "1")
    (ckpt,) = glob.glob(str(tmp_path / "first" / "**" / "last.ckpt"), recursive=True)
    assert torch.load(ckpt, weights_only=False)["dmmd_iteration"] == 3  # stops between a student/aux pair
    resumed = fit_student(tmp_path / "resumed", teacher_ckpt, "--trainer.max_epochs", "3", "--ckpt_path", ckpt)
    assert straight.model.iteration == resumed.model.iteration == 9
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert {k.split(".")[0] for k in a} == {"backbone", "aux_backbone"}
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for opt_a, opt_b in zip(straight.trainer.optimizers, resumed.trainer.optimizers):
        for sa, sb in zip(opt_a.state.values(), opt_b.state.values()):
            assert torch.equal(sa["exp_avg"], sb["exp_avg"])


def test_checkpoint_has_no_teacher_and_records_its_hash(teacher_ckpt, tmp_path):
    cli = fit_student(tmp_path, teacher_ckpt, "--trainer.max_epochs", "1")
    (ckpt,) = glob.glob(str(tmp_path / "**" / "last.ckpt"), recursive=True)
    state = torch.load(ckpt, weights_only=False)
    teacher_keys = set(torch.load(teacher_ckpt, weights_only=False)["state_dict"])
    assert all(k.startswith(("backbone.", "aux_backbone.")) for k in state["state_dict"])
    assert len(state["state_dict"]) > len(teacher_keys)  # student (with its noise input) + auxiliary, no teacher
    assert state["teacher_sha256"] == state["hyper_parameters"]["teacher_sha256"] == file_sha256(teacher_ckpt)
    (hparams,) = glob.glob(str(tmp_path / "**" / "hparams.yaml"), recursive=True)
    with open(hparams) as f:
        assert yaml.safe_load(f)["teacher_sha256"] == file_sha256(teacher_ckpt)  # what a reader of the run sees
    assert len(state["optimizer_states"]) == 2 and len(state["lr_schedulers"]) == 2
    assert not {"optimizer", "aux_optimizer", "lr_scheduler", "aux_lr_scheduler"} & set(state["hyper_parameters"])
    with pytest.raises(ValueError, match="original teacher"):  # a resumed student checks its teacher file
        DMMDStudent(teacher_ckpt, teacher_sha256="0" * 64)
    # It samples in k steps through the shared hook, with fresh seeded noise at every step.
    model = cli.model.eval()
    first = model.generate(6, 2, generator=torch.Generator().manual_seed(0))
    again = model.generate(6, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first.tokens, again.tokens) and (first.nfe == 2).all()
    assert model.step_condition(6, None).shape == (6, 8, 4)


def test_uniform_student_needs_hard_targets(teacher_ckpt, tmp_path):
    main(["fit", "-c", TINY_TEACHER, "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "1",
          "--model.init_args.process", "UniformProcess", "--model.init_args.loss", "UniformELBO",
          "--model.init_args.val_loss", "UniformELBO", "--model.init_args.backbone.init_args.time_conditioning", "true",
          "--trainer.limit_val_batches", "0"])
    (uniform,) = glob.glob(str(tmp_path / "**" / "last.ckpt"), recursive=True)
    with pytest.raises(ValueError, match="hard"):
        DMMDStudent(uniform, losses=[DMMDGeneratorLoss(), DMMDAuxiliaryLoss(target="soft")])
    student = DMMDStudent(uniform)
    aux_target = student.losses[1].resolved_target(student.process)
    assert aux_target == "hard" and student.noise_dim == 0 and student.backbone.time_conditioning
    out = student.compute_losses(torch.randint(5, (4, 8)), torch.Generator().manual_seed(0), trains="auxiliary")
    out["loss_aux"].backward()
    assert all(torch.isfinite(v) for v in out.values())
    masked = DMMDStudent(teacher_ckpt)
    assert masked.losses[1].resolved_target(masked.process) == "soft" and masked.noise_dim > 0


# ---- validation: sample quality on fixed noise ----------------------------------------------------------


def test_validation_scores_k_step_samples_with_the_teacher(teacher_ckpt):
    model = DMMDStudent(teacher_ckpt, dmmd=DMMDSettings(num_steps=2, noise_dim=4)).eval()
    x = torch.zeros(32, 8, dtype=torch.long)  # only the batch size is used: one sample per validation sequence
    out = model.validation_losses(x, torch.Generator().manual_seed(3))
    assert set(out) == {"teacher_nll", "entropy"}
    again = model.validation_losses(x, torch.Generator().manual_seed(3))
    assert all(torch.equal(out[k], again[k]) for k in out)  # fixed noise: every validation scores the same samples
    # The same samples scored by the teacher's own bound (its val_loss, its val_num_draws), per token.
    g = torch.Generator().manual_seed(3)
    tokens = model.generate(32, 2, generator=g).tokens
    teacher = model.teacher
    nll = estimate_nll(teacher.denoise, tokens, teacher.process, teacher.val_loss, teacher.val_num_draws, g)
    torch.testing.assert_close(out["teacher_nll"], (nll / 8).float().mean())
    torch.testing.assert_close(out["entropy"], unigram_entropy(tokens, 5).float().mean())
    several = DMMDStudent(teacher_ckpt, dmmd=DMMDSettings(num_steps=2, noise_dim=4, val_steps=[1, 2])).eval()
    both = several.validation_losses(x, torch.Generator().manual_seed(3))
    assert set(both) == {"teacher_nll", "entropy", "teacher_nll_1steps", "entropy_1steps", "teacher_nll_2steps",
                         "entropy_2steps"}
    torch.testing.assert_close(both["teacher_nll"], (both["teacher_nll_1steps"] + both["teacher_nll_2steps"]) / 2)


def test_validate_runs_on_a_student_and_test_is_not_a_subcommand(teacher_ckpt, tmp_path):
    fit_student(tmp_path, teacher_ckpt, "--trainer.max_epochs", "1")
    (ckpt,) = glob.glob(str(tmp_path / "**" / "last.ckpt"), recursive=True)
    cli = main(["validate", "-c", TINY_DMMD, "--model.init_args.teacher_ckpt", teacher_ckpt, "--ckpt_path", ckpt,
                "--trainer.default_root_dir", str(tmp_path / "validate")])
    assert torch.isfinite(cli.trainer.callback_metrics["val/teacher_nll"])
    for subcommand in ("test", "predict"):
        with pytest.raises(SystemExit):  # argparse: invalid choice, with the list of valid ones
            main([subcommand, "-c", TINY_DMMD])


# ---- the step-aware student ---------------------------------------------------------------------------------


def test_step_times_cover_the_range_log_uniformly():
    s, t = draw_step_times(200_000, 2, 16, torch.Generator().manual_seed(0))
    gap = t - s
    kappa = 1 / gap
    assert s.min() > 0 and t.max() <= 1 and kappa.min() >= 2 - 1e-9 and kappa.max() <= 16 + 1e-9
    for lo, hi in [(2, 4), (4, 8), (8, 16)]:  # log-uniform: a third of the draws in each octave
        assert ((kappa >= lo) & (kappa < hi)).double().mean().item() == pytest.approx(1 / 3, abs=0.005)
    u = s / (1 - gap)  # given the gap, s is uniform on (0, 1 - gap]
    assert u.mean().item() == pytest.approx(0.5, abs=0.005)
    assert (u < 0.1).double().mean().item() == pytest.approx(0.1, abs=0.003)
    s, t = draw_step_times(5, 4, 4, torch.Generator().manual_seed(0))  # one step count: exactly its step
    torch.testing.assert_close(t - s, torch.full((5,), 0.25, dtype=torch.float64))
    with pytest.raises(ValueError, match="min_steps <= max_steps"):
        draw_step_times(1, 8, 4)


def test_per_k_context_draws_the_papers_times_and_noise(teacher_ckpt):
    model = DMMDStudent(teacher_ckpt, dmmd=DMMDSettings(num_steps=2, noise_dim=4))
    x = torch.randint(5, (6, 8), generator=torch.Generator().manual_seed(0))
    ctx = DMMDContext(model, x, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # the same stream by hand: times, z_t, then the noise
    s, t = dmmd.draw_times(6, 2, g)
    z_t = model.process.corrupt(x, t, g)
    noise = torch.randn(6, 8, 4, generator=g)
    assert torch.equal(ctx.s, s) and torch.equal(ctx.t, t) and torch.equal(ctx.z_t, z_t) and torch.equal(ctx.noise, noise)


def test_step_aware_student_starts_as_the_teacher_and_is_told_its_step(teacher_ckpt, monkeypatch):
    settings = DMMDSettings(step_aware=True, min_steps=2, max_steps=8, step_dim=8, noise_dim=4)
    model = DMMDStudent(teacher_ckpt, dmmd=settings).eval()
    assert model.val_steps == [2, 8] and model.backbone.cond_dim == 12
    with pytest.raises(ValueError, match="step-aware"):
        model.step_condition(3, None)  # a caller that does not say which step
    cond = model.step_condition(3, torch.Generator().manual_seed(0), t=0.5, s=0.25)
    by_hand = torch.cat([sinusoids(torch.full((3,), 500.0), 4), sinusoids(torch.full((3,), 250.0), 4)], -1)
    assert cond.shape == (3, 8, 12) and torch.equal(cond[..., 4:], by_hand[:, None].expand(3, 8, 8))
    z = torch.full((3, 8), 5)  # all masked
    torch.testing.assert_close(model.denoise(z, None, cond), model.teacher.denoise(z, None))  # zero-initialised
    steps = []
    features = model.step_features
    monkeypatch.setattr(model, "step_features", lambda t, s: steps.append((t[0].item(), s[0].item())) or features(t, s))
    model.generate(2, 4, generator=torch.Generator().manual_seed(0))
    assert steps == [(1.0, 0.75), (0.75, 0.5), (0.5, 0.25), (0.25, 0.0)]
    with pytest.raises(ValueError, match="min_steps"):
        DMMDSettings(step_aware=True, min_steps=4, max_steps=2)


def test_step_aware_student_trains_and_uses_its_step(teacher_ckpt, tmp_path):
    cli = fit_student(tmp_path, teacher_ckpt, "--trainer.max_epochs", "2", "--model.init_args.dmmd.step_aware", "true",
                      "--model.init_args.dmmd.max_steps", "8", "--model.init_args.dmmd.step_dim", "8")
    metrics = cli.trainer.callback_metrics
    for key in ("val/teacher_nll", "val/teacher_nll_2steps", "val/teacher_nll_8steps", "val/entropy_8steps"):
        assert torch.isfinite(metrics[key]), key
    model = cli.model.eval()
    z = torch.full((4, 8), 5)
    noise = model.draw_noise(4, torch.Generator().manual_seed(0))
    two, eight = (model.draw_condition(4, None, torch.full((4,), 1.0), torch.full((4,), 1.0 - 1 / k)) for k in (2, 8))
    two[..., :4], eight[..., :4] = noise, noise  # the same noise, different steps
    assert not torch.allclose(model.denoise(z, None, two), model.denoise(z, None, eight))  # the step is an input now


# ---- the marginal term ------------------------------------------------------------------------------


def test_marginal_term_is_the_squared_gap_of_the_noise_average_without_bias():
    """Enumerate a noise with three outcomes: the term averaged over independent pairs is
    w(t) sum_d ||E p[d] - r[d]||^2 exactly, while the same-draw square adds the noise's variance."""
    g = torch.Generator().manual_seed(0)
    B, D, V, K = 3, 4, 5, 3
    predicted = torch.rand(B, D, generator=g) < 0.6
    predicted[:, 0] = True
    n = int(predicted.sum())
    P = random_log_probs(K, n, V, seed=1).exp()  # (K, n, V): the student's x-prediction per noise outcome
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    r = random_log_probs(n, V, seed=2).exp()  # the teacher at z_t
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)

    def term(i, j):
        ctx = type("Ctx", (), dict(x=torch.zeros(B, D, dtype=torch.long), predicted=predicted, p=P[i],
                                   second_p=P[j], teacher_probs_t=r, weight_t=w))()
        return DMMDMarginalLoss(weight=2.0)(ctx)  # (B,)

    mean = sum(pi[i] * pi[j] * term(i, j) for i in range(K) for j in range(K))
    gap = ((pi[:, None, None] * P).sum(0) - r).square().sum(-1)  # (n,)
    by_hand = 2.0 * w * torch.zeros(B, D, dtype=torch.float64).masked_scatter(predicted, gap).sum(-1)
    torch.testing.assert_close(mean, by_hand, rtol=1e-12, atol=1e-14)
    same_draw = sum(pi[i] * term(i, i) for i in range(K))
    assert (same_draw > by_hand + 1e-3).all()  # the naive square is biased upwards by the variance


def test_marginal_term_is_zero_at_the_teacher_and_trains_the_noise_input(teacher_ckpt):
    losses = [DMMDGeneratorLoss(), DMMDMarginalLoss(weight=1.0), DMMDAuxiliaryLoss()]
    model = DMMDStudent(teacher_ckpt, dmmd=DMMDSettings(noise_dim=4), losses=losses)
    x = torch.randint(5, (8, 8), generator=torch.Generator().manual_seed(0))
    fresh = model.compute_losses(x, torch.Generator().manual_seed(1), trains="student")
    assert fresh["loss_marginal"].abs().item() < 1e-6  # the fresh student is the teacher: p = r
    with torch.no_grad():
        for p in model.backbone.cond_proj.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.5)
    ctx = DMMDContext(model, x, torch.Generator().manual_seed(1), trains="student")
    assert not torch.allclose(ctx.p, ctx.second_p)  # a second, independent noise draw at the same z_t
    model.zero_grad()
    out = model.compute_losses(x, torch.Generator().manual_seed(1), trains="student")
    out["loss_marginal"].backward()
    assert max(p.grad.abs().max() for p in model.backbone.cond_proj.parameters()) > 0
    assert all(p.grad is None for p in model.aux_backbone.parameters())  # the auxiliary is not this term's
    aux = model.compute_losses(x, torch.Generator().manual_seed(1), trains="auxiliary")
    assert torch.equal(aux["loss"], aux["loss_aux"])  # the auxiliary's objective leaves the term out
