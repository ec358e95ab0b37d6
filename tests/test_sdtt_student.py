"""The SDTT student: starts as the teacher, learns, hands rounds over to itself, resumes exactly."""

import glob
import os

import pytest
import torch

from lightning_ddd.cli import main
from lightning_ddd.diffusion import sdtt
from lightning_ddd.modules import SDTTStudent
from lightning_ddd.modules.sdtt_student import SDTTContext, SDTTLoss, SDTTSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TEACHER = os.path.join(ROOT, "tests", "configs", "tiny_teacher.yaml")
TINY_SDTT = os.path.join(ROOT, "tests", "configs", "tiny_sdtt.yaml")


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("teacher"))
    main(["fit", "-c", TINY_TEACHER, "--trainer.default_root_dir", root, "--trainer.max_epochs", "1"])
    (path,) = glob.glob(os.path.join(root, "**", "last.ckpt"), recursive=True)
    return path


def fit_student(root, teacher_ckpt, *extra):
    return main(["fit", "-c", TINY_SDTT, "--trainer.default_root_dir", str(root),
                 "--model.init_args.teacher_ckpt", teacher_ckpt, *extra])


def test_settings_are_checked():
    assert SDTTSettings(teacher_steps=64, num_rounds=4).student_steps == 4
    assert [SDTTSettings(teacher_steps=64, num_rounds=4).teacher_steps_at(r) for r in range(5)] == [64, 32, 16, 8, 4]
    with pytest.raises(ValueError, match="divisible"):
        SDTTSettings(teacher_steps=48, num_rounds=5)
    with pytest.raises(ValueError, match="steps_per_teacher >= 2"):
        SDTTSettings(steps_per_teacher=1)
    with pytest.raises(ValueError, match="divergence"):
        SDTTLoss(divergence="js")


def test_untrained_student_is_the_teacher_and_its_loss_is_the_k_step_gap(teacher_ckpt):
    student = SDTTStudent(teacher_ckpt, sdtt=SDTTSettings(teacher_steps=4, num_rounds=1))
    teacher = student.teacher
    z = torch.randint(0, 6, (4, 8), generator=torch.Generator().manual_seed(0))  # id 5 is the mask
    with torch.no_grad():
        torch.testing.assert_close(student.eval().denoise(z), teacher.denoise(z), rtol=0, atol=0)
    # The loss is the divergence between the student's one step and the teacher's two, on masked positions.
    x = torch.randint(0, 5, (32, 8), generator=torch.Generator().manual_seed(1))
    ctx = SDTTContext(student, x, torch.Generator().manual_seed(2))
    by_hand = sdtt.divergence_loss(ctx.log_probs, ctx.target_log_probs, ctx.z_t == 5).mean() / 8
    out = student.compute_losses(x, torch.Generator().manual_seed(2))
    assert out["loss"].item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert out["loss"].item() > 0  # two teacher steps are not one: the student has something to learn
    assert out["round"].item() == 0 and out["teacher_steps"].item() == 4


def test_refuses_a_uniform_teacher(tmp_path):
    main(["fit", "-c", TINY_TEACHER, "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", "1",
          "--model.init_args.process", "UniformProcess", "--model.init_args.loss", "UniformELBO",
          "--model.init_args.val_loss", "UniformELBO",
          "--model.init_args.backbone.init_args.time_conditioning", "true"])
    (path,) = glob.glob(str(tmp_path / "**" / "last.ckpt"), recursive=True)
    with pytest.raises(ValueError, match="masked diffusion"):
        SDTTStudent(path)


def test_rounds_hand_over_to_the_student_and_resume_exactly(teacher_ckpt, tmp_path):
    straight = fit_student(tmp_path / "straight", teacher_ckpt)  # 6 steps: rounds 0, 1, 2 of 2 steps each
    assert straight.model.round == 2
    (first_ckpt,) = glob.glob(str(tmp_path / "straight" / "**" / "last.ckpt"), recursive=True)
    state = torch.load(first_ckpt, weights_only=False)
    assert state["sdtt_round"] == 2 and set(state["sdtt_round_teacher"]) == {
        k.removeprefix("backbone.") for k in state["state_dict"]}
    assert not any(k.startswith("_") or "teacher" in k for k in state["state_dict"])

    fit_student(tmp_path / "first", teacher_ckpt, "--trainer.max_epochs", "1")  # stops at step 3, in round 1
    (ckpt,) = glob.glob(str(tmp_path / "first" / "**" / "last.ckpt"), recursive=True)
    partial = torch.load(ckpt, weights_only=False)
    assert partial["global_step"] == 3 and partial["sdtt_round"] == 1
    # Round 1's teacher is the student as it was after round 0's two steps, not the teacher file.
    teacher_state = torch.load(teacher_ckpt, weights_only=False)["state_dict"]
    assert any(not torch.equal(v, teacher_state[f"backbone.{k}"]) for k, v in partial["sdtt_round_teacher"].items())
    resumed = fit_student(tmp_path / "resumed", teacher_ckpt, "--ckpt_path", ckpt)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    round_a, round_b = straight.model._round_backbone.value.state_dict(), resumed.model._round_backbone.value.state_dict()
    for name in round_a:
        assert torch.equal(round_a[name], round_b[name]), name


def test_student_learns_to_match_its_target(teacher_ckpt):
    torch.manual_seed(0)
    student = SDTTStudent(teacher_ckpt, sdtt=SDTTSettings(teacher_steps=4, num_rounds=1))
    with torch.no_grad():  # start away from the target (the tiny teacher's own k-step gap is ~1e-6)
        student.backbone.head.weight.normal_(std=0.5)
    opt = torch.optim.Adam(student.backbone.parameters(), lr=3e-3)
    x = torch.randint(0, 5, (64, 8), generator=torch.Generator().manual_seed(1))

    def fixed_loss():
        with torch.no_grad():
            return student.compute_losses(x, torch.Generator().manual_seed(99))["loss"].item()

    before = fixed_loss()
    for step in range(30):
        loss = student.compute_losses(x, torch.Generator().manual_seed(step))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert before > 0.05 and fixed_loss() < 0.3 * before


def test_fit_summary_names_no_best_value_across_rounds():
    """SDTT's val/loss is against the current round's teacher: a 'best' over rounds would mislead."""
    from types import SimpleNamespace

    from lightning_ddd.fit_report import FitReport

    report = FitReport()
    report.metric, report.history = "val/loss", [(400, 0.009), (800, 0.05)]
    for module, best in ((SimpleNamespace(), True), (SimpleNamespace(validation_comparable_over_training=False), False)):
        trainer = SimpleNamespace(global_step=800, lightning_module=module, callbacks=[])
        line = report.summary(trainer)
        assert "val/loss 0.05 at step 800" in line and ("best 0.009 at step 400" in line) is best, line
    assert SDTTStudent.validation_comparable_over_training is False
