"""A plain (non-editable) install ships both ``lightning_ddd`` and the top-level ``callbacks`` package."""

import os
import shutil
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_LEVEL_SKIP = {".venv", ".git", "runs", "data", "data_cache", "build", "benchmarks"}


def skip(directory, names):
    """Leave out local outputs at the top level only (lightning_ddd/data is a package)."""
    top = os.path.abspath(directory) == ROOT
    return [n for n in names if (top and n in TOP_LEVEL_SKIP) or n == "__pycache__" or n.endswith(".egg-info")]


def test_wheel_installs_callbacks_package(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=skip)
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")], check=True)
    (wheel,) = (tmp_path / "dist").glob("lightning_ddd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "callbacks/__init__.py" in names and "lightning_ddd/cli.py" in names
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    probe = "import callbacks, lightning_ddd; print(callbacks.__file__); print(lightning_ddd.__file__)"
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert all(line.startswith(str(site)) for line in out.stdout.split()), out.stdout
