"""The notebooks in notebooks/: stored with the outputs of their current code, and run top to bottom here.

Outputs are stored by ``python notebooks/execute.py <notebook>``, which records the SHA-256 of the code cells it
ran and the wall time; the first cell states that time. The code cells are exec'd here in order in one namespace,
in a temporary working directory (and with the temporary folders a notebook makes inside it), so a notebook
leaves nothing behind; the tour's numbers are then checked against values computed another way.
"""

import base64
import glob
import importlib.util
import json
import logging
import os
import sys
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "**", "*.ipynb"), recursive=True))

_spec = importlib.util.spec_from_file_location("notebook_execute", os.path.join(ROOT, "notebooks", "execute.py"))
execute = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(execute)


def load(path):
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    assert nb.get("nbformat") == 4, f"{path}: not an nbformat 4 notebook"
    return nb


def code_cells(nb, path):
    """(index, source) of each code cell, in order; IPython syntax is refused (the notebooks are plain Python)."""
    cells = []
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = execute.cell_source(cell)
        magics = [line for line in source.splitlines() if line.lstrip().startswith(("%", "!"))]
        assert not magics, f"{path}: cell {index} uses IPython syntax {magics}; use plain Python"
        cells.append((index, source))
    return cells


def test_notebooks_exist():
    assert NOTEBOOKS, "no notebooks found under notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: os.path.relpath(p, ROOT))
def test_stored_outputs_are_those_of_the_current_code(path):
    nb = load(path)
    rerun = f"run `python notebooks/execute.py {os.path.relpath(path, ROOT)}` and update the time it states"
    record = nb["metadata"].get(execute.RECORD_KEY)
    assert record, f"{path}: stored without outputs; {rerun}"
    assert record["code_sha256"] == execute.code_sha256(nb), f"{path}: code changed since its outputs were stored; {rerun}"
    cells = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    assert [cell.get("execution_count") for cell in cells] == list(range(1, len(cells) + 1)), f"{path}: {rerun}"
    code_cells(nb, path)  # no magics
    outputs = [output for cell in cells for output in cell["outputs"]]
    assert all(cell["outputs"] for cell in cells), f"{path}: a code cell without outputs; {rerun}"
    assert not [o for o in outputs if o["output_type"] == "error"], f"{path}: stored with an error"
    stderr = "".join("".join(o["text"]) for o in outputs if o["output_type"] == "stream" and o["name"] == "stderr")
    for noise in ("Traceback", "Warning", "warn(", "GPU available", "Tip:"):
        assert noise not in stderr, f"{path}: stored stderr shows {noise!r}; filter it in the notebook, then {rerun}"
    pngs = [base64.b64decode(o["data"]["image/png"]) for o in outputs if "image/png" in o.get("data", {})]
    assert pngs and all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in pngs), f"{path}: no stored figure"
    # the time the notebook states is the one measured when its outputs were stored
    intro = execute.cell_source(nb["cells"][0])
    assert f"{round(record['wall_seconds'])} s" in intro, f"{path}: the first cell must state the measured time"


def check_tour(ns):
    """The tour's numbers, against the data's exact law and against each other."""
    from lightning_ddd.data import MarkovChain

    run = os.path.realpath(ns["RUN"])
    assert os.path.commonpath([run, ROOT]) != ROOT, "the tour must write outside the repository"
    data = MarkovChain(vocab_size=8, seq_len=16, sharpness=2.0, num_train=16384)
    data.setup("fit")
    # the exact entropy against a Monte-Carlo estimate over the 16,384 training sequences (std. error ~0.002)
    entropy = ns["entropy_per_token"]
    assert abs(-data.log_likelihood(data.train_set.tokens).mean().item() / 16 - entropy) < 0.01
    # the teacher's bound lies above the floor (up to its Monte-Carlo noise) and near it after 300 steps
    assert entropy - 0.02 < ns["teacher_val_nll"] < entropy + 0.15, (ns["teacher_val_nll"], entropy)
    assert os.path.isfile(os.path.join(run, ns["teacher_ckpt"])) and ns["teacher_ckpt"].endswith("last.ckpt")
    # the TensorBoard events hold what the fit reported
    steps, values = ns["curves"]["val/nll"]
    assert steps[-1] + 1 == 300 and values[-1] == pytest.approx(ns["teacher_val_nll"], abs=1e-6)
    # samples.json's oracle NLL, recomputed from tokens.pt with the chain's initial law and transition matrix
    tokens = torch.load(os.path.join(run, "samples/teacher/tokens.pt"))  # (8, 16)
    with open(os.path.join(run, "samples/teacher/samples.json")) as f:
        record = json.load(f)
    log_p = [data.initial[row[0]].log() + sum(data.transition[a, b].log() for a, b in zip(row[:-1], row[1:]))
             for row in tokens.tolist()]
    assert record["oracle_nll"] == pytest.approx(-sum(log_p).item() / (len(log_p) * 16), rel=1e-9)
    # the data row sits at the entropy; fewer steps, worse samples; the student beats the teacher at k = 4
    floor, teacher, student = ns["data_row"], ns["teacher_rows"], ns["student_rows"]
    assert abs(floor["oracle_nll"] - entropy) < 0.03
    assert [row["steps"] for row in teacher] == [2, 4, 8, 16, 64] and [row["steps"] for row in student] == [2, 4]
    nll = [row["oracle_nll"] for row in teacher]
    assert all(a > b for a, b in zip(nll, nll[1:])) and nll[-1] > floor["oracle_nll"], nll
    assert teacher[0]["transition_kl"] > teacher[-1]["transition_kl"] > floor["transition_kl"]
    assert student[1]["oracle_nll"] < teacher[1]["oracle_nll"] - 0.02, (student[1], teacher[1])
    assert abs(student[1]["entropy"] - teacher[1]["entropy"]) < 0.05  # not by collapsing
    assert ns["student_val"] < ns["student_start"]  # the teacher's own score of 4-step samples fell


CHECKS = {"tour.ipynb": check_tour}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: os.path.relpath(p, ROOT))
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(ROOT)  # import the package from this checkout, whatever the cwd
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the notebook's own temporary folders land here
    monkeypatch.setenv("MPLBACKEND", "Agg")  # plots must not need a display
    # a notebook quiets some of Lightning's log lines and sets torch's threads: undone afterwards
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed")]
    filters = [list(logger.filters) for logger in loggers]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is as fast, and far faster on a busy machine
    try:
        namespace = {"__name__": "__main__"}
        for index, source in code_cells(load(path), path):
            code = compile(source, f"{os.path.relpath(path, ROOT)} [cell {index}]", "exec")
            exec(code, namespace)  # an exception fails the test with the cell named in the traceback
        check = CHECKS.get(os.path.basename(path))
        if check is not None:
            check(namespace)
    finally:
        torch.set_num_threads(threads)
        for logger, saved in zip(loggers, filters):
            logger.filters[:] = saved
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close("all")
