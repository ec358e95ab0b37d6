"""A plain (non-editable) install ships ``lightning_ddd`` with its callbacks as ``lightning_ddd.callbacks``,
and no top-level ``callbacks`` package; the metadata names the extras and the SPDX license."""

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


def test_wheel_installs_callbacks_inside_the_package(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=skip, symlinks=True)  # as git checks it out: lightning_ddd/callbacks is a link
    assert os.path.islink(src / "lightning_ddd" / "callbacks")
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")],
                   check=True)
    (wheel,) = (tmp_path / "dist").glob("lightning_ddd-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = zf.read(metadata).decode()
    callback_files = {os.path.basename(f) for f in os.listdir(os.path.join(ROOT, "callbacks")) if f.endswith(".py")}
    assert {f"lightning_ddd/callbacks/{f}" for f in callback_files} <= set(names)
    assert "lightning_ddd/cli.py" in names
    assert not [n for n in names if n.startswith("callbacks/")], "a top-level callbacks package was installed"
    assert "License-Expression: Apache-2.0" in meta
    for extra in ("images", "plots", "text", "test"):
        assert f"Provides-Extra: {extra}" in meta, extra

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    assert sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info")) == ["bin", "lightning_ddd"]
    probe = "import lightning_ddd.callbacks as cb; print(cb.__file__)"
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(site / "lightning_ddd" / "callbacks" / "__init__.py")


def test_source_checkout_imports_the_callbacks_under_one_name():
    """The link makes ``lightning_ddd.callbacks`` the top-level folder itself, not a copy."""
    import lightning_ddd.callbacks as cb

    link = os.path.join(ROOT, "lightning_ddd", "callbacks")
    assert os.path.islink(link) and os.readlink(link) == os.path.join("..", "callbacks")  # relative: survives moves
    assert os.path.samefile(os.path.dirname(cb.__file__), os.path.join(ROOT, "callbacks"))
    assert "callbacks" not in sys.modules  # nothing imported the folder under its bare name
