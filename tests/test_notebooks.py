"""Every notebook in notebooks/ runs top to bottom without a Jupyter kernel.

The code cells are exec'd in order in one namespace, in a temporary working directory, so a notebook
that writes files leaves nothing behind in the repository. Notebooks are stored without outputs.
"""

import glob
import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "**", "*.ipynb"), recursive=True))


def code_cells(path):
    """(index, source) of each code cell of an nbformat-4 notebook, in order."""
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    assert nb.get("nbformat") == 4, f"{path}: not an nbformat 4 notebook"
    cells = []
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        assert not cell.get("outputs"), f"{path}: cell {index} has saved outputs; clear them before committing"
        source = cell["source"]
        source = "".join(source) if isinstance(source, list) else source
        magics = [line for line in source.splitlines() if line.lstrip().startswith(("%", "!"))]
        assert not magics, f"{path}: cell {index} uses IPython syntax {magics}; use plain Python"
        cells.append((index, source))
    return cells


def test_notebooks_exist():
    assert NOTEBOOKS, "no notebooks found under notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: os.path.relpath(p, ROOT))
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(ROOT)  # import the package from this checkout, whatever the cwd
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")  # plots must not need a display
    # The notebooks' models are tiny: one thread is as fast, and far faster on a busy machine, where
    # several intra-op threads per process spin against each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        namespace = {"__name__": "__main__"}
        for index, source in code_cells(path):
            code = compile(source, f"{os.path.relpath(path, ROOT)} [cell {index}]", "exec")
            exec(code, namespace)  # an exception fails the test with the cell named in the traceback
    finally:
        torch.set_num_threads(threads)
