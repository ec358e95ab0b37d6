"""The memory-lean training paths equal the plain maths: heads on selected positions, the one-node masked
log-softmax, the teacher bounds on masked rows, the chunked uniform ELBO (and its float64 grid), and the
packed mixture reductions with their in-place gradients. Everything is compared with a direct computation."""

import functools
import math

import pytest
import torch

from lightning_ddd.diffusion import CosineSchedule, MaskedProcess, UniformProcess
from lightning_ddd.diffusion import losses as teacher_losses
from lightning_ddd.diffusion import mixture
from lightning_ddd.diffusion.losses import AnyOrderLoss, LambdaDCE, TimeDCE, UniformELBO, posterior_kl
from lightning_ddd.modules import DiffusionTeacher
from lightning_ddd.modules.base import backbone_logits
from lightning_ddd.nn import DenoisingTransformer

V, D, B = 7, 9, 5


def teacher(uniform=False, schedule=None, seed=0):
    torch.manual_seed(seed)
    process = (lambda v: UniformProcess(v, schedule)) if uniform else MaskedProcess
    net = functools.partial(DenoisingTransformer, d_model=16, n_layers=1, n_heads=2, time_conditioning=uniform)
    model = DiffusionTeacher(V, D, process=process, backbone=net,
                             loss=UniformELBO(10) if uniform else TimeDCE())
    with torch.no_grad():  # away from the near-uniform init, so that every term is clearly non-zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


# ---- the backbone's head on selected positions -------------------------------------------------------------


def test_head_on_positions_equals_the_full_output_there():
    net = teacher().backbone
    g = torch.Generator().manual_seed(1)
    z = torch.randint(V + 1, (B, D), generator=g)
    positions = torch.rand(B, D, generator=g) < 0.4
    cond_net = DenoisingTransformer(V + 1, V, D, d_model=16, n_layers=1, n_heads=2, cond_dim=3)
    cond = torch.randn(B, D, 3, generator=g)
    for model, extra in ((net, ()), (cond_net, (None, cond))):
        full = model(z, *extra)  # (B, D, V)
        rows = model(z, *extra, positions=positions)  # (N, V)
        assert rows.shape == (int(positions.sum()), V)
        torch.testing.assert_close(rows, full[positions], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="positions must be a"):
        net(z, positions=positions[:, :3])


def test_backbones_without_positions_are_indexed():
    class Plain(torch.nn.Module):  # a released backbone: forward(z, t) only
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Embedding(V + 1, V)

        def forward(self, z, t=None):
            return self.head(z)

    z = torch.randint(V + 1, (B, D), generator=torch.Generator().manual_seed(2))
    positions = z == V
    net = Plain()
    assert torch.equal(backbone_logits(net, z, None, None, positions), net(z)[positions])


@pytest.mark.parametrize("uniform", [False, True])
def test_denoise_on_positions_equals_the_full_denoiser_there(uniform):
    model = teacher(uniform)
    g = torch.Generator().manual_seed(3)
    z = torch.randint(model.process.num_input_tokens, (B, D), generator=g)
    t = torch.rand(B, generator=g)
    positions = torch.rand(B, D, generator=g) < 0.5
    positions[0, 0] = bool(z[0, 0] != V)  # a carried position among the rows: one-hot there
    full = model.denoise(z, t)
    rows = model.denoise(z, t, positions=positions)
    torch.testing.assert_close(rows, full[positions], rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model.denoise(z, t, positions=positions), rows.detach(), rtol=0, atol=0)


# ---- x0_log_probs keeps one tensor, with the plain ops' values and gradients ---------------------------------


def test_carried_log_softmax_equals_the_plain_ops():
    process = MaskedProcess(V)
    g = torch.Generator().manual_seed(4)
    z = torch.randint(V + 1, (B, D), generator=g)
    z[:, :3] = V  # some masked positions everywhere
    logits = torch.randn(B, D, V, generator=g, dtype=torch.float64) * 3
    weights = torch.randn(B, D, V, generator=g, dtype=torch.float64)

    def plain(x):  # the former implementation: log_softmax, then one-hot carried rows by masked_fill and scatter
        carried, index = (z != V).unsqueeze(-1), z.clamp_max(V - 1).unsqueeze(-1)
        lp = torch.log_softmax(x, -1)
        out = lp.masked_fill(carried, -math.inf)
        return out.scatter(-1, index, torch.where(carried, 0.0, lp.gather(-1, index)))

    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    out_a, out_b = process.x0_log_probs(a, z).double(), plain(b)
    assert torch.equal(out_a, out_b.to(out_a.dtype)) or torch.allclose(out_a, out_b, atol=1e-6)
    finite = out_b.isfinite()
    (torch.where(finite, out_a, 0.0) * weights).sum().backward()
    (torch.where(finite, out_b, 0.0) * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)
    assert a.grad[z != V].abs().max() == 0  # carried rows are constants


# ---- teacher bounds on the masked rows -----------------------------------------------------------------


@pytest.mark.parametrize("loss", [TimeDCE(), TimeDCE(t_min=0.3), LambdaDCE(), AnyOrderLoss()], ids=repr)
def test_masked_bounds_on_rows_equal_the_dense_bound(loss):
    model = teacher()
    x = torch.randint(V, (B, D), generator=torch.Generator().manual_seed(5))

    def run(denoiser):
        model.zero_grad()
        value = loss(denoiser, x, model.process, torch.Generator().manual_seed(6))
        value.sum().backward()
        return value.detach(), grads(model)

    rows_value, rows_grad = run(model.denoise)  # takes positions: the masked rows only
    dense_value, dense_grad = run(lambda z, t: model.denoise(z, t))  # no positions: (B, D, V)
    assert teacher_losses.takes_positions(model.denoise) and not teacher_losses.takes_positions(lambda z, t: z)
    torch.testing.assert_close(rows_value, dense_value, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rows_grad, dense_grad, rtol=1e-5, atol=1e-6)


# ---- the uniform ELBO: float64 grid, chunked posterior KL, closed-form prior KL -------------------------------


def test_uniform_elbo_scores_exact_grid_steps(monkeypatch):
    seen = {}
    real = teacher_losses.posterior_kl
    monkeypatch.setattr(teacher_losses, "posterior_kl",
                        lambda process, lp, z, x, s, t: seen.update(s=s, t=t) or real(process, lp, z, x, s, t))
    T = 1000
    model = teacher(uniform=True)
    x = torch.randint(V, (64, D), generator=torch.Generator().manual_seed(7))
    UniformELBO(T)(model.denoise, x, model.process, torch.Generator().manual_seed(8))
    s, t = seen["s"], seen["t"]
    assert s.dtype == t.dtype == torch.float64
    i = torch.round(t * T)
    assert torch.equal(t, i / T)  # the grid point itself, in float64
    step = (t - s)[i >= 2]
    # One step of the grid to float64 round-off; in float32 (i / T) it was short by up to 1.3e-5 of its length.
    assert ((step * T - 1).abs() < 1e-12).all()
    assert ((i.float() / T).double() - i / T).abs().max() * T > 1e-6  # what float32 got wrong


def test_chunked_posterior_kl_equals_one_chunk(monkeypatch):
    model = teacher(uniform=True, schedule=CosineSchedule(eps=0.05))
    g = torch.Generator().manual_seed(9)
    x = torch.randint(V, (B, D), generator=g)
    z = torch.randint(V, (B, D), generator=g)
    t = torch.rand(B, generator=g, dtype=torch.float64) * 0.9 + 0.1
    s = t - 0.05
    log_p = torch.log_softmax(torch.randn(B, D, V, generator=g), -1)

    def run(chunk):
        monkeypatch.setattr(teacher_losses, "KL_CHUNK_ELEMENTS", chunk)
        lp = log_p.clone().requires_grad_()
        kl = posterior_kl(model.process, lp, z, x, s, t)
        (kl * torch.arange(D)).sum().backward()
        return kl.detach(), lp.grad

    one, one_grad = run(1 << 30)
    many, many_grad = run(3 * V)  # 3 rows per chunk: 15 chunks
    torch.testing.assert_close(many, one, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(many_grad, one_grad, rtol=1e-6, atol=1e-7)
    # and it is the KL between the exact and the model's posterior (process.posterior_probs)
    q = model.process.posterior_probs(z, torch.nn.functional.one_hot(x, V).double(), s, t)
    p = model.process.posterior_probs(z, log_p.double().exp(), s, t)
    torch.testing.assert_close(one, (q * (q.log() - p.log())).sum(-1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("schedule", [None, CosineSchedule(eps=0.05)])
def test_uniform_prior_kl_is_the_dense_formula(schedule):
    process = UniformProcess(V, schedule)
    x = torch.randint(V, (B, D), generator=torch.Generator().manual_seed(10))
    q = process.marginal_probs(x, 1.0).double()
    torch.testing.assert_close(process.prior_kl(x), torch.xlogy(q, q * V).sum((-1, -2)), rtol=1e-12, atol=1e-12)


# ---- packed mixture reductions ------------------------------------------------------------------------


def components(seed=0, m=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(B, m, D, V, generator=g, dtype=dtype) * 2, -1)
    mask = torch.rand(B, D, generator=g) < 0.6
    mask[1] = False  # a sequence with nothing to score
    return lp, mask


def test_packed_components_match_the_dense_definitions():
    lp, mask = components()
    comps = mixture.Components.from_dense(lp, mask)
    assert comps.log_probs.shape == (4, int(mask.sum()), V)
    # log Pbar by its definition
    dense_bar = torch.logsumexp(lp, 1) - math.log(4)
    torch.testing.assert_close(comps.log_marginal, dense_bar[mask])
    # log p̂(y) and C(y) by their definitions, summing over the masked positions only
    y = torch.randint(V, (B, 3, D), generator=torch.Generator().manual_seed(1))
    per_comp = torch.stack([(lp[:, j].gather(-1, y.transpose(1, 2)).transpose(1, 2) * mask[:, None]).sum(-1)
                            for j in range(4)])  # (M, B, N)
    ll = torch.logsumexp(per_comp, 0) - math.log(4)  # (B, N)
    independent = (dense_bar.gather(-1, y.transpose(1, 2)).transpose(1, 2) * mask[:, None]).sum(-1)
    torch.testing.assert_close(comps.log_likelihood(comps.target_rows(y)).T, ll)
    torch.testing.assert_close(comps.correlation(comps.target_rows(y)).T, ll - independent)
    # per-sequence sums put zeros where nothing is masked
    assert torch.equal(comps.sum_rows(torch.ones(int(mask.sum()), dtype=torch.float64)), mask.sum(-1).double())


def test_log_mean_exp_and_kl_gradients_are_the_builtin_ones(monkeypatch):
    lp, mask = components(seed=2)
    weights = torch.randn(int(mask.sum()), V, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    target = torch.log_softmax(torch.randn(int(mask.sum()), V, dtype=torch.float64), -1)
    for chunk in (1 << 22, V):  # one group of components, then one component per group
        monkeypatch.setattr(mixture, "CHUNK_ELEMENTS", chunk)
        a = lp.clone().requires_grad_()
        comps = mixture.Components.from_dense(a, mask)
        ((comps.log_marginal * weights).sum() + mixture.row_kl(target, comps.log_marginal).sum()).backward()
        b = lp.clone().requires_grad_()
        bar = torch.logsumexp(b.transpose(0, 1)[:, mask], 0) - math.log(4)
        p = target.exp()
        ((bar * weights).sum() + (p * (target - bar)).sum()).backward()
        torch.testing.assert_close(comps.log_marginal, bar, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


def test_distillation_as_kl_to_the_mean_log_probs_is_the_mean_of_the_kls():
    lp, mask = components(seed=4)
    teacher_lp = torch.log_softmax(torch.randn(B, D, V, dtype=torch.float64), -1)
    a = lp.clone().requires_grad_()
    value = mixture.distillation_loss(a, teacher_lp, mask)
    b = lp.clone().requires_grad_()
    p = teacher_lp.exp()[:, None]
    per_comp = (p * (teacher_lp[:, None] - b)).sum(-1)  # (B, M, D)
    expected = (per_comp * mask[:, None]).sum(-1).mean(1)
    torch.testing.assert_close(value, expected)
    value.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


# ---- the students' contexts --------------------------------------------------------------------------


def teacher_file(folder, uniform=False):
    """A checkpoint of ``teacher(uniform)`` as the CLI writes it (class paths), without training it."""
    import lightning

    model = teacher(uniform)
    hparams = {"_class_path": "lightning_ddd.modules.DiffusionTeacher", "vocab_size": V, "seq_len": D,
               "backbone": {"class_path": "lightning_ddd.nn.DenoisingTransformer",
                            "init_args": {"d_model": 16, "n_layers": 1, "n_heads": 2, "time_conditioning": uniform}},
               "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    if uniform:
        hparams.update(process={"class_path": "lightning_ddd.diffusion.UniformProcess"},
                       loss={"class_path": "lightning_ddd.diffusion.losses.UniformELBO"})
    path = str(folder / f"teacher-{'uniform' if uniform else 'masked'}.ckpt")
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams, "lightning_ddd_class": "DiffusionTeacher",
                "pytorch-lightning_version": lightning.__version__}, path)
    return path


@pytest.fixture(scope="module")
def teacher_paths(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teachers")
    return {uniform: teacher_file(folder, uniform) for uniform in (False, True)}


def di4c_student(path, num_lambda=3, position_dim=4):
    from lightning_ddd.modules import MixtureStudent
    from lightning_ddd.modules.mixture_student import MixtureSettings
    from lightning_ddd.modules.student_losses import Di4CConsistencyLoss, Di4CDataLoss, Di4CDistillationLoss

    losses = [Di4CDistillationLoss(), Di4CDataLoss(a_t=mixture.DataWeight(0.7, 20.0, 0.3)),
              Di4CConsistencyLoss(step=mixture.ConsistencyStep(teacher_grid_steps=4))]
    s = MixtureStudent(path, mixture=MixtureSettings(num_lambda=num_lambda, lambda_dim=8, position_dim=position_dim),
                       times=mixture.Di4CTimes(0.05, 0.4), losses=losses)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():  # give lambda an effect, as training would
        for p in s.backbone.cond_proj.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return s


@pytest.mark.parametrize("uniform", [False, True])
def test_di4c_terms_are_the_dense_maths(teacher_paths, uniform, monkeypatch):
    """Distillation and data terms against the dense (B, M, D, V) computation over the repeated batch, and the
    consistency term against its formula for given targets."""
    from lightning_ddd.modules.mixture_student import lambda_features
    from lightning_ddd.modules.student_losses import Di4CConsistencyLoss, Di4CContext

    s = di4c_student(teacher_paths[uniform])
    M = s.mixture.num_lambda
    x = torch.randint(V, (8, D), generator=torch.Generator().manual_seed(12))
    g = torch.Generator().manual_seed(13)
    ctx = Di4CContext(s, x, g)
    twin = torch.Generator().set_state(g.get_state())  # the lambdas are the next draws
    lam = torch.rand(8 * M, generator=twin)
    cond = lambda_features(lam, 8, D, 4)
    # Dense components of the repeated batch: row b * M + j is copy j of sequence b.
    dense = s.denoise(ctx.z_t.repeat_interleave(M, 0), ctx.t.repeat_interleave(M, 0), cond).view(8, M, D, V)
    mask = ctx.positions
    teacher_lp = s.teacher.denoise(ctx.z_t, ctx.t).detach()
    pt = teacher_lp.exp()
    safe = torch.where(mask[:, None, :, None], dense, torch.zeros_like(dense))  # carried rows hold -inf
    kl_j = (pt[:, None] * (torch.where(mask[..., None], teacher_lp, 0.0)[:, None] - safe)).sum(-1)  # (B, M, D)
    distil = torch.where(ctx.near, (kl_j * mask[:, None]).sum(-1).mean(1), 0.0)
    bar = torch.logsumexp(safe, 1) - math.log(M)  # (B, D, V)
    per_comp = (safe.gather(-1, x[:, None, :, None].expand(8, M, D, 1)).squeeze(-1) * mask[:, None]).sum(-1)
    corr = torch.logsumexp(per_comp, 1) - math.log(M) - (bar.gather(-1, x[..., None]).squeeze(-1) * mask).sum(-1)
    kl_bar = ((pt * (torch.where(mask[..., None], teacher_lp, 0.0) - bar)).sum(-1) * mask).sum(-1)
    data = -mixture.data_weight(ctx.t, 0.7, 20.0, 0.3) * corr + kl_bar

    # Consistency with fixed targets: R = mean_j Q_j of random components, y_j drawn from them.
    target = torch.log_softmax(torch.randn(8, M, D, V, generator=torch.Generator().manual_seed(14)), -1)
    y = torch.randint(V, (8, M, D), generator=torch.Generator().manual_seed(15))
    is_consis = ~ctx.near & mask.any(-1)

    def fixed_targets(self, ctx_, seqs):
        packed = mixture.Components(target.transpose(0, 1)[:, mask][:, is_consis[mask.nonzero()[:, 0]]],
                                    mask[seqs])
        return packed.log_marginal, y.transpose(1, 2)[mask][is_consis[mask.nonzero()[:, 0]]].T

    monkeypatch.setattr(Di4CConsistencyLoss, "targets", fixed_targets)
    q_bar = torch.logsumexp(target, 1) - math.log(M)
    per_comp_y = torch.stack([(safe.gather(-1, y[:, k, None, :, None].expand(8, M, D, 1)).squeeze(-1)
                               * mask[:, None]).sum(-1) for k in range(M)], 1)  # (B, N, M)
    corr_y = (torch.logsumexp(per_comp_y, -1) - math.log(M)
              - (bar.gather(-1, y.transpose(1, 2)).transpose(1, 2) * mask[:, None]).sum(-1))  # (B, N)
    kl_q = ((q_bar.exp() * (q_bar - bar)).sum(-1) * mask).sum(-1)
    consis = torch.where(is_consis, -corr_y.mean(1) + kl_q, 0.0)

    terms = s.loss_terms(ctx)
    for name, expected in (("distil", distil), ("data", data), ("consis", consis)):
        torch.testing.assert_close(terms[name], expected, rtol=1e-5, atol=2e-5, msg=name)
    assert (terms["consis"] != 0).any() and torch.equal(terms["data"] != 0, mask.any(-1))
    assert uniform or not mask.any(-1).all()  # sequences with nothing masked: skipped, and 0 in every term


@pytest.mark.parametrize("uniform", [False, True])
def test_di4c_teacher_step_has_the_posterior_law(teacher_paths, uniform):
    """z_u (x_hat drawn only where the step unmasks) has the law sum_x PT(x) q(z_u | z_t, x), independently per
    position: per-position and pairwise frequencies against the exact probabilities."""
    from lightning_ddd.modules.student_losses import Di4CConsistencyLoss, Di4CContext

    s = di4c_student(teacher_paths[uniform])
    x = torch.randint(V, (2, D), generator=torch.Generator().manual_seed(16))
    ctx = Di4CContext(s, x, torch.Generator().manual_seed(17))
    ctx.z_t = ctx.z_t.clone()
    if not uniform:
        ctx.z_t[0, :4] = V  # masked positions to unmask
        ctx.z_t[0, 4] = 2  # and a carried one
        ctx.mask = ctx.positions = ctx.z_t == V
    ctx.t = torch.tensor([0.7, 0.5])
    u = torch.tensor([0.45, 0.3])
    copies = 40_000
    z_u = Di4CConsistencyLoss.teacher_step(ctx, torch.tensor([0, 1]), u, copies).view(copies, 2, D)[:, 0]
    probs = s.process.posterior_probs(ctx.z_t[:1], s.teacher.denoise(ctx.z_t[:1], ctx.t[:1]).double().exp(),
                                      u[:1].double(), ctx.t[:1].double())[0]  # (D, V_in) exact
    K = s.process.num_input_tokens
    freq = torch.nn.functional.one_hot(z_u, K).double().mean(0)  # (D, K)
    se = (probs * (1 - probs) / copies).sqrt()
    assert ((freq - probs).abs() <= 5 * se + 1e-9).all()
    pair = torch.nn.functional.one_hot(z_u[:, 0] * K + z_u[:, 1], K * K).double().mean(0)
    exact = (probs[0][:, None] * probs[1][None]).reshape(-1)
    assert ((pair - exact).abs() <= 5 * (exact * (1 - exact) / copies).sqrt() + 1e-9).all()
    if not uniform:
        assert (z_u[:, 4] == 2).all()


def test_di4c_targets_average_the_student_and_draw_from_it(teacher_paths, monkeypatch):
    """log Qbar is the log-mean of the student's M outputs at the z_u's, and the y_j, one from each Q_j, have
    frequencies that average to Qbar."""
    from lightning_ddd.modules.student_losses import Di4CConsistencyLoss, Di4CContext

    s = di4c_student(teacher_paths[False], num_lambda=4000, position_dim=0)
    x = torch.randint(V, (3, D), generator=torch.Generator().manual_seed(18))
    ctx = Di4CContext(s, x, torch.Generator().manual_seed(19))
    ctx.z_t = ctx.z_t.clone()
    ctx.z_t[:, :5] = V
    ctx.mask = ctx.positions = ctx.z_t == V
    seqs = torch.tensor([0, 2])
    outputs = []
    denoise = s.denoise
    monkeypatch.setattr(s, "denoise", lambda *a, **k: outputs.append(denoise(*a, **k)) or outputs[-1])
    loss = Di4CConsistencyLoss(step=mixture.ConsistencyStep(teacher_grid_steps=4))
    monkeypatch.setattr(Di4CConsistencyLoss, "chunk_elements", 4000 * 7 * V)  # several groups of components
    q_bar, y = loss.targets(ctx, seqs)
    n_r = int(ctx.positions[seqs].sum())
    q = torch.cat(outputs).view(4000, n_r, V)  # every component's log Q_j at the rows
    assert len(outputs) > 1
    torch.testing.assert_close(q_bar, torch.logsumexp(q, 0) - math.log(4000), rtol=1e-5, atol=1e-5)
    freq = torch.nn.functional.one_hot(y, V).double().mean(0)  # (n_R, V)
    expected = q.double().exp().mean(0)
    assert ((freq - expected).abs() <= 5 * (expected * (1 - expected) / 4000).sqrt() + 1e-6).all()


def test_dmmd_sample_is_the_student_prediction_and_carries_tokens(teacher_paths, monkeypatch):
    """x_hat, drawn by inverse CDF at the predicted positions only, has the student's law there and z_t's
    token elsewhere; the losses and diagnostics read the loss rows only."""
    from lightning_ddd.modules import DMMDStudent
    from lightning_ddd.modules.dmmd_student import DMMDSettings
    from lightning_ddd.modules.student_losses import DMMDContext

    s = DMMDStudent(teacher_paths[False], dmmd=DMMDSettings(noise_dim=0))  # no noise: every row has one p
    N = 10_000
    z_fixed = torch.randint(V, (1, D), generator=torch.Generator().manual_seed(20))
    z_fixed[0, :4] = V
    monkeypatch.setattr(s.process, "corrupt", lambda x, t, g=None: z_fixed.expand(x.shape[0], D).clone())
    ctx = DMMDContext(s, torch.zeros(N, D, dtype=torch.long), torch.Generator().manual_seed(21), "student")
    assert ctx.log_p.shape == (4 * N, V)
    assert torch.equal(ctx.x_hat[:, 4:], z_fixed[:, 4:].expand(N, -1))
    p = ctx.p.view(N, 4, V)[0].double()  # (4, V) the same at every row
    freq = torch.nn.functional.one_hot(ctx.x_hat[:, :4], V).double().mean(0)
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / N).sqrt() + 1e-9).all()
    assert ctx.teacher_log_probs.shape == ctx.aux_log_probs.shape == (int(ctx.loss_rows.sum()), V)
    assert torch.equal(ctx.in_loss, ctx.loss_rows[ctx.predicted])
