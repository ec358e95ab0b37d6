"""benchmarks/distillation.py: the teacher it trains writes its checkpoints under --out, not into the folder
the quickstart teacher's config pins (a user's own teacher there is left alone)."""

import importlib.util
from pathlib import Path

import yaml

from lightning_ddd.cli import main

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "distillation.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("distillation_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_teacher_config_is_moved_under_the_output_folder_and_nothing_else_changes(tmp_path, monkeypatch):
    bench = load_benchmark()
    original = yaml.safe_load((ROOT / bench.TEACHER_CONFIG).read_text())
    monkeypatch.chdir(ROOT)  # the benchmark's config paths are relative to the repository
    path = bench.config_under(bench.TEACHER_CONFIG, str(tmp_path / "teacher"))
    moved = yaml.safe_load(Path(path).read_text())
    (checkpoint,) = [c for c in moved["trainer"]["callbacks"] if "dirpath" in c.get("init_args", {})]
    assert checkpoint["init_args"]["dirpath"] == str(tmp_path / "teacher" / "checkpoints")
    assert "runs/quickstart/teacher" in yaml.safe_dump(original)  # the pinned folder it replaces
    checkpoint["init_args"]["dirpath"] = next(c for c in original["trainer"]["callbacks"]
                                              if "dirpath" in c.get("init_args", {}))["init_args"]["dirpath"]
    assert moved == original
    # The copy is a valid config for the CLI (interpolations and class paths intact).
    cli = main(["fit", "-c", path, "--trainer.max_steps", "0", "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.checkpoint_callback.dirpath == str(tmp_path / "teacher" / "checkpoints")
