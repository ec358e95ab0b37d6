"""The real entry point on tiny configs: parsing, help, fit, resume, and early errors."""

import glob
import os
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_ddd.checkpoints import CheckpointError
from lightning_ddd.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "configs", "tiny_teacher.yaml")
SHIPPED = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


def run_cli(args, capsys=None):
    """Run main(args); return (exit code, stdout+stderr) when it exits, else (None, cli)."""
    try:
        cli = main(args)
    except SystemExit as exit_:
        out = capsys.readouterr() if capsys else None
        return exit_.code, (out.out + out.err) if out else ""
    return None, cli


@pytest.mark.parametrize("config", SHIPPED + [TINY], ids=lambda p: os.path.relpath(p, ROOT))
def test_every_config_parses(config, capsys):
    code, out = run_cli(["fit", "-c", config, "--print_config"], capsys)
    assert code == 0, out
    assert "class_path" in out


def test_help_explains_arguments(capsys):
    code, out = run_cli(["--help"], capsys)
    assert code == 0 and "fit" in out
    code, out = run_cli(["fit", "--model.help", "DiffusionTeacher"], capsys)
    assert code == 0
    for text in ["val_num_draws", "Monte-Carlo draws per validation sequence", "--model.loss"]:
        assert text in out, text
    code, out = run_cli(["fit", "--data.help", "MarkovChain"], capsys)
    assert code == 0 and "sharpness" in out


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "lightning_ddd", "fit", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--model" in out.stdout


def test_links_fill_vocab_and_seq_len_from_data(tmp_path):
    code, cli = run_cli(["fit", "-c", TINY, "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "0"])
    assert code is None
    assert cli.model.vocab_size == 5 and cli.model.seq_len == 8
    assert cli.model.process.mask_id == 5 and cli.model.backbone.num_input_tokens == 6


def event_tags(root):
    tags = set()
    for path in glob.glob(os.path.join(root, "**", "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(path)
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    return tags


def fit(root, *extra):
    code, cli = run_cli(["fit", "-c", TINY, "--trainer.default_root_dir", str(root), *extra])
    assert code is None
    return cli


def test_fit_logs_to_tensorboard_and_checkpoints(tmp_path):
    fit(tmp_path)
    tags = event_tags(tmp_path)
    for tag in ["train/loss", "val/nll", "val/ppl", "val/bpd", "lr-AdamW"]:
        assert tag in tags, (tag, tags)
    assert "val/loss" not in tags and "hp_metric" not in tags  # val/nll is the teacher's val/loss; no -1 hp_metric
    (ckpt,) = glob.glob(str(tmp_path / "**" / "last.ckpt"), recursive=True)
    assert torch.load(ckpt, weights_only=False)["lightning_ddd_class"] == "DiffusionTeacher"


def test_resume_matches_uninterrupted_run(tmp_path):
    straight = fit(tmp_path / "straight", "--trainer.max_epochs", "4")
    fit(tmp_path / "first", "--trainer.max_epochs", "2")
    (ckpt,) = glob.glob(str(tmp_path / "first" / "**" / "last.ckpt"), recursive=True)
    resumed = fit(tmp_path / "resumed", "--trainer.max_epochs", "4", "--ckpt_path", ckpt)
    assert resumed.trainer.global_step == straight.trainer.global_step == 16
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_unknown_class_name_is_a_clear_error(capsys):
    code, out = run_cli(["fit", "-c", TINY, "--data", "NoSuchData"], capsys)
    assert code != 0 and "NoSuchData" in out


@pytest.mark.parametrize("content", [b"not a checkpoint", None])
def test_bad_checkpoint_fails_before_training(tmp_path, content):
    bad = tmp_path / "bad.ckpt"
    if content is None:
        torch.save({"weights": torch.zeros(1)}, bad)  # a torch file, but not a Lightning checkpoint
    else:
        bad.write_bytes(content)
    run_dir = tmp_path / "run"
    with pytest.raises(CheckpointError, match="bad.ckpt"):
        main(["fit", "-c", TINY, "--trainer.default_root_dir", str(run_dir), "--ckpt_path", str(bad)])
    assert not run_dir.exists() or not any(run_dir.rglob("*.ckpt"))


def test_checkpoint_of_another_vocabulary_is_rejected(tmp_path):
    fit(tmp_path / "a", "--trainer.max_epochs", "1")
    (ckpt,) = glob.glob(str(tmp_path / "a" / "**" / "last.ckpt"), recursive=True)
    with pytest.raises(ValueError, match="vocab_size=5"):
        fit(tmp_path / "b", "--data.init_args.vocab_size", "6", "--ckpt_path", ckpt)


QUICKSTART = os.path.join(ROOT, "configs", "quickstart", "teacher.yaml")


def test_lr_schedule_follows_max_steps_given_on_the_command_line(tmp_path, monkeypatch):
    """The quickstart's ``total_steps: ${trainer.max_steps}``: cutting max_steps ends the cosine with training."""
    monkeypatch.chdir(tmp_path)  # the quickstart writes under runs/
    cli = main(["fit", "-c", QUICKSTART, "--trainer.max_steps", "6", "--trainer.enable_progress_bar", "false",
                "--model.init_args.lr_scheduler.init_args.warmup_steps", "2",
                "--data.init_args.num_train", "256", "--data.init_args.num_val", "128"])
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert cli.trainer.global_step == 6 and scheduler.total_steps == 6
    base_lr, min_ratio = 0.002, scheduler.min_ratio
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(min_ratio * base_lr)  # at its floor
    (saved,) = glob.glob(str(tmp_path / "runs" / "**" / "config.yaml"), recursive=True)
    assert "total_steps: 6" in open(saved).read()  # the run's record holds the resolved number


def test_interpolated_values_print_resolved(capsys):
    code, out = run_cli(["fit", "-c", QUICKSTART, "--trainer.max_steps", "300", "--print_config"], capsys)
    assert code == 0 and "total_steps: 300" in out and "${" not in out
