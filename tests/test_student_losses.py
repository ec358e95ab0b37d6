"""Pluggable student objectives: the README's own example through the CLI, shared per-batch work, weights,
early errors, settings round trips, and every shipped student config built on a tiny teacher."""

import glob
import inspect
import os
import re
import sys

import lightning.pytorch as pl
import pytest
import torch
import yaml
from jsonargparse import ArgumentParser

from lightning_ddd.cli import main
from lightning_ddd.data import MarkovChain
from lightning_ddd.diffusion.mixture import ConsistencyStep, DataWeight
from lightning_ddd.modules import DiffusionModule, DMMDStudent, MixtureStudent
from lightning_ddd.modules.mixture_student import MixtureSettings
from lightning_ddd.modules.student_losses import (
    Di4CConsistencyLoss,
    Di4CContext,
    Di4CDataLoss,
    Di4CDistillationLoss,
    DMMDAuxiliaryLoss,
    DMMDGeneratorLoss,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TEACHER = os.path.join(ROOT, "tests", "configs", "tiny_teacher.yaml")
SHIPPED_STUDENTS = [p for p in sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
                    if re.search(r"di4c|dmmd", os.path.basename(p))]


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    main(["fit", "-c", TINY_TEACHER, "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "1"])
    (path,) = glob.glob(str(root / "**" / "last.ckpt"), recursive=True)
    return path


def small(path, losses=None, **kw):
    return MixtureStudent(path, mixture=MixtureSettings(num_lambda=3, lambda_dim=8, position_dim=4), losses=losses, **kw)


def perturb(model, seed=0):
    """Give the lambda input an effect, as training would (at the start every term is 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.backbone.cond_proj.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)


def readme_section(title):
    text = open(os.path.join(ROOT, "README.md")).read()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


# ---- the README example, end to end ------------------------------------------------------------------------


def test_readme_student_loss_example_trains_through_the_cli(teacher_ckpt, tmp_path, monkeypatch):
    section = readme_section("Write your own student loss")
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    (config,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    (tmp_path / "my_losses.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_losses", raising=False)
    model = yaml.safe_load(config)["model"]
    model["init_args"].update(teacher_ckpt=teacher_ckpt, mixture={"num_lambda": 2, "lambda_dim": 8})
    cfg = tmp_path / "student.yaml"
    cfg.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": 1,
                    "limit_val_batches": 1},
        "model": model,
        "data": {"class_path": "MarkovChain",
                 "init_args": {"vocab_size": 5, "seq_len": 8, "num_train": 32, "num_val": 16, "batch_size": 16}},
    }))
    cli = main(["fit", "--config", str(cfg), "--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}"])
    metrics = cli.trainer.callback_metrics
    assert type(cli.model.losses[-1]).__name__ == "MarginalKL" and cli.model.losses[-1].weight == 0.5
    terms = [metrics[f"train/loss_{name}"] for name in ("distil", "data", "consis", "marginal")]
    assert all(torch.isfinite(v) for v in terms) and terms[-1] >= 0 and "val/loss_marginal" in metrics
    # The new term is part of the optimised objective: the loss is the sum of its logged terms.
    torch.testing.assert_close(metrics["train/loss"], sum(terms), rtol=0, atol=1e-6)
    # A fresh student is the teacher, so its mixture marginals are the teacher's: the term is 0 there.
    fresh = MixtureStudent(teacher_ckpt, mixture=MixtureSettings(num_lambda=2, lambda_dim=8),
                           losses=[cli.model.losses[-1]])
    x = torch.randint(5, (8, 8), generator=torch.Generator().manual_seed(0))
    assert fresh.compute_losses(x, torch.Generator().manual_seed(1))["loss_marginal"].abs() < 1e-6


# ---- shared work, weights, sums ----------------------------------------------------------------------------


def test_teacher_and_components_run_once_per_step(teacher_ckpt, monkeypatch):
    s = small(teacher_ckpt)
    perturb(s)
    calls = {"teacher": 0, "components": 0}
    teacher_denoise, components = s.teacher.denoise, s.components
    monkeypatch.setattr(s.teacher, "denoise", lambda *a, **k: calls.__setitem__("teacher", calls["teacher"] + 1)
                        or teacher_denoise(*a, **k))
    monkeypatch.setattr(s, "components", lambda *a: calls.__setitem__("components", calls["components"] + 1)
                        or components(*a))
    x = torch.randint(5, (6, 8), generator=torch.Generator().manual_seed(0))
    out = s.compute_losses(x, torch.Generator().manual_seed(1))
    assert calls == {"teacher": 1, "components": 1}  # three terms and the correlation diagnostic share them
    # The loss is the sum of the logged terms.
    torch.testing.assert_close(out["loss"], out["loss_distil"] + out["loss_data"] + out["loss_consis"],
                               rtol=0, atol=1e-6)


def test_weights_scale_their_term_and_settings_reach_it(teacher_ckpt):
    x = torch.randint(5, (6, 8), generator=torch.Generator().manual_seed(0))

    def terms(losses):
        torch.manual_seed(0)
        s = small(teacher_ckpt, losses=losses)
        perturb(s)
        return s.loss_terms(Di4CContext(s, x, torch.Generator().manual_seed(3)))

    base = terms([Di4CDistillationLoss(), Di4CDataLoss(), Di4CConsistencyLoss()])
    scaled = terms([Di4CDistillationLoss(0.5), Di4CDataLoss(2.0), Di4CConsistencyLoss(0.25)])
    for name, w in [("distil", 0.5), ("data", 2.0), ("consis", 0.25)]:
        assert torch.equal(scaled[name], w * base[name]), name  # powers of two: exact
    # a(t) = 0 leaves only the marginal KL of the data term; a different consistency step changes its term.
    other = terms([Di4CDistillationLoss(), Di4CDataLoss(a_t=DataWeight(coeff=0.0)),
                   Di4CConsistencyLoss(step=ConsistencyStep(teacher_grid_steps=2))])
    assert torch.equal(other["distil"], base["distil"])
    assert not torch.equal(other["data"], base["data"]) and not torch.equal(other["consis"], base["consis"])


def test_dmmd_context_runs_teacher_and_auxiliary_once(teacher_ckpt, monkeypatch):
    s = DMMDStudent(teacher_ckpt)
    calls = []
    teacher_log_probs, aux_log_probs = s.teacher_log_probs, s.aux_log_probs
    monkeypatch.setattr(s, "teacher_log_probs", lambda *a, **k: calls.append("teacher") or teacher_log_probs(*a, **k))
    monkeypatch.setattr(s, "aux_log_probs", lambda *a, **k: calls.append("aux") or aux_log_probs(*a, **k))
    x = torch.randint(5, (4, 8), generator=torch.Generator().manual_seed(0))
    out = s.compute_losses(x, torch.Generator().manual_seed(1), trains="auxiliary")
    assert sorted(calls) == ["aux", "teacher"]
    assert torch.equal(out["loss"], out["loss_aux"])  # the auxiliary's objective is its one term
    assert "loss" not in s.compute_losses(x, torch.Generator().manual_seed(1))  # nothing trains: no objective


# ---- early errors ------------------------------------------------------------------------------------------


def test_wrong_or_incomplete_losses_fail_when_the_student_is_built(teacher_ckpt):
    with pytest.raises(ValueError, match="reads a DMMDContext but MixtureStudent"):
        small(teacher_ckpt, losses=[Di4CDataLoss(), DMMDGeneratorLoss()])
    with pytest.raises(ValueError, match="distinct loss names"):
        small(teacher_ckpt, losses=[Di4CDataLoss(), Di4CDataLoss(0.5)])
    with pytest.raises(ValueError, match="at least one loss"):
        small(teacher_ckpt, losses=[])
    with pytest.raises(ValueError, match="both the student and the auxiliary"):
        DMMDStudent(teacher_ckpt, losses=[DMMDGeneratorLoss()])
    with pytest.raises(ValueError, match="target='mixed'"):
        DMMDAuxiliaryLoss(target="mixed")


def test_a_bad_setting_in_yaml_is_a_one_line_error_before_training(teacher_ckpt, tmp_path):
    with pytest.raises(ValueError, match="DMMDSettings: num_steps=0 must be >= 1.\n"):
        main(["fit", "-c", os.path.join(ROOT, "tests", "configs", "tiny_dmmd.yaml"),
              "--model.init_args.teacher_ckpt", teacher_ckpt, "--trainer.default_root_dir", str(tmp_path),
              "--model.init_args.dmmd.num_steps", "0"])
    assert not any(tmp_path.rglob("*.ckpt"))


# ---- hyperparameters ---------------------------------------------------------------------------------------


def test_settings_and_losses_round_trip_through_a_checkpoint(teacher_ckpt, tmp_path):
    losses = [Di4CDistillationLoss(0.5), Di4CDataLoss(a_t=DataWeight(coeff=0.7, midpoint=-float("inf"))),
              Di4CConsistencyLoss(step=ConsistencyStep(teacher_grid_steps=8))]
    s = small(teacher_ckpt, losses=losses, hybrid_teacher_steps=1, vocab_size=5, seq_len=8)  # as the CLI links them
    # Saved once, by the base: the student's own arguments, not the copied process/backbone or factories.
    assert set(s.hparams) == {"teacher_ckpt", "vocab_size", "seq_len", "mixture", "times", "losses",
                              "hybrid_teacher_steps", "seed", "teacher_sha256", "teacher_options"}
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(s, MarkovChain(vocab_size=5, seq_len=8, num_train=16, num_val=16, batch_size=8))
    trainer.save_checkpoint(tmp_path / "student.ckpt")
    # Built outside the CLI, the hyperparameters hold the settings objects themselves (pickled).
    back = MixtureStudent.load_from_checkpoint(tmp_path / "student.ckpt", weights_only=False)
    assert back.mixture == s.mixture and back.times == s.times and back.hybrid_teacher_steps == 1
    assert [type(loss) for loss in back.losses] == [type(loss) for loss in losses]
    assert back.losses[0].weight == 0.5 and back.losses[1].a_t == losses[1].a_t and back.losses[2].step.bounds == (0.125, 0.125)
    for (name, a), b in zip(s.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


def readme_student_blocks():
    """The README's YAML blocks that configure a shipped student (not the custom-loss example)."""
    text = open(os.path.join(ROOT, "README.md")).read()
    return [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "Student" in b and "my_losses" not in b]


@pytest.mark.parametrize("config", SHIPPED_STUDENTS + [f"README.md#{i}" for i in range(len(readme_student_blocks()))],
                         ids=lambda p: os.path.relpath(p, ROOT) if os.path.isabs(p) else p)
def test_every_shipped_student_config_builds(config, teacher_ckpt):
    """The model section of each shipped student config (and README example), built on the tiny teacher:
    every setting checks out."""
    if config.startswith("README.md#"):
        model = yaml.safe_load(readme_student_blocks()[int(config.split("#")[1])])["model"]
    else:
        from omegaconf import OmegaConf  # the configs interpolate (e.g. total_steps: ${trainer.max_steps})

        model = OmegaConf.to_container(OmegaConf.load(config), resolve=True)["model"]
    model["init_args"]["teacher_ckpt"] = teacher_ckpt
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(DiffusionModule, "model")
    student = parser.instantiate_classes(parser.parse_object({"model": model})).model
    assert student.losses and student.teacher.vocab_size == student.vocab_size == 5


@pytest.mark.parametrize("student, expected", [
    ("MixtureStudent", ["--model.mixture.num_lambda", "--model.times.delta", "--model.losses", "lambda draws per training input"]),
    ("DMMDStudent", ["--model.dmmd.num_steps", "--model.teacher_shaping.top_p", "--model.losses", "soft nucleus"]),
])
def test_help_shows_each_settings_block(student, expected, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", student])
    out = capsys.readouterr().out
    for text in expected:
        assert text in out, text
    cls = {"MixtureStudent": MixtureStudent, "DMMDStudent": DMMDStudent}[student]
    assert len(inspect.signature(cls.__init__).parameters) - 1 <= 13  # settings grouped: a short constructor
