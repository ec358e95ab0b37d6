"""The Di4C student's optional lambda encoder and ``Di4CPosteriorDataLoss``: the term against a dense
recomputation from its definition, the Gaussian KL against torch.distributions, and early errors."""

import glob
import math
import os

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from lightning_ddd.cli import main
from lightning_ddd.diffusion.mixture import DataWeight
from lightning_ddd.modules import MixtureStudent
from lightning_ddd.modules.mixture_student import MixtureSettings, lambda_features
from lightning_ddd.modules.student_losses import Di4CContext, Di4CDistillationLoss, Di4CPosteriorDataLoss
from lightning_ddd.nn.lambda_encoder import gaussian_kl_to_standard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TEACHER = os.path.join(ROOT, "tests", "configs", "tiny_teacher.yaml")
M, K, LAMBDA_DIM, POSITION_DIM = 3, 2, 8, 4


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    main(["fit", "-c", TINY_TEACHER, "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "1"])
    (path,) = glob.glob(str(root / "**" / "last.ckpt"), recursive=True)
    return path


def student(path, losses, encoder_dim=8):
    mix = MixtureSettings(num_lambda=M, lambda_dim=LAMBDA_DIM, position_dim=POSITION_DIM, encoder_dim=encoder_dim)
    s = MixtureStudent(path, mixture=mix, losses=losses)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # give lambda an effect, as training would (at the start the student ignores it)
        for p in s.backbone.cond_proj.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return s.eval()


def test_posterior_data_term_matches_its_definition_on_dense_tensors(teacher_ckpt):
    a_t = DataWeight(coeff=0.7, midpoint=0.3)
    loss = Di4CPosteriorDataLoss(weight=1.5, a_t=a_t, num_posterior=K)
    s = student(teacher_ckpt, [Di4CDistillationLoss(), loss])
    x = torch.randint(s.vocab_size, (6, s.seq_len), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        value = loss(Di4CContext(s, x, torch.Generator().manual_seed(2)))  # (B,)

        # Replay the same draws by hand: times and z_t (the context), M prior lambdas, then K posterior normals.
        g = torch.Generator().manual_seed(2)
        ctx = Di4CContext(s, x, g)
        z_t, t, masked = ctx.z_t, ctx.t, ctx.mask  # (B, D), (B,), (B, D)
        assert masked.any() and not masked.all()
        prior = torch.rand(x.shape[0], M, generator=g)  # (B, M)
        eps = torch.randn(x.shape[0], K, generator=g)  # (B, K)

        def dense(lam):  # (B,) lambdas → (B, D, V) student log-probs at every position
            return s.denoise(z_t, t, lambda_features(lam, LAMBDA_DIM, s.seq_len, POSITION_DIM))

        def at_x(log_probs):  # (B, D, V) → (B,) sum over masked positions of log P(x^d)
            return (log_probs.gather(-1, x[..., None])[..., 0] * masked).sum(-1)

        log_pbar = torch.logsumexp(torch.stack([dense(prior[:, j]) for j in range(M)]), 0) - math.log(M)
        teacher = s.teacher.denoise(z_t)  # (B, D, V)
        row_kl = torch.where(teacher > -math.inf, teacher.exp() * (teacher - log_pbar), 0.0).sum(-1)  # (B, D)
        teacher_kl = torch.where(masked, row_kl, 0.0).sum(-1)
        mu, log_sigma = s.lambda_encoder(x, z_t)
        lam = 0.5 * (1 + torch.erf((mu[:, None] + log_sigma.exp()[:, None] * eps) / math.sqrt(2)))  # Phi
        fit = torch.stack([at_x(dense(lam[:, k])) for k in range(K)]).mean(0)
        kl_q = kl_divergence(Normal(mu, log_sigma.exp()), Normal(0.0, 1.0)) * masked.any(-1)
        expected = 1.5 * (a_t(t) * (kl_q - fit + at_x(log_pbar)) + teacher_kl)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)


def test_gaussian_kl_matches_torch_distributions():
    mu, log_sigma = torch.tensor([0.0, 1.3, -0.4]), torch.tensor([0.0, -2.0, 0.7])
    torch.testing.assert_close(gaussian_kl_to_standard(mu, log_sigma),
                               kl_divergence(Normal(mu, log_sigma.exp()), Normal(0.0, 1.0)))
    assert gaussian_kl_to_standard(mu, log_sigma)[0] == 0  # q = prior


def test_encoder_trains_and_sampling_ignores_it(teacher_ckpt):
    s = student(teacher_ckpt, [Di4CDistillationLoss(), Di4CPosteriorDataLoss()]).train()
    x = torch.randint(s.vocab_size, (8, s.seq_len), generator=torch.Generator().manual_seed(3))
    s.compute_losses(x, torch.Generator().manual_seed(4))["loss"].backward()
    assert s.lambda_encoder.out.weight.grad.abs().sum() > 0  # the ELBO reaches the encoder
    with torch.no_grad():  # sampling draws lambda from the prior and never runs the encoder
        s.lambda_encoder.out.weight.fill_(float("nan"))
        out = s.generate(4, 2, generator=torch.Generator().manual_seed(5))
    assert out.tokens.shape == (4, s.seq_len)


def test_posterior_term_without_an_encoder_is_a_clear_error(teacher_ckpt):
    with pytest.raises(ValueError, match="encoder_dim > 0"):
        student(teacher_ckpt, [Di4CDistillationLoss(), Di4CPosteriorDataLoss()], encoder_dim=0)
    with pytest.raises(ValueError, match="num_posterior=0"):
        Di4CPosteriorDataLoss(num_posterior=0)
    with pytest.raises(ValueError, match="encoder_dim=-1"):
        MixtureSettings(encoder_dim=-1)
