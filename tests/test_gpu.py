"""On a CUDA device: bf16 teacher and student steps, Lightning's FSDP (one process) with EMA, clipping and the
sampling callbacks, a D-MMD student's manual steps under FSDP, and compiled backbones. Marked ``gpu``
(deselected by default: ``python -m pytest -m gpu``) and skipped without CUDA."""

import glob
import json
import math
import os

import pytest
import torch

from lightning_ddd.callbacks import Compile
from lightning_ddd.cli import main
from lightning_ddd.modules import DiffusionTeacher, DMMDStudent, MixtureStudent
from lightning_ddd.modules.mixture_student import MixtureSettings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "configs", "tiny_teacher.yaml")
TINY_DMMD = os.path.join(ROOT, "tests", "configs", "tiny_dmmd.yaml")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GPU = ["--trainer.accelerator", "gpu", "--trainer.devices", "1"]


def fit(config, root, *extra):
    cli = main(["fit", "-c", config, "--trainer.default_root_dir", str(root), *GPU, *extra])
    (ckpt,) = glob.glob(str(root / "**" / "last.ckpt"), recursive=True)
    return cli, ckpt


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def callback(name: str, **init_args) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": f"lightning_ddd.callbacks.{name}", "init_args": init_args})


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    cli, ckpt = fit(TINY, root, "--trainer.precision", "bf16-mixed", "--trainer.max_epochs", "1")
    assert math.isfinite(cli.trainer.callback_metrics["train/loss"].item())
    return ckpt


def test_bf16_teacher_and_student_steps(teacher_ckpt, tmp_path):
    import lightning.pytorch as pl

    from lightning_ddd.data import MarkovChain

    data = MarkovChain(vocab_size=5, seq_len=8, num_train=64, num_val=16, batch_size=16)
    for student in (MixtureStudent(teacher_ckpt, mixture=MixtureSettings(num_lambda=4, lambda_dim=8)),
                    DMMDStudent(teacher_ckpt)):
        before = {k: v.clone() for k, v in student.state_dict().items()}
        trainer = pl.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=4, logger=False,
                             enable_checkpointing=False, limit_val_batches=0, enable_progress_bar=False,
                             gradient_clip_val=1.0 if student.automatic_optimization else None)
        trainer.fit(student, datamodule=data)
        losses = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        assert losses and all(math.isfinite(v) for v in losses.values()), losses
        assert any(not torch.equal(before[k], v.cpu()) for k, v in student.state_dict().items())


def test_fsdp_fit_with_ema_clipping_and_sampling_callbacks_resumes_exactly(tmp_path):
    """Lightning's FSDP (one process): EMA on the flat-parameter shards, norm clipping (which Lightning's
    FSDP plugin refuses) by the module, the sampling callbacks with the full weights gathered."""
    fsdp = ["--trainer.strategy", "fsdp", "--trainer.gradient_clip_val", "0.05",
            callback("TemperatureSweep", every_n_steps=2, temperatures=[1.0], steps=[2],
                     sampling={"num_samples": 8}, metrics={"evaluator": "oracle"}),
            callback("SampleLogger", sampling={"num_samples": 4, "steps": 2})]
    straight, ckpt = fit(TINY, tmp_path / "straight", *fsdp, "--trainer.max_epochs", "4")
    _, first = fit(TINY, tmp_path / "first", *fsdp, "--trainer.max_epochs", "2")
    resumed, resumed_ckpt = fit(TINY, tmp_path / "resumed", *fsdp, "--trainer.max_epochs", "4", "--ckpt_path", first)
    a, b = load(ckpt), load(resumed_ckpt)
    for key in ("state_dict", "current_model_state"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=1e-4, atol=1e-5, msg=f"{key} {name}")
    assert any(not torch.equal(a["state_dict"][k], a["current_model_state"][k]) for k in a["state_dict"])
    plain, plain_ckpt = fit(TINY, tmp_path / "plain", "--trainer.gradient_clip_val", "0.05", "--trainer.max_epochs", "4")
    for key in ("state_dict", "current_model_state"):  # one FSDP process trains as one plain process
        for name, value in load(plain_ckpt)[key].items():
            torch.testing.assert_close(a[key][name], value, rtol=1e-3, atol=1e-4, msg=f"{key} {name}")


def test_dmmd_manual_steps_with_two_optimisers_under_fsdp(teacher_ckpt, tmp_path):
    """Both optimisers step, and each clips by its own model's gradient norm, as on one plain device."""
    student = ["--model.init_args.teacher_ckpt", teacher_ckpt, "--trainer.max_epochs", "1"]
    _, sharded = fit(TINY_DMMD, tmp_path / "fsdp", *student, "--trainer.strategy", "fsdp")
    _, plain = fit(TINY_DMMD, tmp_path / "plain", *student)
    a, b = load(sharded), load(plain)
    assert a["dmmd_iteration"] == b["dmmd_iteration"] == 3
    for name, value in b["current_model_state"].items():
        torch.testing.assert_close(a["current_model_state"][name], value, rtol=1e-3, atol=1e-4, msg=name)


def test_compiled_backbone_matches_eager_and_trains(teacher_ckpt, tmp_path):
    model = DiffusionTeacher.load_from_checkpoint(teacher_ckpt).cuda().eval()
    z = torch.randint(0, 6, (16, 8), device="cuda")
    with torch.no_grad():
        eager = model.denoise(z)
        Compile().apply(model)
        compiled = model.denoise(z)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    cli, _ = fit(TINY, tmp_path, "--trainer.precision", "bf16-mixed", "--trainer.max_epochs", "1", callback("Compile"))
    assert math.isfinite(cli.trainer.callback_metrics["train/loss"].item())
