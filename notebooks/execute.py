"""Run a notebook's code cells and store their outputs in the file, as Jupyter would, without a Jupyter kernel.

    python notebooks/execute.py notebooks/tour.ipynb

The code cells run in order in one namespace (as ``tests/test_notebooks.py`` runs them), in a fresh temporary
working directory, with this checkout first on ``sys.path``. Each cell's outputs are written back in nbformat 4:
what it prints to stdout and stderr (Lightning's log lines and warnings included) as ``stream`` outputs, every
matplotlib figure it leaves open as a ``display_data`` PNG (then closed, as Jupyter's inline backend does), and
the value of a last bare expression as an ``execute_result``; execution counts run 1..n. A carriage return
keeps only the text after it on its line, as a terminal shows a progress bar. A cell that raises stops the run
and nothing is written.

The notebook's metadata records the SHA-256 of its code cells' sources and the wall time of the run
(``lightning_ddd_execution``): the tests refuse outputs whose code has changed since they were stored.
"""

from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the notebook-metadata key of the execution record
RECORD_KEY = "lightning_ddd_execution"


def cell_source(cell: dict) -> str:
    """A cell's source as one string (nbformat allows a string or a list of lines)."""
    source = cell["source"]
    return "".join(source) if isinstance(source, list) else source


def code_sha256(nb: dict) -> str:
    """SHA-256 of the notebook's code-cell sources, in order: changes when any code changes."""
    digest = hashlib.sha256()
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            digest.update(cell_source(cell).encode("utf-8") + b"\0")
    return digest.hexdigest()


def _lines(text: str) -> list[str]:
    """``text`` as nbformat stores it: lines that keep their "\\n" (not ``str.splitlines``, which also splits at
    "\\r" and other separators)."""
    return re.findall(r"[^\n]*\n|[^\n]+$", text)


class _Streams:
    """Stands in for sys.stdout and sys.stderr: every write goes, in order, to the running cell's list.

    Installed before any cell runs, so a log handler that keeps a reference to ``sys.stderr`` from import time
    (Lightning's) writes through it too, as it writes to the kernel's stream in Jupyter."""

    def __init__(self, name: str, chunks: list) -> None:
        self.name, self._chunks = name, chunks
        self.encoding = "utf-8"

    def write(self, text: str) -> int:
        self._chunks.append((self.name, text))
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _stream_outputs(chunks: list[tuple[str, str]], folder: str) -> list[dict]:
    """Merge consecutive writes to the same stream; a carriage return overwrites its line (progress bars)."""
    merged: list[list] = []
    for name, text in chunks:
        if merged and merged[-1][0] == name:
            merged[-1][1] += text
        else:
            merged.append([name, text])
    outputs = []
    for name, text in merged:
        text = "".join(re.sub(r"^.*\r(?!\n?$)", "", line) for line in _lines(text))
        text = text.replace("\r", "").replace(folder, "$TMPDIR")  # no path of the machine that ran it
        if text:
            outputs.append({"output_type": "stream", "name": name, "text": _lines(text)})
    return outputs


def _figure_outputs() -> list[dict]:
    """Every open matplotlib figure as an image/png display_data output; the figures are closed."""
    if "matplotlib.pyplot" not in sys.modules:
        return []
    import matplotlib.pyplot as plt

    outputs = []
    for number in plt.get_fignums():
        figure = plt.figure(number)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", bbox_inches="tight", metadata={"Software": None})
        outputs.append({
            "output_type": "display_data",
            "data": {"image/png": base64.b64encode(buffer.getvalue()).decode("ascii"), "text/plain": [repr(figure)]},
            "metadata": {},
        })
    plt.close("all")
    return outputs


def run_cell(source: str, namespace: dict, filename: str):
    """Exec ``source``; return the value of its last statement when that is a bare expression (IPython's rule,
    a trailing ``;`` hides it), else None."""
    tree = ast.parse(source, filename)
    last = tree.body[-1] if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    if last is not None and not source.rstrip().endswith(";"):
        tree.body.pop()
        exec(compile(tree, filename, "exec"), namespace)
        return eval(compile(ast.Expression(last.value), filename, "eval"), namespace)
    exec(compile(tree, filename, "exec"), namespace)
    return None


def execute(path: str) -> float:
    """Run the notebook at ``path`` and store its outputs there; return the wall time of the cells in seconds."""
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    if nb.get("nbformat") != 4:
        raise SystemExit(f"error: {path} is not an nbformat 4 notebook.")
    os.environ.setdefault("MPLBACKEND", "Agg")  # figures are rendered to PNG, no display needed
    sys.path.insert(0, ROOT)  # import the package from this checkout
    chunks: list[tuple[str, str]] = []
    saved_streams, saved_cwd = (sys.stdout, sys.stderr), os.getcwd()
    sys.stdout, sys.stderr = _Streams("stdout", chunks), _Streams("stderr", chunks)
    namespace = {"__name__": "__main__"}
    count, cells = 0, []
    try:
        with tempfile.TemporaryDirectory(prefix="notebook_") as work:
            os.chdir(work)
            tempfile.tempdir = work  # the notebook's own temporary folders are removed with this one
            start = time.perf_counter()
            for index, cell in enumerate(nb["cells"]):
                if cell["cell_type"] != "code":
                    continue
                count += 1
                chunks.clear()
                value = run_cell(cell_source(cell), namespace, f"{os.path.basename(path)} [cell {index}]")
                outputs = _stream_outputs(chunks, work) + _figure_outputs()
                if value is not None:
                    outputs.append({"output_type": "execute_result", "execution_count": count,
                                    "data": {"text/plain": _lines(repr(value))}, "metadata": {}})
                cells.append((cell, count, outputs))
                saved_streams[0].write(f"cell {index} done at {time.perf_counter() - start:.1f} s\n")
            seconds = time.perf_counter() - start
            os.chdir(saved_cwd)  # the notebook may have moved elsewhere; leave the folder before it is removed
    except BaseException:
        sys.stdout, sys.stderr = saved_streams
        os.chdir(saved_cwd)
        sys.stderr.write("".join(text for _, text in chunks[-40:]))  # what the failing cell printed last
        raise
    finally:
        tempfile.tempdir = None
    sys.stdout, sys.stderr = saved_streams
    for cell, number, outputs in cells:
        cell["execution_count"], cell["outputs"] = number, outputs
    nb["metadata"][RECORD_KEY] = {
        "code_sha256": code_sha256(nb),
        "wall_seconds": round(seconds, 1),
        "command": f"python notebooks/execute.py {os.path.relpath(os.path.abspath(path), ROOT)}",
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(nb, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="+", help="nbformat-4 .ipynb files, rewritten in place with their outputs")
    args = parser.parse_args(argv)
    for path in args.notebooks:
        seconds = execute(path)
        print(f"{path}: executed in {seconds:.1f} s, outputs stored")


if __name__ == "__main__":
    main()
