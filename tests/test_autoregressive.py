"""The autoregressive evaluator LM: an exact, normalised density, causal, trainable and usable by the CLI."""

import glob
import itertools
import json
import os
from functools import partial

import pytest
import torch

from lightning_ddd.checkpoints import CheckpointError
from lightning_ddd.cli import main
from lightning_ddd.evaluation import load_ar_evaluator, load_evaluator
from lightning_ddd.metrics import ARModelEvaluator, GenerativePerplexity, GradientMoment
from lightning_ddd.modules import ARLanguageModel
from lightning_ddd.nn.causal import CausalTransformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_AR = os.path.join(ROOT, "tests", "configs", "tiny_ar.yaml")
TINY_TEACHER = os.path.join(ROOT, "tests", "configs", "tiny_teacher.yaml")


def tiny_model(vocab_size=3, seq_len=3, seed=0):
    torch.manual_seed(seed)
    backbone = partial(CausalTransformer, d_model=8, n_layers=1, n_heads=2)
    return ARLanguageModel(vocab_size, seq_len, backbone=backbone)


def all_sequences(vocab_size, seq_len):
    return torch.tensor(list(itertools.product(range(vocab_size), repeat=seq_len)))


def test_sequence_probabilities_sum_to_one():
    model = tiny_model()
    total = model.sequence_log_prob(all_sequences(3, 3)).double().exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-5)


def test_predictions_depend_only_on_earlier_tokens():
    model = tiny_model(vocab_size=4, seq_len=6)
    x = torch.randint(0, 4, (2, 6), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, 3:] = (y[:, 3:] + 1) % 4
    a, b = model.next_token_log_probs(x), model.next_token_log_probs(y)
    assert torch.equal(a[:, :4], b[:, :4])  # p(x_i | x_<i) for i <= 3 never sees position 3 onwards
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_samples_follow_the_model_distribution():
    model = tiny_model(vocab_size=2, seq_len=2).eval()
    out = model.generate(4000, 1, generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (4000, 2) and torch.equal(out.nfe, torch.full((4000,), 2))
    seqs = all_sequences(2, 2)
    expected = model.sequence_log_prob(seqs).exp().detach()
    observed = torch.stack([(out.tokens == s).all(-1).float().mean() for s in seqs])
    assert torch.allclose(observed, expected, atol=0.03)  # ~4 standard errors at 4000 draws
    again = model.generate(4000, 1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.tokens, out.tokens)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ar")
    main(["fit", "-c", TINY_AR, "--trainer.default_root_dir", str(root)])
    (path,) = glob.glob(str(root / "**" / "last.ckpt"), recursive=True)
    return path


def test_trained_evaluator_scores_every_token_exactly(ckpt):
    evaluator = load_evaluator(ckpt)
    assert isinstance(evaluator, ARModelEvaluator) and load_evaluator(ckpt) is evaluator  # loaded once
    tokens = torch.randint(0, 5, (6, 8), generator=torch.Generator().manual_seed(0))
    nll, count = evaluator.nll(tokens)
    assert torch.allclose(nll, -evaluator.model.sequence_log_prob(tokens).detach())
    assert count.tolist() == [8] * 6
    metric = GenerativePerplexity(evaluator)
    metric.update(tokens)
    assert metric.compute()["gen_ppl"].item() == pytest.approx(torch.exp(nll.sum() / 48).item(), rel=1e-5)
    moment = GradientMoment(evaluator, param_filter=r"backbone\.head")
    moment.update(tokens, "gen")
    moment.update(tokens.flip(0), "data")
    assert torch.isfinite(moment.compute())
    with pytest.raises(ValueError, match="vocab_size=5"):
        evaluator.nll(tokens + 5)


def test_evaluator_rejects_a_checkpoint_of_another_kind(tmp_path):
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": {}, "lightning_ddd_class": "DiffusionTeacher"}, path)
    with pytest.raises(CheckpointError, match="not an ARLanguageModel"):
        load_ar_evaluator(str(path))


def test_evaluate_uses_the_ar_evaluator_and_the_ar_model_samples(ckpt, tmp_path):
    main(["evaluate", "-c", TINY_TEACHER, "--steps", "[2]", "--sampling.num_samples", "8", "--metrics.evaluator", ckpt,
          "--metrics.gradient_moment", "true", "--output_dir", str(tmp_path / "eval")])
    data, row = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert row["evaluator"] == ckpt and row["gen_ppl"] > 1.0 and "grad_moment" in row
    # the floor: training sequences, since the gradient moment's own data are validation sequences
    assert data["data_split"] == "train" and data["gen_ppl"] > 1.0 and "grad_moment" in data
    # the AR model is a left-to-right baseline for the same subcommands
    main(["sample", "-c", TINY_AR, "--ckpt_path", ckpt, "--sampling.num_samples", "4",
          "--output_dir", str(tmp_path / "s")])
    assert torch.load(tmp_path / "s" / "tokens.pt").shape == (4, 8)
